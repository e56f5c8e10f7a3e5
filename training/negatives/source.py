"""The store as a DataLoader worker reads it: a planned window's corpus rows and mining scores.

Tasks never open the store: StepDataset (training/data.py) asks a StoreReader for the rows of a batch's
planned window and gives the task the passages of its own slice. The reader opens a version by the
number the plan names, without verifying it again: the training process holds that version open
(pinned against the sidecar's gc) while plans name it, and verified its checksums before the first plan
did (training/negatives/runtime.py).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from embedlib.negstore import NegativeStore, NegativeVersion
from training.negatives.plan import PlannedNegatives, StoreSpec, fit_ranks


class StoreReader:
    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = str(run_dir)
        self._opened: NegativeVersion | None = None

    def window(self, spec: StoreSpec, plan: PlannedNegatives, index: int, row: int,
               positive_rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(int64 [N x n] corpus rows, float32 [N x n] their mining scores) of the window planned for the
        batch's `index`-th row: ranks counted in the row's candidate list after its positives are removed,
        fitted to that list (fit_ranks); -1 and NaN where a slot has no candidate."""
        version = self._open(plan.version)
        ids, scores = version.candidates(row)
        kept = ~np.isin(ids, np.asarray(positive_rows, np.int64))
        ids, scores = ids[kept].astype(np.int64), scores[kept]
        ranks = np.asarray(plan.ranks[index], np.int64)
        fitted = fit_ranks(ranks, len(ids), spec.rule, len(ranks), spec.rank_offset)
        found = fitted >= 0
        rows = np.full(len(ranks), -1, np.int64)
        store_scores = np.full(len(ranks), np.nan, np.float32)
        rows[found], store_scores[found] = ids[fitted[found]], scores[fitted[found]]
        return rows, store_scores

    def _open(self, version: int) -> NegativeVersion:
        if self._opened is None or self._opened.version != version:
            if self._opened is not None:
                self._opened.close()  # unpin the old version, so the store's gc may remove it
            self._opened = NegativeStore(self.run_dir).open(version, verify=False)
        return self._opened

    def close(self) -> None:
        if self._opened is not None:
            self._opened.close()
            self._opened = None

    def __getstate__(self):  # an open version (file locks, memory maps) stays in its process
        return {"run_dir": self.run_dir, "_opened": None}
