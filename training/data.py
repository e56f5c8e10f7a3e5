"""Training data: the tasks, the step sampler, and tokenization in DataLoader workers.

Every optimizer step, the schedule (training.schedule.assign_tasks) gives each rank a task. The
ranks given the same task take consecutive slices, in rank order, of that task's sample stream:
the rows of the data set in a permutation fixed by (seed, data set, epoch), epoch after epoch. Every
rank computes the whole assignment, so all ranks agree on every stream's position without talking,
and a step's rows depend only on (seed, step, world size, the position at the start), never on the
number of DataLoader workers (its store negatives are fixed when it is planned, a prefetch ahead).

The sampler state is one cursor (epoch, position) per data set. Each batch carries the state
*after* it, so the trainer checkpoints exactly what it has consumed, however far the DataLoader has
prefetched; a resumed run continues from that state without replaying data. Which store negatives
a query trains with, the sampler asks the trainer's NegativesRuntime (training/negatives_runtime.py)
when it makes a plan, up to a prefetch ahead of the plan's step; the plan carries the answer.

Negatives of a retrieval query, first source that exists:
  1. the negative store (RUN/negatives), for a data set with a corpus and num_negatives > 0 once the
     trainer uses a store version mined for its pairs file and corpus: the query's candidates minus
     its positives, at the ranks the plan names (Conan's window i = ranks
     [neg_offset + (i - 1) * m, neg_offset + i * m), m = num_negatives);
  2. the `neg` texts of the pairs file (m drawn per epoch, repeated when fewer);
  3. none: in-batch negatives only (m = 0), when no record has `neg` and there is no store.
A query short of m negatives is topped up with random corpus passages (a data set whose records
lack `neg` must then have a corpus).

The DataLoader runs with batch_size=None: the sampler yields one BatchPlan per step, and the worker
turns it into a RetrievalBatch or STSBatch of tensors (reading texts, negatives from the
memory-mapped store, tokenizing).
"""
from __future__ import annotations

import copy
import signal
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator, Protocol

import numpy as np
import torch

from embedlib.encoder import tokenize
from embedlib.negstore import NegativeStore, NegativeVersion
from embedlib.records import (
    RecordError,
    corpus_fingerprint,
    queries_fingerprint,
    read_corpus,
    read_labeled_texts,
    read_pairs,
    read_scored_pairs,
)
from training.config import Config, ConfigError, DatasetConfig
from training.dynamic_negatives import fit_ranks
from training.schedule import assign_tasks

# Plans are made this many steps ahead of training per DataLoader worker (DataLoader's prefetch_factor).
PREFETCH_PER_WORKER = 2


def prefetch_steps(num_workers: int) -> int:
    """How many steps ahead of training the sampler plans (0 without workers)."""
    return num_workers * PREFETCH_PER_WORKER


# ---------------------------------------------------------------------------------------------------
# Tasks: the records of one data set, and how row i becomes texts


@dataclass(frozen=True)
class StoreSource:
    """How a retrieval data set reads the negative store (it has a corpus and num_negatives > 0)."""

    run_dir: str  # whose RUN/negatives
    fingerprints: tuple[str, str]  # (queries, corpus): what a store version must be mined for
    rule: str  # negatives.rule, which decides how ranks wrap at the end of a list
    num_negatives: int  # n per query
    rank_offset: int  # the top candidates skipped (data set neg_offset)


@dataclass
class RetrievalTask:
    name: str
    batch_size: int
    num_negatives: int  # m per query without a store version: the `neg` texts, or 0 (in-batch only)
    queries: list[str]  # instruction prefix applied
    positives: list[list[str]]
    negatives: list[list[str]]  # the pairs file's `neg` texts
    positive_rows: list[list[int]]  # corpus rows of the positives (to keep them out of store negatives)
    passages: list[str] | None  # corpus passages in file order, for store ids and top-ups
    store: StoreSource | None = None
    kind: str = "retrieval"
    loss_kind: ClassVar[str] = "retrieval"
    _opened: NegativeVersion | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.queries)

    def example(self, row: int, epoch: int, seed: int, ranks: tuple[int, ...] | None = None,
                version: int | None = None) -> tuple[str, str, list[str]]:
        """(query, positive, negatives) of a row. With a store `version`, the negatives are the
        candidates at `ranks` (DynamicNegativeState.negative_ranks) of the row's list in that version."""
        rng = np.random.default_rng([seed, row, epoch])
        positives = self.positives[row]
        positive = positives[int(rng.integers(len(positives)))]
        if version is not None:
            m = len(ranks)
            negatives = self._store_negatives(row, ranks, version)
        else:
            m = self.num_negatives
            if m == 0:
                return self.queries[row], positive, []
            pool = self.negatives[row]
            negatives = [pool[i] for i in rng.permutation(len(pool))[:m]] if len(pool) >= m else list(pool)
            negatives = (negatives * m)[:m] if negatives else []
        return self.queries[row], positive, negatives + self._random_passages(row, m - len(negatives), rng)

    def _store_negatives(self, row: int, ranks: tuple[int, ...], version: int) -> list[str]:
        """The row's candidates at `ranks`, counted after its positives are removed; slots past a short
        list are left out (topped up by the caller)."""
        if self._opened is None or self._opened.version != version:
            if self._opened is not None:
                self._opened.close()  # unpin the old version, so the store's gc may remove it
            # The training process holds `version` open (pinned against gc) while plans name it and
            # verified its checksums before the first plan did, so opening it here is safe and cheap.
            self._opened = NegativeStore(self.store.run_dir).open(version, verify=False)
        ids, _ = self._opened.candidates(row)
        ids = ids[~np.isin(ids, self.positive_rows[row])]
        store = self.store
        fitted = fit_ranks(np.asarray(ranks, np.int64), len(ids), store.rule, store.num_negatives, store.rank_offset)
        return [self.passages[ids[rank]] for rank in fitted if rank >= 0]

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

    def __getstate__(self):  # an open store version (file locks, memory maps) stays in its process
        state = self.__dict__.copy()
        state["_opened"] = None
        return state


@dataclass
class ClassificationTask:
    """Labelled texts trained as retrieval: positive = another text of the same label, negatives =
    texts of other labels."""

    name: str
    batch_size: int
    num_negatives: int
    texts: list[str]
    queries: list[str]  # texts with the instruction prefix
    labels: list[str]
    rows_of_label: dict[str, list[int]]
    kind: str = "classification"
    loss_kind: ClassVar[str] = "retrieval"

    def __len__(self) -> int:
        return len(self.texts)

    def example(self, row: int, epoch: int, seed: int) -> tuple[str, str, list[str]]:
        rng = np.random.default_rng([seed, row, epoch])
        label = self.labels[row]
        same = self.rows_of_label[label]
        other = same[int(rng.integers(len(same) - 1))]
        other = other if other != row else same[-1]  # a uniform draw among the same label, minus row
        negatives = []
        while len(negatives) < self.num_negatives:
            i = int(rng.integers(len(self.texts)))
            if self.labels[i] != label:
                negatives.append(self.texts[i])
        return self.queries[row], self.texts[other], negatives


@dataclass
class STSTask:
    name: str
    batch_size: int
    first: list[str]
    second: list[str]
    scores: list[float]
    kind: str = "sts"
    loss_kind: ClassVar[str] = "sts"

    def __len__(self) -> int:
        return len(self.scores)


Task = RetrievalTask | ClassificationTask | STSTask


def load_tasks(config: Config) -> list[Task]:
    """Read and check every data file fully (RecordError names file, line and field) and build the tasks."""
    return [_load_task(d, i, config) for i, d in enumerate(config.data)]


def _load_task(d: DatasetConfig, index: int, config: Config) -> Task:
    if not Path(d.path).exists():
        raise ConfigError(f"data.{index}.path: {d.path} does not exist")
    if d.corpus is not None and not Path(d.corpus).exists():
        raise ConfigError(f"data.{index}.corpus: {d.corpus} does not exist")

    if d.kind == "sts":
        pairs = read_scored_pairs(d.path)[: d.limit]
        _require_rows(pairs, d, 2)
        return STSTask(d.name, d.batch_size, [p.sentence1 for p in pairs], [p.sentence2 for p in pairs],
                       [p.score for p in pairs])

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
        return ClassificationTask(d.name, d.batch_size, d.num_negatives, [r.text for r in records],
                                  [_with_instruction(d.instruction, r.text) for r in records],
                                  [r.label for r in records], dict(rows_of_label))

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
    return RetrievalTask(
        name=d.name, batch_size=d.batch_size, num_negatives=m,
        queries=[_with_instruction(p.instruction or d.instruction, p.query) for p in pairs],
        positives=[p.pos for p in pairs], negatives=[p.neg for p in pairs],
        positive_rows=[[row_of_id[i] for i in (p.pos_ids or []) if i in row_of_id] for p in pairs],
        passages=[doc.passage for doc in docs] if docs else None,
        # The store's rows are the whole pairs file's queries (limit or not), its ids the corpus rows.
        store=StoreSource(config.run_dir, (queries_fingerprint([p.query for p in all_pairs]), corpus_fingerprint(docs)),
                          config.negatives.rule, d.num_negatives, d.neg_offset) if uses_store else None,
    )


def _with_instruction(instruction: str | None, text: str) -> str:
    return f"{instruction}{text}" if instruction else text


def _require_rows(rows: list, d: DatasetConfig, minimum: int) -> None:
    if len(rows) < minimum:
        raise RecordError(d.path, None, None, f"has {len(rows)} usable records; task {d.name!r} needs {minimum}")


# ---------------------------------------------------------------------------------------------------
# The sampler


@dataclass
class SamplerState:
    """Where every data set's stream stands: per data set [epoch, position in that epoch's permutation]."""

    cursors: list[list[int]]

    @classmethod
    def initial(cls, tasks: list[Task]) -> SamplerState:
        return cls(cursors=[[0, 0] for _ in tasks])

    def to_dict(self) -> dict:
        return {"cursors": self.cursors}

    @classmethod
    def from_dict(cls, data: dict, tasks: list[Task]) -> SamplerState:
        state = cls(cursors=[list(c) for c in data["cursors"]])
        if len(state.cursors) != len(tasks):
            raise ConfigError("the checkpoint's data state does not fit the configured data sets "
                              "(data sets were added or removed since it was written)")
        return state


@dataclass(frozen=True)
class PlannedNegatives:
    """Store negatives of one batch, fixed when it is planned: the store version in use then (DataLoader
    workers hold their own copy of the task, so the plan names it), each row's negative ranks in its
    candidate list, and each row's DynamicNegativeState generation (to drop stale scores at sync)."""

    version: int
    ranks: tuple[tuple[int, ...], ...]
    generations: tuple[int, ...]


class NegativesPlanner(Protocol):
    """What the sampler asks about store negatives (training/negatives_runtime.NegativesRuntime)."""

    def plan(self, task_name: str, rows: tuple[int, ...]) -> PlannedNegatives | None: ...


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


class StepSampler:
    """Yields this rank's BatchPlan for step start_step, start_step + 1, ... (endless).

    `negatives` (the trainer's NegativesRuntime) is asked, when a plan is made, which store negatives
    its rows train with; that is up to a prefetch ahead of the plan's step.
    """

    def __init__(self, tasks: list[Task], weights: dict[str, float], world_size: int, rank: int, seed: int,
                 mode: str, start_step: int, state: SamplerState, negatives: NegativesPlanner | None = None):
        self.tasks, self.weights, self.world_size, self.rank = tasks, weights, world_size, rank
        self.seed, self.mode, self.start_step = seed, mode, start_step
        self.state = copy.deepcopy(state)
        self.negatives = negatives

    def _permutation(self, task_index: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, task_index, epoch]).permutation(len(self.tasks[task_index]))

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
            mine = None
            for rank, name in enumerate(assignment):
                task_index = index_of[name]
                taken = self._take(task_index, self.tasks[task_index].batch_size)
                if rank == self.rank:
                    mine = (task_index, taken)
            task_index, taken = mine
            rows = tuple(r for r, _ in taken)
            negatives = self.negatives.plan(self.tasks[task_index].name, rows) if self.negatives else None
            yield BatchPlan(step=step, task_index=task_index, rows=rows, epochs=tuple(e for _, e in taken),
                            assignment=tuple(assignment), cursors_after=copy.deepcopy(self.state.cursors),
                            negatives=negatives)
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
    negatives: PlannedNegatives | None  # where the negatives came from, when from the store
    loss_kind: ClassVar[str] = "retrieval"


@dataclass
class STSBatch(StepBatch):
    first: dict[str, torch.Tensor]  # tokenized first sentences [b, L]
    second: dict[str, torch.Tensor]
    score: torch.Tensor  # [b] gold similarity
    loss_kind: ClassVar[str] = "sts"


class StepDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by BatchPlan: returns the tokenized batch of that plan."""

    def __init__(self, tasks: list[Task], tokenizer, max_length: int, seed: int):
        self.tasks, self.tokenizer, self.max_length, self.seed = tasks, tokenizer, max_length, seed

    def __getitem__(self, plan: BatchPlan) -> RetrievalBatch | STSBatch:
        task = self.tasks[plan.task_index]
        common = {"step": plan.step, "task": task.name, "assignment": plan.assignment,
                  "cursors_after": plan.cursors_after}
        if isinstance(task, STSTask):
            return STSBatch(**common,
                            first=tokenize(self.tokenizer, [task.first[r] for r in plan.rows], self.max_length),
                            second=tokenize(self.tokenizer, [task.second[r] for r in plan.rows], self.max_length),
                            score=torch.tensor([task.scores[r] for r in plan.rows], dtype=torch.float32))
        if plan.negatives is not None:
            examples = [task.example(r, e, self.seed, ranks, plan.negatives.version)
                        for r, e, ranks in zip(plan.rows, plan.epochs, plan.negatives.ranks)]
        else:
            examples = [task.example(r, e, self.seed) for r, e in zip(plan.rows, plan.epochs)]
        queries = [q for q, _, _ in examples]
        # Positives first, then every query's negatives in order: one passage forward per step.
        passages = [p for _, p, _ in examples] + [n for _, _, negs in examples for n in negs]
        return RetrievalBatch(**common, query=tokenize(self.tokenizer, queries, self.max_length),
                              passages=tokenize(self.tokenizer, passages, self.max_length),
                              num_negatives=len(examples[0][2]), rows=plan.rows, negatives=plan.negatives)


def make_loader(tasks: list[Task], tokenizer, config: Config, world_size: int, rank: int, start_step: int,
                state: SamplerState, negatives: NegativesPlanner | None = None) -> torch.utils.data.DataLoader:
    weights = {d.name: d.weight for d in config.data}
    sampler = StepSampler(tasks, weights, world_size, rank, config.seed, config.train.schedule_mode, start_step,
                          state, negatives)
    workers = config.train.num_workers
    return torch.utils.data.DataLoader(
        StepDataset(tasks, tokenizer, config.model.max_length, config.seed),
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
