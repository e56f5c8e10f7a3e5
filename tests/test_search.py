"""embedlib.search against a brute-force torch top-k: order, ties, blocks, shard merges, approximate recall."""
import numpy as np
import pytest
import torch

from embedlib.search import (
    ApproximateIndex,
    ExactIndex,
    approximate_search,
    exact_search,
    gpu_count,
    merge_topk,
    recall_at_k,
)


def _corpus(n=600, dim=24, seed=0):
    rng = np.random.default_rng(seed)
    corpus = rng.standard_normal((n, dim)).astype(np.float16)  # the cache stores float16
    queries = rng.standard_normal((40, dim)).astype(np.float32)
    return corpus, queries


def _torch_topk(corpus, queries, k):
    """Brute force: every score in float64, sorted descending, stable so that equal scores keep lower ids first."""
    scores = (torch.from_numpy(queries).double() @ torch.from_numpy(corpus.astype(np.float32)).double().T).float()
    sorted_scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
    return sorted_scores[:, :k].numpy(), order[:, :k].numpy()


def test_exact_search_equals_brute_force_torch():
    corpus, queries = _corpus()
    scores, ids = exact_search(corpus, queries, 50, device="cpu")
    want_scores, want_ids = _torch_topk(corpus, queries, 50)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (40, 50)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-6)


def test_equal_scores_are_ordered_by_lower_id():
    corpus, queries = _corpus(n=200)
    for dup in (7, 90, 150):  # three copies of row 30: equal scores for every query
        corpus[dup] = corpus[30]
    scores, ids = exact_search(corpus, queries, 200, device="cpu")
    for row_scores, row_ids in zip(scores, ids):
        copies = [i for i in row_ids if i in (7, 30, 90, 150)]
        assert copies == [7, 30, 90, 150]
        positions = [list(row_ids).index(i) for i in copies]
        assert positions == list(range(positions[0], positions[0] + 4))  # adjacent: one score
        assert len(set(row_scores[positions].tolist())) == 1


def test_blocks_and_shard_merge_give_the_same_bytes_as_one_search():
    corpus, queries = _corpus(n=1000)
    whole = exact_search(corpus, queries, 64, device="cpu")
    blocks = [corpus[:333], corpus[333:334], corpus[334:]]
    as_blocks = exact_search(blocks, queries, 64, device="cpu")
    shards = []
    for start, end in ((0, 401), (401, 402), (402, 1000)):
        s, i = exact_search(corpus[start:end], queries, 64, device="cpu")
        shards.append((s, np.where(i >= 0, i + start, -1)))
    merged = merge_topk(shards, 64)
    for scores, ids in (as_blocks, merged):
        assert scores.tobytes() == whole[0].tobytes()
        assert ids.tobytes() == whole[1].tobytes()


def test_k_beyond_corpus_is_padded():
    corpus, queries = _corpus(n=5)
    scores, ids = exact_search(corpus, queries, 8, device="cpu")
    assert (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    assert sorted(ids[0, :5].tolist()) == [0, 1, 2, 3, 4]


def test_gpu_request_without_gpus_is_an_error():
    if gpu_count():
        pytest.skip("GPUs present")
    with pytest.raises(RuntimeError, match="no GPU"):
        ExactIndex(_corpus()[0], device="gpu")


def _clustered(n=3000, dim=32, seed=1):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((30, dim))
    corpus = centers[rng.integers(0, 30, n)] + 0.3 * rng.standard_normal((n, dim))
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = centers[rng.integers(0, 30, 50)] + 0.3 * rng.standard_normal((50, dim))
    return corpus.astype(np.float16), queries.astype(np.float32)


def test_ivf_probing_every_list_is_exact_and_hnsw_recall_is_high():
    corpus, queries = _clustered()
    exact = exact_search(corpus, queries, 20, device="cpu")
    ivf = ApproximateIndex(corpus, "ivf", nlist=16, nprobe=16).search(queries, 20)
    assert ivf[1].tobytes() == exact[1].tobytes() and ivf[0].tobytes() == exact[0].tobytes()
    _, hnsw_ids = approximate_search(corpus, queries, 20, kind="hnsw", hnsw_m=16, ef_search=64)
    assert recall_at_k(hnsw_ids, exact[1]) >= 0.9
    # On unclustered data one probed list of 16 misses much of the true top 20: recall is measured, not assumed.
    rng = np.random.default_rng(2)
    flat, flat_queries = rng.standard_normal((3000, 32)).astype(np.float16), rng.standard_normal((50, 32))
    _, ivf_one_list = approximate_search(flat, flat_queries, 20, kind="ivf", nlist=16, nprobe=1)
    assert recall_at_k(ivf_one_list, exact_search(flat, flat_queries, 20, device="cpu")[1]) < 0.8


def test_recall_at_k_counts_overlap_and_ignores_padding():
    exact = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    approx = np.array([[4, 3, 9, 8], [6, 7, 5, -1]])
    assert recall_at_k(approx, exact) == pytest.approx((2 + 2) / 6)


def test_an_overlay_reads_as_the_corpus_with_those_rows_replaced():
    from embedlib.search import RowBlocks, TorchFlatIndex

    rng = np.random.default_rng(3)
    blocks = [rng.standard_normal((n, 16)).astype(np.float16) for n in (70, 5, 90)]
    originals = [b.copy() for b in blocks]
    rows = np.sort(rng.choice(165, size=30, replace=False))
    vectors = rng.standard_normal((30, 16)).astype(np.float16)
    whole = np.concatenate(blocks)
    whole[rows] = vectors
    overlaid = RowBlocks(blocks, overlay=(rows, vectors))

    np.testing.assert_array_equal(overlaid.to_float32(), whole.astype(np.float32))
    ids = rng.integers(0, 165, size=(7, 11))
    np.testing.assert_array_equal(overlaid.gather(ids), whole.astype(np.float64)[ids])
    queries = rng.standard_normal((12, 16)).astype(np.float32)
    for got, want in zip(ExactIndex(overlaid, device="cpu").search(queries, 9),
                         ExactIndex(whole, device="cpu").search(queries, 9)):
        np.testing.assert_array_equal(got, want)
    # the resident torch index copies rows to its devices piece by piece
    np.testing.assert_array_equal(TorchFlatIndex(overlaid, devices=["cpu"]).search(queries, 9),
                                  TorchFlatIndex(RowBlocks(whole), devices=["cpu"]).search(queries, 9))
    for block, original in zip(blocks, originals):  # read in place, never written
        np.testing.assert_array_equal(block, original)
    with pytest.raises(ValueError, match="overlay"):
        RowBlocks(blocks, overlay=(rows[::-1], vectors))
