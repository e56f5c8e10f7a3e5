"""Evaluation metrics against hand computations and scipy, and an end-to-end run on SciFact."""
import math

import numpy as np
import pytest

from embedlib.evaluation import BeirSplit, evaluate_retrieval, ranking_metrics, spearman


def test_ranking_metrics_by_hand():
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"z": 2}, "q3": {"x": 0}}  # q3 has no relevant doc: skipped
    ranked = [["c", "a", "d", "b"], ["y"] * 10 + ["z"], ["x"]]
    m = ranking_metrics(ranked, ["q1", "q2", "q3"], qrels)
    ndcg_q1 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx((ndcg_q1 + 0.0) / 2)
    assert m["mrr@10"] == pytest.approx((1 / 2 + 0.0) / 2)
    assert m["recall@10"] == pytest.approx((1.0 + 0.0) / 2)
    assert m["recall@100"] == pytest.approx((1.0 + 1.0) / 2)
    assert m["num_queries"] == 2


def test_ranking_metrics_perfect_ranking_scores_one():
    qrels = {"q": {"a": 3, "b": 1}}
    m = ranking_metrics([["a", "b", "c"]], ["q"], qrels)
    assert m["ndcg@10"] == pytest.approx(1.0) and m["mrr@10"] == 1.0
    swapped = ranking_metrics([["b", "a", "c"]], ["q"], qrels)
    assert swapped["ndcg@10"] < 1.0  # graded relevance: the better document belongs first


def test_spearman_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=200).astype(float)  # many ties
    y = x + rng.normal(size=200)
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)


def test_minilm_retrieves_scifact_dev_better_than_chance(minilm_dir, scifact_dir):
    """End to end on a slice of the bundled data: the real encoder must find relevant abstracts."""
    from embedlib.encoder import Encoder

    split = BeirSplit.load(scifact_dir, "dev")
    queries = split.queries[:20]
    relevant = {d for q in queries for d in split.qrels[q.id]}
    # Relevant documents plus 300 others keeps this fast while leaving the search real.
    corpus = [d for d in split.corpus if d.id in relevant] + [d for d in split.corpus if d.id not in relevant][:300]
    small = BeirSplit(corpus=corpus, queries=queries, qrels=split.qrels)
    encoder = Encoder.from_pretrained(minilm_dir, max_length=128)
    m = evaluate_retrieval(encoder, small, show_progress=False)
    assert m["num_queries"] == 20
    assert m["ndcg@10"] > 0.5  # all-MiniLM-L6-v2 scores about 0.64 on the full SciFact test set
    assert m["recall@100"] > 0.8
