"""Dynamic hard-negative mining (Conan-embedding, Li et al. 2024, §2.2): per-sample state and the rule.

Every training query (a "sample": its row in the retrieval data set) trains against the hard negatives of
a window of its ranked candidate list in the negative store version in use (training/negatives/plan.py:
N x n ranks, n per rank that holds the query). The state remembers, per sample, which window it has,
s0 = the mean score its negatives had when they were assigned, and s = their latest mean score as the
model sees them while training. Every `check_interval` steps the rule replaces negatives that are no
longer hard:

  window rule (v1's): a sample whose 1.15 * s < s0 and |s| < 0.8 moves from window i to window i + 1,
      i.e. ranks [offset + (i - 1) N n, offset + i N n) of its list (offset: the data set's neg_offset;
      Conan skips 10); all N slices of the window are replaced together;
  per-negative rule (Conan-v2's): each negative j whose 1.2 * s_j < s0_j and s_j < 0.7, or whose initial
      score s0_j < 0.4, is replaced by the next rank not used yet.

Scores. s0 is the store's mining score of the assigned negatives (the score at assignment, as both papers
define it: v2 tests S0 < 0.4 before any training), so a sample trained once since its assignment can be
judged at the next check. The mining score of a window reaches the trainer with the batch that trains it
(the DataLoader worker reads it beside the candidates) and is recorded with the first live score; a slot
without a mined candidate (topped up with a random passage) takes its first live score instead. s is the
newest live score: the similarities the loss computes anyway (StepLoss.negative_scores), no extra forward.
NaN means "not observed since the assignment"; comparisons with NaN are false, so such a sample is never
stale. The rule runs in float32, the precision of the scores; thresholds are strict (a sample exactly at
1.15 * s == s0 or |s| == 0.8 is not stale).

Ranks and the end of the list: see plan.fit_ranks (a window past the last full one starts over at the
first; -1 marks a slot with no candidate, topped up by the trainer).

Distributed use. Ranks train different samples, so records are only queued by `record()`; `sync()`
(collective) gathers every rank's queue and applies all records in the order (step, rank, call), so every
rank ends with identical state, equal to one process applying the same records. Everything that changes
assignments (`check`, `adopt_version`) and `state_dict` requires a synced state (so a checkpoint step
calls sync() too), and the trainer calls, on every rank at the same step:

    if dyn.due(step):
        dyn.sync()
        result = dyn.check(step)            # result.record() -> metrics.jsonl

Batches are planned ahead of training (DataLoader prefetch), so a batch trained after a check may still
hold the negatives that the check replaced. Every assignment change bumps the sample's `generation`; a
plan that carries `generation[row]` from when it was made and passes it to `record()` has its scores
dropped at sync if the negatives changed meanwhile, instead of being credited to the new negatives.

The version in use. All samples read the one version in use; `adopt_version` switches to a newer one
(every rank at the same step: training/negatives/runtime.py decides when). A new version is a new ranked
list, mined by a newer model: every sample starts again at its first window (the hardest negatives for
that model), with its scores forgotten and its generation bumped.

`state_dict()` / `load_state_dict()` give and take NumPy arrays only (no pickle); `save_states` /
`load_states` keep every data set's state in one safetensors file of a checkpoint.

This module is the rule and its state only, with no files but checkpoints and no clock. The options are
config.NegativesConfig (`negatives:` in a recipe); the layout (n, N, the skipped top ranks) is the data
set's StoreSpec.
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

from embedlib.run_records import NegativesCheck
from training.config import NegativesConfig
from training.negatives.plan import StoreSpec


# The rules by number, as checkpoints store them (the order must never change).
RULES = typing.get_args(typing.get_type_hints(NegativesConfig)["rule"])
_NONE = -1  # version / model step / generation "not given"
RATIO_QUANTILES = (0.1, 0.5, 0.9)  # of s / s0 over the samples a check could judge


@dataclass(frozen=True)
class CheckResult:
    """What one application of the rule saw and did (identical on every rank)."""

    step: int
    eligible_samples: int  # samples with s and s0 since their assignment: those the rule could judge
    stale_samples: int  # samples whose negatives (any of them, per_negative) were stale and replaced
    replaced_negatives: int  # negatives replaced: stale_samples * N * n for the window rule
    mean_score: float | None  # mean of s over the eligible samples
    mean_initial_score: float | None  # mean of s0 over the same samples
    ratio_quantiles: tuple[float, ...] | None  # s / s0 at RATIO_QUANTILES, over eligible samples with s0 > 0
    unobserved_samples: int  # samples whose current negatives have no live score yet
    version: int | None  # negative store version in use
    export_age_steps: int | None  # step minus the training step of the export that mined it

    def record(self) -> NegativesCheck:
        """What metrics.jsonl keeps of it (embedlib.run_records)."""
        q10, q50, q90 = self.ratio_quantiles or (None,) * len(RATIO_QUANTILES)
        return NegativesCheck(eligible=self.eligible_samples, stale=self.stale_samples,
                              replaced=self.replaced_negatives, mean_score=self.mean_score,
                              mean_initial_score=self.mean_initial_score, ratio_q10=q10, ratio_q50=q50,
                              ratio_q90=q90, unobserved=self.unobserved_samples, version=self.version,
                              export_age_steps=self.export_age_steps)


class DynamicNegativeState:
    """Per-sample negatives, their scores, and the rule, for one data set (its StoreSpec). Arrays are
    public and indexed by sample; W = N x n, the negatives of a query over the ranks sharing it:

    window         int32 [S]      1-based window index i (window rule; stays 1 under per_negative)
    initial_score  float32 [S]    s0, mean over the sample's negatives; NaN until recorded
    score          float32 [S]    s, the latest mean; NaN until recorded
    generation     int64 [S]      bumped whenever the sample's negatives change
    per_negative rule only:
    slot_ranks     int32 [S, W]   rank of each negative slot's candidate
    slot_initial_score, slot_score  float32 [S, W]   s0 and s per slot
    next_rank      int32 [S]      the next rank not used yet
    """

    def __init__(self, spec: StoreSpec, options: NegativesConfig):
        if spec.num_samples < 0 or spec.negatives_per_rank < 1 or spec.sharing_ranks < 1 or spec.rank_offset < 0:
            raise ValueError(f"{spec.name}: num_samples {spec.num_samples}, n {spec.negatives_per_rank}, N "
                             f"{spec.sharing_ranks} and rank_offset {spec.rank_offset} must be >= 0, >= 1, >= 1, >= 0")
        if spec.rule != options.rule:
            raise ValueError(f"{spec.name}: the data set's rule {spec.rule!r} is not negatives.rule {options.rule!r}")
        self.spec, self.options = spec, options
        self.num_samples, self.width, self.rank_offset = spec.num_samples, spec.width, spec.rank_offset
        self.window = np.ones(self.num_samples, np.int32)
        self.initial_score = np.full(self.num_samples, np.nan, np.float32)
        self.score = np.full(self.num_samples, np.nan, np.float32)
        self.generation = np.zeros(self.num_samples, np.int64)
        if options.rule == "per_negative":
            self.slot_ranks = np.zeros((self.num_samples, self.width), np.int32)
            self.slot_initial_score = np.full((self.num_samples, self.width), np.nan, np.float32)
            self.slot_score = np.full((self.num_samples, self.width), np.nan, np.float32)
            self.next_rank = np.zeros(self.num_samples, np.int32)
            self._first_windows(np.ones(self.num_samples, bool))
        self.version: int | None = None
        self.version_model_step: int | None = None
        self._pending: list[_Record] = []

    # --- reading -----------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether the rule runs after optimizer step `step` (steps counted from 1)."""
        return self.options.dynamic and step > 0 and step % self.options.check_interval == 0

    def negative_ranks(self, sample: int) -> np.ndarray:
        """int64 [W]: ranks in the sample's candidate list of its window now (plan.fit_ranks fits them to
        the list's length, in the DataLoader worker that reads the list)."""
        if self.options.rule == "window":
            return self.rank_offset + (int(self.window[sample]) - 1) * self.width + np.arange(self.width, dtype=np.int64)
        return self.slot_ranks[sample].astype(np.int64)

    # --- recording -------------------------------------------------------------------------------

    def record(self, sample_indices, live_scores, step: int, store_scores, generations=None) -> None:
        """Queue the scores of samples trained at optimizer step `step` (applied by sync()).

        live_scores: [b, W] (NumPy or torch, any device and float dtype), the similarity of each query with
        each negative of its window in negative_ranks() order, as the model saw them in the step.
        store_scores: [b, W], the mining scores of the same negatives (s0); NaN for a slot without a mined
        candidate, which takes its first live score as s0.
        generations: [b], generation[sample] when the batch was planned; records whose negatives changed
        since are dropped at sync. None: always credited to the current negatives.
        """
        samples = _as_numpy(sample_indices, np.int64).reshape(-1)
        b, width = len(samples), self.width
        scores = _as_numpy(live_scores, np.float32)
        if scores.shape != (b, width):
            raise ValueError(f"live scores have shape {tuple(scores.shape)}, expected ({b}, {width}): one row per "
                             f"sample, N x n = {width} columns")
        if b and (samples.min() < 0 or samples.max() >= self.num_samples):
            raise IndexError(f"sample index outside [0, {self.num_samples})")
        if not np.isfinite(scores).all():
            raise ValueError(f"live scores at step {step} hold NaN or infinite values")
        mined = _as_numpy(store_scores, np.float32)
        if mined.shape != (b, width):
            raise ValueError(f"store scores have shape {tuple(mined.shape)}, expected ({b}, {width})")
        if generations is None:
            generations = np.full(b, _NONE, np.int64)
        generations = _as_numpy(generations, np.int64).reshape(-1)
        if len(generations) != b:
            raise ValueError(f"generations has {len(generations)} entries for {b} samples")
        self._pending.append(_Record(step, samples, generations, scores, mined))

    def sync(self, group=None) -> None:
        """Collective: apply the records queued on every rank, in the same order everywhere.

        Without torch.distributed (or with one rank) it applies this process's queue. Uses
        all_gather_object: under NCCL, torch.cuda.set_device(local_rank) must have been called.
        """
        mine = _pack(self._pending, self.width)
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
        eligible = ~np.isnan(self.score) & ~np.isnan(self.initial_score)
        s_eligible, s0_eligible = self.score[eligible], self.initial_score[eligible]
        judged = s0_eligible > 0
        ratios = s_eligible[judged] / s0_eligible[judged]
        figures = dict(
            eligible_samples=int(eligible.sum()),
            mean_score=float(s_eligible.mean()) if eligible.any() else None,
            mean_initial_score=float(s0_eligible.mean()) if eligible.any() else None,
            ratio_quantiles=(tuple(float(v) for v in np.quantile(ratios, RATIO_QUANTILES)) if len(ratios) else None),
            unobserved_samples=int(np.isnan(self.score).sum()))
        cfg = self.options
        if cfg.rule == "window":
            s, s0 = self.score, self.initial_score
            stale = (np.float32(cfg.stale_ratio) * s < s0) & (np.abs(s) < np.float32(cfg.stale_abs_max))
            self.window[stale] += 1
            replaced = int(stale.sum()) * self.width
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
                           version=self.version, export_age_steps=(step - self.version_model_step
                                                                   if self.version_model_step is not None else None),
                           **figures)

    def adopt_version(self, version: int, model_step: int | None) -> bool:
        """Use negative store `version` (mined by the export of training step `model_step`) from now on.

        Same step on every rank, after sync(). Returns False, changing nothing, for the version already in
        use (as after a resume); otherwise every sample goes back to its first window, scores forgotten.
        """
        self._require_synced("adopt_version")
        if version == self.version:
            return False
        self.version, self.version_model_step = int(version), None if model_step is None else int(model_step)
        everyone = np.ones(self.num_samples, bool)
        self.window[:] = 1
        if self.options.rule == "per_negative":
            self._first_windows(everyone)
        self._reset(everyone)
        return True

    def _first_windows(self, samples: np.ndarray) -> None:
        """per_negative: the slots of `samples` hold the first window's ranks again, no scores."""
        self.slot_ranks[samples] = np.arange(self.rank_offset, self.rank_offset + self.width, dtype=np.int32)
        self.next_rank[samples] = self.rank_offset + self.width
        self.slot_initial_score[samples] = np.nan
        self.slot_score[samples] = np.nan

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
            "layout": np.array([self.num_samples, RULES.index(self.options.rule), self.width, self.rank_offset],
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
        have = dict(zip(("num_samples", "rule", "width", "rank_offset"), (int(v) for v in layout)))
        have["rule"] = RULES[have["rule"]] if 0 <= have["rule"] < len(RULES) else have["rule"]
        want = {"num_samples": self.num_samples, "rule": self.options.rule, "width": self.width,
                "rank_offset": self.rank_offset}
        names = {"num_samples": "samples", "rule": "rule", "rank_offset": "neg_offset",
                 "width": "negatives per query (N ranks sharing a query x num_negatives)"}
        for key in want:
            if have[key] != want[key]:
                raise ValueError(f"dynamic negatives checkpoint of {self.spec.name!r}: {names[key]} is {have[key]!r}, "
                                 f"this run has {want[key]!r} (the data set, the configuration or the ranks sharing "
                                 "its queries changed since it was saved)")
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
