"""python -m embedlib.report: every figure is a real PNG and draws exactly the series of the runs' files
(checked on the data read back from the drawn matplotlib figure, report.json, not on pixels); panels
without data are left out; a run still being written is reported as far as it got; bad input is one
line and exit status 2. The page in a real browser: tests/test_report_browser.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedlib.report import main, write_report
from report_runs import (CHECK_INTERVAL, EVAL_STEPS, VERSIONS, eval_record, metrics_record, published_step,
                         version_at, write_dynamic_run, write_jsonl, write_run, write_static_run)

REPO = Path(__file__).resolve().parents[1]


def figures(output: Path) -> dict[str, dict]:
    return {f["name"]: f for f in json.loads((output / "report.json").read_text())["figures"]}


def lines(figure: dict, axis: int = 0) -> dict[str, dict]:
    return {line["key"]: line for line in figure["axes"][axis]["lines"]}


def assert_valid_png(path: Path, width: int, height: int) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    assert int.from_bytes(data[16:20], "big") == width and int.from_bytes(data[20:24], "big") == height
    pixels = matplotlib.image.imread(path)  # decodes every chunk: a truncated file fails here
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0  # something is drawn


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {"dyn": write_dynamic_run(root / "dyn"), "plain": write_run(root / "plain", 10),
            "cbb": write_run(root / "cbb", 30, kinds=("retrieval", "sts")), "static": write_static_run(root / "static")}


@pytest.fixture(scope="module")
def overlay(runs, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("report")
    write_report([runs["dyn"], runs["plain"], runs["cbb"], runs["static"]], output)
    return output


def test_every_figure_is_a_valid_png_and_nothing_else_is_written(overlay):
    found = figures(overlay)
    assert set(found) == {"loss", "loss_retrieval", "loss_sts", "lr", "samples_per_s", "scores", "negatives", "mining",
                          "eval_ndcg_10", "eval_recall_100", "eval_mrr_10"}  # no eval/num_queries curve
    assert {p.name for p in overlay.iterdir()} == {f"{name}.png" for name in found} | {"index.html", "report.json"}
    for name, figure in found.items():
        assert_valid_png(overlay / f"{name}.png", figure["width"], figure["height"])


def test_training_figures_overlay_each_runs_steps(overlay, runs):
    found = figures(overlay)
    loss = lines(found["loss"])
    for name, steps, kinds in (("dyn", 48, ("retrieval",)), ("plain", 10, ("retrieval",)),
                               ("cbb", 30, ("retrieval", "sts"))):
        expected = [metrics_record(s, kinds) for s in range(1, steps + 1)]
        assert loss[f"loss:{name}"]["x"] == list(range(1, steps + 1))
        assert loss[f"loss:{name}"]["y"] == pytest.approx([r["loss"] for r in expected])
        assert lines(found["lr"])[f"lr:{name}"]["y"] == pytest.approx([r["lr"] for r in expected])
        assert lines(found["samples_per_s"])[f"samples_per_s:{name}"]["y"] == [r["samples_per_s"] for r in expected]
    # Runs of 40 steps or more also get a moving mean (over steps // 20 steps), which carries the legend.
    raw = np.array(loss["loss:dyn"]["y"])
    window = 48 // 20
    mean = [raw[max(0, k + 1 - window): k + 1].mean() for k in range(len(raw))]
    assert loss["loss_mean:dyn"]["y"] == pytest.approx(mean)
    assert loss["loss:dyn"]["label"] == "" and loss["loss_mean:dyn"]["label"].startswith("dyn")
    assert "loss_mean:plain" not in loss and loss["loss:plain"]["label"] == "plain"
    # Loss per task kind: drawn because one run trains two kinds; each run with that kind is in it.
    sts = lines(found["loss_sts"])
    assert set(sts) == {"loss/sts:cbb"}
    assert sts["loss/sts:cbb"]["y"] == pytest.approx([metrics_record(s, ("retrieval", "sts"))["loss/sts"]
                                                      for s in range(1, 31)])
    assert set(lines(found["loss_retrieval"])) == {"loss/retrieval:dyn", "loss/retrieval_mean:dyn",
                                                   "loss/retrieval:plain", "loss/retrieval:cbb",
                                                   "loss/retrieval:static"}


def test_dynamic_negatives_view_marks_each_adoption(overlay):
    negatives = figures(overlay)["negatives"]
    assert [axis["ylabel"] for axis in negatives["axes"]] == ["samples judged", "stale samples",
                                                             "replaced negatives", "s / s0"]
    checks = list(range(CHECK_INTERVAL, 49, CHECK_INTERVAL))
    eligible, stale, replaced, ratio = (lines(negatives, i) for i in range(4))
    assert set(eligible) == {"eligible:dyn:scifact"}  # the runs without checks draw nothing here
    assert eligible["eligible:dyn:scifact"]["x"] == checks and eligible["eligible:dyn:scifact"]["y"] == [8] * 12
    assert stale["stale:dyn:scifact"]["y"] == [s // 4 for s in checks]
    assert replaced["replaced:dyn:scifact"]["y"] == [3 * (s // 4) for s in checks]
    assert set(ratio) == {"ratio_q10:dyn:scifact", "ratio_q50:dyn:scifact", "ratio_q90:dyn:scifact",
                          "stale_below:dyn:scifact"}
    assert ratio["ratio_q50:dyn:scifact"]["y"] == pytest.approx([1.0 - 0.01 * s for s in checks])
    assert ratio["stale_below:dyn:scifact"]["y"] == pytest.approx([1 / 1.15] * 12)  # the default stale_ratio
    adoptions = {(mark["x"], mark["key"].rsplit(":", 1)[-1]) for mark in negatives["axes"][0]["marks"]}
    assert adoptions == {(float(adopted), f"v{v}") for v, (_, _, adopted) in VERSIONS.items()}
    assert all(mark["key"].startswith("adoption:dyn:") for mark in negatives["axes"][0]["marks"])  # not static's
    assert all(len(axis["marks"]) == len(VERSIONS) for axis in negatives["axes"])


def test_scores_view_draws_positive_and_negative_scores_each_step(overlay):
    scores = lines(figures(overlay)["scores"])
    assert set(scores) == {"positive:dyn:scifact", "negative:dyn:scifact"}  # only the dynamic run logs them
    assert scores["positive:dyn:scifact"]["x"] == list(range(1, 49))
    assert scores["negative:dyn:scifact"]["y"] == pytest.approx([0.4 - 0.002 * s for s in range(1, 49)])
    marks = figures(overlay)["scores"]["axes"][0]["marks"]
    assert {mark["x"] for mark in marks} == {float(adopted) for _, _, adopted in VERSIONS.values()}


def test_mining_timeline(overlay):
    mining = figures(overlay)["mining"]
    seconds, versions, age = (lines(mining, i) for i in range(3))
    assert set(seconds) == {"mining_seconds:dyn", "mining_seconds:static"}
    assert seconds["mining_seconds:dyn"]["x"] == [VERSIONS[v][0] for v in (1, 2, 3)]
    assert seconds["mining_seconds:dyn"]["y"] == pytest.approx([100.0 + 1.5 * v for v in (1, 2, 3)])
    assert list(zip(versions["mined_from:dyn"]["x"], versions["mined_from:dyn"]["y"])) == \
        [(VERSIONS[v][0], v) for v in (1, 2, 3)]
    assert list(zip(versions["published:dyn"]["x"], versions["published:dyn"]["y"])) == \
        [(published_step(v), v) for v in (1, 2, 3)] == [(0, 1), (10, 2), (18, 3)]
    assert list(zip(versions["adopted:dyn"]["x"], versions["adopted:dyn"]["y"])) == [(1, 1), (11, 2), (19, 3)]
    # The age of the negatives in use: step minus the export step of the version in use, every step;
    # at the checks it is what the trainer itself logged as export_age_steps.
    assert age["age:dyn:scifact"]["x"] == list(range(1, 49))
    assert age["age:dyn:scifact"]["y"] == [s - VERSIONS[version_at(s)][0] for s in range(1, 49)]
    assert age["age:dyn:scifact"]["y"][15] == 16 - 8  # step 16: version 2, mined with the export of step 8
    # Mined once before training (the quickstart's case): one pass, published at step 0, adopted at step 1.
    assert seconds["mining_seconds:static"]["x"] == [0]
    assert seconds["mining_seconds:static"]["y"] == [pytest.approx(118.1)]
    assert (versions["published:static"]["x"], versions["adopted:static"]["x"]) == ([0], [1])
    assert age["age:static:scifact"]["y"] == list(range(1, 21))


def test_evaluation_curves(overlay):
    found = figures(overlay)
    for name, key in (("eval_ndcg_10", "eval/ndcg@10"), ("eval_recall_100", "eval/recall@100"),
                      ("eval_mrr_10", "eval/mrr@10")):
        drawn = lines(found[name])
        assert set(drawn) == {f"{key}:dyn"}
        assert drawn[f"{key}:dyn"]["x"] == list(EVAL_STEPS)
        assert drawn[f"{key}:dyn"]["y"] == pytest.approx([eval_record(s)[key] for s in EVAL_STEPS])


def test_page_links_every_figure_once_in_its_section(overlay):
    page = (overlay / "index.html").read_text()
    for name in figures(overlay):
        assert page.count(f'src="{name}.png"') == 1
    for section in ("Training", "Dynamic negatives", "Mining", "Evaluation"):
        assert f"<h2>{section}</h2>" in page
    assert page.index('src="loss.png"') < page.index('src="negatives.png"') < page.index('src="mining.png"') \
        < page.index('src="eval_ndcg_10.png"')
    summary = {run["label"]: run for run in json.loads((overlay / "report.json").read_text())["runs"]}
    assert summary["dyn"]["step"] == 48 and summary["dyn"]["latest_eval"]["step"] == 48
    assert summary["dyn"]["recipe"] == "training/recipes/quickstart.yaml"


def test_a_run_without_dynamic_negatives_or_evaluation_has_no_such_panels(runs, tmp_path):
    write_report([runs["plain"]], tmp_path)
    assert set(figures(tmp_path)) == {"loss", "lr", "samples_per_s"}
    page = (tmp_path / "index.html").read_text()
    for absent in ("Dynamic negatives", "Mining", "Evaluation", "negatives.png", "mining.png"):
        assert absent not in page


def test_a_run_still_going_is_reported_as_far_as_it_got(tmp_path):
    run = write_run(tmp_path / "live", 7, status="running", max_steps=100)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics_record(8))[:40])  # step 8 half written
    write_jsonl(run / "eval.jsonl", [])
    output = tmp_path / "report"
    assert main([str(run), "--output", str(output)]) == 0
    assert lines(figures(output)["loss"])["loss:live"]["x"] == list(range(1, 8))
    summary = json.loads((output / "report.json").read_text())["runs"][0]
    assert (summary["status"], summary["step"], summary["max_steps"]) == ("running", 7, 100)
    assert "7 of 100" in (output / "index.html").read_text()

    # The run goes on: the same command updates the page.
    with open(run / "metrics.jsonl", "w") as f:
        f.write("".join(json.dumps(metrics_record(s)) + "\n" for s in range(1, 13)))
    assert main([str(run), "--output", str(output)]) == 0
    assert lines(figures(output)["loss"])["loss:live"]["x"] == list(range(1, 13))


def test_a_second_report_into_the_same_directory_removes_figures_it_no_longer_has(runs, tmp_path):
    write_report([runs["dyn"]], tmp_path)
    assert (tmp_path / "negatives.png").is_file()
    (tmp_path / "notes.txt").write_text("mine")
    write_report([runs["plain"]], tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"loss.png", "lr.png", "samples_per_s.png", "index.html",
                                                    "report.json", "notes.txt"}


def test_bad_input_is_one_line_and_exit_2_with_nothing_written(runs, tmp_path):
    output = tmp_path / "out"
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    damaged = write_run(tmp_path / "damaged", 5)
    text = (damaged / "metrics.jsonl").read_text().splitlines()
    (damaged / "metrics.jsonl").write_text("\n".join([text[0], "{not json", *text[1:]]) + "\n")
    cases = [([str(tmp_path / "missing")], "no such directory"),
             ([str(not_a_run)], "not a run directory"),
             ([str(damaged)], "metrics.jsonl:2: not a record of this log"),
             ([str(runs["plain"]), str(damaged / "metrics.jsonl")], "not a directory")]
    for args, message in cases:
        result = subprocess.run([sys.executable, "-m", "embedlib.report", *args, "--output", str(output)],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
        assert not output.exists()


def test_runs_with_the_same_directory_name_get_distinct_labels(tmp_path):
    a = write_run(tmp_path / "a" / "run", 3)
    b = write_run(tmp_path / "b" / "run", 4)
    write_report([a, b], tmp_path / "out")
    assert set(lines(figures(tmp_path / "out")["loss"])) == {"loss:a/run", "loss:b/run"}


def _odd_run(tmp_path, name: str, odd: dict, step_value=None) -> Path:
    """A 6-step run whose step 3 carries `odd` values (and whose step 4 has `step_value` as its step)."""
    run = write_run(tmp_path / name, 6, kinds=("retrieval", "sts"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records[2].update(odd)
    if step_value is not None:
        records[3]["step"] = step_value
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "eval.jsonl").write_text(json.dumps({"step": 6, "eval/ndcg@10": int("9" * 400)}) + "\n"
                                    + json.dumps({"step": 3, "eval/ndcg@10": 0.5}) + "\n")
    return run


@pytest.mark.parametrize("case", ["overflow", "version_string", "version_list", "version_not_integer", "math_text"])
def test_any_readable_log_gives_a_page(tmp_path, case):
    huge = int("9" * 400)
    odd, step_value, name = {}, None, "run"
    if case == "overflow":
        odd, step_value = {"loss": huge, "lr": huge, "time": huge}, huge
    elif case == "version_string":
        odd = {"negatives_version": "v3"}
    elif case == "version_list":
        odd = {"negatives_version": [1, 2]}
    elif case == "version_not_integer":
        odd = {"negatives_version": {"retrieval": "three", "sts": 2.5, "other": huge}}
    elif case == "math_text":
        name = r"$\notacommand{x}$"
        odd = {r"loss/$\notacommand{y}$": 1.0}
    run = _odd_run(tmp_path, name, odd, step_value)
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "embedlib.report", str(run), "--output", str(out)],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert (out / "index.html").is_file() and report["figures"]
    assert report["skipped_values"] >= (0 if case == "math_text" else 2)  # the huge ndcg, and step 3's values
    if case == "math_text":
        assert any(line["label"].startswith("$\\notacommand")
                   for f in report["figures"] for axis in f["axes"] for line in axis["lines"])
