"""One mining pass: encode, search, filter, publish a version. Used by the standalone job and the sidecar.

A pass is full (every corpus passage, through the shared embedding cache, embedlib.embedding_cache) or,
for the sidecar with a RefreshPlan, partial: only the passages that can matter for the next version
are encoded (the previous version's candidate lists, the training positives, and a random sample of
the rest of the corpus), and the whole corpus is searched with those new embeddings in place of the
last full pass's cached ones (an overlay, embedlib.search.RowBlocks); every `full_every`-th pass is full
again, and so is a partial one whose full pass's embeddings are no longer cached. A full pass of a
sidecar in partial mode also measures what a partial pass would have found with the same model
(`partial_recall`), so the shortcut's price is on record.

Under N ranks each rank encodes (or loads from the cache) its contiguous run of corpus blocks and
searches it with every query; rank 0 gathers the per-shard top lists, merges, filters and publishes.
No rank holds more than its shard's embeddings. Every rank encodes all queries itself (queries are
short next to the corpus, and identical batches on every rank keep the query vectors identical).

The published rows do not depend on the number of ranks: the blocks, and so the embeddings, are the
same; scores are recomputed exactly (embedlib.search) and ties go to the lower corpus row; and when the
filters leave a query with fewer than k candidates, the search for that query is repeated deeper
(doubling, up to max_depth) on all ranks rather than padding early.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embedlib.embedding_cache import (EmbeddingCache, block_ranges, encode_blocks, gigabytes, prune_cache,
                                      shard_of)
from embedlib.encoder import (EncodeStats, Encoder, EncoderError, is_encoder_export, model_fingerprint,
                              resolve_model_dir)
from embedlib.exports import MARKER, read_export_marker
from embedlib.negstore import CANDIDATES, NegativeStore, NegativeStoreError
from embedlib.rundir import utc_now
from embedlib.search import ApproximateIndex, ExactIndex, RowBlocks, exact_scores, gpu_count, merge_topk, recall_at_k
from mining.distributed import LocalComm
from embedlib.run_records import RefreshRecord
from mining.filters import FilterConfig, filter_candidates, nonpositive_positive_queries
from mining.inputs import MiningInputs, load_inputs
from mining.spec import REFRESHES_NAME, MiningError, MiningSpec, cache_root, mining_dir

log = logging.getLogger("mining")


@dataclass
class _Shard:
    """The contiguous corpus rows [start, start + num_rows) one process searches."""

    start: int  # first global corpus row
    num_rows: int
    index: ExactIndex | ApproximateIndex

    def to_global(self, ids: np.ndarray) -> np.ndarray:
        return np.where(ids >= 0, ids + self.start, -1)

    def to_local(self, global_rows: np.ndarray) -> np.ndarray:
        """Local row of each global row (-1 where it is padding or not in this shard)."""
        local = global_rows - self.start
        return np.where((global_rows >= 0) & (local >= 0) & (local < self.num_rows), local, -1)

    def search(self, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.index.search(queries, depth)
        return scores, self.to_global(ids)


@dataclass(frozen=True)
class RefreshPlan:
    """How the sidecar's passes mine. full_every = 1: every pass is full. n > 1: after a full pass come
    n - 1 partial ones, each encoding only the union of the previous version's candidate lists (their
    first `depth` candidates; None: all), the training positives (their scores set the positive-aware
    filter), and a seeded random `sample` fraction of the other rows; the other rows keep the embeddings
    of the last full pass, and the whole corpus is searched."""

    full_every: int = 1
    depth: int | None = None
    sample: float = 0.05


@dataclass
class _Previous:
    version: int
    candidates: np.ndarray  # int32 [Q, K], -1 padded
    partials_since_full: int  # partial versions since the last full one (0: this one is full)
    full_model: str | None = None  # fingerprint of the model of the last full pass (its cache entry)


def _previous_version(run_dir, num_queries: int) -> _Previous | None:
    """The newest published version (its candidates in memory), or None."""
    latest = NegativeStore(run_dir).open_latest(verify=False)
    if latest is None:
        return None
    with latest:
        candidates = np.load(latest.path / CANDIDATES, mmap_mode="r", allow_pickle=False)
        if candidates.shape[0] != num_queries:
            return None
        extra = latest.record.extra
        return _Previous(latest.version, np.array(candidates), int(extra.get("partials_since_full", 0)),
                         extra.get("full_model_fingerprint"))


def found_fraction(found: np.ndarray, reference: np.ndarray) -> float:
    """Share of the reference lists' entries (padding -1 ignored) that the found lists of the same
    queries hold, over all queries together (1.0 when the reference is empty)."""
    found, reference = np.asarray(found, dtype=np.int64), np.asarray(reference, dtype=np.int64)
    width = int(max(found.max(initial=0), reference.max(initial=0))) + 1
    query = np.arange(len(reference), dtype=np.int64)[:, None]
    keys = lambda rows: (query * width + rows)[rows >= 0]  # noqa: E731
    wanted = keys(reference)
    return float(np.isin(wanted, keys(found)).mean()) if wanted.size else 1.0


def partial_rows(previous: _Previous, positive_rows: np.ndarray, num_rows: int, plan: RefreshPlan) -> np.ndarray:
    """Sorted corpus rows of a partial refresh after `previous`: its candidates (first plan.depth of each
    list), every positive row, and round(plan.sample x the other rows) of the rest, drawn with a seed
    that is the previous version's number (a restarted sidecar, and the recall check of a full pass,
    draw the same)."""
    candidates = previous.candidates if plan.depth is None else previous.candidates[:, : plan.depth]
    chosen = np.zeros(num_rows, dtype=bool)
    for rows in (candidates, positive_rows):
        rows = np.asarray(rows).ravel()
        chosen[rows[rows >= 0]] = True
    rest = np.flatnonzero(~chosen)
    take = int(round(plan.sample * len(rest)))
    if take:
        chosen[np.random.default_rng(previous.version).choice(rest, size=take, replace=False)] = True
    return np.flatnonzero(chosen)


def check_run_dir(run_dir: str | os.PathLike, inputs: MiningInputs) -> None:
    """MiningError when the run's published negatives were mined for another corpus or other queries."""
    try:
        latest = NegativeStore(run_dir).open_latest(verify=False)
    except NegativeStoreError as e:
        raise MiningError(f"{run_dir}: unusable negative store: {e}") from None
    if latest is None:
        return
    with latest:
        manifest = latest.record
    for what, theirs, ours in (
        ("corpus", manifest.corpus_fingerprint, inputs.corpus_fingerprint),
        ("training queries", manifest.queries_fingerprint, inputs.queries_fingerprint),
    ):
        if theirs != ours:
            raise MiningError(
                f"{run_dir} belongs to another {what}: its negatives v{latest.version:06d} have {what} fingerprint "
                f"{str(theirs)[:12]}..., these inputs {ours[:12]}... (use a new run directory)"
            )


def _check_directory(path: Path, what: str) -> None:
    """MiningError when `path` or its nearest existing ancestor is not a directory: creating it would fail
    only after the model was loaded and the corpus encoded."""
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                raise MiningError(f"{what} {path}: {existing} exists and is not a directory")
            return


def check_inputs(spec: MiningSpec, run_dir: str | os.PathLike) -> MiningInputs:
    """Read and check the corpus and pairs, the run's store and the directories a pass writes to, before
    any model is loaded or anything written; MiningError (one line) when one is bad."""
    run_dir = Path(run_dir)
    for path, what in ((run_dir, "run directory"), (NegativeStore(run_dir).root, "negative store"),
                       (mining_dir(run_dir), "mining directory"), (cache_root(spec, run_dir), "cache directory")):
        _check_directory(path, what)
    inputs = load_inputs(spec, run_dir)
    check_run_dir(run_dir, inputs)
    return inputs


def prune_versions(run_dir: str | os.PathLike, keep: int) -> list[int]:
    """Remove all but the newest `keep` versions of the run's store, except those a live reader holds open
    (NegativeStore.gc); returns the removed ones. A failure to remove is logged, not raised: the pass
    that published already succeeded."""
    try:
        removed = NegativeStore(run_dir).gc(keep)
    except OSError as e:
        log.warning("could not remove old negatives versions: %s", e)
        return []
    if removed:
        log.info("removed negatives %s (keeping the newest %d and those a reader holds open)",
                 ", ".join(f"v{v:06d}" for v in removed), keep)
    return removed


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise MiningError(f"{model_dir}: model directory not found")
    if not (is_encoder_export(model_dir) or (model_dir / "config.json").is_file()):
        raise MiningError(f"{model_dir}: not an encoder export (no modules.json, config.json and safetensors "
                          "weights) nor a Hugging Face model directory")


def export_step(model_dir: Path) -> int:
    """The training step of an export (its export.json); 0 for a base model, which no training step made."""
    if (model_dir / MARKER).is_file():
        return int(read_export_marker(model_dir)["step"])
    return 0


def _load_encoder(model_dir: Path, spec: MiningSpec) -> tuple[Encoder, str]:
    try:
        fingerprint = model_fingerprint(model_dir)
        encoder = Encoder.from_pretrained(model_dir, max_length=spec.max_length)
    except (EncoderError, OSError, ValueError) as e:
        raise MiningError(f"{model_dir}: cannot load the encoder: {str(e).splitlines()[0]}") from None
    return encoder, fingerprint


def _append_record(run_dir: str | os.PathLike, record: dict) -> None:
    """One JSON line per pass, appended with a single write so a reader never sees half a record."""
    path = mining_dir(run_dir) / REFRESHES_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def _merged(comm, shard: _Shard, queries: np.ndarray, depth: int):
    """Global top-`depth` of `queries` on rank 0 (None elsewhere): every shard searches, rank 0 merges."""
    scores, ids = shard.search(queries, depth)
    all_scores, all_ids = comm.gather(scores), comm.gather(ids)
    return merge_topk(list(zip(all_scores, all_ids)), depth) if comm.rank == 0 else None


def _positive_scores(comm, shard: _Shard, queries: np.ndarray, positive_rows: np.ndarray) -> np.ndarray | None:
    """[Q, P] exact score of each positive (-inf padding) on rank 0, computed by the rank holding it."""
    local = shard.to_local(positive_rows)
    if shard.num_rows:
        scores = exact_scores(shard.index.corpus, queries, local)
    else:
        scores = np.full(local.shape, -np.inf, dtype=np.float32)
    gathered = comm.gather(scores)
    return np.max(gathered, axis=0) if comm.rank == 0 else None


def _search_and_filter(comm, shard: _Shard, queries: np.ndarray, inputs: MiningInputs,
                       positive_scores: np.ndarray | None, spec: MiningSpec, num_rows: int):
    """(ids [Q, k], scores [Q, k], number of deeper searches) on rank 0. Queries that the filters leave
    with fewer than k candidates are searched again twice as deep, by every rank, up to max_depth."""
    config = FilterConfig(spec.k, spec.positive_margin, spec.score_cap)
    excluded_width = int((inputs.excluded_rows >= 0).sum(axis=1).max())
    depth = min(spec.k + excluded_width + spec.search_slack, spec.max_depth, num_rows)
    ids = np.full((len(queries), spec.k), -1, dtype=np.int64)
    scores = np.full((len(queries), spec.k), np.nan, dtype=np.float32)
    todo = np.arange(len(queries))
    deepened = 0
    while len(todo):
        merged = _merged(comm, shard, queries[todo], depth)
        if comm.rank == 0:
            kept = filter_candidates(merged[0], merged[1], inputs.excluded_rows[todo], positive_scores[todo], config)
            ids[todo], scores[todo] = kept.ids, kept.scores
            short = kept.survivors < spec.k
            todo = todo[short] if depth < min(spec.max_depth, num_rows) else todo[:0]
        todo = comm.broadcast(todo if comm.rank == 0 else None)  # every rank joins the next round
        deepened += len(todo)
        depth = min(2 * depth, spec.max_depth, num_rows)
    return ids, scores, deepened


def mine(spec: MiningSpec, model_dir: str | os.PathLike, run_dir: str | os.PathLike, comm, *,
         model_step: int | None = None, mode: str = "mine", show_progress: bool = True,
         keep_versions: int | None = None, refresh: RefreshPlan | None = None) -> dict | None:
    """Mine negatives with the model in `model_dir` and publish the next version of RUN/negatives; then,
    with keep_versions, remove older versions (prune_versions), and bound the embedding cache
    (spec.cache_max_gb).

    refresh (the sidecar's; one process only): with full_every > 1 the pass is partial when fewer than
    full_every - 1 partial versions follow the last full one, and a full pass measures partial_recall.
    Returns the pass's record (also appended to RUN/mining/refreshes.jsonl) on rank 0, None elsewhere.
    Raises MiningError for bad inputs before the model is loaded or anything is written.
    """
    try:
        model_dir = resolve_model_dir(model_dir)
    except EncoderError as e:
        raise MiningError(str(e)) from None
    check_model_dir(model_dir)
    inputs = check_inputs(spec, run_dir)
    if refresh is not None and refresh.full_every > 1 and comm.world_size > 1:
        raise MiningError("partial refreshes run in one process (the sidecar's); got several ranks")
    step = export_step(model_dir) if model_step is None else model_step
    num_rows, num_queries = len(inputs.docs), len(inputs.pairs)
    previous = _previous_version(run_dir, num_queries) if refresh is not None and refresh.full_every > 1 else None
    partial_mode = refresh is not None and refresh.full_every > 1 and previous is not None
    partial = partial_mode and previous.partials_since_full < refresh.full_every - 1
    encoder, model_fp = _load_encoder(model_dir, spec)
    show_progress = show_progress and comm.rank == 0

    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{comm.local_rank % torch.cuda.device_count()}") if cuda else torch.device("cpu")
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[spec.encode_dtype]
    dtype_name = spec.encode_dtype if spec.encode_dtype != "auto" else ("bfloat16" if cuda else "float32")
    max_length = encoder.config.max_length
    cache = EmbeddingCache(cache_root(spec, run_dir), model_fp, inputs.corpus_fingerprint, max_length, dtype_name)
    all_blocks = block_ranges(num_rows, spec.block_rows)
    # A partial pass searches the last full pass's embeddings, where it re-encoded nothing: still cached?
    stale, stale_cache = None, None
    if partial_mode and previous.full_model is not None:  # None: a version published before passes named it
        stale_cache = EmbeddingCache(cache.root, previous.full_model, inputs.corpus_fingerprint, max_length, dtype_name)
        stale = [stale_cache.load(start, end, encoder.embedding_dim) for start, end in all_blocks]
        if any(block is None for block in stale):
            stale = None
        else:
            stale_cache.touch()  # in use: the bound and the sidecar's model gc keep the most recent
    if partial and stale is None:
        log.info("the embeddings of the last full pass are no longer cached: this pass is full")
        partial = False
    my_blocks = [] if partial else shard_of(all_blocks, comm.rank, comm.world_size)

    started = time.perf_counter()
    subset = None
    if partial:  # only the passages that can matter; nothing cached (an entry holds whole blocks)
        subset = partial_rows(previous, inputs.positive_rows, num_rows, refresh)
        passages = inputs.passages
        passage_stats = EncodeStats()
        embeddings = encoder.encode([passages[r] for r in subset], batch_size=spec.batch_size,
                                    max_length=max_length, device=device, dtype=dtype, show_progress=show_progress,
                                    stats=passage_stats)
        # float16: the precision of a full pass's cached blocks
        shard_embeddings = RowBlocks(stale, overlay=(subset, embeddings.astype(np.float16)))
        hits, encoded_rows = 0, len(subset)
    else:
        corpus = encode_blocks(encoder, inputs.passages, my_blocks, cache, batch_size=spec.batch_size,
                               max_length=max_length, device=device, dtype=dtype, show_progress=show_progress)
        shard_embeddings, hits, encoded_rows, passage_stats = corpus.blocks, corpus.hits, corpus.encoded_rows, corpus.stats
    query_stats = EncodeStats()
    queries = encoder.encode(inputs.query_texts, batch_size=spec.batch_size,
                             max_length=spec.query_max_length or max_length, device=device, dtype=dtype,
                             show_progress=show_progress, stats=query_stats)
    del encoder
    encode_seconds = time.perf_counter() - started

    started = time.perf_counter()
    gpus = [comm.local_rank % gpu_count()] if comm.world_size > 1 and gpu_count() else None
    if partial:
        shard = _Shard(0, num_rows, ExactIndex(shard_embeddings, device=spec.device, gpus=gpus))
        searchable = num_rows
    else:
        shard_start = my_blocks[0][0] if my_blocks else 0
        shard_rows = sum(end - start for start, end in my_blocks)
        if spec.index == "exact" or shard_rows == 0:
            index = ExactIndex(shard_embeddings, device=spec.device, gpus=gpus)
        else:
            index = ApproximateIndex(shard_embeddings, spec.index, nlist=spec.nlist, nprobe=spec.nprobe,
                                     hnsw_m=spec.hnsw_m, ef_search=spec.ef_search)
        shard = _Shard(shard_start, shard_rows, index)
        searchable = num_rows

    positive_scores = _positive_scores(comm, shard, queries, inputs.positive_rows)
    ids, scores, deepened = _search_and_filter(comm, shard, queries, inputs, positive_scores, spec, searchable)

    recall = None
    if spec.index != "exact" and not partial:
        sample = np.unique(np.linspace(0, num_queries - 1, min(spec.recall_sample, num_queries)).astype(np.int64))
        exact_shard = _Shard(shard_start, shard_rows, ExactIndex(shard_embeddings, device=spec.device, gpus=gpus))
        approx = _merged(comm, shard, queries[sample], spec.k)
        exact = _merged(comm, exact_shard, queries[sample], spec.k)
        if comm.rank == 0:
            recall = recall_at_k(approx[1], exact[1])
            log.info("approximate search (%s): recall@%d = %.4f against exact search on %d queries",
                     spec.index, spec.k, recall, len(sample))
    partial_recall = None
    if partial_mode and not partial and stale is not None:  # what a partial pass would have found with this model
        rows = partial_rows(previous, inputs.positive_rows, num_rows, refresh)
        overlay = RowBlocks(stale, overlay=(rows, shard.index.corpus.gather(rows).astype(np.float16)))
        sub_shard = _Shard(0, num_rows, ExactIndex(overlay, device=spec.device))
        sub_positive = _positive_scores(LocalComm(), sub_shard, queries, inputs.positive_rows)
        sub_ids, _, _ = _search_and_filter(LocalComm(), sub_shard, queries, inputs, sub_positive, spec, num_rows)
        partial_recall = found_fraction(sub_ids, ids)
    previous_recall = found_fraction(previous.candidates, ids) if previous is not None and comm.rank == 0 else None
    search_seconds = time.perf_counter() - started

    # Rank 0 reports the slowest rank's times, and the cache hits and encoding figures of all ranks.
    stats = comm.gather(np.array([encode_seconds, search_seconds, hits, encoded_rows, passage_stats.tokens,
                                  passage_stats.padded_tokens, passage_stats.seconds], dtype=np.float64))
    if comm.rank != 0:
        comm.barrier()
        return None
    stats = np.stack(stats)
    short_queries = int((ids[:, -1] < 0).sum())
    kind = "partial" if partial else "full"
    since = previous.partials_since_full + 1 if partial else 0
    extra = {
        "mode": mode, "k": spec.k, "positive_margin": spec.positive_margin, "score_cap": spec.score_cap,
        "index": spec.index, "query_instruction": spec.query_instruction, "max_length": max_length,
        "model_fingerprint": model_fp, "short_queries": short_queries, "refresh": kind,
        "partials_since_full": since, "searched_passages": searchable,
        "full_model_fingerprint": previous.full_model if partial else model_fp,
    }
    version = NegativeStore(run_dir).publish(
        ids.astype(np.int32), scores, corpus_fingerprint=inputs.corpus_fingerprint,
        queries_fingerprint=inputs.queries_fingerprint, model_path=str(model_dir.resolve()), model_step=step,
        corpus_size=num_rows, extra=extra)
    comm.barrier()
    tokens, padded = stats[:, 4].sum() + query_stats.tokens, stats[:, 5].sum() + query_stats.padded_tokens
    padding_fraction = float(1 - tokens / padded) if padded else 0.0
    encode_seconds, search_seconds = float(stats[:, 0].max()), float(stats[:, 1].max())
    encoded_passages, cache_hit = int(stats[:, 3].sum()), bool(not partial and stats[:, 2].sum() == len(all_blocks))
    log.info("published negatives v%06d (%s): export step %d, %d queries x %d, %d passages encoded in %.1f s "
             "(cache %s, padding %.1f%%), search %.1f s%s%s", version, kind, step, num_queries, spec.k,
             encoded_passages, encode_seconds, "hit" if cache_hit else "miss", 100 * padding_fraction,
             search_seconds, f", partial recall {partial_recall:.3f}" if partial_recall is not None else "",
             f", {short_queries} queries with fewer than k" if short_queries else "")
    removed_versions = prune_versions(run_dir, keep_versions) if keep_versions else []
    in_use = (cache,) if stale is None else (cache, stale_cache)
    record = RefreshRecord(
        time=utc_now(), mode=mode, version=version, export_step=step, model_path=str(model_dir.resolve()),
        encode_seconds=round(encode_seconds, 3), search_seconds=round(search_seconds, 3),
        num_queries=num_queries, k=spec.k, corpus_size=num_rows, cache_hit=cache_hit,
        cache_blocks_hit=int(stats[:, 2].sum()), cache_blocks=0 if partial else len(all_blocks),
        world_size=comm.world_size, index=spec.index, recall=recall, short_queries=short_queries,
        deepened_queries=deepened, refresh=kind, partials_since_full=since,
        nonpositive_positive_queries=nonpositive_positive_queries(positive_scores),
        encoded_passages=encoded_passages, searched_passages=searchable,
        padding_fraction=round(padding_fraction, 4), passage_encode_seconds=round(float(stats[:, 6].max()), 3),
        query_encoding=query_stats.as_dict(),
        partial_recall=None if partial_recall is None else round(partial_recall, 4),
        previous_recall=None if previous_recall is None else round(previous_recall, 4),
        removed_versions=removed_versions,
        removed_cache_entries=len(prune_cache(cache.root, gigabytes(spec.cache_max_gb), keep=in_use))).to_json()
    _append_record(run_dir, record)
    return record
