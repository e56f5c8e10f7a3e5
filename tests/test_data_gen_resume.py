"""A data_gen job SIGKILLed mid-run and started again loses no record and repeats none."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llm_server import LLMServer  # noqa: E402
from test_data_gen import make_docs, read_jsonl, write_corpus  # noqa: E402

TEMPLATES = ("query_question", "title", "sts")


def start_job(corpus: Path, out: Path, server: LLMServer) -> subprocess.Popen:
    command = [sys.executable, "-m", "data_gen", "--corpus", str(corpus), "--output", str(out),
               "--model", "test-model", "--base-url", server.url, "--templates", ",".join(TEMPLATES),
               "--concurrency", "4", "--chunk-size", "5", "--backoff-base", "0.01", "--no-progress"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def final_keys(out: Path) -> list[tuple]:
    """Keys with a record or a rejection, one entry per line that says so."""
    keys = [(r["provenance"]["source_id"], r["provenance"]["template"], r["provenance"]["sample_index"])
            for name in ("pairs.jsonl", "sts.jsonl") for r in read_jsonl(out / name)]
    keys += [(o["source_id"], o["template"], o["sample_index"])
             for o in read_jsonl(out / "outcomes.jsonl") if o["outcome"] == "rejected"]
    return keys


def test_sigkill_then_resume_finishes_every_key_exactly_once(tmp_path):
    docs = make_docs(40, markers={3: "NONJSON", 17: "NONJSON", 8: "FLAKY", 25: "FLAKY"})
    corpus = write_corpus(tmp_path / "corpus.jsonl", docs)
    out = tmp_path / "out"
    expected = sorted((d["_id"], t, 0) for d in docs for t in TEMPLATES)
    script = {"NONJSON": ["nonjson"], "FLAKY": ["500", "ok"]}

    with LLMServer(script=script, latency=0.05) as server:
        job = start_job(corpus, out, server)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and job.poll() is None:
            if len(read_jsonl(out / "pairs.jsonl")) >= 15:
                break
            time.sleep(0.02)
        assert job.poll() is None, f"the job ended before it could be killed: {job.communicate()}"
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
        job.stdout.close()
        job.stderr.close()
        assert not (out / "summary.json").exists()

        done_before = final_keys(out)
        assert 15 <= len(done_before) < len(expected)
        seeds_before = {r["provenance"]["seed"] for r in read_jsonl(out / "pairs.jsonl")}
        # A kill in the middle of a write leaves a torn last line; the restart must cut it off.
        with open(out / "pairs.jsonl", "a") as f:
            f.write('{"query": "torn mid-wri')
        requests_before = len(server.requests)

        job = start_job(corpus, out, server)
        stdout, stderr = job.communicate(timeout=120)
        assert job.returncode == 0, stderr[-3000:]
        second_run_seeds = {r["body"]["seed"] for r in server.requests[requests_before:]}

    keys = final_keys(out)
    assert sorted(keys) == expected, "every key exactly once"
    assert not seeds_before & second_run_seeds, "nothing already written was asked for again"
    summary = json.loads((out / "summary.json").read_text())
    run, totals = summary["this_run"], summary["totals"]
    assert summary["status"] == "complete" and run["torn_lines_cut"] == 1
    assert run["skipped"] == len(done_before)
    assert run["skipped"] + run["written"] + run["rejected"] + run["failed"] == len(expected)
    assert totals == {"written": len(expected) - 2 * len(TEMPLATES), "rejected": 2 * len(TEMPLATES),
                      "failed": 0, "pending": 0}
    assert Counter(o["reason"] for o in read_jsonl(out / "outcomes.jsonl")) == {"not_json": 2 * len(TEMPLATES)}
    assert "cutting off a torn last line" in stderr


def test_sigterm_stops_cleanly_with_a_summary(tmp_path):
    """SLURM sends SIGTERM before a time limit: the job writes what it has, says so, and exits 2."""
    docs = make_docs(40)
    corpus = write_corpus(tmp_path / "corpus.jsonl", docs)
    out = tmp_path / "out"
    with LLMServer(latency=0.05) as server:
        job = start_job(corpus, out, server)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(read_jsonl(out / "pairs.jsonl")) < 10:
            time.sleep(0.02)
        job.send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=30)
    assert job.returncode == 2, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["message"]
    written = summary["totals"]["written"]
    assert 10 <= written < 3 * len(docs) and summary["totals"]["pending"] == 3 * len(docs) - written
    assert written == len(final_keys(out)) == len(set(final_keys(out)))
