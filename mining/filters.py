"""From ranked search results to hard negatives: drop positives, copies and likely false negatives.

Per query, in rank order, a candidate is dropped when it is
  - padding (id -1) or one of the query's excluded rows (its positives, and rows whose passage text
    equals the query or a positive),
  - above positive_margin * the query's positive score (NV-Retriever's TopK-PercPos, Moreira et al.
    2024: a candidate scoring close to or above a known positive is more likely an unlabelled positive
    than a negative). With several positives the lowest positive score is used, so that every kept
    negative is below the margin of every positive the trainer may pair it with,
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


def positive_thresholds(positive_scores: np.ndarray, margin: float | None) -> np.ndarray:
    """[Q] score above which a candidate is dropped: margin * lowest positive score; +inf without one."""
    if margin is None:
        return np.full(len(positive_scores), np.inf, dtype=np.float64)
    scores = np.where(np.isfinite(positive_scores), positive_scores, np.inf).astype(np.float64)
    lowest = scores.min(axis=1) if scores.shape[1] else np.full(len(scores), np.inf)
    return np.where(np.isfinite(lowest), margin * lowest, np.inf)


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
