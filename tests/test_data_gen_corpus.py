"""data_gen reads its corpus as a stream (ShardCorpus: one checking pass, then this shard's passages
re-read when needed) and de-duplicates equal passages across the shards of an array job: of two
passages with the same normalised text, in different shards, the first in corpus order is generated
from and the other is rejected as a duplicate, whichever shard runs first."""
from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from llm_server import LLMServer  # noqa: E402
from test_data_gen import make_docs, read_jsonl, write_corpus  # noqa: E402

from data_gen.__main__ import main  # noqa: E402
from data_gen.corpus import ShardCorpus, shard_of  # noqa: E402
from embedlib.records import RecordError, read_corpus  # noqa: E402


def _id_in_shard(shard: int, num_shards: int, prefix: str) -> str:
    return next(f"{prefix}{i}" for i in range(1000) if shard_of(f"{prefix}{i}", num_shards) == shard)


def _corpus_with_a_copy_in_the_other_shard(tmp_path: Path) -> tuple[Path, str, str]:
    """6 passages; the 5th repeats the 2nd (other case and punctuation), and the two are in different shards."""
    docs = make_docs(6)
    original = _id_in_shard(0, 2, "orig-")
    copy = _id_in_shard(1, 2, "copy-")
    docs[1]["_id"] = original
    docs[4] = {"_id": copy, "title": docs[1]["title"].upper(), "text": docs[1]["text"].replace(".", "!")}
    return write_corpus(tmp_path / "corpus.jsonl", docs), original, copy


def _run_shards(tmp_path: Path, server: LLMServer, corpus: Path, order: list[int], out: str) -> dict:
    for shard in order:
        code = main(["--corpus", str(corpus), "--output", str(tmp_path / out), "--model", "test-model",
                     "--base-url", server.url, "--no-progress", "--templates", "query_question,sts",
                     "--shard", str(shard), "--num-shards", "2"])
        assert code == 0
    written, duplicates = set(), []
    for shard in range(2):
        suffix = f"-{shard:05d}-of-00002"
        for name in ("pairs", "sts"):
            written |= {r["provenance"]["source_id"] for r in read_jsonl(tmp_path / out / f"{name}{suffix}.jsonl")}
        duplicates += [o for o in read_jsonl(tmp_path / out / f"outcomes{suffix}.jsonl") if o["reason"] == "duplicate"]
    return {"written": written, "duplicates": sorted((o["source_id"], o["template"], o["detail"]) for o in duplicates)}


def test_a_passage_repeated_in_another_shard_is_generated_from_once(tmp_path):
    corpus, original, copy = _corpus_with_a_copy_in_the_other_shard(tmp_path)
    with LLMServer() as server:
        forward = _run_shards(tmp_path, server, corpus, [0, 1], "forward")
        asked_forward = len(server.requests)
    with LLMServer() as server:
        backward = _run_shards(tmp_path, server, corpus, [1, 0], "backward")
    assert forward == backward  # deterministic: not a race between the shards
    assert original in forward["written"] and copy not in forward["written"]
    assert forward["duplicates"] == [(copy, t, f"same passage as {original!r}") for t in ("query_question", "sts")]
    assert asked_forward == 5 * 2  # 5 distinct passages x 2 templates; the copy is never sent


def test_summary_counts_the_duplicate_passages(tmp_path):
    corpus, _, copy = _corpus_with_a_copy_in_the_other_shard(tmp_path)
    with LLMServer() as server:
        _run_shards(tmp_path, server, corpus, [1], "one")
    summary = json.loads((tmp_path / "one" / "summary-00001-of-00002.json").read_text())
    assert summary["duplicate_passages"] == 1 and summary["this_run"]["rejected_by_reason"] == {"duplicate": 2}


def test_shard_corpus_streams_this_shards_passages_in_corpus_order(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", make_docs(50))
    docs = read_corpus(corpus)
    for shard in range(3):
        view = ShardCorpus(corpus, shard, 3)
        expected = [(row, d) for row, d in enumerate(docs) if shard_of(d.id, 3) == shard]
        assert [(p.row, p.doc) for p in view] == expected and len(view) == len(expected)
        assert [(p.row, p.doc) for p in view] == expected  # a second pass reads the file again
    limited = ShardCorpus(corpus, 0, 1, max_docs=7)
    assert [p.doc for p in limited] == docs[:7]
    assert [text for block in limited.iter_passages(block_rows=16) for text in block] == [d.passage for d in docs]


def test_the_scan_keeps_no_texts(tmp_path):
    """Peak Python memory of the checking pass over a ~12 MB corpus stays far below the corpus."""
    long_text = "word " * 200
    docs = [{"_id": f"doc-{i}", "title": f"Title {i}", "text": f"{i} {long_text}"} for i in range(12000)]
    corpus = write_corpus(tmp_path / "corpus.jsonl", docs)
    tracemalloc.start()
    view = ShardCorpus(corpus, 0, 1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(view) == 12000 and peak < corpus.stat().st_size / 4, (peak, corpus.stat().st_size)


def test_a_corpus_changed_after_the_scan_is_an_error(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", make_docs(5))
    view = ShardCorpus(corpus)
    with open(corpus, "a") as f:
        f.write(json.dumps({"_id": "late", "text": "added after the scan"}) + "\n")
    with pytest.raises(RecordError, match="changed"):
        list(view)
