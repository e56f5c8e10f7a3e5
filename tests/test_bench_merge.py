"""bench/bench_merge.py without training: the seeded selection / report halves of the dev sets, and the
table's figures (against the best single model, paired bootstrap intervals, verdicts) from evaluations
written by hand."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_merge  # noqa: E402

SCIFACT = Path(__file__).resolve().parents[1] / "data" / "scifact"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def test_halves_are_disjoint_complete_and_seeded():
    items = [f"q{i}" for i in range(11)]
    select, report = bench_merge.halves(items, "0/scifact")
    assert len(select) == 5 and len(report) == 6 and not set(select) & set(report)
    assert sorted(select + report) == sorted(items)
    assert bench_merge.halves(list(reversed(items)), "0/scifact") == (select, report)  # the order given aside
    assert bench_merge.halves(items, "1/scifact")[0] != select


def fake_stsb(path: Path, n: int = 30) -> Path:
    path.write_text("score\tsentence1\tsentence2\n" + "".join(f"{i % 6}\tfirst {i}\tsecond {i}\n" for i in range(n)))
    return path


def test_the_dev_sets_are_split_into_files_of_both_halves(tmp_path, capsys):
    args = bench_merge.parse_args(["--out", str(tmp_path / "out"), "--stsb", str(fake_stsb(tmp_path / "dev.tsv"))])
    data = bench_merge.prepare_data(args)
    root = tmp_path / "out" / "data"
    queries = {h: [q["_id"] for q in read_jsonl(root / "scifact" / f"queries.{h}.jsonl")] for h in bench_merge.HALVES}
    dev = {q["_id"] for q in read_jsonl(SCIFACT / "queries.dev.jsonl")}
    assert len(queries["select"]) == 101 and len(queries["report"]) == 101
    assert not set(queries["select"]) & set(queries["report"])
    assert set(queries["select"]) | set(queries["report"]) == dev
    for half in bench_merge.HALVES:
        judged = {line.split("\t")[0] for line in (root / "scifact" / f"qrels.{half}.tsv").read_text().splitlines()[1:]}
        assert judged == set(queries[half])
    all_judgements = (SCIFACT / "qrels.dev.tsv").read_text().splitlines()[1:]
    assert sum(len((root / "scifact" / f"qrels.{h}.tsv").read_text().splitlines()) - 1
               for h in bench_merge.HALVES) == len(all_judgements)
    assert (root / "scifact" / "corpus.jsonl.gz").resolve() == (SCIFACT / "corpus.jsonl.gz").resolve()
    pairs = {h: [p["sentence1"] for p in read_jsonl(root / f"stsb.{h}.jsonl")] for h in bench_merge.HALVES}
    assert len(pairs["select"]) == 15 and not set(pairs["select"]) & set(pairs["report"])
    assert sorted(pairs["select"] + pairs["report"]) == sorted(f"first {i}" for i in range(30))
    report_sets = json.loads(Path(data["sets"]["report"]).read_text())
    assert [(s["name"], s["category"], s.get("split")) for s in report_sets] == [
        ("scifact", "retrieval", "report"), ("STS-B", "sts", None)]

    from embedlib.evaluation import BeirSplit, read_sets
    assert len(BeirSplit.load(root / "scifact", "select").queries) == 101  # a BEIR layout the evaluation reads
    assert [s.name for s in read_sets(data["sets"]["select"])] == ["scifact", "STS-B"]

    # The same seed gives the same halves in another OUT; other options in this OUT are refused.
    bench_merge.prepare_data(bench_merge.parse_args(["--out", str(tmp_path / "again"), "--stsb",
                                                     str(tmp_path / "dev.tsv")]))
    assert read_jsonl(tmp_path / "again" / "data" / "stsb.report.jsonl") == read_jsonl(root / "stsb.report.jsonl")
    with pytest.raises(SystemExit, match="data.json was made with"):
        bench_merge.prepare_data(bench_merge.parse_args(["--out", str(tmp_path / "out"), "--stsb",
                                                         str(tmp_path / "dev.tsv"), "--split-seed", "1"]))
    # Without STS-B: said once on stderr, and the sets are SciFact's alone.
    capsys.readouterr()
    data = bench_merge.prepare_data(bench_merge.parse_args(["--out", str(tmp_path / "nosts"), "--stsb",
                                                            str(tmp_path / "missing.tsv")]))
    assert "missing.tsv not found: the STS-B part is left out" in capsys.readouterr().err
    assert [s["name"] for s in json.loads(Path(data["sets"]["report"]).read_text())] == ["scifact"]


def write_eval(out: Path, name: str, ndcg, cosine) -> None:
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "eval" / f"{name}.json").write_text(json.dumps({"sets": [
        {"set": "scifact", "category": "retrieval",
         "metrics": {"per_query": {f"q{i:02d}": {"ndcg@10": v} for i, v in enumerate(ndcg)}}},
        {"set": "STS-B", "category": "sts", "metrics": {"per_pair_cosine": list(cosine)}}]}))


def test_table_against_the_best_single_model_with_paired_intervals(tmp_path):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    labels = np.arange(40, dtype=float) % 6
    sts_file = out / "data" / "stsb.report.jsonl"
    sts_file.write_text("".join(json.dumps({"sentence1": "a", "sentence2": "b", "score": s}) + "\n" for s in labels))
    (out / "data" / "sets.report.json").write_text(json.dumps([
        {"name": "scifact", "category": "retrieval", "path": "x", "split": "report"},
        {"name": "STS-B", "category": "sts", "path": str(sts_file)}]))
    rng = np.random.default_rng(0)
    ndcg, noise = rng.uniform(0.2, 0.8, 50), rng.normal(0, 1, 40)
    write_eval(out, "seed1", ndcg, labels + 2 * noise)
    write_eval(out, "seed2", ndcg, labels + 2 * noise)  # the same figures as seed1: no difference
    write_eval(out, "seed1_ema", ndcg - 0.1, labels + 2 * noise)  # every query 0.1 worse
    write_eval(out, "greedy", ndcg + 0.1, labels + 0.1 * noise)  # every query 0.1 better, cosines near the labels
    write_eval(out, "uniform", ndcg + rng.normal(0, 0.01, 50), labels + 2 * noise)
    (out / "merges" / "greedy").mkdir(parents=True)
    (out / "merges" / "greedy" / "merge.json").write_text(json.dumps({
        "sources": [{"path": str(out / "seed2" / "exports" / "step_00000004"), "score": 0.61},
                    {"path": str(out / "seed1" / "exports" / "step_00000004"), "score": 0.6}],
        "weights": [0.5, 0.5]}))

    text = bench_merge.write_table(out, samples=200)
    table = json.loads((out / "table.json").read_text())
    assert table["best_single"] == "seed2" and table["greedy_kept"] == ["seed2", "seed1"]
    assert table["columns"] == ["retrieval", "sts", "average"]
    assert table["order"] == ["seed1", "seed2", "seed1_ema", "uniform", "greedy"]
    assert table["sizes"] == {"scifact": 50, "STS-B": 40}
    best = table["rows"]["seed2"]
    assert "vs_best" not in best and best["figures"]["retrieval"] == pytest.approx(ndcg.mean())
    assert best["figures"]["sts"] == pytest.approx(bench_merge.summary([{"sets": {"s": (
        "sts", labels + 2 * noise, labels)}}])["sts"])
    assert best["figures"]["average"] == pytest.approx((best["figures"]["retrieval"] + best["figures"]["sts"]) / 2)
    same, worse, better = (table["rows"][n] for n in ("seed1", "seed1_ema", "greedy"))
    assert same["vs_best_interval"]["average"] == pytest.approx([0, 0]) and same["verdict"]["average"] == "within noise"
    assert worse["vs_best"]["retrieval"] == pytest.approx(-0.1) and worse["verdict"]["retrieval"] == "worse"
    assert worse["vs_best_interval"]["retrieval"] == pytest.approx([-0.1, -0.1])
    assert better["verdict"] == {"retrieval": "better", "sts": "better", "average": "better"}
    assert "| greedy |" in text and "- seed1_ema vs seed2: nDCG@10 worse" in text
    assert (out / "table.md").read_text() == text
