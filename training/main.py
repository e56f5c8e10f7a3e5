"""The trainer: `deepspeed training/main.py --config RECIPE.yaml [--resume] [key=value ...]`.

Also runs under `torchrun --nproc_per_node N`, `srun` (one task per GPU) and `mpiexec -n N`; on a
machine without a GPU the ranks are CPU processes over gloo. Options: training/config.py.

The run directory (config `run_dir`):

    RUN/config.yaml       the resolved configuration of the latest start (recipe + overrides)
    RUN/run.json          machine-readable record: argv, versions, world size, start/end, status
                          (running, completed, preempted, failed), first and final step, exports
    RUN/metrics.jsonl     one JSON object per optimizer step: step, loss, loss/<task kind>, lr,
                          samples, samples_per_s, step_time_s, negatives_version (per data set),
                          tasks (per rank); at dynamic-negatives checks also negatives/<data set>/
                          {stale, replaced, mean_score, unobserved, version, export_age_steps} and
                          negatives/sidecar_alive
    RUN/eval.jsonl        with evaluation.beir: one JSON object per evaluation of an export on that
                          BEIR split, {"step", "eval/ndcg@10", "eval/recall@100", "eval/mrr@10", ...}
    RUN/checkpoints/      step_XXXXXXXX DeepSpeed tags, the newest train.keep_checkpoints kept,
                          each complete only once it holds complete.json (training/checkpoint.py);
                          dynamic_negatives.safetensors in each holds the negatives state
    RUN/exports/          step_XXXXXXXX encoder directories (embedlib.exports): every
                          train.export_every steps and at the end; what the mining sidecar loads
    RUN/negatives/        the mining sidecar's negative store (embedlib.negstore), read here
    RUN/tensorboard/      when tensorboard is installed

Dynamic hard negatives (training/dynamic_negatives.py; options under `negatives:`). A retrieval data
set with a corpus and num_negatives > 0 trains with the candidates of the store version in use:
at the start the checkpoint's version, else the newest one mined for its pairs file and corpus.
After every step the loss's scores of each query's negatives are recorded; every
negatives.check_interval steps all ranks apply the rule (stale samples move to their next window).
Rank 0 looks for a newer store version without ever waiting for one (checksums are verified in a
background thread) and announces it; all ranks adopt it at the same step. The sidecar
(`python -m mining sidecar --run-dir RUN`) mines every new export; when it dies, training goes on
with the version in use (one warning), and versions are picked up again when it comes back. With
DataLoader workers, batches prefetched across a check or an adoption keep the negatives they were
planned with (their scores are not credited to the new ones), so a resumed run matches an
uninterrupted one exactly only with train.num_workers=0 or without checks and new versions.

Before the first step everything that can be checked is: the configuration, the DeepSpeed JSON
against it, the model directory, and every record of every data file. A problem there is one line
on stderr (`error: ...`, naming file, line and field for data) and exit status 2.

Checkpoints are written every train.save_every steps, at the end, and when SIGTERM or SIGUSR1
arrives (cluster preemption): the flag is agreed on by all ranks after the current step, which is
then saved before the ranks exit with status 0 and run.json says "preempted". `--resume` continues
from the newest complete checkpoint (model, optimizer, LR schedule, data position), so a resumed run
computes the same losses as an uninterrupted one (tests/test_training_runs.py).

Every step every rank does exactly two encoder forwards (retrieval: queries, then positives and
negatives together; STS: first, then second sentences), whatever its task: ZeRO-3 gathers
parameters collectively per forward, so the ranks' forward counts must agree.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import sys
import time
from importlib import metadata
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script, Python puts training/ first on sys.path, where our data.py, config.py, ...
    # would shadow any top-level module of those names; the repository root belongs there instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
import torch.distributed as dist
import yaml

from embedlib.atomic import atomic_write_bytes, atomic_write_json
from embedlib.encoder import EncoderError
from embedlib.exports import list_exports
from embedlib.negstore import NegativeStoreError
from embedlib.records import RecordError
from training.checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from training.config import (
    Config,
    ConfigError,
    build_ds_config,
    load_config,
    resolve_model_path,
    to_dict,
)
from training.data import RetrievalTask, SamplerState, Task, load_tasks, loss_kind, make_loader
from training.dynamic_negatives import (
    STATE_FILENAME,
    Announcement,
    DynamicNegativeState,
    VersionFeed,
    broadcast_from_rank0,
    load_states,
    save_states,
)
from training.loss import RetrievalEmbeddings, STSEmbeddings, StepLoss, cbb_step_loss
from training.schedule import assign_tasks

logger = logging.getLogger("training")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML (training/recipes/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in run_dir (start fresh if none)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # added by the deepspeed launcher; LOCAL_RANK is used
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. optim.lr=1e-5 data.0.batch_size=8")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    # Installed first: a cluster's warning signal may arrive while the model and data still load.
    preemption = Preemption()
    try:
        rank_env_from_slurm(os.environ)
        config, model_path, tasks = prepare(args)
    except (ConfigError, RecordError, EncoderError, NegativeStoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        return train(config, model_path, tasks, args, argv if argv is not None else sys.argv[1:], preemption)
    except (ConfigError, EncoderError) as error:  # found once the model is loaded (every rank finds it)
        print(f"error: {error}", file=sys.stderr)
        return 2


def rank_env_from_slurm(env) -> None:
    """Under `srun python training/main.py` (one task per GPU, no launcher), take the ranks from SLURM.

    The batch script must export MASTER_ADDR (the first node: `scontrol show hostnames
    "$SLURM_JOB_NODELIST" | head -n 1`); MASTER_PORT defaults to 29500. Launchers set RANK themselves,
    and then SLURM's variables are left alone.
    """
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) < 2:
        return
    if "MASTER_ADDR" not in env:
        raise ConfigError("running under srun with several tasks: export MASTER_ADDR (the first node of "
                          "the job, e.g. $(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1))")
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_PORT", "29500")


def prepare(args: argparse.Namespace) -> tuple[Config, Path, list[Task]]:
    """Everything checked before any process group exists: cheap to fail, one clear line."""
    config = load_config(args.config, args.overrides)
    model_path = resolve_model_path(config.model.path)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    build_ds_config(config, world_size, torch.cuda.is_available())  # contradictions fail here
    try:
        assign_tasks(0, world_size, {d.name: d.weight for d in config.data}, config.seed, config.train.schedule_mode)
    except ValueError as error:
        raise ConfigError(f"{args.config}: {error}") from None
    if not args.resume and latest_checkpoint(config.run_dir) is not None:
        raise ConfigError(f"{config.run_dir} already holds checkpoints: pass --resume to continue that run, "
                          "or choose another run_dir")
    return config, model_path, load_tasks(config)


def train(config: Config, model_path: Path, tasks: list[Task], args: argparse.Namespace, argv: list[str],
          preemption: Preemption) -> int:
    import deepspeed  # imported late: the checks above should fail fast

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    has_gpu = torch.cuda.is_available()
    ds_config = build_ds_config(config, world_size, has_gpu)
    run_dir = Path(config.run_dir)

    engine = build_engine(config, model_path, ds_config)
    dim = engine.module.embedding_dim
    if any(not 0 < d <= dim for d in config.loss.matryoshka_dims or []):
        raise ConfigError(f"loss.matryoshka_dims {config.loss.matryoshka_dims}: each must be between 1 and "
                          f"the embedding size {dim}")
    start_step, state = 0, SamplerState.initial(tasks)
    negatives = {t.name: DynamicNegativeState(len(t), t.dynamic) for t in tasks
                 if isinstance(t, RetrievalTask) and t.dynamic is not None}
    if args.resume:
        loaded = load_checkpoint(engine, run_dir)
        if loaded is not None:
            start_step, client_state = loaded
            state = SamplerState.from_dict(client_state["data"], tasks)
            if negatives:
                try:
                    load_states(checkpoint_dir(run_dir, start_step) / STATE_FILENAME, negatives)
                except ValueError as error:
                    raise ConfigError(str(error)) from None
            logger.info("resumed from step %d", start_step)
        elif rank == 0:
            logger.info("--resume: no checkpoint in %s, starting from step 0", run_dir)

    record = RunRecord(run_dir, argv, world_size, ds_config, start_step, enabled=rank == 0)
    if rank == 0:
        atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False).encode())
    try:
        status, step = train_loop(engine, config, tasks, state, negatives, start_step, record, preemption)
    except BaseException as error:
        record.finish("failed", None, error=repr(error))
        raise
    record.finish(status, step)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def build_engine(config: Config, model_path: Path, ds_config: dict):
    """The Encoder in a DeepSpeed engine, with AdamW and the warm-up/decay schedule of optim.*."""
    import deepspeed
    from embedlib.encoder import Encoder

    torch.manual_seed(config.seed)  # a new projection starts identically on every rank
    m = config.model
    encoder = Encoder.from_pretrained(model_path, pooling=m.pooling, output_dim=m.output_dim, normalize=m.normalize,
                                      max_length=m.max_length, trust_remote_code=m.trust_remote_code)
    o = config.optim
    decay = [p for p in encoder.parameters() if p.ndim >= 2]  # no decay on biases and norms
    no_decay = [p for p in encoder.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # ZeRO offload needs its own CPU Adam (compiled)

        optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True)
    else:
        # A torch optimizer: DeepSpeed compiles nothing for it (its FusedAdam would need a build).
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config))
    engine, _, _, _ = deepspeed.initialize(model=encoder, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    engine.train()
    return engine


def lr_factor(config: Config):
    warmup, total, schedule = config.optim.warmup_steps, config.train.max_steps, config.optim.schedule

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def train_loop(engine, config: Config, tasks: list[Task], state: SamplerState,
               negatives: dict[str, DynamicNegativeState], start_step: int, record: RunRecord,
               preemption: Preemption) -> tuple[str, int]:
    from training.export import export_model
    from training.metrics import EVAL_FILENAME, MetricsLog, StepProgress

    rank, world_size = dist.get_rank(), dist.get_world_size()
    run_dir, t = Path(config.run_dir), config.train
    task_of = {task.name: task for task in tasks}
    metrics = MetricsLog(run_dir, start_step) if rank == 0 else None
    eval_log = MetricsLog(run_dir, start_step, EVAL_FILENAME) if rank == 0 and config.evaluation.beir else None
    progress = StepProgress(t.max_steps, start_step, enabled=rank == 0 and t.progress)
    feed = VersionFeed(run_dir, {name: task_of[name].fingerprints for name in negatives},
                       sidecar_timeout_s=config.negatives.sidecar_timeout_s)

    def adopt(announcement: Announcement, step: int, lookahead: int) -> None:
        """Every rank at the same step: train with the announced store version from the next plan on."""
        feed.pin(announcement, step, lookahead)
        for name in announcement.tasks:
            negatives[name].sync()
            if negatives[name].adopt_version(announcement.version, announcement.model_step):
                logger.info("rank %d: %s adopts negatives v%06d (export step %s) at step %d", rank, name,
                            announcement.version, announcement.model_step, step)

    def checkpoint(step: int) -> None:
        for dyn in negatives.values():
            dyn.sync()
        save_checkpoint(engine, run_dir, step, {"data": state.to_dict()}, keep=t.keep_checkpoints,
                        write_extra=(lambda tag_dir: save_states(tag_dir / STATE_FILENAME, negatives)) if negatives
                        else None)

    def evaluation_due(step: int) -> bool:
        e = config.evaluation
        return bool(e.beir) and (step == t.max_steps or (e.every > 0 and step % e.every == 0))

    def export(step: int) -> None:
        info = export_model(engine, run_dir, step, keep=t.keep_exports,
                            extra={"model_source": config.model.path, "world_size": world_size})
        if info is not None:
            print(f"exported: {info.path}", flush=True)
        if evaluation_due(step):
            if rank == 0:  # the export is the consolidated model under every ZeRO stage
                eval_log.log({"step": step, **evaluate_export(info.path, config)})
            dist.barrier()

    if negatives:  # the version to start with: the checkpoint's, else the newest one mined for our data
        restored = next((dyn.version for dyn in negatives.values() if dyn.version is not None), None)
        first = broadcast_from_rank0(feed.first(restored) if rank == 0 else None)
        if first is not None:
            adopt(first, start_step, lookahead=0)
        elif restored is not None:
            raise ConfigError(f"the checkpoint trains with negatives v{restored:06d}, and {feed.store.root} holds "
                              "no sound version mined for these data sets any more")
    loader = make_loader(tasks, engine.module.tokenizer, config, world_size, rank, start_step, state, negatives)
    # Plans are made this many steps ahead of training (DataLoader prefetch): an adoption reaches
    # the batches after them, and the previous version stays pinned until then.
    lookahead = loader.num_workers * (loader.prefetch_factor or 0)

    step, status = start_step, "completed"
    try:
        if start_step >= t.max_steps:
            export(start_step)  # nothing left to train: make sure the final export exists
            return status, step
        last = time.perf_counter()
        for batch in loader:
            step_index = batch["step"]
            seed_step(config.seed, step_index, rank)
            lr = engine.get_lr()[0]
            kinds = [loss_kind(task_of[name].kind) for name in batch["assignment"]]
            out = train_step(engine, batch, kinds, config)
            step = step_index + 1
            state.cursors = batch["cursors_after"]
            if batch.get("store_version") is not None:  # s of these rows' negatives, from the loss
                negatives[batch["task"]].record(batch["rows"], out.negative_scores, step,
                                                generations=batch["generations"])

            now = time.perf_counter()
            samples = sum(task_of[name].batch_size for name in batch["assignment"])
            figures = {"step": step, "loss": out.value, **{f"loss/{k}": v for k, v in out.per_task_kind.items()},
                       "lr": lr, "samples": samples, "samples_per_s": samples / (now - last),
                       "step_time_s": now - last, "tasks": list(batch["assignment"]), "time": time.time(),
                       "negatives_version": {}}
            if negatives:
                figures.update(dynamic_negatives_step(negatives, feed, step, lookahead, adopt, rank))

            if rank == 0:
                metrics.log(figures)
                progress.update(figures)

            stop = preemption.agreed(engine.device)
            if stop or step == t.max_steps or (t.save_every and step % t.save_every == 0):
                checkpoint(step)
            if stop:
                status = "preempted"
                if rank == 0:
                    logger.info("signal %s: saved step %d, exiting", preemption.signal_name, step)
                break
            if step == t.max_steps or (t.export_every and step % t.export_every == 0) or evaluation_due(step):
                export(step)
            if step >= t.max_steps:
                break
            last = time.perf_counter()  # checkpoints and exports are not training time
    finally:
        progress.close()
        feed.close()
        for log in (metrics, eval_log):
            if log is not None:
                log.close()
    return status, step


def dynamic_negatives_step(negatives: dict[str, DynamicNegativeState], feed: VersionFeed, step: int,
                           lookahead: int, adopt, rank: int) -> dict:
    """After optimizer step `step`, on every rank: the rule where due, then a new store version if rank 0
    has one ready. Returns the figures for metrics.jsonl (the checks' on check steps)."""
    figures: dict = {}
    checked = False
    for name, dyn in negatives.items():
        if dyn.due(step):
            dyn.sync()
            figures.update(dyn.check(step).metrics(prefix=f"negatives/{name}/"))
            checked = True
    if checked and rank == 0:
        figures["negatives/sidecar_alive"] = not feed.sidecar_dead
    # After the check: a new version resets every score, so the rule could not fire at this step.
    announcement = broadcast_from_rank0(feed.take() if rank == 0 else None)
    if announcement is not None:
        adopt(announcement, step, lookahead)
    feed.release(step)
    figures["negatives_version"] = {name: dyn.version for name, dyn in negatives.items()}
    return figures


def train_step(engine, batch: dict, kinds: list[str], config: Config) -> StepLoss:
    """One optimizer step on this rank's batch; `kinds` is every rank's loss kind for the step."""
    out = cbb_step_loss(embed(engine, batch), kinds, config.loss, dist.get_world_size())
    engine.backward(out.loss)
    engine.step()
    return out


def embed(engine, batch: dict) -> RetrievalEmbeddings | STSEmbeddings:
    """This rank's embeddings for its batch: always two forwards (see the module docstring)."""
    device = engine.device

    def forward(inputs: dict) -> torch.Tensor:
        return engine(**{k: v.to(device) for k, v in inputs.items()})

    if batch["kind"] == "sts":
        return STSEmbeddings(forward(batch["first"]), forward(batch["second"]), batch["score"].to(device))
    query = forward(batch["query"])
    passages = forward(batch["passages"])
    n, m = len(query), batch["num_negatives"]
    return RetrievalEmbeddings(query, passages[:n], passages[n:].reshape(n, m, passages.shape[-1]))


def evaluate_export(export_dir: Path, config: Config) -> dict[str, float]:
    """nDCG@10, Recall@k and MRR@10 of an export on config.evaluation's BEIR split, as eval/<metric>."""
    from embedlib.evaluation import evaluate_model

    e = config.evaluation
    results = evaluate_model(export_dir, beir=e.beir, split=e.split, batch_size=e.batch_size,
                             query_instruction=e.query_instruction,
                             max_length=e.max_length or config.model.max_length, show_progress=False)
    return {f"eval/{name}": value for name, value in results["retrieval"].items()}


def seed_step(seed: int, step: int, rank: int) -> None:
    """Dropout's randomness is a function of (seed, step, rank), so a resumed run draws the same masks
    without saving every rank's RNG state."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the ranks agree on it after each step (any rank's flag stops all)."""

    def __init__(self):
        self.signal_name: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device) -> bool:
        flag = torch.tensor([1 if self.signal_name else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class RunRecord:
    """RUN/run.json, written by rank 0 at the start and at the end."""

    def __init__(self, run_dir: Path, argv: list[str], world_size: int, ds_config: dict, start_step: int,
                 enabled: bool):
        self.path, self.enabled = run_dir / "run.json", enabled
        self.run_dir = run_dir
        self.data = {
            "argv": argv, "world_size": world_size, "start_step": start_step, "final_step": None,
            "status": "running", "started_at": _now(), "ended_at": None, "exports": [],
            "ds_config": ds_config, "host": platform.node(),
            "versions": {"python": platform.python_version(),
                         **{name: _version(name) for name in ("torch", "deepspeed", "transformers")}},
        }
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, self.data)

    def finish(self, status: str, final_step: int | None, error: str | None = None) -> None:
        if not self.enabled:
            return
        self.data.update(status=status, final_step=final_step, ended_at=_now(),
                         exports=[e.step for e in list_exports(self.run_dir)])
        if error:
            self.data["error"] = error
        atomic_write_json(self.path, self.data)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
