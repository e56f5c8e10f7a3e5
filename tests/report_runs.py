"""Run directories for the report's tests, written the way the trainer and the miners write them (the key
names of README "Reading progress", mining/job.py's refresh records), with values simple enough that a
test can say what every plotted series must be without the report's code."""
from __future__ import annotations

import calendar
import json
import time
from pathlib import Path

import yaml

T0 = 1_800_000_000.0  # Unix time at the start of every run below
STEP_SECONDS = 10.0


def iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def write_run(run_dir: Path, steps: int, *, kinds=("retrieval",), status: str = "completed",
              max_steps: int | None = None) -> Path:
    """A run without dynamic negatives, mining or evaluation: config.yaml, run.json, metrics.jsonl."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "run_dir": str(run_dir), "train": {"max_steps": max_steps or steps},
        "data": [{"name": kind, "kind": kind, "path": f"{kind}.jsonl"} for kind in kinds]}))
    (run_dir / "run.json").write_text(json.dumps({
        "argv": ["--local_rank=0", "--config", "training/recipes/quickstart.yaml", f"run_dir={run_dir}",
                 f"train.max_steps={max_steps or steps}"], "status": status, "world_size": 2}))
    write_jsonl(run_dir / "metrics.jsonl", [metrics_record(step, kinds) for step in range(1, steps + 1)])
    return run_dir


def metrics_record(step: int, kinds=("retrieval",)) -> dict:
    losses = {f"loss/{kind}": round(2.0 / (step + k) + 0.1 * (step % 3), 6) for k, kind in enumerate(kinds)}
    return {"step": step, "loss": round(sum(losses.values()), 6), **losses, "lr": 1e-5 * min(1.0, step / 5),
            "samples": 32, "samples_per_s": 3.0 + (step % 4), "step_time_s": STEP_SECONDS,
            "negatives_version": {}, "tasks": list(kinds), "time": T0 + STEP_SECONDS * step}


# The dynamic run: version -> (export step it was mined with, time it was published, step adopted at).
VERSIONS = {1: (0, T0 - 100.0, 1), 2: (8, T0 + 10 * STEP_SECONDS + 5, 11), 3: (16, T0 + 18 * STEP_SECONDS + 5, 19)}
CHECK_INTERVAL = 4
EVAL_STEPS = (16, 32, 48)


def version_at(step: int) -> int:
    return max(v for v, (_, _, adopted) in VERSIONS.items() if adopted <= step)


def check_figures(step: int) -> dict:
    """What the trainer logs for data set `scifact` at a check; no observed sample (mean None) at step 12."""
    version = version_at(step)
    return {"negatives/scifact/eligible": 8, "negatives/scifact/stale": step // 4, "negatives/scifact/replaced": 3 * (step // 4),
            "negatives/scifact/mean_score": None if step == 12 else round(0.9 - 0.01 * step, 4),
            "negatives/scifact/ratio_q10": 0.5, "negatives/scifact/ratio_q50": round(1.0 - 0.01 * step, 4),
            "negatives/scifact/ratio_q90": 1.2, "negatives/scifact/unobserved": 0, "negatives/scifact/version": version,
            "negatives/scifact/export_age_steps": step - VERSIONS[version][0], "negatives/sidecar_alive": True}


def score_figures(step: int) -> dict:
    """scores/scifact/positive and /negative, as the trainer logs them every step."""
    return {"scores/scifact/positive": round(0.5 + 0.005 * step, 4),
            "scores/scifact/negative": round(0.4 - 0.002 * step, 4)}


def eval_record(step: int) -> dict:
    return {"step": step, "eval/ndcg@10": 0.5 + step / 1000, "eval/recall@100": 0.9 + step / 10000,
            "eval/mrr@10": 0.45 + step / 2000, "eval/num_queries": 202}


def write_dynamic_run(run_dir: Path, steps: int = 48) -> Path:
    """A run with the sidecar: three store versions, checks every 4 steps, an evaluation every 16."""
    write_run(run_dir, steps)
    records = []
    for step in range(1, steps + 1):
        record = {**metrics_record(step), "negatives_version": {"scifact": version_at(step)},
                  **score_figures(step)}
        if step % CHECK_INTERVAL == 0:
            record.update(check_figures(step))
        records.append(record)
    write_jsonl(run_dir / "metrics.jsonl", records)
    write_jsonl(run_dir / "eval.jsonl", [eval_record(step) for step in EVAL_STEPS if step <= steps])
    (run_dir / "mining").mkdir()
    write_jsonl(run_dir / "mining" / "refreshes.jsonl", [
        {"time": iso(published), "mode": "mine" if version == 1 else "sidecar", "version": version,
         "export_step": export_step, "encode_seconds": 100.0 + version, "search_seconds": 0.5 * version,
         "num_queries": 607, "k": 200, "corpus_size": 5183, "removed_versions": []}
        for version, (export_step, published, _) in VERSIONS.items()])
    return run_dir


def write_static_run(run_dir: Path, steps: int = 20) -> Path:
    """Like the quickstart: negatives mined once with the base model (version 1) before step 1, and no
    dynamic-negatives check within the run (check_interval beyond its steps)."""
    write_run(run_dir, steps)
    write_jsonl(run_dir / "metrics.jsonl", [{**metrics_record(step), "negatives_version": {"scifact": 1}}
                                            for step in range(1, steps + 1)])
    (run_dir / "mining").mkdir()
    write_jsonl(run_dir / "mining" / "refreshes.jsonl", [
        {"time": iso(T0 - 300), "mode": "mine", "version": 1, "export_step": 0, "encode_seconds": 117.0,
         "search_seconds": 1.1, "num_queries": 607, "k": 200, "corpus_size": 5183, "removed_versions": []}])
    return run_dir


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def published_step(version: int) -> int:
    """Steps finished when the version was published (the step times are T0 + 10 s x step)."""
    seconds = calendar.timegm(time.strptime(iso(VERSIONS[version][1]), "%Y-%m-%dT%H:%M:%SZ"))
    return max(0, int((seconds - T0) // STEP_SECONDS))
