"""From ranked search results to hard negatives: drop positives, copies and likely false negatives.

Per query, in rank order, a candidate is dropped when it is
  - padding (id -1) or one of the query's excluded rows (its positives, and rows whose passage text
    equals the query or a positive),
  - above the query's positive score less (1 - positive_margin) of its size: p - (1 - m) |p| (NV-Retriever's
    TopK-PercPos, Moreira et al. 2024, m * p for the positive scores it is defined on: a candidate
    scoring close to or above a known positive is more likely an unlabelled positive than a negative).
    With several positives the lowest positive score is used, so that every kept negative is below the
    margin of every positive the trainer may pair it with. Written with |p|, the threshold stays below the
    positive when the mining model scores the positive at or below 0 (m * p would lie above it, keeping
    candidates that outscore the positive and dropping the rest); such a query, one the mining model
    fails on, keeps only candidates scoring below its positive, usually few, and the trainer tops its
    window up with random passages (mining counts these queries: nonpositive_positive_queries),
  - above score_cap (an absolute ceiling, when set).
The first k survivors are kept; rows with fewer are padded with (-1, NaN).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_CHUNK = 4096  # queries at a time: bounds the [chunk, depth, excluded] comparison


@dataclass(frozen=True)
class FilterConfig:
    k: int
    positive_margin: float | None = 0.95
    score_cap: float | None = None


@dataclass
class Filtered:
    ids: np.ndarray  # int64 [Q, k], -1 padded
    scores: np.ndarray  # float32 [Q, k], NaN padded
    survivors: np.ndarray  # int64 [Q]: candidates that passed, of all those given (may exceed k)


def lowest_positive_scores(positive_scores: np.ndarray) -> np.ndarray:
    """[Q] float64: each query's lowest positive score; +inf without one."""
    scores = np.where(np.isfinite(positive_scores), positive_scores, np.inf).astype(np.float64)
    return scores.min(axis=1) if scores.shape[1] else np.full(len(scores), np.inf)


def positive_thresholds(positive_scores: np.ndarray, margin: float | None) -> np.ndarray:
    """[Q] score above which a candidate is dropped: p - (1 - margin) |p| for the lowest positive score p
    (margin * p when p > 0); +inf without a positive score or a margin."""
    if margin is None:
        return np.full(len(positive_scores), np.inf, dtype=np.float64)
    lowest = lowest_positive_scores(positive_scores)
    finite = np.isfinite(lowest)
    return np.where(finite, lowest - (1 - margin) * np.abs(np.where(finite, lowest, 0.0)), np.inf)


def nonpositive_positive_queries(positive_scores: np.ndarray) -> int:
    """Queries whose lowest positive score is at or below 0 (what the positive-aware filter says of them:
    the module docstring)."""
    return int((lowest_positive_scores(positive_scores) <= 0).sum())


def filter_candidates(scores: np.ndarray, ids: np.ndarray, excluded_rows: np.ndarray,
                      positive_scores: np.ndarray, config: FilterConfig) -> Filtered:
    """scores/ids: [Q, D] ranked candidates; excluded_rows: int64 [Q, E] (-1 padded); positive_scores:
    float [Q, P], -inf where a query has fewer positives."""
    thresholds = positive_thresholds(positive_scores, config.positive_margin)
    cap = np.inf if config.score_cap is None else config.score_cap
    num_queries = len(ids)
    out_ids = np.full((num_queries, config.k), -1, dtype=np.int64)
    out_scores = np.full((num_queries, config.k), np.nan, dtype=np.float32)
    survivors = np.zeros(num_queries, dtype=np.int64)
    for s in range(0, num_queries, _CHUNK):
        chunk_ids, chunk_scores = ids[s : s + _CHUNK], scores[s : s + _CHUNK]
        excluded = excluded_rows[s : s + _CHUNK]
        drop = (chunk_ids < 0) | (chunk_ids[:, :, None] == np.where(excluded >= 0, excluded, -2)[:, None, :]).any(-1)
        drop |= chunk_scores > thresholds[s : s + _CHUNK, None]
        drop |= chunk_scores > cap
        keep_order = np.argsort(drop, axis=1, kind="stable")[:, : config.k]  # survivors first, rank order kept
        kept = ~np.take_along_axis(drop, keep_order, axis=1)
        width = keep_order.shape[1]
        out_ids[s : s + len(chunk_ids), :width] = np.where(kept, np.take_along_axis(chunk_ids, keep_order, 1), -1)
        out_scores[s : s + len(chunk_ids), :width] = np.where(
            kept, np.take_along_axis(chunk_scores, keep_order, 1), np.nan)
        survivors[s : s + len(chunk_ids)] = (~drop).sum(axis=1)
    return Filtered(out_ids, out_scores, survivors)
