"""The torch backend of exact search (embedlib.search.TorchFlatIndex) on the CPU: the same bytes as FAISS
on the CPU, through both of its layouts (streamed float32 pieces; rows resident on devices in float16,
several devices' slices merged), ties at the cut settled by the lower id, and which backend and device
`auto` chooses when FAISS has no GPU support. tests/test_gpu.py runs the same comparison on a GPU."""
import numpy as np
import pytest
import torch

from embedlib import search
from embedlib.search import (
    ApproximateIndex,
    ExactIndex,
    RowBlocks,
    TorchFlatIndex,
    exact_scores,
    exact_search,
    gpu_count,
    resolve_backend,
    resolve_device,
)


def _corpus(n=3000, dim=32, queries=60, seed=0, normalize=True):
    rng = np.random.default_rng(seed)
    corpus = rng.standard_normal((n, dim))
    q = rng.standard_normal((queries, dim))
    if normalize:
        corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    return corpus.astype(np.float16), q.astype(np.float32)


def _same(a, b):
    assert a[1].tobytes() == b[1].tobytes(), "ids differ"
    assert a[0].tobytes() == b[0].tobytes(), "scores differ"


def _brute_force(corpus, queries, k):
    """Every score in float64, sorted descending, stable: equal scores keep the lower id first."""
    scores = torch.from_numpy(queries).double() @ torch.from_numpy(corpus.astype(np.float64)).T
    values, order = torch.sort(scores.float(), dim=1, descending=True, stable=True)
    return values[:, :k].numpy(), order[:, :k].numpy()


@pytest.mark.parametrize("k", [1, 10, 100])
def test_torch_backend_gives_the_bytes_of_faiss(k, monkeypatch):
    corpus, queries = _corpus()
    want = exact_search(corpus, queries, k, device="cpu", backend="faiss")
    _same(exact_search(corpus, queries, k, device="cpu", backend="torch"), want)
    # Many small chunks (a few hundred rows each) and small query batches: every merge is exercised.
    monkeypatch.setattr(search, "_TORCH_CPU_SCORE_BYTES", 4 * 16 * 250)
    blocks = [corpus[:1000], corpus[1000:1001], corpus[1001:]]
    _same(exact_search(blocks, queries, k, device="cpu", backend="torch", query_batch=16), want)


def test_resident_layout_over_several_devices_gives_the_bytes_of_faiss():
    """The GPU layout (rows copied once, float16, one contiguous slice per device, chunks merged on the
    device, then across devices) run with CPU devices."""
    corpus, queries = _corpus(n=2500)
    blocks = RowBlocks([corpus[:700], corpus[700:]])
    index = TorchFlatIndex(blocks, devices=["cpu", "cpu", "cpu"], score_bytes=4 * 60 * 300)
    assert index.dtype == torch.float16 and [start for start, _ in index.shards] == [0, 833, 1667]
    want = exact_search(corpus, queries, 50, device="cpu", backend="faiss")
    depth = 50 + search.DEFAULT_MARGIN
    ids = index.search(queries, depth)
    got = search.sort_topk(exact_scores(blocks, queries, ids), ids, 50)
    _same(got, want)
    # Candidates come ordered by their scores (float16 queries and rows, float32 sums), highest first.
    rounded = queries.astype(np.float16).astype(np.float32)
    candidate = np.take_along_axis(rounded @ corpus.astype(np.float32).T, ids, axis=1)
    assert (np.diff(candidate, axis=1) <= 1e-6).all()


def test_values_beyond_float16_are_kept_in_float32():
    corpus, queries = _corpus(n=800, normalize=False)
    big = corpus.astype(np.float32) * 1e5  # beyond float16's 65504: float16 rows would be inf
    index = TorchFlatIndex(RowBlocks(big), devices=["cpu"])
    assert index.dtype == torch.float32
    want = exact_search(big, queries, 20, device="cpu", backend="faiss")
    ids = index.search(queries, 20 + search.DEFAULT_MARGIN)
    _same(search.sort_topk(exact_scores(RowBlocks(big), queries, ids), ids, 20), want)


@pytest.mark.parametrize("layout", ["streamed", "resident"])
def test_more_ties_at_the_cut_than_the_margin_keep_the_lowest_ids(layout, monkeypatch):
    """150 copies of one row straddle the cut of the top 30 in every chunk: far more than the margin's 16
    extra candidates, so a chunk's top-k alone could keep any of them; the lowest ids must be kept."""
    corpus, queries = _corpus(n=2000, queries=8)
    queries[:] = queries[0]  # one query, eight times: every row has the same ranking
    scores = queries[0] @ corpus.astype(np.float32).T
    source = int(np.argsort(-scores)[20])
    rng = np.random.default_rng(5)
    above = set(np.argsort(-scores)[:20].tolist())
    copies = [int(i) for i in rng.permutation(2000) if int(i) not in above and int(i) != source][:149]
    corpus[copies] = corpus[source]
    group = sorted(copies + [source])
    if layout == "streamed":
        monkeypatch.setattr(search, "_TORCH_CPU_SCORE_BYTES", 4 * 8 * 700)  # three chunks
        got = exact_search(corpus, queries, 30, device="cpu", backend="torch")
    else:
        index = TorchFlatIndex(RowBlocks(corpus), devices=["cpu", "cpu"], score_bytes=4 * 8 * 600)
        ids = index.search(queries, 30 + search.DEFAULT_MARGIN)
        got = search.sort_topk(exact_scores(RowBlocks(corpus), queries, ids), ids, 30)
    want = _brute_force(corpus, queries, 30)
    np.testing.assert_array_equal(got[1], want[1])
    kept = [i for i in got[1][0] if i in group]
    assert kept == group[: len(kept)] and len(kept) == 10


def test_exact_scores_on_threads_are_the_bytes_of_one_thread(monkeypatch):
    corpus, queries = _corpus(n=1000, queries=300)
    ids = np.random.default_rng(3).integers(-1, 1000, size=(300, 40))
    monkeypatch.setattr(search, "_RESCORE_BYTES", 40 * 32 * 8 * 7)  # blocks of 7 queries: 43 blocks
    one = exact_scores(RowBlocks(corpus), queries, ids, threads=1)
    four = exact_scores(RowBlocks(corpus), queries, ids, threads=4)
    assert one.tobytes() == four.tobytes()
    assert np.isneginf(one[ids < 0]).all() and np.isfinite(one[ids >= 0]).all()


def test_auto_chooses_torch_on_gpus_when_faiss_has_no_gpu_support(monkeypatch):
    """The choice mining and evaluation make through device='auto'/'gpu' (the GPU counts stand for what
    the libraries would report; nothing else is replaced)."""
    monkeypatch.setattr(search, "faiss_gpu_count", lambda: 0)
    monkeypatch.setattr(search, "torch_gpu_count", lambda: 2)
    assert gpu_count() == 2 and resolve_device("auto") == "gpu" and resolve_device("gpu") == "gpu"
    assert resolve_backend("gpu") == "torch" and resolve_backend("cpu") == "faiss"
    with pytest.raises(RuntimeError, match="no GPU support"):
        resolve_backend("gpu", "faiss")
    monkeypatch.setattr(search, "faiss_gpu_count", lambda: 4)
    assert gpu_count() == 4 and resolve_backend("gpu") == "faiss" and resolve_backend("gpu", "torch") == "torch"
    monkeypatch.setattr(search, "faiss_gpu_count", lambda: 0)
    monkeypatch.setattr(search, "torch_gpu_count", lambda: 0)
    assert gpu_count() == 0 and resolve_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="no GPU"):
        resolve_device("gpu")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_backend("gpu", "torch")
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cpu", "cuvs")


def test_without_faiss_exact_search_runs_on_torch(monkeypatch):
    corpus, queries = _corpus(n=500)
    want = exact_search(corpus, queries, 25, device="cpu")
    monkeypatch.setattr(search, "faiss", None)
    assert resolve_backend("cpu") == "torch"
    index = ExactIndex(corpus, device="cpu")
    assert index.backend == "torch"
    _same(index.search(queries, 25), want)
    with pytest.raises(RuntimeError, match="FAISS"):
        ApproximateIndex(corpus, "ivf")
    with pytest.raises(RuntimeError, match="not installed"):
        resolve_backend("cpu", "faiss")


def test_empty_inputs_and_k_beyond_the_corpus():
    corpus, queries = _corpus(n=5)
    scores, ids = exact_search(corpus, queries, 8, device="cpu", backend="torch")
    assert (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    _same((scores, ids), exact_search(corpus, queries, 8, device="cpu", backend="faiss"))
    empty = exact_search(corpus, queries[:0], 3, device="cpu", backend="torch")
    assert empty[1].shape == (0, 3)
    none = exact_search(np.zeros((0, corpus.shape[1]), np.float16), queries, 3, device="cpu", backend="torch")
    assert (none[1] == -1).all()


@pytest.mark.parametrize("layout", ["streamed", "resident"])
def test_integer_scores_with_ties_everywhere_follow_a_stable_sort(layout):
    """Small integers: exact scores, hundreds of rows tied at every cut. Both layouts keep the lowest ids."""
    rng = np.random.default_rng(7)
    corpus = rng.integers(-1, 2, size=(4000, 8)).astype(np.float16)
    queries = rng.integers(-1, 2, size=(30, 8)).astype(np.float32)
    k = 40
    if layout == "streamed":
        got = exact_search([corpus[:1500], corpus[1500:]], queries, k, device="cpu", backend="torch")
    else:
        index = TorchFlatIndex(RowBlocks(corpus), devices=["cpu", "cpu"], score_bytes=4 * 30 * 900)
        ids = index.search(queries, k + search.DEFAULT_MARGIN)
        got = search.sort_topk(exact_scores(RowBlocks(corpus), queries, ids), ids, k)
    want = _brute_force(corpus, queries, k)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    values = np.sort(queries @ corpus.astype(np.float32).T, axis=1)[:, ::-1]
    assert (values[:, k - 1] == values[:, k + search.DEFAULT_MARGIN]).mean() > 0.5  # ties reach past the margin
