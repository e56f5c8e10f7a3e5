"""Evaluation sets of four categories: average precision and classification accuracy against hand and
sklearn computations, the readers' errors (file, line, field), a list of sets through evaluate_model and
through the command. The trainer's and the report's side: tests/test_evaluation_sets_training.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embedlib.evaluation import (CATEGORIES, EvalSet, EvaluationError, average_precision, classification_accuracy,
                                 evaluate_model, main, read_classification, read_pair_labels, read_sets)
from embedlib.records import RecordError
from test_evaluation_cli import no_model_load, run_failing, write_beir, write_sts  # noqa: F401 (a fixture)


# ---- average precision ------------------------------------------------------------------------------------


def test_average_precision_by_hand():
    # ranked: 1 0 1 0 -> precision 1 at the first positive, 2/3 at the second
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(np.array([0.1, 0.9]), np.array([1, 0])) == pytest.approx(0.5)
    assert average_precision(np.array([0.3, 0.2]), np.array([1, 1])) == pytest.approx(1.0)


def test_tied_scores_are_one_threshold_whatever_their_order():
    # 0.5 (a positive and a negative tied): precision 1/2 at recall 1/2; 0.2: precision 2/3 at recall 1
    expected = 0.5 * 0.5 + 0.5 * (2 / 3)
    assert average_precision(np.array([0.5, 0.5, 0.2]), np.array([1, 0, 1])) == pytest.approx(expected)
    assert average_precision(np.array([0.5, 0.5, 0.2]), np.array([0, 1, 1])) == pytest.approx(expected)
    assert average_precision(np.array([0.2, 0.5, 0.5]), np.array([1, 1, 0])) == pytest.approx(expected)


def test_average_precision_matches_sklearn_with_many_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 6, size=300) / 5.0  # six distinct scores: ties everywhere
        labels = (rng.uniform(size=300) < 0.3 + 0.1 * scores).astype(int)
        assert average_precision(scores, labels) == pytest.approx(metrics.average_precision_score(labels, scores),
                                                                  abs=1e-12)


def test_average_precision_without_a_positive_raises():
    with pytest.raises(EvaluationError, match="no positive pair"):
        average_precision(np.array([0.1, 0.2]), np.array([0, 0]))


# ---- classification -----------------------------------------------------------------------------------------


def _clusters(n_per_label: int, seed: int, spread: float):
    rng = np.random.default_rng(seed)
    centres = np.eye(8)[:3] * 5.0
    x = np.concatenate([c + rng.normal(scale=spread, size=(n_per_label, 8)) for c in centres])
    y = [label for label in ("a", "b", "c") for _ in range(n_per_label)]
    return x, y


def test_classification_accuracy_on_separable_embeddings_is_one():
    train_x, train_y = _clusters(10, 0, 0.3)
    test_x, test_y = _clusters(5, 1, 0.3)
    assert classification_accuracy(train_x, train_y, test_x, test_y) == 1.0
    assert classification_accuracy(train_x, train_y, test_x, test_y, samples_per_label=2) == 1.0


def test_classification_accuracy_is_mtebs_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    train_x, train_y = _clusters(20, 2, 3.0)  # overlapping clusters: some test texts misclassified
    test_x, test_y = _clusters(20, 3, 3.0)
    accuracy = classification_accuracy(train_x, train_y, test_x, test_y)
    expected = np.mean(LogisticRegression(max_iter=100).fit(train_x, train_y).predict(test_x) == np.array(test_y))
    assert accuracy == pytest.approx(expected) and 0.4 < accuracy < 1.0
    few = classification_accuracy(train_x, train_y, test_x, test_y, samples_per_label=4)
    assert few == classification_accuracy(train_x, train_y, test_x, test_y, samples_per_label=4)  # deterministic


def test_classification_files_tsv_and_jsonl(tmp_path):
    train = tmp_path / "train.tsv"
    train.write_text("label\ttext\nsport\tA match tonight.\nnews\tThe minister spoke.\n")
    test = tmp_path / "test.jsonl"
    test.write_text('{"text": "Goal!", "label": "sport"}\n{"text": "An election.", "label": "news"}\n')
    data = read_classification(train, test)
    assert [(t.text, t.label) for t in data.train] == [("A match tonight.", "sport"), ("The minister spoke.", "news")]
    assert [t.label for t in data.test] == ["sport", "news"]
    headless = tmp_path / "headless.tsv"
    headless.write_text("Goal!\tsport\nVotes.\tnews\n")
    assert [t.label for t in read_classification(train, headless).test] == ["sport", "news"]


CLASSIFICATION_CASES = {
    "test label unseen in training": ("test.jsonl", '{"text": "x", "label": "sport"}\n{"text": "y", "label": "cars"}\n',
                                      "{test}:2: field 'label': 'cars' is not a label of the training texts {train}"),
    "three columns": ("test.tsv", "Goal!\tsport\textra\n", "{test}:1: expected 2 tab-separated columns (text, label), got 3"),
    "empty text": ("test.tsv", "text\tlabel\n \tsport\n", "{test}:2: field 'text': empty"),
    "unknown field": ("test.jsonl", '{"text": "x", "lable": "sport"}\n', "{test}:1: field 'lable': unknown field"),
    "empty file": ("test.jsonl", "", "{test}: no labelled texts"),
    "unsupported type": ("test.csv", "text,label\n", "{test}: unsupported file type"),
}


@pytest.mark.parametrize("case", CLASSIFICATION_CASES)
def test_bad_classification_file_names_file_line_and_field(case, tmp_path):
    name, text, message = CLASSIFICATION_CASES[case]
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a", "label": "sport"}\n{"text": "b", "label": "news"}\n')
    test = tmp_path / name
    test.write_text(text)
    with pytest.raises((RecordError, EvaluationError)) as raised:
        read_classification(train, test)
    assert str(raised.value).startswith(message.format(test=test, train=train))


def test_a_single_training_label_cannot_train_a_classifier(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a", "label": "sport"}\n{"text": "b", "label": "sport"}\n')
    with pytest.raises(EvaluationError, match="every text has the label 'sport'; a classifier needs at least two"):
        read_classification(train, train)


# ---- pair classification files ------------------------------------------------------------------------------


def test_pair_labels_must_be_zero_or_one_and_both_present(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("sentence1\tsentence2\tlabel\na\tb\t1\nc\td\t0.5\n")
    with pytest.raises(RecordError) as raised:
        read_pair_labels(path)
    assert (raised.value.line, raised.value.field) == (3, "label")
    assert raised.value.message == "expected 0 or 1 (a pair classification label), got 0.5"
    path.write_text("sentence1\tsentence2\tlabel\na\tb\t1\nc\td\t1\n")
    with pytest.raises(EvaluationError, match="every pair has the label 1; average precision needs"):
        read_pair_labels(path)
    path.write_text("sentence1\tsentence2\tlabel\na\tb\t1\nc\td\t0\n")
    assert [p.score for p in read_pair_labels(path)] == [1.0, 0.0]


# ---- sets ---------------------------------------------------------------------------------------------------


def write_sets_data(root: Path) -> dict[str, Path]:
    """One small file or directory per category."""
    root.mkdir(parents=True, exist_ok=True)
    pairs = root / "pairs.tsv"
    pairs.write_text("sentence1\tsentence2\tlabel\nA man plays a guitar.\tA man plays the guitar.\t1\n"
                     "The sun is hot.\tHe wrote a letter.\t0\nA cat sleeps.\tA cat is sleeping.\t1\n"
                     "Stocks fell.\tThe bird sings.\t0\n")
    train, test = root / "train.jsonl", root / "test.tsv"
    train.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in [
        ("The team won the match.", "sport"), ("A goal in the last minute.", "sport"),
        ("Parliament passed the law.", "politics"), ("The minister resigned.", "politics")]))
    test.write_text("text\tlabel\nThe striker scored twice.\tsport\nThe vote was close.\tpolitics\n")
    return {"beir": write_beir(root / "beir"), "sts": write_sts(root / "sts.tsv"), "pairs": pairs, "train": train,
            "test": test}


def four_sets(files: dict[str, Path]) -> list[EvalSet]:
    return [EvalSet("small-beir", "retrieval", str(files["beir"])), EvalSet("small-sts", "sts", str(files["sts"])),
            EvalSet("pairs", "pair_classification", str(files["pairs"])),
            EvalSet("topics", "classification", str(files["test"]), train=str(files["train"]))]


def test_a_list_of_sets_through_evaluate_model(tmp_path, tiny_bert_dir):
    files = write_sets_data(tmp_path / "data")
    results = evaluate_model(tiny_bert_dir, sets=four_sets(files), max_length=32, show_progress=False)
    assert [(r["set"], r["category"]) for r in results["sets"]] == [
        ("small-beir", "retrieval"), ("small-sts", "sts"), ("pairs", "pair_classification"), ("topics", "classification")]
    main_metric = {"retrieval": "ndcg@10", "sts": "spearman", "pair_classification": "cosine_ap",
                   "classification": "accuracy"}
    for r in results["sets"]:
        assert r["main_score"] == r["metrics"][main_metric[r["category"]]]
    assert results["sets"][0]["metrics"]["num_queries"] == 2 and "encoding" in results["sets"][0]
    assert results["sets"][2]["metrics"]["num_pairs"] == 4 and results["sets"][2]["metrics"]["num_positives"] == 2
    assert results["sets"][3]["metrics"]["num_train"] == 4 and results["sets"][3]["metrics"]["num_test"] == 2
    assert 0 <= results["sets"][2]["main_score"] <= 1 and results["sets"][3]["main_score"] in (0.0, 0.5, 1.0)
    assert list(results["categories"]) == list(CATEGORIES)
    assert results["categories"] == {r["category"]: r["main_score"] for r in results["sets"]}
    assert results["average"] == pytest.approx(np.mean([r["main_score"] for r in results["sets"]]))
    assert "retrieval" not in results  # the flags' own keys only for the flags

    # The single-set options are sets too, named after their files, with their figures also under the category.
    flagged = evaluate_model(tiny_bert_dir, beir=files["beir"], pairs=files["pairs"],
                             sets=[EvalSet("more", "sts", str(files["sts"]))], max_length=32, show_progress=False)
    assert [r["set"] for r in flagged["sets"]] == ["beir", "pairs", "more"]
    assert flagged["retrieval"] == results["sets"][0]["metrics"]
    assert flagged["pair_classification"] == results["sets"][2]["metrics"]
    assert flagged["categories"]["sts"] == results["categories"]["sts"]


def test_per_query_gives_each_pairs_cosine_and_the_figures_follow_from_them(tmp_path, tiny_bert_dir):
    """What a paired bootstrap over pairs resamples (bench/ablation.py): each pair's cosine, in file order,
    from which the set's own figure is recomputed exactly."""
    from embedlib.evaluation import average_precision, read_pair_labels, read_sts, spearman

    files = write_sets_data(tmp_path / "data")
    results = evaluate_model(tiny_bert_dir, sets=four_sets(files), max_length=32, show_progress=False, per_query=True)
    sts, pairs = results["sets"][1]["metrics"], results["sets"][2]["metrics"]
    sts_labels = np.array([p.score for p in read_sts(files["sts"])])
    pair_labels = np.array([p.score for p in read_pair_labels(files["pairs"])])
    assert len(sts["per_pair_cosine"]) == len(sts_labels) and len(pairs["per_pair_cosine"]) == len(pair_labels)
    assert spearman(np.array(sts["per_pair_cosine"]), sts_labels) == pytest.approx(sts["spearman"], abs=1e-12)
    assert average_precision(np.array(pairs["per_pair_cosine"]), pair_labels) == pytest.approx(pairs["cosine_ap"],
                                                                                               abs=1e-12)
    assert "per_pair_cosine" not in evaluate_model(tiny_bert_dir, sets=four_sets(files)[1:2], max_length=32,
                                                   show_progress=False)["sets"][0]["metrics"]


def test_sets_file_and_its_errors(tmp_path):
    path = tmp_path / "sets.yaml"
    path.write_text("- {name: a, category: sts, path: s.tsv}\n"
                    "- {name: b, category: classification, path: t.tsv, train: tr.tsv, samples_per_label: 8}\n")
    assert read_sets(path) == [EvalSet("a", "sts", "s.tsv"),
                               EvalSet("b", "classification", "t.tsv", train="tr.tsv", samples_per_label=8)]
    path.write_text(json.dumps({"sets": [{"name": "a", "category": "sts", "path": "s.tsv"}]}))  # JSON, under "sets"
    assert read_sets(path) == [EvalSet("a", "sts", "s.tsv")]
    cases = {
        "- {name: a, category: clustering, path: x}\n":
            "set 0: unknown category 'clustering'; expected one of: retrieval, sts, pair_classification, classification",
        "- {name: a, category: sts}\n": "set 0: missing 'path'",
        "- {name: a, category: sts, path: x, trian: y}\n": "set 0: unknown key 'trian'",
        "- {name: a, category: classification, path: x}\n":
            "set 0: 'train' (the training texts) is required for classification",
        "- {name: a, category: sts, path: x, samples_per_label: 8}\n":
            "set 0: 'samples_per_label' applies to classification sets only, not sts",
        "- {name: a, category: sts, path: x}\n- {name: a, category: sts, path: y}\n":
            "two sets are named 'a'; set names must be unique",
        "[]\n": "expected a non-empty list of sets",
        "- [1, 2\n": "not valid YAML or JSON",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(EvaluationError) as raised:
            read_sets(path)
        assert str(raised.value).startswith(f"{path}: {message}"), (text, str(raised.value))


# ---- the command ---------------------------------------------------------------------------------------------


def test_command_with_pairs_classification_and_sets(capsys, tmp_path, tiny_bert_dir):
    files = write_sets_data(tmp_path / "data")
    sets = tmp_path / "sets.yaml"
    sets.write_text(f"- {{name: small-sts, category: sts, path: {files['sts']}}}\n")
    output = tmp_path / "figures.json"
    assert main(["--model", str(tiny_bert_dir), "--pairs", str(files["pairs"]), "--classification", str(files["train"]),
                 str(files["test"]), "--sets", str(sets), "--max-length", "32", "--no-progress",
                 "--output", str(output)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(output.read_text())
    assert [r["set"] for r in printed["sets"]] == ["pairs", "test", "small-sts"]
    assert set(printed["categories"]) == {"sts", "pair_classification", "classification"}
    assert printed["pair_classification"]["num_pairs"] == 4 and printed["classification"]["num_test"] == 2
    assert printed["average"] == pytest.approx(np.mean(list(printed["categories"].values())))


def test_command_bad_input_is_one_line(capsys, tmp_path, tiny_bert_dir, no_model_load):
    files = write_sets_data(tmp_path / "data")
    output = tmp_path / "out" / "figures.json"
    model = ["--model", str(tiny_bert_dir)]
    bad_pairs = tmp_path / "bad_pairs.tsv"
    bad_pairs.write_text("sentence1\tsentence2\tlabel\na\tb\t2\n")
    assert run_failing(capsys, [*model, "--pairs", str(bad_pairs)], output) == (
        f"error: {bad_pairs}:2: field 'label': expected 0 or 1 (a pair classification label), got 2")
    missing = tmp_path / "missing.jsonl"
    assert run_failing(capsys, [*model, "--classification", str(files["train"]), str(missing)], output) == (
        f"error: {missing}: no such file (expected labelled test texts)")
    assert run_failing(capsys, [*model, "--classification", str(files["train"])], output) == (
        "error: argument --classification: expected 2 arguments")
    sets = tmp_path / "sets.yaml"
    sets.write_text("- {name: a, category: ranking, path: x}\n")
    assert run_failing(capsys, [*model, "--sets", str(sets)], output) == (
        f"error: {sets}: set 0: unknown category 'ranking'; expected one of: retrieval, sts, pair_classification, "
        "classification")
    sets.write_text(f"- {{name: a, category: sts, path: {tmp_path / 'nowhere.tsv'}}}\n")
    assert run_failing(capsys, [*model, "--sets", str(sets)], output) == (
        f"error: {tmp_path / 'nowhere.tsv'}: no such file (expected scored sentence pairs)")
    assert run_failing(capsys, model, output) == (
        "error: give --beir DIR, --sts FILE, --pairs FILE, --classification TRAIN TEST and/or --sets FILE")
