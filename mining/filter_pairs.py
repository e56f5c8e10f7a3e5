"""python -m mining filter-pairs: keep the training pairs a strong model agrees with.

Conan's weak-supervision stage drops the weak pairs (title-body, query-answer, ... scraped by the
hundred million) that a strong embedding model scores low. Each record's query (with its instruction,
as `mine` encodes it) and each of its positives are encoded with the model, and the record's score
is the lowest cosine similarity of its query with one of its positives: the record is kept, unchanged,
when that score is at least --min-score. The kept records go to --output (JSONL, in input order,
written atomically) and a JSON record beside it says how many were kept and dropped and how the
scores are distributed.

Sharded like `mine`: under mpirun/srun/torchrun each rank scores one contiguous range of the pairs,
and rank 0 gathers the scores and writes. The pairs (and the corpus, for pairs whose positives are
pos_ids) are read through the data cache (embedlib/record_cache.py), a chunk of records at a time, so
a rank's memory does not grow with the number of pairs beyond one float per pair on rank 0.

Positives given by corpus id are the corpus passages; their embeddings come from the corpus
embedding cache (--cache-dir, e.g. RUN/mining/cache after `mine` with the same model) when it holds
their block, and are encoded otherwise. Every passage embedding is rounded to float16, the cache's
precision, so a score does not depend on whether the cache held it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from embedlib.records import iter_records
from mining.options import option
from mining.spec import ENCODE_DTYPES, MiningError, MiningSpec, check_options, check_ranges

log = logging.getLogger("mining")

QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
HISTOGRAM_BINS = 40  # over [-1, 1]: steps of 0.05


def _as_in_mine(name: str):
    """An option declared like MiningSpec's field of the same name (help and default once, there)."""
    field = next(f for f in fields(MiningSpec) if f.name == name)
    return option(field.metadata["help"], field.default, flag=field.metadata.get("flag"),
                  choices=field.metadata.get("choices"))


@dataclass
class FilterSpec:
    """What `python -m mining filter-pairs` takes (besides --model, --launcher, --threads, --no-progress),
    made into options by mining/options.py; range checks here, in __post_init__."""

    pairs: str = option("pairs to filter (FlagEmbedding format: .jsonl, .jsonl.gz, .parquet, a directory or glob "
                        "of shards)", flag="--queries")
    output: str = option("the kept pairs, a .jsonl file written atomically (records unchanged, in input order)")
    min_score: float = option("keep a record when the cosine similarity of its query with each of its positives "
                              "is at least this (in [-1, 1])")
    corpus: str | None = option("BEIR corpus that the pairs' pos_ids point into (needed when a record gives ids "
                                "without texts)", None)
    record: str | None = option("the JSON record of the filter: counts kept and dropped, score distribution "
                                "(default: OUTPUT with the suffix .json)", None)
    query_instruction: str = _as_in_mine("query_instruction")
    batch_size: int = _as_in_mine("batch_size")
    max_length: int | None = _as_in_mine("max_length")
    query_max_length: int | None = _as_in_mine("query_max_length")
    encode_dtype: str = option(next(f for f in fields(MiningSpec) if f.name == "encode_dtype").metadata["help"],
                               "auto", choices=ENCODE_DTYPES)
    chunk_rows: int = option("records a rank encodes and scores at once", 8192)
    cache_dir: str | None = option("corpus embedding cache to take positives' passage embeddings from where it "
                                   "holds them (e.g. RUN/mining/cache of a mining run with this model and corpus)",
                                   None)
    data_cache: str | None = option("directory of the memory-mapped records (e.g. RUN/data_cache, shared with the "
                                    "trainer); default: a temporary directory, removed at the end", None)

    def __post_init__(self):
        check_options(self)
        check_ranges([
            ("min_score", math.isfinite(self.min_score) and -1 <= self.min_score <= 1,
             f"must be in [-1, 1] (a cosine similarity), got {self.min_score}"),
            ("batch_size", self.batch_size >= 1, f"must be >= 1, got {self.batch_size}"),
            ("chunk_rows", self.chunk_rows >= 1, f"must be >= 1, got {self.chunk_rows}"),
            ("max_length", self.max_length is None or self.max_length >= 2, f"must be >= 2, got {self.max_length}"),
            ("query_max_length", self.query_max_length is None or self.query_max_length >= 2,
             f"must be >= 2, got {self.query_max_length}"),
            ("output", self.output.endswith(".jsonl"), f"must be a .jsonl file, got {self.output}"),
        ])
        for name in ("pairs", "output", "corpus", "record", "cache_dir", "data_cache"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, os.path.abspath(value))
        if self.record is None:
            self.record = self.output[: -len(".jsonl")] + ".json"


def _check_writable(path: Path, what: str) -> None:
    """MiningError when `path` is a directory, or its nearest existing ancestor is not one."""
    if path.is_dir():
        raise MiningError(f"{what} {path}: is a directory")
    for existing in path.parents:
        if existing.exists():
            if not existing.is_dir():
                raise MiningError(f"{what} {path}: {existing} exists and is not a directory")
            if not os.access(existing, os.W_OK):
                raise MiningError(f"{what} {path}: {existing} is not writable")
            return


def _check_paths(spec: FilterSpec) -> None:
    _check_writable(Path(spec.output), "--output")
    _check_writable(Path(spec.record), "--record")
    if spec.record == spec.output:
        raise MiningError(f"--record {spec.record} is the --output file")
    for name in ("pairs", "corpus"):
        given = getattr(spec, name)
        if given is not None and spec.output in (given, os.path.realpath(given)):
            raise MiningError(f"--output {spec.output} is the input file {given}: write the kept pairs elsewhere")
    for name, what in (("cache_dir", "--cache-dir"), ("data_cache", "--data-cache")):
        given = getattr(spec, name)
        if given is not None:
            for existing in (Path(given), *Path(given).parents):
                if existing.exists():
                    if not existing.is_dir():
                        raise MiningError(f"{what} {given}: {existing} exists and is not a directory")
                    break


# ---------------------------------------------------------------------------------------------------
# Scoring


class _CachedPassages:
    """float16 embeddings of corpus rows from the embedding cache, where it holds their block (the most
    recently read block is kept; positives of neighbouring records are often in the same block)."""

    def __init__(self, cache, num_rows: int, dim: int):
        self.cache, self.num_rows, self.dim = cache, num_rows, dim
        self.block_rows = cache.existing_block_rows() if cache is not None else None
        self._block: tuple[int, np.ndarray | None] | None = None
        self.hits = 0

    def get(self, row: int) -> np.ndarray | None:
        if self.block_rows is None:
            return None
        start = row - row % self.block_rows
        if self._block is None or self._block[0] != start:
            end = min(start + self.block_rows, self.num_rows)
            self._block = (start, self.cache.load(start, end, self.dim))
        block = self._block[1]
        if block is None:
            return None
        self.hits += 1
        return np.asarray(block[row - start], dtype=np.float32)


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def _score_range(encoder, pairs, corpus_passages, cached: _CachedPassages, start: int, end: int,
                 spec: FilterSpec, encode_kwargs: dict, lengths: tuple[int, int], advance) -> np.ndarray:
    """Each record's score (its lowest query-positive cosine) for pair rows [start, end); lengths are
    (query, passage) tokens."""
    scores = np.empty(end - start, dtype=np.float32)
    for chunk_start in range(start, end, spec.chunk_rows):
        chunk_end = min(chunk_start + spec.chunk_rows, end)
        queries, owners, texts, text_slots, vectors = [], [], [], [], {}
        for row in range(chunk_start, chunk_end):
            query, pos, instruction = (pairs.value(name, row) for name in ("query", "pos", "instruction"))
            # without a corpus every record has texts (the conversion refuses ids alone)
            pos_rows = pairs.value("pos_rows", row) if pos is None else None
            queries.append((instruction if instruction is not None else spec.query_instruction) + query)
            local = row - chunk_start
            if pos is not None:
                for text in pos:
                    owners.append(local)
                    text_slots.append(len(owners) - 1)
                    texts.append(text)
            else:  # positives given by corpus id: the corpus passages
                for corpus_row in pos_rows:
                    owners.append(local)
                    vector = cached.get(corpus_row)
                    if vector is not None:
                        vectors[len(owners) - 1] = vector
                    else:
                        text_slots.append(len(owners) - 1)
                        texts.append(corpus_passages[corpus_row])
        query_vectors = _unit(encoder.encode(queries, max_length=lengths[0], **encode_kwargs))
        positive_vectors = np.empty((len(owners), query_vectors.shape[1]), dtype=np.float32)
        if texts:
            encoded = encoder.encode(texts, max_length=lengths[1], **encode_kwargs)
            positive_vectors[text_slots] = encoded.astype(np.float16).astype(np.float32)
        for slot, vector in vectors.items():
            positive_vectors[slot] = vector
        owners_array = np.asarray(owners, dtype=np.int64)
        cosines = np.einsum("ij,ij->i", _unit(positive_vectors), query_vectors[owners_array])
        chunk_scores = np.full(chunk_end - chunk_start, np.inf, dtype=np.float32)
        np.minimum.at(chunk_scores, owners_array, cosines.astype(np.float32))
        scores[chunk_start - start: chunk_end - start] = chunk_scores
        advance(chunk_end - chunk_start)
    return scores


# ---------------------------------------------------------------------------------------------------
# Writing


def _iter_raw_records(pairs_spec: str):
    """The raw records of the pairs, in the data cache's row order (shards in order, file order)."""
    from embedlib.record_cache import resolve_shards

    for shard in resolve_shards(pairs_spec):
        parquet = shard.name.lower().endswith(".parquet")
        for _, record in iter_records(shard):
            # parquet has a column for every field: an absent one is null; JSONL records stay as they are
            yield {k: v for k, v in record.items() if v is not None} if parquet else record


def _write_kept(spec: FilterSpec, keep: np.ndarray) -> int:
    """Write the kept records to a temporary file beside the output, then rename it into place."""
    from embedlib.atomic import fsync_dir

    output = Path(spec.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".tmp-{output.name}-{uuid.uuid4().hex[:8]}"
    written = rows = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row, record in enumerate(_iter_raw_records(spec.pairs)):
                if row >= len(keep):
                    break
                if keep[row]:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    written += 1
                rows = row + 1
            f.flush()
            os.fsync(f.fileno())
        if rows != len(keep):
            raise MiningError(f"{spec.pairs}: changed while it was being filtered ({rows} records now, "
                              f"{len(keep)} scored); run again")
        os.replace(tmp, output)
        fsync_dir(output.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return written


def score_summary(scores: np.ndarray, min_score: float) -> dict:
    """Counts kept and dropped, and the distribution of the scores (quantiles, mean, histogram)."""
    kept = int((scores >= min_score).sum())
    counts, edges = np.histogram(scores, bins=HISTOGRAM_BINS, range=(-1.0, 1.0))
    return {
        "pairs": int(len(scores)), "kept": kept, "dropped": int(len(scores) - kept),
        "kept_fraction": round(kept / len(scores), 6) if len(scores) else 0.0,
        "score": {
            "mean": round(float(scores.mean()), 6), "std": round(float(scores.std()), 6),
            "quantiles": {f"{q:g}": round(float(np.quantile(scores, q)), 6) for q in QUANTILES},
            "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()},
        },
    }


# ---------------------------------------------------------------------------------------------------


def filter_pairs(spec: FilterSpec, model_dir: str | os.PathLike, comm, show_progress: bool = True) -> dict | None:
    """Score every record, keep those at or above spec.min_score; returns the JSON record on rank 0
    (None elsewhere). MiningError for bad input, before the model is loaded or anything is written."""
    import torch

    from embedlib.embedding_cache import EmbeddingCache
    from embedlib.encoder import Encoder, EncoderError, model_fingerprint, resolve_model_dir
    from embedlib.progress import progress_task
    from mining.inputs import CorpusBatches, open_tables, passages_view
    from mining.job import check_model_dir

    started = time.perf_counter()
    try:
        model_dir = resolve_model_dir(model_dir)
    except EncoderError as e:
        raise MiningError(str(e)) from None
    check_model_dir(model_dir)
    _check_paths(spec)
    with contextlib.ExitStack() as stack:
        data_cache = spec.data_cache or stack.enter_context(tempfile.TemporaryDirectory(prefix="filter-pairs-"))
        corpus_table, pairs = open_tables(spec.corpus, spec.pairs, data_cache, pairs_what="pairs")
        try:
            fingerprint = model_fingerprint(model_dir)
            encoder = Encoder.from_pretrained(model_dir, max_length=spec.max_length)
        except (EncoderError, OSError, ValueError) as e:
            raise MiningError(f"{model_dir}: cannot load the encoder: {str(e).splitlines()[0]}") from None

        cuda = torch.cuda.is_available()
        device = torch.device(f"cuda:{comm.local_rank % torch.cuda.device_count()}") if cuda else torch.device("cpu")
        dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[spec.encode_dtype]
        dtype_name = spec.encode_dtype if spec.encode_dtype != "auto" else ("bfloat16" if cuda else "float32")
        max_length = encoder.config.max_length
        corpus_passages = passages_view(CorpusBatches(corpus_table)) if corpus_table is not None else None
        cache = None
        if spec.cache_dir is not None and corpus_table is not None:
            cache = EmbeddingCache(spec.cache_dir, fingerprint, corpus_table.corpus_fingerprint, max_length,
                                   dtype_name)
        cached = _CachedPassages(cache, len(corpus_table) if corpus_table is not None else 0,
                                 encoder.embedding_dim)

        num_pairs = len(pairs)
        start = num_pairs * comm.rank // comm.world_size
        end = num_pairs * (comm.rank + 1) // comm.world_size
        encode_kwargs = {"batch_size": spec.batch_size, "device": device, "dtype": dtype, "show_progress": False}
        with progress_task("score pairs", end - start, disable=not (show_progress and comm.rank == 0)) as advance:
            scores = _score_range(encoder, pairs, corpus_passages, cached, start, end, spec, encode_kwargs,
                                  (spec.query_max_length or max_length, max_length), advance)

        # Every rank sends the same length (the collectives move equal shapes): NaN pads the short ones.
        width = -(-num_pairs // comm.world_size)
        padded = np.full(width, np.nan, dtype=np.float32)
        padded[: len(scores)] = scores
        hits = comm.gather(np.array([cached.hits], dtype=np.int64))
        gathered = comm.gather(padded)
        if comm.rank != 0:
            comm.barrier()
            return None
        all_scores = np.concatenate([part[: (num_pairs * (r + 1) // comm.world_size)
                                          - (num_pairs * r // comm.world_size)]
                                     for r, part in enumerate(gathered)])
        keep = all_scores >= spec.min_score
        written = _write_kept(spec, keep)
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "pairs_file": spec.pairs, "corpus": spec.corpus, "output": spec.output,
            "model_path": str(model_dir.resolve()), "model_fingerprint": fingerprint,
            "min_score": spec.min_score, "query_instruction": spec.query_instruction, "max_length": max_length,
            "query_max_length": spec.query_max_length or max_length, "encode_dtype": dtype_name,
            **score_summary(all_scores, spec.min_score),
            "cached_passages": int(sum(int(h[0]) for h in hits)),
            "world_size": comm.world_size, "seconds": round(time.perf_counter() - started, 3),
        }
        record["written"] = written
        from embedlib.atomic import atomic_write_json

        atomic_write_json(spec.record, record)
        comm.barrier()
        log.info("filter-pairs: kept %d of %d pairs (%.1f%%) at min score %g, median score %.3f -> %s",
                 record["kept"], record["pairs"], 100 * record["kept_fraction"], spec.min_score,
                 record["score"]["quantiles"]["0.5"], spec.output)
        return record
