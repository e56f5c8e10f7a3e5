"""Which store negatives a batch trains with: the layout of a data set's windows, and what a plan carries.

StoreSpec         one per data set that reads the negative store: what a version must be mined for, the
                  negatives per query and rank (n), the top ranks skipped, the rule, and N, the ranks that
                  hold the same queries at a step (loss.cbb_negatives=shared_queries; 1 otherwise)
PlannedNegatives  the store negatives of one rank's batch, fixed when the sampler plans it
BatchNegatives    what the batch brings back to the trainer: the plan, and the store's scores of the
                  negatives it was given (the rule's s0)
fit_ranks         a window's ranks fitted to a candidate list of a known length

A query's window holds N x n ranks of its candidate list: window i is ranks
[offset + (i - 1) N n, offset + i N n), and rank r of the N sharing its queries takes the r-th group of n
(the slice [r n, (r + 1) n) of the window), so the query meets N x n distinct hard negatives over the N
ranks (Conan-embedding's Eq. 3). With one rank per query (the gathered mode) N = 1 and a window is n ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StoreSpec:
    name: str  # the data set
    fingerprints: tuple[str, str]  # (queries, corpus): what a store version must be mined for
    num_samples: int  # the data set's rows (its first `limit` rows of the pairs file)
    negatives_per_rank: int  # n: the data set's num_negatives
    rank_offset: int  # the top candidates skipped (the data set's neg_offset)
    rule: str  # negatives.rule, which decides how ranks advance and wrap
    sharing_ranks: int = 1  # N: ranks holding the same queries at a step

    @property
    def width(self) -> int:
        """Negatives per query over the ranks that share it: N x n."""
        return self.negatives_per_rank * self.sharing_ranks


@dataclass(frozen=True)
class PlannedNegatives:
    """Store negatives of one batch, fixed when it is planned: the version in use then (DataLoader workers
    hold their own copy of everything, so the plan names it), each row's window (N x n ranks in its
    candidate list), this rank's slice of it, and each row's generation (to drop stale scores at sync)."""

    version: int
    ranks: tuple[tuple[int, ...], ...]  # per row: the ranks of the whole window
    generations: tuple[int, ...]
    slice_index: int = 0  # r of N: this rank takes ranks[r * n : (r + 1) * n] of each row's window
    sharing_ranks: int = 1  # N

    def own_slice(self, width: int) -> slice:
        n = width // self.sharing_ranks
        return slice(self.slice_index * n, (self.slice_index + 1) * n)


@dataclass(frozen=True)
class BatchNegatives:
    """What a retrieval batch with store negatives hands back after the step (NegativesRuntime.after_step)."""

    task: str
    rows: tuple[int, ...]
    plan: PlannedNegatives
    store_scores: np.ndarray  # float32 [b, N x n]: each window's mining scores, NaN where no candidate


def fit_ranks(ranks: np.ndarray, num_candidates: int, rule: str, width: int, rank_offset: int) -> np.ndarray:
    """A window's ranks (N x n = `width` of them) fitted to a candidate list of num_candidates.

    window rule: window i past the last full window starts over at the first one (the list is re-mined
    with newer models: its first window holds the negatives hardest for a recent model, its last the
    easiest), and a list short of one window gives what it has and -1 for the rest.
    per_negative rule: each rank wraps on its own, and one that would repeat an earlier slot's is -1.
    -1 marks a slot without a candidate; the trainer tops it up with a random passage.
    """
    offset = rank_offset
    usable = max(0, num_candidates - offset)
    position = np.asarray(ranks, np.int64) - offset
    if rule == "window":
        full_windows = usable // width
        if full_windows == 0:
            return np.where(np.arange(width) < usable, offset + np.arange(width), -1)
        return offset + (position // width % full_windows) * width + position % width
    if usable == 0:
        return np.full(width, -1, np.int64)
    wrapped = offset + position % usable
    repeated = np.ones(len(wrapped), bool)
    repeated[np.unique(wrapped, return_index=True)[1]] = False  # a rank already held by an earlier slot
    return np.where(repeated, -1, wrapped)
