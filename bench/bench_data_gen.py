"""Does concurrency really work? Records per second of `data_gen` at concurrency 1 and 64 against the
local chat-completions server (tests/llm_server.py, in its own process) with 200 ms latency per reply.

    .venv/bin/python bench/bench_data_gen.py [--latency 0.2] [--json out.json]

Each request costs the latency, so one request in flight gives at most 1/latency records per second,
and 64 in flight should give close to 64 times that: the ratio is the measurement.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(url: str, workdir: Path, concurrency: int, num_docs: int) -> dict:
    from data_gen.__main__ import main

    corpus = workdir / f"corpus-{concurrency}.jsonl"
    docs = ({"_id": f"d{i}", "title": f"Passage {i}", "text": f"Passage number {i} describes topic {i} at length."}
            for i in range(num_docs))
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = workdir / f"out-{concurrency}"
    code = main(["--corpus", str(corpus), "--output", str(out), "--model", "bench", "--base-url", url,
                 "--templates", "query_question", "--concurrency", str(concurrency), "--no-progress"])
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0 and summary["this_run"]["written"] == num_docs, summary
    elapsed = summary["this_run"]["elapsed_s"]
    return {"concurrency": concurrency, "records": num_docs, "elapsed_s": elapsed,
            "records_per_s": round(num_docs / elapsed, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latency", type=float, default=0.2)
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args()
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "llm_server.py"), "--latency", str(args.latency),
                               "--lifetime", "600"], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as tmp:
            # About 5 s of work each: 25 serial requests, and 25 rounds of 64 parallel ones.
            serial = run(url, Path(tmp), 1, num_docs=int(5 / args.latency))
            parallel = run(url, Path(tmp), 64, num_docs=64 * int(5 / args.latency))
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = {"latency_s": args.latency, "runs": [serial, parallel],
              "speedup_64_over_1": round(parallel["records_per_s"] / serial["records_per_s"], 1)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
