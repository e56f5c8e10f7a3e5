"""Top-k inner-product search: exact (FAISS on CPU, or sharded over all GPUs) and approximate (IVF, HNSW).

Every search returns (scores float32 [Q, k], ids int64 [Q, k]): each row sorted by score, highest first,
equal scores by lower id, padded with (-inf, -1) when fewer than k rows exist. Ids are row indices into
the corpus as given (a caller searching one shard adds the shard's offset itself).

Determinism. FAISS finds the candidates; their scores are then recomputed here on the CPU in float64
from the stored vectors (fp16 corpus rows stay exactly representable) and rounded to float32, and the
rows re-sorted by (-score, id). So the published scores do not depend on BLAS blocking, on the device
(GPU search keeps float16 vectors), on how the corpus was cut into blocks or shards, or on how FAISS
orders ties; merge_topk of per-shard results equals one search over the whole corpus. FAISS is asked for
`margin` extra candidates so that near-ties at the cut, ranked slightly differently by the device's
arithmetic, still end up in the list before the exact re-ranking cuts it to k.

The corpus may be one array or a list of row blocks (e.g. memory-mapped fp16 cache files), so a large
shard is never copied whole into float32 memory on the CPU path.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import faiss
import numpy as np

log = logging.getLogger(__name__)

PAD_ID = -1
PAD_SCORE = -np.inf
DEFAULT_MARGIN = 16
# FAISS GPU k-selection handles k <= 2048 (GPU_MAX_SELECTION_K); deeper searches run on the CPU.
GPU_MAX_K = 2048
_CPU_BLOCK_ROWS = 65536  # rows converted to float32 at a time on the CPU path
_RESCORE_BYTES = 64 << 20  # float64 working memory of the exact re-scoring


def gpu_count() -> int:
    """Visible GPUs FAISS can use (0 with faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if device == "auto":
        return "gpu" if gpu_count() > 0 else "cpu"
    if device == "gpu" and gpu_count() == 0:
        raise RuntimeError("device='gpu' but FAISS sees no GPU (faiss-cpu installed, or none visible)")
    return device


# ---------------------------------------------------------------------------------------------------
# Sorting, merging, exact re-scoring


def sort_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (score descending, id ascending), keep k columns, pad with (-inf, -1)."""
    scores = np.asarray(scores, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    scores = np.where(ids >= 0, scores, PAD_SCORE).astype(np.float32)
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    scores = np.take_along_axis(scores, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    ids[scores == PAD_SCORE] = PAD_ID
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=PAD_SCORE)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=PAD_ID)
    return scores, ids


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (scores, ids) of the same queries (ids already global, shards disjoint) into the top k."""
    if not parts:
        raise ValueError("merge_topk needs at least one part")
    scores = np.concatenate([np.asarray(s, dtype=np.float32) for s, _ in parts], axis=1)
    ids = np.concatenate([np.asarray(i, dtype=np.int64) for _, i in parts], axis=1)
    return sort_topk(scores, ids, k)


class RowBlocks:
    """A corpus held as consecutive row blocks (arrays or memory maps), indexed by global row."""

    def __init__(self, corpus: np.ndarray | Sequence[np.ndarray]):
        blocks = [corpus] if isinstance(corpus, np.ndarray) else list(corpus)
        blocks = [b for b in blocks if len(b)]
        dims = {b.shape[1] for b in blocks if b.ndim == 2}
        if any(b.ndim != 2 for b in blocks) or len(dims) > 1:
            raise ValueError(f"corpus blocks must be 2-D with one width, got {[b.shape for b in blocks]}")
        self.blocks = blocks
        self.starts = np.cumsum([0] + [len(b) for b in blocks])
        self.num_rows = int(self.starts[-1])
        self.dim = dims.pop() if dims else 0

    def iter_float32(self, max_rows: int = _CPU_BLOCK_ROWS):
        """(first row, float32 rows) in pieces of at most max_rows."""
        for start, block in zip(self.starts, self.blocks):
            for offset in range(0, len(block), max_rows):
                rows = np.ascontiguousarray(block[offset : offset + max_rows], dtype=np.float32)
                yield int(start) + offset, rows

    def to_float32(self) -> np.ndarray:
        out = np.empty((self.num_rows, self.dim), dtype=np.float32)
        for start, rows in self.iter_float32():
            out[start : start + len(rows)] = rows
        return out

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """float64 rows for global ids of any shape (ids must be valid)."""
        out = np.empty(ids.shape + (self.dim,), dtype=np.float64)
        which = np.searchsorted(self.starts, ids, side="right") - 1
        for b in np.unique(which):
            mask = which == b
            out[mask] = self.blocks[b][ids[mask] - self.starts[b]]
        return out


def exact_scores(corpus: RowBlocks, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """float32 inner products of each query with its candidate rows, summed in float64; -inf for id -1.

    The same numpy reduction over the same vectors gives the same bits whichever process runs it.
    """
    out = np.full(ids.shape, PAD_SCORE, dtype=np.float32)
    if ids.size == 0:
        return out
    per_query = max(1, ids.shape[1] * corpus.dim * 8)
    batch = max(1, _RESCORE_BYTES // per_query)
    for s in range(0, len(ids), batch):
        block_ids = ids[s : s + batch]
        valid = block_ids >= 0
        rows = corpus.gather(np.where(valid, block_ids, 0))
        q = np.asarray(queries[s : s + batch], dtype=np.float64)
        scores = (rows * q[:, None, :]).sum(axis=-1)
        out[s : s + batch] = np.where(valid, scores, PAD_SCORE)
    return out


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / |exact| (padding ignored; queries with no results skipped)."""
    hits, total = 0, 0
    for a, e in zip(np.asarray(approx_ids), np.asarray(exact_ids)):
        e = e[e >= 0]
        if len(e) == 0:
            continue
        hits += len(np.intersect1d(a[a >= 0], e))
        total += len(e)
    return hits / total if total else 1.0


# ---------------------------------------------------------------------------------------------------
# Indexes


class ExactIndex:
    """Exact inner-product search.

    CPU: faiss.knn over float32 pieces of the blocks, so memory stays at one piece. GPU (untested here:
    the project's machines have none): one IndexFlatIP sharded over all visible GPUs by
    index_cpu_to_all_gpus with float16 storage; searches deeper than GPU_MAX_K fall back to the CPU.
    """

    def __init__(self, corpus: np.ndarray | Sequence[np.ndarray], device: str = "auto", query_batch: int = 16384,
                 margin: int = DEFAULT_MARGIN, gpus: Sequence[int] | None = None):
        """gpus: the GPU ids to shard over (None: all visible); a job with one rank per GPU passes its own."""
        self.corpus = RowBlocks(corpus)
        self.device = resolve_device(device)
        self.query_batch = query_batch
        self.margin = margin
        self._gpu_index = None
        if self.device == "gpu" and self.corpus.num_rows:
            self._gpu_index = _sharded_gpu_flat_index(self.corpus, gpus)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        depth = min(k + self.margin, self.corpus.num_rows)
        if depth == 0 or len(queries) == 0:
            return sort_topk(np.zeros((len(queries), 0)), np.zeros((len(queries), 0), np.int64), k)
        if self._gpu_index is not None and depth <= GPU_MAX_K:
            ids = self._search_gpu(queries, depth)
        else:
            ids = self._search_cpu(queries, depth)
        return sort_topk(exact_scores(self.corpus, queries, ids), ids, k)

    def _search_cpu(self, queries: np.ndarray, depth: int) -> np.ndarray:
        out = np.empty((len(queries), depth), dtype=np.int64)
        for s in range(0, len(queries), self.query_batch):
            q = queries[s : s + self.query_batch]
            best = None
            for start, rows in self.corpus.iter_float32():
                scores, ids = faiss.knn(q, rows, min(depth, len(rows)), metric=faiss.METRIC_INNER_PRODUCT)
                part = (scores, np.where(ids >= 0, ids + start, PAD_ID))
                best = part if best is None else merge_topk([best, part], depth)
            out[s : s + len(q)] = sort_topk(*best, depth)[1]
        return out

    def _search_gpu(self, queries: np.ndarray, depth: int) -> np.ndarray:
        out = np.empty((len(queries), depth), dtype=np.int64)
        for s in range(0, len(queries), self.query_batch):
            _, ids = self._gpu_index.search(queries[s : s + self.query_batch], depth)
            out[s : s + len(ids)] = ids
        return out


def _sharded_gpu_flat_index(corpus: RowBlocks, gpus: Sequence[int] | None):
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True  # each GPU holds a slice of the rows, not a replica
    options.useFloat16 = True  # half the GPU memory; the exact CPU re-scoring restores full precision
    flat = faiss.IndexFlatIP(corpus.dim)
    if gpus is None:
        index = faiss.index_cpu_to_all_gpus(flat, co=options)
    else:
        index = faiss.index_cpu_to_gpus_list(flat, co=options, gpus=list(gpus))
    # An IndexShards with successive ids must receive all its vectors in a single add().
    index.add(corpus.to_float32())
    log.info("exact search: %d rows on GPUs %s (float16)", corpus.num_rows, gpus or list(range(gpu_count())))
    return index


class ApproximateIndex:
    """IVF-Flat or HNSW-Flat (inner product) on the CPU, for corpora beyond what exact search can hold.

    kind="ivf": nlist lists (default about 4*sqrt(N), at least 39 training rows per list), trained on a
    seeded sample, probing nprobe lists. kind="hnsw": hnsw_m links per node, efSearch = max(ef_search,
    depth). Candidates are re-scored exactly like ExactIndex's, so only recall differs; measure it
    against exact search with recall_at_k. HNSW builds with several threads are not bit-reproducible.
    """

    def __init__(self, corpus: np.ndarray | Sequence[np.ndarray], kind: str = "ivf", *, nlist: int | None = None,
                 nprobe: int = 32, hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = 256,
                 seed: int = 0, margin: int = DEFAULT_MARGIN):
        if kind not in ("ivf", "hnsw"):
            raise ValueError(f"approximate index kind must be 'ivf' or 'hnsw', got {kind!r}")
        self.corpus = RowBlocks(corpus)
        self.kind = kind
        self.margin = margin
        self.ef_search = ef_search
        n, dim = self.corpus.num_rows, self.corpus.dim
        if kind == "ivf":
            nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
            self._quantizer = faiss.IndexFlatIP(dim)  # kept referenced: the IVF index does not own it
            self.index = faiss.IndexIVFFlat(self._quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(n, size=min(n, 256 * nlist), replace=False))
            train = np.ascontiguousarray(self.corpus.gather(sample), dtype=np.float32)
            self.index.cp.seed = seed
            self.index.train(train)
            self.index.nprobe = min(nprobe, nlist)
        else:
            self.index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = ef_construction
        for _, rows in self.corpus.iter_float32():
            self.index.add(rows)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        depth = min(k + self.margin, self.corpus.num_rows)
        if depth == 0 or len(queries) == 0:
            return sort_topk(np.zeros((len(queries), 0)), np.zeros((len(queries), 0), np.int64), k)
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, depth)
        _, ids = self.index.search(queries, depth)
        return sort_topk(exact_scores(self.corpus, queries, ids), ids, k)


def exact_search(corpus_emb: np.ndarray | Sequence[np.ndarray], query_emb: np.ndarray, k: int, *,
                 device: str = "auto", query_batch: int = 16384,
                 margin: int = DEFAULT_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows of corpus_emb by inner product with each query: (scores float32, ids int64) [Q, k]."""
    return ExactIndex(corpus_emb, device=device, query_batch=query_batch, margin=margin).search(query_emb, k)


def approximate_search(corpus_emb: np.ndarray | Sequence[np.ndarray], query_emb: np.ndarray, k: int, *,
                       kind: str = "ivf", **options) -> tuple[np.ndarray, np.ndarray]:
    """Like exact_search through an IVF or HNSW index (options: see ApproximateIndex)."""
    return ApproximateIndex(corpus_emb, kind, **options).search(query_emb, k)
