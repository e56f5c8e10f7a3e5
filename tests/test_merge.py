"""python -m embedlib.merge: soups and slerp of tiny exports, refusals, a kill mid-write, a run's selection."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from embedlib.encoder import model_fingerprint
from embedlib.merge import MERGE_JSON, PAUSE_ENV, TMP_PREFIX, build_parser, main
from mining_helpers import save_encoder

REPO = Path(__file__).resolve().parents[1]
STS_PAIRS = [("A man plays a guitar.", "Someone plays an instrument.", 3.8),
             ("A cat sleeps on the sofa.", "A kitten naps on a couch.", 4.2),
             ("The stock market fell today.", "A child rides a bicycle.", 0.2),
             ("Statins lower cholesterol.", "Statins reduce LDL levels.", 4.5),
             ("It is raining in Paris.", "The weather in Paris is wet.", 3.9),
             ("A dog barks at the mailman.", "Quantum computers use qubits.", 0.1),
             ("She is reading a book.", "A woman reads a novel.", 3.5),
             ("The train is late.", "Bananas are yellow.", 0.4)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_bert_dir):
    """Three exports of one tiny model: a, and b and c with differently perturbed weights."""
    root = tmp_path_factory.mktemp("merge_sources")
    return {name: save_encoder(tiny_bert_dir, root / name, seed=seed)
            for name, seed in (("a", None), ("b", 1), ("c", 2))}


@pytest.fixture(scope="module")
def sts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("merge_sts") / "tiny-sts.tsv"
    path.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in STS_PAIRS))
    return path


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def run_merge(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def copy_of(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_identical_sources_give_the_model_back_bit_for_bit(tmp_path, capsys, exports):
    a = exports["a"]
    copies = [a, copy_of(a, tmp_path / "a2"), copy_of(a, tmp_path / "a3")]
    for name, options in (("uniform", []), ("weighted", ["--weights", "1,2,4"]), ("slerp", ["--method", "slerp"])):
        rc, err = run_merge(capsys, "--output", tmp_path / name, *options, *copies)
        assert rc == 0, err
        merged, original = weights(tmp_path / name), weights(a)
        assert merged.keys() == original.keys()
        for key, tensor in original.items():  # the bytes, not only the values (0.0 and -0.0 are equal)
            assert merged[key].dtype == tensor.dtype and merged[key].numpy().tobytes() == tensor.numpy().tobytes(), key
        assert model_fingerprint(tmp_path / name) == model_fingerprint(a)  # every other file copied as it was


def test_linear_merge_is_the_weighted_average_computed_by_hand(tmp_path, capsys, exports):
    sources = [exports["a"], exports["b"], exports["c"]]
    rc, err = run_merge(capsys, "--output", tmp_path / "soup", "--weights", "1,2,5", *sources)
    assert rc == 0, err
    merged, inputs = weights(tmp_path / "soup"), [weights(s) for s in sources]
    for key, tensor in merged.items():
        by_hand = ((1 * inputs[0][key].double() + 2 * inputs[1][key].double() + 5 * inputs[2][key].double()) / 8)
        torch.testing.assert_close(tensor, by_hand.float(), rtol=1.2e-7, atol=1e-12)
    assert any(not torch.equal(merged[k], inputs[0][k]) for k in merged)
    record = json.loads((tmp_path / "soup" / MERGE_JSON).read_text())
    assert record["method"] == "linear" and record["weights"] == [1 / 8, 2 / 8, 5 / 8]
    assert [s["path"] for s in record["sources"]] == [str(s) for s in sources]
    assert [s["fingerprint"] for s in record["sources"]] == [model_fingerprint(s) for s in sources]
    assert record["fingerprint"] == model_fingerprint(tmp_path / "soup")
    card = (tmp_path / "soup" / "README.md").read_text()
    assert all(f"`{s}`" in card for s in sources) and "0.6250" in card and "linear" in card


def test_slerp_gives_the_endpoints_and_keeps_norms_between(tmp_path, capsys, exports):
    a, b, c = exports["a"], exports["b"], exports["c"]
    for t, endpoint in (("0", a), ("1", b)):
        rc, err = run_merge(capsys, "--output", tmp_path / f"t{t}", "--method", "slerp", "--t", t, a, b)
        assert rc == 0, err
        merged = weights(tmp_path / f"t{t}")
        assert all(merged[k].numpy().tobytes() == v.numpy().tobytes() for k, v in weights(endpoint).items())
    rc, err = run_merge(capsys, "--output", tmp_path / "half", "--method", "slerp", "--t", "0.3", a, b)
    assert rc == 0, err
    merged, wa, wb = weights(tmp_path / "half"), weights(a), weights(b)
    for key, tensor in merged.items():
        x, y, m = wa[key].double().flatten(), wb[key].double().flatten(), tensor.double().flatten()
        low, high = sorted((x.norm().item(), y.norm().item()))
        assert low * (1 - 1e-6) <= m.norm().item() <= high * (1 + 1e-6), key
        assert abs(m.norm().item() - (0.7 * x.norm().item() + 0.3 * y.norm().item())) <= 1e-6 * high
        if x.norm() == 0:  # a's biases are 0 (an unperturbed init): the linear fallback
            torch.testing.assert_close(m, (0.3 * y).float().double(), rtol=0, atol=0)
            continue
        theta = torch.arccos(torch.dot(x / x.norm(), y / y.norm()))
        direction = (torch.sin(0.7 * theta) * x / x.norm() + torch.sin(0.3 * theta) * y / y.norm()) / torch.sin(theta)
        torch.testing.assert_close(m / m.norm(), direction, rtol=0, atol=1e-6)
    # Three sources folded pairwise (t = 1/2, then 1/3): each norm the mean of the three.
    rc, err = run_merge(capsys, "--output", tmp_path / "fold", "--method", "slerp", a, b, c)
    assert rc == 0, err
    record = json.loads((tmp_path / "fold" / MERGE_JSON).read_text())
    assert record["fold"] == [1 / 2, 1 / 3] and record["t"] is None
    wc = weights(c)
    for key, tensor in weights(tmp_path / "fold").items():
        mean = sum(w[key].double().norm().item() for w in (wa, wb, wc)) / 3
        assert abs(tensor.double().norm().item() - mean) <= 1e-6 * mean, key


def _edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value, indent=2))


def _drop_normalize(model: Path) -> None:
    shutil.rmtree(model / "2_Normalize")
    _edit_json(model / "modules.json", lambda modules: modules.pop())


def _resize_one_tensor(model: Path) -> None:
    tensors = weights(model)
    tensors["pooler.dense.bias"] = tensors["pooler.dense.bias"][:-1].clone()
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})


def _with_position_ids(model: Path, offset: int) -> None:
    tensors = weights(model)
    tensors["embeddings.position_ids"] = torch.arange(512, dtype=torch.int64)[None] + offset
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})


REFUSED_CHANGES = {
    "pooling": (lambda m: _edit_json(m / "1_Pooling" / "config.json", lambda c: c.update(pooling_mode="cls")),
                "(different pooling)"),
    "instructions": (lambda m: _edit_json(m / "config_sentence_transformers.json",
                                          lambda c: c["prompts"].update(query="Represent this question: ")),
                     "(different prompts, i.e. instructions)"),
    "tokenizer": (lambda m: _edit_json(m / "tokenizer.json", lambda c: c["normalizer"].update(lowercase=False)),
                  "(different tokenizer)"),
    "normalisation": (_drop_normalize, "2_Normalize/config.json (normalisation) is only in"),
    "max length": (lambda m: _edit_json(m / "sentence_bert_config.json", lambda c: c.update(max_seq_length=32)),
                   "(different max sequence length)"),
    "shape": (_resize_one_tensor, "tensor 'pooler.dense.bias' is F32 [31], F32 [32]"),
}


@pytest.mark.parametrize("change", list(REFUSED_CHANGES))
def test_a_mismatched_source_is_refused_and_nothing_written(tmp_path, capsys, exports, change):
    mutate, expected = REFUSED_CHANGES[change]
    other = copy_of(exports["b"], tmp_path / "other")
    mutate(other)
    rc, err = run_merge(capsys, "--output", tmp_path / "out" / "merged", exports["a"], other)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert str(other) in err
    assert not (tmp_path / "out").exists()


def test_other_architectures_and_unequal_buffers_are_refused(tmp_path, capsys, exports):
    from conftest import build_tiny_bert

    wider = save_encoder(build_tiny_bert(tmp_path / "bert64", hidden_size=64), tmp_path / "wider")
    rc, err = run_merge(capsys, "--output", tmp_path / "merged", exports["a"], wider)
    assert rc == 2 and "config.json: field 'hidden_size' is 64, 32 in" in err and "(different architecture)" in err
    first, second = copy_of(exports["a"], tmp_path / "p1"), copy_of(exports["b"], tmp_path / "p2")
    _with_position_ids(first, 0)
    _with_position_ids(second, 1)
    rc, err = run_merge(capsys, "--output", tmp_path / "merged", first, second)
    assert rc == 2 and "tensor 'embeddings.position_ids' (I64, not floating point) differs" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert64", "p1", "p2", "wider"]


@pytest.mark.parametrize("options, count, expected", [
    (["--weights", "1,2"], 3, "2 weights for 3 sources"),
    (["--weights", "1,-1"], 2, "negative weights"),
    (["--weights", "0,0"], 2, "they sum to 0"),
    (["--weights", "1,x"], 2, "expected numbers separated by commas"),
    (["--method", "slerp", "--t", "1.5"], 2, "must be between 0 and 1"),
    (["--method", "slerp", "--t", "0.5"], 3, "--t needs exactly two sources"),
    (["--t", "0.5"], 2, "--t applies to --method slerp only"),
    (["--method", "slerp"], 1, "needs at least two sources"),
    (["--best-k", "2"], 2, "--best-k ranks sources by a figure: give --run RUN (its eval.jsonl), or --sets FILE"),
])
def test_bad_options_are_refused_and_nothing_written(tmp_path, capsys, exports, options, count, expected):
    sources = [exports["a"], exports["b"], exports["c"]][:count]
    rc, err = run_merge(capsys, "--output", tmp_path / "merged", *options, *sources)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_refused_as_the_command_exits(tmp_path, exports):
    (tmp_path / "merged").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "embedlib.merge", "--output", str(tmp_path / "merged"),
                           str(exports["a"]), str(exports["b"])], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: --output {tmp_path / 'merged'}: already exists; a merge "
                                                "never replaces a directory"]
    assert list(tmp_path.iterdir()) == [tmp_path / "merged"] and not any((tmp_path / "merged").iterdir())


def test_a_merge_killed_while_writing_leaves_no_half_export(tmp_path, capsys, exports):
    output = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": str(REPO), PAUSE_ENV: "120"}
    proc = subprocess.Popen([sys.executable, "-m", "embedlib.merge", "--output", str(output), str(exports["a"]),
                             str(exports["b"])], stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stderr:  # the weights, merge.json and the card are written: the rename is next
            if "pausing" in line:
                break
        else:
            pytest.fail(f"the merge ended without pausing (exit {proc.wait()})")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not output.exists()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(f"{TMP_PREFIX}merged-{proc.pid}-")
    assert (tmp_path / left[0] / "model.safetensors").is_file()
    rc, err = run_merge(capsys, "--output", output, exports["a"], exports["b"])  # the next merge clears it
    assert rc == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_the_merge_loads_everywhere_and_evaluates(tmp_path, capsys, exports, sts_file):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from embedlib import evaluation
    from embedlib.encoder import Encoder

    output = tmp_path / "merged"
    rc, err = run_merge(capsys, "--output", output, "--weights", "3,1", exports["a"], exports["b"])
    assert rc == 0, err
    texts = ["a merged model", "loads in every reader"]
    ours = Encoder.from_pretrained(output).encode(texts, show_progress=False)
    theirs = SentenceTransformer(str(output), device="cpu").encode(texts)
    torch.testing.assert_close(torch.from_numpy(theirs), torch.from_numpy(ours), rtol=0, atol=1e-5)
    backbone = AutoModel.from_pretrained(output)
    torch.testing.assert_close(backbone.state_dict()["pooler.dense.bias"], weights(output)["pooler.dense.bias"])
    capsys.readouterr()
    assert evaluation.main(["--model", str(output), "--sts", str(sts_file), "--no-progress"]) == 0
    assert -1 <= json.loads(capsys.readouterr().out)["sts"]["spearman"] <= 1


def _write_export(tmp: Path, source: Path, adapter: bool = False, ema: bool = False) -> None:
    shutil.copytree(source, tmp, dirs_exist_ok=True)
    if adapter:  # a LoRA run's export: merged weights, and the adapter alone beside them
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "adapter_config.json").write_text("{}")
    if ema:  # train.ema's average beside the raw weights: a model of its own
        shutil.copytree(source, tmp / "ema")


def make_run(run: Path, exported: dict[int, Path], rows: list[tuple[int, float]], sts_file: Path,
             set_name: str = "tiny-sts") -> Path:
    """A run with an export of each step (a model directory) and eval.jsonl rows (step, figure) by hand."""
    from embedlib.exports import publish_export

    for step, model in exported.items():
        publish_export(run, step, lambda tmp, model=model, step=step: _write_export(tmp, model, step == 30, step == 20))
    (run / "eval.jsonl").write_text("".join(
        json.dumps({"step": step, "set": set_name, "category": "sts", "main_score": score, "eval/spearman": score,
                    "eval/num_pairs": 8}) + "\n" for step, score in rows))
    (run / "config.yaml").write_text(json.dumps({"run_dir": str(run), "evaluation": {
        "sets": [{"name": set_name, "category": "sts", "path": str(sts_file)}], "batch_size": 4}}))
    return run


@pytest.fixture
def run_dir(tmp_path, exports, sts_file):
    """A run with exports at steps 10, 20, 30 (step 5's was removed) and eval.jsonl rows written by hand."""
    return make_run(tmp_path / "run", {10: exports["a"], 20: exports["b"], 30: exports["c"]},
                    [(5, 0.9), (10, 0.3), (20, 0.5), (30, 0.4)], sts_file)


def test_the_best_exports_of_a_run_by_its_eval_records(tmp_path, capsys, run_dir):
    from embedlib.exports import export_path

    rc, err = run_merge(capsys, "--output", tmp_path / "best2", "--run", run_dir, "--best-k", "2",
                        "--metric", "eval/spearman", "--no-eval")
    assert rc == 0, err
    record = json.loads((tmp_path / "best2" / MERGE_JSON).read_text())
    assert [(s["step"], s["score"], s["run"]) for s in record["sources"]] == [(20, 0.5, str(run_dir)),
                                                                            (30, 0.4, str(run_dir))]
    assert record["selection"]["set"] == "tiny-sts" and record["dev"] is None
    by_hand = {k: ((v.double() + weights(export_path(run_dir, 30))[k].double()) / 2).float()
               for k, v in weights(export_path(run_dir, 20)).items()}
    for key, tensor in weights(tmp_path / "best2").items():
        torch.testing.assert_close(tensor, by_hand[key], rtol=1.2e-7, atol=1e-12)
    assert not (tmp_path / "best2" / "adapter").exists() and not (tmp_path / "best2" / "ema").exists()

    rc, err = run_merge(capsys, "--output", tmp_path / "scored", "--run", run_dir, "--best-k", "2",
                        "--weights-from-scores", "--no-eval")
    assert rc == 0, err
    assert json.loads((tmp_path / "scored" / MERGE_JSON).read_text())["weights"] == [0.5 / 0.9, 0.4 / 0.9]

    rc, err = run_merge(capsys, "--output", tmp_path / "x", "--run", run_dir, "--best-k", "4")
    assert rc == 2 and "only 3 evaluated exports" in err
    rc, err = run_merge(capsys, "--output", tmp_path / "x", "--run", run_dir, "--set", "other")
    assert rc == 2 and "--set other: not a set of" in err
    assert not (tmp_path / "x").exists()


def test_a_greedy_soup_adds_an_export_only_if_the_dev_figure_does_not_fall(tmp_path, capsys, run_dir, sts_file):
    from embedlib import evaluation
    from embedlib.exports import export_path, publish_export

    # Step 40's export is step 20's model again: a soup of the two is that model, its figure does not fall.
    publish_export(run_dir, 40, lambda tmp: _write_export(tmp, export_path(run_dir, 20)))
    with open(run_dir / "eval.jsonl", "a") as f:
        f.write(json.dumps({"step": 40, "set": "tiny-sts", "category": "sts", "main_score": 0.45}) + "\n")
    rc, err = run_merge(capsys, "--output", tmp_path / "greedy", "--run", run_dir, "--greedy")
    assert rc == 0, err
    record = json.loads((tmp_path / "greedy" / MERGE_JSON).read_text())
    assert [s["step"] for s in record["sources"]] == [20, 40, 30, 10]  # by their eval.jsonl figure
    trace = record["greedy"]
    assert trace[0] == {"source": 0, "figure": record["sources"][0]["dev"]["sets"]["tiny-sts"]["main_score"],
                        "kept": True}
    assert trace[1] == {"source": 1, "figure": trace[0]["figure"], "kept": True}
    best = trace[0]["figure"]
    for step in trace[1:]:
        assert step["kept"] == (step["figure"] >= best)
        best = max(best, step["figure"]) if step["kept"] else best
    kept = [s["source"] for s in trace if s["kept"]]
    assert record["weights"] == [1 / len(kept) if i in kept else 0.0 for i in range(4)]
    assert record["dev"]["sets"]["tiny-sts"]["main_score"] == pytest.approx(best, abs=1e-12)
    # The merge evaluates as embedlib.evaluation scores it, and its card lists sources and figures.
    capsys.readouterr()
    assert evaluation.main(["--model", str(tmp_path / "greedy"), "--sts", str(sts_file), "--no-progress",
                            "--batch-size", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["sts"]["spearman"] == pytest.approx(best, abs=1e-6)
    card = (tmp_path / "greedy" / "README.md").read_text()
    assert "greedy soup" in card and "tiny-sts main score" in card and f"{best:.4f}" in card


def test_several_runs_are_pooled_each_export_scored_by_its_own_run(tmp_path, capsys, run_dir, exports, sts_file):
    """A seed sweep: run_dir (steps 10, 20, 30: 0.3, 0.5, 0.4) and a second run (steps 10, 20: 0.45, 0.5)."""
    other = make_run(tmp_path / "seed2", {10: exports["c"], 20: exports["a"]}, [(10, 0.45), (20, 0.5)], sts_file)
    rc, err = run_merge(capsys, "--output", tmp_path / "best3", "--run", run_dir, "--run", other, "--best-k", "3",
                        "--no-eval")
    assert rc == 0, err
    record = json.loads((tmp_path / "best3" / MERGE_JSON).read_text())
    # 0.5 at step 20 in both runs: a tie, the run given first first; then seed2's 0.45.
    assert [(s["run"], s["step"], s["score"]) for s in record["sources"]] == [
        (str(run_dir), 20, 0.5), (str(other), 20, 0.5), (str(other), 10, 0.45)]
    assert record["selection"]["runs"] == [str(run_dir), str(other)] and record["weights"] == [1 / 3] * 3
    for key, tensor in weights(tmp_path / "best3").items():  # b, a and c: the uniform soup of the three
        by_hand = sum(weights(exports[n])[key].double() for n in "bac") / 3
        torch.testing.assert_close(tensor, by_hand.float(), rtol=1.2e-7, atol=1e-12)
    assert "the runs `" in (tmp_path / "best3" / "README.md").read_text()

    # The runs' own sets are the dev sets (they agree); a greedy soup over the pool evaluates on them.
    rc, err = run_merge(capsys, "--output", tmp_path / "greedy", "--run", run_dir, "--run", other, "--greedy")
    assert rc == 0, err
    record = json.loads((tmp_path / "greedy" / MERGE_JSON).read_text())
    assert len(record["sources"]) == 5 and all(s["dev"]["sets"]["tiny-sts"] for s in record["sources"])

    elsewhere = make_run(tmp_path / "seed3", {10: exports["a"]}, [(10, 0.2)], sts_file, set_name="other-sts")
    for argv, expected in (
            (["--run", run_dir, "--run", run_dir], "given twice"),
            (["--run", run_dir, "--run", elsewhere],
             "their eval.jsonl files have the sets tiny-sts, other-sts; choose one"),
            (["--run", run_dir, "--run", elsewhere, "--set", "tiny-sts"], f"--set tiny-sts: not a set of {elsewhere}"),
            (["--run", run_dir, "--run", other, "--best-k", "6"], "only 5 evaluated exports"),
            (["--run", run_dir, "--metric", "average"], "ranks model directories")):
        rc, err = run_merge(capsys, "--output", tmp_path / "x", *argv)
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    # Runs whose evaluation sets differ cannot share dev figures without --sets.
    (elsewhere / "eval.jsonl").write_text(json.dumps({"step": 10, "set": "tiny-sts", "main_score": 0.2}) + "\n")
    rc, err = run_merge(capsys, "--output", tmp_path / "x", "--run", run_dir, "--run", elsewhere, "--best-k", "2")
    assert rc == 2 and "evaluation sets or options (config.yaml: evaluation) differ" in err, err
    assert not (tmp_path / "x").exists()


def test_model_directories_are_scored_on_the_sets_then_selected(tmp_path, capsys, exports, sts_file):
    from embedlib import evaluation

    sources = [exports["a"], exports["b"], exports["c"]]
    figures = []
    for source in sources:  # what embedlib.evaluation gives each, the figure the merge must rank by
        capsys.readouterr()
        assert evaluation.main(["--model", str(source), "--sts", str(sts_file), "--no-progress",
                                "--batch-size", "4"]) == 0
        figures.append(json.loads(capsys.readouterr().out)["sts"]["spearman"])
    order = sorted(range(3), key=lambda i: -figures[i])
    sets = tmp_path / "sets.yaml"
    sets.write_text(f"- {{name: tiny-sts, category: sts, path: {sts_file}}}\n")
    rc, err = run_merge(capsys, "--output", tmp_path / "best2", "--sets", sets, "--best-k", "2",
                        "--weights-from-scores", "--batch-size", "4", *sources)
    assert rc == 0, err
    record = json.loads((tmp_path / "best2" / MERGE_JSON).read_text())
    assert [s["path"] for s in record["sources"]] == [str(sources[i]) for i in order[:2]]
    assert [s["score"] for s in record["sources"]] == pytest.approx([figures[i] for i in order[:2]], abs=1e-6)
    assert [s["dev"]["sets"]["tiny-sts"]["main_score"] for s in record["sources"]] == \
        [s["score"] for s in record["sources"]]
    assert record["selection"] == {"runs": None, "sets": str(sets), "metric": "main_score", "set": "tiny-sts",
                                   "best_k": 2, "weights_from_scores": "proportional"}
    top = [figures[i] for i in order[:2]]
    assert record["weights"] == pytest.approx([top[0] / sum(top), top[1] / sum(top)])

    # A greedy soup over model directories, by the average of the category means of two sets.
    two = tmp_path / "two.yaml"
    two.write_text(f"- {{name: tiny-sts, category: sts, path: {sts_file}}}\n"
                   f"- {{name: again, category: sts, path: {sts_file}}}\n")
    rc, err = run_merge(capsys, "--output", tmp_path / "greedy", "--sets", two, "--metric", "average", "--greedy",
                        "--batch-size", "4", *sources)
    assert rc == 0, err
    record = json.loads((tmp_path / "greedy" / MERGE_JSON).read_text())
    assert [s["path"] for s in record["sources"]] == [str(sources[i]) for i in order]
    assert record["greedy"][0]["figure"] == pytest.approx(figures[order[0]], abs=1e-6)
    assert record["selection"]["metric"] == "average" and record["selection"]["set"] is None

    for argv, expected in (
            (["--greedy"], "--greedy ranks sources by a figure: give --run RUN (its eval.jsonl), or --sets FILE"),
            (["--sets", sets, "--best-k", "2", "--no-eval"], "by their dev figures, which --no-eval turns off"),
            (["--sets", two, "--best-k", "2"], "has the sets tiny-sts, again: choose the set of --metric with --set"),
            (["--sets", sets, "--best-k", "4"], "--best-k 4: only 3 model directories given"),
            (["--sets", sets, "--best-k", "2", "--metric", "eval/ndcg@10"], "not a figure of the sts set"),
            (["--sets", two, "--metric", "average", "--set", "again", "--greedy"], "it takes no --set")):
        rc, err = run_merge(capsys, "--output", tmp_path / "x", *argv, *sources)
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "x").exists()


def test_the_readme_commands_parse():
    commands = [line for line in (REPO / "README.md").read_text().splitlines()
                if line.startswith("python -m embedlib.merge ")]
    assert len(commands) == 5
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[3:])
        assert args.output is not None and (args.sources or args.runs)


def test_dev_figures_through_the_embedding_cache_equal_those_without(tmp_path, capsys, exports):
    """--cache-dir: each model's corpus embeddings go to the cache once (a greedy soup's trials and
    sources included), and the figures are those of an evaluation without it."""
    from test_evaluation_cli import write_beir

    beir = write_beir(tmp_path / "beir")
    sets = tmp_path / "sets.yaml"
    sets.write_text(f"- {{name: tiny-beir, category: retrieval, path: {beir}}}\n")
    sources = [exports["a"], exports["b"], exports["c"]]
    records = {}
    for name, extra in (("plain", []), ("cached", ["--cache-dir", tmp_path / "cache"])):
        rc, err = run_merge(capsys, "--output", tmp_path / name, "--sets", sets, "--metric", "average", "--greedy",
                            "--batch-size", "4", "--dtype", "float32", *extra, *sources)
        assert rc == 0, err
        records[name] = json.loads((tmp_path / name / MERGE_JSON).read_text())
    assert records["cached"]["greedy"] == records["plain"]["greedy"]
    assert [s["dev"] for s in records["cached"]["sources"]] == [s["dev"] for s in records["plain"]["sources"]]
    assert records["cached"]["dev"] == records["plain"]["dev"]
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) >= 3  # the sources' at least (trials that equal the final soup share its entry)
