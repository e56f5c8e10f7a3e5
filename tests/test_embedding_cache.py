"""The one embedding cache (embedlib.embedding_cache) shared by mining, the sidecar, evaluation and the
trainer's evaluation: a corpus is encoded once per model; the cache stays under its bound, least
recently used entries first."""
import json
import os
import shutil
import time
import types
from pathlib import Path

import numpy as np
import pytest

from embedlib.embedding_cache import (EmbeddingCache, cache_entries, encode_corpus, prune_cache, run_cache_dir,
                                      run_cache_settings)
from embedlib.encoder import Encoder
from embedlib.evaluation import evaluate_model, main as evaluation_main
from mining.distributed import LocalComm
from mining.job import mine
from mining.spec import MiningSpec, save_spec
from mining_helpers import save_encoder


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def beir(tmp_path_factory, scifact_dir):
    """A small BEIR directory whose corpus the miner reads too: 150 SciFact abstracts, 8 dev queries
    judged against them, 12 training pairs."""
    out = tmp_path_factory.mktemp("beir")
    import gzip

    with gzip.open(scifact_dir / "corpus.jsonl.gz", "rt") as f:
        docs = [json.loads(line) for line in f]
    queries = [json.loads(line) for line in (scifact_dir / "queries.dev.jsonl").read_text().splitlines()]
    qrels = [line.split("\t") for line in (scifact_dir / "qrels.dev.tsv").read_text().splitlines()[1:]]
    queries = queries[:8]
    judged = [r for r in qrels if r[0] in {q["_id"] for q in queries}]
    relevant = {r[1] for r in judged}
    docs = [d for d in docs if d["_id"] in relevant] + [d for d in docs if d["_id"] not in relevant][:150 - len(relevant)]
    (out / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (out / "queries.dev.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (out / "qrels.dev.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in judged))
    pairs = [{"query": f"question about {d['title'][:40]}", "pos_ids": [d["_id"]]} for d in docs[:12]]
    (out / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny_bert_dir):
    return save_encoder(tiny_bert_dir, tmp_path_factory.mktemp("export"))


@pytest.fixture
def encoded(monkeypatch):
    calls = []
    real = Encoder.encode
    monkeypatch.setattr(Encoder, "encode", lambda self, texts, **kw: calls.append(len(texts)) or real(self, texts, **kw))
    return calls


def _mine(beir, model, run, **changes):
    settings = dict(k=10, block_rows=64, max_length=32, encode_dtype="float32") | changes
    spec = MiningSpec(corpus=str(beir / "corpus.jsonl"), pairs=str(beir / "pairs.jsonl"), **settings)
    save_spec(spec, run)
    return mine(spec, model, run, LocalComm(), show_progress=False)


def _evaluate(beir, model, cache_dir=None, **kw):
    return evaluate_model(model, beir=beir, split="dev", max_length=32, dtype="float32", show_progress=False,
                          cache_dir=cache_dir, **kw)


def test_evaluation_after_mining_encodes_only_the_queries(beir, export, tmp_path, encoded):
    run = tmp_path / "run"
    _mine(beir, export, run)
    encoded.clear()
    cached = _evaluate(beir, export, run_cache_dir(run))
    assert encoded == [8]  # the 8 dev queries; the 150 passages came from the mining pass
    assert cached["encoding"]["corpus_rows_encoded"] == 0 and cached["encoding"]["corpus_rows_from_cache"] == 150
    uncached = _evaluate(beir, export)
    assert uncached["encoding"]["corpus_rows_encoded"] == 150 and uncached["encoding"]["cache"] is None
    assert cached["retrieval"] == uncached["retrieval"]  # the same float16 values either way


def test_mining_after_evaluation_hits_the_evaluations_entry(beir, export, tmp_path, encoded):
    run = tmp_path / "run"
    first = _evaluate(beir, export, run_cache_dir(run))
    assert first["encoding"]["corpus_rows_encoded"] == 150
    encoded.clear()
    record = _mine(beir, export, run)
    # The evaluation cut the corpus as a miner does (4096-row blocks); this miner's blocks are 64 rows,
    # so it encodes its own; with the evaluation's block size it reads the evaluation's entry.
    assert not record["cache_hit"]
    encoded.clear()
    record = _mine(beir, export, tmp_path / "run2", cache_dir=str(run_cache_dir(run)), block_rows=4096)
    assert record["cache_hit"] and record["encoded_passages"] == 0 and encoded == [12]


def test_an_evaluation_of_a_mined_export_through_the_command_line(beir, export, tmp_path, capsys):
    run = tmp_path / "run"
    _mine(beir, export, run)
    out = tmp_path / "figures.json"
    assert evaluation_main(["--model", str(export), "--beir", str(beir), "--max-length", "32", "--dtype", "float32",
                            "--no-progress", "--cache-dir", str(run_cache_dir(run)), "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["encoding"]["corpus_rows_encoded"] == 0 and printed["encoding"]["texts"] == 8
    assert 0 <= printed["encoding"]["padding_fraction"] < 1


def test_another_max_length_or_dtype_is_another_entry(beir, export, tmp_path):
    run = tmp_path / "run"
    _mine(beir, export, run)
    assert evaluate_model(export, beir=beir, max_length=24, dtype="float32", show_progress=False,
                          cache_dir=run_cache_dir(run))["encoding"]["corpus_rows_encoded"] == 150
    assert evaluate_model(export, beir=beir, max_length=32, dtype="bfloat16", show_progress=False,
                          cache_dir=run_cache_dir(run))["encoding"]["corpus_rows_encoded"] == 150
    assert len(cache_entries(run_cache_dir(run))) == 3


def test_the_trainers_evaluation_reuses_the_runs_cache(beir, export, tmp_path):
    """training/main.py evaluate_export reads the run's cache settings from RUN/mining/spec.json."""
    from training.main import evaluate_export

    run = tmp_path / "run"
    _mine(beir, export, run)
    config = types.SimpleNamespace(
        run_dir=str(run), model=types.SimpleNamespace(max_length=32),
        evaluation=types.SimpleNamespace(beir=str(beir), split="dev", batch_size=16, query_instruction="", max_length=None))
    figures = evaluate_export(export, config)
    assert figures["eval_encoding/corpus_rows_encoded"] == 0
    assert figures["eval/ndcg@10"] == _evaluate(beir, export)["retrieval"]["ndcg@10"]
    assert run_cache_settings(run).encode_dtype == "float32"
    assert run_cache_settings(tmp_path / "no_run").cache_dir == run_cache_dir(tmp_path / "no_run")


def _entry(root, model, size, age):
    """An entry of `size` bytes last used `age` seconds ago."""
    cache = EmbeddingCache(root, model * 24, "c" * 24, 32, "float32")
    cache.dir.mkdir(parents=True)
    (cache.dir / "rows_0000000000_0000000010.npy").write_bytes(b"x" * size)
    when = 1_000_000 - age
    os.utime(cache.dir, (when, when))
    return cache


def test_prune_removes_the_least_recently_used_entries_beyond_the_bound(tmp_path):
    root = tmp_path / "cache"
    a, b, c, d = (_entry(root, m, 1000, age) for m, age in (("a", 40), ("b", 10), ("c", 30), ("d", 20)))
    assert prune_cache(root, None) == [] and len(cache_entries(root)) == 4  # no bound
    removed = prune_cache(root, 2500)  # room for two: the newest, b and d
    assert sorted(p.parent.name[0] for p in removed) == ["a", "c"]
    assert [e.path for e in cache_entries(root)] == [b.dir, d.dir]
    assert not (root / ("a" * 24)).exists()  # the emptied model directory goes too
    # The entry in use stays whatever the bound; the others make room.
    assert prune_cache(root, 0, keep=(d,)) == [b.dir] and [e.path for e in cache_entries(root)] == [d.dir]


def test_a_use_makes_an_entry_recent(beir, export, tmp_path):
    root = tmp_path / "cache"
    old = _entry(root, "a", 10_000, 100)
    _entry(root, "b", 10_000, 50)
    encoder = Encoder.from_pretrained(export, max_length=32)
    passages = [json.loads(line)["text"] for line in (beir / "corpus.jsonl").read_text().splitlines()]
    mine_entry = EmbeddingCache(root, "e" * 24, "f" * 24, 32, "float32")
    encode_corpus(encoder, passages, mine_entry, batch_size=32, max_length=32, show_progress=False)
    old.touch()  # a read of the old entry: now it is the most recent
    size = sum(e.size for e in cache_entries(root) if e.path == mine_entry.dir)
    prune_cache(root, 10_000 + size)
    assert {e.path for e in cache_entries(root)} == {old.dir, mine_entry.dir}


def test_an_entry_pruned_by_another_process_is_encoded_again(beir, export, tmp_path):
    root = tmp_path / "cache"
    encoder = Encoder.from_pretrained(export, max_length=32)
    passages = [json.loads(line)["text"] for line in (beir / "corpus.jsonl").read_text().splitlines()]
    entry = EmbeddingCache(root, "e" * 24, "f" * 24, 32, "float32")
    first = encode_corpus(encoder, passages, entry, batch_size=32, max_length=32, show_progress=False, block_rows=64)
    assert first.encoded_rows == 150 and entry.existing_block_rows() == 64
    again = encode_corpus(encoder, passages, entry, batch_size=32, max_length=32, show_progress=False)
    assert again.hits == 3 and again.encoded_rows == 0  # the entry's own 64-row blocks, found
    shutil.rmtree(root)
    third = encode_corpus(encoder, passages, entry, batch_size=32, max_length=32, show_progress=False)
    assert third.encoded_rows == 150
    np.testing.assert_array_equal(np.concatenate(third.blocks), np.concatenate(first.blocks))


# ---- consumers of one entry at the same time ------------------------------------------------------------

# A consumer in its own process: encodes the corpus through the entry once the start file exists (so that
# several start together), each encode call made slow enough that their passes overlap; writes what it did.
_CONSUMER = """
import json, sys, time
from pathlib import Path
import numpy as np, torch
from embedlib.embedding_cache import EmbeddingCache, encode_corpus
from embedlib.encoder import Encoder
torch.set_num_threads(1)
export, corpus, root, start_file, out = sys.argv[1:6]
encoder = Encoder.from_pretrained(export, max_length=32)
slow = Encoder.encode
Encoder.encode = lambda self, texts, **kw: time.sleep(0.3) or slow(self, texts, **kw)
passages = [json.loads(line)["text"] for line in Path(corpus).read_text().splitlines()]
entry = EmbeddingCache(root, "e" * 24, "f" * 24, 32, "float32")
while not Path(start_file).exists():
    time.sleep(0.01)
result = encode_corpus(encoder, passages, entry, batch_size=32, max_length=32, show_progress=False, block_rows=10)
np.save(out + ".npy", np.concatenate(result.blocks))
Path(out + ".json").write_text(json.dumps({"encoded_rows": result.encoded_rows, "hits": result.hits}))
"""

# Holds the lock of the first block as an encoder would while encoding it, until killed.
_HOLDER = """
import sys, time
from embedlib.embedding_cache import EmbeddingCache
entry = EmbeddingCache(sys.argv[1], "e" * 24, "f" * 24, 32, "float32")
with entry.block_lock(0, 10) as held:
    print("held" if held else "not held", flush=True)
    time.sleep(600)
"""


def _consumer(script, *args):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=repo, stdout=subprocess.PIPE,
                            text=True)


def _single_process_embeddings(beir, export, tmp_path):
    encoder = Encoder.from_pretrained(export, max_length=32)
    passages = [json.loads(line)["text"] for line in (beir / "corpus.jsonl").read_text().splitlines()]
    entry = EmbeddingCache(tmp_path / "alone", "e" * 24, "f" * 24, 32, "float32")
    return np.concatenate(encode_corpus(encoder, passages, entry, batch_size=32, max_length=32, show_progress=False,
                                        block_rows=10).blocks)


def test_consumers_at_the_same_time_encode_each_block_once(beir, export, tmp_path):
    root, start = tmp_path / "cache", tmp_path / "start"
    consumers = [_consumer(_CONSUMER, export, beir / "corpus.jsonl", root, start, tmp_path / f"c{i}") for i in range(2)]
    time.sleep(8)  # both loaded and waiting
    start.touch()
    assert [c.wait(timeout=300) for c in consumers] == [0, 0]
    results = [json.loads((tmp_path / f"c{i}.json").read_text()) for i in range(2)]
    assert sum(r["encoded_rows"] for r in results) == 150  # 15 blocks, each encoded by one of them
    assert all(r["encoded_rows"] > 0 for r in results)  # and the work was shared
    assert sum(r["hits"] for r in results) == 15  # what one encoded, the other read
    expected = _single_process_embeddings(beir, export, tmp_path)
    for i in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"c{i}.npy"), expected)


def test_a_block_whose_encoder_died_is_encoded_by_the_one_waiting_for_it(beir, export, tmp_path):
    root, start = tmp_path / "cache", tmp_path / "start"
    holder = _consumer(_HOLDER, root)
    try:
        assert holder.stdout.readline().strip() == "held"
        start.touch()
        consumer = _consumer(_CONSUMER, export, beir / "corpus.jsonl", root, start, tmp_path / "c")
        entry = EmbeddingCache(root, "e" * 24, "f" * 24, 32, "float32")
        deadline = time.monotonic() + 300
        while len(list(entry.dir.glob("rows_*.npy"))) < 14:  # every block but the held one
            assert consumer.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1)
        assert consumer.poll() is None  # waiting for the block being "encoded"
    finally:
        holder.kill()  # dies without saving it: the lock goes with the process
        holder.wait()
    assert consumer.wait(timeout=120) == 0
    assert json.loads((tmp_path / "c.json").read_text()) == {"encoded_rows": 150, "hits": 0}
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), _single_process_embeddings(beir, export, tmp_path))


# ---- damaged blocks: re-encoded with a warning, never trusted ---------------------------------------------


def _damage(entry_dir: Path, how: str) -> Path:
    """Damage the first block file of an entry as disk faults and careless copies do; returns it."""
    first, second = sorted(entry_dir.glob("rows_*.npy"))[:2]
    if how == "overwritten":  # other float16 values in place: header and trailer intact
        data = bytearray(first.read_bytes())
        start = np.load(first, mmap_mode="r").offset
        data[start:start + 256] = np.random.default_rng(0).bytes(256)
        first.write_bytes(bytes(data))
    elif how == "constant":  # a valid .npy of the right shape and dtype, written by someone else
        np.save(first, np.full(np.load(first, mmap_mode="r").shape, 0.5, np.float16))
    elif how == "swapped":  # another block's file, the same shape
        shutil.copyfile(second, first)
    elif how == "empty":
        first.write_bytes(b"")
    return first


@pytest.mark.parametrize("how", ["overwritten", "constant", "swapped", "empty"])
def test_a_damaged_block_is_encoded_again_by_evaluation_and_mining(beir, export, tmp_path, how, caplog):
    run = tmp_path / "run"
    _mine(beir, export, run)  # 64-row blocks: the evaluation reads the same entry
    cold_negatives = np.load(run / "negatives" / "v000001" / "candidates.npy")
    cold_figures = _evaluate(beir, export)["retrieval"]
    (entry,) = cache_entries(run_cache_dir(run))

    damaged = _damage(entry.path, how)
    with caplog.at_level("WARNING"):
        evaluated = _evaluate(beir, export, run_cache_dir(run))
    assert evaluated["retrieval"] == cold_figures
    assert evaluated["encoding"]["corpus_rows_encoded"] == 64  # the damaged block alone
    assert any(str(damaged) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")

    _damage(entry.path, how)
    record = _mine(beir, export, tmp_path / "run2", cache_dir=str(run_cache_dir(run)))
    assert record["encoded_passages"] == 64
    np.testing.assert_array_equal(np.load(tmp_path / "run2" / "negatives" / "v000001" / "candidates.npy"),
                                  cold_negatives)


def test_the_data_generators_round_trip_cache_is_checked_too(beir, export, tmp_path, caplog):
    from data_gen.filters import RoundTripFilter

    passages = [json.loads(line)["text"] for line in (beir / "corpus.jsonl").read_text().splitlines()][:40]
    corpus = types.SimpleNamespace(fingerprint="f" * 64, num_docs=len(passages),
                                   iter_passages=lambda rows: (passages[i:i + rows] for i in range(0, len(passages), rows)))
    cold = RoundTripFilter(export, corpus, k=3, cache_dir=tmp_path).corpus_emb
    (cached,) = tmp_path.glob("roundtrip-corpus-*.npy")
    np.save(cached, np.zeros_like(cold))  # same shape and dtype, other values, no trailer
    with caplog.at_level("WARNING"):
        again = RoundTripFilter(export, corpus, k=3, cache_dir=tmp_path).corpus_emb
    np.testing.assert_array_equal(again, cold)
    assert any(str(cached) in r.getMessage() for r in caplog.records)
    assert np.array_equal(RoundTripFilter(export, corpus, k=3, cache_dir=tmp_path).corpus_emb, cold)  # rewritten
