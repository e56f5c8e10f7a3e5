"""Crash-safe file publication: write somewhere private, fsync, then rename into place.

A rename within one file system is atomic, so a reader sees either the old file (or directory)
or the complete new one, never a partial write, whenever the writer is killed. And the one
cross-process lock of the data caches (file_lock).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory below `root`, deepest first.

    Entries that vanish meanwhile are skipped: another process (a checkpoint's other ranks) may be
    renaming its temporary files into place in the same tree, and each process fsyncs its own."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        try:
            fsync_dir(dirpath)
        except FileNotFoundError:
            continue


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def publish_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Atomically move a fully written directory to its final name.

    Fails (FileExistsError or OSError) rather than replacing an existing non-empty directory, so two
    publishers racing for one name cannot silently overwrite each other.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    fsync_tree(tmp_dir)
    if final_dir.exists():
        raise FileExistsError(f"{final_dir} already exists")
    os.rename(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, wait: bool = True, on_wait: Callable[[], None] | None = None
              ) -> Iterator[bool]:
    """An exclusive POSIX record lock on `path` (created when missing) for the body of the with block.

    fcntl.lockf, because NFS and Lustre honour it across machines; the kernel drops it when its holder
    dies, so a killed holder never blocks anyone. Yields True once held. When another process holds it:
    with wait=False yields False at once (the body must then not touch what the lock guards), else
    calls on_wait and blocks until it is free. One open descriptor per lock and process: closing any
    descriptor of a file releases all of the process's locks on it."""
    with open(path, "a+b") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if not wait:
                yield False
                return
            if on_wait is not None:
                on_wait()
            fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)
