"""Evaluation sets in the trainer and the run's readers: evaluation.sets in the configuration (checked at
load, files before step 1), the report's per-category curves and category means, and the model card's
sections per set."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedlib.evaluation import EvalSet
from test_evaluation_sets import write_sets_data

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "training" / "recipes" / "quickstart.yaml"


# ---- evaluation.sets in the training configuration -----------------------------------------------------------


def _config(tmp_path, *overrides):
    from training.config import load_config

    return load_config(QUICKSTART, [f"run_dir={tmp_path / 'run'}", *overrides])


def test_evaluation_sets_in_the_config(tmp_path, monkeypatch):
    from training.config import check_evaluation_data, evaluation_sets

    monkeypatch.chdir(REPO)
    files = write_sets_data(tmp_path / "data")
    config = _config(tmp_path, f"evaluation.beir={files['beir']}",
                     f"evaluation.sets.0={{name: topics, category: classification, path: {files['test']}, "
                     f"train: {files['train']}}}",
                     f"evaluation.sets.1={{name: pairs, category: pair_classification, path: {files['pairs']}}}")
    assert config.evaluation.sets[0] == EvalSet("topics", "classification", str(files["test"]), train=str(files["train"]))
    # evaluation.beir is a retrieval set named after its directory, first
    assert [(s.name, s.category) for s in evaluation_sets(config)] == [
        ("beir", "retrieval"), ("topics", "classification"), ("pairs", "pair_classification")]
    check_evaluation_data(config)  # every file reads


@pytest.mark.parametrize("override, message", [
    ("evaluation.sets.0={name: a, category: clustering, path: x}",
     "unknown value 'clustering' for 'evaluation.sets.0.category'; expected one of: retrieval, sts, "
     "pair_classification, classification"),
    ("evaluation.sets.0={name: a, category: sts}", "missing required key 'evaluation.sets.0.path'"),
    ("evaluation.sets.0={name: a, category: sts, path: x, trian: y}", "unknown key 'evaluation.sets.0.trian'"),
    ("evaluation.sets.0={name: a, category: classification, path: x}",
     "'evaluation.sets.0': 'train' (the training texts) is required for classification"),
    ("evaluation.sets.0={name: a, category: classification, path: x, train: y, samples_per_label: 0}",
     "'evaluation.sets.0': 'samples_per_label' must be at least 1"),
    ("evaluation.sets=[{name: a, category: sts, path: x}, {name: a, category: sts, path: y}]",
     "'evaluation.sets': two sets are named 'a'"),
])
def test_bad_evaluation_sets_are_one_config_error(tmp_path, override, message):
    from training.config import ConfigError

    with pytest.raises(ConfigError) as raised:
        _config(tmp_path, override)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_missing_set_file_stops_the_run_before_step_one(tmp_path, monkeypatch):
    from training.config import ConfigError, check_evaluation_data

    monkeypatch.chdir(REPO)
    missing = tmp_path / "nowhere.tsv"
    config = _config(tmp_path, f"evaluation.sets.0={{name: a, category: sts, path: {missing}}}")
    with pytest.raises(ConfigError) as raised:
        check_evaluation_data(config)
    assert str(raised.value) == f"evaluation.sets.0 (a): {missing}: no such file (expected scored sentence pairs)"


# ---- the report ---------------------------------------------------------------------------------------------


def test_report_draws_each_category_per_set_and_the_average(tmp_path):
    from embedlib.report import write_report
    from report_runs import write_jsonl, write_run

    run = write_run(tmp_path / "sets", 30, kinds=("retrieval", "sts"))
    rows = []
    for step in (10, 20):
        rows += [{"step": step, "set": "sci", "category": "retrieval", "main_score": 0.5 + step / 100,
                  "eval/ndcg@10": 0.5 + step / 100, "eval/recall@100": 0.9, "eval/num_queries": 6},
                 {"step": step, "set": "fiqa", "category": "retrieval", "main_score": 0.3 + step / 100,
                  "eval/ndcg@10": 0.3 + step / 100, "eval/recall@100": 0.8, "eval/num_queries": 6},
                 {"step": step, "set": "stsb", "category": "sts", "main_score": 0.7, "eval/spearman": 0.7,
                  "eval/num_pairs": 8}]
    rows.append({"step": 30, "set": "sci", "category": "retrieval", "main_score": 0.9, "eval/ndcg@10": 0.9,
                 "eval/recall@100": 0.95, "eval/num_queries": 6})  # a run killed during its last evaluation
    write_jsonl(run / "eval.jsonl", rows)
    output = tmp_path / "report"
    write_report([run], output)
    report = json.loads((output / "report.json").read_text())
    found = {f["name"]: f for f in report["figures"]}
    assert {"eval_retrieval", "eval_sts", "eval_average"} <= set(found) and "eval_ndcg_10" not in found

    def drawn(name: str, axis: int) -> dict:
        return {line["key"]: line for line in found[name]["axes"][axis]["lines"]}

    assert [a["ylabel"] for a in found["eval_retrieval"]["axes"]] == ["ndcg@10", "recall@100"]
    ndcg = drawn("eval_retrieval", 0)
    assert set(ndcg) == {"eval/sci/ndcg@10:sets", "eval/fiqa/ndcg@10:sets"}
    assert ndcg["eval/sci/ndcg@10:sets"]["x"] == [10, 20, 30]
    assert ndcg["eval/fiqa/ndcg@10:sets"]["y"] == pytest.approx([0.4, 0.5])
    means, average = drawn("eval_average", 0), drawn("eval_average", 1)
    assert means["eval_mean/retrieval:sets"]["x"] == [10, 20]  # step 30 lacks two sets: not averaged
    assert means["eval_mean/retrieval:sets"]["y"] == pytest.approx([0.5, 0.6])
    assert means["eval_mean/sts:sets"]["y"] == pytest.approx([0.7, 0.7])
    assert average["eval_average:sets"]["y"] == pytest.approx([0.6, 0.65])  # the mean of the category means
    latest = report["runs"][0]["latest_eval"]
    assert latest["step"] == 30 and latest["main_scores"] == {"sci": 0.9} and "average" not in latest


def test_model_card_shows_every_set_of_the_latest_evaluation(tmp_path, tiny_bert_dir):
    import yaml

    from embedlib.encoder import Encoder
    from report_runs import write_jsonl
    from test_report_modelcard import card_run, export, front_matter

    run = card_run(tmp_path, tiny_bert_dir)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["evaluation"]["sets"] = [{"name": "stsb-dev", "category": "sts", "path": "sts.tsv"}]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    write_jsonl(run / "eval.jsonl", [
        {"step": 4, "set": "scifact-dev", "category": "retrieval", "main_score": 0.25, "eval/ndcg@10": 0.25,
         "eval/recall@100": 0.5, "eval/num_queries": 6},
        {"step": 4, "set": "stsb-dev", "category": "sts", "main_score": 0.75, "eval/spearman": 0.75,
         "eval/num_pairs": 7}])
    card = (export(Encoder.from_pretrained(tiny_bert_dir, max_length=32), run, 4) / "README.md").read_text()
    results = front_matter(card)["model-index"][0]["results"]
    assert [(r["task"]["type"], r["dataset"]["name"], r["dataset"].get("split")) for r in results] == [
        ("retrieval", "scifact-dev", "dev"), ("sts", "stsb-dev", None)]
    assert [{m["name"]: m["value"] for m in r["metrics"]} for r in results] == [
        {"ndcg@10": 0.25, "recall@100": 0.5}, {"spearman": 0.75}]
    assert "#### Retrieval: scifact-dev, split dev" in card and "#### Semantic Similarity: stsb-dev\n" in card
    assert "| scifact-dev ndcg@10 | scifact-dev recall@100 | stsb-dev spearman |" in card  # training logs


def test_report_of_a_single_set_has_no_average_plot(tmp_path):
    from embedlib.report import write_report
    from report_runs import write_jsonl, write_run

    run = write_run(tmp_path / "one", 10)
    write_jsonl(run / "eval.jsonl", [{"step": 10, "set": "sci", "category": "retrieval", "main_score": 0.5,
                                      "eval/ndcg@10": 0.5, "eval/num_queries": 6}])
    write_report([run], tmp_path / "report")
    names = {f["name"] for f in json.loads((tmp_path / "report" / "report.json").read_text())["figures"]}
    assert "eval_retrieval" in names and "eval_average" not in names  # its mean is the line above
