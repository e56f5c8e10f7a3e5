"""mining.filters on hand-made ranked lists: every filter, rank order, the k cut, padding; sidecar export choice."""
from pathlib import Path

import numpy as np

from embedlib.exports import ExportInfo
from mining.filters import FilterConfig, filter_candidates, nonpositive_positive_queries, positive_thresholds
from mining.sidecar import choose_export

NONE = np.full((1, 1), -np.inf, dtype=np.float32)  # no positive score: no positive-aware threshold


def _ranked(scores):
    scores = np.array([scores], dtype=np.float32)
    return scores, np.arange(scores.shape[1], dtype=np.int64)[None] + 10  # ids 10, 11, ...


def test_excluded_rows_are_removed_and_rank_order_is_kept():
    scores, ids = _ranked([0.9, 0.8, 0.7, 0.6, 0.5])
    out = filter_candidates(scores, ids, np.array([[11, 13, -1]]), NONE, FilterConfig(k=3, positive_margin=None))
    assert out.ids.tolist() == [[10, 12, 14]]
    np.testing.assert_array_equal(out.scores, np.float32([[0.9, 0.7, 0.5]]))
    assert out.survivors.tolist() == [3]


def test_first_k_survivors_are_kept():
    scores, ids = _ranked([0.9, 0.8, 0.7, 0.6, 0.5])
    out = filter_candidates(scores, ids, np.array([[10]]), NONE, FilterConfig(k=2, positive_margin=None))
    assert out.ids.tolist() == [[11, 12]] and out.survivors.tolist() == [4]


def test_positive_aware_filter_uses_the_lowest_positive_score():
    scores, ids = _ranked([0.95, 0.80, 0.76, 0.75, 0.5])
    positives = np.array([[0.9, 0.8]], dtype=np.float32)  # threshold 0.95 * 0.8 = 0.76: above it is dropped
    out = filter_candidates(scores, ids, np.array([[-1]]), positives, FilterConfig(k=5, positive_margin=0.95))
    assert out.ids.tolist() == [[12, 13, 14, -1, -1]]
    assert np.isnan(out.scores[0, 3:]).all()
    np.testing.assert_allclose(positive_thresholds(positives, 0.95), [0.76])
    off = filter_candidates(scores, ids, np.array([[-1]]), positives, FilterConfig(k=5, positive_margin=None))
    assert off.ids.tolist() == [[10, 11, 12, 13, 14]]


def test_positive_aware_filter_stays_below_a_positive_scored_at_or_below_zero():
    """margin * p would lie above a negative p (0.95 * -0.2 = -0.19): candidates outscoring the positive kept,
    the ordinary ones dropped. The threshold is p - (1 - margin) |p| instead, below the positive."""
    scores, ids = _ranked([0.3, -0.1, -0.19, -0.205, -0.22, -0.5])
    positives = np.array([[-0.2, 0.4]], dtype=np.float32)  # the lowest, -0.2, decides
    out = filter_candidates(scores, ids, np.array([[-1]]), positives, FilterConfig(k=6, positive_margin=0.95))
    np.testing.assert_allclose(positive_thresholds(positives, 0.95), [-0.21], rtol=1e-6)
    assert out.ids.tolist() == [[14, 15, -1, -1, -1, -1]]  # only the candidates below -0.21
    zero = np.array([[0.0]], dtype=np.float32)
    assert positive_thresholds(zero, 0.95).tolist() == [0.0]
    assert filter_candidates(scores, ids, np.array([[-1]]), zero, FilterConfig(k=6)).ids[0, :5].tolist() == \
        [11, 12, 13, 14, 15]
    np.testing.assert_allclose(positive_thresholds(np.array([[0.8]], np.float32), 0.95), [0.76], rtol=1e-6)  # as before
    both = np.array([[-0.2, 0.4], [0.0, -np.inf], [0.5, -np.inf], [-np.inf, -np.inf]], dtype=np.float32)
    assert nonpositive_positive_queries(both) == 2  # no positive at all is not counted


def test_score_cap_drops_scores_above_it():
    scores, ids = _ranked([0.9, 0.8, 0.7, 0.6])
    out = filter_candidates(scores, ids, np.array([[-1]]), NONE, FilterConfig(k=4, positive_margin=0.95, score_cap=0.75))
    assert out.ids.tolist() == [[12, 13, -1, -1]]


def test_padding_in_the_input_is_never_kept():
    scores = np.array([[0.9, -np.inf, -np.inf]], dtype=np.float32)
    ids = np.array([[3, -1, -1]])
    out = filter_candidates(scores, ids, np.array([[-1]]), NONE, FilterConfig(k=3, positive_margin=None))
    assert out.ids.tolist() == [[3, -1, -1]] and out.survivors.tolist() == [1]


def test_sidecar_mines_the_newest_export_once_every_kth_has_appeared():
    exports = [ExportInfo(step, Path(f"step_{step}")) for step in (100, 200, 300)]
    chosen, seen = choose_export(exports[:1], done=-1, seen=set(), every=2)
    assert chosen is None and seen == {100}
    chosen, seen = choose_export(exports[1:2], done=-1, seen=seen, every=2)  # 100 was deleted meanwhile
    assert chosen.step == 200
    chosen, seen = choose_export(exports, done=200, seen=seen, every=1)
    assert chosen.step == 300 and seen == {300}
    assert choose_export(exports, done=300, seen=seen, every=1)[0] is None
