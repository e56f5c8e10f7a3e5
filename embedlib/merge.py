"""Merging models of one architecture and tokenizer into one export: model soups and slerp.

    python -m embedlib.merge --output DIR A B C                       uniform linear average (model soup)
    python -m embedlib.merge --output DIR --weights 0.2,0.3,0.5 A B C weighted linear average
    python -m embedlib.merge --output DIR --method slerp --t 0.3 A B  slerp from A (t=0) to B (t=1)
    python -m embedlib.merge --output DIR --method slerp A B C        slerp folded pairwise in the given order
    python -m embedlib.merge --output DIR --run RUN --best-k 3 --metric eval/ndcg@10 --set scifact
    python -m embedlib.merge --output DIR --run RUN --greedy          greedy soup on the run's dev sets
    python -m embedlib.merge --output DIR --run R1 --run R2 --run R3 --best-k 3   the best 3 of a seed sweep
    python -m embedlib.merge --output DIR --sets dev.yaml --metric average --greedy A B C

Sources are model directories (exports of one run or of several, or any model directories) or, with
`--run RUN` (given once or several times: a multi-seed sweep, the exports of all those runs pooled), the
runs' exports still on disk that their eval.jsonl has a figure for, each scored by its own run's figure:
`--metric` (an eval.jsonl key: main_score, the default, or eval/<name>) of `--set` (needed when the rows
name several sets; every run must have it), best first (a tie: the later step first, then the run given
first); `--best-k K` keeps the best K. Model directories are scored too when a selection asks for it
(--best-k, --weights-from-scores, --greedy, --metric, --set) and `--sets FILE` is given: each is evaluated
on those sets first and ranked by --metric of --set (main_score or eval/<name> of the set; `average`,
the mean of the category means, over all of them), best first (a tie: the order given). A LoRA run's
exports hold the merged weights, which are what is merged (the adapter/ directory of such an export is
not copied: it would not describe the merge); an export's ema/ directory (train.ema) is a model of its
own, merged when given as a source itself (RUN/exports/step_N/ema), and otherwise left out.
`package:<name>` is an installed package's model. Only safetensors weights are read; weights in other formats
(pytorch_model.bin, onnx/, ...) are neither read nor copied.

Methods, per tensor, computed in float64 and written in the sources' dtype:
- linear: sum_i w_i x_i with the weights normalised to sum 1 (uniform without --weights;
  --weights-from-scores: proportional to the sources' scores (eval.jsonl or dev figures),
  w_i = s_i / sum_j s_j, which must all be positive).
- slerp (two sources, --t): the direction of the flattened tensor is interpolated on the sphere and its
  norm linearly, slerp(a, b, t) = ((1 - t)|a| + t|b|) (sin((1 - t)θ) â + sin(tθ) b̂) / sin θ, so the norm
  is always between the two norms (mergekit's slerp of the unnormalised vectors is not, for wide angles).
  t = 0 and t = 1 give the endpoints exactly. Where the two are (nearly) parallel or antiparallel
  (|cos θ| > 1 - 1e-8) or a norm is 0, the linear (1 - t) a + t b is used.
- slerp of n sources: folded pairwise in the order given (ranked sources: best first),
  m_1 = x_1, m_i = slerp(m_{i-1}, x_i, t_i) with t_i = w_i / (w_1 + ... + w_i), i = 2..n, which is the
  weighted (uniform: t_i = 1/i) average in the linear limit; intermediate results stay in float64.
- greedy soup (Wortsman et al., 2022; --greedy, with --run or scored model directories): the sources in
  score order; the best alone starts the soup, and each next one joins it only if the dev figure
  (--metric of --set, computed with embedlib.evaluation) of the uniform average with it does not fall.
A tensor equal in all sources is written back unchanged (an average of identical models is bit for bit
the model, whatever the weights). Tensors that are not floating point (position-id buffers) must be
equal in all sources.

Dev figures: when there are evaluation sets (`--sets FILE`, else with --run the run's evaluation.beir
and evaluation.sets with its evaluation.max_length and batch size; several runs must agree on them) every
source and the merge are evaluated on them (embedlib.evaluation, in --dtype, with the embedding cache of
--cache-dir if given; a scored model directory once), unless --no-eval. The selection figures are
recorded beside them.

Refused, one line `error: ...`, exit status 2, before anything is written (the output not even
created): sources whose files other than weights differ (config.json: architecture, sizes; the
tokenizer files; modules.json: projection and normalisation; the pooling; the max length; the prompts,
i.e. instructions; compared as parsed JSON, version stamps aside), whose weight files, tensor names,
shapes or dtypes differ, or whose non-float tensors differ; weights that are not one per source,
negative, not finite or all 0; t outside [0, 1]; --t with other than two sources; slerp of one source;
a run given twice; a selection of model directories without --sets (or with --no-eval); an output that
exists (checked before any evaluation).

Output: an ordinary model directory (the first source's non-weight files, the merged safetensors) that
sentence-transformers, transformers, Encoder.from_pretrained, the miner and embedlib.evaluation load,
plus merge.json (sources with path, fingerprint, run and step, score; method, weights, t; the
selection; the dev figures of the sources and the merge) and README.md, a short model card of the same.
It is written in
OUTPUT's parent as `.tmp-merge-<name>-<pid>-<hex>` and published by an atomic rename: a merge killed at
any moment leaves no OUTPUT, only that directory, which the next merge to the same OUTPUT removes once
its process is gone.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from embedlib.atomic import atomic_write_bytes, atomic_write_json, publish_dir
from embedlib.embedding_cache import pid_alive
from embedlib.evaluation import (ENCODE_DTYPES, EvalSet, EvaluationError, category_means, check_set, check_set_names,
                                 corpus_cache_entry, encode_dtype, evaluate_set, flag_sets, load_set, read_sets)
from embedlib.exports import MARKER, list_exports, read_export_marker
from embedlib.records import RecordError
from embedlib.rundir import EXPORTS, utc_now
from embedlib.runlog import RunLogError, read_config, read_run

MERGE_JSON = "merge.json"
README = "README.md"
# Files of a source that are not copied: its export marker and card describe it, not the merge.
_NOT_COPIED = {MARKER, README, MERGE_JSON}
# A LoRA export's adapter alone (training/lora.py): the merged weights are the model; the adapter is not.
# An export's ema/ (train.ema) is a model of its own, merged when given as a source itself. A hub model's
# weights in other formats would be the first source's, not the merge's.
_NOT_COPIED_DIRS = {"adapter", "ema", "onnx", "openvino"}
_OTHER_FORMATS = {".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack", ".gguf"}
# Top-level JSON keys that stamp versions or origins, not the model.
_STAMPS = {"transformers_version", "__version__", "_name_or_path", "_commit_hash"}
# The figures each category's evaluation gives (embedlib.evaluation), what --metric eval/<name> may name.
_FIGURES = {"retrieval": ("ndcg@10", "mrr@10", "recall@10", "recall@100"), "sts": ("spearman",),
            "pair_classification": ("cosine_ap",), "classification": ("accuracy",)}
# --metric for dev figures only: the mean of the category means of the evaluation sets.
AVERAGE = "average"
_PARALLEL = 1e-8  # |cos| above 1 - this: slerp falls back to linear
TMP_PREFIX = ".tmp-merge-"
# Seconds to sleep after everything is written and before the rename (for the test of a kill mid-write).
PAUSE_ENV = "EMBEDLIB_MERGE_PAUSE_S"


class MergeError(ValueError):
    """Sources that cannot be merged, or a bad option: one line naming the file or option."""


@dataclass
class Source:
    """A model directory to merge, and what the run says of it when it is a run's export."""

    path: Path
    run: Path | None = None
    step: int | None = None
    score: float | None = None  # the selection figure: --metric of --set in the run's eval.jsonl, or of its dev
    dev: dict | None = None  # its dev figures (DevSets.figures), once computed to score it


@dataclass
class ModelFiles:
    """What a model directory holds: its safetensors files (relative path -> tensor name -> (dtype,
    shape)) and the other files, all relative paths."""

    weights: dict[str, dict[str, tuple[str, tuple[int, ...]]]]
    other: list[str]


@dataclass(frozen=True)
class MergePlan:
    """method: "linear" or "slerp". weights: one per source, normalised to sum 1 (slerp: the weights
    of the linear limit). fold: slerp's t for each of sources[1:], in order (module docstring)."""

    method: str
    weights: tuple[float, ...]
    fold: tuple[float, ...] = ()


# ---- the sources --------------------------------------------------------------------------------------


def model_files(root: Path) -> ModelFiles:
    """The files of a model directory, hidden ones, the not-copied ones and adapter/ left out; the
    tensors of every safetensors file read from its header (no weight is loaded)."""
    if not root.is_dir():
        raise MergeError(f"{root}: {'not a directory' if root.exists() else 'no such directory'} "
                         "(expected a model directory)")
    weights, other = {}, []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or rel.parts[0] in _NOT_COPIED_DIRS \
                or rel.as_posix() in _NOT_COPIED:
            continue
        if path.suffix in _OTHER_FORMATS:  # never read (pickles among them), never copied
            continue
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    weights[rel.as_posix()] = {name: (f.get_slice(name).get_dtype(),
                                                      tuple(f.get_slice(name).get_shape())) for name in f.keys()}
            except Exception as e:  # safetensors raises its own error types for a damaged header
                raise MergeError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
        else:
            other.append(rel.as_posix())
    if "config.json" not in other or not weights:
        raise MergeError(f"{root}: not a model directory (needs config.json and safetensors weights)")
    return ModelFiles(weights=weights, other=other)


def _what(rel: str) -> str:
    """What a differing file means, for the refusal."""
    name = rel.rsplit("/", 1)[-1]
    if rel == "config.json":
        return "architecture"
    if name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "spiece")) \
            or name.endswith(".model"):
        return "tokenizer"
    if "Pooling" in rel:
        return "pooling"
    if "Dense" in rel:
        return "projection"
    if "Normalize" in rel:
        return "normalisation"
    if rel == "modules.json":
        return "modules: projection, normalisation"
    if rel == "config_sentence_transformers.json":
        return "prompts, i.e. instructions"
    if rel == "sentence_bert_config.json":
        return "max sequence length"
    return "model files"


def _difference(a, b, path: str = ""):
    """(field, value in a, value in b) of the first difference of two parsed JSON values, or None; version
    stamps at the top level are not compared."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if not path and key in _STAMPS:
                continue
            if key not in a or key not in b:
                return f"{path}{key}", a.get(key, "(absent)"), b.get(key, "(absent)")
            found = _difference(a[key], b[key], f"{path}{key}.")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _difference(x, y, f"{path}{i}.")
            if found:
                return found
        return None
    return None if a == b and type(a) is type(b) else (path.rstrip(".") or "(the whole file)", a, b)


def _short(value) -> str:
    text = value if value == "(absent)" else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def check_compatible(sources: list[Source]) -> ModelFiles:
    """The first source's files, once every source has the same files (non-weight ones equal as parsed JSON
    or byte for byte), tensors (names, shapes, dtypes) and non-float tensor values; MergeError otherwise."""
    first = sources[0].path
    files = model_files(first)
    for source in sources[1:]:
        theirs = model_files(source.path)
        for mine, other, kind in ((files.other, theirs.other, "file"), (list(files.weights), list(theirs.weights),
                                                                        "weight file")):
            missing = sorted(set(mine) ^ set(other))
            if missing:
                holder = first if missing[0] in mine else source.path
                raise MergeError(f"{source.path}: {kind} {missing[0]} ({_what(missing[0])}) is only in {holder}; "
                                 "merged models must have the same files")
        for rel in sorted(files.other, key=lambda r: r != "config.json"):  # the architecture is named first
            a, b = (first / rel).read_bytes(), (source.path / rel).read_bytes()
            if a == b:
                continue
            if rel.endswith(".json"):
                try:
                    found = _difference(json.loads(a), json.loads(b))
                except ValueError as e:
                    raise MergeError(f"{source.path / rel}: not valid JSON ({e})") from None
                if found:
                    name, x, y = found
                    raise MergeError(f"{source.path / rel}: field '{name}' is {_short(y)}, {_short(x)} in {first} "
                                     f"(different {_what(rel)}); merged models must agree")
            else:
                raise MergeError(f"{source.path / rel}: differs from {first / rel} (different {_what(rel)}); "
                                 "merged models must agree")
        for rel, tensors in files.weights.items():
            other = theirs.weights[rel]
            names = sorted(set(tensors) ^ set(other))
            if names:
                holder = first if names[0] in tensors else source.path
                raise MergeError(f"{source.path / rel}: tensor {names[0]!r} is only in {holder}; merged models "
                                 "must have the same tensors")
            for name, (dtype, shape) in tensors.items():
                if other[name] != (dtype, shape):
                    raise MergeError(f"{source.path / rel}: tensor {name!r} is {other[name][0]} {list(other[name][1])}, "
                                     f"{dtype} {list(shape)} in {first}; merged models must have the same shapes "
                                     "and dtypes")
    _check_non_float_tensors(sources, files)
    return files


def _check_non_float_tensors(sources: list[Source], files: ModelFiles) -> None:
    """Buffers such as position ids cannot be averaged: they must be equal in every source."""
    for rel, tensors in files.weights.items():
        names = [n for n, (dtype, _) in tensors.items() if not _is_float(dtype)]
        if not names:
            continue
        with contextlib.ExitStack() as stack:
            handles = [stack.enter_context(safe_open(str(s.path / rel), framework="pt")) for s in sources]
            for name in names:
                reference = handles[0].get_tensor(name)
                for source, handle in zip(sources[1:], handles[1:]):
                    if not torch.equal(reference, handle.get_tensor(name)):
                        raise MergeError(f"{source.path / rel}: tensor {name!r} ({tensors[name][0]}, not floating "
                                         f"point) differs from {sources[0].path}'s; it cannot be averaged")


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("F", "BF"))  # safetensors' names: F16, BF16, F32, F64, F8_E4M3, ...


def source_of(path: str | Path) -> Source:
    """A model directory (or `package:<name>`) as a source; a run's export (RUN/exports/step_*, with its
    marker) knows its run and step."""
    from embedlib.encoder import EncoderError, resolve_model_dir

    try:
        path = resolve_model_dir(path)
    except EncoderError as e:
        raise MergeError(str(e)) from None
    source = Source(path=path)
    if (path / MARKER).is_file() and path.parent.name == EXPORTS:
        try:
            step = read_export_marker(path).get("step")
        except (OSError, ValueError):
            step = None
        if isinstance(step, int):
            source.run, source.step = path.parent.parent, step
    return source


def select_from_runs(runs: list[Path], metric: str, set_name: str | None,
                     best_k: int | None) -> tuple[list[Source], str | None]:
    """The exports still on disk of `runs` with an eval.jsonl figure `metric` of set `set_name` (None: the
    runs' only set), pooled, each scored by its own run's figure, best first (a tie: the later step first,
    then the run given first), the best `best_k` of them (None: all); and the set's name."""
    rows_of: dict[Path, list[dict]] = {}
    for run in runs:
        if not run.is_dir():
            raise MergeError(f"--run {run}: {'not a directory' if run.exists() else 'no such directory'}")
        if any(run.resolve() == seen.resolve() for seen in rows_of):
            raise MergeError(f"--run {run}: given twice; a run's exports are pooled once")
        try:
            rows = read_run(run).evals
        except RunLogError as e:
            raise MergeError(str(e)) from None
        if not rows:
            raise MergeError(f"--run {run}: eval.jsonl has no evaluation records to select exports by")
        rows_of[run] = rows
    if set_name is None:
        sets = list(dict.fromkeys(r.get("set") for rows in rows_of.values() for r in rows))
        if len(sets) > 1:
            where = f"--run {runs[0]}: eval.jsonl has" if len(runs) == 1 else \
                f"--run {', '.join(map(str, runs))}: their eval.jsonl files have"
            raise MergeError(f"{where} the sets {', '.join(map(str, sets))}; choose one with --set")
        set_name = sets[0]
    pooled: list[tuple[Source, int]] = []
    for order, (run, rows) in enumerate(rows_of.items()):
        sets = list(dict.fromkeys(r.get("set") for r in rows))
        if set_name not in sets:
            raise MergeError(f"--set {set_name}: not a set of {run}/eval.jsonl "
                             f"(its sets: {', '.join(map(str, sets))})")
        rows = [r for r in rows if r.get("set") == set_name]
        scores = {r["step"]: float(r[metric]) for r in rows if isinstance(r.get(metric), (int, float))
                  and not isinstance(r[metric], bool) and math.isfinite(r[metric])}
        if not scores:
            keys = sorted({k for r in rows for k in r if k == "main_score" or k.startswith("eval/")})
            raise MergeError(f"--metric {metric}: no record of {run}/eval.jsonl has it (it has: {', '.join(keys)})")
        exports = [e for e in list_exports(run) if e.step in scores]
        if not exports:
            raise MergeError(f"--run {run}: none of the evaluated exports (steps "
                             f"{', '.join(map(str, sorted(scores)))}) is still on disk")
        pooled += [(Source(path=e.path, run=run, step=e.step, score=scores[e.step]), order) for e in exports]
    pooled.sort(key=lambda p: (-p[0].score, -p[0].step, p[1]))
    if best_k is not None:
        if best_k > len(pooled):
            raise MergeError(f"--best-k {best_k}: only {len(pooled)} evaluated exports of "
                             f"{', '.join(map(str, runs))} are on disk")
        pooled = pooled[:best_k]
    return [source for source, _ in pooled], set_name


def score_sources(sources: list[Source], dev: "DevSets", best_k: int | None) -> list[Source]:
    """Model directories scored by their dev figures (each evaluated once, kept in Source.dev), best first
    (a tie: the order given), the best `best_k` of them (None: all)."""
    if best_k is not None and best_k > len(sources):
        raise MergeError(f"--best-k {best_k}: only {len(sources)} model directories given")
    for source in sources:
        source.dev = dev.figures(source.path)
        source.score = dev.figure(source.dev)
    ranked = sorted(sources, key=lambda s: -s.score)  # sorted() is stable: a tie keeps the order given
    return ranked if best_k is None else ranked[:best_k]


# ---- the plan -----------------------------------------------------------------------------------------


def parse_weights(text: str) -> list[float]:
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise MergeError(f"--weights {text}: expected numbers separated by commas, e.g. 0.2,0.3,0.5") from None
    return weights


def make_plan(method: str, n: int, weights: list[float] | None = None, t: float | None = None) -> MergePlan:
    """The normalised weights and slerp's folds of `method` over n sources; MergeError for what cannot be."""
    if method not in ("linear", "slerp"):
        raise MergeError(f"--method {method}: expected linear or slerp")
    if t is not None:
        if method != "slerp":
            raise MergeError("--t applies to --method slerp only")
        if weights is not None:
            raise MergeError("--t and --weights both give the weights: give one")
        if not (math.isfinite(t) and 0 <= t <= 1):
            raise MergeError(f"--t {t:g}: must be between 0 and 1")
        if n != 2:
            raise MergeError(f"--t needs exactly two sources (slerp from the first to the second), got {n}")
        return MergePlan("slerp", (1 - t, t), (t,))
    if method == "slerp" and n < 2:
        raise MergeError(f"slerp needs at least two sources, got {n}")
    if weights is None:
        weights = [1.0] * n
    if len(weights) != n:
        raise MergeError(f"--weights: {len(weights)} weights for {n} sources; give one per source")
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"--weights: {weights}: every weight must be a finite number")
    if any(w < 0 for w in weights):
        raise MergeError(f"--weights: {weights}: negative weights are not allowed")
    if method == "slerp" and any(w == 0 for w in weights):
        raise MergeError(f"--weights: {weights}: slerp needs positive weights (drop a source of weight 0)")
    total = math.fsum(weights)
    if total == 0:
        raise MergeError(f"--weights: {weights}: they sum to 0")
    normalised = tuple(w / total for w in weights)
    if method == "linear":
        return MergePlan("linear", normalised)
    fold = tuple(weights[i] / math.fsum(weights[: i + 1]) for i in range(1, n))
    return MergePlan("slerp", normalised, fold)


# ---- the arithmetic -----------------------------------------------------------------------------------


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of the flattened tensors' directions, linear of their norms (docstring)."""
    if t == 0:
        return a
    if t == 1:
        return b
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if norm_a == 0 or norm_b == 0:
        return (1 - t) * a + t * b
    cos = torch.clamp(torch.dot(a.flatten(), b.flatten()) / (norm_a * norm_b), -1.0, 1.0)
    if abs(float(cos)) > 1 - _PARALLEL:
        return (1 - t) * a + t * b
    theta = torch.arccos(cos)
    direction = (torch.sin((1 - t) * theta) * (a / norm_a) + torch.sin(t * theta) * (b / norm_b)) / torch.sin(theta)
    return ((1 - t) * norm_a + t * norm_b) * direction


def merge_tensors(tensors: list[torch.Tensor], plan: MergePlan) -> torch.Tensor:
    """One tensor of every source -> the merged tensor, in the sources' dtype."""
    first = tensors[0]
    if not first.is_floating_point() or all(torch.equal(first, x) for x in tensors[1:]):
        return first  # identical sources give themselves back exactly; non-float ones were checked equal
    wide = [x.to(torch.float64) for x in tensors]
    if plan.method == "linear":
        merged = torch.zeros_like(wide[0])
        for weight, x in zip(plan.weights, wide):
            merged += weight * x
    else:
        merged = wide[0]
        for t, x in zip(plan.fold, wide[1:]):
            merged = slerp(merged, x, t)
    return merged.to(first.dtype).contiguous()


def write_model(directory: Path, sources: list[Source], files: ModelFiles, plan: MergePlan) -> None:
    """The merged model into `directory`: the first source's other files, each safetensors file merged
    tensor by tensor (one tensor of each source in memory at a time besides the file's result)."""
    for rel in files.other:
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sources[0].path / rel, target)
    for rel, tensors in files.weights.items():
        with contextlib.ExitStack() as stack:
            handles = [stack.enter_context(safe_open(str(s.path / rel), framework="pt")) for s in sources]
            merged = {name: merge_tensors([h.get_tensor(name) for h in handles], plan) for name in tensors}
            metadata = handles[0].metadata()
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(merged, str(target), metadata=metadata)


# ---- dev figures --------------------------------------------------------------------------------------


@dataclass
class DevSets:
    """The evaluation sets the sources and the merge are measured on, loaded once, and how."""

    sets: list[EvalSet]
    data: list
    batch_size: int = 64
    max_length: int | None = None
    query_instruction: str = ""
    # The figure greedy soups and scored sources compare: --metric ("main_score" or "eval/<name>") of the
    # set named here, or "average" (the mean of the category means, no set).
    metric: str = "main_score"
    set_name: str | None = None
    # Encoding of the evaluation: its compute dtype (embedlib.evaluation's --dtype), and the embedding cache
    # the retrieval corpora's embeddings are read from and added to (a model evaluated again, on another
    # half of a dev split, say, encodes its corpus once); None: no cache.
    dtype: str = "auto"
    cache_dir: Path | None = None

    def figures(self, model_dir: Path) -> dict:
        """{"sets": {name: {"category", "main_score", <metric>: value, ...}}, "categories", "average"}."""
        from embedlib.encoder import Encoder

        encoder = Encoder.from_pretrained(model_dir, max_length=self.max_length)
        compute_dtype = encode_dtype(self.dtype)

        def cache(spec, data):
            if self.cache_dir is None or spec.category != "retrieval":
                return None
            return corpus_cache_entry(self.cache_dir, encoder, Path(model_dir), data, compute_dtype)

        results = [evaluate_set(encoder, spec, data, batch_size=self.batch_size, query_instruction=self.query_instruction,
                                show_progress=False, dtype=compute_dtype, cache=cache(spec, data))
                   for spec, data in zip(self.sets, self.data)]
        sets = {r["set"]: {"category": r["category"], "main_score": r["main_score"],
                           **{k: v for k, v in r["metrics"].items() if not k.startswith("num_")}} for r in results}
        return {"sets": sets, **category_means(results)}

    def figure(self, figures: dict) -> float:
        """The selection figure of figures(): --metric of --set, or their average."""
        if self.metric == AVERAGE:
            return float(figures["average"])
        row = figures["sets"][self.set_name]
        return float(row[self.metric.removeprefix("eval/")])


def runs_sets(runs: list[Path]) -> tuple[list[EvalSet], dict]:
    """The evaluation sets and options of run_sets, which every run of a sweep must share."""
    sets, options = run_sets(runs[0])
    for run in runs[1:]:
        if run_sets(run) != (sets, options):
            raise MergeError(f"--run {run}: its evaluation sets or options (config.yaml: evaluation) differ from "
                             f"{runs[0]}'s; give --sets FILE to measure every export on the same sets")
    return sets, options


def run_sets(run: Path) -> tuple[list[EvalSet], dict]:
    """The sets a run evaluated (its config.yaml: evaluation.beir's first, then evaluation.sets, as the
    trainer orders them) and the evaluation's batch size, max length and query instruction."""
    try:
        config = read_config(run)
    except RunLogError as e:
        raise MergeError(str(e)) from None
    evaluation = config.get("evaluation") or {}
    try:
        listed = [EvalSet(**s) for s in evaluation.get("sets") or []]
    except TypeError as e:
        raise MergeError(f"{run}/config.yaml: evaluation.sets: {e}") from None
    sets = flag_sets(beir=evaluation.get("beir") or None, split=evaluation.get("split", "dev"),
                     taken=tuple(s.name for s in listed)) + listed
    options = {"batch_size": evaluation.get("batch_size", 64),
               "max_length": evaluation.get("max_length") or (config.get("model") or {}).get("max_length"),
               "query_instruction": evaluation.get("query_instruction", "")}
    return sets, options


def greedy_soup(sources: list[Source], files: ModelFiles, dev: DevSets, first_figures: dict,
                scratch: Path) -> tuple[list[int], list[dict]]:
    """Wortsman et al.'s greedy soup over sources in score order: the indices kept and, per source, the
    dev figure of the soup it was tried in and whether it was kept."""
    kept, best = [0], dev.figure(first_figures)
    trace = [{"source": 0, "figure": best, "kept": True}]
    for i in range(1, len(sources)):
        trial = kept + [i]
        scratch.mkdir()
        try:
            write_model(scratch, [sources[j] for j in trial], files, make_plan("linear", len(trial)))
            figure = dev.figure(dev.figures(scratch))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        keep = figure >= best
        trace.append({"source": i, "figure": figure, "kept": keep})
        if keep:
            kept, best = trial, figure
    return kept, trace


# ---- the output ---------------------------------------------------------------------------------------


def check_output(output: Path) -> None:
    if output.exists() or output.is_symlink():
        raise MergeError(f"--output {output}: already exists; a merge never replaces a directory")
    for existing in output.parents:
        if existing.exists():
            if not existing.is_dir():
                raise MergeError(f"--output {output}: {existing} is not a directory")
            if not os.access(existing, os.W_OK):
                raise MergeError(f"--output {output}: {existing} is not writable")
            return


def remove_stale_tmp(output: Path) -> list[str]:
    """Remove what merges to `output` killed before their rename left (their process is gone)."""
    pattern = re.compile(rf"^{re.escape(TMP_PREFIX + output.name)}-(\d+)-[0-9a-f]{{8}}(-trial)?$")
    removed = []
    for entry in output.parent.iterdir() if output.parent.is_dir() else []:
        match = pattern.match(entry.name)
        if match and not pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def model_card(output: Path, record: dict) -> str:
    """The merge's README.md: what was merged, how, and the dev figures."""
    from embedlib.encoder import embedding_dim_of
    from embedlib.modelcard import _code, _model_facts, _text, _usage

    try:
        model = _model_facts(output)
    except (KeyError, TypeError, ValueError, OSError):  # not as Encoder.save writes (older hub files): no snippets
        model = None
    dimension = model["dimension"] if model else embedding_dim_of(output)
    sources = record["sources"]
    dev = record.get("dev")
    set_names = list(dev["sets"]) if dev else []
    front = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
             "tags": ["sentence-transformers", "sentence-similarity", "feature-extraction", "merge"]}
    how = {"linear": "a linear average of the weights (a model soup)",
           "slerp": "spherical linear interpolation (slerp) of each weight tensor"}[record["method"]]
    if record.get("greedy"):
        how = "a greedy soup (Wortsman et al., 2022): a uniform average of the sources that did not lower the dev figure"
    out = ["---", yaml.safe_dump(front, sort_keys=False).rstrip("\n"), "---", "",
           f"# A merge of {len(sources)} model{'s' if len(sources) > 1 else ''}", "",
           f"This is a [sentence-transformers](https://www.SBERT.net) model made with `embedlib.merge` by {how}. "
           f"It maps texts to a {dimension}-dimensional dense vector space.", "",
           "## Merge", "", f"* Method: {_text(record['method'])}"
           + (f", t = {record['t']:g}" if record.get("t") is not None else "")
           + (", folded pairwise in the order below, t = " + ", ".join(f"{t:.4g}" for t in record["fold"])
              if record.get("fold") and record.get("t") is None else "")]
    selection = record.get("selection")
    if selection:
        runs = selection.get("runs")
        origin = (f"the run{'s' if len(runs) > 1 else ''} {', '.join(_code(r) for r in runs)}" if runs
                  else f"the sources given, evaluated on {_code(selection['sets'])}")
        out.append(f"* Selected from {origin} by {_text(selection['metric'])}"
                   + (f" of {_text(selection['set'])}" if selection.get("set") else "")
                   + (f", best {selection['best_k']}" if selection.get("best_k") else ""))
    header = ["#", "Source", "Step", "Fingerprint", "Weight", *[f"{_text(s)} main score" for s in set_names]]
    out += ["", "| " + " | ".join(header) + " |", "|" + "--:|" * len(header)]

    def figures(entry_dev):
        return [f"{entry_dev['sets'][s]['main_score']:.4f}" if entry_dev else "-" for s in set_names]

    for i, s in enumerate(sources, start=1):
        out.append("| " + " | ".join([str(i), _code(s["path"]), str(s["step"]) if s["step"] is not None else "-",
                                      s["fingerprint"][:12], f"{s['weight']:.4f}", *figures(s.get("dev"))]) + " |")
    out.append("| " + " | ".join(["", "**merge**", "", record["fingerprint"][:12], "1", *figures(dev)]) + " |")
    if dev is None:
        out += ["", "The merge was not evaluated (no evaluation sets)."]
    if model:
        out += ["", *_usage(model, output)]
    out.append("")
    return "\n".join(out)


def merge(sources: list[Source], output: Path, plan: MergePlan, files: ModelFiles, *, dev: DevSets | None = None,
          greedy: bool = False, selection: dict | None = None) -> dict:
    """Write the merge of `sources` to `output` (checked, compatible) atomically; return merge.json's record."""
    from embedlib.encoder import model_fingerprint

    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(output)
    tmp = output.parent / f"{TMP_PREFIX}{output.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        source_figures = [s.dev if s.dev is not None else dev.figures(s.path) for s in sources] if dev \
            else [None] * len(sources)
        trace = None
        if greedy:
            kept, trace = greedy_soup(sources, files, dev, source_figures[0], tmp.with_name(tmp.name + "-trial"))
            plan = MergePlan("linear", tuple(1 / len(kept) if i in kept else 0.0 for i in range(len(sources))))
        used = [i for i, w in enumerate(plan.weights) if w > 0 or plan.method == "slerp"]
        write_model(tmp, [sources[i] for i in used], files,
                    MergePlan(plan.method, tuple(plan.weights[i] for i in used), plan.fold))
        record = {
            "created_at": utc_now(), "method": plan.method, "weights": list(plan.weights),
            "t": plan.fold[0] if plan.method == "slerp" and len(sources) == 2 else None,
            "fold": list(plan.fold) if plan.method == "slerp" else None,
            "selection": selection, "greedy": trace,
            "sources": [{"path": str(s.path), "fingerprint": model_fingerprint(s.path),
                         "run": str(s.run) if s.run else None, "step": s.step, "score": s.score, "weight": w,
                         "dev": f} for s, w, f in zip(sources, plan.weights, source_figures)],
            "fingerprint": model_fingerprint(tmp),  # merge.json and README.md do not count (model_fingerprint)
            "dev": dev.figures(tmp) if dev else None,
        }
        atomic_write_json(tmp / MERGE_JSON, record)
        atomic_write_bytes(tmp / README, model_card(tmp, record).encode("utf-8"))
        pause = os.environ.get(PAUSE_ENV)
        if pause:
            print(f"merge: {tmp} written; pausing {pause} s before the rename", file=sys.stderr, flush=True)
            time.sleep(float(pause))
        publish_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


# ---- the command --------------------------------------------------------------------------------------


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line like every other error of the command
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m embedlib.merge",
                     description="Merge models of one architecture and tokenizer: linear soups, slerp, greedy soups.")
    parser.add_argument("sources", nargs="*", help="model directories or package:<name> (not with --run)")
    parser.add_argument("--output", required=True, type=Path, help="the merged model's directory (must not exist)")
    parser.add_argument("--method", default="linear", choices=("linear", "slerp"))
    parser.add_argument("--weights", help="one weight per source, comma-separated (normalised to sum 1)")
    parser.add_argument("--t", type=float, help="slerp of two sources: 0 gives the first, 1 the second")
    parser.add_argument("--run", dest="runs", type=Path, action="append",
                        help="merge this run's evaluated exports still on disk; several times: pooled")
    parser.add_argument("--metric", default="main_score",
                        help="the figure sources are ranked by: an eval.jsonl key with --run (main_score or "
                             "eval/<name>), the same of a --sets set or 'average' for scored model directories")
    parser.add_argument("--set", dest="set_name", help="the evaluation set of --metric")
    parser.add_argument("--best-k", type=int, help="the best K sources")
    parser.add_argument("--weights-from-scores", action="store_true",
                        help="weights proportional to the sources' figures")
    parser.add_argument("--greedy", action="store_true",
                        help="greedy soup: a source joins only if the dev figure does not fall")
    parser.add_argument("--sets", type=Path, help="evaluation sets (YAML or JSON list, embedlib.evaluation.EvalSet) "
                                                  "for the dev figures (default with --run: the run's); model "
                                                  "directories are scored on them for a selection")
    parser.add_argument("--no-eval", action="store_true", help="compute no dev figures")
    parser.add_argument("--batch-size", type=int, default=None, help="of the evaluation (default 64, or the run's)")
    parser.add_argument("--max-length", type=int, default=None, help="of the evaluation (default: the model's, "
                                                                     "or the run's)")
    parser.add_argument("--dtype", choices=ENCODE_DTYPES, default="auto",
                        help="compute dtype of the evaluation (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="embedding cache of the evaluation (as embedlib.evaluation's): a model's corpus "
                             "embeddings found there are not encoded again, and new ones are added")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        record = _run(args)
    except (_UsageError, MergeError, EvaluationError, RecordError) as error:
        print(f"error: {' '.join(str(error).splitlines())}", file=sys.stderr)
        return 2
    print(json.dumps({"output": str(args.output), "method": record["method"], "weights": record["weights"],
                      "dev": record["dev"] and {"sets": {k: v["main_score"] for k, v in record["dev"]["sets"].items()},
                                                "average": record["dev"]["average"]}}, indent=2))
    return 0


def _run(args) -> dict:
    runs = args.runs or []
    selectors = [name for name, given in (("--best-k", args.best_k is not None), ("--greedy", args.greedy),
                                          ("--weights-from-scores", args.weights_from_scores),
                                          ("--set", args.set_name is not None),
                                          ("--metric", args.metric != "main_score")) if given]
    # Model directories with a selection are ranked by their figures on --sets, evaluated here.
    scored = not runs and bool(selectors)
    if runs and args.sources:
        raise MergeError("give model directories or --run RUN, not both")
    if not runs and not args.sources:
        raise MergeError("nothing to merge: give model directories, or --run RUN")
    if scored and args.sets is None:
        raise MergeError(f"{selectors[0]} ranks sources by a figure: give --run RUN (its eval.jsonl), or --sets "
                         "FILE to evaluate the model directories on")
    if args.metric not in ("main_score", AVERAGE) and not args.metric.startswith("eval/"):
        raise MergeError(f"--metric {args.metric}: expected main_score, eval/<name> or {AVERAGE}")
    if args.metric == AVERAGE and runs:
        raise MergeError(f"--metric {AVERAGE} (the mean of the category means of --sets) ranks model directories; "
                         "with --run give an eval.jsonl key (main_score or eval/<name>)")
    if args.metric == AVERAGE and args.set_name is not None:
        raise MergeError(f"--metric {AVERAGE} is over every set: it takes no --set")
    if args.best_k is not None and args.best_k < 1:
        raise MergeError(f"--best-k must be at least 1, got {args.best_k}")
    if args.weights_from_scores and args.weights is not None:
        raise MergeError("--weights-from-scores and --weights both give the weights: give one")
    if args.greedy and (args.method != "linear" or args.weights is not None or args.weights_from_scores
                        or args.t is not None):
        raise MergeError("--greedy makes a uniform linear soup: it takes no --method slerp, --weights or --t")
    if args.greedy and args.no_eval:
        raise MergeError("--greedy needs the dev figures that --no-eval turns off")
    if scored and args.no_eval:
        raise MergeError(f"{selectors[0]} ranks the model directories by their dev figures, which --no-eval "
                         "turns off")
    for name in ("batch_size", "max_length"):
        if getattr(args, name) is not None and getattr(args, name) < (1 if name == "batch_size" else 2):
            raise MergeError(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")

    selection, files = None, None
    if runs:
        sources, set_name = select_from_runs(runs, args.metric, args.set_name, args.best_k)
        selection = {"runs": [str(r) for r in runs], "sets": None, "metric": args.metric, "set": set_name,
                     "best_k": args.best_k,
                     "weights_from_scores": "proportional" if args.weights_from_scores else None}
    else:
        sources = [source_of(p) for p in args.sources]
        set_name = args.set_name
        files = check_compatible(sources)  # all of them, before any is evaluated
    if len(sources) < 2 and not args.greedy and not scored:  # scored ones: counted once selected
        raise MergeError(f"a merge needs at least two sources, got {len(sources)}")

    dev = None
    if not args.no_eval:
        if args.sets is not None:
            sets, options = read_sets(args.sets), {}
        elif runs:
            sets, options = runs_sets(runs)
        else:
            sets, options = [], {}
        for spec in sets:
            check_set(spec, f"set {spec.name!r}: ")
        check_set_names(sets)
        if args.batch_size is not None:
            options["batch_size"] = args.batch_size
        if args.max_length is not None:
            options["max_length"] = args.max_length
        options.update(dtype=args.dtype, cache_dir=args.cache_dir)
        if scored and set_name is None and args.metric != AVERAGE:
            if len(sets) > 1:
                raise MergeError(f"--sets {args.sets} has the sets {', '.join(s.name for s in sets)}: choose the "
                                 f"set of --metric with --set, or rank by --metric {AVERAGE}")
            set_name = sets[0].name
        if sets:
            dev = DevSets(sets=sets, data=[load_set(s) for s in sets], metric=args.metric, set_name=set_name, **options)
    if args.greedy and dev is None:
        raise MergeError(f"--greedy needs evaluation sets: give --sets FILE ({runs[0]}/config.yaml has none)")
    if args.greedy or scored:
        _check_figure(dev, "--greedy" if args.greedy else selectors[0])
    check_output(args.output)  # before the evaluations below: a refusal costs nothing

    if scored:
        sources = score_sources(sources, dev, args.best_k)
        selection = {"runs": None, "sets": str(args.sets), "metric": args.metric,
                     "set": None if args.metric == AVERAGE else set_name, "best_k": args.best_k,
                     "weights_from_scores": "proportional" if args.weights_from_scores else None}
    if len(sources) < 2 and not args.greedy:
        raise MergeError(f"a merge needs at least two sources, got {len(sources)}")
    if files is None:
        files = check_compatible(sources)

    weights = parse_weights(args.weights) if args.weights is not None else None
    if args.weights_from_scores:
        weights = [s.score for s in sources]
        if any(w <= 0 for w in weights):
            raise MergeError(f"--weights-from-scores: the figures {weights} are not all positive; proportional "
                             "weights need positive scores")
    plan = make_plan(args.method, len(sources), weights, args.t)
    return merge(sources, args.output, plan, files, dev=dev, greedy=args.greedy, selection=selection)


def _check_figure(dev: DevSets, option: str) -> None:
    """The figure `option` compares (--metric of --set) is one the evaluation sets give."""
    if dev.metric == AVERAGE:
        return
    spec = next((s for s in dev.sets if s.name == dev.set_name), None)
    if spec is None:
        raise MergeError(f"{option}: the set {dev.set_name!r} of --metric is not among the evaluation sets "
                         f"({', '.join(s.name for s in dev.sets)})")
    if dev.metric != "main_score" and dev.metric.removeprefix("eval/") not in _FIGURES[spec.category]:
        raise MergeError(f"{option}: --metric {dev.metric} is not a figure of the {spec.category} set "
                         f"{spec.name!r} ({', '.join('eval/' + f for f in _FIGURES[spec.category])})")


if __name__ == "__main__":
    sys.exit(main())
