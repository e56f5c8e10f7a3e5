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
"""
from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from embedlib.exports import ExportInfo, list_exports
from embedlib.negstore import NegativeStore
from mining.distributed import LocalComm
from mining.embeddings import clean_temporary_files, gc_cache
from mining.job import mine
from mining.spec import MiningError, cache_root, load_spec

log = logging.getLogger("mining.sidecar")

RUN_STATUS = "run.json"


class _Stop(BaseException):
    """Raised by the signal handler to end the loop, also mid-pass (a BaseException, like KeyboardInterrupt,
    so that no `except Exception` on the way swallows it)."""


@dataclass
class SidecarConfig:
    run_dir: Path
    poll_seconds: float = 10.0
    every: int = 1
    stop_when_finished: bool = False
    keep_cache_models: int = 2  # embedding cache entries (one per model) kept after each refresh
    show_progress: bool = True


# The trainer's run.json statuses (training/main.py) after which no more exports will come.
FINAL_RUN_STATUSES = ("completed", "failed")


def run_finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / RUN_STATUS).read_text(encoding="utf-8")).get("status") in FINAL_RUN_STATUSES
    except (OSError, ValueError, AttributeError):
        return False


def last_mined_step(store: NegativeStore) -> int:
    """The model step of the newest version (-1 when none): exports at or before it are done."""
    latest = store.open_latest(verify=False)
    if latest is None:
        return -1
    with latest:
        return int(latest.manifest["model_step"])


def choose_export(exports: list[ExportInfo], done: int, seen: set[int], every: int
                  ) -> tuple[ExportInfo | None, set[int]]:
    """The export to mine now (the newest, once `every` exports newer than step `done` have been seen,
    counting those the trainer has already deleted), and the updated set of seen steps."""
    newer = [e for e in exports if e.step > done]
    seen = {s for s in seen if s > done} | {e.step for e in newer}
    return (newer[-1] if newer and len(seen) >= every else None), seen


def run_sidecar(config: SidecarConfig) -> int:
    """Loop until stopped; returns the number of versions published."""
    run_dir = Path(config.run_dir)
    spec = load_spec(run_dir)
    store = NegativeStore(run_dir)
    cache = cache_root(spec, run_dir)
    for path in clean_temporary_files(cache):
        log.info("removed a killed writer's temporary file %s", path)
    for name in store.cleanup_tmp():
        log.info("removed a killed writer's temporary directory %s", name)

    def stop(signum, _frame):
        raise _Stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    published = 0
    seen: set[int] = set()  # steps of exports newer than the last mined one, seen while polling
    try:
        log.info("sidecar watching %s/exports (every %d export(s), poll %.1f s)", run_dir, config.every,
                 config.poll_seconds)
        while True:
            if config.stop_when_finished and run_finished(run_dir):
                log.info("the run is finished; sidecar stops")
                break
            export, seen = choose_export(list_exports(run_dir), last_mined_step(store), seen, config.every)
            if export is not None:
                try:
                    mine(spec, export.path, run_dir, LocalComm(), model_step=export.step, mode="sidecar",
                         show_progress=config.show_progress)
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
