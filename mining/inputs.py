"""The corpus and the training queries as mining sees them: passages by row, positives and exclusions by query.

Both files are read through the data cache (embedlib/record_cache.py), the memory-mapped Arrow form the
trainer reads too: a corpus row's passage is read when a block of it is encoded, so a miner's memory
holds the embeddings, the query texts and the per-query row lists, not the corpus. The cache is
RUN/data_cache (the trainer's default, so one conversion serves both).

Nothing may be written before the inputs are known to be good, and the conversion is what checks them:
a file the cache does not hold yet is converted in a private staging directory (the system's temporary
directory) and moved into the cache only once corpus and pairs both passed every check. A bad record
is then one RecordError naming file, line and field, and the run directory is left as it was.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob as globlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedlib.record_cache import CachedTable, CorpusTable, DamagedEntry, RecordCache, open_table, resolve_shards
from embedlib.records import Document, PairRecord, RecordError
from embedlib.rundir import DATA_CACHE
from mining.spec import MiningError, MiningSpec



def run_data_cache(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / DATA_CACHE


# ---------------------------------------------------------------------------------------------------
# Corpus views: rows read from the mapped table when asked for


def _passage_column(batch, columns: dict):
    """Each row's passage (Document.passage: title, a space, text, stripped) as an Arrow string array.

    Arrow's whitespace is Python's (embedlib.record_cache relies on the same, and tests it)."""
    import pyarrow.compute as pc

    joined = pc.binary_join_element_wise(batch.column(columns["title"]), batch.column(columns["text"]), " ")
    return pc.utf8_trim_whitespace(joined)


class CorpusBatches:
    """Contiguous row ranges of a CorpusTable as Python lists, read batch by batch (zero copy until the
    strings are made), with the table's pages released after each range so the reader's resident size
    stays flat however much of the corpus it reads."""

    def __init__(self, table: CorpusTable):
        self.table = table
        self._batches = list(table.batches())
        sizes = [b.num_rows for b in self._batches]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self._columns = {name: i for i, name in enumerate(self._batches[0].schema.names)} if self._batches else {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def column_range(self, start: int, end: int, what: str) -> list:
        """Rows [start, end) of "passage", "id", "title" or "text"."""
        out: list = []
        if end <= start:
            return out
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        for b in range(first, len(self._batches)):
            lo = int(self._starts[b])
            if lo >= end:
                break
            batch = self._batches[b]
            piece = batch.slice(max(start - lo, 0), min(end, lo + batch.num_rows) - max(start, lo))
            values = _passage_column(piece, self._columns) if what == "passage" else piece.column(self._columns[what])
            out.extend(values.to_pylist())
        self.table.release_pages()
        return out

    def iter_passage_batches(self):
        """(first row, Arrow passages) of each stored batch, in file order."""
        for b, batch in enumerate(self._batches):
            yield int(self._starts[b]), _passage_column(batch, self._columns)
            self.table.release_pages()


class _RowView(Sequence):
    """A read-only sequence over rows; an int reads one row, a slice reads a contiguous range at once."""

    def __init__(self, corpus: CorpusBatches, read_range):
        self._corpus, self._read_range = corpus, read_range

    def __len__(self) -> int:
        return len(self._corpus)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            rows = self._read_range(start, stop) if stop > start else []
            return rows if step == 1 else rows[::step]
        row = int(index)
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(index)
        return self._read_range(row, row + 1)[0]


def passages_view(corpus: CorpusBatches) -> Sequence[str]:
    return _RowView(corpus, lambda start, end: corpus.column_range(start, end, "passage"))


def documents_view(corpus: CorpusBatches) -> Sequence[Document]:
    def read(start: int, end: int) -> list[Document]:
        ids, titles, texts = (corpus.column_range(start, end, name) for name in ("id", "title", "text"))
        return [Document(*values) for values in zip(ids, titles, texts)]

    return _RowView(corpus, read)


class _PairRecords(Sequence):
    """The pairs as PairRecords, read from the table row by row (texts resolved from ids are not filled in)."""

    def __init__(self, table: CachedTable):
        self._table = table

    def __len__(self) -> int:
        return len(self._table)

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        t = self._table
        _, line = t.where(int(row))
        return PairRecord(query=t.value("query", row), pos=t.value("pos", row) or [], neg=t.value("neg", row) or [],
                          query_id=t.value("query_id", row), pos_ids=t.value("pos_ids", row),
                          neg_ids=t.value("neg_ids", row), task=t.value("task", row),
                          instruction=t.value("instruction", row), line=line)


# ---------------------------------------------------------------------------------------------------
# Opening the cached tables, converting (staged) what the cache does not hold yet


def _existing(cache: RecordCache, kind: str, spec: str, corpus: CorpusTable | None = None) -> CachedTable | None:
    """The cache's sound entry for these files as they are now, or None (nothing is written)."""
    name, _, _ = cache.entry_name(kind, spec, corpus)
    directory = cache.root / name
    if not directory.is_dir():
        return None
    try:
        return open_table(directory)
    except (DamagedEntry, OSError, ValueError):
        return None  # converted again, and replaced when published


@contextlib.contextmanager
def _entry_lock(root: Path, lock_name: str):
    """RecordCache's own lock for a source (the same file, the same fcntl.lockf), so that a trainer
    converting the same file at the same moment and this publisher take turns."""
    (root / ".locks").mkdir(parents=True, exist_ok=True)
    with open(root / ".locks" / f"{lock_name}.lock", "a+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def _publish(staged: CachedTable, root: Path, lock_name: str) -> None:
    """Move a staged entry into the cache under its name, unless another process published it first."""
    from embedlib.atomic import publish_dir
    from embedlib.rundir import discard_dir

    final = root / staged.directory.name
    with _entry_lock(root, lock_name):
        if final.is_dir():
            try:
                open_table(final)
                return  # another rank or process published the same entry meanwhile
            except (DamagedEntry, OSError, ValueError):
                discard_dir(final)
        tmp = root / f".tmp-{staged.directory.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(staged.directory, tmp)  # same file system: a rename
        except OSError:
            shutil.copytree(staged.directory, tmp)  # the staging area is elsewhere: a copy
        try:
            publish_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _check_source(spec: str, what: str) -> None:
    """The one-line errors of a missing or unreadable input, as before the cache (named by what it is)."""
    path = Path(spec)
    if not path.exists() and not globlib.has_magic(spec):
        raise MiningError(f"{spec}: {what} file not found")
    try:
        resolve_shards(spec)
    except RecordError as e:
        raise MiningError(f"{spec}: cannot read the {what} file: {e.message}") from None
    except OSError as e:
        raise MiningError(f"{spec}: cannot read the {what} file: {e.strerror}") from None


def _all_empty(spec: str) -> bool:
    return all(p.stat().st_size == 0 for p in resolve_shards(spec))


def open_tables(corpus_spec: str | None, pairs_spec: str | None, cache_root: str | os.PathLike,
                pairs_what: str = "training pairs") -> tuple[CorpusTable | None, CachedTable | None]:
    """The corpus's and the pairs' cached tables (a pair's ids resolved into corpus rows when there is a
    corpus). What the cache lacks is converted in a staging directory and published into `cache_root`
    only when every file passed every check, so bad input writes nothing. MiningError (one line: file,
    line, field) if bad."""
    if corpus_spec is not None:
        _check_source(corpus_spec, "corpus")
        if _all_empty(corpus_spec):
            raise MiningError(f"{corpus_spec}: empty corpus: no documents to mine negatives from")
    if pairs_spec is not None:
        _check_source(pairs_spec, pairs_what)
        if _all_empty(pairs_spec):
            raise MiningError(f"{pairs_spec}: no {pairs_what}")
    cache = RecordCache(cache_root)

    def existing() -> tuple[CorpusTable | None, CachedTable | None, bool]:
        corpus = _existing(cache, "corpus", corpus_spec) if corpus_spec is not None else None
        if corpus_spec is not None and corpus is None:
            return None, None, False
        pairs = _existing(cache, "pairs", pairs_spec, corpus) if pairs_spec is not None else None
        return corpus, pairs, pairs_spec is None or pairs is not None

    corpus, pairs, complete = existing()
    if complete:
        return corpus, pairs

    with tempfile.TemporaryDirectory(prefix="mining-records-") as staging:
        staged_cache = RecordCache(staging)
        staged = []  # (table, lock name) to publish once everything passed
        try:
            if corpus_spec is not None and corpus is None:
                corpus = staged_cache.corpus(corpus_spec)
                staged.append((corpus, cache.entry_name("corpus", corpus_spec)[1]))
            if corpus is not None and len(corpus) == 0:
                raise MiningError(f"{corpus_spec}: empty corpus: no documents to mine negatives from")
            if pairs_spec is not None:
                pairs = staged_cache.pairs(pairs_spec, corpus)
                staged.append((pairs, cache.entry_name("pairs", pairs_spec, corpus)[1]))
                if len(pairs) == 0:
                    raise MiningError(f"{pairs_spec}: no {pairs_what}")
        except RecordError as e:
            if corpus is not None and e.field and e.field.startswith("pos_ids"):
                raise MiningError(f"{e} (is this the corpus the pairs were made from?)") from None
            raise MiningError(str(e)) from None
        root = Path(cache_root)
        try:
            for table, lock_name in staged:
                _publish(table, root, lock_name)
        except OSError as e:
            raise MiningError(f"{root}: cannot write the data cache: {e}") from None
    corpus, pairs, complete = existing()
    if not complete:
        raise MiningError(f"{cache_root}: a data cache entry just published does not open (did an input change "
                          "meanwhile?)")
    return corpus, pairs


# ---------------------------------------------------------------------------------------------------
# What a mining pass reads


@dataclass
class MiningInputs:
    docs: Sequence[Document]  # the corpus in file order, read from the data cache when indexed
    pairs: Sequence[PairRecord]  # the training pairs in file order, likewise
    corpus_fingerprint: str
    queries_fingerprint: str  # of the pairs' query texts in file order, without instructions
    query_texts: list[str]  # as encoded: instruction + query
    positive_rows: np.ndarray  # int64 [Q, P]: corpus rows of each query's positives, -1 padded
    excluded_rows: np.ndarray  # int64 [Q, E]: positives and rows whose passage equals the query or a
    #                            positive's text, -1 padded; never kept as negatives
    passages: Sequence[str] = ()  # Document.passage of each corpus row; a slice reads a block at once


def _padded(rows: list[list[int]]) -> np.ndarray:
    out = np.full((len(rows), max(1, max(map(len, rows), default=1))), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = sorted(r)
    return out


def _pair_rows(pairs: CachedTable):
    """(row, query, pos texts or None, corpus rows of pos_ids or None, instruction) of each pair, in order."""
    columns = None
    row = 0
    for batch in pairs.batches():
        if columns is None:
            columns = {name: i for i, name in enumerate(batch.schema.names)}
        queries = batch.column(columns["query"]).to_pylist()
        pos = batch.column(columns["pos"]).to_pylist()
        instructions = batch.column(columns["instruction"]).to_pylist()
        for i in range(batch.num_rows):
            yield row, queries[i], pos[i], pairs.value("pos_rows", row), instructions[i]
            row += 1
        pairs.release_pages()


def load_inputs(spec: MiningSpec, run_dir: str | os.PathLike | None = None,
                data_cache: str | os.PathLike | None = None) -> MiningInputs:
    """Check the corpus and pairs (through the data cache: RUN/data_cache, or `data_cache`) and index
    what mining needs; MiningError (one line, naming file, line and field) if bad."""
    if data_cache is None:
        if run_dir is None:
            raise ValueError("load_inputs needs the run directory or a data cache directory")
        data_cache = run_data_cache(run_dir)
    corpus_table, pairs_table = open_tables(spec.corpus, spec.pairs, data_cache)
    corpus = CorpusBatches(corpus_table)
    passages = passages_view(corpus)

    # Pass 1: every text a query or a positive has, to find the corpus rows with an equal passage.
    wanted: set[str] = set()
    positive_texts: list[list[str]] = []
    for _, query, pos, pos_rows, _ in _pair_rows(pairs_table):
        texts = pos if pos is not None else [passages[r] for r in pos_rows]
        positive_texts.append(texts)
        wanted.add(query)
        wanted.update(texts)
        if pos_rows is not None and pos is not None:
            wanted.update(passages[r] for r in pos_rows)
    rows_of_text: dict[str, list[int]] = {}
    if wanted:
        import pyarrow as pa
        import pyarrow.compute as pc

        wanted_array = pa.array(sorted(wanted), pa.string())
        for first_row, batch_passages in corpus.iter_passage_batches():
            hits = np.flatnonzero(pc.is_in(batch_passages, value_set=wanted_array).to_numpy(zero_copy_only=False))
            for i in hits:
                rows_of_text.setdefault(batch_passages[int(i)].as_py(), []).append(first_row + int(i))

    # Pass 2: each query's positive rows and excluded rows.
    positives, excluded, query_texts = [], [], []
    for row, query, pos, pos_rows, instruction in _pair_rows(pairs_table):
        texts = positive_texts[row]
        if pos_rows is not None:
            rows = list(pos_rows)
        else:
            rows = []
            for i, text in enumerate(texts):
                if text not in rows_of_text:
                    path, line = pairs_table.where(row)
                    raise MiningError(
                        f"{path}:{line}: field 'pos[{i}]': text not found among the corpus passages "
                        "(give pos_ids, or mine with the corpus the positives come from)"
                    )
                rows.extend(rows_of_text[text])
        all_texts = {query, *texts, *(passages[r] for r in rows)}
        same_text = {r for t in all_texts for r in rows_of_text.get(t, ())}
        positives.append(sorted(set(rows)))
        excluded.append(sorted(set(rows) | same_text))
        query_texts.append((instruction if instruction is not None else spec.query_instruction) + query)
    del positive_texts

    return MiningInputs(
        docs=documents_view(corpus),
        pairs=_PairRecords(pairs_table),
        corpus_fingerprint=corpus_table.corpus_fingerprint,
        queries_fingerprint=pairs_table.manifest["queries_fingerprint"],
        query_texts=query_texts,
        positive_rows=_padded(positives),
        excluded_rows=_padded(excluded),
        passages=passages,
    )
