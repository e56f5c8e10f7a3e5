"""The embedding cache: corpus embeddings computed once per model and shared by every consumer.

    ROOT/<model fingerprint>/<corpus fingerprint>-len<max_length>-<dtype>/rows_<start>_<end>.npy

One entry is one (model, corpus, max length, compute dtype): float16 row blocks that later jobs
memory-map. `python -m mining mine`, the mining sidecar, `embedlib.evaluation` (library and command)
and the trainer's periodic evaluation read and write the same entries, so a corpus is encoded by a
model once: the quickstart's base evaluation reuses the mining pass, and an evaluation of an export the
sidecar has mined with reuses the sidecar's pass. The default root of a run is RUN/mining/cache
(`run_cache_dir`).

The corpus is cut into blocks of `block_rows` rows whatever the number of ranks; a rank encodes and
caches whole blocks (a contiguous range of them). Each block is one Encoder.encode call, so its
batches, and with them the embeddings, are the same under 1 or N ranks and for every consumer; a
consumer that does not choose a block size (evaluation) takes the one the entry's files already use.
Every consumer works with the float16 values as a later job reads them, so a cold and a warm run give
the same figures. Consumers of one entry at the same time (the sidecar and the trainer's evaluation of
the same export) share the work: a block is encoded by whoever first takes its lock, and the others read
it once it is saved (encode_blocks). Files are written atomically (embedlib.atomic): a killed job leaves a complete file
or none (plus a temporary file that clean_temporary_files removes).

Verified at every read: a block file is a .npy followed by a trailer, a blake2b digest of its rows
(start, end) and its array bytes. A block whose bytes were overwritten (disk damage, another block's
file copied over it, an empty or truncated file) fails the check, is removed with a warning that names
it, and is encoded again, so a damaged cache costs time, never a different figure or negative. Hashing
costs a small fraction of encoding (bench/bench_embedding_cache.py; docs/RESULTS.md).

Bounded: `prune_cache` removes whole entries, least recently used first (each use touches its entry),
until the cache holds at most a given number of bytes; the entries in use are never removed, and a
reader that loses an entry to another process's pruning encodes its blocks again. `gc_cache` keeps
the entries of the newest few models instead (the sidecar's --keep-cache).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedlib.atomic import atomic_write_bytes, file_lock
from embedlib.progress import progress_task
from embedlib.rundir import MINING, TRASH_PREFIX, discard_dir

log = logging.getLogger(__name__)

DEFAULT_BLOCK_ROWS = 4096
DEFAULT_MAX_GB = 20.0  # the default bound of a run's cache (mining spec, evaluation, trainer)
_TMP_FILE = re.compile(r"^\..*\.tmp-(\d+)-[0-9a-f]{8}$")  # atomic_write_bytes' temporary names
_BLOCK_FILE = re.compile(r"^rows_(\d{10})_(\d{10})\.npy$")
# After a checked file's .npy bytes (which np.load reads as they are, ignoring what follows): this magic
# and a 32-byte blake2b digest of what the file is (a block's rows) and its array bytes.
TRAILER_MAGIC = b"EMBSUM01"
TRAILER_BYTES = len(TRAILER_MAGIC) + 32


def run_cache_dir(run_dir: str | os.PathLike) -> Path:
    """The embedding cache of a run directory: RUN/mining/cache."""
    return Path(run_dir) / MINING / "cache"


@dataclass(frozen=True)
class RunCacheSettings:
    """How a run's miner encodes and caches, read from RUN/mining/spec.json (defaults without one)."""

    cache_dir: Path
    max_gb: float | None
    encode_dtype: str  # "auto", "float32" or "bfloat16"


def run_cache_settings(run_dir: str | os.PathLike) -> RunCacheSettings:
    """The run's embedding cache, its bound and the miner's encode dtype, so that other consumers of the
    run (the trainer's evaluation, the quickstart's) key and bound their entries as the miner does. Only
    these three fields of spec.json are read (mining owns the file); an unreadable one gives the defaults."""
    import json

    spec = {}
    try:
        spec = json.loads((Path(run_dir) / MINING / "spec.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    if not isinstance(spec, dict):
        spec = {}
    cache_dir = spec.get("cache_dir")
    max_gb = spec.get("cache_max_gb", DEFAULT_MAX_GB)  # null in the spec: unbounded
    if max_gb is not None and not (isinstance(max_gb, (int, float)) and max_gb >= 0):
        max_gb = DEFAULT_MAX_GB
    dtype = spec.get("encode_dtype", "auto")
    return RunCacheSettings(
        cache_dir=Path(cache_dir) if isinstance(cache_dir, str) and cache_dir else run_cache_dir(run_dir),
        max_gb=None if max_gb is None else float(max_gb),
        encode_dtype=dtype if dtype in ("auto", "float32", "bfloat16") else "auto")


def gigabytes(value: float | None) -> int | None:
    """A size bound given in GB (1e9 bytes) as bytes; None stays None (unbounded)."""
    return None if value is None else int(value * 1e9)


def block_ranges(num_rows: int, block_rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + block_rows, num_rows)) for s in range(0, num_rows, block_rows)]


def shard_of(blocks: list[tuple[int, int]], rank: int, world_size: int) -> list[tuple[int, int]]:
    """The contiguous run of blocks rank `rank` owns (possibly none when there are more ranks than blocks)."""
    n = len(blocks)
    return blocks[rank * n // world_size : (rank + 1) * n // world_size]


def dtype_name(dtype, device_type: str) -> str:
    """The cache key's name of a compute dtype as Encoder.encode resolves it (None: bfloat16 on CUDA,
    float32 elsewhere)."""
    if dtype is None:
        return "bfloat16" if device_type == "cuda" else "float32"
    return str(dtype).removeprefix("torch.")


class EmbeddingCache:
    """One entry: the float16 row blocks of one (model, corpus, max length, dtype)."""

    def __init__(self, root: str | os.PathLike, model_fingerprint: str, corpus_fingerprint: str,
                 max_length: int, dtype_name: str):
        self.root = Path(root)
        self.model_dir = self.root / model_fingerprint[:24]
        self.dir = self.model_dir / f"{corpus_fingerprint[:24]}-len{max_length}-{dtype_name}"

    def path(self, start: int, end: int) -> Path:
        return self.dir / f"rows_{start:010d}_{end:010d}.npy"

    def existing_block_rows(self) -> int | None:
        """The block size of the files already in this entry (that of its first block), or None."""
        if not self.dir.is_dir():
            return None
        for name in sorted(os.listdir(self.dir)):
            match = _BLOCK_FILE.match(name)
            if match and int(match.group(1)) == 0:
                return int(match.group(2))
        return None

    def load(self, start: int, end: int, dim: int) -> np.ndarray | None:
        """The cached block as a read-only memory map, or None: absent, or damaged (then it is removed, with a
        warning naming it, and the caller encodes it again)."""
        path = self.path(start, end)
        if not path.is_file():
            return None
        try:
            return load_checked_npy(path, f"rows {start}:{end}", np.float16, (end - start, dim))
        except (OSError, DamagedFile) as e:
            if not path.exists():  # pruned by another process meanwhile: a miss, not damage
                return None
            log.warning("discarding damaged cache file %s (%s): encoding its rows again", path, e)
        path.unlink(missing_ok=True)
        return None

    def save(self, start: int, end: int, block: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path(start, end),
                           checked_npy_bytes(block.astype(np.float16, copy=False), f"rows {start}:{end}"))

    def block_lock(self, start: int, end: int, *, wait: bool = True):
        """The lock a process holds while it encodes this block (embedlib.atomic.file_lock): whoever holds it
        saves the block before releasing it, unless it dies."""
        self.dir.mkdir(parents=True, exist_ok=True)
        return file_lock(self.dir / f".rows_{start:010d}_{end:010d}.lock", wait=wait)

    def touch(self) -> None:
        """Mark this entry (and its model) as recently used: prune_cache and gc_cache keep the newest."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except FileNotFoundError:  # another process removed the empty model directory this instant
            self.dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for path in (self.dir, self.model_dir):
            try:
                os.utime(path, (now, now))
            except FileNotFoundError:  # pruned by another process this instant; the next save recreates it
                pass


class DamagedFile(ValueError):
    """A checked array file that cannot be trusted; the message says why."""


def checked_npy_bytes(array: np.ndarray, key: str) -> bytes:
    """The .npy bytes of `array` followed by the trailer that binds them to `key` (what the file is: a
    block's rows, a corpus fingerprint), so that a file copied to another key's name fails the check."""
    array = np.ascontiguousarray(array)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    buffer.write(TRAILER_MAGIC + _digest(key, array))
    return buffer.getvalue()


def load_checked_npy(path: str | os.PathLike, key: str, dtype=None, shape: tuple | None = None) -> np.ndarray:
    """The array of a file written from checked_npy_bytes(..., key), memory-mapped read-only, after its
    dtype, shape and digest were checked. Raises DamagedFile (or OSError: it cannot be read)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError) as e:  # EOFError: an empty file
        raise DamagedFile(str(e) or "empty file") from None
    if dtype is not None and array.dtype != dtype:
        raise DamagedFile(f"dtype {array.dtype}, expected {np.dtype(dtype)}")
    if shape is not None and array.shape != tuple(shape):
        raise DamagedFile(f"shape {list(array.shape)}, expected {list(shape)}")
    with open(path, "rb") as f:
        f.seek(array.offset + array.nbytes)
        trailer = f.read(TRAILER_BYTES + 1)
    if len(trailer) != TRAILER_BYTES or not trailer.startswith(TRAILER_MAGIC):
        raise DamagedFile("no checksum trailer (truncated, or not written by this cache)")
    if trailer[len(TRAILER_MAGIC):] != _digest(key, array):
        raise DamagedFile("checksum mismatch: its values are not the ones written for it")
    return array


def _digest(key: str, array: np.ndarray) -> bytes:
    digest = hashlib.blake2b(f"embedlib.checked.v1:{key}:".encode(), digest_size=32)
    digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.digest()


@dataclass
class CorpusEncoding:
    """What encode_blocks did: blocks served from the cache, rows encoded, and the encoder's figures."""

    blocks: list[np.ndarray]
    hits: int  # blocks read from the cache
    encoded_rows: int  # rows encoded now (those of the missed blocks)
    stats: object  # embedlib.encoder.EncodeStats of the rows encoded now


def encode_blocks(encoder, passages: list[str], blocks: list[tuple[int, int]], cache: EmbeddingCache, *,
                  batch_size: int, max_length: int, device, dtype, show_progress: bool,
                  description: str = "encode corpus") -> CorpusEncoding:
    """float16 embeddings of each block (memory-mapped from the cache, encoding the missing blocks).
    A block just encoded is saved and read back, so that its values are exactly what a later job reads.

    Consumers of one entry that run at the same time (the sidecar and an evaluation of the same export)
    share the work: a block is encoded under its lock (EmbeddingCache.block_lock), a block another process
    is encoding is passed over and read once that process has saved it, so each block is encoded once.
    A block whose encoder died or was stopped before saving it is encoded here."""
    from embedlib.encoder import EncodeStats

    dim = encoder.embedding_dim
    out: list[np.ndarray | None] = [None] * len(blocks)
    hits, encoded = 0, 0
    stats = EncodeStats()
    cache.touch()

    def encode(start: int, end: int) -> np.ndarray:
        nonlocal encoded
        embeddings = encoder.encode(passages[start:end], batch_size=batch_size, max_length=max_length,
                                    device=device, dtype=dtype, show_progress=False, stats=stats)
        cache.save(start, end, embeddings)
        encoded += end - start
        block = cache.load(start, end, dim)
        return embeddings.astype(np.float16) if block is None else block  # None: pruned meanwhile

    total = sum(end - start for start, end in blocks)
    with progress_task(description, total, disable=not show_progress) as advance:
        passed_over = []
        for i, (start, end) in enumerate(blocks):
            block = cache.load(start, end, dim)
            if block is None:
                with cache.block_lock(start, end, wait=False) as held:
                    if held:  # another process may have saved it between our look and the lock
                        block = cache.load(start, end, dim)
                        out[i] = encode(start, end) if block is None else block
                if not held:
                    passed_over.append(i)
                    continue
            else:
                out[i] = block
            hits += block is not None
            advance(end - start)
        for i in passed_over:  # being encoded by another process: wait for it
            start, end = blocks[i]
            with cache.block_lock(start, end):
                block = cache.load(start, end, dim)
                out[i] = encode(start, end) if block is None else block
            hits += block is not None
            advance(end - start)
    cache.touch()
    return CorpusEncoding(out, hits, encoded, stats)


def encode_corpus(encoder, passages: list[str], cache: EmbeddingCache, *, batch_size: int, max_length: int,
                  device=None, dtype=None, show_progress: bool = True,
                  block_rows: int | None = None) -> CorpusEncoding:
    """The whole corpus by blocks through the cache, with the block size of the entry's existing files
    (a miner's), else block_rows, else DEFAULT_BLOCK_ROWS."""
    rows = cache.existing_block_rows() or block_rows or DEFAULT_BLOCK_ROWS
    return encode_blocks(encoder, passages, block_ranges(len(passages), rows), cache, batch_size=batch_size,
                         max_length=max_length, device=device, dtype=dtype, show_progress=show_progress)


# ---- bounds and debris -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    size: int  # bytes of its block files
    last_used: float  # mtime of the entry directory (touched at every use)


def cache_entries(root: str | os.PathLike) -> list[CacheEntry]:
    """Every entry under `root`, most recently used first."""
    root = Path(root)
    entries = []
    if not root.is_dir():
        return entries
    for model_dir in root.iterdir():
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        for entry in model_dir.iterdir():
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            try:
                size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
                entries.append(CacheEntry(entry, size, entry.stat().st_mtime))
            except FileNotFoundError:  # removed by another process meanwhile
                continue
    return sorted(entries, key=lambda e: e.last_used, reverse=True)


def prune_cache(root: str | os.PathLike, max_bytes: int | None, keep: tuple[EmbeddingCache, ...] = ()) -> list[Path]:
    """Remove the least recently used entries until the cache holds at most `max_bytes` (None: no
    bound); the entries of `keep` (in use) stay whatever their size. Returns the removed entries."""
    if max_bytes is None:
        return []
    kept_dirs = {Path(c.dir).resolve() for c in keep}
    total, removed = 0, []
    for entry in cache_entries(root):
        if entry.path.resolve() in kept_dirs or total + entry.size <= max_bytes:
            total += entry.size
            continue
        try:
            discard_dir(entry.path)
        except FileNotFoundError:
            continue
        removed.append(entry.path)
        log.info("removed cache entry %s (%.1f MB, least recently used; bound %.2f GB)", entry.path,
                 entry.size / 1e6, max_bytes / 1e9)
    _remove_empty_model_dirs(root)
    return removed


def gc_cache(root: str | os.PathLike, keep_models: int) -> list[Path]:
    """Remove all but the `keep_models` most recently used model entries of the cache."""
    root = Path(root)
    if not root.is_dir():
        return []
    models = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    removed = models[keep_models:]
    for path in removed:
        try:
            discard_dir(path)
        except FileNotFoundError:
            pass
    _remove_empty_model_dirs(root)
    return removed


def _remove_empty_model_dirs(root: str | os.PathLike) -> None:
    """Remove model directories left empty, and what killed removers left (`.trash-*`, never written to)."""
    root = Path(root)
    if not root.is_dir():
        return
    for model_dir in root.iterdir():
        if model_dir.name.startswith(TRASH_PREFIX):
            shutil.rmtree(model_dir, ignore_errors=True)
        elif model_dir.is_dir():
            for trash in model_dir.glob(TRASH_PREFIX + "*"):
                shutil.rmtree(trash, ignore_errors=True)
            try:
                model_dir.rmdir()  # only when empty
            except OSError:
                pass


def clean_temporary_files(root: str | os.PathLike) -> list[Path]:
    """Remove temporary files that killed writers left under `root`, when their process is gone."""
    removed = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            match = _TMP_FILE.match(name)
            if match and not pid_alive(int(match.group(1))):
                path = Path(dirpath) / name
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
