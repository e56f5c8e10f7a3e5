"""The sidecar: re-mine negatives with each new model export while the trainer runs.

It polls RUN/exports (embedlib.exports) and, when a complete export newer than the one the store's
latest version was mined with appears, mines with it and publishes the next version, whose manifest
records the export's step. That manifest is the sidecar's only state, so a sidecar killed at any
moment and restarted goes on where it stopped: it removes the temporary files a killed pass left
(cache files, store directories) and mines the newest export again if its version was not published.

The trainer never waits for it: the sidecar only reads exports, and the trainer picks up new versions
when it likes. With `every` = n it mines once n new exports have appeared since its last version
(always the newest of them). It stops on SIGTERM or SIGINT, and with stop_when_finished once the
trainer's RUN/run.json says the run ended ("completed" or "failed"; a "preempted" run will resume).

Refreshes that cost what changed: with full_every = n > 1, a full pass (every passage encoded) is
followed by n - 1 partial ones, which encode only the passages that can matter for the next version:
the union of the current version's candidate lists (their first partial_depth candidates), the
training positives, and a random partial_sample fraction of the rest of the corpus; they search the
whole corpus, the other passages with the embeddings of the last full pass, which the embedding cache
holds (mining/job.py; when it no longer does, the pass is full). Each refreshes.jsonl record says
which kind it was (`refresh`), how many passages it encoded (`encoded_passages`) and searched, and, on
the full passes of this mode, `partial_recall`: the share of the full pass's top-k that a partial pass
with the same model would have found.

Disk stays bounded: after each pass it removes all but the newest keep_versions versions of the store
(never the newest, never one a live reader holds open: the trainer holds the versions it trains with;
the pass's refreshes.jsonl record lists the removed ones, removed_versions), all but the keep_cache_models newest model entries
of the embedding cache, and the least recently used cache entries beyond the run's cache_max_gb
(spec.json). Its inputs (spec.json, the corpus and pairs it names, the cache directory) are
checked at start, so that a bad one ends it at once rather than at the first export.
"""
from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from embedlib.embedding_cache import clean_temporary_files, gc_cache
from embedlib.exports import ExportInfo, list_exports
from embedlib.negstore import NegativeStore
from embedlib.rundir import read_status
from mining.distributed import LocalComm
from mining.options import option
from mining.spec import MiningError, cache_root, check_ranges, load_spec

log = logging.getLogger("mining.sidecar")


class _Stop(BaseException):
    """Raised by the signal handler to end the loop, also mid-pass (a BaseException, like KeyboardInterrupt,
    so that no `except Exception` on the way swallows it)."""


@dataclass
class SidecarConfig:
    """The sidecar's settings: its command-line options (made from these fields by mining/options.py).
    Each field's help is its one description; range checks are made here, in __post_init__."""

    run_dir: Path = option("the run directory: RUN/mining/spec.json (written by `mine`) says what to mine")
    poll_seconds: float = option("seconds between two looks at RUN/exports", 10.0)
    every: int = option("mine once this many new exports appeared", 1)
    stop_when_finished: bool = option(
        'stop once the trainer\'s RUN/run.json status is "completed" or "failed"', False)
    keep_cache_models: int = option("model entries kept in the embedding cache after each pass", 2,
                                    flag="--keep-cache")
    keep_versions: int = option(
        "negative-store versions kept after each pass: older ones are removed, except those a live reader "
        "(the trainer) holds open", 3)
    full_every: int = option(
        "every pass re-encodes the whole corpus (1), or every this-many-th pass does and the others are partial: "
        "they encode only the current version's candidates, the positives and a random sample, and search them "
        "with the last full pass's embeddings of the rest", 1)
    partial_depth: int | None = option(
        "candidates of each query's current list that a partial pass re-encodes (default: all k)", None)
    partial_sample: float = option("fraction of the other corpus rows a partial pass draws at random", 0.05)
    show_progress: bool = option("progress bars on stderr", True, cli=False)

    def __post_init__(self):
        self.run_dir = Path(self.run_dir)
        check_ranges([
            ("poll_seconds", self.poll_seconds > 0, f"must be > 0, got {self.poll_seconds}"),
            ("every", self.every >= 1, f"must be >= 1, got {self.every}"),
            ("keep_cache_models", self.keep_cache_models >= 1, f"must be >= 1, got {self.keep_cache_models}"),
            ("keep_versions", self.keep_versions >= 1, f"must be >= 1, got {self.keep_versions}"),
            ("full_every", self.full_every >= 1, f"must be >= 1, got {self.full_every}"),
            ("partial_depth", self.partial_depth is None or self.partial_depth >= 1,
             f"must be >= 1, got {self.partial_depth}"),
            ("partial_sample", 0 <= self.partial_sample <= 1, f"must be in [0, 1], got {self.partial_sample}"),
        ])

    @property
    def refresh(self):
        from mining.job import RefreshPlan  # torch: not imported by `python -m mining sidecar --help`

        return RefreshPlan(self.full_every, self.partial_depth, self.partial_sample)


def run_finished(run_dir: Path) -> bool:
    status = read_status(run_dir)
    return status is not None and status.final


def last_mined_step(store: NegativeStore) -> int:
    """The model step of the newest version (-1 when none): exports at or before it are done."""
    latest = store.open_latest(verify=False)
    if latest is None:
        return -1
    with latest:
        return latest.record.model_step


def choose_export(exports: list[ExportInfo], done: int, seen: set[int], every: int
                  ) -> tuple[ExportInfo | None, set[int]]:
    """The export to mine now (the newest, once `every` exports newer than step `done` have been seen,
    counting those the trainer has already deleted), and the updated set of seen steps."""
    newer = [e for e in exports if e.step > done]
    seen = {s for s in seen if s > done} | {e.step for e in newer}
    return (newer[-1] if newer and len(seen) >= every else None), seen


def run_sidecar(config: SidecarConfig) -> int:
    """Loop until stopped; returns the number of versions published."""
    from mining.job import check_inputs, mine  # torch: not imported by `python -m mining sidecar --help`

    run_dir = config.run_dir
    spec = load_spec(run_dir)
    check_inputs(spec, run_dir)  # bad inputs end the sidecar now, not at the first export, hours later
    store = NegativeStore(run_dir)
    cache = cache_root(spec, run_dir)
    for path in clean_temporary_files(cache):
        log.info("removed a killed writer's temporary file %s", path)
    for name in store.cleanup_tmp():
        log.info("removed a killed writer's temporary directory %s", name)

    stop_signals: list[str] = []

    def stop(signum, _frame):
        # Raised to end a pass midway; also remembered, because an exception raised while a finalizer
        # (__del__, a weakref callback) runs is printed and dropped by Python, and the loop must still end.
        stop_signals.append(signal.Signals(signum).name)
        raise _Stop(stop_signals[-1])

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    published = 0
    seen: set[int] = set()  # steps of exports newer than the last mined one, seen while polling
    try:
        log.info("sidecar watching %s/exports (every %d export(s), poll %.1f s)", run_dir, config.every,
                 config.poll_seconds)
        while True:
            if stop_signals:
                raise _Stop(stop_signals[0])
            if config.stop_when_finished and run_finished(run_dir):
                log.info("the run is finished; sidecar stops")
                break
            export, seen = choose_export(list_exports(run_dir), last_mined_step(store), seen, config.every)
            if export is not None:
                log.info("mining with the export of step %d", export.step)
                try:
                    mine(spec, export.path, run_dir, LocalComm(), model_step=export.step, mode="sidecar",
                         show_progress=config.show_progress, keep_versions=config.keep_versions,
                         refresh=config.refresh)
                except MiningError:
                    if export.path.exists():
                        raise
                    log.warning("export step %d was removed while it was being mined; skipping it", export.step)
                    continue
                published += 1
                seen.clear()
                gc_cache(cache, config.keep_cache_models)
                continue  # another export may have arrived meanwhile
            time.sleep(config.poll_seconds)
    except _Stop as signal_name:
        log.info("sidecar stopped by %s", signal_name)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return published
