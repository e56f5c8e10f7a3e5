"""The standalone mining job on a SciFact slice: published negatives equal an independent brute-force
filtered top-k, the cache, determinism, the approximate index's recall, and bad input."""
import json
import shutil

import numpy as np
import pytest
import torch

from embedlib.encoder import Encoder
from embedlib.negstore import NegativeStore
from embedlib.records import read_corpus, read_pairs
from mining.__main__ import main
from mining.distributed import LocalComm
from mining.job import mine
from mining.spec import MiningSpec, load_spec
from mining_helpers import save_encoder, scifact_slice


@pytest.fixture(scope="module")
def data(tmp_path_factory, scifact_dir):
    return scifact_slice(scifact_dir, tmp_path_factory.mktemp("slice"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _published(run_dir, version):
    with NegativeStore(run_dir).open(version) as v:
        path = v.path
    return (path / "candidates.npy").read_bytes(), (path / "scores.npy").read_bytes()


def test_negatives_equal_an_independent_brute_force_filtered_topk(data, minilm_dir, tmp_path):
    corpus_path, pairs_path = data
    spec = MiningSpec(corpus=str(corpus_path), pairs=str(pairs_path), k=20, max_length=64, block_rows=128,
                      search_slack=0)  # no slack: the filters force deeper searches
    record = mine(spec, minilm_dir, tmp_path / "run", LocalComm(), show_progress=False)
    assert record["deepened_queries"] > 0 and record["short_queries"] == 0

    # Independently: every corpus embedding (the float16 cache) against every query, in float64.
    docs = read_corpus(corpus_path)
    pairs = read_pairs(pairs_path, corpus={d.id: d for d in docs})
    cache_files = sorted((tmp_path / "run" / "mining" / "cache").rglob("rows_*.npy"))
    corpus_emb = torch.from_numpy(np.concatenate([np.load(f) for f in cache_files]).astype(np.float64))
    encoder = Encoder.from_pretrained(minilm_dir, max_length=64)
    query_emb = torch.from_numpy(encoder.encode([p.query for p in pairs], show_progress=False)).double()
    all_scores = (query_emb @ corpus_emb.T).float()

    with NegativeStore(tmp_path / "run").open_latest() as version:
        assert version.num_queries == len(pairs) and version.k == 20
        assert version.manifest["model_step"] == 0
        for q, pair in enumerate(pairs):
            positives = [i for i, d in enumerate(docs) if d.id in pair.pos_ids]
            same_text = {i for i, d in enumerate(docs) if d.passage in {pair.query, *pair.pos}}
            threshold = 0.95 * min(float(all_scores[q, i]) for i in positives)
            order = torch.sort(all_scores[q], descending=True, stable=True).indices.tolist()  # ties: lower id
            want = [i for i in order
                    if i not in positives and i not in same_text and float(all_scores[q, i]) <= threshold][:20]
            ids, scores = version.candidates(q)
            assert ids.tolist() == want, f"query {q}"
            np.testing.assert_allclose(scores, all_scores[q, want].numpy(), rtol=0, atol=1e-6)


def test_cache_is_used_for_the_same_model_only_and_output_is_deterministic(data, tiny_export, tmp_path,
                                                                            monkeypatch):
    corpus_path, pairs_path = data
    run, cache = tmp_path / "run", tmp_path / "cache"
    spec = MiningSpec(corpus=str(corpus_path), pairs=str(pairs_path), k=30, positive_margin=None,
                      block_rows=64, cache_dir=str(cache))
    encoded = []
    real_encode = Encoder.encode
    monkeypatch.setattr(Encoder, "encode", lambda self, texts, **kw: encoded.append(len(texts)) or real_encode(self, texts, **kw))

    first = mine(spec, tiny_export, run, LocalComm(), show_progress=False)
    files = {p: p.stat().st_mtime_ns for p in cache.rglob("rows_*.npy")}
    assert not first["cache_hit"] and len(files) == 5 and sum(encoded) == 300 + 40
    encoded.clear()
    second = mine(spec, tiny_export, run, LocalComm(), show_progress=False)
    assert second["cache_hit"] and encoded == [40]  # only the queries were encoded
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("rows_*.npy")} == files
    assert _published(run, 1) == _published(run, 2)  # same inputs, same bytes

    encoded.clear()
    other_model = save_encoder(tiny_export, tmp_path / "other_model", seed=1)
    third = mine(spec, other_model, run, LocalComm(), show_progress=False)
    assert not third["cache_hit"] and sum(encoded) == 340
    assert len(list(cache.iterdir())) == 2  # one entry per model fingerprint
    assert _published(run, 3) != _published(run, 1)

    lines = [json.loads(line) for line in (run / "mining" / "refreshes.jsonl").read_text().splitlines()]
    assert [r["version"] for r in lines] == [1, 2, 3] and [r["cache_hit"] for r in lines] == [False, True, False]


def test_approximate_index_reports_recall_against_exact(data, tiny_export, tmp_path):
    corpus_path, pairs_path = data
    base = dict(corpus=str(corpus_path), pairs=str(pairs_path), k=20, positive_margin=None, block_rows=64,
                cache_dir=str(tmp_path / "cache"))
    exact = mine(MiningSpec(**base), tiny_export, tmp_path / "run", LocalComm(), show_progress=False)
    full = mine(MiningSpec(**base, index="ivf", nlist=4, nprobe=4), tiny_export, tmp_path / "run", LocalComm(),
                show_progress=False)
    assert exact["recall"] is None and full["recall"] == 1.0  # probing every list is exhaustive
    assert _published(tmp_path / "run", 1) == _published(tmp_path / "run", 2)
    hnsw = mine(MiningSpec(**base, index="hnsw", hnsw_m=8, ef_search=8), tiny_export, tmp_path / "run",
                LocalComm(), show_progress=False)
    assert 0.0 < hnsw["recall"] <= 1.0


def _cli(capsys, *args):
    code = main(["mine", "--launcher", "none", "--no-progress", "--block-rows", "64", *map(str, args)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_bad_input_is_a_one_line_error_and_publishes_nothing(data, tiny_export, tmp_path, capsys):
    corpus_path, pairs_path = data
    run = tmp_path / "run"

    bad_pairs = tmp_path / "bad_pairs.jsonl"
    lines = pairs_path.read_text().splitlines()
    record = json.loads(lines[2])
    record["pos_ids"] = ["no-such-doc"]
    bad_pairs.write_text("\n".join(lines[:2] + [json.dumps(record)]) + "\n")
    code, err = _cli(capsys, "--model", tiny_export, "--corpus", corpus_path, "--queries", bad_pairs, "--run-dir", run)
    assert code == 2 and len(err) == 1 and "bad_pairs.jsonl:3" in err[0] and "pos_ids[0]" in err[0]

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = _cli(capsys, "--model", tiny_export, "--corpus", empty, "--queries", pairs_path, "--run-dir", run)
    assert code == 2 and len(err) == 1 and "empty corpus" in err[0]

    code, err = _cli(capsys, "--model", tmp_path, "--corpus", corpus_path, "--queries", pairs_path, "--run-dir", run)
    assert code == 2 and len(err) == 1 and "not an encoder export" in err[0]
    assert not (run / "negatives").exists() or NegativeStore(run).versions() == []

    code, err = _cli(capsys, "--model", tiny_export, "--corpus", corpus_path, "--queries", pairs_path, "--run-dir", run,
                     "--k", 10)
    assert code == 0 and NegativeStore(run).versions() == [1] and load_spec(run).k == 10
    other_corpus = tmp_path / "other_corpus.jsonl"
    shutil.copy(corpus_path, other_corpus)
    with open(other_corpus, "a") as f:
        f.write(json.dumps({"_id": "extra", "title": "", "text": "one more document"}) + "\n")
    code, err = _cli(capsys, "--model", tiny_export, "--corpus", other_corpus, "--queries", pairs_path,
                     "--run-dir", run)
    assert code == 2 and len(err) == 1 and "belongs to another corpus" in err[0]
    assert NegativeStore(run).versions() == [1] and load_spec(run).corpus == str(corpus_path)
