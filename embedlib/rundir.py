"""The run directory: the one channel between the entrypoints, and the small rules every writer follows.

    RUN/run.json          the trainer's record; its `status` is a RunStatus
    RUN/config.yaml       the trainer's resolved configuration
    RUN/metrics.jsonl     one JSON object per optimizer step
    RUN/eval.jsonl        one JSON object per evaluation of an export during training
    RUN/checkpoints/      the trainer's checkpoints (training/checkpoint.py)
    RUN/exports/          model exports (embedlib/exports.py)
    RUN/negatives/        the negative store (embedlib/negstore.py)
    RUN/mining/           spec.json, refreshes.jsonl and the embedding cache (mining/)
    RUN/logs/             what the processes of a run print, for scripts that start them
    RUN/tensorboard/      TensorBoard events, when tensorboard is installed

docs/ARCHITECTURE.md says who writes and who reads each of them. Here: their names, the trainer's
statuses, how a directory is removed so that no reader ever sees it half deleted, and the one
timestamp format of every record.
"""
from __future__ import annotations

import enum
import json
import os
import shutil
import time
import uuid
from pathlib import Path

RUN_JSON = "run.json"
CONFIG_YAML = "config.yaml"
METRICS_JSONL = "metrics.jsonl"
EVAL_JSONL = "eval.jsonl"
CHECKPOINTS = "checkpoints"
EXPORTS = "exports"
NEGATIVES = "negatives"
MINING = "mining"
LOGS = "logs"
TENSORBOARD = "tensorboard"
DATA_CACHE = "data_cache"  # the data files as memory-mapped Arrow (embedlib/record_cache.py), train.data_cache "auto"

# Prefixes of the hidden entries a writer or a remover leaves while it works; a process killed midway
# leaves them behind, and the owner of the directory removes them later.
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


class RunStatus(str, enum.Enum):
    """run.json's `status`, written by the trainer's rank 0."""

    RUNNING = "running"
    COMPLETED = "completed"
    PREEMPTED = "preempted"  # stopped by SIGTERM/SIGUSR1 after a checkpoint: a --resume continues it
    FAILED = "failed"

    @property
    def final(self) -> bool:
        """No more exports will come (a preempted run resumes)."""
        return self in (RunStatus.COMPLETED, RunStatus.FAILED)


def read_status(run_dir: str | os.PathLike) -> RunStatus | None:
    """The trainer's status in run.json; None while there is none, or it cannot be read."""
    try:
        status = json.loads((Path(run_dir) / RUN_JSON).read_text(encoding="utf-8")).get("status")
        return RunStatus(status)
    except (OSError, ValueError, AttributeError):
        return None


def utc_now() -> str:
    """The timestamp of every record in a run directory: ISO 8601, UTC, seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def discard_dir(path: str | os.PathLike) -> None:
    """Remove a directory so that nobody sees it half deleted: rename it to a `.trash-*` sibling (atomic),
    make the rename durable, then delete. A kill after the rename leaves only trash, which
    `remove_debris` clears."""
    from embedlib.atomic import fsync_dir

    path = Path(path)
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def remove_debris(root: str | os.PathLike, prefixes: tuple[str, ...] = (TRASH_PREFIX,)) -> list[str]:
    """Delete the entries of `root` whose names start with one of `prefixes`; return their names.
    Only the directory's owner calls it, at a moment when none of its own writers is live."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(prefixes):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed
