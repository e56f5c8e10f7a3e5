"""One generation job: a shard of the corpus x templates x samples, through a backend, into the output.

Work items are (passage, template, sample index). `concurrency` workers each take the next item not
already final in the output, ask the backend, and parse the reply; a single writer gathers outcomes into
chunks, applies the filters that need the whole picture (round trip, de-duplication), appends the chunk
and fsyncs it. Only the writer touches files and the de-duplication state, so there are no locks.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

from embedlib.atomic import atomic_write_json
from embedlib.progress import make_progress
from embedlib.records import Document
from rich.progress import TextColumn

from .backends import FatalBackendError, Generation, GenerationFailed
from .corpus import ShardCorpus, stable_hash, shard_of  # noqa: F401 - shard_of: the job's sharding, tested
from .filters import Deduplicator, RoundTripFilter, language_ok
from .output import FAILED, REJECTED, WRITTEN, Key, OutputPaths, OutputWriter, ResumeState, ShardLock
from .templates import Rejected, Template, parse_reply

log = logging.getLogger("data_gen")


class Backend(Protocol):
    name: str

    async def generate(self, messages: list[dict], seed: int) -> Generation: ...


@dataclass
class JobConfig:
    output_dir: Path
    generator: str  # the model name written into provenance
    samples: int = 1  # samples per (passage, template)
    seed: int = 0
    shard: int = 0
    num_shards: int = 1
    max_docs: int | None = None  # only the shard's first N passages (trial runs)
    concurrency: int = 32
    chunk_size: int = 64  # outcomes per append + fsync...
    flush_seconds: float = 10.0  # ...or fewer, when this long has passed
    max_failures: int = 100  # failed work items (after retries) before the job gives up
    max_passage_chars: int = 6000
    roundtrip_encoder: str | None = None
    roundtrip_k: int = 10
    show_progress: bool = True


@dataclass(frozen=True)
class WorkItem:
    doc: Document
    template: Template
    sample_index: int
    seed: int
    row: int = -1  # the passage's corpus row
    duplicate_of: str | None = None  # an earlier passage (in any shard) has the same text: not generated from

    @property
    def key(self) -> Key:
        return (self.doc.id, self.template.name, self.sample_index)


@dataclass
class Outcome:
    item: WorkItem
    status: str  # "candidate" (parsed, not yet through the writer's filters), REJECTED or FAILED
    fields: dict | None = None
    reason: str = ""
    detail: str = ""
    completion_tokens: int = 0


@dataclass
class RunCounts:
    skipped: int = 0
    written: int = 0
    rejected: Counter = field(default_factory=Counter)  # by reason
    failed: Counter = field(default_factory=Counter)
    completion_tokens: int = 0
    torn_lines_cut: int = 0


class Job:
    def __init__(self, config: JobConfig, backend: Backend, corpus: ShardCorpus, templates: list[Template]):
        """corpus: this shard's passages (config.shard of config.num_shards, the first max_docs), streamed
        from the corpus file whenever they are needed."""
        self.config = config
        self.backend = backend
        self.templates = templates
        self.corpus = corpus
        self.paths = OutputPaths.for_shard(config.output_dir, config.shard, config.num_shards)
        self.total = len(corpus) * len(templates) * config.samples
        self.counts = RunCounts()
        self.dedup = Deduplicator()
        self.roundtrip: RoundTripFilter | None = None
        self.status, self.message = "running", ""
        self.elapsed = 0.0

    # -- work ------------------------------------------------------------------------------------

    def _items(self, state: ResumeState) -> Iterator[WorkItem]:
        for passage in self.corpus:
            doc = passage.doc
            for template in self.templates:
                for i in range(self.config.samples):
                    key = (doc.id, template.name, i)
                    if not state.is_final(key):
                        seed = stable_hash(f"{self.config.seed}\0{doc.id}\0{template.name}\0{i}") % 2 ** 31
                        yield WorkItem(doc, template, i, seed, passage.row, passage.duplicate_of)

    async def _process(self, item: WorkItem) -> Outcome:
        if item.duplicate_of is not None:  # decided from the corpus alone: the same in every shard and run
            return Outcome(item, REJECTED, reason="duplicate", detail=f"same passage as {item.duplicate_of!r}")
        if not item.doc.passage.strip():
            return Outcome(item, REJECTED, reason="empty_passage")
        messages = item.template.render(item.doc, self.config.max_passage_chars)
        try:
            generation = await self.backend.generate(messages, item.seed)
        except GenerationFailed as e:
            return Outcome(item, FAILED, reason=e.reason, detail=e.detail)
        tokens = generation.completion_tokens
        try:
            fields = parse_reply(item.template, generation.text)
            for name, value in fields.items():
                if isinstance(value, str) and not language_ok(value, item.template.language):
                    raise Rejected("language", f"{name} is not {item.template.language}: {value[:100]!r}")
        except Rejected as e:
            return Outcome(item, REJECTED, reason=e.reason, detail=e.detail, completion_tokens=tokens)
        return Outcome(item, "candidate", fields=fields, completion_tokens=tokens)

    # -- writing ---------------------------------------------------------------------------------

    def _record(self, outcome: Outcome) -> dict:
        item, fields = outcome.item, outcome.fields
        provenance = {
            "generator": self.config.generator,
            "backend": self.backend.name,
            "template": item.template.name,
            "language": item.template.language,
            "source_id": item.doc.id,
            "sample_index": item.sample_index,
            "seed": item.seed,
        }
        if item.template.kind == "sts":
            return {**fields, "provenance": provenance}
        content = item.doc.passage if item.template.kind == "query" else (item.doc.text or item.doc.passage)
        record = {"query": fields.get("query") or fields["title"], "pos": [content], "neg": [],
                  "pos_ids": [item.doc.id]}
        if item.template.task:
            record["task"] = item.template.task
        if item.template.instruction:
            record["instruction"] = item.template.instruction
        record["provenance"] = provenance
        return record

    async def _flush(self, chunk: list[Outcome], writer: OutputWriter, state: ResumeState) -> None:
        candidates = [o for o in chunk if o.status == "candidate"]
        if self.roundtrip is not None:
            checked = [o for o in candidates if o.item.template.kind != "sts"]
            queries = [o.fields.get("query") or o.fields["title"] for o in checked]
            passed = await asyncio.to_thread(self.roundtrip.passes, queries, [o.item.row for o in checked])
            for outcome, ok in zip(checked, passed):
                if not ok:
                    outcome.status, outcome.reason = REJECTED, "roundtrip"
                    outcome.detail = f"source passage not in the top {self.config.roundtrip_k}"
        lines: dict[Path, list[dict]] = {self.paths.pairs: [], self.paths.sts: [], self.paths.outcomes: []}
        for outcome in chunk:
            if outcome.status == "candidate":
                if self.dedup.add(outcome.fields):
                    outcome.status = WRITTEN
                    path = self.paths.sts if outcome.item.template.kind == "sts" else self.paths.pairs
                    lines[path].append(self._record(outcome))
                else:
                    outcome.status, outcome.reason, outcome.detail = REJECTED, "duplicate", str(outcome.fields)[:200]
            if outcome.status in (REJECTED, FAILED):
                source_id, template, sample_index = outcome.item.key
                lines[self.paths.outcomes].append({
                    "source_id": source_id, "template": template, "sample_index": sample_index,
                    "outcome": outcome.status, "reason": outcome.reason, "detail": outcome.detail[:500]})
        await asyncio.to_thread(writer.append, lines)
        for outcome in chunk:  # counted once durable
            state.outcome[outcome.item.key] = outcome.status
            self.counts.completion_tokens += outcome.completion_tokens
            if outcome.status == WRITTEN:
                self.counts.written += 1
            elif outcome.status == REJECTED:
                self.counts.rejected[outcome.reason] += 1
            else:
                self.counts.failed[outcome.reason] += 1

    # -- the run ---------------------------------------------------------------------------------

    async def run(self) -> ResumeState:
        self.paths.directory.mkdir(parents=True, exist_ok=True)
        self.paths.check_sharding(self.config.num_shards)
        lock = ShardLock(self.paths.lock)
        try:
            return await self._run()
        finally:
            lock.release()

    async def _run(self) -> ResumeState:
        state = ResumeState.load(self.paths)
        self.counts.torn_lines_cut = state.torn_lines
        for fields in state.written_fields:
            self.dedup.add(fields)
        self.counts.skipped = sum(1 for p in self.corpus for t in self.templates for i in range(self.config.samples)
                                  if state.is_final((p.doc.id, t.name, i)))
        if self.config.roundtrip_encoder:
            self.roundtrip = RoundTripFilter(self.config.roundtrip_encoder, self.corpus, self.config.roundtrip_k,
                                             cache_dir=self.paths.directory)
        log.info("shard %d/%d: %d passages (%d duplicates of earlier ones), %d work items, %d already done",
                 self.config.shard, self.config.num_shards, len(self.corpus), len(self.corpus.duplicate_of),
                 self.total, self.counts.skipped)

        items = self._items(state)
        # Unbounded, so that ending never blocks: outcomes pile up only while the writer fsyncs.
        results: asyncio.Queue[Outcome | None] = asyncio.Queue()
        stop = asyncio.Event()
        fatal: list[FatalBackendError] = []

        async def worker() -> None:
            for item in items:  # one shared generator: next() never awaits, so no item is taken twice
                if stop.is_set():
                    return
                try:
                    outcome = await self._process(item)
                except FatalBackendError as e:
                    fatal.append(e)
                    stop.set()
                    return
                await results.put(outcome)

        async def all_workers() -> None:
            try:
                async with asyncio.TaskGroup() as group:
                    for _ in range(self.config.concurrency):
                        group.create_task(worker())
            finally:
                results.put_nowait(None)

        loop = asyncio.get_running_loop()
        interrupted: list[int] = []

        def on_signal(sig: int) -> None:
            interrupted.append(sig)
            stop.set()
            results.put_nowait(None)  # wake the writer: it flushes what it has and ends

        for sig in (signal.SIGINT, signal.SIGTERM):  # SLURM sends SIGTERM before a time limit
            loop.add_signal_handler(sig, on_signal, sig)
        writer = OutputWriter(self.paths)
        start = time.monotonic()
        with make_progress(TextColumn("{task.fields[stats]}"), disable=not self.config.show_progress) as progress:
            task = progress.add_task("generate", total=self.total, completed=self.counts.skipped, stats="")
            producer = asyncio.create_task(all_workers())
            chunk: list[Outcome] = []
            last_flush = time.monotonic()
            try:
                while True:
                    timeout = max(0.0, self.config.flush_seconds - (time.monotonic() - last_flush))
                    try:
                        outcome = await asyncio.wait_for(results.get(), timeout)
                    except TimeoutError:
                        outcome = "tick"  # time to flush what there is
                    if isinstance(outcome, Outcome):
                        chunk.append(outcome)
                    done = outcome is None or stop.is_set()
                    if chunk and (done or len(chunk) >= self.config.chunk_size
                                  or time.monotonic() - last_flush >= self.config.flush_seconds):
                        await self._flush(chunk, writer, state)
                        progress.update(task, advance=len(chunk), stats=self._stats(time.monotonic() - start))
                        chunk, last_flush = [], time.monotonic()
                        failed = sum(self.counts.failed.values())
                        if failed > self.config.max_failures:
                            self.status = "aborted"
                            self.message = (f"{failed} work items failed, more than --max-failures "
                                            f"{self.config.max_failures} ({dict(self.counts.failed)}); "
                                            f"is the backend up and answering?")
                            stop.set()
                    if done:
                        break
            finally:
                producer.cancel()  # requests still in flight are dropped: their items stay to do
                await asyncio.gather(producer, return_exceptions=True)
                writer.close()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
        if not producer.cancelled() and producer.exception() is not None:
            raise producer.exception()  # a bug, not an outcome
        if fatal:
            self.status, self.message = "aborted", str(fatal[0])
        elif interrupted:
            self.status = "interrupted"
            self.message = f"stopped by {signal.Signals(interrupted[0]).name}; run again to finish"
        elif self.status == "running":
            self.status = "complete"
        self.elapsed = time.monotonic() - start
        return state

    def _stats(self, elapsed: float) -> str:
        c = self.counts
        return (f"ok {c.written}  skipped {c.skipped}  rejected {sum(c.rejected.values())}  "
                f"failed {sum(c.failed.values())}  {c.completion_tokens / max(elapsed, 1e-9):.0f} tok/s")

    def summary(self, state: ResumeState, extra: dict) -> dict:
        """The machine-readable record of this run and of the shard's output as a whole."""
        c = self.counts
        by_template: dict[str, Counter] = defaultdict(Counter)
        for passage in self.corpus:
            for template in self.templates:
                for i in range(self.config.samples):
                    by_template[template.name][state.outcome.get((passage.doc.id, template.name, i), "pending")] += 1
        totals = Counter()
        for counter in by_template.values():
            totals.update(counter)
        elapsed = self.elapsed
        return {
            "status": self.status,
            "message": self.message,
            "shard": self.config.shard,
            "num_shards": self.config.num_shards,
            "passages": len(self.corpus),
            "duplicate_passages": len(self.corpus.duplicate_of),
            "work_items": self.total,
            "this_run": {
                "skipped": c.skipped,
                "written": c.written,
                "rejected": sum(c.rejected.values()),
                "failed": sum(c.failed.values()),
                "rejected_by_reason": dict(c.rejected),
                "failed_by_reason": dict(c.failed),
                "torn_lines_cut": c.torn_lines_cut,
                "completion_tokens": c.completion_tokens,
                "elapsed_s": round(elapsed, 3),
                "tokens_per_s": round(c.completion_tokens / elapsed, 1) if elapsed else 0.0,
            },
            # Over everything in the shard's files: written + rejected + failed + pending == work_items.
            "totals": {name: totals.get(name, 0) for name in (WRITTEN, REJECTED, FAILED, "pending")},
            "by_template": {name: dict(counter) for name, counter in by_template.items()},
            "templates": [t.name for t in self.templates],
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()},
            "files": {"pairs": self.paths.pairs.name, "sts": self.paths.sts.name,
                      "outcomes": self.paths.outcomes.name},
            **extra,
        }

    def write_summary(self, state: ResumeState, extra: dict) -> dict:
        summary = self.summary(state, extra)
        atomic_write_json(self.paths.summary, summary)
        return summary
