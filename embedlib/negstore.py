"""The versioned store of mined hard negatives: the contract between mining and training.

    RUN/negatives/v000007/manifest.json   format_version, version, created_at, model_path,
                                          model_step, corpus_fingerprint, queries_fingerprint,
                                          num_queries, k, corpus_size, extra,
                                          files: {name: {size, sha256, dtype, shape}}
    RUN/negatives/v000007/candidates.npy  int32 [Q, K]: corpus row indices in rank order, -1 padding
    RUN/negatives/v000007/scores.npy      float32 [Q, K]: non-increasing along a row, NaN padding

Row i belongs to training query i (pairs-file order); ids are row indices into the corpus file order.
Padding fills the end of a row when fewer than K candidates survived filtering.

Publication: a writer fills `negatives/.tmp-*`, writes manifest.json last, and renames the directory
to the next free `vNNNNNN`. A rename is atomic, so every `vNNNNNN` directory is complete; a writer
killed at any moment leaves only a temporary directory, which cleanup_tmp() removes later.

Readers memory-map the .npy files (opening costs no RAM, a row is O(1)), check file sizes and shapes
against the manifest on open and the sha256 checksums once per version per NegativeStore object, and
fall back to the previous version, with a logged warning, when the newest one is damaged. Hashing
a large version takes a while: the trainer (training/negatives/runtime.VersionFeed) opens each new
version with open(version, verify=True) in a background thread, the starting one before step 1.

Locks are fcntl.flock, so the run directory must be on a file system whose locks work across the
processes (and machines) involved: local disks, NFSv4, GPFS, Lustre mounted with `-o flock` (not
`localflock`, which locks per node only).
- A writer holds an exclusive lock on `.tmp-*/writer.lock` for its whole life: cleanup_tmp() removes
  only temporary directories whose writer is dead (the kernel drops a dead process's locks).
- A reader holds a shared lock on `vNNNNNN/manifest.json` while the version is open: gc() needs an
  exclusive lock to remove a version, so it never removes one in use, and a dead reader pins nothing.
- `negatives/.lock` serialises creating, numbering, publishing and removing directories.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from embedlib.atomic import atomic_write_json, publish_dir
from embedlib.progress import progress_task
from embedlib.rundir import NEGATIVES, TMP_PREFIX, TRASH_PREFIX, discard_dir, utc_now
from embedlib.run_records import StoreManifest

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CANDIDATES = "candidates.npy"
SCORES = "scores.npy"
DATA_FILES = {CANDIDATES: np.dtype(np.int32), SCORES: np.dtype(np.float32)}

_WRITER_LOCK = "writer.lock"
_STORE_LOCK = ".lock"
_VERSION_NAME = re.compile(r"^v(\d{6,})$")
_HASH_CHUNK_BYTES = 16 << 20
_HASH_PROGRESS_MIN_BYTES = 1 << 30  # show a progress bar when hashing takes more than a few seconds
_PUBLISH_BLOCK_ROWS = 1 << 16  # bounds the temporaries of validation in publish()
_MAX_PUBLISH_ATTEMPTS = 1000


class NegativeStoreError(RuntimeError):
    """A version is damaged, missing or unusable, or a writer was misused."""


class _VersionGone(NegativeStoreError):
    """The version was removed (by gc) between listing and opening it."""


def _version_name(version: int) -> str:
    return f"v{version:06d}"


# This process's shared locks on version manifests: one descriptor per file, reference counted.
# One descriptor matters on NFS, where flock is emulated with POSIX locks that belong to the process
# and vanish when *any* descriptor of the file is closed. The table also tells gc() which versions
# this process holds without opening their manifests. Keys are absolute manifest paths.
_held: dict[str, list[int]] = {}  # path -> [fd, count]
_held_mutex = threading.Lock()
_live_writers: set[str] = set()  # this process's temporary directories, for the same reasons
_store_mutex = threading.Lock()  # POSIX locks do not exclude threads of one process; this does


def _acquire_shared(manifest_path: Path) -> int:
    """Shared-lock a version's manifest and return the descriptor; FileNotFoundError if absent."""
    key = str(manifest_path)
    with _held_mutex:
        if key in _held:
            _held[key][1] += 1
            return _held[key][0]
        fd = os.open(manifest_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # gc holds it exclusively: it is being removed
            raise _VersionGone(f"{manifest_path.parent} is being removed") from None
        try:  # gc may have renamed the directory between our open and our lock
            still_there = os.path.samestat(os.fstat(fd), os.stat(manifest_path))
        except FileNotFoundError:
            still_there = False
        if not still_there:
            os.close(fd)
            raise _VersionGone(f"{manifest_path.parent} was removed")
        _held[key] = [fd, 1]
        return fd


def _release_shared(manifest_path: Path) -> None:
    key = str(manifest_path)
    with _held_mutex:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            os.close(entry[0])
            del _held[key]


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0)
    if len(data) != size:
        raise OSError(f"short read: {len(data)} of {size} bytes")
    return data


def _sha256_file(path: Path, fsync: bool = False) -> str:
    """sha256 of a file in chunks (hashlib releases the GIL, so a background thread is cheap)."""
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        quiet = size < _HASH_PROGRESS_MIN_BYTES
        with progress_task(f"sha256 {path.name}", size, disable=quiet) as advance:
            while n := f.readinto(buffer):
                digest.update(view[:n])
                advance(n)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _first_true(mask: np.ndarray) -> tuple[int, int] | None:
    """(row, column) of the first True element of a 2-D mask, in row-major order."""
    hits = np.flatnonzero(mask)
    return None if hits.size == 0 else divmod(int(hits[0]), mask.shape[1])


def _validate_block(
    candidates: np.ndarray, scores: np.ndarray, first_row: int, k: int, corpus_size: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Check a block of rows against the format; return it as (int32 ids, float32 scores, NaN padded)."""
    if candidates.ndim != 2 or candidates.shape[1] != k:
        raise ValueError(f"candidates block has shape {list(candidates.shape)}, expected [rows, {k}]")
    if scores.shape != candidates.shape:
        raise ValueError(
            f"scores block has shape {list(scores.shape)}, candidates {list(candidates.shape)}"
        )
    if not np.issubdtype(candidates.dtype, np.integer):
        raise ValueError(f"candidates must be integer corpus row indices, got dtype {candidates.dtype}")
    if not np.issubdtype(scores.dtype, np.floating):
        raise ValueError(f"scores must be floating point, got dtype {scores.dtype}")
    upper = corpus_size if corpus_size is not None else np.iinfo(np.int32).max + 1
    if (hit := _first_true(candidates < -1)) is not None:
        r, c = hit
        raise ValueError(f"negatives row {first_row + r}, rank {c}: id {candidates[r, c]} < -1")
    if (hit := _first_true(candidates >= upper)) is not None:
        r, c = hit
        bound = f"corpus_size {corpus_size}" if corpus_size is not None else "the int32 range"
        raise ValueError(
            f"negatives row {first_row + r}, rank {c}: id {candidates[r, c]} outside {bound}"
        )
    valid = candidates >= 0
    if (hit := _first_true(~valid[:, :-1] & valid[:, 1:])) is not None:
        raise ValueError(
            f"negatives row {first_row + hit[0]}, rank {hit[1] + 1}: a candidate after -1 padding; "
            "padding goes only at the end of a row"
        )
    scores = scores.astype(np.float32)  # rounding is monotonic, so rank order survives the cast
    if (hit := _first_true(valid & np.isnan(scores))) is not None:
        raise ValueError(f"negatives row {first_row + hit[0]}, rank {hit[1]}: NaN score for a candidate")
    if (hit := _first_true(valid[:, 1:] & (scores[:, 1:] > scores[:, :-1]))) is not None:
        r, c = hit
        raise ValueError(
            f"negatives row {first_row + r}, rank {c + 1}: score {scores[r, c + 1]} > {scores[r, c]} at "
            f"rank {c}; candidates must be in rank order (non-increasing scores)"
        )
    scores[~valid] = np.nan
    return candidates.astype(np.int32), scores


class NegativeWriter:
    """Fills one new version row block by row block; see NegativeStore.begin()."""

    def __init__(self, store: NegativeStore, tmp_dir: Path, lock_fd: int, manifest: dict[str, Any]):
        self._store = store
        self._tmp_dir = tmp_dir
        self._lock_fd = lock_fd
        self._manifest = manifest
        self.num_queries: int = manifest["num_queries"]
        self.k: int = manifest["k"]
        self._corpus_size: int | None = manifest["corpus_size"]
        shape = (self.num_queries, self.k)
        self._arrays: dict[str, np.memmap] | None = {
            name: np.lib.format.open_memmap(tmp_dir / name, mode="w+", dtype=dtype, shape=shape)
            for name, dtype in DATA_FILES.items()
        }
        self._written = np.zeros(self.num_queries, dtype=bool)

    def write(self, start_row: int, candidates: np.ndarray, scores: np.ndarray) -> None:
        """Write rows start_row, start_row + 1, ...; ValueError naming the row if one is bad."""
        if self._arrays is None:
            raise NegativeStoreError("this writer was already committed or aborted")
        candidates, scores = np.asarray(candidates), np.asarray(scores)
        stop = start_row + (len(candidates) if candidates.ndim else 0)
        if start_row < 0 or stop > self.num_queries:
            raise ValueError(f"rows {start_row}..{stop - 1} outside [0, {self.num_queries})")
        candidates, scores = _validate_block(candidates, scores, start_row, self.k, self._corpus_size)
        self._arrays[CANDIDATES][start_row:stop] = candidates
        self._arrays[SCORES][start_row:stop] = scores
        self._written[start_row:stop] = True

    def commit(self) -> int:
        """Check every row was written, checksum, write the manifest, publish; return the version."""
        if self._arrays is None:
            raise NegativeStoreError("this writer was already committed or aborted")
        missing = np.flatnonzero(~self._written)
        if missing.size:
            raise NegativeStoreError(
                f"{missing.size} of {self.num_queries} rows were never written (first: row {missing[0]})"
            )
        for array in self._arrays.values():
            array.flush()
        self._arrays = None  # unmaps the files
        files = {}
        for name, dtype in DATA_FILES.items():
            path = self._tmp_dir / name
            files[name] = {
                "size": path.stat().st_size,
                # fsync here, outside the store lock, so that publishing under it is quick
                "sha256": _sha256_file(path, fsync=True),
                "dtype": dtype.name,
                "shape": [self.num_queries, self.k],
            }
        self._manifest["files"] = files
        with self._store._locked():
            version = self._store._publish_locked(self._tmp_dir, self._manifest)
        self._release()
        return version

    def abort(self) -> None:
        """Discard the data; a no-op after commit() or abort()."""
        if self._lock_fd < 0:
            return
        self._arrays = None
        shutil.rmtree(self._tmp_dir, ignore_errors=True)  # still locked: nobody else touches it
        self._release()

    def _release(self) -> None:
        _live_writers.discard(str(self._tmp_dir))
        os.close(self._lock_fd)
        self._lock_fd = -1

    def __enter__(self) -> NegativeWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        """Leaving the block without commit() (normally or by an exception) discards the data."""
        self.abort()


class NegativeVersion:
    """One open version, its files memory-mapped and checked against the manifest; holds a shared
    lock on it (against gc) until close()."""

    def __init__(self, store: NegativeStore, version: int, path: Path, manifest: dict[str, Any],
                 arrays: dict[str, np.memmap]):
        self._store = store
        self.version = version
        self.path = path
        self.manifest = manifest  # the JSON object, as written
        self.record = StoreManifest.from_json(manifest)  # the same, typed
        self.num_queries: int = self.record.num_queries
        self.k: int = self.record.k
        self._ids: np.memmap | None = arrays[CANDIDATES]
        self._scores: np.memmap | None = arrays[SCORES]
        self._unlock = weakref.finalize(self, _release_shared, path / MANIFEST)

    def candidates(self, query_row: int) -> tuple[np.ndarray, np.ndarray]:
        """(corpus ids int32, scores float32) of training query `query_row`, best first, no padding."""
        if self._ids is None:
            raise NegativeStoreError(f"{self.path} is closed")
        if not 0 <= query_row < self.num_queries:
            raise IndexError(f"query row {query_row} outside [0, {self.num_queries})")
        ids = np.array(self._ids[query_row])
        count = int(np.count_nonzero(ids >= 0))  # padding is only at the end of a row
        return ids[:count], np.array(self._scores[query_row, :count])

    def verify_checksums(self) -> None:
        """Raise NegativeStoreError unless the files match the manifest's sha256.

        Done once per version per NegativeStore (later calls return the cached answer); thread-safe,
        so a trainer may call it from a background thread while it reads rows.
        """
        if self._ids is None:
            raise NegativeStoreError(f"{self.path} is closed")
        self._store._verify_checksums(self)

    def close(self) -> None:
        self._ids = self._scores = None
        self._unlock()

    def __enter__(self) -> NegativeVersion:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class NegativeStore:
    """The negatives of one run directory: publish (miner) and open (trainer) versions."""

    def __init__(self, run_dir: str | os.PathLike):
        self.root = Path(os.path.abspath(run_dir)) / NEGATIVES
        self._checksum_problems: dict[tuple, str | None] = {}  # key -> None (ok) or the problem
        self._checksum_locks: dict[tuple, threading.Lock] = {}
        self._mutex = threading.Lock()
        self._warned: set[int] = set()

    # ---- listing -------------------------------------------------------------------------------

    def versions(self) -> list[int]:
        """Published versions, oldest first (each complete by construction; damage shows on open)."""
        if not self.root.is_dir():
            return []
        names = (_VERSION_NAME.match(entry.name) for entry in os.scandir(self.root))
        return sorted(int(match.group(1)) for match in names if match)

    def latest_version(self) -> int | None:
        versions = self.versions()
        return versions[-1] if versions else None

    # ---- writing -------------------------------------------------------------------------------

    def begin(
        self,
        num_queries: int,
        k: int,
        *,
        corpus_fingerprint: str,
        queries_fingerprint: str,
        model_path: str | os.PathLike,
        model_step: int,
        corpus_size: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> NegativeWriter:
        """Start a version of num_queries rows of k candidates, written block by block into memory-
        mapped files (for stores larger than RAM): `with store.begin(...) as w: w.write(...);
        version = w.commit()`. corpus_size, when given, bounds the ids."""
        if num_queries < 1 or k < 1:
            raise ValueError(f"need num_queries >= 1 and k >= 1, got {num_queries} and {k}")
        if corpus_size is not None and corpus_size < 1:
            raise ValueError(f"corpus_size must be >= 1, got {corpus_size}")
        manifest = StoreManifest(
            format_version=FORMAT_VERSION, version=None, created_at=None,  # both assigned at publication
            model_path=str(model_path), model_step=int(model_step), corpus_fingerprint=corpus_fingerprint,
            queries_fingerprint=queries_fingerprint, num_queries=int(num_queries), k=int(k),
            corpus_size=None if corpus_size is None else int(corpus_size), extra=dict(extra or {})).to_json()
        json.dumps(manifest)  # fail now, not after hours of mining, if extra is not JSON
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked():  # so cleanup_tmp never sees the directory before its lock exists
            self._cleanup_tmp_locked()
            tentative = _version_name((self.latest_version() or 0) + 1)
            tmp_dir = self.root / f"{TMP_PREFIX}{tentative}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp_dir.mkdir()
            lock_fd = os.open(tmp_dir / _WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _live_writers.add(str(tmp_dir))
        try:
            return NegativeWriter(self, tmp_dir, lock_fd, manifest)
        except BaseException:  # e.g. a full disk while creating the files
            shutil.rmtree(tmp_dir, ignore_errors=True)
            _live_writers.discard(str(tmp_dir))
            os.close(lock_fd)
            raise

    def publish(
        self,
        candidates: np.ndarray,
        scores: np.ndarray,
        *,
        corpus_fingerprint: str,
        queries_fingerprint: str,
        model_path: str | os.PathLike,
        model_step: int,
        corpus_size: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> int:
        """Publish in-memory arrays [Q, K] as the next version; return its number."""
        candidates, scores = np.asarray(candidates), np.asarray(scores)
        if candidates.ndim != 2 or scores.shape != candidates.shape:
            raise ValueError(
                f"candidates and scores must be [Q, K] of one shape, got {list(candidates.shape)} "
                f"and {list(scores.shape)}"
            )
        with self.begin(
            candidates.shape[0], candidates.shape[1], corpus_fingerprint=corpus_fingerprint,
            queries_fingerprint=queries_fingerprint, model_path=model_path, model_step=model_step,
            corpus_size=corpus_size, extra=extra,
        ) as writer:
            for start in range(0, len(candidates), _PUBLISH_BLOCK_ROWS):
                stop = start + _PUBLISH_BLOCK_ROWS
                writer.write(start, candidates[start:stop], scores[start:stop])
            return writer.commit()

    def _publish_locked(self, tmp_dir: Path, manifest: dict[str, Any]) -> int:
        # The lock file goes now: we hold the store lock, and a killed writer's directory without
        # one is recognised as dead by cleanup_tmp.
        (tmp_dir / _WRITER_LOCK).unlink()
        for _ in range(_MAX_PUBLISH_ATTEMPTS):
            version = (self.latest_version() or 0) + 1
            manifest["version"] = version
            manifest["created_at"] = utc_now()
            atomic_write_json(tmp_dir / MANIFEST, manifest)  # last: its presence means complete
            try:
                publish_dir(tmp_dir, self.root / _version_name(version))
                return version
            except OSError as error:  # lost a race for the name (only without working locks)
                lost_race = isinstance(error, FileExistsError) or error.errno == errno.ENOTEMPTY
                if not lost_race:
                    raise
        raise NegativeStoreError(f"could not find a free version number in {self.root}")

    # ---- reading -------------------------------------------------------------------------------

    def open(self, version: int, verify: bool = True) -> NegativeVersion:
        """Open one version; NegativeStoreError if it is missing or damaged.

        Sizes and shapes are always checked against the manifest; verify also checks the sha256
        checksums (once per version per NegativeStore; the answer is cached).
        """
        path = self.root / _version_name(version)
        manifest_path = path / MANIFEST
        try:
            fd = _acquire_shared(manifest_path)
        except FileNotFoundError:
            if path.is_dir():
                raise NegativeStoreError(f"negatives version {path}: no {MANIFEST}") from None
            raise _VersionGone(f"negatives version {path} does not exist") from None
        try:
            manifest = self._parse_manifest(_read_all(fd), version)
            arrays = {}
            for name, dtype in DATA_FILES.items():
                expected = manifest["files"][name]
                size = (path / name).stat().st_size
                if size != expected["size"]:
                    raise NegativeStoreError(
                        f"{name} has {size} bytes, the manifest says {expected['size']}"
                    )
                array = np.load(path / name, mmap_mode="r", allow_pickle=False)
                shape = (manifest["num_queries"], manifest["k"])
                if array.dtype != dtype or array.shape != shape:
                    raise NegativeStoreError(
                        f"{name} is {array.dtype} {list(array.shape)}, expected {dtype} {list(shape)}"
                    )
                arrays[name] = array
        except (NegativeStoreError, OSError, ValueError) as error:
            _release_shared(manifest_path)
            raise NegativeStoreError(f"negatives version {path}: {error}") from error
        opened = NegativeVersion(self, version, path, manifest, arrays)
        if verify:
            try:
                opened.verify_checksums()
            except NegativeStoreError:
                opened.close()
                raise
        return opened

    def open_latest(self, verify: bool = True) -> NegativeVersion | None:
        """The newest undamaged version, or None when none was published yet.

        A damaged version is skipped with a warning naming it and why; NegativeStoreError when
        every published version is damaged.
        """
        damaged: dict[int, str] = {}
        while True:
            for version in reversed(self.versions()):
                if version in damaged:
                    continue
                try:
                    return self.open(version, verify)
                except _VersionGone:
                    break  # gc removed it, so newer versions exist: list again
                except NegativeStoreError as error:
                    damaged[version] = str(error)
                    log = logger.debug if version in self._warned else logger.warning
                    self._warned.add(version)
                    log("skipping damaged negatives version %d, falling back to an older one: %s",
                        version, error)
            else:
                break
        if damaged:
            raise NegativeStoreError(f"every negatives version in {self.root} is damaged: {damaged}")
        return None

    @staticmethod
    def _parse_manifest(data: bytes, version: int) -> dict[str, Any]:
        try:
            manifest = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise NegativeStoreError(f"unreadable {MANIFEST}: {error}") from None
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            found = manifest.get("format_version") if isinstance(manifest, dict) else manifest
            raise NegativeStoreError(
                f"{MANIFEST} has format_version {found!r}; this reader knows {FORMAT_VERSION}"
            )
        try:
            if manifest["version"] != version:
                raise NegativeStoreError(f"{MANIFEST} says version {manifest['version']}")
            fields_ok = (
                isinstance(manifest["num_queries"], int) and isinstance(manifest["k"], int)
                and all(isinstance(manifest["files"][n]["size"], int)
                        and isinstance(manifest["files"][n]["sha256"], str) for n in DATA_FILES)
            )
        except (KeyError, TypeError) as error:
            raise NegativeStoreError(f"{MANIFEST} lacks field {error}") from None
        if not fields_ok:
            raise NegativeStoreError(f"{MANIFEST} has a malformed num_queries, k or files entry")
        return manifest

    def _verify_checksums(self, opened: NegativeVersion) -> None:
        files = opened.manifest["files"]
        key = (opened.version, opened.manifest["created_at"], *(files[n]["sha256"] for n in DATA_FILES))
        with self._mutex:
            key_lock = self._checksum_locks.setdefault(key, threading.Lock())
        with key_lock:  # a second thread asking for the same version waits for the first's answer
            if key not in self._checksum_problems:
                problem = None
                for name in DATA_FILES:
                    actual = _sha256_file(opened.path / name)
                    if actual != files[name]["sha256"]:
                        expected = files[name]["sha256"]
                        problem = f"{name} has sha256 {actual}, the manifest says {expected}"
                        break
                self._checksum_problems[key] = problem
            problem = self._checksum_problems[key]
        if problem is not None:
            raise NegativeStoreError(f"negatives version {opened.path}: {problem}")

    # ---- housekeeping --------------------------------------------------------------------------

    def gc(self, keep: int) -> list[int]:
        """Remove all but the newest `keep` versions, except those a live reader holds open (in any
        process); also remove dead writers' debris. Returns the removed versions."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (the newest version is never removed), got {keep}")
        if not self.root.is_dir():
            return []
        removed = []
        with self._locked():
            self._cleanup_tmp_locked()
            for version in self.versions()[:-keep]:
                if self._remove_if_unused(self.root / _version_name(version)):
                    removed.append(version)
        return removed

    def cleanup_tmp(self) -> list[str]:
        """Remove temporary directories of dead writers and leftovers of interrupted gc; return names."""
        if not self.root.is_dir():
            return []
        with self._locked():
            return self._cleanup_tmp_locked()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with _store_mutex:
            fd = os.open(self.root / _STORE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _cleanup_tmp_locked(self) -> list[str]:
        removed = []
        for entry in sorted(self.root.iterdir()):
            dead_writer = (
                entry.name.startswith(TMP_PREFIX)
                and str(entry) not in _live_writers
                and not _writer_alive(entry)
            )
            if dead_writer or entry.name.startswith(TRASH_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed

    def _remove_if_unused(self, path: Path) -> bool:
        manifest_path = path / MANIFEST
        with _held_mutex:
            if str(manifest_path) in _held:
                return False
            try:
                # O_RDWR: an exclusive lock emulated with POSIX locks (NFS) needs write access
                fd = os.open(manifest_path, os.O_RDWR)
            except FileNotFoundError:
                fd = -1  # a damaged version without a manifest: nobody can hold it
            try:
                if fd >= 0:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        return False  # a live reader holds it
                discard_dir(path)  # no reader ever sees a half-deleted version as complete
                return True
            finally:
                if fd >= 0:
                    os.close(fd)


def _writer_alive(tmp_dir: Path) -> bool:
    """Whether the writer of a temporary directory still holds its lock (call under the store lock)."""
    try:
        fd = os.open(tmp_dir / _WRITER_LOCK, os.O_RDWR)
    except (FileNotFoundError, NotADirectoryError):
        return False  # killed before creating its lock, or after giving it up to publish
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
