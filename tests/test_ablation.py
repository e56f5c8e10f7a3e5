"""bench/ablation.py without training: the seeded train/dev split of the Chinese mix, and the table's
figures (category means, their average, paired bootstrap intervals) from rows written by hand."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import ablation  # noqa: E402


def fake_shared_data(root: Path) -> Path:
    cmrc = root / "cmrc2018_trial"
    cmrc.mkdir(parents=True)
    docs = [{"_id": f"D{i}", "title": f"标题{i}", "text": f"段落{i}"} for i in range(5)]
    (cmrc / "corpus.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), "utf-8")
    queries = [{"_id": f"Q{i}", "text": f"问题{i}"} for i in range(20)]
    (cmrc / "queries.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in queries), "utf-8")
    (cmrc / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"Q{i}\tD{i % 5}\t1\n" for i in range(20)))
    for name, scores in (("STS-B", (0, 5)), ("ATEC", (0, 1)), ("BQ", (0, 1)), ("LCQMC", (0, 1)), ("PAWSX", (0, 1))):
        (root / "zh_pairs" / name).mkdir(parents=True)
        lines = "".join(f"{name}甲{i}\t{name}乙{i}\t{scores[i % 2]}\n" for i in range(30))
        (root / "zh_pairs" / name / "valid.tsv").write_text(lines, "utf-8")
    return root


def args_for(tmp_path: Path, *extra: str):
    return ablation.parse_args(["--mix", "zh", "--shared-data", str(tmp_path / "shared"), "--out",
                                str(tmp_path / "out"), "--dev-queries", "6", "--dev-pairs", "10", *extra])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def test_the_chinese_mix_is_a_seeded_split_with_nothing_lost_or_shared(tmp_path):
    fake_shared_data(tmp_path / "shared")
    mix = ablation.prepare_mix(args_for(tmp_path))
    data = tmp_path / "out" / "data"
    dev = {q["_id"] for q in read_jsonl(data / "cmrc" / "queries.dev.jsonl")}
    train = {q["query_id"] for q in read_jsonl(data / "cmrc" / "pairs.train.jsonl")}
    assert len(dev) == 6 and len(train) == 14 and not dev & train
    assert read_jsonl(data / "cmrc" / "pairs.train.jsonl")[0]["pos"][0].startswith("标题")  # title, a space, text
    for name in ("ATEC", "BQ", "LCQMC", "PAWSX", "STS-B"):
        assert len(read_jsonl(data / f"{name}.dev.jsonl")) == 10
    dev_pairs = {p["sentence1"] for name in ("ATEC", "BQ") for p in read_jsonl(data / f"{name}.dev.jsonl")}
    train_pairs = {p["sentence1"] for p in read_jsonl(data / "pairs.train.jsonl")}
    assert len(train_pairs) == 4 * 20 and not dev_pairs & train_pairs
    assert [t["name"] for t in mix["tasks"]] == ["cmrc2018", "stsb", "pairs"]
    assert [(s["name"], s["category"]) for s in mix["sets"]] == [
        ("cmrc2018", "retrieval"), ("STS-B", "sts"), ("ATEC", "sts"), ("BQ", "sts"), ("LCQMC", "sts"), ("PAWSX", "sts")]

    # The same seed makes the same split; another seed another one; other options in the same OUT: refused.
    again = ablation.prepare_mix(ablation.parse_args(["--mix", "zh", "--shared-data", str(tmp_path / "shared"),
                                                      "--out", str(tmp_path / "again"), "--dev-queries", "6",
                                                      "--dev-pairs", "10"]))
    assert read_jsonl(tmp_path / "again" / "data" / "cmrc" / "queries.dev.jsonl") == \
        read_jsonl(data / "cmrc" / "queries.dev.jsonl")
    assert again["tasks"][0]["path"] != mix["tasks"][0]["path"]
    other = ablation.prepare_mix(ablation.parse_args(
        ["--mix", "zh", "--shared-data", str(tmp_path / "shared"), "--out", str(tmp_path / "seed1"),
         "--dev-queries", "6", "--dev-pairs", "10", "--split-seed", "1"]))
    assert {q["_id"] for q in read_jsonl(Path(other["sets"][0]["path"]) / "queries.dev.jsonl")} != dev
    with pytest.raises(SystemExit, match="mix.json was made with"):
        ablation.prepare_mix(args_for(tmp_path, "--dev-pairs", "11"))


def write_row(out: Path, row: str, seed, ndcg: list[float], cosine: list[float], labels_path: Path) -> None:
    run = out / ablation.row_name(row, seed)
    run.mkdir(parents=True)
    (run / "row.json").write_text(json.dumps({"row": row, "seed": seed, "status": "completed", "run_dir": str(run),
                                              "seconds": {"train": 10.0, "evaluate": 2.0}}))
    results = {"sets": [
        {"set": "ret", "category": "retrieval",
         "metrics": {"per_query": {f"q{i}": {"ndcg@10": v} for i, v in enumerate(ndcg)}}},
        {"set": "sts", "category": "sts", "metrics": {"per_pair_cosine": cosine}}]}
    (run / "eval.json").write_text(json.dumps(results))


def test_table_means_spread_and_paired_intervals(tmp_path):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    labels = np.arange(40, dtype=float) % 7
    sts_file = out / "data" / "sts.jsonl"
    sts_file.write_text("".join(json.dumps({"sentence1": "a", "sentence2": "b", "score": s}) + "\n" for s in labels))
    (out / "data" / "sets.json").write_text(json.dumps([{"name": "ret", "category": "retrieval", "path": "x"},
                                                       {"name": "sts", "category": "sts", "path": str(sts_file)}]))
    rng = np.random.default_rng(0)
    base_ndcg = rng.uniform(0, 1, 50)
    noise = {s: rng.normal(0, 1, 40) for s in (1, 2)}
    for seed in (1, 2):
        write_row(out, "vanilla", seed, list(base_ndcg), list(labels + 3 * noise[seed]), sts_file)
        # The same model as vanilla, and one whose every query gains 0.1 and whose cosines follow the labels.
        write_row(out, "cbb_gathered", seed, list(base_ndcg + 0.1), list(labels + 0.1 * noise[seed]), sts_file)
    write_row(out, "zero-shot", None, list(base_ndcg - 0.2), list(labels + 3 * noise[1]), sts_file)

    text = ablation.write_table(out, samples=200)
    table = json.loads((out / "table.json").read_text())
    assert table["columns"] == ["retrieval", "sts", "average"]
    gained = table["rows"]["cbb_gathered"]
    assert gained["vs_vanilla"]["retrieval"] == pytest.approx(0.1)
    assert gained["vs_vanilla_interval"]["retrieval"] == pytest.approx([0.1, 0.1])  # every query +0.1: no spread
    assert gained["vs_vanilla_interval"]["sts"][0] > 0  # far closer to the labels on every draw
    assert gained["vs_vanilla"]["average"] == pytest.approx(
        (gained["vs_vanilla"]["retrieval"] + gained["vs_vanilla"]["sts"]) / 2)
    vanilla = table["rows"]["vanilla"]
    spearmans = [ablation.spearman(labels + 3 * noise[s], labels) for s in (1, 2)]
    assert vanilla["mean"]["sts"] == pytest.approx(np.mean(spearmans))
    assert vanilla["per_seed"]["1"]["sts"] == pytest.approx(spearmans[0])
    assert "vs_vanilla" not in vanilla and "vs_vanilla" not in table["rows"]["zero-shot"]
    assert table["order"] == ["zero-shot", "vanilla", "cbb_gathered"]
    assert "| cbb_gathered | 1, 2 |" in text and (out / "table.md").read_text() == text
    assert (out / "ablation.png").stat().st_size > 0


def test_a_completed_row_of_another_budget_is_refused_not_mixed_in(tmp_path):
    fake_shared_data(tmp_path / "shared")
    ablation.prepare_mix(args_for(tmp_path))
    run = tmp_path / "out" / "vanilla_seed1"
    run.mkdir()
    (run / "row.json").write_text(json.dumps({"row": "vanilla", "seed": 1, "steps": 100, "status": "completed"}))
    with pytest.raises(SystemExit, match="was trained 100 steps, not 70"):
        ablation.main(["--mix", "zh", "--shared-data", str(tmp_path / "shared"), "--out", str(tmp_path / "out"),
                       "--dev-queries", "6", "--dev-pairs", "10", "--rows", "vanilla", "--seeds", "1"])
