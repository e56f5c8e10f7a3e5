"""Refreshes that cost what changed: the sidecar's partial passes encode only the previous version's
candidates, the positives and a seeded sample of the rest, and search the whole corpus with those rows
in place of the last full pass's embeddings; every full_every-th pass is full and measures what a partial
pass would have found with the same model (partial_recall)."""
import json
import shutil

import numpy as np
import pytest
import torch

from embedlib.encoder import Encoder
from embedlib.negstore import NegativeStore
from embedlib.records import read_corpus, read_pairs
from mining.distributed import LocalComm
from mining.job import RefreshPlan, _Previous, found_fraction, mine, partial_rows
from mining.sidecar import SidecarConfig
from mining.spec import MiningSpec
from mining_helpers import save_encoder, scifact_slice


@pytest.fixture(scope="module")
def data(tmp_path_factory, scifact_dir):
    return scifact_slice(scifact_dir, tmp_path_factory.mktemp("slice"))


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("models")
    base = save_encoder(tiny_bert_dir, root / "m0")
    # Later "exports": small steps away from the base, as training makes them; the last a longer one, so
    # that a partial pass with it misses part of what a full pass finds.
    return [base] + [_nudged(base, root / f"m{seed}", seed, scale) for seed, scale in ((1, 0.01), (2, 0.01), (3, 0.1))]


def _nudged(source, out_dir, seed, scale=0.01):
    encoder = Encoder.from_pretrained(source)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=generator))
    encoder.save(out_dir)
    return out_dir


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture
def encoded(monkeypatch):
    """The texts every Encoder.encode call received, in calls."""
    calls = []
    real = Encoder.encode
    monkeypatch.setattr(Encoder, "encode", lambda self, texts, **kw: calls.append(list(texts)) or real(self, texts, **kw))
    return calls


def _spec(data, **changes):
    corpus, pairs = data
    return MiningSpec(corpus=str(corpus), pairs=str(pairs), k=10, positive_margin=0.95, block_rows=64,
                      encode_dtype="float32", **changes)


def _lists(run, version):
    with NegativeStore(run).open(version) as v:
        return np.load(v.path / "candidates.npy"), np.load(v.path / "scores.npy"), v.manifest


PLAN = RefreshPlan(full_every=3, depth=5, sample=0.1)


def test_partial_rows_are_the_candidates_the_positives_and_a_seeded_sample():
    candidates = np.array([[3, 4, 5, -1], [4, 9, -1, -1]], dtype=np.int32)
    positives = np.array([[0, -1], [7, 8]])
    previous = _Previous(version=4, candidates=candidates, partials_since_full=0)
    rows = partial_rows(previous, positives, 100, RefreshPlan(full_every=2, depth=2, sample=0.1))
    must = {3, 4, 9, 0, 7, 8}  # depth 2: 5 is beyond it
    assert must <= set(rows.tolist()) and 5 not in must
    assert len(rows) == len(must) + round(0.1 * (100 - len(must))) and np.all(np.diff(rows) > 0)
    again = partial_rows(previous, positives, 100, RefreshPlan(full_every=2, depth=2, sample=0.1))
    assert np.array_equal(rows, again)  # the same seed: a restarted sidecar draws the same rows
    other = partial_rows(_Previous(5, candidates, 0), positives, 100, RefreshPlan(full_every=2, depth=2, sample=0.1))
    assert not np.array_equal(rows, other)


def test_found_fraction_counts_each_querys_own_lists():
    reference = np.array([[1, 2, 3, -1], [4, 5, -1, -1]])
    assert found_fraction(np.array([[3, 2, 1, 9], [5, 4, 1, 1]]), reference) == 1.0
    assert found_fraction(np.array([[4, 5, -1, -1], [1, 2, 3, -1]]), reference) == 0.0  # another query's rows
    assert found_fraction(np.array([[1, -1, -1, -1], [4, 7, -1, -1]]), reference) == pytest.approx(2 / 5)


def test_partial_pass_encodes_only_its_rows_and_publishes_the_exact_filtered_topk_over_the_overlay(
        data, models, tmp_path, encoded):
    run = tmp_path / "run"
    spec = _spec(data)
    first = mine(spec, models[0], run, LocalComm(), show_progress=False)
    assert first["refresh"] == "full" and first["encoded_passages"] == 300
    previous_ids, _, _ = _lists(run, 1)

    encoded.clear()
    record = mine(spec, models[1], run, LocalComm(), mode="sidecar", show_progress=False, refresh=PLAN)
    docs = read_corpus(data[0])
    pairs = read_pairs(data[1], corpus={d.id: d for d in docs})
    positives = [[i for i, d in enumerate(docs) if d.id in p.pos_ids] for p in pairs]
    padded = np.full((len(pairs), max(map(len, positives))), -1)
    for q, rows in enumerate(positives):
        padded[q, : len(rows)] = rows
    subset = partial_rows(_Previous(1, previous_ids, 0), padded, len(docs), PLAN)
    assert record["refresh"] == "partial" and record["partials_since_full"] == 1
    assert record["encoded_passages"] == len(subset) < len(docs) == record["searched_passages"]
    # Only the subset's passages and the queries were encoded.
    assert sorted(map(len, encoded)) == sorted([len(subset), len(pairs)])
    assert encoded[0] == [docs[r].passage for r in subset]
    cache = run / "mining" / "cache"
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1  # a partial pass caches nothing (whole blocks only)

    # Independently: the filtered exact top-k over the whole corpus as the pass sees it: the first pass's
    # cached (float16) embeddings, with the subset's rows encoded by the new model.
    blocks = sorted(cache.glob("*/*/rows_*.npy"))
    emb = np.concatenate([np.load(b) for b in blocks]).astype(np.float64)
    encoder = Encoder.from_pretrained(models[1], max_length=spec.max_length)
    fresh = encoder.encode([docs[r].passage for r in subset], show_progress=False).astype(np.float16)
    assert not np.allclose(emb[subset], fresh, atol=1e-3)  # the models differ
    emb[subset] = fresh
    queries = encoder.encode([p.query for p in pairs], show_progress=False).astype(np.float64)
    scores = (queries @ emb.T).astype(np.float32)
    ids, got_scores, manifest = _lists(run, 2)
    assert manifest["extra"]["refresh"] == "partial" and manifest["extra"]["searched_passages"] == len(docs)
    for q, pair in enumerate(pairs):
        threshold = 0.95 * min(float(scores[q, r]) for r in positives[q])
        same_text = {r for r, d in enumerate(docs) if d.passage in {pair.query, *pair.pos}}
        order = np.lexsort((np.arange(len(docs)), -scores[q]))  # by score, ties to the lower corpus row
        want = [int(r) for r in order if r not in positives[q] and r not in same_text and scores[q, r] <= threshold][:10]
        assert ids[q][ids[q] >= 0].tolist() == want, f"query {q}"
        np.testing.assert_allclose(got_scores[q][: len(want)], scores[q][want], atol=1e-5)


def test_a_partial_pass_without_the_last_full_passs_embeddings_is_full(data, models, tmp_path):
    run = tmp_path / "run"
    spec = _spec(data)
    mine(spec, models[0], run, LocalComm(), show_progress=False)
    shutil.rmtree(run / "mining" / "cache")  # pruned, or a store written before passes recorded their model
    record = mine(spec, models[1], run, LocalComm(), mode="sidecar", show_progress=False, refresh=PLAN)
    assert record["refresh"] == "full" and record["encoded_passages"] == 300 and record["partial_recall"] is None
    assert mine(spec, models[2], run, LocalComm(), mode="sidecar", show_progress=False, refresh=PLAN)["refresh"] == "partial"


def test_every_third_pass_is_full_and_measures_what_a_partial_pass_would_have_found(data, models, tmp_path):
    run = tmp_path / "run"
    spec = _spec(data)
    kinds = [mine(spec, models[0], run, LocalComm(), show_progress=False)["refresh"]]
    for model in models[1:3]:
        kinds.append(mine(spec, model, run, LocalComm(), mode="sidecar", show_progress=False, refresh=PLAN)["refresh"])
    assert kinds == ["full", "partial", "partial"]

    # What a partial pass with the next model finds, from a copy of the run as it is now ...
    twin = tmp_path / "twin"
    shutil.copytree(run, twin)
    partial = mine(spec, models[3], twin, LocalComm(), mode="sidecar", show_progress=False,
                   refresh=RefreshPlan(full_every=99, depth=PLAN.depth, sample=PLAN.sample))
    assert partial["refresh"] == "partial"
    # ... against the full pass that the plan makes now.
    full = mine(spec, models[3], run, LocalComm(), mode="sidecar", show_progress=False, refresh=PLAN)
    assert full["refresh"] == "full" and full["partials_since_full"] == 0 and full["encoded_passages"] == 300
    full_ids, _, _ = _lists(run, 4)
    partial_ids, _, _ = _lists(twin, 4)
    measured = found_fraction(partial_ids, full_ids)
    assert 0 < measured < 1, "the test needs a partial pass that misses part of the full top-k"
    assert full["partial_recall"] == pytest.approx(measured, abs=0.02)  # the same rows, up to batching noise
    previous_ids, _, _ = _lists(run, 3)
    assert full["previous_recall"] == pytest.approx(found_fraction(previous_ids, full_ids), abs=1e-4)

    # The next pass is partial again; without a plan (the standalone job) every pass is full.
    assert mine(spec, models[0], run, LocalComm(), mode="sidecar", show_progress=False, refresh=PLAN)["refresh"] == "partial"
    assert mine(spec, models[1], run, LocalComm(), show_progress=False)["refresh"] == "full"
    records = [json.loads(line) for line in (run / "mining" / "refreshes.jsonl").read_text().splitlines()]
    assert [r["refresh"] for r in records] == ["full", "partial", "partial", "full", "partial", "full"]
    assert all((r["partial_recall"] is None) == (i != 3) for i, r in enumerate(records))


def test_sidecar_options_make_the_plan():
    config = SidecarConfig("run", full_every=4, partial_depth=50, partial_sample=0.02)
    assert config.refresh == RefreshPlan(full_every=4, depth=50, sample=0.02)
    assert SidecarConfig("run").refresh.full_every == 1  # by default every pass is full, as before
