"""Corpus embeddings by row block, cached as float16 .npy files that later jobs memory-map.

    CACHE/<model fingerprint>/<corpus fingerprint>-len<max_length>-<dtype>/rows_<start>_<end>.npy

The corpus is cut into blocks of `block_rows` rows whatever the number of ranks; a rank encodes and
caches whole blocks (a contiguous range of them). Each block is one Encoder.encode call, so its
batches, and with them the embeddings, are the same under 1 or N ranks, and a 2-rank job reuses the
blocks a 1-rank job cached. Files are written atomically (embedlib.atomic), so a killed job leaves a
complete file or none (plus a temporary file that clean_temporary_files removes).
"""
from __future__ import annotations

import io
import logging
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from embedlib.atomic import atomic_write_bytes
from embedlib.progress import progress_task

log = logging.getLogger(__name__)

_TMP_FILE = re.compile(r"^\..*\.tmp-(\d+)-[0-9a-f]{8}$")  # atomic_write_bytes' temporary names


def block_ranges(num_rows: int, block_rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + block_rows, num_rows)) for s in range(0, num_rows, block_rows)]


def shard_of(blocks: list[tuple[int, int]], rank: int, world_size: int) -> list[tuple[int, int]]:
    """The contiguous run of blocks rank `rank` owns (possibly none when there are more ranks than blocks)."""
    n = len(blocks)
    return blocks[rank * n // world_size : (rank + 1) * n // world_size]


class EmbeddingCache:
    def __init__(self, root: str | os.PathLike, model_fingerprint: str, corpus_fingerprint: str,
                 max_length: int, dtype_name: str):
        self.model_dir = Path(root) / model_fingerprint[:24]
        self.dir = self.model_dir / f"{corpus_fingerprint[:24]}-len{max_length}-{dtype_name}"

    def path(self, start: int, end: int) -> Path:
        return self.dir / f"rows_{start:010d}_{end:010d}.npy"

    def load(self, start: int, end: int, dim: int) -> np.ndarray | None:
        """The cached block as a read-only memory map, or None (absent, or damaged: then it is removed)."""
        path = self.path(start, end)
        if not path.is_file():
            return None
        try:
            block = np.load(path, mmap_mode="r", allow_pickle=False)
            if block.dtype == np.float16 and block.shape == (end - start, dim):
                return block
            problem = f"{block.dtype} {list(block.shape)}, expected float16 [{end - start}, {dim}]"
        except (OSError, ValueError) as e:
            problem = str(e)
        log.warning("discarding damaged cache file %s: %s", path, problem)
        path.unlink(missing_ok=True)
        return None

    def save(self, start: int, end: int, block: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(block, dtype=np.float16), allow_pickle=False)
        atomic_write_bytes(self.path(start, end), buffer.getvalue())

    def touch(self) -> None:
        """Mark this model's entry as recently used (gc_cache keeps the newest)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        os.utime(self.model_dir, (now, now))


def encode_blocks(encoder, passages: list[str], blocks: list[tuple[int, int]], cache: EmbeddingCache, *,
                  batch_size: int, max_length: int, device, dtype, show_progress: bool
                  ) -> tuple[list[np.ndarray], int]:
    """float16 embeddings of each block (memory-mapped from the cache, encoding the missing blocks);
    returns (blocks, number of cache hits)."""
    dim = encoder.embedding_dim
    out, hits = [], 0
    cache.touch()
    total = sum(end - start for start, end in blocks)
    with progress_task("encode corpus", total, disable=not show_progress) as advance:
        for start, end in blocks:
            block = cache.load(start, end, dim)
            if block is None:
                embeddings = encoder.encode(passages[start:end], batch_size=batch_size, max_length=max_length,
                                            device=device, dtype=dtype, show_progress=False)
                cache.save(start, end, embeddings)
                block = cache.load(start, end, dim)  # the float16 values, exactly as a later job reads them
            else:
                hits += 1
            out.append(block)
            advance(end - start)
    return out, hits


def clean_temporary_files(root: str | os.PathLike) -> list[Path]:
    """Remove temporary files that killed writers left under `root`, when their process is gone."""
    removed = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            match = _TMP_FILE.match(name)
            if match and not _pid_alive(int(match.group(1))):
                path = Path(dirpath) / name
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def gc_cache(root: str | os.PathLike, keep_models: int) -> list[Path]:
    """Remove all but the `keep_models` most recently used model entries of the cache."""
    root = Path(root)
    if not root.is_dir():
        return []
    entries = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    removed = entries[keep_models:]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
