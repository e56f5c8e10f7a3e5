"""Evaluation metrics against hand computations and scipy, and an end-to-end run on SciFact."""
import math

import numpy as np
import pytest

from embedlib.evaluation import BeirSplit, evaluate_retrieval, paired_difference, ranking_metrics, spearman


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


def test_per_query_figures_average_to_the_means():
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"z": 2}, "q3": {"x": 0}}
    ranked = [["c", "a", "d", "b"], ["y"] * 10 + ["z"], ["x"]]
    m = ranking_metrics(ranked, ["q1", "q2", "q3"], qrels, per_query=True)
    assert sorted(m["per_query"]) == ["q1", "q2"]  # q3 has no relevant document
    assert m["per_query"]["q2"] == {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@10": 0.0, "recall@100": 1.0}
    for name in ("ndcg@10", "mrr@10", "recall@10", "recall@100"):
        assert m[name] == pytest.approx(np.mean([s[name] for s in m["per_query"].values()]))
    assert "per_query" not in ranking_metrics(ranked, ["q1", "q2", "q3"], qrels)


def test_paired_difference_interval():
    rng = np.random.default_rng(1)
    base = {f"q{i}": float(v) for i, v in enumerate(rng.uniform(size=400))}
    same = paired_difference(base, dict(base))
    assert same["mean"] == same["ci95_low"] == same["ci95_high"] == 0.0
    better = {q: v + 0.05 + rng.normal(scale=0.02) for q, v in base.items()}
    d = paired_difference(base, better)
    assert d["ci95_low"] < 0.05 < d["ci95_high"] and d["ci95_low"] > 0  # contains the true shift, excludes 0
    noisy = {q: v + rng.normal(scale=0.3) for q, v in base.items()}
    n = paired_difference(base, noisy)
    assert n["ci95_low"] < 0 < n["ci95_high"]  # no real difference: the interval straddles 0
    only_some = paired_difference(base, {"q0": base["q0"] + 1.0, "other": 3.0})
    assert only_some["num_queries"] == 1 and only_some["mean"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="share no query"):
        paired_difference(base, {"other": 1.0})


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
