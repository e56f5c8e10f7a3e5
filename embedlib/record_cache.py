"""Data files converted once into memory-mapped Arrow, shared by every process that reads them.

A data set (a corpus, training pairs, scored pairs, labelled texts) is one file, a directory of shards
or a glob of shards, each .jsonl, .jsonl.gz or .parquet (scored pairs also .tsv). The first process
that needs it converts it into Arrow IPC files in a cache directory; every later reader (the other
ranks of a run, a later start, a resume, the miner) memory-maps those files, so a node's page cache
holds one copy and a reader's own memory does not grow with the data.

    ROOT/<kind>-<source hash>-<key>/   one entry; complete and immutable once its name exists
        manifest.json                  written last: sources, parts, fingerprints, figures
        part-00000.arrow ...           the records, in file order (one part per converted range)
        rows.arrow                     pairs with a corpus: each side's corpus rows (pos_rows, neg_rows)
        label_codes.npy, label_order.npy, label_starts.npy   labelled texts: the rows of each label
    ROOT/.locks/<kind>-<source hash>.lock   who converts (see below)
    ROOT/.tmp-*                        a conversion in progress, or the debris of a killed one

The key is a hash of the format version, the kind, each shard's absolute path, size, mtime (ns) and
inode, and (pairs) the corpus entry's key: a stat per shard tells a reader whether the entry still
describes the files, without reading them (a content hash of 10M records would cost a read of every
byte at every start). A changed file gets a new key and is converted again; the older entries of the
same source are then removed. Each entry also carries a content fingerprint (`fingerprint`: a
sha256 of the source bytes, or for a corpus of its records), which does not change when files are
copied, touched or moved; training checkpoints store it, so a resume notices changed data.

Records are checked as embedlib.records checks them, and an error names the shard, the line and the
field. A block of lines is parsed by pyarrow's JSON reader and checked with vectorized Arrow
compute; only a block that looks wrong in any way (a type, a blank line, an empty string, an unknown
key, ...) is parsed again by the Python checkers of embedlib.records, which raise the exact error or
accept it. Checks across records run over whole columns: duplicate corpus ids, and pair ids that are
not in the corpus (looked up in the corpus entry's id column). When a file has several errors, the
first in file order is reported, as the list readers do.

Who converts: one process per entry. It takes an exclusive POSIX lock (fcntl.lockf, which NFS and
Lustre honour across nodes) on the entry's lock file, converts into ROOT/.tmp-*, fsyncs and renames
it into place; the others block on the lock and then map the finished entry. A killed converter
releases its lock with its death and leaves only .tmp-* debris, removed by the next converter. The
conversion runs in a child process (`python -m embedlib.record_cache`), so its transient memory never
stays in a training rank, and splits uncompressed JSONL into ~64 MiB byte ranges (line numbers are
recovered by counting newlines) and shards over worker processes.

An entry is checked at every open, in time independent of the data: the manifest, each file's size,
a sha256 of its first and last 64 KiB, and each Arrow file's schema and batch sizes. An entry that
fails is damaged: it is removed and converted again. (A byte flipped in the middle of a multi-GB
file passes this check; hashing every byte at every start would cost a read of the whole data.)

Reading a row maps its pages into the reader, and the kernel maps their neighbours with them (fault-
around, large page-cache folios: up to ~1 MB a read here), so a table unmaps what it has read every
RELEASE_EVERY rows (madvise MADV_DONTNEED: the pages stay in the page cache); a reader's resident
size then stays flat however long it reads at random. Streaming over whole batches (batches()) maps
everything: call release_pages() between batches.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import glob as globlib
import hashlib
import json
import logging
import mmap
import os
import resource
import shutil
import subprocess
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from embedlib.atomic import file_lock
from embedlib.records import (
    AnyId,
    Document,
    RecordError,
    ScoredPair,
    _file_kind,
    duplicate_id_error,
    is_tsv,
    iter_block_records,
    iter_records,
    iter_scored_pairs,
    parse_document,
    parse_labeled_text,
    parse_pair,
    parse_scored_pair,
)

logger = logging.getLogger(__name__)

FORMAT = 1
KINDS = ("corpus", "pairs", "scored", "labeled")
MANIFEST = "manifest.json"
ROWS_FILE = "rows.arrow"
LABEL_FILES = ("label_codes.npy", "label_order.npy", "label_starts.npy")
RANGE_BYTES = 64 << 20  # one worker's share of an uncompressed JSONL file (fixed: the digest depends on it)
BLOCK_BYTES = 8 << 20  # lines parsed and checked at once, one Arrow record batch
SAMPLE_BYTES = 64 << 10  # head and tail of each file hashed for the quick check at open
RELEASE_EVERY = 64  # row reads between two CachedTable.release_pages (a read may map ~1 MB: bounds the total)
_DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".tsv", ".tsv.gz")


class CacheError(RuntimeError):
    """The cache itself failed (a converter crashed, the disk is full): not a problem of the records."""


# ---------------------------------------------------------------------------------------------------
# Sources: which files a data set is, and their state


def resolve_shards(spec: str | os.PathLike) -> list[Path]:
    """The shards of a data set: a file; a directory's data files (.jsonl, .jsonl.gz, .parquet, .tsv,
    .tsv.gz, not hidden), sorted by name; or a glob pattern's matches, sorted. RecordError when none."""
    text = str(spec)
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                        and p.name.lower().endswith(_DATA_SUFFIXES))
        if not shards:
            raise RecordError(path, None, None, f"directory holds no data files ({', '.join(_DATA_SUFFIXES)})")
        return shards
    if globlib.has_magic(text):
        shards = sorted(Path(p) for p in globlib.glob(text) if Path(p).is_file())
        if not shards:
            raise RecordError(text, None, None, "no file matches this pattern")
        return shards
    raise RecordError(text, None, None, "does not exist")


def _stat(path: Path) -> dict:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise RecordError(path, None, None, "shard disappeared") from None
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def source_state(shards: list[Path]) -> list[dict]:
    """What the key is made of, per shard: absolute path, size, mtime (ns), inode."""
    return [_stat(p) for p in shards]


def _absolute(spec: str | os.PathLike) -> str:
    """A data set's spec as an absolute path or pattern: what names its entries' source."""
    return os.path.abspath(str(spec)) if globlib.has_magic(str(spec)) else str(Path(spec).resolve())


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def source_fingerprint(kind: str, spec: str | os.PathLike, corpus_fingerprint: str | None = None) -> str:
    """The content fingerprint an entry of these files would carry (CachedTable.fingerprint), computed by
    reading them: for readers that do not use the cache. A corpus's is embedlib.records'
    corpus_fingerprint of its documents instead."""
    if kind == "corpus":
        raise ValueError("a corpus's fingerprint is embedlib.records.corpus_fingerprint of its documents")
    digests = []
    for unit in _plan_units(resolve_shards(spec), kind):
        digest = hashlib.sha256()
        with open(unit.path, "rb") as f:
            f.seek(unit.start)
            remaining = (unit.end if unit.end is not None else os.path.getsize(unit.path)) - unit.start
            while remaining > 0 and (chunk := f.read(min(1 << 20, remaining))):
                digest.update(chunk)
                remaining -= len(chunk)
        digests.append(digest.hexdigest())
    return _sha({"kind": kind, "units": digests, "corpus": corpus_fingerprint})


def _check_unchanged(shards: list[Path], before: list[dict]) -> None:
    for shard, old in zip(shards, before):
        if _stat(shard) != old:
            raise RecordError(shard, None, None, "changed while it was being converted; run again once it is "
                                                 "completely written")


# ---------------------------------------------------------------------------------------------------
# Reading an entry


class DamagedEntry(Exception):
    """An entry failed the quick check at open (truncated, garbled, incomplete)."""


def _sample_digest(path: Path) -> str:
    """sha256 of a file's size, first and last SAMPLE_BYTES: cheap, and catches truncation and the
    usual damage (a garbled footer or header) without reading a multi-GB file."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sample_sha256": _sample_digest(path)}


def _check_file(path: Path, expected: dict) -> None:
    try:
        if path.stat().st_size != expected["size"]:
            raise DamagedEntry(f"{path.name}: size {path.stat().st_size}, expected {expected['size']}")
        if _sample_digest(path) != expected["sample_sha256"]:
            raise DamagedEntry(f"{path.name}: contents differ from the manifest")
    except OSError as e:
        raise DamagedEntry(f"{path.name}: {e}") from None


def _open_arrow(path: Path, expected: dict, batch_rows: list[int]) -> tuple[list, mmap.mmap]:
    """The record batches of an Arrow IPC file, memory-mapped (zero copy), and the map.

    Python's mmap rather than pyarrow's, for madvise (CachedTable.release_pages)."""
    import pyarrow as pa

    _check_file(path, expected)
    try:
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mapped)))
        if reader.num_record_batches != len(batch_rows):
            raise DamagedEntry(f"{path.name}: {reader.num_record_batches} batches, expected {len(batch_rows)}")
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DamagedEntry(f"{path.name}: {e}") from None
    if [b.num_rows for b in batches] != batch_rows:
        raise DamagedEntry(f"{path.name}: batch sizes differ from the manifest")
    return batches, mapped


class CachedTable:
    """The records of one cache entry, memory-mapped; row access by global row index (file order).

    A table pickles as its directory (a DataLoader worker started by spawn maps it again)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        try:
            self.manifest = json.loads((self.directory / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DamagedEntry(f"{MANIFEST}: {e}") from None
        m = self.manifest
        if m.get("format") != FORMAT or m.get("kind") not in KINDS:
            raise DamagedEntry(f"{MANIFEST}: format {m.get('format')!r}, kind {m.get('kind')!r}")
        try:
            self._open()
        except (KeyError, TypeError, ValueError) as e:
            raise DamagedEntry(f"{MANIFEST}: {e!r}") from None

    def _open(self) -> None:
        m = self.manifest
        self.kind: str = m["kind"]
        self.key: str = m["key"]
        self.fingerprint: str = m["fingerprint"]
        self.shards: list[str] = [s["path"] for s in m["sources"]]
        self.num_rows: int = m["rows"]
        self._batches, self._maps, self._reads = [], [], 0
        line_base, shard_of = [], []
        for part in m["parts"]:
            batches, mapped = _open_arrow(self.directory / part["file"], part, part["batch_rows"])
            self._batches += batches
            self._maps.append(mapped)
            line_base += [part["line_base"]] * len(batches)
            shard_of += [part["shard"]] * len(batches)
        sizes = [b.num_rows for b in self._batches]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        if int(self._starts[-1]) != self.num_rows:
            raise DamagedEntry(f"{MANIFEST}: {self._starts[-1]} rows in the parts, {self.num_rows} in the manifest")
        self._line_base = np.asarray(line_base, dtype=np.int64)
        self._shard_of = np.asarray(shard_of, dtype=np.int32)
        self._columns = {name: i for i, name in enumerate(self._batches[0].schema.names)} if self._batches else {}
        self._extra, self._extra_columns = [], {}
        if ROWS_FILE in m["files"]:
            self._extra, mapped = _open_arrow(self.directory / ROWS_FILE, m["files"][ROWS_FILE], sizes)
            self._maps.append(mapped)
            self._extra_columns = {name: i for i, name in enumerate(self._extra[0].schema.names)} if sizes else {}
        self.arrays = {}
        for name in LABEL_FILES:
            if name in m["files"]:
                _check_file(self.directory / name, m["files"][name])
                try:
                    self.arrays[name[: -len(".npy")]] = np.load(self.directory / name, mmap_mode="r",
                                                               allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise DamagedEntry(f"{name}: {e}") from None
        self.release_pages()  # reading each batch's metadata mapped pages around it: none is needed now

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self):
        return {"directory": str(self.directory)}

    def __setstate__(self, state):
        self.__init__(Path(state["directory"]))

    def _locate(self, row: int) -> tuple[int, int]:
        """(batch, row in it) of a row about to be read."""
        if not 0 <= row < self.num_rows:
            raise IndexError(f"row {row} of {self.num_rows}")
        self._reads += 1
        if self._reads % RELEASE_EVERY == 0:
            self.release_pages()
        batch = int(np.searchsorted(self._starts, row, side="right")) - 1
        return batch, row - int(self._starts[batch])

    def value(self, column: str, row: int) -> Any:
        """One field of one row as a Python value (None where null)."""
        batch, local = self._locate(row)
        if column in self._columns:
            return self._batches[batch].column(self._columns[column])[local].as_py()
        return self._extra[batch].column(self._extra_columns[column])[local].as_py()

    def release_pages(self) -> None:
        """Unmap the pages read so far from this process (they stay in the page cache: the next read
        of one maps it again, without I/O). A read faults in its neighbours too (the kernel's fault-
        around, ~64 KiB), so random reads would otherwise make the process's resident size grow
        towards the whole file over a run, though none of it is private memory."""
        for mapped in self._maps:
            with contextlib.suppress(OSError, ValueError):
                mapped.madvise(mmap.MADV_DONTNEED)

    def where(self, row: int) -> tuple[str, int]:
        """(shard path, line) of a row: for error messages."""
        batch, local = self._locate(row)
        line = int(self._batches[batch].column(self._columns["_line"])[local].as_py())
        return self.shards[int(self._shard_of[batch])], int(self._line_base[batch]) + line

    def batches(self) -> Iterator:
        """The record batches in file order (zero copy), for streaming over the whole data set."""
        yield from self._batches


class CorpusTable(CachedTable):
    """A BEIR corpus: columns id, title, text (title "" where absent), in file order.

    `corpus_fingerprint` equals embedlib.records.corpus_fingerprint of the documents."""

    @property
    def corpus_fingerprint(self) -> str:
        return self.manifest["corpus_fingerprint"]

    def document(self, row: int) -> Document:
        batch, local = self._locate(row)
        b, c = self._batches[batch], self._columns
        return Document(b.column(c["id"])[local].as_py(), b.column(c["title"])[local].as_py(),
                        b.column(c["text"])[local].as_py())

    def passage(self, row: int) -> str:
        return self.document(row).passage

    def iter_documents(self) -> Iterator[Document]:
        for b in self._batches:
            yield from (Document(*values) for values in zip(b.column(self._columns["id"]).to_pylist(),
                                                             b.column(self._columns["title"]).to_pylist(),
                                                             b.column(self._columns["text"]).to_pylist()))


def open_table(directory: Path) -> CachedTable:
    """The entry in `directory`, checked (DamagedEntry when it fails)."""
    try:
        kind = json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError) as e:
        raise DamagedEntry(f"{MANIFEST}: {e}") from None
    return (CorpusTable if kind == "corpus" else CachedTable)(directory)


# ---------------------------------------------------------------------------------------------------
# The cache: find or build an entry


class RecordCache:
    """`RecordCache(root).open(kind, spec, corpus=...)`: the entry for a data set, converted first if
    no sound entry describes its files. `in_process` converts in this process (tests, small data);
    the default is a child process, so that none of the conversion's memory stays here."""

    def __init__(self, root: str | os.PathLike, workers: int | None = None, in_process: bool = False):
        self.root = Path(root)
        self.workers = workers
        self.in_process = in_process

    def corpus(self, spec: str | os.PathLike) -> CorpusTable:
        return self.open("corpus", spec)

    def pairs(self, spec: str | os.PathLike, corpus: CorpusTable | None = None) -> CachedTable:
        return self.open("pairs", spec, corpus)

    def scored_pairs(self, spec: str | os.PathLike) -> CachedTable:
        return self.open("scored", spec)

    def labeled_texts(self, spec: str | os.PathLike) -> CachedTable:
        return self.open("labeled", spec)

    def entry_name(self, kind: str, spec: str | os.PathLike, corpus: CorpusTable | None = None) -> tuple[str, str, list]:
        """(entry name, lock name, source state) for a data set as its files are now."""
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
        shards = resolve_shards(spec)
        state = source_state(shards)
        source = _sha({"kind": kind, "spec": _absolute(spec),
                       "corpus": _absolute(corpus.manifest["spec"]) if corpus else None})[:12]
        key = _sha({"format": FORMAT, "kind": kind, "sources": state, "corpus": corpus.key if corpus else None})
        return f"{kind}-{source}-{key[:20]}", f"{kind}-{source}", state

    def open(self, kind: str, spec: str | os.PathLike, corpus: CorpusTable | None = None) -> CachedTable:
        name, lock_name, state = self.entry_name(kind, spec, corpus)
        directory = self.root / name
        table = self._try_open(directory)
        if table is not None:
            return table
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ".locks").mkdir(exist_ok=True)
        waiting = functools.partial(logger.info, "waiting for another process converting %s", f"{kind} {spec}")
        with file_lock(self.root / ".locks" / f"{lock_name}.lock", on_wait=waiting):
            table = self._try_open(directory, discard_damaged=True)  # another process may have built it
            if table is not None:
                return table
            self._convert(kind, spec, corpus, name, state)
            self._remove_older(lock_name, keep=name)
            table = self._try_open(directory)
            if table is None:
                raise CacheError(f"{directory}: the entry just written does not open")
            return table

    def _try_open(self, directory: Path, discard_damaged: bool = False) -> CachedTable | None:
        if not directory.exists():
            return None
        try:
            return open_table(directory)
        except (DamagedEntry, OSError, ValueError) as e:
            if not discard_damaged:
                return None  # decided under the lock, where nobody is writing it
            logger.warning("data cache entry %s is damaged (%s): converting again", directory, e)
            from embedlib.rundir import discard_dir

            discard_dir(directory)
            return None

    def _convert(self, kind: str, spec, corpus: CorpusTable | None, name: str, state: list) -> None:
        for debris in self.root.glob(f".tmp-{name.rsplit('-', 1)[0]}-*"):  # killed conversions of this source
            shutil.rmtree(debris, ignore_errors=True)
        from embedlib.rundir import remove_debris

        remove_debris(self.root, (".trash-",))
        tmp = self.root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        job = {"kind": kind, "spec": str(spec), "out": str(tmp), "key_state": state,
               "key": name.rsplit("-", 1)[1], "corpus": str(corpus.directory) if corpus else None,
               "workers": self.workers}
        try:
            if self.in_process:
                convert(job)
            else:
                _convert_in_child(job)
            from embedlib.atomic import publish_dir

            publish_dir(tmp, self.root / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _remove_older(self, lock_name: str, keep: str) -> None:
        """Entries of the same source for older versions of its files: removed (a process still mapping
        one keeps reading it; the file system frees it when the last mapping goes)."""
        from embedlib.rundir import discard_dir

        for entry in self.root.glob(f"{lock_name}-*"):
            if entry.name != keep and entry.is_dir():
                with contextlib.suppress(OSError):
                    discard_dir(entry)


def _convert_in_child(job: dict) -> None:
    """Run convert(job) in `python -m embedlib.record_cache`; a RecordError comes back as one."""
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    result_path = Path(job["out"]) / "result.json"
    proc = subprocess.run([sys.executable, "-m", "embedlib.record_cache", "convert", json.dumps(job)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        result = json.loads(result_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CacheError(f"converting {job['spec']} failed (exit status {proc.returncode}): "
                         f"{proc.stderr.strip()[-2000:]}") from None
    result_path.unlink()
    if "error" in result:
        e = result["error"]
        raise RecordError(e["path"], e["line"], e["field"], e["message"])


# ---------------------------------------------------------------------------------------------------
# Conversion (in the child process)


@dataclass(frozen=True)
class Unit:
    """One worker's share: a whole shard, or the byte range [start, end) of an uncompressed JSONL shard."""

    index: int
    shard: int
    path: str
    start: int = 0
    end: int | None = None


def _plan_units(shards: list[Path], kind: str) -> list[Unit]:
    units: list[Unit] = []
    for s, path in enumerate(shards):
        plain_jsonl = path.name.lower().endswith(".jsonl")
        size = path.stat().st_size
        if not plain_jsonl or size <= RANGE_BYTES:
            units.append(Unit(len(units), s, str(path), 0, None))
            continue
        # Ranges end after the first newline at or past each multiple of RANGE_BYTES: they depend on the
        # file only, so the content fingerprint (a hash of the ranges' hashes) does not depend on workers.
        start = 0
        with open(path, "rb") as f:
            while start < size:
                end = start + RANGE_BYTES
                if end >= size:
                    end = size
                else:
                    f.seek(end)
                    while True:
                        chunk = f.read(1 << 16)
                        if not chunk:
                            end = size
                            break
                        nl = chunk.find(b"\n")
                        if nl >= 0:
                            end += nl + 1
                            break
                        end += len(chunk)
                units.append(Unit(len(units), s, str(path), start, end))
                start = end
    return units


def convert(job: dict) -> dict:
    """Convert a data set into job["out"] (manifest last). Raises RecordError for a bad record."""
    t0 = time.perf_counter()
    kind, out = job["kind"], Path(job["out"])
    shards = resolve_shards(job["spec"])
    state = source_state(shards)
    if state != job["key_state"]:
        raise RecordError(job["spec"], None, None, "changed while the conversion started; run again")
    units = _plan_units(shards, kind)
    workers = job.get("workers") or min(len(units), len(os.sched_getaffinity(0)))
    workers = max(1, min(workers, len(units)))
    has_corpus = job.get("corpus") is not None
    tasks = [(kind, u, str(out / f"part-{u.index:05d}.arrow"), has_corpus) for u in units]
    results: list[dict | None] = [None] * len(units)
    if workers == 1:
        for i, task in enumerate(tasks):
            results[i] = _convert_unit(*task)
            if "error" in results[i]:
                break
    else:
        import multiprocessing

        # The converter's own process (python -m embedlib.record_cache) has no threads yet: its workers
        # fork from it, already importing what they need. Elsewhere (in_process) they start clean.
        context = "fork" if job.get("fork_workers") else "spawn"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(context)) as pool:
            futures = [pool.submit(_convert_unit, *task) for task in tasks]
            for i, future in enumerate(futures):
                results[i] = future.result()
                if "error" in results[i]:
                    for later in futures[i + 1:]:
                        later.cancel()
                    break
    done = [r for r in results if r is not None]
    units_s = time.perf_counter() - t0
    # Line numbers: a unit counts its lines from 1; the lines of the earlier ranges of its shard come first.
    bases, lines_before = [], {}
    for unit, result in zip(units, done):
        bases.append(lines_before.get(unit.shard, 0) if unit.start else 0)
        lines_before[unit.shard] = bases[-1] + result["lines"]
    error = done[-1].get("error")

    corpus = CorpusTable(Path(job["corpus"])) if has_corpus else None
    parts = []
    for unit, result, base in zip(units, done, bases):
        parts.append({"file": Path(result["file"]).name, "shard": unit.shard, "line_base": base,
                      "batch_rows": result["batch_rows"], **_file_record(Path(result["file"]))})
    reader = _PartialTable(parts, out, [str(s) for s in shards])
    first_error = None
    if error is not None:
        first_error = RecordError(error["path"], bases[-1] + error["line"], error["field"], error["message"])
    # Checks across records, over the rows before the first record error (all rows without one).
    extra_files: dict[str, dict] = {}
    stats: dict[str, Any] = {}
    if kind == "corpus":
        _check_duplicate_ids(reader)
    if kind == "pairs" and corpus is not None:
        _resolve_pair_ids(reader, corpus, first_error, error, out, extra_files)
    if first_error is not None:
        raise first_error
    _check_unchanged(shards, state)

    manifest = {"format": FORMAT, "kind": kind, "key": job["key"], "spec": _absolute(job["spec"]),
                "sources": state, "parts": parts, "rows": reader.num_rows, "files": extra_files,
                "corpus": {"directory": str(corpus.directory), "key": corpus.key,
                           "fingerprint": corpus.fingerprint} if corpus else None}
    digests = [r["digest"] for r in done]
    if kind == "corpus":
        manifest["corpus_fingerprint"] = _corpus_fingerprint(reader)
        manifest["fingerprint"] = manifest["corpus_fingerprint"]
    else:
        manifest["fingerprint"] = _sha({"kind": kind, "units": digests,
                                        "corpus": corpus.fingerprint if corpus else None})
    if kind == "pairs":
        manifest["queries_fingerprint"] = _queries_fingerprint(reader)
        stats.update(_pair_stats(reader))
    if kind == "labeled":
        _label_index(reader, out, extra_files)
    seconds = time.perf_counter() - t0
    # CPU seconds of this process and its (finished) workers: a figure a busy machine does not distort
    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    manifest.update(stats=stats, created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    seconds=round(seconds, 3), units_seconds=round(units_s, 3), cpu_seconds=round(cpu, 3),
                    workers=workers, records_per_s=round(reader.num_rows / seconds) if seconds > 0 else None)
    from embedlib.atomic import atomic_write_json

    atomic_write_json(out / MANIFEST, manifest)
    return manifest


class _PartialTable:
    """The parts written so far, as columns over global rows (the converter's view)."""

    def __init__(self, parts: list[dict], out: Path, shards: list[str]):
        import pyarrow as pa

        self.batches, self.line_base, self.shard_of = [], [], []
        for part in parts:
            reader = pa.ipc.open_file(pa.memory_map(str(out / part["file"]), "r"))
            for i in range(reader.num_record_batches):
                self.batches.append(reader.get_batch(i))
                self.line_base.append(part["line_base"])
                self.shard_of.append(part["shard"])
        self.shards = shards
        self.starts = np.concatenate([[0], np.cumsum([b.num_rows for b in self.batches], dtype=np.int64)]).astype(np.int64)
        self.num_rows = int(self.starts[-1])

    def column(self, name: str):
        import pyarrow as pa

        if not self.batches:
            return pa.chunked_array([], type=pa.string())
        return pa.chunked_array([b.column(name) for b in self.batches])

    def where(self, row: int) -> tuple[str, int]:
        batch = int(np.searchsorted(self.starts, row, side="right")) - 1
        line = self.batches[batch].column("_line")[row - int(self.starts[batch])].as_py()
        return self.shards[self.shard_of[batch]], self.line_base[batch] + line


def _check_duplicate_ids(reader: _PartialTable) -> None:
    """The first row whose id an earlier row has, as read_corpus reports it (one hash of all ids)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if reader.num_rows == 0:
        return
    ids = pa.concat_arrays(reader.column("id").chunks)
    if len(pc.unique(ids)) == len(ids):
        return
    codes = pc.dictionary_encode(ids).indices.to_numpy(zero_copy_only=False)
    _, first = np.unique(codes, return_index=True)
    repeated = np.flatnonzero(first[codes] != np.arange(len(codes)))
    row = int(repeated[0])
    first_row = int(first[codes[row]])
    (path, line), (first_path, first_line) = reader.where(row), reader.where(first_row)
    doc_id = ids[row].as_py()
    if first_path == path:
        raise duplicate_id_error(path, line, doc_id, first_line)
    raise RecordError(path, line, "_id", f"duplicate id {doc_id!r}, first on line {first_line} of {first_path}")


def _resolve_pair_ids(reader: _PartialTable, corpus: CorpusTable, first_error: RecordError | None,
                      error: dict | None, out: Path, extra_files: dict) -> None:
    """Look every pos_ids/neg_ids up in the corpus's id column at once (one hash table for the whole
    data set): the corpus rows of each side (rows.arrow), or the first unknown id, reported as the
    reference reader reports it (the first record in file order; pos_ids before neg_ids)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    corpus_ids = pa.concat_arrays([b.column(corpus._columns["id"]) for b in corpus.batches()]) \
        if corpus.num_rows else pa.array([], pa.string())
    rows_of: dict[str, list] = {}
    unknown = []  # (row, side, index in its list, id)
    for side, name in enumerate(("pos_ids", "neg_ids")):
        lists = [b.column(name) for b in reader.batches]
        flats = [pc.list_flatten(chunk) for chunk in lists]
        flat = pa.concat_arrays(flats) if flats else pa.array([], pa.string())
        found = pc.index_in(flat, value_set=corpus_ids)
        if found.null_count:
            missing = int(np.flatnonzero(found.is_null().to_numpy(zero_copy_only=False))[0])
            batch = int(np.searchsorted(np.cumsum([len(f) for f in flats]), missing, side="right"))
            within = missing - sum(len(f) for f in flats[:batch])
            chunk = lists[batch]
            offsets = _list_offsets(chunk).to_numpy()
            local = int(np.searchsorted(offsets, within, side="right")) - 1
            unknown.append((int(reader.starts[batch]) + local, side, within - int(offsets[local]), flat[missing].as_py()))
            continue
        rows_of[name], start = [], 0
        for chunk, f in zip(lists, flats):
            values = found.slice(start, len(f)).cast(pa.int32())
            rows_of[name].append(pa.ListArray.from_arrays(_list_offsets(chunk), values, mask=chunk.is_null()))
            start += len(f)
    if unknown:
        row, side, index, doc_id = min(unknown)
        path, line = reader.where(row)
        raise RecordError(path, line, f"{('pos_ids', 'neg_ids')[side]}[{index}]", f"unknown id {doc_id!r}: not in the corpus")
    if first_error is not None:
        # The bad record itself was parsed with every id counted present: parse it again with its real
        # ids, so that an unknown id checked before the reported field is reported instead, as today.
        if error.get("data") is not None:
            parse_pair(first_error.path, first_error.line, error["data"], corpus=_present_ids(error["data"], corpus_ids),
                       resolve=False)
        return
    schema = pa.schema([("pos_rows", pa.list_(pa.int32())), ("neg_rows", pa.list_(pa.int32()))])
    path = out / ROWS_FILE
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for pos, neg in zip(rows_of["pos_ids"], rows_of["neg_ids"]):
            writer.write_batch(pa.record_batch([pos, neg], schema=schema))
    extra_files[ROWS_FILE] = _file_record(path)


def _list_offsets(chunk):
    """A list array's offsets rebased to 0 (a slice's offsets start where its parent's values do)."""
    import pyarrow as pa

    offsets = chunk.offsets.to_numpy()
    return pa.array((offsets - offsets[0]).astype(np.int32))


def _present_ids(data: dict, corpus_ids) -> dict:
    """The ids of one raw pair record that are in the corpus, as a mapping parse_pair can check ids
    against (their documents are never looked up: resolve=False)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = [i for name in ("pos_ids", "neg_ids") if isinstance(data.get(name), list)
           for i in data[name] if isinstance(i, str)]
    if not ids:
        return {}
    found = pc.is_in(pa.array(ids, pa.string()), value_set=corpus_ids).to_pylist()
    return {i: None for i, ok in zip(ids, found) if ok}


def _framed_digest(digest, columns: list, header: int) -> None:
    """Update `digest` with each row's field lengths (8-byte little-endian each) then its UTF-8 fields,
    row after row: embedlib.records' fingerprint framing, computed over whole columns."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(columns[0])
    if n == 0:
        return
    lengths = np.stack([pc.binary_length(c).to_numpy(zero_copy_only=False).astype("<u8") for c in columns], axis=1)
    heads = pa.FixedSizeBinaryArray.from_buffers(pa.binary(8 * header), n, [None, pa.py_buffer(lengths.tobytes())])
    joined = pc.binary_join_element_wise(heads.cast(pa.binary()), *[c.cast(pa.binary()) for c in columns], pa.scalar(b""))
    # binary_join_element_wise writes the joined values back to back: the framed rows are one slice
    offsets = np.frombuffer(joined.buffers()[1], dtype=np.int32)[joined.offset: joined.offset + n + 1]
    digest.update(memoryview(joined.buffers()[2])[offsets[0]:offsets[-1]])


def _corpus_fingerprint(reader: _PartialTable) -> str:
    digest = hashlib.sha256(b"embedlib.corpus.v1\0")
    for b in reader.batches:
        _framed_digest(digest, [b.column("id"), b.column("title"), b.column("text")], 3)
    return digest.hexdigest()


def _queries_fingerprint(reader: _PartialTable) -> str:
    digest = hashlib.sha256(b"embedlib.queries.v1\0")
    for b in reader.batches:
        _framed_digest(digest, [b.column("query")], 1)
    return digest.hexdigest()


def _pair_stats(reader: _PartialTable) -> dict:
    """The first row with negatives and the first without (training needs them for any row limit)."""
    import pyarrow.compute as pc

    with_neg = without_neg = None
    for i, b in enumerate(reader.batches):
        count = pc.if_else(pc.greater(pc.fill_null(pc.list_value_length(b.column("neg")), 0), 0),
                           pc.list_value_length(b.column("neg")), pc.fill_null(pc.list_value_length(b.column("neg_ids")), 0))
        has = pc.fill_null(pc.greater(count, 0), False).to_numpy(zero_copy_only=False)
        if with_neg is None and has.any():
            with_neg = int(reader.starts[i]) + int(np.argmax(has))
        if without_neg is None and not has.all():
            without_neg = int(reader.starts[i]) + int(np.argmin(has))
    return {"first_row_with_neg": with_neg, "first_row_without_neg": without_neg}


def _label_index(reader: _PartialTable, out: Path, extra_files: dict) -> None:
    """label_codes[row] (labels numbered in order of first appearance), label_order (the rows grouped by
    label, ascending within a label) and label_starts (where each label's rows begin in label_order)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    labels = pa.concat_arrays(reader.column("label").chunks) if reader.num_rows else pa.array([], pa.string())
    codes = pc.dictionary_encode(labels).indices.to_numpy(zero_copy_only=False).astype(np.int32)
    order = np.argsort(codes, kind="stable").astype(np.int32)
    counts = np.bincount(codes, minlength=int(codes.max()) + 1 if len(codes) else 0)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    for name, array in zip(LABEL_FILES, (codes, order, starts)):
        np.save(out / name, array, allow_pickle=False)
        extra_files[name] = _file_record(out / name)


# ---------------------------------------------------------------------------------------------------
# One unit: blocks of lines -> Arrow record batches (runs in a worker process)


@functools.lru_cache(maxsize=None)
def _schemas():
    """(schemas the JSON reader parses with, schemas of the stored parts, keys left to inference) per kind."""
    import pyarrow as pa

    s, ls, f64 = pa.string(), pa.list_(pa.string()), pa.float64()
    parse = {
        "corpus": pa.schema([("_id", s), ("title", s), ("text", s)]),
        "pairs": pa.schema([("query", s), ("pos", ls), ("neg", ls), ("query_id", s), ("pos_ids", ls),
                            ("neg_ids", ls), ("task", s), ("instruction", s), ("prompt", s),
                            ("pos_scores", pa.list_(f64)), ("neg_scores", pa.list_(f64)), ("type", s), ("key", s)]),
        "scored": pa.schema([("sentence1", s), ("sentence2", s), ("score", f64), ("label", f64), ("key", s)]),
        "labeled": pa.schema([("text", s), ("label", s)]),
    }
    out = {
        "corpus": pa.schema([("id", s), ("title", s), ("text", s), ("_line", pa.int64())]),
        "pairs": pa.schema([("query", s), ("pos", ls), ("pos_ids", ls), ("neg", ls), ("neg_ids", ls),
                            ("query_id", s), ("task", s), ("instruction", s), ("_line", pa.int64())]),
        "scored": pa.schema([("sentence1", s), ("sentence2", s), ("score", f64), ("_line", pa.int64())]),
        "labeled": pa.schema([("text", s), ("label", s), ("_line", pa.int64())]),
    }
    # keys that may hold anything the checks accept (left to inference, never stored)
    free = {"corpus": {"metadata"}, "pairs": {"provenance"}, "scored": {"provenance"}, "labeled": set()}
    return parse, out, free


class _UnitWriter:
    def __init__(self, path: str, schema):
        import pyarrow as pa

        self.path, self.schema = path, schema
        self.sink = pa.OSFile(path, "wb")
        self.writer = pa.ipc.new_file(self.sink, schema)
        self.batch_rows: list[int] = []

    def write(self, columns: dict) -> None:
        import pyarrow as pa

        batch = pa.record_batch([columns[f.name] for f in self.schema], schema=self.schema)
        if batch.num_rows:
            self.writer.write_batch(batch)
            self.batch_rows.append(batch.num_rows)

    def close(self) -> None:
        self.writer.close()
        self.sink.close()


def _convert_unit(kind: str, unit: Unit, out_path: str, has_corpus: bool) -> dict:
    """Convert one unit into an Arrow IPC file: {"file", "batch_rows", "lines", "digest"} and, at the
    first bad record, "error" (the rows before it are written; line numbers count from the unit's start).

    A damaged .gz shard is read again from its start by the Python reader, which names the line where
    the damage begins exactly as read_* does (a block read stops short of it)."""
    path = Path(unit.path)
    # A corpus's content fingerprint is computed from its records; other kinds hash their bytes here.
    digest = hashlib.sha256() if kind != "corpus" else None
    result: dict[str, Any] = {"file": out_path, "lines": 0}
    writer = _UnitWriter(out_path, _schemas()[1][kind])
    try:
        try:
            if kind == "scored" and is_tsv(path):
                _write_python(kind, path, iter_scored_pairs(path), writer, has_corpus)  # checked
                _hash_file(path, digest)
            elif _file_kind(path, ("jsonl", "parquet")) == "parquet":
                _write_python(kind, path, iter_records(path), writer, has_corpus)
                _hash_file(path, digest)
            else:
                try:
                    for block, first_line in _blocks(path, unit, digest):
                        _block(kind, path, block, first_line, unit.start == 0 and first_line == 1, writer, has_corpus)
                        result["lines"] = first_line - 1 + block.count(b"\n") + (not block.endswith(b"\n"))
                except _Damaged:
                    writer.close()
                    writer = _UnitWriter(out_path, _schemas()[1][kind])
                    _write_python(kind, path, iter_records(path), writer, has_corpus)
        except _BadRecord as bad:
            e = bad.error
            result["error"] = {"path": e.path, "line": e.line, "field": e.field, "message": e.message, "data": bad.data}
        except RecordError as e:
            result["error"] = {"path": e.path, "line": e.line, "field": e.field, "message": e.message, "data": None}
    finally:
        writer.close()
    result.update(batch_rows=writer.batch_rows, digest=digest.hexdigest() if digest else None)
    return result


def _hash_file(path: Path, digest) -> None:
    if digest is None:
        return
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)


class _BadRecord(Exception):
    def __init__(self, error: RecordError, data: Any):
        self.error, self.data = error, data


class _Damaged(Exception):
    """A .gz shard cannot be decompressed further."""


def _blocks(path: Path, unit: Unit, digest) -> Iterator[tuple[bytes, int]]:
    """(block of whole lines, its first line number counted from the unit's start) of a JSONL unit;
    the bytes read (compressed ones for .gz) go into `digest`."""
    import gzip
    import zlib

    with open(path, "rb") as raw:
        raw.seek(unit.start)
        remaining = None if unit.end is None else unit.end - unit.start

        class _Hashing:  # the unit's bytes, hashed as they are read
            def read(self, n=-1):
                nonlocal remaining
                if remaining is not None:
                    n = remaining if n < 0 else min(n, remaining)
                data = raw.read(n)
                if remaining is not None:
                    remaining -= len(data)
                if digest is not None:
                    digest.update(data)
                return data

        source = gzip.GzipFile(fileobj=_Hashing(), mode="rb") if path.name.lower().endswith(".gz") else _Hashing()
        line, carry = 1, b""
        while True:
            try:
                data = source.read(BLOCK_BYTES)
            except (OSError, EOFError, zlib.error):
                raise _Damaged() from None
            if not data:
                break
            data = carry + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                carry = data
                continue
            block, carry = data[:cut], data[cut:]
            yield block, line
            line += block.count(b"\n")
        if carry:
            yield carry, line


def _write_python(kind: str, path: Path, records, writer: _UnitWriter, has_corpus: bool) -> None:
    """Records read and checked by embedlib.records one at a time, written in batches."""
    batch: list = []
    for item in records:
        batch.append(item)
        if len(batch) >= 65536:
            writer.write(_python_block(kind, path, batch, has_corpus, writer))
            batch = []
    writer.write(_python_block(kind, path, batch, has_corpus, writer))


def _block(kind: str, path: Path, block: bytes, first_line: int, at_file_start: bool, writer: _UnitWriter,
           has_corpus: bool) -> None:
    columns = _fast_block(kind, block, first_line, has_corpus)
    if columns is None:  # anything unusual: the Python checkers decide, and name the exact error
        columns = _python_block(kind, path, iter_block_records(path, block, first_line, at_file_start), has_corpus,
                                writer)
    writer.write(columns)


def _rows_to_columns(rows: list[tuple], schema) -> dict:
    import pyarrow as pa

    columns = list(zip(*rows)) if rows else [[] for _ in schema]
    return {f.name: pa.array(list(values), type=f.type) for f, values in zip(schema, columns)}


def _python_block(kind: str, path: Path, records, has_corpus: bool, writer: _UnitWriter) -> dict:
    """Parse and check records with embedlib.records' functions; at a bad record, write the rows before
    it and raise _BadRecord."""
    _, out_schemas, _ = _schemas()
    schema = out_schemas[kind]
    rows: list[tuple] = []
    corpus = AnyId() if has_corpus else None
    data = None
    try:
        for line, data in records:
            if kind == "corpus":
                doc = parse_document(path, line, data)
                rows.append((doc.id, doc.title, doc.text, line))
            elif kind == "pairs":
                p, _, _ = parse_pair(path, line, data, corpus, resolve=False)
                rows.append((p.query, p.pos, p.pos_ids, p.neg, p.neg_ids, p.query_id, p.task, p.instruction, line))
            elif kind == "scored":
                s = data if isinstance(data, ScoredPair) else parse_scored_pair(path, line, data)
                rows.append((s.sentence1, s.sentence2, s.score, line))
            else:
                t = parse_labeled_text(path, line, data)
                rows.append((t.text, t.label, line))
            data = None
    except RecordError as e:
        writer.write(_encodable(rows, schema, path))
        raise _BadRecord(e, _jsonable(data) if kind == "pairs" else None) from None
    return _encodable(rows, schema, path)


def _encodable(rows: list[tuple], schema, path: Path) -> dict:
    """Columns of rows; a string Arrow cannot hold (a lone surrogate, which JSON's \\ud800 escape can
    make) is an error at its line rather than a crash."""
    try:
        return _rows_to_columns(rows, schema)
    except (UnicodeEncodeError, UnicodeError):
        for row in rows:
            for name, value in zip(schema.names, row):
                for text in (value if isinstance(value, list) else [value]):
                    if isinstance(text, str):
                        try:
                            text.encode("utf-8")
                        except UnicodeEncodeError:
                            raise RecordError(path, row[-1], name if name != "id" else "_id",
                                              "not valid Unicode (a lone surrogate escape)") from None
        raise


def _jsonable(data: Any) -> Any:
    try:
        json.dumps(data)
        return data
    except (TypeError, ValueError):
        return None


# --- the fast path: pyarrow's JSON reader and vectorized checks ----------------------------------------


def _fast_block(kind: str, block: bytes, first_line: int, has_corpus: bool) -> dict | None:
    """The block's columns if every record in it certainly passes embedlib.records' checks; None when
    anything is unusual, and the Python checkers decide (they raise the exact error, or accept)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj

    data = np.frombuffer(block, dtype=np.uint8)
    if not len(data):
        return None
    newlines = np.flatnonzero(data == 0x0A)
    starts = np.concatenate([[0], newlines + 1])
    if len(starts) and starts[-1] == len(data):
        starts = starts[:-1]
    # One object per line, no blank line: every line starts with "{" (so rows map to lines one to one).
    if not (data[starts] == 0x7B).all():
        return None
    parse_schemas, _, free = _schemas()
    schema = parse_schemas[kind]
    try:
        table = pj.read_json(pa.BufferReader(block),
                             read_options=pj.ReadOptions(use_threads=False, block_size=len(block) + 1),
                             parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="infer",
                                                           newlines_in_values=False))
    except Exception:  # noqa: BLE001 - any failure: the Python checkers say what is wrong
        if kind != "labeled":
            return None
        try:  # integer labels are kept as strings
            schema = pa.schema([("text", pa.string()), ("label", pa.int64())])
            table = pj.read_json(pa.BufferReader(block),
                                 read_options=pj.ReadOptions(use_threads=False, block_size=len(block) + 1),
                                 parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="infer",
                                                               newlines_in_values=False))
            table = table.set_column(1, "label", pc.cast(table.column("label"), pa.string()))
        except Exception:  # noqa: BLE001
            return None
    if table.num_rows != len(starts):
        return None
    extra = set(table.column_names) - set(schema.names)
    if not extra <= free[kind]:
        return None
    for name in extra:  # free keys: provenance must be an object (or null); metadata anything
        if name == "provenance" and not (pa.types.is_struct(table.schema.field(name).type)
                                         or pa.types.is_null(table.schema.field(name).type)):
            return None
    table = table.combine_chunks()
    col = {name: table.column(name).chunks[0] if table.column(name).num_chunks else pa.array([], table.schema.field(name).type)
           for name in table.column_names}
    lines = pa.array(first_line + np.arange(len(starts), dtype=np.int64))
    ok = _FAST_CHECKS[kind](col, has_corpus)
    if not ok:
        return None
    if kind == "corpus":
        return {"id": col["_id"], "title": pc.fill_null(col["title"], ""), "text": col["text"], "_line": lines}
    if kind == "pairs":
        return {"query": col["query"], "pos": col["pos"], "pos_ids": col["pos_ids"], "neg": col["neg"],
                "neg_ids": col["neg_ids"], "query_id": col["query_id"], "task": col["task"],
                "instruction": pc.coalesce(col["instruction"], col["prompt"]), "_line": lines}
    if kind == "scored":
        return {"sentence1": col["sentence1"], "sentence2": col["sentence2"],
                "score": pc.coalesce(col["label"], col["score"]), "_line": lines}
    return {"text": col["text"], "label": col["label"], "_line": lines}


def _all(mask) -> bool:
    """True when every value of a boolean array is true (null counts as false)."""
    import pyarrow.compute as pc

    return len(mask) == 0 or bool(pc.all(pc.fill_null(mask, False)).as_py())


def _nonblank(array) -> Any:
    """Per value: a string with a character that is not whitespace (Arrow's whitespace is Python's:
    tests/test_record_cache.py checks every code point)."""
    import pyarrow.compute as pc

    return pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(array)), 0)


def _required_str(array, allow_empty: bool = False) -> bool:

    if array.null_count:
        return False
    return allow_empty or _all(_nonblank(array))


def _optional_str(array) -> bool:
    import pyarrow.compute as pc

    present = pc.is_valid(array)
    return _all(pc.or_(pc.invert(present), pc.fill_null(_nonblank(array), False)))


def _string_list(array) -> bool:
    """A list of non-empty strings where present."""
    import pyarrow.compute as pc

    flat = pc.list_flatten(array)
    return flat.null_count == 0 and _all(_nonblank(flat))


def _check_corpus(col: dict, has_corpus: bool) -> bool:
    return _required_str(col["_id"]) and _required_str(col["text"], allow_empty=True)


def _side(col: dict, texts: str, ids: str, has_corpus: bool, required: bool):
    """The count of texts per row of one side, or None when a record breaks a rule (see _pair_texts)."""
    import pyarrow.compute as pc

    if not (_string_list(col[texts]) and _string_list(col[ids])):
        return None
    n_texts = pc.fill_null(pc.list_value_length(col[texts]), 0)
    ids_given = pc.is_valid(col[ids])
    n_ids = pc.fill_null(pc.list_value_length(col[ids]), 0)
    from_ids = pc.and_(pc.greater(n_ids, 0), pc.equal(n_texts, 0))
    if not has_corpus and not _all(pc.invert(from_ids)):
        return None
    mismatch = pc.and_(pc.and_(ids_given, pc.invert(from_ids)), pc.not_equal(n_ids, n_texts))
    if not _all(pc.invert(mismatch)):
        return None
    count = pc.if_else(from_ids, n_ids, n_texts)
    if required and not _all(pc.greater(count, 0)):
        return None
    return count


def _scores(col: dict, name: str, count) -> bool:
    import pyarrow.compute as pc

    scores = col[name]
    if scores.null_count == len(scores):
        return True
    flat = pc.list_flatten(scores)
    if flat.null_count or not _all(pc.is_finite(flat)):
        return False
    lengths = pc.list_value_length(scores)
    return _all(pc.or_(pc.is_null(lengths), pc.equal(lengths, count)))


def _check_pairs(col: dict, has_corpus: bool) -> bool:
    import pyarrow.compute as pc

    if not _required_str(col["query"]):
        return False
    pos = _side(col, "pos", "pos_ids", has_corpus, required=True)
    if pos is None:
        return False
    neg = _side(col, "neg", "neg_ids", has_corpus, required=False)
    if neg is None:
        return False
    if not (_scores(col, "pos_scores", pos) and _scores(col, "neg_scores", neg)):
        return False
    if not all(_optional_str(col[name]) for name in ("type", "key", "instruction", "prompt", "query_id", "task")):
        return False
    both = pc.and_(pc.is_valid(col["instruction"]), pc.is_valid(col["prompt"]))
    return _all(pc.invert(both))


def _check_scored(col: dict, has_corpus: bool) -> bool:
    import pyarrow.compute as pc

    if not (_required_str(col["sentence1"]) and _required_str(col["sentence2"]) and _optional_str(col["key"])):
        return False
    score, label = col["score"], col["label"]
    exactly_one = pc.xor(pc.is_valid(score), pc.is_valid(label))
    return _all(exactly_one) and _all(pc.is_finite(pc.coalesce(label, score)))


def _check_labeled(col: dict, has_corpus: bool) -> bool:
    return _required_str(col["text"]) and _required_str(col["label"])


_FAST_CHECKS = {"corpus": _check_corpus, "pairs": _check_pairs, "scored": _check_scored, "labeled": _check_labeled}


# ---------------------------------------------------------------------------------------------------


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="the data cache's converter (started by RecordCache)")
    parser.add_argument("command", choices=["convert"])
    parser.add_argument("job", help="the job, as JSON")
    args = parser.parse_args(argv)
    # Imported before the workers fork (importing starts no thread), so that none imports them again.
    import pyarrow.compute  # noqa: F401
    import pyarrow.ipc  # noqa: F401
    import pyarrow.json  # noqa: F401

    job = {**json.loads(args.job), "fork_workers": True}
    result_path = Path(job["out"]) / "result.json"
    try:
        convert(job)
        result = {"ok": True}
    except RecordError as e:
        result = {"error": {"path": e.path, "line": e.line, "field": e.field, "message": e.message}}
    result_path.write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
