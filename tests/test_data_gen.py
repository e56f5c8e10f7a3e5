"""data_gen against a real chat-completions server on 127.0.0.1 (tests/llm_server.py), plus its parts."""
from __future__ import annotations

import asyncio
import fcntl
import json
import os
import random
import subprocess
import sys
import time
from email.utils import formatdate
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from llm_server import LLMServer  # noqa: E402

from data_gen.__main__ import main, slurm_shard  # noqa: E402
from data_gen.backends import (  # noqa: E402
    FatalBackendError, GenerationFailed, HttpConfig, OpenAIBackend, backoff_delay, retry_after_seconds)
from data_gen.filters import Deduplicator, language_ok, normalize  # noqa: E402
from data_gen.job import shard_of  # noqa: E402
from data_gen.templates import DEFAULT_TEMPLATES, Rejected, load_templates, parse_reply  # noqa: E402
from embedlib.records import Document, read_pairs, read_scored_pairs  # noqa: E402

SECRET = "sk-test-9f3c1e7a-do-not-log"


def write_corpus(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def make_docs(n: int, markers: dict[int, str] | None = None) -> list[dict]:
    """Distinct English passages; doc i's text starts with markers[i] when given (the server's script key)."""
    topics = ["protein folding", "coral reefs", "solar wind", "gut bacteria", "glacier retreat", "dark matter",
              "sleep cycles", "bird migration", "soil carbon", "vaccine trials", "river deltas", "bone density"]
    docs = []
    for i in range(n):
        marker = (markers or {}).get(i, "")
        topic = topics[i % len(topics)]
        docs.append({"_id": f"d{i}", "title": f"Study {i} of {topic}",
                     "text": f"{marker} In cohort {i}, researchers measured {topic} and report findings "
                             f"about {topic} across {i + 3} sites. The effect was robust."})
    return docs


def run_main(tmp_path: Path, server: LLMServer, docs: list[dict], *extra: str, out: str = "out") -> tuple[int, dict]:
    corpus = write_corpus(tmp_path / "corpus.jsonl", docs)
    code = main(["--corpus", str(corpus), "--output", str(tmp_path / out), "--model", "test-model",
                 "--base-url", server.url, "--no-progress", "--backoff-base", "0.01", *extra])
    newest = max((tmp_path / out).glob("summary*.json"), key=lambda p: p.stat().st_mtime_ns)
    return code, json.loads(newest.read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def backend(server: LLMServer, **overrides) -> OpenAIBackend:
    config = dict(base_url=server.url, model="test-model", api_key_env="DATA_GEN_TEST_KEY", concurrency=4,
                  timeout=5.0, max_retries=3, backoff_base=0.01, backoff_max=0.05)
    return OpenAIBackend(HttpConfig(**{**config, **overrides}))


def ask(server: LLMServer, passage: str, **overrides):
    """One generate() call; returns (Generation or the exception, the backend's retry count)."""
    messages = [{"role": "user", "content": f'Write a query.\n<passage>\n{passage}\n</passage>\n{{"query": "..."}}'}]

    async def go():
        async with backend(server, **overrides) as b:
            try:
                return await b.generate(messages, seed=7), b.retries
            except (GenerationFailed, FatalBackendError) as e:
                return e, b.retries
    return asyncio.run(go())


# ---------------------------------------------------------------------------------------------------
# The HTTP backend, one request at a time


def test_normal_reply_sends_key_from_env_and_counts_tokens(monkeypatch):
    monkeypatch.setenv("DATA_GEN_TEST_KEY", SECRET)
    with LLMServer() as server:
        generation, retries = ask(server, "Coral reefs bleach in warm water.")
    assert retries == 0
    assert json.loads(generation.text)["query"].startswith("Coral reefs bleach")
    assert generation.completion_tokens > 0
    (request,) = server.requests
    assert request["authorization"] == f"Bearer {SECRET}"
    assert request["body"]["model"] == "test-model" and request["body"]["seed"] == 7
    assert "response_format" not in request["body"]
    with LLMServer() as server:
        ask(server, "Coral reefs bleach in warm water.", json_mode=True)
    assert server.requests[0]["body"]["response_format"] == {"type": "json_object"}


def test_429_waits_for_retry_after():
    with LLMServer(script={"RATE": ["429", "ok"]}, retry_after="1") as server:
        generation, retries = ask(server, "RATE limited passage")
    assert retries == 1 and "query" in json.loads(generation.text)
    first, second = server.requests
    assert first["behaviour"] == "429" and second["behaviour"] == "ok"
    # backoff_max is 0.05 s, so only the server's Retry-After can explain a one-second wait.
    assert second["time"] - first["time"] >= 1.0


def test_500_is_retried_then_fails_after_max_retries():
    with LLMServer(script={"FLAKY": ["500", "500", "ok"], "DOWN": ["500"]}) as server:
        generation, retries = ask(server, "FLAKY server")
        assert retries == 2 and "query" in json.loads(generation.text)
        error, retries = ask(server, "DOWN server", max_retries=2)
    assert isinstance(error, GenerationFailed) and error.reason == "http_500"
    assert retries == 2 and sum(r["marker"] == "DOWN" for r in server.requests) == 3


def test_reply_slower_than_timeout_is_retried():
    with LLMServer(script={"SLOW": ["slow", "ok"], "STUCK": ["slow"]}, slow_seconds=5) as server:
        start = time.monotonic()
        generation, retries = ask(server, "SLOW reply", timeout=0.3)
        assert retries == 1 and "query" in json.loads(generation.text)
        assert time.monotonic() - start < 4  # gave up on the slow attempt rather than waiting it out
        error, _ = ask(server, "STUCK reply", timeout=0.3, max_retries=0)
    assert isinstance(error, GenerationFailed) and error.reason == "timeout"


def test_malformed_body_is_retried_then_fails():
    with LLMServer(script={"TRUNC": ["malformed", "ok"], "BROKEN": ["malformed"]}) as server:
        generation, retries = ask(server, "TRUNC body")
        assert retries == 1 and "query" in json.loads(generation.text)
        error, _ = ask(server, "BROKEN body", max_retries=1)
    assert isinstance(error, GenerationFailed) and error.reason == "malformed_body"


def test_401_is_fatal_not_retried():
    with LLMServer(script={"AUTH": ["401"]}) as server:
        error, retries = ask(server, "AUTH please")
    assert isinstance(error, FatalBackendError) and "401" in str(error)
    assert retries == 0 and len(server.requests) == 1


def test_backoff_and_retry_after_parsing():
    rng = random.Random(0)
    for attempt in range(8):
        delay = backoff_delay(attempt, base=1.0, cap=8.0, retry_after=None, rng=rng)
        full = min(8.0, 2.0 ** attempt)
        assert full / 2 <= delay <= full
    assert backoff_delay(0, base=1.0, cap=8.0, retry_after=30.0, rng=rng) == 30.0
    assert retry_after_seconds("2") == 2.0 and retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("inf") is None and retry_after_seconds("nan") is None
    assert 55 <= retry_after_seconds(formatdate(time.time() + 60, usegmt=True)) <= 60


# ---------------------------------------------------------------------------------------------------
# Replies, filters, templates, sharding


def test_parse_reply_accepts_wrapped_json_and_rejects_the_rest():
    query, title, sts = load_templates(["query_question", "title", "sts"], "en")
    assert parse_reply(query, '```json\n{"query": "how do corals  bleach?"}\n```') == {"query": "how do corals bleach?"}
    assert parse_reply(query, '<think>{"query": "no"}</think> Here: {"query": "why is the sky blue", "x": 1}')[
        "query"] == "why is the sky blue"
    assert parse_reply(title, '{"title": "Coral bleaching in warm seas"}') == {"title": "Coral bleaching in warm seas"}
    assert parse_reply(sts, '{"sentence1": "A cat sits.", "sentence2": "A cat is sitting.", "score": "4.5"}')[
        "score"] == 4.5
    cases = [(query, "Sure, here is a query about corals.", "not_json"),
             (query, '{"query": 42}', "schema"),
             (query, '{"answer": "why do corals bleach?"}', "schema"),
             (query, '{"query": "why?"}', "too_short"),
             (query, json.dumps({"query": "why " * 100}), "too_long"),
             (sts, '{"sentence1": "A cat sits.", "sentence2": "A cat is sitting.", "score": 7}', "schema"),
             (sts, '{"sentence1": "A cat sits.", "sentence2": "A cat is sitting."}', "schema")]
    for template, text, reason in cases:
        with pytest.raises(Rejected) as info:
            parse_reply(template, text)
        assert info.value.reason == reason, text


def test_language_and_dedup():
    assert language_ok("why do corals bleach", "en") and not language_ok("珊瑚为什么会白化", "en")
    assert language_ok("珊瑚为什么会白化", "zh") and language_ok("CRISPR 基因编辑的脱靶效应", "zh")
    assert not language_ok("why do corals bleach", "zh")
    assert normalize("  Why do CORALS bleach?! ") == normalize("why do corals bleach") == "why do corals bleach"
    dedup = Deduplicator()
    assert dedup.add({"query": "Why do corals bleach?"}) and not dedup.add({"query": "why do corals  bleach"})
    assert dedup.add({"sentence1": "A b.", "sentence2": "C d."})
    assert not dedup.add({"sentence1": "c d", "sentence2": "a b"})  # the same pair, either order


@pytest.mark.parametrize("language", ["en", "zh"])
def test_templates_load_and_render(language):
    templates = load_templates(list(DEFAULT_TEMPLATES), language)
    assert {t.kind for t in templates} == {"query", "title", "sts"}
    doc = Document("d1", "A {title} with braces", "Body text {passage}")
    for template in templates:
        user = template.render(doc, max_passage_chars=1000)[-1]["content"]
        assert "<passage>" in user and "Body text {passage}" in user  # substituted once, not recursively
    with pytest.raises(ValueError, match="no template 'nope'"):
        load_templates(["nope"], language)


def test_sharding_is_a_stable_partition(monkeypatch):
    ids = [f"doc-{i}" for i in range(1000)]
    shards = [shard_of(i, 7) for i in ids]
    assert shards == [shard_of(i, 7) for i in ids] and set(shards) == set(range(7))
    # The same in another process with another string-hash salt (hash() would differ).
    code = "from data_gen.job import shard_of; print([shard_of(f'doc-{i}', 7) for i in range(50)])"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert json.loads(other.stdout) == shards[:50]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    assert slurm_shard() == (4, 8)


# ---------------------------------------------------------------------------------------------------
# Whole jobs (in process) against the server


def test_job_outputs_records_with_provenance_and_counts_rejections(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATA_GEN_TEST_KEY", SECRET)
    docs = make_docs(8, markers={1: "NONJSON", 2: "BADSCHEMA", 3: "FLAKY"})
    docs.append({**docs[0], "_id": "copy-of-d0"})  # same text: its queries are duplicates of d0's
    docs.append({"_id": "empty", "title": "", "text": " "})  # nothing to ask about: rejected unasked
    with LLMServer(script={"NONJSON": ["nonjson"], "BADSCHEMA": ["badschema"], "FLAKY": ["500", "ok"]}) as server:
        code, summary = run_main(tmp_path, server, docs, "--api-key-env", "DATA_GEN_TEST_KEY", "--concurrency", "4")
    assert code == 0 and summary["status"] == "complete"
    n_templates = len(DEFAULT_TEMPLATES)
    assert summary["work_items"] == 10 * n_templates
    run = summary["this_run"]
    assert run["rejected_by_reason"] == {"not_json": n_templates, "schema": n_templates, "duplicate": n_templates,
                                         "empty_passage": n_templates}
    assert run["written"] == 6 * n_templates and run["failed"] == 0 and summary["retries"] == n_templates
    assert summary["totals"] == {"written": 6 * n_templates, "rejected": 4 * n_templates, "failed": 0, "pending": 0}

    out = tmp_path / "out"
    pairs, sts = read_jsonl(out / "pairs.jsonl"), read_jsonl(out / "sts.jsonl")
    assert len(pairs) == 6 * (n_templates - 1) and len(sts) == 6
    by_id = {d["_id"]: d for d in docs}
    for record in pairs:
        prov = record["provenance"]
        doc = by_id[prov["source_id"]]
        assert record["pos_ids"] == [doc["_id"]] and prov["generator"] == "test-model"
        if prov["template"] == "title":  # title-content pair: the content without its title
            assert record["pos"] == [doc["text"]] and record["task"] == "title_content"
        else:
            assert record["pos"] == [f"{doc['title']} {doc['text']}"] and record["instruction"]
    outcomes = read_jsonl(out / "outcomes.jsonl")
    # Of two equal passages the first in corpus order is generated from; the later one is not asked about.
    duplicates = [o for o in outcomes if o["reason"] == "duplicate"]
    assert len(duplicates) == n_templates and {o["source_id"] for o in duplicates} == {"copy-of-d0"}
    assert all(o["detail"] == "same passage as 'd0'" for o in duplicates)
    assert {(o["source_id"], o["reason"]) for o in outcomes if o["reason"] != "duplicate"} == {
        ("d1", "not_json"), ("d2", "schema"), ("empty", "empty_passage")}
    assert len(server.requests) == 8 * n_templates + n_templates  # 8 passages asked, FLAKY twice; not the empty
    #                                                               one, nor the copy of d0
    # The secret went to the server and nowhere else.
    assert server.requests[0]["authorization"] == f"Bearer {SECRET}"
    captured = capsys.readouterr()
    for text in [captured.out, captured.err] + [p.read_text() for p in out.iterdir()]:
        assert SECRET not in text

    # The files are what the trainer reads.
    assert len(read_scored_pairs(out / "sts.jsonl")) == 6
    assert len(read_pairs(out / "pairs.jsonl")) == len(pairs)


def test_chinese_templates_end_to_end(tmp_path):
    docs = [{"_id": f"z{i}", "title": f"第{i}号研究", "text": f"研究人员在第{i}个队列中测量了珊瑚礁的白化程度，发现水温升高是主要原因。"}
            for i in range(3)]
    docs.append({"_id": "english", "title": "", "text": "An English passage that the model answers in English."})
    with LLMServer() as server:
        code, summary = run_main(tmp_path, server, docs, "--language", "zh", "--templates", "query_question,title")
    assert code == 0 and summary["totals"]["written"] == 6
    assert summary["this_run"]["rejected_by_reason"] == {"language": 2}  # the reply is not Chinese
    assert all("珊瑚" in r["query"] for r in read_jsonl(tmp_path / "out" / "pairs.jsonl"))


def test_failure_budget_stops_the_job(tmp_path):
    docs = make_docs(30, markers={i: "DOWN" for i in range(30)})
    with LLMServer(script={"DOWN": ["500"]}) as server:
        code, summary = run_main(tmp_path, server, docs, "--templates", "query_question", "--max-retries", "1",
                                 "--max-failures", "3", "--concurrency", "2", "--chunk-size", "1")
    assert code == 2 and summary["status"] == "aborted" and "--max-failures 3" in summary["message"]
    assert 4 <= summary["this_run"]["failed"] < 30  # stopped early instead of spinning through the corpus
    assert len(server.requests) < 2 * 30
    assert summary["totals"]["failed"] + summary["totals"]["pending"] == 30
    # Failed items are not final: once the server is back, the next run does them.
    with LLMServer() as server:
        code, summary = run_main(tmp_path, server, docs, "--templates", "query_question")
    assert code == 0 and summary["this_run"]["skipped"] == 0
    assert summary["totals"] == {"written": 30, "rejected": 0, "failed": 0, "pending": 0}


def test_fatal_error_stops_the_job(tmp_path):
    with LLMServer(script={"Study": ["401"]}) as server:
        code, summary = run_main(tmp_path, server, make_docs(20), "--concurrency", "2")
    assert code == 2 and summary["status"] == "aborted" and "HTTP 401" in summary["message"]
    assert len(server.requests) <= 2


def test_shards_partition_the_work(tmp_path):
    docs = make_docs(12)
    keys = []
    with LLMServer() as server:
        for shard in range(3):
            code, summary = run_main(tmp_path, server, docs, "--templates", "query_keyword,title",
                                     "--shard", str(shard), "--num-shards", "3", out="sharded")
            suffix = f"-{shard:05d}-of-00003"
            assert code == 0 and summary["status"] == "complete" and summary["shard"] == shard
            keys += [(r["provenance"]["source_id"], r["provenance"]["template"])
                     for r in read_jsonl(tmp_path / "sharded" / f"pairs{suffix}.jsonl")]
        assert sorted(keys) == sorted((d["_id"], t) for d in docs for t in ("query_keyword", "title"))
        # Another sharding into the same directory would do some passages' work twice.
        before = sorted(p.name for p in (tmp_path / "sharded").iterdir())
        assert run_main(tmp_path, server, docs, "--shard", "0", "--num-shards", "2", out="sharded")[0] == 2
        assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == before
        # So would a second job on a shard that is still being written.
        with open(tmp_path / "sharded" / ".lock-00001-of-00003") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            assert run_main(tmp_path, server, docs, "--shard", "1", "--num-shards", "3", out="sharded")[0] == 2
        assert len(server.requests) == 2 * len(docs)


def test_roundtrip_filter_rejects_queries_that_miss_their_passage(tmp_path, minilm_dir):
    import gzip

    from conftest import SCIFACT

    with gzip.open(SCIFACT / "corpus.jsonl.gz", "rt") as f:
        docs = [json.loads(next(f)) for _ in range(30)]
    for doc in docs:  # short passages keep the encoding quick on a busy CPU
        doc["text"] = doc["text"][:200]
    # The server's queries repeat the passage's opening words: they find it. The marked passage gets a
    # query about something else entirely.
    docs[4]["text"] = "OFFTOPIC " + docs[4]["text"]
    with LLMServer(script={"OFFTOPIC": ["offtopic"]}) as server:
        code, summary = run_main(tmp_path, server, docs, "--templates", "query_keyword",
                                 "--roundtrip-encoder", str(minilm_dir), "--roundtrip-k", "3")
    assert code == 0
    outcomes = read_jsonl(tmp_path / "out" / "outcomes.jsonl")
    assert {"source_id": docs[4]["_id"], "reason": "roundtrip"} in [
        {"source_id": o["source_id"], "reason": o["reason"]} for o in outcomes]
    assert summary["this_run"]["written"] >= 25  # the others do retrieve their passages
    assert list((tmp_path / "out").glob("roundtrip-corpus-*.npy"))  # cached for restarts and other shards
