"""Evaluation metrics against hand computations and scipy, and an end-to-end run on SciFact."""
import math

import numpy as np
import pytest

from embedlib.evaluation import (BeirSplit, EvaluationError, evaluate_model, evaluate_retrieval, evaluate_sts,
                                 paired_difference, ranking_metrics, spearman)
from embedlib.records import RecordError, ScoredPair


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


# ---- the library refuses input that would give 0.0 or NaN figures -----------------------------------------


def test_ranking_metrics_without_a_relevant_document_raises():
    with pytest.raises(EvaluationError, match="no query has a relevant document"):
        ranking_metrics([["a"], ["b"]], ["q1", "q2"], {"q1": {"a": 0}})


def test_evaluate_retrieval_refuses_an_empty_split():
    # The check comes before any encoding, so no encoder is needed.
    with pytest.raises(EvaluationError, match="nothing to search: 0 documents, 0 queries"):
        evaluate_retrieval(None, BeirSplit(corpus=[], queries=[], qrels={}))


def test_evaluate_sts_refuses_pairs_without_two_scores():
    with pytest.raises(EvaluationError, match="^no sentence pairs$"):
        evaluate_sts(None, [])
    with pytest.raises(EvaluationError, match="all 2 pairs have the score 1; Spearman's correlation"):
        evaluate_sts(None, [ScoredPair("a", "b", 1.0), ScoredPair("c", "d", 1.0)])


def test_beir_load_names_the_qrels_line_of_an_unknown_document(tmp_path):
    from test_evaluation_cli import write_beir

    beir = write_beir(tmp_path / "beir")
    with open(beir / "qrels.dev.tsv", "a") as f:
        f.write("q2\td5\t2\n")
    with pytest.raises(RecordError) as raised:
        BeirSplit.load(beir, "dev")
    error = raised.value
    assert (error.path, error.line, error.field) == (str(beir / "qrels.dev.tsv"), 5, "corpus-id")
    assert error.message == f"unknown id 'd5': not in {beir / 'corpus.jsonl'}"


def test_beir_load_keeps_the_queries_with_a_relevant_document(tmp_path):
    from test_evaluation_cli import write_beir

    split = BeirSplit.load(write_beir(tmp_path / "beir"), "dev")
    assert [q.id for q in split.queries] == ["q1", "q2"] and len(split.corpus) == 4
    (tmp_path / "beir" / "qrels.dev.tsv").write_text("query-id\tcorpus-id\tscore\nq2\td3\t1\nq1\td1\t0\n")
    assert [q.id for q in BeirSplit.load(tmp_path / "beir", "dev").queries] == ["q2"]  # q1: relevance 0 only


def test_evaluate_model_checks_options_and_data_before_loading(tmp_path, tiny_bert_dir, monkeypatch):
    from test_evaluation_cli import write_beir

    from embedlib.encoder import Encoder

    def load(*args, **kwargs):
        pytest.fail("the model was loaded before the input was checked")

    monkeypatch.setattr(Encoder, "from_pretrained", load)
    beir = write_beir(tmp_path / "beir")
    (beir / "queries.dev.jsonl").write_text('{"_id": "q1", "text": ""}\n')
    with pytest.raises(RecordError, match=r"queries.dev.jsonl:1: field 'text': empty string"):
        evaluate_model(tiny_bert_dir, beir=beir)
    with pytest.raises(EvaluationError, match="batch size must be a positive integer, got 0"):
        evaluate_model(tiny_bert_dir, beir=beir, batch_size=0)
    with pytest.raises(EvaluationError, match="nothing to evaluate"):
        evaluate_model(tiny_bert_dir)
    write_beir(beir)
    with pytest.raises(EvaluationError, match="no such directory"):
        evaluate_model(tmp_path / "no-model", beir=beir)
