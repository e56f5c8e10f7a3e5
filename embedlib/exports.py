"""Model exports in a run directory: the contract between the trainer and the mining sidecar.

    RUN/exports/step_00000100/   an encoder directory (embedlib.encoder.Encoder.save) plus
                                 export.json = {"step": 100, "created_at": ...}
    RUN/exports/step_00000100/ema/   with the trainer's train.ema (ema_export beside): the moving
                                 average of the weights, a second encoder directory, no export.json

An export becomes visible only by an atomic rename of a fully written temporary directory
(`RUN/exports/.tmp-*`), so any directory named `step_*` that holds export.json is complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from embedlib.atomic import atomic_write_json, publish_dir
from embedlib.rundir import EXPORTS, TMP_PREFIX, TRASH_PREFIX, discard_dir, remove_debris, utc_now

MARKER = "export.json"
# Inside an export: the average of the weights beside them (training/ema.py), published with the export.
EMA_DIR = "ema"
_NAME = re.compile(r"^step_(\d{8})$")


@dataclass(frozen=True)
class ExportInfo:
    step: int
    path: Path


def exports_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / EXPORTS


def export_path(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the export of `step` is (or will be) published."""
    return exports_root(run_dir) / f"step_{step:08d}"


def list_exports(run_dir: str | os.PathLike) -> list[ExportInfo]:
    """Complete exports, oldest first."""
    root = exports_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME.match(entry.name)
        if match and (entry / MARKER).is_file():
            found.append(ExportInfo(step=int(match.group(1)), path=entry))
    return sorted(found, key=lambda e: e.step)


def latest_export(run_dir: str | os.PathLike) -> ExportInfo | None:
    exports = list_exports(run_dir)
    return exports[-1] if exports else None


def publish_export(
    run_dir: str | os.PathLike, step: int, write: Callable[[Path], None], extra: dict | None = None
) -> ExportInfo:
    """Call `write(tmp_dir)` to fill a private directory, then publish it as the export of `step`.

    Republishing a step that already exists replaces nothing and returns the existing export.
    """
    root = exports_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = export_path(run_dir, step)
    if (final / MARKER).is_file():
        return ExportInfo(step=step, path=final)
    tmp = root / f"{TMP_PREFIX}step_{step:08d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        marker = {"step": step, "created_at": utc_now()}
        marker.update(extra or {})
        atomic_write_json(tmp / MARKER, marker)
        publish_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportInfo(step=step, path=final)


def read_export_marker(export_dir: str | os.PathLike) -> dict:
    with open(Path(export_dir) / MARKER, encoding="utf-8") as f:
        return json.load(f)


def gc_exports(run_dir: str | os.PathLike, keep: int, protect: set[int] = frozenset()) -> list[int]:
    """Delete all but the newest `keep` exports (and any step in `protect`); return removed steps.

    Also removes what a killed writer or deleter left behind (`.tmp-*`, `.trash-*`). Only the
    trainer's rank 0 writes exports, and it calls this between its own writes, so no live writer's
    temporary directory can be removed.
    """
    root = exports_root(run_dir)
    removed = []
    exports = list_exports(run_dir)
    for export in exports[: max(0, len(exports) - keep)]:
        if export.step in protect:
            continue
        discard_dir(export.path)  # a concurrent reader never sees a half-deleted export as complete
        removed.append(export.step)
    remove_debris(root, (TMP_PREFIX, TRASH_PREFIX))
    return removed
