"""Dynamic hard-negative mining (Conan-embedding, Li et al. 2024): per-sample state and the rule.

Every training query (a "sample": its row in the retrieval data set) trains against n hard negatives
taken from its ranked candidate list (the negative store version in use). The state remembers, per
sample, which negatives it has now, s0 = their average score against the query when they were
assigned, and s = their current average score. Every `check_interval` steps the rule replaces
negatives that are no longer hard:

  window rule (the paper's): a sample whose 1.15 * s < s0 and |s| < 0.8 moves from window i to
      window i + 1, where window i is ranks [offset + (i - 1) * n, offset + i * n) of its candidate
      list (offset: the data set's neg_offset; Conan skips 10);
  per-negative rule (the follow-up paper's): each negative j whose 1.2 * s_j < s0_j and s_j < 0.7,
      or whose initial score s0_j < 0.4, is replaced by the next rank not used yet.

Scores. s comes from the similarities the loss computes anyway (StepLoss.negative_scores), recorded
whenever the sample is trained: no extra forward pass. s0 is the first score recorded after the
assignment, by default: s and s0 then come from the same live model in the same mode (dropout,
precision, pooling), so their ratio measures what training did to the negatives and nothing else.
A sample must be trained twice after an assignment before the ratio can fire (a negative s and the
per-negative initial-score test need only once). The alternative, the mined scores of the store
version, is available per record (`record(mined_scores=...)`, an API the trainer does not use): it
lets the ratio fire at the first training, at the price of comparing the live model with the (older,
eval-mode) export that mined.
NaN means "not observed since the assignment"; comparisons with NaN are false, so such a sample is
never stale. The rule runs in float32, the precision of the scores; thresholds are strict (a sample
exactly at 1.15 * s == s0 or |s| == 0.8 is not stale).

Ranks and the end of the list. A rank indexes the ranked list the trainer draws negatives from
(training/data.py: the store's candidates minus the query's positives). Given the list's length
(`negative_ranks(sample, num_candidates)`, or `fit_ranks` where only the ranks travel), ranks
wrap: window i past the last full window starts over at the first window (the per-negative rule
likewise wraps each rank; a rank that would repeat another slot's becomes -1). Starting over is
chosen over keeping the last window because the list is re-mined with newer models: the first
window of the version in use holds the negatives hardest for a recent model, the last window the
easiest. -1 marks a slot without a candidate (a list shorter than one window past the offset); the
trainer tops such slots up with random passages, as it does for short lists.

Distributed use. Ranks train different samples, so records are only queued by `record()`;
`sync()` (collective) gathers every rank's queue and applies all records in the order (step, rank,
call), so every rank ends with identical state, equal to one process applying the same records.
Everything that changes assignments (`check`, `adopt_version`) and `state_dict` requires a synced
state (so a checkpoint step calls sync() too), and the trainer calls, on every rank at the same step:

    if dyn.due(step):
        dyn.sync()
        result = dyn.check(step)            # result.metrics() -> metrics.jsonl

Batches are planned ahead of training (DataLoader prefetch), so a batch trained after a check may
still hold the negatives that the check replaced. Every assignment change bumps the sample's
`generation`; a plan that carries `generation[row]` from when it was made and passes it to
`record()` has its scores dropped at sync if the negatives changed meanwhile, instead of being
credited to the new negatives.

The version in use. All samples read the one version in use; `adopt_version` switches to a newer
one (every rank at the same step: training/negatives_runtime.py decides when). Window indices
and per-negative ranks are kept, but the negatives behind them changed, so every sample's scores
are reset (s0 is re-observed) and every generation bumped.

`state_dict()` / `load_state_dict()` give and take NumPy arrays only (no pickle); `save_states` /
`load_states` keep every data set's state in one safetensors file of a checkpoint.

This module is the rule and its state only, with no files but checkpoints and no clock: where store
versions come from, and when each of these calls happens in training, is
training/negatives_runtime.py. The options are config.NegativesConfig (`negatives:` in a recipe);
n and the skipped top ranks are each data set's num_negatives and neg_offset.
"""
from __future__ import annotations

import os
import typing
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from training.config import NegativesConfig


# The rules by number, as checkpoints store them (the order must never change).
RULES = typing.get_args(typing.get_type_hints(NegativesConfig)["rule"])
_NONE = -1  # version / model step / generation "not given"


@dataclass(frozen=True)
class CheckResult:
    """What one application of the rule found (identical on every rank)."""

    step: int
    stale_samples: int  # samples whose negatives (any of them, per_negative) were stale and replaced
    replaced_negatives: int  # negatives replaced: stale_samples * n for the window rule
    mean_score: float | None  # mean of s over the samples observed since their assignment
    unobserved_samples: int  # samples whose current negatives have no recorded score yet
    version: int | None  # negative store version in use
    export_age_steps: int | None  # step minus the training step of the export that mined it

    def metrics(self, prefix: str = "negatives/") -> dict[str, Any]:
        """Flat, JSON-ready figures for metrics.jsonl."""
        return {f"{prefix}{key}": value for key, value in (
            ("stale", self.stale_samples), ("replaced", self.replaced_negatives),
            ("mean_score", self.mean_score), ("unobserved", self.unobserved_samples),
            ("version", self.version), ("export_age_steps", self.export_age_steps))}


class DynamicNegativeState:
    """Per-sample negatives, their scores, and the rule. Arrays are public and indexed by sample:

    window         int32 [N]      1-based window index i (window rule; stays 1 under per_negative)
    initial_score  float32 [N]    s0, mean over the sample's negatives; NaN until observed
    score          float32 [N]    s, the latest mean; NaN until observed
    generation     int64 [N]      bumped whenever the sample's negatives change
    per_negative rule only:
    slot_ranks     int32 [N, n]   rank of each negative slot's candidate
    slot_initial_score, slot_score  float32 [N, n]   s0 and s per slot
    next_rank      int32 [N]      the next rank not used yet
    """

    def __init__(self, num_samples: int, options: NegativesConfig, num_negatives: int, rank_offset: int):
        if num_samples < 0 or num_negatives < 1 or rank_offset < 0:
            raise ValueError(f"num_samples {num_samples}, num_negatives {num_negatives} and rank_offset {rank_offset} "
                             "must be >= 0, >= 1 and >= 0")
        self.num_samples, self.options = num_samples, options
        self.num_negatives, self.rank_offset = num_negatives, rank_offset
        n, offset = num_negatives, rank_offset
        self.window = np.ones(num_samples, np.int32)
        self.initial_score = np.full(num_samples, np.nan, np.float32)
        self.score = np.full(num_samples, np.nan, np.float32)
        self.generation = np.zeros(num_samples, np.int64)
        if options.rule == "per_negative":
            self.slot_ranks = np.tile(np.arange(offset, offset + n, dtype=np.int32), (num_samples, 1))
            self.slot_initial_score = np.full((num_samples, n), np.nan, np.float32)
            self.slot_score = np.full((num_samples, n), np.nan, np.float32)
            self.next_rank = np.full(num_samples, offset + n, np.int32)
        self.version: int | None = None
        self.version_model_step: int | None = None
        self._pending: list[_Record] = []

    # --- reading -----------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether the rule runs after optimizer step `step` (steps counted from 1)."""
        return self.options.dynamic and step > 0 and step % self.options.check_interval == 0

    def negative_ranks(self, sample: int, num_candidates: int | None = None) -> np.ndarray:
        """int64 [n]: ranks in the sample's candidate list of the negatives to train with now.

        num_candidates, the length of that list: see fit_ranks(). None: the list is taken as long
        enough (a DataLoader worker that knows the length can call fit_ranks on these ranks).
        """
        n, offset = self.num_negatives, self.rank_offset
        if self.options.rule == "window":
            ranks = offset + (int(self.window[sample]) - 1) * n + np.arange(n, dtype=np.int64)
        else:
            ranks = self.slot_ranks[sample].astype(np.int64)
        return ranks if num_candidates is None else fit_ranks(ranks, num_candidates, self.options.rule, n, offset)

    # --- recording -------------------------------------------------------------------------------

    def record(self, sample_indices, negative_scores, step: int, generations=None, mined_scores=None) -> None:
        """Queue the scores of samples this rank trained at optimizer step `step` (applied by sync()).

        negative_scores: [b, n] (NumPy or torch, any device and float dtype), the similarity of each
        query with each of its hard negatives in the order negative_ranks() gave them.
        generations: [b], generation[sample] when the batch was planned; records whose negatives
        changed since are dropped at sync. None: always credited to the current negatives.
        mined_scores: [b, n] the store's scores of the same negatives; when given, s0 is taken from
        them instead of from the first observed scores (a NaN entry, a slot without a mined
        candidate, falls back to the observed score).
        """
        samples = _as_numpy(sample_indices, np.int64).reshape(-1)
        b, n = len(samples), self.num_negatives
        scores = _as_numpy(negative_scores, np.float32)
        if scores.shape != (b, n):
            raise ValueError(f"negative_scores has shape {tuple(scores.shape)}, expected ({b}, {n}): "
                             f"one row per sample, num_negatives={n} columns")
        if b and (samples.min() < 0 or samples.max() >= self.num_samples):
            raise IndexError(f"sample index outside [0, {self.num_samples})")
        if not np.isfinite(scores).all():
            raise ValueError(f"negative_scores at step {step} holds NaN or infinite values")
        if generations is None:
            generations = np.full(b, _NONE, np.int64)
        generations = _as_numpy(generations, np.int64).reshape(-1)
        if len(generations) != b:
            raise ValueError(f"generations has {len(generations)} entries for {b} samples")
        if mined_scores is None:
            mined = np.full((b, n), np.nan, np.float32)
        else:
            mined = _as_numpy(mined_scores, np.float32)
            if mined.shape != (b, n):
                raise ValueError(f"mined_scores has shape {tuple(mined.shape)}, expected ({b}, {n})")
        self._pending.append(_Record(step, samples, generations, scores, mined))

    def sync(self, group=None) -> None:
        """Collective: apply the records queued on every rank, in the same order everywhere.

        Without torch.distributed (or with one rank) it applies this process's queue. Uses
        all_gather_object: under NCCL, torch.cuda.set_device(local_rank) must have been called.
        """
        mine = _pack(self._pending, self.num_negatives)
        mine["fingerprint"] = self._fingerprint()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            gathered: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, mine, group=group)  # in memory only: never from disk
        else:
            gathered = [mine]
        if any(g["fingerprint"] != mine["fingerprint"] for g in gathered):
            raise RuntimeError("dynamic negatives: ranks hold different assignments; every rank must call "
                               "check/adopt_version/load_state_dict at the same step")
        merged = {key: np.concatenate([g[key] for g in gathered]) for key in _RECORD_KEYS}
        rank = np.concatenate([np.full(len(g["step"]), r, np.int64) for r, g in enumerate(gathered)])
        order = np.lexsort((merged["call"], rank, merged["step"]))  # stable: rows of a call stay in order
        self._apply({key: value[order] for key, value in merged.items()})
        self._pending.clear()

    def _apply(self, rows: dict[str, np.ndarray]) -> None:
        samples = rows["sample"]
        current = (rows["generation"] == _NONE) | (rows["generation"] == self.generation[samples])
        samples, scores, mined = samples[current], rows["scores"][current], rows["mined"][current]
        if len(samples) == 0:
            return
        initial = np.where(np.isnan(mined), scores, mined)
        # s: the latest record of each sample; s0: its first, where s0 is still unknown.
        last = len(samples) - 1 - np.unique(samples[::-1], return_index=True)[1]
        first = np.unique(samples, return_index=True)[1]
        self.score[samples[last]] = scores[last].mean(axis=1)
        unknown = first[np.isnan(self.initial_score[samples[first]])]
        self.initial_score[samples[unknown]] = initial[unknown].mean(axis=1)
        if self.options.rule == "per_negative":
            self.slot_score[samples[last]] = scores[last]
            slots_s0 = self.slot_initial_score[samples[first]]
            self.slot_initial_score[samples[first]] = np.where(np.isnan(slots_s0), initial[first], slots_s0)

    # --- the rule --------------------------------------------------------------------------------

    def check(self, step: int) -> CheckResult:
        """Apply the rule to every sample (after sync(), at the same step on every rank)."""
        self._require_synced("check")
        observed = ~np.isnan(self.score)
        mean_score = float(self.score[observed].mean()) if observed.any() else None
        unobserved = int((~observed).sum())
        cfg = self.options
        if cfg.rule == "window":
            s, s0 = self.score, self.initial_score
            stale = (np.float32(cfg.stale_ratio) * s < s0) & (np.abs(s) < np.float32(cfg.stale_abs_max))
            self.window[stale] += 1
            replaced = int(stale.sum()) * self.num_negatives
        else:
            s, s0 = self.slot_score, self.slot_initial_score
            slot_stale = ((np.float32(cfg.per_negative_ratio) * s < s0) & (s < np.float32(cfg.per_negative_max_score))
                          | (s0 < np.float32(cfg.per_negative_min_initial)))
            # The k-th stale slot of a sample (in slot order) takes next_rank + k.
            new_ranks = self.next_rank[:, None] + np.cumsum(slot_stale, axis=1, dtype=np.int32) - 1
            self.slot_ranks[slot_stale] = new_ranks[slot_stale]
            self.next_rank += slot_stale.sum(axis=1, dtype=np.int32)
            self.slot_initial_score[slot_stale] = np.nan
            self.slot_score[slot_stale] = np.nan
            stale = slot_stale.any(axis=1)
            replaced = int(slot_stale.sum())
        self._reset(stale)
        return CheckResult(step=step, stale_samples=int(stale.sum()), replaced_negatives=replaced,
                           mean_score=mean_score, unobserved_samples=unobserved, version=self.version,
                           export_age_steps=(step - self.version_model_step
                                             if self.version_model_step is not None else None))

    def adopt_version(self, version: int, model_step: int | None) -> bool:
        """Use negative store `version` (mined by the export of training step `model_step`) from now on.

        Same step on every rank, after sync(). Returns False, changing nothing, for the version
        already in use (as after a resume); otherwise every sample's scores are reset.
        """
        self._require_synced("adopt_version")
        if version == self.version:
            return False
        self.version, self.version_model_step = int(version), None if model_step is None else int(model_step)
        self._reset(np.ones(self.num_samples, bool))
        if self.options.rule == "per_negative":
            self.slot_initial_score[:] = np.nan
            self.slot_score[:] = np.nan
        return True

    def _reset(self, changed: np.ndarray) -> None:
        """The negatives of `changed` samples are new: forget their sample-level scores."""
        self.initial_score[changed] = np.nan
        self.score[changed] = np.nan
        self.generation[changed] += 1

    def _require_synced(self, what: str) -> None:
        if self._pending:
            raise RuntimeError(f"dynamic negatives: {what} with {len(self._pending)} unsynced records; "
                               "call sync() first on every rank")

    def _fingerprint(self) -> tuple:
        return self.num_samples, self.version, zlib.crc32(self.generation.tobytes())

    # --- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays only (copies), after sync(): store with safetensors or np.savez."""
        self._require_synced("state_dict")
        state = {
            "layout": np.array([self.num_samples, RULES.index(self.options.rule), self.num_negatives, self.rank_offset],
                               np.int64),
            "version": np.array([_NONE if self.version is None else self.version,
                                 _NONE if self.version_model_step is None else self.version_model_step], np.int64),
        }
        for name in self._array_names():
            state[name] = getattr(self, name).copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what state_dict() gave; a checkpoint of another layout is a clear error."""
        expected = {"layout", "version", *self._array_names()}
        if set(state) != expected:
            raise ValueError(f"dynamic negatives checkpoint: keys {sorted(state)} differ from {sorted(expected)} "
                             f"(rule {self.options.rule!r})")
        layout = np.asarray(state["layout"])
        if layout.shape != (4,):
            raise ValueError(f"dynamic negatives checkpoint: 'layout' has shape {layout.shape}, expected (4,)")
        have = dict(zip(("num_samples", "rule", "num_negatives", "rank_offset"), (int(v) for v in layout)))
        have["rule"] = RULES[have["rule"]] if 0 <= have["rule"] < len(RULES) else have["rule"]
        want = {"num_samples": self.num_samples, "rule": self.options.rule, "num_negatives": self.num_negatives,
                "rank_offset": self.rank_offset}
        for key in want:
            if have[key] != want[key]:
                raise ValueError(f"dynamic negatives checkpoint: {key} is {have[key]!r}, this run has "
                                 f"{want[key]!r} (the data set or the configuration changed since it was saved)")
        arrays = {}
        for name in self._array_names():
            value, current = np.asarray(state[name]), getattr(self, name)
            if value.shape != current.shape or value.dtype != current.dtype:
                raise ValueError(f"dynamic negatives checkpoint: {name!r} is {value.dtype}{list(value.shape)}, "
                                 f"expected {current.dtype}{list(current.shape)}")
            arrays[name] = value.copy()
        version = np.asarray(state["version"])
        if version.shape != (2,):
            raise ValueError(f"dynamic negatives checkpoint: 'version' has shape {version.shape}, expected (2,)")
        for name, value in arrays.items():
            setattr(self, name, value)
        self.version = None if version[0] == _NONE else int(version[0])
        self.version_model_step = None if version[1] == _NONE else int(version[1])
        self._pending.clear()

    def _array_names(self) -> list[str]:
        names = ["window", "initial_score", "score", "generation"]
        if self.options.rule == "per_negative":
            names += ["slot_ranks", "slot_initial_score", "slot_score", "next_rank"]
        return names


STATE_FILENAME = "dynamic_negatives.safetensors"


def save_states(path: str | os.PathLike, states: dict[str, DynamicNegativeState]) -> None:
    """Every data set's state_dict() (after sync()) in one safetensors file, keys "<data set>/<array>"."""
    from safetensors.numpy import save_file

    arrays = {f"{name}/{key}": value for name, state in states.items() for key, value in state.state_dict().items()}
    save_file(arrays, str(path))


def load_states(path: str | os.PathLike, states: dict[str, DynamicNegativeState]) -> None:
    """Restore what save_states wrote; a data set missing from the file is a clear error."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is missing: the checkpoint holds no dynamic negatives state")
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_file(str(path)).items():
        name, _, array = key.rpartition("/")
        grouped.setdefault(name, {})[array] = value
    for name, state in states.items():
        if name not in grouped:
            raise ValueError(f"{path} holds no dynamic negatives state for data set {name!r} (it holds "
                             f"{sorted(grouped)}): the data sets changed since the checkpoint was written")
        state.load_state_dict(grouped[name])


def fit_ranks(ranks: np.ndarray, num_candidates: int, rule: str, num_negatives: int, rank_offset: int) -> np.ndarray:
    """negative_ranks() output fitted to a candidate list of num_candidates: ranks past its end wrap
    around (module docstring), -1 marks a slot with no candidate."""
    n, offset = num_negatives, rank_offset
    usable = max(0, num_candidates - offset)
    position = np.asarray(ranks, np.int64) - offset
    if rule == "window":
        full_windows = usable // n
        if full_windows == 0:  # not even one window: what there is, -1 for the rest
            return np.where(np.arange(n) < usable, offset + np.arange(n), -1)
        return offset + (position // n % full_windows) * n + position % n
    if usable == 0:
        return np.full(n, -1, np.int64)
    wrapped = offset + position % usable
    repeated = np.ones(n, bool)
    repeated[np.unique(wrapped, return_index=True)[1]] = False  # a rank already held by an earlier slot
    return np.where(repeated, -1, wrapped)


# --- queued records ------------------------------------------------------------------------------


@dataclass
class _Record:
    step: int
    samples: np.ndarray  # int64 [b]
    generations: np.ndarray  # int64 [b], _NONE: not given
    scores: np.ndarray  # float32 [b, n]
    mined: np.ndarray  # float32 [b, n], NaN: not given


_RECORD_KEYS = ("step", "call", "sample", "generation", "scores", "mined")


def _pack(records: list[_Record], n: int) -> dict[str, np.ndarray]:
    """One row per (record, sample): what sync() exchanges."""
    sizes = [len(r.samples) for r in records]
    return {
        "step": np.repeat(np.array([r.step for r in records], np.int64), sizes),
        "call": np.repeat(np.arange(len(records), dtype=np.int64), sizes),
        "sample": np.concatenate([r.samples for r in records]) if records else np.zeros(0, np.int64),
        "generation": np.concatenate([r.generations for r in records]) if records else np.zeros(0, np.int64),
        "scores": np.concatenate([r.scores for r in records]) if records else np.zeros((0, n), np.float32),
        "mined": np.concatenate([r.mined for r in records]) if records else np.zeros((0, n), np.float32),
    }


def _as_numpy(value, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float32 if value.is_floating_point() else value.dtype).numpy()
    return np.asarray(value).astype(dtype, copy=False)
