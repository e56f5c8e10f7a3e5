"""Training data: the tasks, the step sampler, and tokenization in DataLoader workers.

Every optimizer step, the schedule (training.schedule.assign_tasks) gives each rank a task. Each task
has a sample stream: the rows of the data set in a permutation fixed by (seed, data set, epoch), epoch
after epoch. The ranks given the same task at a step either take consecutive slices of it in rank order
(STS always; retrieval and classification with loss.cbb_negatives=gathered), or all take the same
rows, with the same positives, and each a different slice of every query's hard negatives
(loss.cbb_negatives=shared_queries, Conan-embedding's CBB: the r-th of the N ranks takes the r-th group
of n; see training/negatives/plan.py). Every rank computes the whole assignment, so all ranks agree on
every stream's position without talking, and a step's rows depend only on (seed, step, world size, the
position at the start), never on the number of DataLoader workers (its store negatives are fixed when
it is planned, a prefetch ahead).

The sampler state is one cursor (epoch, position) per data set. Each batch carries the state
*after* it, so the trainer checkpoints exactly what it has consumed, however far the DataLoader has
prefetched; a resumed run continues from that state without replaying data. Which store negatives
a query trains with, the sampler asks the trainer's NegativesRuntime (training/negatives/) when it makes
a plan, up to a prefetch ahead of the plan's step; the plan carries the answer.

Negatives of a retrieval query, first source that exists:
  1. the negative store (RUN/negatives), for a data set with a corpus and num_negatives > 0 once the
     trainer uses a store version mined for its pairs file and corpus: the query's candidates minus
     its positives, at the ranks of this rank's slice of the window the plan names (Conan's window i =
     ranks [neg_offset + (i - 1) N m, neg_offset + i N m), m = num_negatives, N the ranks sharing the
     query), read by the DataLoader worker (training/negatives/source.py) with their mining scores;
  2. the `neg` texts of the pairs file (drawn per epoch in one order for all ranks sharing the query,
     each taking its own m; repeated when fewer);
  3. none: in-batch negatives only (m = 0), when no record has `neg` and there is no store.
A query short of m negatives is topped up with random corpus passages (a data set whose records
lack `neg` must then have a corpus). Classification texts are trained as retrieval: the positive is another
text of the query's label, the negatives texts of other labels, and the batch carries each text's label so
that the loss leaves every candidate of the query's own label out of its denominator.

The DataLoader runs with batch_size=None: the sampler yields one BatchPlan per step, and the worker
turns it into a RetrievalBatch or STSBatch of tensors (reading texts, negatives from the
memory-mapped store, tokenizing).

Where the records live (train.data_cache): by default every data file is converted once into
memory-mapped Arrow files (embedlib/record_cache.py, RUN/data_cache), and a task's fields (queries,
positives, passages, ...) are read-only sequence views over them: a row's texts are read when a batch
needs them, so a rank's memory does not grow with the data, and the task code below is the same for
both sources. `train.data_cache=null` reads every file into Python lists on every rank instead (the
reference the views are tested against). Each task carries its data's content fingerprint; the
sampler state, and so every checkpoint, records them, and a resume on other data is an error.
"""
from __future__ import annotations

import copy
import dataclasses
import glob
import hashlib
import json
import signal
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator

import numpy as np
import torch

from embedlib.encoder import tokenize
from embedlib.record_cache import CachedTable, CorpusTable, RecordCache, resolve_shards, source_fingerprint
from embedlib.records import (
    RecordError,
    corpus_fingerprint,
    queries_fingerprint,
    read_corpus,
    read_labeled_texts,
    read_pairs,
    read_scored_pairs,
)
from embedlib.rundir import DATA_CACHE
from training.config import Config, ConfigError, DatasetConfig
from training.negatives import BatchNegatives, NegativesRuntime, PlannedNegatives, StoreReader, StoreSpec
from training.schedule import assign_tasks, ranks_per_task

# Plans are made this many steps ahead of training per DataLoader worker (DataLoader's prefetch_factor).
PREFETCH_PER_WORKER = 2


def prefetch_steps(num_workers: int) -> int:
    """How many steps ahead of training the sampler plans (0 without workers)."""
    return num_workers * PREFETCH_PER_WORKER


# ---------------------------------------------------------------------------------------------------
# Tasks: the records of one data set, and how row i becomes texts


@dataclass
class RetrievalTask:
    name: str
    batch_size: int
    num_negatives: int  # m per query without a store version: the `neg` texts, or 0 (in-batch only)
    # Lists (train.data_cache=null) or views over the data cache, indexed by row alike:
    queries: Sequence[str]  # instruction prefix applied
    positives: Sequence[list[str]]
    negatives: Sequence[list[str]]  # the pairs file's `neg` texts
    positive_rows: Sequence[list[int]]  # corpus rows of the positives (to keep them out of store negatives)
    passages: Sequence[str] | None  # corpus passages in file order, for store ids and top-ups
    store: StoreSpec | None = None  # how it reads the negative store (a corpus and num_negatives > 0)
    kind: str = "retrieval"
    loss_kind: ClassVar[str] = "retrieval"
    fingerprint: str = ""  # the content of its data (see data_fingerprint)

    def __len__(self) -> int:
        return len(self.queries)

    def example(self, row: int, epoch: int, seed: int, store_rows: Sequence[int] | None = None,
                slice_index: int = 0) -> tuple[str, str, list[str]]:
        """(query, positive, negatives) of a row. `store_rows`: the corpus rows of this rank's store
        negatives (-1: none there, topped up). `slice_index`: the r-th of the ranks sharing the query,
        which draws the same positive as the others and negatives of its own."""
        rng = np.random.default_rng([seed, row, epoch])
        positives = self.positives[row]
        positive = positives[int(rng.integers(len(positives)))]
        own = rng if slice_index == 0 else np.random.default_rng([seed, row, epoch, slice_index])
        if store_rows is not None:
            m = len(store_rows)
            negatives = [self.passages[r] for r in store_rows if r >= 0]
        else:
            m = self.num_negatives
            if m == 0:
                return self.queries[row], positive, []
            negatives = self._pair_negatives(row, m, slice_index, rng)
        return self.queries[row], positive, negatives + self._random_passages(row, m - len(negatives), own)

    def _pair_negatives(self, row: int, m: int, slice_index: int, rng: np.random.Generator) -> list[str]:
        """m of the pairs file's `neg` texts: the slice_index-th m of one order drawn for all ranks sharing
        the query; repeated when the list is short."""
        pool = self.negatives[row]
        if len(pool) >= (slice_index + 1) * m:
            order = rng.permutation(len(pool))
            return [pool[i] for i in order[slice_index * m:(slice_index + 1) * m]]
        if not pool:
            return []
        if slice_index == 0:  # fewer than m: all of them, repeated
            return (list(pool) * m)[:m]
        order = rng.permutation(len(pool))
        return [pool[order[(slice_index * m + j) % len(pool)]] for j in range(m)]

    def _random_passages(self, row: int, count: int, rng: np.random.Generator) -> list[str]:
        if count <= 0:
            return []
        if not self.passages:
            raise RuntimeError(f"task {self.name}: query row {row} lacks negatives and there is no corpus")
        chosen: list[str] = []
        while len(chosen) < count:
            i = int(rng.integers(len(self.passages)))
            if i not in self.positive_rows[row]:
                chosen.append(self.passages[i])
        return chosen


@dataclass
class ClassificationTask:
    """Labelled texts trained as retrieval: positive = another text of the same label, negatives =
    texts of other labels. Labels are numbered by first appearance."""

    name: str
    batch_size: int
    num_negatives: int
    texts: Sequence[str]
    queries: Sequence[str]  # texts with the instruction prefix
    labels: Sequence[int]  # each row's label number
    rows_of_label: dict  # label number -> its rows, ascending
    kind: str = "classification"
    loss_kind: ClassVar[str] = "retrieval"
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    def draw(self, row: int, epoch: int, seed: int, slice_index: int = 0) -> tuple[int, list[int]]:
        """(the positive's row, the negatives' rows) of a row. The negatives are distinct texts of other
        labels, drawn in one order for every rank sharing the query: the r-th (slice_index) takes the r-th
        group of num_negatives, so no two ranks share one (unless the other labels hold too few texts)."""
        rng = np.random.default_rng([seed, row, epoch])
        label = self.labels[row]
        same = self.rows_of_label[label]
        other = same[int(rng.integers(len(same) - 1))]
        other = other if other != row else same[-1]  # a uniform draw among the same label, minus row
        m = self.num_negatives
        wanted = (slice_index + 1) * m
        available = len(self.texts) - len(same)
        drawn: list[int] = []
        while len(drawn) < min(wanted, available):  # rejection sampling: no list of the other labels' rows
            i = int(rng.integers(len(self.texts)))
            if self.labels[i] != label and i not in drawn:
                drawn.append(i)
        if not drawn:
            return int(other), []
        return int(other), [drawn[(slice_index * m + j) % len(drawn)] for j in range(m)]

    def example(self, row: int, epoch: int, seed: int, slice_index: int = 0) -> tuple[str, str, list[str]]:
        other, negatives = self.draw(row, epoch, seed, slice_index)
        return self.queries[row], self.texts[other], [self.texts[i] for i in negatives]

    def label_key(self, row: int) -> int:
        """A number equal for two texts exactly when they are of this data set and share a label: what the
        loss compares to leave a query's own label out of its denominator (non-negative; -1 is no label)."""
        return ((zlib.crc32(self.name.encode()) & 0x7FFFFFFF) << 32) | int(self.labels[row])


@dataclass
class STSTask:
    name: str
    batch_size: int
    first: Sequence[str]
    second: Sequence[str]
    scores: Sequence[float]
    kind: str = "sts"
    loss_kind: ClassVar[str] = "sts"
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.scores)


Task = RetrievalTask | ClassificationTask | STSTask


def load_tasks(config: Config, world_size: int = 1) -> list[Task]:
    """Check every data file fully (RecordError names file, line and field) and build the tasks: over the
    data cache (train.data_cache, converted first where needed), or read into memory when it is off.
    `world_size` fixes how many ranks share a data set's queries (StoreSpec.sharing_ranks)."""
    cache = data_cache(config)
    tasks = []
    for i, d in enumerate(config.data):
        tasks.append(_load_task(d, i, config) if cache is None else _load_cached_task(d, i, config, cache))
    sharing = ranks_sharing_queries(config, world_size)
    for task in tasks:
        if isinstance(task, RetrievalTask) and task.store is not None:
            task.store = dataclasses.replace(task.store, sharing_ranks=sharing[task.name])
    return tasks


def shared_query_tasks(config: Config) -> frozenset[str]:
    """The data sets whose ranks all train the same queries at a step (loss.cbb_negatives=shared_queries:
    every retrieval and classification data set; STS ranks always take pairs of their own)."""
    if config.loss.cbb_negatives != "shared_queries":
        return frozenset()
    return frozenset(d.name for d in config.data if d.kind != "sts")


def ranks_sharing_queries(config: Config, world_size: int) -> dict[str, int]:
    """N per data set: the ranks that train the same queries at a step it is trained in (1 for a data set
    whose ranks take queries of their own)."""
    weights = {d.name: d.weight for d in config.data}
    shared = shared_query_tasks(config)
    per_task = ranks_per_task(world_size, weights, config.train.schedule_mode) if shared else {}
    return {name: per_task[name] if name in shared else 1 for name in weights}


def samples_in_step(assignment: Sequence[str], batch_size_of: dict[str, int], shared: frozenset[str]) -> int:
    """Training samples of a step over all ranks (queries or sentence pairs): a batch shared by the ranks
    of a data set counts once."""
    counted = [name for rank, name in enumerate(assignment) if name not in shared or name not in assignment[:rank]]
    return sum(batch_size_of[name] for name in counted)


def data_cache(config: Config) -> RecordCache | None:
    """The record cache of train.data_cache: "auto" is RUN/data_cache; null: none (lists in memory)."""
    where = config.train.data_cache
    if where is None:
        return None
    return RecordCache(Path(config.run_dir) / DATA_CACHE if where == "auto" else Path(where))


def data_fingerprint(task: Task, content: str) -> str:
    """What a checkpoint records of a task's data: its kind, its rows (a limit counts) and the content
    fingerprint of its files (embedlib.record_cache's: the same with and without the cache)."""
    return hashlib.sha256(json.dumps([task.kind, len(task), content]).encode()).hexdigest()


def _check_paths(d: DatasetConfig, index: int, cached: bool) -> None:
    for key, spec in (("path", d.path), ("corpus", d.corpus)):
        if spec is None:
            continue
        if not cached:
            if not Path(spec).exists():
                raise ConfigError(f"data.{index}.{key}: {spec} does not exist")
            if not Path(spec).is_file():
                raise ConfigError(f"data.{index}.{key}: {spec} is not a file; a directory or pattern of shards "
                                  "needs the data cache (train.data_cache)")
            continue
        if not Path(spec).exists() and not glob.has_magic(spec):
            raise ConfigError(f"data.{index}.{key}: {spec} does not exist")
        try:
            resolve_shards(spec)
        except RecordError as error:
            raise ConfigError(f"data.{index}.{key}: {error}") from None


def _load_task(d: DatasetConfig, index: int, config: Config) -> Task:
    """The reference loader: every record in Python lists, on every rank."""
    _check_paths(d, index, cached=False)

    if d.kind == "sts":
        pairs = read_scored_pairs(d.path)[: d.limit]
        _require_rows(pairs, d, 2)
        task = STSTask(d.name, d.batch_size, [p.sentence1 for p in pairs], [p.sentence2 for p in pairs],
                       [p.score for p in pairs])
        task.fingerprint = data_fingerprint(task, source_fingerprint("scored", d.path))
        return task

    if d.kind == "classification":
        records = read_labeled_texts(d.path)[: d.limit]
        _require_rows(records, d, 2)
        rows_of_label: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(records):
            rows_of_label[r.label].append(i)
        lonely = [label for label, rows in rows_of_label.items() if len(rows) < 2]
        if lonely:
            raise RecordError(d.path, None, "label", f"label {lonely[0]!r} has one text; classification "
                                                     "needs at least two per label (one is the positive)")
        if d.num_negatives and len(rows_of_label) < 2:
            raise RecordError(d.path, None, "label", "only one label: no texts to draw negatives from")
        number = {label: i for i, label in enumerate(rows_of_label)}  # by first appearance, as the cache numbers
        task = ClassificationTask(d.name, d.batch_size, d.num_negatives, [r.text for r in records],
                                  [_with_instruction(d.instruction, r.text) for r in records],
                                  [number[r.label] for r in records],
                                  {number[label]: rows for label, rows in rows_of_label.items()})
        task.fingerprint = data_fingerprint(task, source_fingerprint("labeled", d.path))
        return task

    docs = read_corpus(d.corpus) if d.corpus else None
    if docs is not None and not docs:
        raise RecordError(d.corpus, None, None, f"holds no passages; data.{index}.corpus must be a non-empty corpus "
                                                "(or leave it out)")
    row_of_id = {doc.id: i for i, doc in enumerate(docs)} if docs else {}
    all_pairs = read_pairs(d.path, corpus={doc.id: doc for doc in docs} if docs else None)
    pairs = all_pairs[: d.limit]
    _require_rows(pairs, d, 1)
    m = d.num_negatives if any(p.neg for p in pairs) else 0
    if m and docs is None:
        missing = next((p for p in pairs if not p.neg), None)
        if missing is not None:
            raise RecordError(d.path, missing.line, "neg", f"empty, while other records have negatives; give "
                                                           f"every record negatives or set data.{index}.corpus")
    uses_store = bool(docs) and d.num_negatives > 0
    corpus_fp = corpus_fingerprint(docs) if docs else None
    task = RetrievalTask(
        name=d.name, batch_size=d.batch_size, num_negatives=m,
        queries=[_with_instruction(p.instruction or d.instruction, p.query) for p in pairs],
        positives=[p.pos for p in pairs], negatives=[p.neg for p in pairs],
        positive_rows=[[row_of_id[i] for i in (p.pos_ids or []) if i in row_of_id] for p in pairs],
        passages=[doc.passage for doc in docs] if docs else None,
        # The store's rows are the whole pairs file's queries (limit or not), its ids the corpus rows.
        store=StoreSpec(d.name, (queries_fingerprint([p.query for p in all_pairs]), corpus_fp), len(pairs),
                        d.num_negatives, d.neg_offset, config.negatives.rule) if uses_store else None,
    )
    task.fingerprint = data_fingerprint(task, source_fingerprint("pairs", d.path, corpus_fp))
    return task


def _load_cached_task(d: DatasetConfig, index: int, config: Config, cache: RecordCache) -> Task:
    """The same task as _load_task, its fields views over the data cache (same checks, same errors)."""
    _check_paths(d, index, cached=True)
    n = None  # rows used: the first `limit` (every record is checked all the same)

    if d.kind == "sts":
        table = cache.scored_pairs(d.path)
        n = min(len(table), d.limit or len(table))
        _require_count(n, d, 2)
        task = STSTask(d.name, d.batch_size, _Column(table, "sentence1", n), _Column(table, "sentence2", n),
                       _Column(table, "score", n))
        task.fingerprint = data_fingerprint(task, table.fingerprint)
        return task

    if d.kind == "classification":
        table = cache.labeled_texts(d.path)
        n = min(len(table), d.limit or len(table))
        _require_count(n, d, 2)
        rows_of_label = _RowsOfLabel(table, n)
        lonely = rows_of_label.first_lonely()
        if lonely is not None:
            raise RecordError(d.path, None, "label", f"label {lonely!r} has one text; classification "
                                                     "needs at least two per label (one is the positive)")
        if d.num_negatives and rows_of_label.num_labels < 2:
            raise RecordError(d.path, None, "label", "only one label: no texts to draw negatives from")
        task = ClassificationTask(d.name, d.batch_size, d.num_negatives, _Column(table, "text", n),
                                  _Column(table, "text", n, prefix=d.instruction), _LabelCodes(table, n), rows_of_label)
        task.fingerprint = data_fingerprint(task, table.fingerprint)
        return task

    corpus = None
    if d.corpus:
        if all(p.stat().st_size == 0 for p in resolve_shards(d.corpus)):  # before anything is written
            raise RecordError(d.corpus, None, None, f"holds no passages; data.{index}.corpus must be a non-empty "
                                                    "corpus (or leave it out)")
        corpus = cache.corpus(d.corpus)
        if len(corpus) == 0:
            raise RecordError(d.corpus, None, None, f"holds no passages; data.{index}.corpus must be a non-empty "
                                                    "corpus (or leave it out)")
    table = cache.pairs(d.path, corpus)
    n = min(len(table), d.limit or len(table))
    _require_count(n, d, 1)
    stats = table.manifest["stats"]
    has_neg = stats["first_row_with_neg"] is not None and stats["first_row_with_neg"] < n
    m = d.num_negatives if has_neg else 0
    if m and corpus is None:
        missing = stats["first_row_without_neg"]
        if missing is not None and missing < n:
            path, line = table.where(missing)
            raise RecordError(path, line, "neg", f"empty, while other records have negatives; give "
                                                 f"every record negatives or set data.{index}.corpus")
    uses_store = corpus is not None and d.num_negatives > 0
    task = RetrievalTask(
        name=d.name, batch_size=d.batch_size, num_negatives=m,
        queries=_Queries(table, n, d.instruction),
        positives=_Texts(table, "pos", corpus, n), negatives=_Texts(table, "neg", corpus, n),
        positive_rows=_PositiveRows(table, n, corpus is not None),
        passages=_Passages(corpus) if corpus is not None else None,
        store=StoreSpec(d.name, (table.manifest["queries_fingerprint"], corpus.corpus_fingerprint), n,
                        d.num_negatives, d.neg_offset, config.negatives.rule) if uses_store else None,
    )
    task.fingerprint = data_fingerprint(task, table.fingerprint)
    return task


def check_same_data(tasks: list[Task]) -> None:
    """Every rank, once torch.distributed is up: all ranks must train on the same data. A file that
    changed between one rank's start and another's would otherwise mix old and new records."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    mine = [t.fingerprint for t in tasks]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for i, task in enumerate(tasks):
        seen = {fingerprints[i] for fingerprints in everyone}
        if len(seen) > 1:
            raise ConfigError(f"data set {task.name!r} (data.{i}) differs between ranks: its files changed while the "
                              "ranks started; start again once they are complete")


# ---------------------------------------------------------------------------------------------------
# Task fields over the data cache: read-only sequences, a row's values read when a batch needs them


class _Column(Sequence):
    """Rows [0, n) of one column (optionally with an instruction prefix)."""

    def __init__(self, table: CachedTable, name: str, n: int, prefix: str | None = None):
        self.table, self.name, self.n, self.prefix = table, name, n, prefix

    def __len__(self) -> int:
        return self.n

    def _row(self, row) -> int:
        row = int(row)
        if row < 0:
            row += self.n
        if not 0 <= row < self.n:
            raise IndexError(row)
        return row

    def __getitem__(self, row):
        value = self.table.value(self.name, self._row(row))
        return _with_instruction(self.prefix, value) if self.prefix is not None else value


class _Queries(_Column):
    """A pair's query with its own instruction, else the data set's."""

    def __init__(self, table: CachedTable, n: int, instruction: str | None):
        super().__init__(table, "query", n)
        self.instruction = instruction

    def __getitem__(self, row):
        row = self._row(row)
        return _with_instruction(self.table.value("instruction", row) or self.instruction,
                                 self.table.value("query", row))


class _Texts(_Column):
    """A side of a pair as PairRecord.pos/neg holds it: its own texts, else its ids' corpus passages."""

    def __init__(self, table: CachedTable, side: str, corpus: CorpusTable | None, n: int):
        super().__init__(table, side, n)
        self.corpus = corpus

    def __getitem__(self, row):
        row = self._row(row)
        texts = self.table.value(self.name, row)
        if texts:
            return texts
        if self.corpus is not None and self.table.value(f"{self.name}_ids", row):
            return [self.corpus.passage(r) for r in self.table.value(f"{self.name}_rows", row)]
        return texts or []


class _PositiveRows(_Column):
    """The corpus rows of a pair's pos_ids (none without a corpus)."""

    def __init__(self, table: CachedTable, n: int, has_corpus: bool):
        super().__init__(table, "pos_rows", n)
        self.has_corpus = has_corpus

    def __getitem__(self, row):
        row = self._row(row)
        return (self.table.value("pos_rows", row) or []) if self.has_corpus else []


class _Passages(Sequence):
    """Every corpus passage, by row."""

    def __init__(self, corpus: CorpusTable):
        self.corpus = corpus

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, row):
        return self.corpus.passage(int(row))


class _LabelCodes(_Column):
    """A labelled text's label as a number (labels numbered by first appearance): compares as the
    label strings do, and indexes _RowsOfLabel."""

    def __init__(self, table: CachedTable, n: int):
        super().__init__(table, "label", n)
        self.codes = table.arrays["label_codes"]

    def __getitem__(self, row):
        return int(self.codes[self._row(row)])


class _RowsOfLabel:
    """label code -> its rows below n, ascending (ClassificationTask.rows_of_label), from the cache's
    label index: numpy slices of a memory-mapped array, no per-row Python objects."""

    def __init__(self, table: CachedTable, n: int):
        self.table, self.n = table, n
        self.order, self.starts = table.arrays["label_order"], table.arrays["label_starts"]
        self.counts = np.bincount(np.asarray(table.arrays["label_codes"][:n]), minlength=len(self.starts) - 1)
        self.num_labels = int((self.counts > 0).sum())

    def __getitem__(self, code: int) -> np.ndarray:
        rows = self.order[self.starts[code]: self.starts[code + 1]]
        return rows[: int(np.searchsorted(rows, self.n))]

    def first_lonely(self) -> str | None:
        """The first label (in order of first appearance) with exactly one text below n."""
        lonely = np.flatnonzero(self.counts == 1)
        if not len(lonely):
            return None
        return self.table.value("label", int(self.order[self.starts[lonely[0]]]))


def _with_instruction(instruction: str | None, text: str) -> str:
    return f"{instruction}{text}" if instruction else text


def _require_rows(rows: list, d: DatasetConfig, minimum: int) -> None:
    _require_count(len(rows), d, minimum)


def _require_count(count: int, d: DatasetConfig, minimum: int) -> None:
    if count < minimum:
        raise RecordError(d.path, None, None, f"has {count} usable records; task {d.name!r} needs {minimum}")


# ---------------------------------------------------------------------------------------------------
# The sampler


@dataclass
class SamplerState:
    """Where every data set's stream stands: per data set [epoch, position in that epoch's permutation];
    and the data it streams (each task's data fingerprint), so that a resume on other data is refused."""

    cursors: list[list[int]]
    fingerprints: list[str] | None = None

    @classmethod
    def initial(cls, tasks: list[Task]) -> SamplerState:
        return cls(cursors=[[0, 0] for _ in tasks], fingerprints=[t.fingerprint for t in tasks])

    def to_dict(self) -> dict:
        return {"cursors": self.cursors, "data_fingerprints": self.fingerprints}

    @classmethod
    def from_dict(cls, data: dict, tasks: list[Task]) -> SamplerState:
        state = cls(cursors=[list(c) for c in data["cursors"]], fingerprints=[t.fingerprint for t in tasks])
        if len(state.cursors) != len(tasks):
            raise ConfigError("the checkpoint's data state does not fit the configured data sets "
                              "(data sets were added or removed since it was written)")
        saved = data.get("data_fingerprints")  # absent in checkpoints written before it was recorded
        for i, task in enumerate(tasks):
            if saved is not None and saved[i] != task.fingerprint:
                raise ConfigError(f"data set {task.name!r} (data.{i}) is not the data the checkpoint was trained on: "
                                  "its records or its row count changed since; resume with that data, or start "
                                  "a new run_dir")
        return state


@dataclass(frozen=True)
class BatchPlan:
    """One rank's batch at one step: which rows of which task, and the sampler state after the step."""

    step: int
    task_index: int
    rows: tuple[int, ...]
    epochs: tuple[int, ...]
    assignment: tuple[str, ...]  # task name per rank at this step
    cursors_after: list[list[int]]  # every data set's cursor after this step
    negatives: PlannedNegatives | None = None  # None: no store version (pairs-file or in-batch negatives)
    slice_index: int = 0  # r of the ranks holding these same rows (0 when its rows are its own)


class StepSampler:
    """Yields this rank's BatchPlan for step start_step, start_step + 1, ... (endless).

    `shared` names the data sets whose ranks all train the same rows at a step (shared_query_tasks);
    the others' ranks take consecutive slices of the stream. `negatives` (the trainer's NegativesRuntime)
    is asked, when a plan is made, which store negatives its rows train with; that is up to a prefetch
    ahead of the plan's step.
    """

    def __init__(self, tasks: list[Task], weights: dict[str, float], world_size: int, rank: int, seed: int,
                 mode: str, start_step: int, state: SamplerState, negatives: NegativesRuntime | None = None,
                 shared: frozenset[str] = frozenset()):
        self.tasks, self.weights, self.world_size, self.rank = tasks, weights, world_size, rank
        self.seed, self.mode, self.start_step = seed, mode, start_step
        self.state = copy.deepcopy(state)
        self.negatives, self.shared = negatives, shared
        self._permutations: dict[int, tuple[int, np.ndarray]] = {}  # task -> (epoch, its permutation)

    def _permutation(self, task_index: int, epoch: int) -> np.ndarray:
        """The task's row order in `epoch`, computed once per epoch (10M rows: ~0.3 s and 80 MB while
        drawn) and kept as int32 (40 MB at 10M rows), the values of the int64 draw unchanged."""
        cached = self._permutations.get(task_index)
        if cached is None or cached[0] != epoch:
            rows = len(self.tasks[task_index])
            order = np.random.default_rng([self.seed, task_index, epoch]).permutation(rows)
            self._permutations[task_index] = (epoch, order.astype(np.int32 if rows < 2**31 else np.int64))
        return self._permutations[task_index][1]

    def _take(self, task_index: int, count: int) -> list[tuple[int, int]]:
        """The next `count` (row, epoch) of a task's stream, advancing its cursor."""
        cursor = self.state.cursors[task_index]
        taken: list[tuple[int, int]] = []
        while len(taken) < count:
            epoch, position = cursor
            permutation = self._permutation(task_index, epoch)
            chunk = permutation[position : position + count - len(taken)]
            taken.extend((int(row), epoch) for row in chunk)
            position += len(chunk)
            cursor[:] = [epoch + 1, 0] if position == len(permutation) else [epoch, position]
        return taken

    def __iter__(self) -> Iterator[BatchPlan]:
        index_of = {t.name: i for i, t in enumerate(self.tasks)}
        step = self.start_step
        while True:
            assignment = assign_tasks(step, self.world_size, self.weights, self.seed, self.mode)
            shared_rows: dict[str, list[tuple[int, int]]] = {}
            mine = None
            for rank, name in enumerate(assignment):
                task_index = index_of[name]
                if name in shared_rows:  # a later rank of a data set whose ranks share their rows
                    taken = shared_rows[name]
                else:
                    taken = self._take(task_index, self.tasks[task_index].batch_size)
                    if name in self.shared:
                        shared_rows[name] = taken
                if rank == self.rank:
                    mine = (task_index, taken, assignment[:rank].count(name) if name in self.shared else 0)
            task_index, taken, slice_index = mine
            rows = tuple(r for r, _ in taken)
            negatives = (self.negatives.plan(self.tasks[task_index].name, rows, slice_index)
                         if self.negatives else None)
            yield BatchPlan(step=step, task_index=task_index, rows=rows, epochs=tuple(e for _, e in taken),
                            assignment=tuple(assignment), cursors_after=copy.deepcopy(self.state.cursors),
                            negatives=negatives, slice_index=slice_index)
            step += 1


# ---------------------------------------------------------------------------------------------------
# Plans to batches (runs in DataLoader workers)


@dataclass
class StepBatch:
    """What every batch carries besides its tensors."""

    step: int  # the optimizer step it is for (0-based: the step that takes the run to step + 1)
    task: str  # its data set
    assignment: tuple[str, ...]  # every rank's data set at this step
    cursors_after: list[list[int]]  # SamplerState.cursors once this step is trained


@dataclass
class RetrievalBatch(StepBatch):
    """Retrieval and classification: queries, then every query's positive and its negatives."""

    query: dict[str, torch.Tensor]  # tokenized queries [n, L]
    passages: dict[str, torch.Tensor]  # tokenized: n positives, then each query's m negatives in order
    num_negatives: int  # m, the same for every row of a batch
    rows: tuple[int, ...]  # the data set rows of the queries
    store_negatives: BatchNegatives | None = None  # where the negatives came from, when from the store
    # Classification: the label key of each passage (positives, then negatives; ClassificationTask.label_key),
    # so that the loss leaves candidates of a query's own label out; None: no labels.
    passage_labels: torch.Tensor | None = None
    loss_kind: ClassVar[str] = "retrieval"


@dataclass
class STSBatch(StepBatch):
    first: dict[str, torch.Tensor]  # tokenized first sentences [b, L]
    second: dict[str, torch.Tensor]
    score: torch.Tensor  # [b] gold similarity
    rows: tuple[int, ...] = ()  # the data set rows of the pairs
    loss_kind: ClassVar[str] = "sts"


class StepDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by BatchPlan: returns the tokenized batch of that plan. Store negatives
    are read through `store` (a StoreReader of the run's negative store)."""

    def __init__(self, tasks: list[Task], tokenizer, max_length: int, seed: int, store: StoreReader | None = None):
        self.tasks, self.tokenizer, self.max_length, self.seed = tasks, tokenizer, max_length, seed
        self.store = store

    def __getitem__(self, plan: BatchPlan) -> RetrievalBatch | STSBatch:
        task = self.tasks[plan.task_index]
        common = {"step": plan.step, "task": task.name, "assignment": plan.assignment,
                  "cursors_after": plan.cursors_after}
        if isinstance(task, STSTask):
            return STSBatch(**common,
                            first=tokenize(self.tokenizer, [task.first[r] for r in plan.rows], self.max_length),
                            second=tokenize(self.tokenizer, [task.second[r] for r in plan.rows], self.max_length),
                            score=torch.tensor([task.scores[r] for r in plan.rows], dtype=torch.float32),
                            rows=plan.rows)
        store_negatives, labels = None, None
        if isinstance(task, ClassificationTask):
            draws = [task.draw(r, e, self.seed, plan.slice_index) for r, e in zip(plan.rows, plan.epochs)]
            examples = [(task.queries[r], task.texts[other], [task.texts[i] for i in negatives])
                        for r, (other, negatives) in zip(plan.rows, draws)]
            labels = torch.tensor([task.label_key(r) for r in plan.rows]
                                  + [task.label_key(i) for _, negatives in draws for i in negatives], dtype=torch.int64)
        elif plan.negatives is not None:
            examples, store_scores = [], []
            for i, (r, e) in enumerate(zip(plan.rows, plan.epochs)):
                window, scores = self.store.window(task.store, plan.negatives, i, r, task.positive_rows[r])
                own = window[plan.negatives.own_slice(len(window))]
                examples.append(task.example(r, e, self.seed, own, plan.slice_index))
                store_scores.append(scores)
            store_negatives = BatchNegatives(task.name, plan.rows, plan.negatives, np.stack(store_scores))
        else:
            examples = [task.example(r, e, self.seed, slice_index=plan.slice_index)
                        for r, e in zip(plan.rows, plan.epochs)]
        queries = [q for q, _, _ in examples]
        # Positives first, then every query's negatives in order: one passage forward per step.
        passages = [p for _, p, _ in examples] + [n for _, _, negs in examples for n in negs]
        return RetrievalBatch(**common, query=tokenize(self.tokenizer, queries, self.max_length),
                              passages=tokenize(self.tokenizer, passages, self.max_length),
                              num_negatives=len(examples[0][2]), rows=plan.rows, store_negatives=store_negatives,
                              passage_labels=labels)


def make_loader(tasks: list[Task], tokenizer, config: Config, world_size: int, rank: int, start_step: int,
                state: SamplerState, negatives: NegativesRuntime | None = None) -> torch.utils.data.DataLoader:
    weights = {d.name: d.weight for d in config.data}
    sampler = StepSampler(tasks, weights, world_size, rank, config.seed, config.train.schedule_mode, start_step,
                          state, negatives, shared=shared_query_tasks(config))
    workers = config.train.num_workers
    return torch.utils.data.DataLoader(
        StepDataset(tasks, tokenizer, config.model.max_length, config.seed, StoreReader(config.run_dir)),
        sampler=sampler, batch_size=None, collate_fn=_as_is, num_workers=workers,
        prefetch_factor=PREFETCH_PER_WORKER if workers else None, worker_init_fn=_leave_signals_to_the_trainer,
    )


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    # A cluster's SIGTERM reaches the whole process group; a worker that died of it would break the
    # DataLoader before the trainer could checkpoint. Workers exit with the trainer anyway.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _as_is(batch):
    return batch


def store_specs(tasks: list[Task]) -> list[StoreSpec]:
    """The data sets that read the negative store, for the NegativesRuntime."""
    return [t.store for t in tasks if isinstance(t, RetrievalTask) and t.store is not None]
