"""Dynamic hard negatives over a training run: the one owner of the negatives lifecycle.

The trainer talks to one NegativesRuntime, on every rank, at four moments:

    runtime = NegativesRuntime(run_dir, store_specs(tasks), config.negatives, lookahead=prefetch_steps(workers))
    runtime.start(start_step, checkpoint_dir)     # before the first plan: restore, pick the version
    ...                                           # the sampler asks runtime.plan(task, rows, r) per batch
    figures = runtime.after_step(step, batch.store_negatives, out.negative_scores).figures()   # every step
    write_extra = runtime.before_checkpoint()     # at a checkpoint step, for save_checkpoint
    runtime.close()

What happens inside, for each data set that reads the store (a StoreSpec: a retrieval data set with a
corpus and num_negatives > 0):
- start: a resumed run restores every sample's state (rule.DynamicNegativeState) from the checkpoint; the
  version to train with is the checkpoint's while it is there and sound, else the newest sound version
  mined for the data set's pairs file and corpus (none: the pairs file's `neg` texts, or in-batch
  negatives, until one appears; a resumed run whose checkpoint trained with a version and finds no sound
  one any more stops with an error).
- plan: the version in use, each row's window (N x n ranks) and generation, and which slice of it the
  asking rank takes, fixed in the plan (DataLoader workers read the store themselves: source.StoreReader).
- after_step: the live scores of the batch's store negatives are recorded with their mining scores (by
  the first of the ranks sharing the queries, which scores each query against all N x n); every
  negatives.check_interval steps all ranks apply the rule (stale samples move to their next window); then,
  if rank 0's VersionFeed has verified a newer store version, all ranks adopt it at this step. Returns
  what metrics.jsonl keeps of it (StepNegatives).
- before_checkpoint: every rank's records are synced, and the state goes into the checkpoint.

Rank 0 looks for new versions without ever waiting for one (checksums are verified in a background
thread). The mining sidecar (`python -m mining sidecar --run-dir RUN`) mines every new export; when it
dies, training goes on with the version in use (one warning), and versions are picked up again when it
comes back. With DataLoader workers, batches prefetched across a check or an adoption keep the
negatives they were planned with (their scores are not credited to the new ones), so a resumed run
matches an uninterrupted one exactly only with train.num_workers=0 or without checks and new versions.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from embedlib.exports import latest_export
from embedlib.negstore import NegativeStore, NegativeStoreError, NegativeVersion
from embedlib.run_records import NegativesCheck
from training.config import ConfigError, NegativesConfig
from training.negatives.plan import BatchNegatives, PlannedNegatives, StoreSpec
from training.negatives.rule import STATE_FILENAME, DynamicNegativeState, load_states, save_states

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepNegatives:
    """What a step did with the store negatives, identical on every rank (sidecar_alive: rank 0's view, at
    checks)."""

    versions: dict[str, int | None]  # data set -> the store version in use after the step
    checks: dict[str, NegativesCheck]  # data set -> its check, at the steps one ran
    sidecar_alive: bool | None = None

    def figures(self) -> dict[str, Any]:
        """The keys of a metrics.jsonl line (README, "Reading progress")."""
        out: dict[str, Any] = {"negatives_version": dict(self.versions)}
        for name, check in self.checks.items():
            out.update(check.flat(name))
        if self.sidecar_alive is not None:
            out["negatives/sidecar_alive"] = self.sidecar_alive
        return out


class NegativesRuntime:
    """See the module docstring. A run without a data set that reads the store gets an idle runtime: its
    calls change nothing, and the figures say no data set uses a store version."""

    def __init__(self, run_dir: str | os.PathLike, specs: list[StoreSpec], options: NegativesConfig, lookahead: int):
        self.states = {spec.name: DynamicNegativeState(spec, options) for spec in specs}
        # Plans are made this many steps ahead of training: an adoption reaches the batches after them,
        # and the previous version stays pinned until then.
        self.lookahead = lookahead
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.feed = VersionFeed(run_dir, {spec.name: spec.fingerprints for spec in specs},
                                sidecar_timeout_s=options.sidecar_timeout_s) if self.states else None

    def start(self, start_step: int, checkpoint_dir: Path | None) -> None:
        """Every rank, before the first plan: the checkpoint's state (checkpoint_dir, when resuming) and
        the store version to start with."""
        if not self.states:
            return
        if checkpoint_dir is not None:
            try:
                load_states(checkpoint_dir / STATE_FILENAME, self.states)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        restored = next((s.version for s in self.states.values() if s.version is not None), None)
        first = broadcast_from_rank0(self.feed.first(restored) if self.rank == 0 else None)
        if first is not None:
            self._adopt(first, start_step, lookahead=0)
        elif restored is not None:
            raise ConfigError(f"the checkpoint trains with negatives v{restored:06d}, and {self.feed.store.root} "
                              "holds no sound version mined for these data sets any more")

    def plan(self, task_name: str, rows: tuple[int, ...], slice_index: int = 0) -> PlannedNegatives | None:
        """The store negatives of a batch being planned now, for the `slice_index`-th of the ranks sharing
        its queries: None without a version in use."""
        state = self.states.get(task_name)
        if state is None or state.version is None:
            return None
        return PlannedNegatives(version=state.version,
                                ranks=tuple(tuple(int(r) for r in state.negative_ranks(row)) for row in rows),
                                generations=tuple(int(state.generation[row]) for row in rows),
                                slice_index=slice_index, sharing_ranks=state.spec.sharing_ranks)

    def after_step(self, step: int, trained: BatchNegatives | None, live_scores) -> StepNegatives:
        """Every rank, after optimizer step `step`: record the live scores of the store negatives this rank
        trained (`trained`, with live_scores [b, N x n] from the loss), apply the rule where due, adopt a new
        store version if rank 0 has one ready."""
        if not self.states:
            return StepNegatives({}, {})
        if trained is not None and trained.plan.slice_index == 0:  # one record per query, not one per slice
            self.states[trained.task].record(trained.rows, live_scores, step, trained.store_scores,
                                             generations=trained.plan.generations)
        checks = {}
        for name, state in self.states.items():
            if state.due(step):
                state.sync()
                checks[name] = state.check(step).record()
        alive = (not self.feed.sidecar_dead) if checks and self.rank == 0 else None
        # After the check: a new version resets every sample, so the rule could not fire at this step.
        announcement = broadcast_from_rank0(self.feed.take() if self.rank == 0 else None)
        if announcement is not None:
            self._adopt(announcement, step, self.lookahead)
        self.feed.release(step)
        return StepNegatives({name: state.version for name, state in self.states.items()}, checks, alive)

    def before_checkpoint(self) -> Callable[[Path], None] | None:
        """Every rank, at a checkpoint step: sync the records; returns what rank 0 adds to the checkpoint."""
        if not self.states:
            return None
        for state in self.states.values():
            state.sync()
        return lambda tag_dir: save_states(tag_dir / STATE_FILENAME, self.states)

    def close(self) -> None:
        if self.feed is not None:
            self.feed.close()

    def _adopt(self, announcement: Announcement, step: int, lookahead: int) -> None:
        """Every rank at the same step: train with the announced store version from the next plan on."""
        self.feed.pin(announcement, step, lookahead)
        for name in announcement.tasks:
            self.states[name].sync()
            if self.states[name].adopt_version(announcement.version, announcement.model_step):
                logger.info("rank %d: %s adopts negatives v%06d (export step %s) at step %d", self.rank, name,
                            announcement.version, announcement.model_step, step)


def broadcast_from_rank0(value: Any, group=None) -> Any:
    """Rank 0's `value` on every rank (e.g. the newest store version it found, so that all ranks adopt
    the same one at the same step). Without torch.distributed: `value` itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0 if group is None else dist.get_global_rank(group, 0), group=group)
    return box[0]

@dataclass(frozen=True)
class Announcement:
    """Rank 0's decision, broadcast to every rank: use store `version` from now on for `tasks`."""

    version: int
    model_step: int | None  # the training step of the export that mined it
    tasks: tuple[str, ...]  # the data sets whose queries and corpus it was mined for


class VersionFeed:
    """New versions of RUN/negatives for the trainer, without ever blocking a step, and the sidecar's health.

    Rank 0 lists the store at most every `poll_seconds` (one directory listing); a version newer
    than any it looked at before is opened and its checksums verified in a background thread (a large
    version takes a while to hash), and `take()` returns its Announcement once that is done, for the
    trainer to broadcast (broadcast_from_rank0) and adopt on every rank at the same step. A damaged
    version is skipped with a warning: training goes on with the version in use.

    Every rank keeps the versions its plans may name open (`pin`): an open version is locked against
    the store's gc, and DataLoader workers open it again by number, so it must still exist. The previous
    version is released once no plan in flight can name it (`lookahead` steps after an adoption).

    The sidecar's health comes from files only: it looks dead once an export newer than the newest
    version's model step has waited `sidecar_timeout_s` for a version (rank 0 warns once; and says so
    once more when a version arrives after that).
    """

    def __init__(self, run_dir: str | os.PathLike, fingerprints: dict[str, tuple[str, str]],
                 sidecar_timeout_s: float, poll_seconds: float = 1.0):
        self.run_dir, self.store = Path(run_dir), NegativeStore(run_dir)
        self.fingerprints = fingerprints  # data set -> the (queries, corpus) fingerprints it needs
        self.sidecar_timeout_s, self.poll_seconds = sidecar_timeout_s, poll_seconds
        self._pins: dict[int, NegativeVersion] = {}
        self._release_after: dict[int, int] = {}  # pinned version -> step after which no plan names it
        # rank 0 only (first, take)
        self._considered = 0  # the newest version looked at
        self._worker: threading.Thread | None = None
        self._found: tuple[Announcement, NegativeVersion] | None = None
        self._last_poll = -math.inf
        self._mined_step: int | None = None  # model step of the newest version seen
        self._waiting_since: float | None = None  # when an export newer than _mined_step was first seen
        self.sidecar_dead = False

    def first(self, restored: int | None) -> Announcement | None:
        """Rank 0, before step 1: the version to train with. The checkpoint's (`restored`) while it is
        there and sound, else the newest sound one mined for these data sets; None without one."""
        versions = self.store.versions()
        order = ([restored] if restored in versions else []) + [v for v in reversed(versions) if v != restored]
        if restored is not None and restored not in versions:
            logger.warning("negatives v%06d of the checkpoint is gone from %s; using the newest sound version",
                           restored, self.store.root)
        self._considered = max(versions, default=0)
        for version in order:
            found = self._examine(version)
            if found is not None:
                announcement, opened = found
                self._pins[version] = opened
                # Newer versions than the checkpoint's are picked up by the first polls.
                self._considered, self._mined_step = version, announcement.model_step
                return announcement
        return None

    def take(self) -> Announcement | None:
        """Rank 0, every step: a newer verified version, or None (never waits for one)."""
        self._poll()
        if self._worker is None or self._worker.is_alive():
            return None
        self._worker, found, self._found = None, self._found, None
        if found is None:
            return None
        announcement, opened = found
        self._pins[announcement.version] = opened
        return announcement

    def pin(self, announcement: Announcement, step: int, lookahead: int) -> None:
        """Every rank, at the adoption after step `step`: hold the new version (rank 0 already does)
        and release the others once the plans made before this step are trained."""
        version = announcement.version
        if version not in self._pins:
            self._pins[version] = self.store.open(version, verify=False)  # rank 0 verified the checksums
        for old in self._pins:
            if old != version:
                self._release_after.setdefault(old, step + lookahead)

    def release(self, step: int) -> None:
        """After training step `step`: close versions that no plan can name any more."""
        for version, after in list(self._release_after.items()):
            if step > after:
                self._pins.pop(version).close()
                del self._release_after[version]

    def close(self) -> None:
        if self._worker is not None:
            self._worker.join()
            if self._found is not None:
                self._found[1].close()
        for opened in self._pins.values():
            opened.close()
        self._pins.clear()

    def _poll(self) -> None:
        now = time.monotonic()
        if now - self._last_poll < self.poll_seconds:
            return
        self._last_poll = now
        newest = self.store.latest_version()
        if newest is not None and newest > self._considered:
            self._waiting_since = None  # the sidecar published: it is alive
            if self.sidecar_dead:
                self.sidecar_dead = False
                logger.warning("the mining sidecar is back: negatives v%06d appeared", newest)
            if self._worker is None:
                self._considered = newest
                self._worker = threading.Thread(target=self._examine_in_background, args=(newest,),
                                                name="negatives-verify", daemon=True)
                self._worker.start()
        self._watch_sidecar(now)

    def _examine_in_background(self, version: int) -> None:
        self._found = self._examine(version)
        if self._found is not None:
            self._mined_step = self._found[0].model_step

    def _examine(self, version: int) -> tuple[Announcement, NegativeVersion] | None:
        """Open and verify a version; None (with a warning) when it is damaged or mined for other data."""
        try:
            opened = self.store.open(version, verify=True)
        except NegativeStoreError as error:
            logger.warning("skipping negatives v%06d, training goes on with the version in use: %s", version, error)
            return None
        manifest = opened.record
        mined_for = (manifest.queries_fingerprint, manifest.corpus_fingerprint)
        tasks = tuple(name for name, fingerprints in self.fingerprints.items() if fingerprints == mined_for)
        if not tasks:
            opened.close()
            logger.warning("skipping negatives v%06d: mined for other queries or another corpus than the data "
                           "sets %s", version, sorted(self.fingerprints))
            return None
        return Announcement(version, manifest.model_step, tasks), opened

    def _watch_sidecar(self, now: float) -> None:
        if self._worker is not None:  # a new version is being verified: the sidecar is alive
            return
        export = latest_export(self.run_dir)
        if export is None or self._mined_step is None or export.step <= self._mined_step:
            self._waiting_since = None
            return
        if self._waiting_since is None:
            self._waiting_since = now
        elif not self.sidecar_dead and now - self._waiting_since > self.sidecar_timeout_s:
            self.sidecar_dead = True
            logger.warning("the mining sidecar looks dead: export step %d has waited %.0f s for its negatives "
                           "(negatives.sidecar_timeout_s); training goes on with the version in use",
                           export.step, now - self._waiting_since)


