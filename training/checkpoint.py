"""Training checkpoints that a kill at any moment cannot spoil.

    RUN/checkpoints/step_00000100/   DeepSpeed's save_checkpoint tag (model, optimizer, scheduler,
                                     ZeRO shards, our client state)
    RUN/checkpoints/step_00000100/dynamic_negatives.safetensors   the trainer's own files (rank 0),
                                     written before the marker
    RUN/checkpoints/step_00000100/complete.json   written by us last: the tag is usable

DeepSpeed 0.19.8 writes the tag's files in place and then rank 0 writes `latest` (plain open/write,
before the final barrier, so it can name a tag whose other ranks are still writing). Neither is
atomic, so neither is trusted: after save_checkpoint has returned on every rank and every rank has
fsynced its files, rank 0 writes complete.json atomically. Only tags holding it count; a tag without
it is the debris of a killed save and is deleted by the next save. `latest` is not written.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from embedlib.atomic import atomic_write_json, fsync_tree
from embedlib.rundir import CHECKPOINTS, TRASH_PREFIX, discard_dir, remove_debris, utc_now

MARKER = "complete.json"
_TAG = re.compile(r"^step_(\d{8})$")


def checkpoints_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, tag dir) of the complete checkpoints, oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), e) for e in root.iterdir() if (m := _TAG.match(e.name)) and (e / MARKER).is_file()]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> tuple[int, Path] | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(engine, run_dir: str | os.PathLike, step: int, client_state: dict, keep: int,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Collective: every rank calls it. Returns the tag directory, complete on return.

    write_extra(tag_dir), called on rank 0, adds the trainer's own files to the checkpoint.
    """
    root = checkpoints_root(run_dir)
    tag_dir = root / tag_of(step)
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists() and not (tag_dir / MARKER).is_file():
            discard_dir(tag_dir)  # left by a save killed at this very step
    dist.barrier()
    if (tag_dir / MARKER).is_file():  # already saved at this step (e.g. periodic save, then the end)
        return tag_dir
    engine.save_checkpoint(str(root), tag=tag_of(step), client_state=client_state, save_latest=False)
    if rank == 0 and write_extra is not None:
        write_extra(tag_dir)
    fsync_tree(tag_dir)  # every rank: its own shards reach the disk before the marker says complete
    dist.barrier()
    if rank == 0:
        atomic_write_json(tag_dir / MARKER, {"step": step, "world_size": dist.get_world_size(),
                                              "created_at": utc_now()})
        _gc(root, keep)
    dist.barrier()
    return tag_dir


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoints_root(run_dir) / tag_of(step)


def load_checkpoint(engine, run_dir: str | os.PathLike) -> tuple[int, dict] | None:
    """Load the newest complete checkpoint into `engine`: (step, client_state), or None if there is none.
    Its directory is checkpoint_dir(run_dir, step).

    The ranks must agree on which one: rank 0 decides (a save could complete while ranks list).
    """
    latest = latest_checkpoint(run_dir) if dist.get_rank() == 0 else None
    decision = [latest[0] if latest else None]
    dist.broadcast_object_list(decision, src=0)
    step = decision[0]
    if step is None:
        return None
    path, client_state = engine.load_checkpoint(str(checkpoints_root(run_dir)), tag=tag_of(step),
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoints_root(run_dir) / tag_of(step)}")
    return step, client_state


def _gc(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete tags; drop older ones and any incomplete debris."""
    complete = sorted(int(m.group(1)) for e in root.iterdir()
                      if (m := _TAG.match(e.name)) and (e / MARKER).is_file())
    kept = set(complete[-keep:])
    for entry in list(root.iterdir()):
        match = _TAG.match(entry.name)
        if match and int(match.group(1)) not in kept:
            discard_dir(entry)  # never seen half deleted with its marker still in place
    remove_debris(root, (TRASH_PREFIX,))
