"""scripts/quickstart.py (`make demo`) end to end, shrunk: the real entrypoints as subprocesses (mining,
the sidecar beside a 2-rank DeepSpeed trainer, evaluation) on a tiny BERT and a slice of SciFact;
resume; a failing stage ends the script with a clear message; a fresh start never deletes a foreign
directory. The full-size run (all-MiniLM-L6-v2, all of SciFact) is measured by hand: README, Results."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "quickstart.py"


def small(steps: int = 4) -> list[str]:
    """The shrinking flags of every test run: a tiny model trains `steps` steps of 2 ranks x 4 queries."""
    return ["--max-steps", str(steps), "--batch-size", "4", "--max-length", "32", "--lr", "1e-3", "--no-progress",
            "train.num_workers=0", "train.export_every=2", "train.save_every=2", "negatives.check_interval=2"]


def make_small_beir(directory: Path, scifact: Path, train_pairs: int = 32, dev_queries: int = 16,
                    other_docs: int = 200) -> Path:
    """A slice of the bundled SciFact in the layout the quickstart reads: the first training pairs, the
    first dev queries, their relevant abstracts plus `other_docs` others."""
    directory.mkdir(parents=True, exist_ok=True)
    with gzip.open(scifact / "pairs.train.jsonl.gz", "rt", encoding="utf-8") as f:
        pairs = [json.loads(line) for _, line in zip(range(train_pairs), f)]
    queries = [json.loads(line) for line in (scifact / "queries.dev.jsonl").read_text().splitlines()[:dev_queries]]
    wanted = {q["_id"] for q in queries}
    qrels = [line.split("\t") for line in (scifact / "qrels.dev.tsv").read_text().splitlines()[1:]]
    qrels = [row for row in qrels if row[0] in wanted]
    needed = {d for p in pairs for d in p["pos_ids"]} | {row[1] for row in qrels}
    with gzip.open(scifact / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    docs = [d for d in docs if d["_id"] in needed] + [d for d in docs if d["_id"] not in needed][:other_docs]

    def jsonl(records) -> str:
        return "".join(json.dumps(r) + "\n" for r in records)

    (directory / "corpus.jsonl").write_text(jsonl(docs))
    (directory / "pairs.train.jsonl").write_text(jsonl(pairs))
    (directory / "queries.dev.jsonl").write_text(jsonl(queries))
    (directory / "qrels.dev.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in qrels))
    return directory


def run_quickstart(args: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, scifact_dir) -> Path:
    return make_small_beir(tmp_path_factory.mktemp("scifact_small"), scifact_dir)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert_dir, small_data):
    """One shrunk quickstart run, shared by the tests that read what it left."""
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    result = run_quickstart(["--run-dir", str(run_dir), "--model", str(tiny_bert_dir), "--data", str(small_data),
                             *small()])
    assert result.returncode == 0, _explain(result)
    return run_dir, result


def test_runs_the_whole_loop_and_ends_with_the_export(finished_run):
    run_dir, result = finished_run
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == f"exported: {run_dir / 'exports' / 'step_00000004'}"
    assert lines[-2] == f"report: {run_dir / 'report' / 'index.html'}"  # the run's report, just before
    assert {"loss.png", "mining.png"} <= {p.name for p in (run_dir / "report").iterdir()}
    assert (run_dir / "exports" / "step_00000004" / "modules.json").is_file()
    table = result.stdout
    for header in ("nDCG@10", "Recall@100", "MRR@10", "base", "trained (4 steps)", "change"):
        assert header in table, table

    record = json.loads((run_dir / "quickstart.json").read_text())
    assert record["status"] == "completed" and record["export"] == str(run_dir / "exports" / "step_00000004")
    for model in ("base", "trained"):
        assert record[model]["num_queries"] == 16
        assert 0.0 <= record[model]["ndcg@10"] <= 1.0
    assert record["trained"]["ndcg@10"] != record["base"]["ndcg@10"]  # the evaluated model is the trained one
    assert set(record["seconds"]) == set(record["cpu_seconds"]) == {"mine", "evaluate_base", "train", "evaluate_trained"}
    # One embedding cache: the base evaluation encoded only the dev queries, the corpus came from the
    # mining pass; the trained model's corpus comes from the sidecar's pass over the final export when
    # the sidecar finished one before it was stopped.
    encoding = record["encoding"]
    assert encoding["evaluate_base"]["corpus_rows_encoded"] == 0 and encoding["evaluate_base"]["texts"] == 16
    assert encoding["evaluate_base"]["corpus_rows_from_cache"] == encoding["evaluate_base"]["corpus_rows"] > 200
    final_mined = any(r["export_step"] == 4 and r["refresh"] == "full" for r in record["refreshes"])
    if final_mined:
        assert encoding["evaluate_trained"]["corpus_rows_encoded"] == 0, record["refreshes"]
    assert record["refreshes"][0]["mode"] == "mine" and record["refreshes"][0]["encoded_passages"] > 200

    # The entrypoints' own records: the trainer ran 2 ranks to the end, mining published with the base model.
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["world_size"] == 2 and run["final_step"] == 4
    manifest = json.loads((run_dir / "negatives" / "v000001" / "manifest.json").read_text())
    assert manifest["model_step"] == 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[0]["negatives_version"] == {"scifact": 1}  # trained on the mined hard negatives
    # The rule judged the samples trained once since their assignment (s0: the mining scores).
    checks = [m for m in metrics if "negatives/scifact/eligible" in m]
    assert [m["step"] for m in checks] == [2, 4] and checks[0]["negatives/scifact/eligible"] == 16
    # The trainer evaluated the export the script prints, as the script did; the report shows both views.
    (evaluation,) = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert evaluation["step"] == 4 and evaluation["eval/ndcg@10"] == pytest.approx(record["trained"]["ndcg@10"],
                                                                                 abs=1e-6)
    assert evaluation["category"] == "retrieval" and evaluation["main_score"] == evaluation["eval/ndcg@10"]
    assert {"negatives.png", "eval_retrieval.png"} <= {p.name for p in (run_dir / "report").iterdir()}


def test_the_sidecar_ran_beside_the_trainer_and_stopped_cleanly(finished_run):
    run_dir, _ = finished_run
    log = (run_dir / "logs" / "sidecar.log").read_text()
    assert "sidecar watching" in log and "sidecar stopped by SIGTERM" in log, log
    assert "Traceback" not in log, log


@pytest.mark.slow
def test_resume_continues_the_run(finished_run, tiny_bert_dir, small_data):
    run_dir, _ = finished_run
    result = run_quickstart(["--run-dir", str(run_dir), "--model", str(tiny_bert_dir), "--data", str(small_data),
                             "--resume", *small(steps=6)])
    assert result.returncode == 0, _explain(result)
    assert result.stdout.strip().splitlines()[-1] == f"exported: {run_dir / 'exports' / 'step_00000006'}"
    assert "negatives already mined" in result.stderr
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]  # continued from the step-4 checkpoint
    assert json.loads((run_dir / "run.json").read_text())["start_step"] == 4


def test_a_failing_stage_stops_with_a_clear_message(tmp_path, tiny_bert_dir, small_data):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("corpus.jsonl", "queries.dev.jsonl", "qrels.dev.tsv"):
        (data / name).write_text((small_data / name).read_text())
    (data / "pairs.train.jsonl").write_text('{"query": "q", "pos_ids": ["no-such-doc"]}\n')
    run_dir = tmp_path / "run"
    result = run_quickstart(["--run-dir", str(run_dir), "--model", str(tiny_bert_dir), "--data", str(data), *small()])
    assert result.returncode != 0
    assert "quickstart: error: mining failed with exit status 2" in result.stderr, _explain(result)
    assert "pairs.train.jsonl:1" in result.stderr  # mining's own message names the file and line
    assert "exported:" not in result.stdout
    assert json.loads((run_dir / "quickstart.json").read_text())["status"] == "failed"


def _quickstart_module():
    spec = importlib.util.spec_from_file_location("quickstart", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_fresh_start_never_deletes_a_foreign_directory(tmp_path, tiny_bert_dir, small_data, capsys):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("months of work")
    quickstart = _quickstart_module()
    code = quickstart.main(["--run-dir", str(precious), "--model", str(tiny_bert_dir), "--data", str(small_data)])
    assert code == 1
    assert "refusing to delete it" in capsys.readouterr().err
    assert (precious / "chapter1.tex").read_text() == "months of work"


def test_bad_model_and_data_paths_are_clear_errors(tmp_path, small_data, capsys):
    quickstart = _quickstart_module()
    assert quickstart.main(["--run-dir", str(tmp_path / "r"), "--model", str(tmp_path), "--data", str(small_data)]) == 1
    assert "is not a model directory (no config.json)" in capsys.readouterr().err
    assert quickstart.main(["--run-dir", str(tmp_path / "r"), "--model", "package:no_such_package_xyz"]) == 1
    assert "no installed Python package named 'no_such_package_xyz'" in capsys.readouterr().err
    assert quickstart.main(["--run-dir", str(tmp_path / "r"), "--data", str(tmp_path)]) == 1
    assert "no corpus.jsonl.gz" in capsys.readouterr().err
