"""The trainer: `deepspeed training/main.py --config RECIPE.yaml [--resume] [key=value ...]`.

Also runs under `torchrun --nproc_per_node N`, `srun` (one task per GPU) and `mpiexec -n N`; on a
machine without a GPU the ranks are CPU processes over gloo. Options: training/config.py.

The run directory (config `run_dir`):

    RUN/config.yaml       the resolved configuration of the latest start (recipe + overrides)
    RUN/run.json          machine-readable record: argv, versions, world size, start/end, status
                          (running, completed, preempted, failed), first and final step, exports,
                          ema_decay (train.ema, null without an average)
    RUN/metrics.jsonl     one JSON object per optimizer step: step, loss, loss/<task kind>, lr,
                          samples, samples_per_s, step_time_s, negatives_version (per data set),
                          tasks (per rank), scores/<data set>/{positive, negative} (mean score of
                          the queries' positives and own hard negatives); with loss.false_negative_margin
                          also masked_false_negatives (the (query, candidate) pairs of all ranks left out
                          of a denominator at that step); at dynamic-negatives checks also negatives/<data set>/
                          {eligible, stale, replaced, mean_score, mean_initial_score, ratio_q10, ratio_q50,
                          ratio_q90, unobserved, version, export_age_steps} and negatives/sidecar_alive
    RUN/eval.jsonl        with evaluation.beir or evaluation.sets: one JSON object per set and evaluated
                          export, {"step", "set", "category", "main_score", "eval/<metric>", ...}
                          (retrieval: eval/ndcg@10, eval/recall@100, eval/mrr@10, ...; sts: eval/spearman;
                          pair_classification: eval/cosine_ap; classification: eval/accuracy); the
                          category means are the report's to compute (embedlib.report)
    RUN/checkpoints/      step_XXXXXXXX DeepSpeed tags, the newest train.keep_checkpoints kept,
                          each complete only once it holds complete.json (training/checkpoint.py);
                          dynamic_negatives.safetensors in each holds the negatives state (when a
                          data set reads the negative store), and ema*.safetensors with train.ema
    RUN/exports/          step_XXXXXXXX encoder directories (embedlib.exports): every
                          train.export_every steps and at the end; what the mining sidecar loads;
                          with train.ema the average of the weights in ema/ beside them, or instead
                          (train.ema_export; training/ema.py)
    RUN/negatives/        the mining sidecar's negative store (embedlib.negstore), read here
    RUN/logs/             trainer.rank<R>.log: every rank's whole log (INFO and above, the libraries'
                          notices and warnings included); the console shows rank 0's progress bar,
                          warnings and errors only (embedlib.logs)
    RUN/tensorboard/      when tensorboard is installed

Dynamic hard negatives (options under `negatives:`): a retrieval data set with a corpus and
num_negatives > 0 trains with the candidates of the run's negative store, refreshed by the mining
sidecar (`python -m mining sidecar --run-dir RUN`) and by Conan's rule; training/negatives/ owns all of
it, and the training loop calls its runtime once per step.

Before any model is loaded everything that can be checked is: the configuration, the DeepSpeed JSON
against it, the model directory, and every record of every data file. A problem there is one line
on stderr (`error: ...`, naming file, line and field for data), exit status 2, and nothing written.
A loss that is not finite stops the run at that step: one line, exit status 1, run.json "failed".

Checkpoints are written every train.save_every steps, at the end, and when SIGTERM or SIGUSR1
arrives (cluster preemption): the flag is agreed on by all ranks after the current step, which is
then saved before the ranks exit with status 0 and run.json says "preempted". `--resume` continues
from the newest complete checkpoint (model, optimizer, LR schedule, data position), so a resumed run
computes the same losses as an uninterrupted one (tests/test_training_runs.py).

Every step every rank does exactly two encoder forwards (retrieval: queries, then positives and
negatives together; STS: first, then second sentences), whatever its task: ZeRO-3 gathers
parameters collectively per forward, so the ranks' forward counts must agree. With
train.grad_cache.chunk_size (training/grad_cache.py) each group is encoded in chunks, twice, and the
ranks agree on a common number of chunk forwards and backwards per step, padding with one-text forwards.
"""
from __future__ import annotations

import argparse
import logging
import math
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
from embedlib.attention import future_weight
from embedlib.encoder import EncoderError
from embedlib.exports import list_exports
from embedlib.negstore import NegativeStoreError
from embedlib.records import RecordError
from embedlib.logs import route_logs
from embedlib.rundir import CONFIG_YAML, EVAL_JSONL, LOGS, RUN_JSON, RunStatus, utc_now
from training.checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from training.config import (Config, ConfigError, ModelConfig, build_ds_config, check_evaluation_data, check_model,
                             check_writable_dir, evaluation_sets, load_config, to_dict)
from training.data import (RetrievalBatch, SamplerState, StepBatch, Task, check_same_data, load_tasks, make_loader,
                           prefetch_steps, samples_in_step, shared_query_tasks, store_specs)
from training.ema import WeightAverage
from training.grad_cache import backward_step
from training import zero3_loading
from training.lora import add_lora, trainable_parameter_groups
from training.loss import StepLoss
from training.negatives import NegativesRuntime
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
    # Installed first: a cluster's warning signal may arrive while the model and data still load.
    preemption = Preemption()
    rank = launcher_rank(os.environ)
    route_logs(console_level=logging.WARNING if rank == 0 else logging.ERROR)

    def fail(error: Exception, status: int) -> int:
        # Every rank reads the same files and computes the same global loss, so every rank finds the
        # same problem: rank 0 says it, once.
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return status

    try:
        rank_env_from_slurm(os.environ)
        config, model_path, tasks = prepare(args)
    except (ConfigError, RecordError, EncoderError, NegativeStoreError) as error:
        return fail(error, 2)
    try:
        return train(config, model_path, tasks, args, argv if argv is not None else sys.argv[1:], preemption)
    except (ConfigError, EncoderError) as error:  # found once the model is loaded (every rank finds it)
        return fail(error, 2)
    except LossNotFinite as error:
        return fail(error, 1)


def launcher_rank(env) -> int:
    """This process's rank before torch.distributed exists: from the launcher (deepspeed, torchrun,
    srun, MPI), 0 when started alone."""
    for key in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return 0


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
    check_writable_dir(config.run_dir, "run_dir")
    if config.train.data_cache not in (None, "auto"):
        check_writable_dir(config.train.data_cache, "train.data_cache")
    model_path = check_model(config)
    check_evaluation_data(config)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    build_ds_config(config, world_size, torch.cuda.is_available())  # contradictions fail here
    try:
        assign_tasks(0, world_size, {d.name: d.weight for d in config.data}, config.seed, config.train.schedule_mode)
    except ValueError as error:
        raise ConfigError(f"{args.config}: {error}") from None
    if not args.resume and latest_checkpoint(config.run_dir) is not None:
        raise ConfigError(f"{config.run_dir} already holds checkpoints: pass --resume to continue that run, "
                          "or choose another run_dir")
    return config, model_path, load_tasks(config, world_size)


def train(config: Config, model_path: Path, tasks: list[Task], args: argparse.Namespace, argv: list[str],
          preemption: Preemption) -> int:
    import deepspeed  # imported late: the checks above should fail fast

    deepspeed.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    check_same_data(tasks)  # a file changed between two ranks' starts: refuse rather than mix old and new
    has_gpu = torch.cuda.is_available()
    ds_config = build_ds_config(config, world_size, has_gpu)
    run_dir = Path(config.run_dir)
    # Now that the checks passed, the run directory may be written: the whole story goes to a file per rank.
    route_logs(console_level=logging.WARNING if rank == 0 else logging.ERROR,
               log_file=run_dir / LOGS / f"trainer.rank{rank}.log")

    engine = build_engine(config, model_path, ds_config)
    ema = WeightAverage(engine, config.train.ema) if config.train.ema is not None else None
    start_step, state, resumed_from = 0, SamplerState.initial(tasks), None
    if args.resume:
        loaded = load_checkpoint(engine, run_dir, check=ema.check_checkpoint if ema is not None else None)
        if loaded is not None:
            start_step, client_state = loaded
            state = SamplerState.from_dict(client_state["data"], tasks)
            resumed_from = checkpoint_dir(run_dir, start_step)
            if ema is not None:
                ema.load(resumed_from)
            logger.info("resumed from step %d", start_step)
        elif rank == 0:
            logger.info("--resume: no checkpoint in %s, starting from step 0", run_dir)
    negatives = NegativesRuntime(run_dir, store_specs(tasks), config.negatives,
                                 lookahead=prefetch_steps(config.train.num_workers))
    negatives.start(start_step, resumed_from)

    record = RunRecord(run_dir, argv, world_size, ds_config, start_step, enabled=rank == 0,
                       ema_decay=config.train.ema)
    if rank == 0:
        atomic_write_bytes(run_dir / CONFIG_YAML, yaml.safe_dump(to_dict(config), sort_keys=False).encode())
    try:
        status, step = train_loop(engine, config, tasks, state, negatives, start_step, record, preemption, ema)
    except BaseException as error:
        record.finish(RunStatus.FAILED, None, error=repr(error))
        raise
    finally:
        negatives.close()
    record.finish(status, step)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def build_engine(config: Config, model_path: Path, ds_config: dict):
    """The Encoder in a DeepSpeed engine, with AdamW (over the trainable parameters: all, or the LoRA
    adapters and the projection) and the warm-up/decay schedule of optim.*."""
    import deepspeed

    encoder = load_encoder(config.model, model_path, ds_config, config.seed)
    o = config.optim
    groups = trainable_parameter_groups(encoder, o.weight_decay)
    if ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # ZeRO offload needs its own CPU Adam (compiled)

        optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True)
    else:
        # A torch optimizer: DeepSpeed compiles nothing for it (its FusedAdam would need a build). Fused:
        # ZeRO hands it one flat partition per group, which the unfused CPU kernel streams through memory
        # once per elementwise op; fused is one pass (0.43 -> 0.10 s per step for all-MiniLM-L6-v2, one
        # CPU rank, bench/bench_train_step.py) and has a CUDA kernel too.
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config))
    engine, _, _, _ = deepspeed.initialize(model=encoder, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    engine.train()
    return engine


def load_encoder(m: ModelConfig, model_path: Path, ds_config: dict, seed: int):
    """The Encoder as model.* asks: under ZeRO-3 built inside deepspeed.zero.Init with each rank reading only
    its partition of the weights (training/zero3_loading.py), a frozen input embedding split by vocabulary
    rather than gathered at every forward; gradient checkpointing; LoRA adapters; the attention mode at step 0."""
    from embedlib.encoder import Encoder, backbone_dir

    torch.manual_seed(seed)  # a new projection and new adapters start identically on every rank
    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    load_backbone = None
    if zero3:
        def load_backbone(directory, hf_config, dtype, trust_remote_code):
            return zero3_loading.load_backbone_zero3(directory, hf_config, ds_config, dtype, trust_remote_code)
    encoder = Encoder.from_pretrained(model_path, pooling=m.pooling, output_dim=m.output_dim,
                                      normalize=m.normalize, max_length=m.max_length,
                                      trust_remote_code=m.trust_remote_code, load_backbone=load_backbone)
    if m.gradient_checkpointing:
        if not getattr(encoder.backbone, "supports_gradient_checkpointing", False):
            raise ConfigError(f"model.gradient_checkpointing: {type(encoder.backbone).__name__} does not support it")
        encoder.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers (and peft again, below) hook the input embedding to make its output require grad, which
        # reentrant checkpointing needs and ours does not. With a frozen embedding (LoRA) it would put the
        # embedding into the backward pass, where ZeRO-3 gathers it whole on every rank until the pass ends.
        encoder.backbone.disable_input_require_grads()
    if m.lora is not None:
        try:
            add_lora(encoder, m.lora)
        except ValueError as error:  # peft: a target module the backbone does not have
            raise ConfigError(f"model.lora.target_modules: {error}") from None
        if m.gradient_checkpointing:
            encoder.backbone.get_base_model().disable_input_require_grads()
    if zero3 and zero3_loading.shard_frozen_embedding(encoder.backbone, backbone_dir(model_path)):
        logger.info("ZeRO-3: the frozen input embedding is split by vocabulary over the ranks")
    set_attention(encoder, m, 0)
    return encoder


def set_attention(encoder, m: ModelConfig, step: int) -> None:
    """The weight of future tokens for the step about to be trained (softmask: alpha(step) = step / tau,
    a function of the step alone, so a resumed run continues the schedule where it was)."""
    encoder.future_weight = None if m.attention == "causal" else future_weight(m.attention, step, m.softmask_steps)


def warmup_steps(config: Config) -> int:
    """optim.warmup_steps, or optim.warmup_ratio of train.max_steps (rounded)."""
    ratio = config.optim.warmup_ratio
    return config.optim.warmup_steps if ratio is None else round(ratio * config.train.max_steps)


def lr_factor(config: Config):
    total, schedule = config.train.max_steps, config.optim.schedule
    warmup = warmup_steps(config)

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def train_loop(engine, config: Config, tasks: list[Task], state: SamplerState, negatives: NegativesRuntime,
               start_step: int, record: RunRecord, preemption: Preemption,
               ema: WeightAverage | None = None) -> tuple[RunStatus, int]:
    from training.export import export_model, refresh_model_card
    from training.metrics import MetricsLog, StepProgress

    rank, world_size = dist.get_rank(), dist.get_world_size()
    run_dir, t = Path(config.run_dir), config.train
    batch_size_of = {task.name: task.batch_size for task in tasks}
    shared = shared_query_tasks(config)
    loss_kind_of = {task.name: task.loss_kind for task in tasks}
    metrics = MetricsLog(run_dir, start_step) if rank == 0 else None
    evaluates = bool(evaluation_sets(config))
    eval_log = MetricsLog(run_dir, start_step, EVAL_JSONL) if rank == 0 and evaluates else None
    progress = StepProgress(t.max_steps, start_step, enabled=rank == 0 and t.progress)

    def checkpoint(step: int) -> None:
        save_checkpoint(engine, run_dir, step, {"data": state.to_dict()}, keep=t.keep_checkpoints,
                        write_extra=negatives.before_checkpoint(),
                        write_every_rank=ema.save if ema is not None else None)

    def evaluation_due(step: int) -> bool:
        e = config.evaluation
        return evaluates and (step == t.max_steps or (e.every > 0 and step % e.every == 0))

    def export(step: int) -> None:
        info = export_model(engine, run_dir, step, keep=t.keep_exports,
                            extra={"model_source": config.model.path, "world_size": world_size},
                            lora=config.model.lora, ema=ema, ema_export=t.ema_export)
        if info is not None:
            print(f"exported: {info.path}", flush=True)
        if evaluation_due(step):
            # The export's own weights are evaluated: the raw ones, or the average with train.ema_export=instead.
            if rank == 0:  # the export is the consolidated model under every ZeRO stage
                for row in evaluation_rows(info.path, config):  # one row per set
                    eval_log.log({"step": step, **row})
                refresh_model_card(info.path, run_dir)  # the card shows this export's own figures
            dist.barrier()

    loader = make_loader(tasks, engine.module.tokenizer, config, world_size, rank, start_step, state, negatives)
    step, status = start_step, RunStatus.COMPLETED
    try:
        if start_step >= t.max_steps:
            export(start_step)  # nothing left to train: make sure the final export exists
            return status, step
        last = time.perf_counter()
        for batch in loader:
            seed_step(config.seed, batch.step, rank)
            lr = engine.get_lr()[0]
            set_attention(engine.module, config.model, batch.step)
            out = train_step(engine, batch, [loss_kind_of[name] for name in batch.assignment], config)
            if ema is not None:
                ema.update()
            step = batch.step + 1
            state.cursors = batch.cursors_after

            now = time.perf_counter()
            samples = samples_in_step(batch.assignment, batch_size_of, shared)
            trained = batch.store_negatives if isinstance(batch, RetrievalBatch) else None
            figures = {"step": step, "loss": out.value, **{f"loss/{k}": v for k, v in out.per_task_kind.items()},
                       "lr": lr, "samples": samples, "samples_per_s": samples / (now - last),
                       "step_time_s": now - last, "tasks": list(batch.assignment), "time": time.time(),
                       **score_figures(out), **negatives.after_step(step, trained, out.negative_scores).figures()}
            if out.masked is not None:
                figures["masked_false_negatives"] = out.masked
            if engine.module.future_weight is not None:  # bidirectional or softmask: alpha of this step
                figures["future_weight"] = engine.module.future_weight
            if rank == 0:
                metrics.log(figures)
                progress.update(figures)

            stop = preemption.agreed(engine.device)
            if stop or step == t.max_steps or (t.save_every and step % t.save_every == 0):
                checkpoint(step)
            if stop:
                status = RunStatus.PREEMPTED
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
        for log in (metrics, eval_log):
            if log is not None:
                log.close()
    return status, step


def score_figures(out: StepLoss) -> dict[str, float]:
    """scores/<data set>/positive and .../negative: the mean score of the queries' positives and of their own
    hard negatives at the step (the paper's Fig. 2 view of how hard the negatives in use are)."""
    figures = {}
    for name, (positive, negative) in (out.scores or {}).items():
        figures[f"scores/{name}/positive"] = positive
        if negative is not None:
            figures[f"scores/{name}/negative"] = negative
    return figures


class LossNotFinite(RuntimeError):
    """The global loss is NaN or infinite: the step is not taken and the run stops."""


def train_step(engine, batch: StepBatch, kinds: list[str], config: Config) -> StepLoss:
    """One optimizer step on this rank's batch; `kinds` is every rank's loss kind for the step. The
    forwards, the CBB loss and the backward: training/grad_cache.py, plain or through the gradient cache."""

    def stop_if_not_finite(out: StepLoss) -> None:  # before any gradient exists
        if not math.isfinite(out.value):  # the same global value on every rank: all ranks stop here
            raise LossNotFinite(f"step {batch.step + 1}: the loss is {out.value}; the run stops without taking the "
                                f"step (optim.lr={config.optim.lr:g}, loss.temperature={config.loss.temperature:g}; "
                                f"the newest checkpoint in {config.run_dir} is intact)")

    out = backward_step(engine, batch, kinds, config.loss, config.train.grad_cache.chunk_size, stop_if_not_finite)
    engine.step()
    return out


def evaluation_rows(export_dir: Path, config: Config) -> list[dict]:
    """The export evaluated on every set of the run (training.config.evaluation_sets: evaluation.beir's,
    then evaluation.sets), one eval.jsonl row each: {"set", "category", "main_score", "eval/<metric>"}, and
    for a retrieval set what its encoding cost, as eval_encoding/<figure>.

    The corpus embeddings go through the run's embedding cache with the miner's settings (RUN/mining/
    spec.json: cache directory, its bound, encode dtype; embedlib.embedding_cache.run_cache_settings), so
    an export the sidecar has mined with (same corpus and max length) is not encoded again, and the other
    way round."""
    from embedlib.embedding_cache import run_cache_settings
    from embedlib.evaluation import evaluate_model

    e = config.evaluation
    cache = run_cache_settings(config.run_dir)
    results = evaluate_model(export_dir, sets=evaluation_sets(config), batch_size=e.batch_size,
                             query_instruction=e.query_instruction,
                             max_length=e.max_length or config.model.max_length, show_progress=False,
                             dtype=cache.encode_dtype, cache_dir=cache.cache_dir, cache_max_gb=cache.max_gb)
    rows = []
    for result in results["sets"]:
        row = {"set": result["set"], "category": result["category"], "main_score": result["main_score"],
               **{f"eval/{name}": value for name, value in result["metrics"].items()}}
        if "encoding" in result:
            row.update({f"eval_encoding/{name}": result["encoding"][name]
                        for name in ("corpus_rows_encoded", "padding_fraction", "seconds")})
        rows.append(row)
    return rows


def evaluate_export(export_dir: Path, config: Config) -> dict:
    """The row of the first set alone (evaluation.beir's, when there is one): `evaluation_rows`[0]."""
    return evaluation_rows(export_dir, config)[0]


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
                 enabled: bool, ema_decay: float | None = None):
        self.path, self.enabled = run_dir / RUN_JSON, enabled
        self.run_dir = run_dir
        self.data = {
            "argv": argv, "world_size": world_size, "start_step": start_step, "final_step": None,
            "status": RunStatus.RUNNING.value, "started_at": utc_now(), "ended_at": None, "exports": [],
            "ds_config": ds_config, "ema_decay": ema_decay, "host": platform.node(),
            "versions": {"python": platform.python_version(),
                         **{name: _version(name) for name in ("torch", "deepspeed", "transformers")}},
        }
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, self.data)

    def finish(self, status: RunStatus, final_step: int | None, error: str | None = None) -> None:
        if not self.enabled:
            return
        self.data.update(status=status.value, final_step=final_step, ended_at=utc_now(),
                         exports=[e.step for e in list_exports(self.run_dir)])
        if error:
            self.data["error"] = error
        atomic_write_json(self.path, self.data)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
