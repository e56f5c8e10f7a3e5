"""Top-k inner-product search: exact (FAISS on CPU, or sharded over all GPUs; or torch, chunked matmul +
top-k, on GPUs or the CPU) and approximate (IVF, HNSW).

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

Backends of exact search (ExactIndex(backend=...)). "faiss": IndexFlatIP, on the CPU or sharded over
GPUs. "torch": the corpus in row chunks, one matmul and one top-k per chunk, the chunks' candidates
merged; on GPUs the rows stay resident in float16 (like FAISS's useFloat16) and are scored with float32
accumulation and output, on the CPU float32 pieces of the blocks are scored as they come. Candidates are
the top rows by (candidate score, row id): of rows that tie at the cut, the lowest ids are kept, however
many tie. "auto" (the default): FAISS on the CPU and on GPUs when FAISS has GPU support; torch on GPUs
when it has none (faiss-cpu on a GPU machine) and anywhere FAISS is not installed. Whatever the backend,
the exact re-scoring above makes the results the same bytes as FAISS on the CPU whenever the true top k
are among the k + margin candidates, which holds unless more than `margin` rows tie at the k-th score:
then FAISS keeps any of the tied rows and the torch backend the lowest ids.
"""
from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

try:
    import faiss
except ImportError:  # exact search still works through torch; approximate indexes need FAISS
    faiss = None

log = logging.getLogger(__name__)

PAD_ID = -1
PAD_SCORE = -np.inf
DEFAULT_MARGIN = 16
# FAISS GPU k-selection handles k <= 2048 (GPU_MAX_SELECTION_K); deeper searches run on the CPU.
GPU_MAX_K = 2048
_CPU_BLOCK_ROWS = 65536  # rows converted to float32 at a time on the CPU path
_RESCORE_BYTES = 64 << 20  # float64 working memory of the exact re-scoring
_RESCORE_PARALLEL_BYTES = 256 << 20  # re-scoring work above which query blocks run on several threads
BACKENDS = ("auto", "faiss", "torch")
# torch backend: bytes of one chunk's float32 score matrix (queries x rows) and queries per GPU pass.
_TORCH_SCORE_BYTES = 1 << 30
_TORCH_CPU_SCORE_BYTES = 256 << 20
_TORCH_GPU_QUERY_BATCH = 4096
_FP16_MAX = 65504.0


def faiss_gpu_count() -> int:
    """Visible GPUs FAISS can use (0 with faiss-cpu, or without FAISS)."""
    if faiss is None or not hasattr(faiss, "StandardGpuResources"):
        return 0
    return faiss.get_num_gpus()


def torch_gpu_count() -> int:
    """Visible CUDA devices torch can use (the torch backend's GPUs)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_count() -> int:
    """Visible GPUs exact search can use: FAISS's when it has GPU support, else torch's CUDA devices
    (searched by the torch backend)."""
    return faiss_gpu_count() or torch_gpu_count()


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if device == "auto":
        return "gpu" if gpu_count() > 0 else "cpu"
    if device == "gpu" and gpu_count() == 0:
        raise RuntimeError("device='gpu' but no GPU is visible to FAISS or torch (CPU-only builds, or none "
                           "present)")
    return device


def resolve_backend(device: str, backend: str = "auto") -> str:
    """The library that searches exactly on `device` ('cpu' or 'gpu', resolved): 'faiss' or 'torch'.

    auto: FAISS where it can (the CPU; GPUs when it has GPU support), else torch. An explicit choice that
    cannot work is an error rather than a silent switch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu' here, got {device!r}")
    if backend == "auto":
        if faiss is None:
            return "torch"
        return "faiss" if device == "cpu" or faiss_gpu_count() > 0 else "torch"
    if backend == "faiss":
        if faiss is None:
            raise RuntimeError("backend='faiss' but FAISS is not installed (pip install faiss-cpu)")
        if device == "gpu" and faiss_gpu_count() == 0:
            raise RuntimeError("backend='faiss' on device='gpu' but FAISS has no GPU support (faiss-cpu "
                               "installed); use backend='torch' or 'auto'")
    if backend == "torch" and device == "gpu" and torch_gpu_count() == 0:
        raise RuntimeError("backend='torch' on device='gpu' but torch sees no CUDA device")
    return backend


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
    """A corpus held as consecutive row blocks (arrays or memory maps), indexed by global row.

    overlay: (sorted unique global rows, their vectors) read in place of those rows of the blocks, without
    copying the blocks (a partial refresh: the last full pass's cached embeddings, with the rows it
    re-encoded replaced by the new model's)."""

    def __init__(self, corpus: np.ndarray | Sequence[np.ndarray],
                 overlay: tuple[np.ndarray, np.ndarray] | None = None):
        blocks = [corpus] if isinstance(corpus, np.ndarray) else list(corpus)
        blocks = [b for b in blocks if len(b)]
        dims = {b.shape[1] for b in blocks if b.ndim == 2}
        if any(b.ndim != 2 for b in blocks) or len(dims) > 1:
            raise ValueError(f"corpus blocks must be 2-D with one width, got {[b.shape for b in blocks]}")
        self.blocks = blocks
        self.starts = np.cumsum([0] + [len(b) for b in blocks])
        self.num_rows = int(self.starts[-1])
        self.dim = dims.pop() if dims else 0
        rows, vectors = overlay if overlay is not None else (np.empty(0, np.int64), np.empty((0, self.dim)))
        self.overlay_rows, self.overlay_vectors = np.asarray(rows, dtype=np.int64), vectors
        if len(rows) and (vectors.shape != (len(rows), self.dim) or np.any(np.diff(self.overlay_rows) <= 0)
                          or rows[0] < 0 or rows[-1] >= self.num_rows):
            raise ValueError("overlay: sorted unique rows of the corpus and one vector of its width per row")

    def piece(self, start: int, rows: np.ndarray) -> np.ndarray:
        """`rows`, the corpus rows from global row `start` on, with the overlay applied (a copy only when
        it touches them)."""
        lo, hi = np.searchsorted(self.overlay_rows, [start, start + len(rows)])
        if lo == hi:
            return rows
        rows = np.array(rows, copy=True)
        rows[self.overlay_rows[lo:hi] - start] = self.overlay_vectors[lo:hi]
        return rows

    def iter_float32(self, max_rows: int = _CPU_BLOCK_ROWS):
        """(first row, float32 rows) in pieces of at most max_rows."""
        for start, block in zip(self.starts, self.blocks):
            for offset in range(0, len(block), max_rows):
                rows = np.ascontiguousarray(block[offset : offset + max_rows], dtype=np.float32)
                yield int(start) + offset, self.piece(int(start) + offset, rows)

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
        if len(self.overlay_rows):
            at = np.clip(np.searchsorted(self.overlay_rows, ids), 0, len(self.overlay_rows) - 1)
            mask = self.overlay_rows[at] == ids
            out[mask] = self.overlay_vectors[at[mask]]
        return out


def exact_scores(corpus: RowBlocks, queries: np.ndarray, ids: np.ndarray, threads: int | None = None) -> np.ndarray:
    """float32 inner products of each query with its candidate rows, summed in float64; -inf for id -1.

    The same numpy reduction over the same vectors gives the same bits whichever process runs it, and
    whichever thread: large calls score blocks of queries on `threads` threads (None: torch's thread
    count, which `--threads` of the miner sets), each query's row reduced exactly as on one thread.
    """
    out = np.full(ids.shape, PAD_SCORE, dtype=np.float32)
    if ids.size == 0:
        return out
    per_query = max(1, ids.shape[1] * corpus.dim * 8)
    batch = max(1, _RESCORE_BYTES // per_query)

    def score(s: int) -> None:
        block_ids = ids[s : s + batch]
        valid = block_ids >= 0
        rows = corpus.gather(np.where(valid, block_ids, 0))
        q = np.asarray(queries[s : s + batch], dtype=np.float64)
        scores = np.multiply(rows, q[:, None, :], out=rows).sum(axis=-1)  # in place: one float64 copy, not two
        out[s : s + batch] = np.where(valid, scores, PAD_SCORE)

    starts = range(0, len(ids), batch)
    if threads is None:
        threads = _default_threads() if ids.size * corpus.dim * 8 > _RESCORE_PARALLEL_BYTES else 1
    threads = max(1, min(threads, len(starts)))
    if threads == 1:
        for s in starts:
            score(s)
    else:  # numpy releases the GIL in the gather, the product and the sum
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(score, starts))
    return out


def _default_threads() -> int:
    try:
        import torch

        return max(1, min(torch.get_num_threads(), 16))
    except ImportError:
        return max(1, min(os.cpu_count() or 1, 16))


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

    backend "faiss" (see resolve_backend for "auto"): on the CPU faiss.knn over float32 pieces of the
    blocks, so memory stays at one piece; on GPUs one IndexFlatIP sharded over the GPUs by
    index_cpu_to_all_gpus with float16 storage, searches deeper than GPU_MAX_K falling back to the CPU.
    backend "torch": TorchFlatIndex, on the GPUs (rows resident in float16) or the CPU (float32 pieces).
    """

    def __init__(self, corpus: np.ndarray | Sequence[np.ndarray] | RowBlocks, device: str = "auto",
                 query_batch: int = 16384, margin: int = DEFAULT_MARGIN, gpus: Sequence[int] | None = None,
                 backend: str = "auto"):
        """gpus: the GPU ids to shard over (None: all visible); a job with one rank per GPU passes its own.
        backend: "auto", "faiss" or "torch" (module docstring)."""
        self.corpus = corpus if isinstance(corpus, RowBlocks) else RowBlocks(corpus)
        self.device = resolve_device(device)
        self.backend = resolve_backend(self.device, backend)
        self.query_batch = query_batch
        self.margin = margin
        self._gpu_index = None
        self._torch_index = None
        if self.backend == "torch":
            if self.device == "gpu":
                if backend == "auto":
                    log.info("exact search: FAISS has no GPU support here; searching on the GPU with torch")
                self._torch_index = TorchFlatIndex.on_gpus(self.corpus, gpus)
            else:
                self._torch_index = TorchFlatIndex(self.corpus)
        elif self.device == "gpu" and self.corpus.num_rows:
            self._gpu_index = _sharded_gpu_flat_index(self.corpus, gpus)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        depth = min(k + self.margin, self.corpus.num_rows)
        if depth == 0 or len(queries) == 0:
            return sort_topk(np.zeros((len(queries), 0)), np.zeros((len(queries), 0), np.int64), k)
        if self._torch_index is not None:
            ids = self._torch_index.search(queries, depth, query_batch=self.query_batch)
        elif self._gpu_index is not None and depth <= GPU_MAX_K:
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


class TorchFlatIndex:
    """Exact candidate search with torch: one matmul and one top-k per chunk of rows.

    Resident (on_gpus, or devices given): the rows are copied once to the devices, contiguous slices of
    the corpus in order (one slice per device), in float16 when every value fits (float32 otherwise),
    and scored with float32 accumulation and output (float16 inputs on CUDA; float32 elsewhere).
    Streaming (no devices): float32 pieces of the blocks are scored on the CPU as they come, so memory
    stays at one piece. Chunks hold at most score_bytes of float32 scores for one batch of queries.

    search() returns, for each query, the ids of the `depth` rows with the highest candidate scores,
    equal candidate scores ordered by lower id (within each chunk a full stable sort settles a tie that
    reaches the cut), in that order; ExactIndex re-scores them exactly.
    """

    def __init__(self, corpus: RowBlocks, devices: Sequence | None = None, score_bytes: int | None = None,
                 gpu_query_batch: int = _TORCH_GPU_QUERY_BATCH):
        import torch

        self.corpus = corpus
        on_cuda = any(torch.device(d).type == "cuda" for d in devices or [])
        self.score_bytes = score_bytes or (_TORCH_SCORE_BYTES if on_cuda else _TORCH_CPU_SCORE_BYTES)
        self.gpu_query_batch = gpu_query_batch
        self.devices = [torch.device(d) for d in devices] if devices else []
        self.shards: list[tuple[int, "torch.Tensor"]] = []  # (first global row, rows on a device)
        if not self.devices or corpus.num_rows == 0:
            return
        fits = all(_fits_float16(b) for b in [*corpus.blocks, corpus.overlay_vectors])
        self.dtype = torch.float16 if fits else torch.float32
        bounds = np.linspace(0, corpus.num_rows, len(self.devices) + 1).round().astype(np.int64)
        for device, start, end in zip(self.devices, bounds[:-1], bounds[1:]):
            if end > start:
                self.shards.append((int(start), _rows_to_device(corpus, int(start), int(end), device, self.dtype)))
        log.info("exact search (torch): %d rows on %s (%s)", corpus.num_rows,
                 ", ".join(str(d) for d in self.devices), str(self.dtype).removeprefix("torch."))

    @classmethod
    def on_gpus(cls, corpus: RowBlocks, gpus: Sequence[int] | None = None, **options) -> TorchFlatIndex:
        """Resident on the given CUDA devices (None: every visible one)."""
        ids = list(gpus) if gpus is not None else list(range(torch_gpu_count()))
        if not ids:
            raise RuntimeError("TorchFlatIndex.on_gpus: torch sees no CUDA device")
        return cls(corpus, devices=[f"cuda:{i}" for i in ids], **options)

    def search(self, queries: np.ndarray, depth: int, query_batch: int = 16384) -> np.ndarray:
        """int64 [Q, depth] candidate ids (depth at most the corpus rows)."""
        import torch

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        depth = min(depth, self.corpus.num_rows)
        out = np.empty((len(queries), depth), dtype=np.int64)
        if depth == 0 or len(queries) == 0:
            return out
        if self.shards:
            query_batch = min(query_batch, self.gpu_query_batch) if self.devices[0].type == "cuda" else query_batch
        with torch.inference_mode():
            for s in range(0, len(queries), query_batch):
                q = _tensor(queries[s : s + query_batch])
                if self.shards:  # each device's slice, then the slices' candidates merged on the CPU
                    parts = [self._search_resident(q, start, rows, depth) for start, rows in self.shards]
                    best = _merge_candidates([(v.cpu(), i.cpu()) for v, i in parts], depth)
                else:
                    best = None
                    for start, rows in self.corpus.iter_float32(self._chunk_rows(len(q))):
                        part = _chunk_candidates(q @ _tensor(rows).T, start, depth)
                        best = part if best is None else _merge_candidates([best, part], depth)
                out[s : s + len(q)] = best[1].numpy()
        return out

    def _chunk_rows(self, num_queries: int) -> int:
        return max(1, self.score_bytes // (4 * max(1, num_queries)))

    def _search_resident(self, q, start: int, rows, depth: int):
        """(scores, ids) of one device's slice: each chunk's candidates, merged on the device as they come."""
        q = q.to(rows.device).to(rows.dtype)
        best = None
        step = self._chunk_rows(len(q))
        for offset in range(0, len(rows), step):
            part = _chunk_candidates(_scores_float32(q, rows[offset : offset + step]), start + offset, depth)
            best = part if best is None else _merge_candidates([best, part], depth)
        return best


def _fits_float16(block: np.ndarray) -> bool:
    if block.dtype == np.float16:
        return True
    if len(block) == 0:
        return True
    peak = max(float(np.abs(block[s : s + _CPU_BLOCK_ROWS]).max()) for s in range(0, len(block), _CPU_BLOCK_ROWS))
    return peak <= _FP16_MAX


def _rows_to_device(corpus: RowBlocks, start: int, end: int, device, dtype):
    """Global rows [start, end) as one tensor on `device`, copied a piece at a time."""
    import torch

    out = torch.empty((end - start, corpus.dim), dtype=dtype, device=device)
    for block_start, block in zip(corpus.starts, corpus.blocks):
        lo, hi = max(start, int(block_start)), min(end, int(block_start) + len(block))
        for s in range(lo, hi, _CPU_BLOCK_ROWS):
            e = min(hi, s + _CPU_BLOCK_ROWS)
            piece = _tensor(corpus.piece(s, block[s - block_start : e - block_start]))
            out[s - start : e - start] = piece.to(device).to(dtype)
    return out


def _tensor(array: np.ndarray):
    """A CPU tensor of `array`, copied when numpy would not let torch share it (read-only memory maps)."""
    import torch

    array = np.ascontiguousarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


_OUT_DTYPE_MM: dict[str, bool] = {}


def _scores_float32(q, rows):
    """q [B, D] @ rows [R, D].T as float32: float16 inputs with float32 accumulation and output where
    torch offers it (torch.mm(..., out_dtype) on CUDA), else float32 inputs (TF32 off for the product)."""
    import torch

    if rows.dtype == torch.float16 and rows.device.type == "cuda":
        key = str(rows.device)
        if _OUT_DTYPE_MM.get(key, True):
            try:
                result = torch.mm(q, rows.T, out_dtype=torch.float32)
                _OUT_DTYPE_MM[key] = True
                return result
            except (TypeError, RuntimeError, NotImplementedError):
                _OUT_DTYPE_MM[key] = False
                log.info("torch.mm(out_dtype=float32) unavailable on %s: float32 products instead", key)
    if rows.device.type == "cuda":
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return q.float() @ rows.float().T
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    return q.float() @ rows.float().T


def _chunk_candidates(scores, start: int, depth: int):
    """The top min(depth, rows) of one chunk's [B, R] float32 scores by (score desc, id asc), as
    (scores, global ids), each row's candidates in ascending id order (so a stable sort of the
    concatenated chunks keeps lower ids first among equal scores)."""
    import torch

    rows = scores.shape[1]
    d = min(depth, rows)
    if d == rows:
        ids = torch.arange(rows, device=scores.device).expand(scores.shape[0], rows)
        return scores, ids + start
    values, ids = torch.topk(scores, d + 1, dim=1)  # sorted: position d is the best row left out
    tied = values[:, d - 1] == values[:, d]
    values, ids = values[:, :d].contiguous(), ids[:, :d].contiguous()
    if bool(tied.any()):
        # A tie reaches the cut: topk may keep any of the tied rows, a stable sort keeps the lower ids.
        which = tied.nonzero().squeeze(1)
        sorted_values, order = torch.sort(scores[which], dim=1, descending=True, stable=True)
        values[which], ids[which] = sorted_values[:, :d], order[:, :d]
    ids, order = torch.sort(ids, dim=1)
    return values.gather(1, order), ids + start


def _merge_candidates(parts, depth: int):
    """Concatenate chunks' candidates (chunks in ascending row order) and keep the top `depth` by
    (score desc, id asc): a stable descending sort of ids that ascend within every score."""
    import torch

    values = torch.cat([v for v, _ in parts], dim=1)
    ids = torch.cat([i for _, i in parts], dim=1)
    ids, order = torch.sort(ids, dim=1)  # a part may come ordered by score (an earlier merge)
    values = values.gather(1, order)
    values, order = torch.sort(values, dim=1, descending=True, stable=True)
    return values[:, :depth], ids.gather(1, order[:, :depth])


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
        if faiss is None:
            raise RuntimeError("approximate search needs FAISS, which is not installed (pip install faiss-cpu)")
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
                 device: str = "auto", query_batch: int = 16384, margin: int = DEFAULT_MARGIN,
                 backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows of corpus_emb by inner product with each query: (scores float32, ids int64) [Q, k]."""
    return ExactIndex(corpus_emb, device=device, query_batch=query_batch, margin=margin,
                      backend=backend).search(query_emb, k)


def approximate_search(corpus_emb: np.ndarray | Sequence[np.ndarray], query_emb: np.ndarray, k: int, *,
                       kind: str = "ivf", **options) -> tuple[np.ndarray, np.ndarray]:
    """Like exact_search through an IVF or HNSW index (options: see ApproximateIndex)."""
    return ApproximateIndex(corpus_emb, kind, **options).search(query_emb, k)
