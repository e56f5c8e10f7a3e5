"""bench/gpu_check.py, the prepared GPU check: its dry run (every section's code path, tiny, on the CPU),
the install of carried wheels, the hard time budget, and the figures it derives (model FLOPs, the
sidecar's step classification, the aims). The GPU run itself happens on the GPU machine (make gpu-check)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _grad_cache_exists() -> bool:
    from training.config import ConfigError, load_config

    try:
        load_config(REPO / "training" / "recipes" / "quickstart.yaml", ["train.grad_cache.chunk_size=2"])
        return True
    except ConfigError:
        return False


@pytest.mark.slow
def test_dry_run_runs_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    done = _run(["--dry-run", "--out", str(out), "--scratch", str(tmp_path / "scratch")], timeout=1100)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    assert {name: s["status"] for name, s in sections.items()} == {name: "ok" for name in gpu_check.SECTIONS}, \
        {name: s.get("note") for name, s in sections.items()}

    env = sections["env"]["results"]
    assert env["cuda_available"] is False and env["dry_run"] is True
    assert all(v == "ok" for v in env["imports"].values()), env["imports"]
    assert env["matmul"]["tflops"] > 0

    tests = sections["tests"]["results"]
    names = {t["name"].split("[")[0] for t in tests["tests"]}
    assert {"test_bf16_training_step", "test_zero_on_one_gpu_over_nccl", "test_export_of_a_gpu_run_loads",
            "test_gpu_search_equals_cpu_search"} <= names
    assert tests["counts"]["skipped"] == len(tests["tests"]) and not tests["counts"]["failed"]

    train = sections["train"]["results"]
    variants = ["plain", "grad_cache"] if _grad_cache_exists() else ["plain"]
    assert train["variants"] == variants
    if len(variants) == 1:
        assert any("train.grad_cache.chunk_size" in n for n in train["notes"])
    plan = gpu_check._train_plan(gpu_check.Context("train", tmp_path, tmp_path / "x.json", 1, dry=True))
    want = {(m, t, b, v) for m, lengths in plan["models"].items() for t, bs in lengths.items() for b in bs
            for v in variants}
    items = train["items"]
    assert {(i["model"], i["tokens"], i["queries"], i["variant"]) for i in items} == want
    # Over the memory the plan gives bert-base, the largest plain batch is skipped, as on a GPU.
    skipped = [i for i in items if i["status"] == "skipped"]
    assert [(i["model"], i["queries"], i["variant"]) for i in skipped] == [("bert-base", 4, "plain")], skipped
    assert "grad-cache variant runs it" in skipped[0]["note"]
    for i in items:
        if i in skipped:
            continue
        assert i["status"] == "ok", i
        assert i["s_per_step"] > 0 and 0 < i["mfu"] < 1 and math.isfinite(i["tflops"])
        assert i["tokens_per_step"] == i["sequences"] * i["tokens"]  # every text fills its tokens
        shape = gpu_check.DRY_SHAPES[i["model"]]
        assert i["flops_per_step"] == pytest.approx(gpu_check.train_flops(shape, [i["tokens"]] * i["sequences"]))

    encode = sections["encode"]["results"]["items"]
    assert encode and all(i["status"] == "ok" and i["texts_per_s"] > 0 for i in encode)

    search = sections["search"]["results"]["summary"]
    assert search["backend"] == "torch" and search["equals_faiss_cpu"] is True
    assert search["end_to_end_qps"] > 0 and search["candidate_qps"] > 0 and search["rescore_qps_1_thread"] > 0

    sidecar = sections["sidecar"]["results"]["summary"]
    assert sidecar["trainer_rc"] == 0 and sidecar["steps"] == gpu_check._sidecar_plan(
        gpu_check.Context("sidecar", tmp_path, tmp_path / "x.json", 1, dry=True))["steps"]
    assert sidecar["passes"] >= 1 and sidecar["published"] >= 2  # the first mining, then the sidecar's
    assert sidecar["idle_steps"] + sidecar["mining_steps"] > 0 and 1 in sidecar["versions_adopted"]

    table = (out / "gpu_check.md").read_text()
    for name in gpu_check.SECTIONS:
        assert f"| {name} | section | **ok**" in table
    assert ">= 45%" in table and "<= 10%" in table and ">= 20,000 queries/s" in table
    assert set(report["aims"]) == {"bert_large_mfu_longest", "sidecar_slowdown", "search_qps"}
    assert all(a["met"] is None for a in report["aims"].values())  # a dry run judges no aim
    assert "===== sidecar =====" in (out / "gpu_check.log").read_text()


def _wheel(directory: Path, dist: str, version: str, module: str, body: str) -> Path:
    """A real (minimal) wheel: a package and its dist-info."""
    info = f"{dist}-{version}.dist-info"
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    files = {f"{module}/__init__.py": body,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
             f"{info}/top_level.txt": f"{module}\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_install_of_carried_wheels_and_a_section_cut_at_its_budget(tmp_path):
    """A carried wheel the interpreter lacks is installed and importable in the sections; one whose module
    the interpreter has (numpy here) is left alone; a section over its budget is cut, not waited for."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "gpu_check_demo", "0.3", "gpu_check_demo", "VALUE = 42\n")
    _wheel(wheels, "numpy", "0.0.1", "numpy", "raise ImportError('the carried stand-in must not be used')\n")
    assert gpu_check.wheel_modules(wheels / "gpu_check_demo-0.3-py3-none-any.whl") == ["gpu_check_demo"]
    out, site = tmp_path / "out", tmp_path / "site"
    done = _run(["--dry-run", "--out", str(out), "--wheels", str(wheels), "--site", str(site), "--only",
                 "env,search", "--budget", "search=0.5"], timeout=600)
    report = json.loads((out / "gpu_check.json").read_text())
    install = report["install"]
    assert install["status"] == "ok", install
    assert [(e["dist"], e["version"]) for e in install["installed"]] == [("gpu-check-demo", "0.3")]
    assert [e["dist"] for e in install["present"]] == ["numpy"]
    assert (site / "gpu_check_demo" / "__init__.py").is_file() and not (site / "numpy").exists()
    env = report["sections"]["env"]
    assert env["status"] == "ok", env
    assert env["results"]["imports"]["gpu_check_demo"] == "ok"
    assert env["results"]["carried"] == [{"dist": "gpu-check-demo", "version": "0.3", "imports": True}]
    search = report["sections"]["search"]
    assert search["status"] == "cut" and search["seconds"] < 0.5 + gpu_check.GRACE_S + 15, search
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| search | section | **cut**" in (out / "gpu_check.md").read_text()


def test_two_versions_of_one_wheel_stop_the_install(tmp_path):
    _wheel(tmp_path, "gpu_check_demo", "0.3", "gpu_check_demo", "")
    _wheel(tmp_path, "gpu_check_demo", "0.4", "gpu_check_demo", "")
    result = gpu_check.install_wheels(tmp_path, tmp_path / "site")
    assert result["status"] == "failed" and "two versions" in result["note"]


def test_train_flops_count_every_matmul_of_the_encoder():
    """The MFU numerator against torch's own FLOP counter on a real BERT forward (3 forwards = one
    training step: backward costs two). Eager attention, whose two matmuls the counter sees on the CPU."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertConfig, BertModel

    shape = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 256}
    config = BertConfig(vocab_size=100, max_position_embeddings=64, attn_implementation="eager", **shape)
    model = BertModel(config, add_pooling_layer=False)
    model.eval()
    ids = torch.randint(0, 100, (5, 48))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert gpu_check.train_flops(shape, [48] * 5) == pytest.approx(3 * counter.get_total_flops(), rel=1e-9)


def test_steps_are_classified_by_their_overlap_with_sidecar_passes():
    lines = [(10.0, "INFO mining.sidecar: mining with the export of step 5\n"),
             (14.0, "INFO mining: published negatives v000002 ...\n"),
             (20.0, "INFO mining.sidecar: mining with the export of step 10\n")]
    windows = gpu_check._windows(lines, end=30.0)
    assert windows == [(10.0, 14.0), (20.0, 30.0)]
    steps = [{"step": 1, "time": 11.0, "step_time_s": 1.0},  # warm-up: left out
             {"step": 2, "time": 9.0, "step_time_s": 1.0},  # before the pass
             {"step": 3, "time": 10.4, "step_time_s": 1.0},  # 0.4 of 1.0 inside: between passes
             {"step": 4, "time": 12.0, "step_time_s": 2.0},  # inside
             {"step": 5, "time": 14.5, "step_time_s": 1.0},  # 0.5 inside: during
             {"step": 6, "time": 25.0, "step_time_s": 1.5}]  # the open pass
    idle, mining = gpu_check.classify_steps(steps, windows, warmup=1)
    assert idle == [1.0, 1.0] and mining == [2.0, 1.0, 1.5]


def _item(model, tokens, queries, variant, mfu):
    return {"model": model, "tokens": tokens, "queries": queries, "sequences": 5 * queries, "variant": variant,
            "status": "ok", "mfu": mfu, "s_per_step": 0.5, "tflops": mfu * 989.4, "peak_memory_gib": 20.0}


def test_aims_take_the_best_bert_large_figure_at_the_longest_length():
    report = {"sections": {
        "train": {"status": "ok", "results": {"items": [
            _item("bert-large", 512, 8, "plain", 0.41), _item("bert-large", 512, 32, "grad_cache", 0.47),
            _item("bert-large", 128, 64, "plain", 0.60), _item("bert-base", 512, 64, "plain", 0.70),
            {"model": "bert-large", "tokens": 512, "queries": 64, "sequences": 320, "variant": "plain",
             "status": "skipped", "note": "activations"},
            {"model": "bert-large", "status": "cut", "note": "no time left for this model"}]}},
        "sidecar": {"status": "ok", "results": {"summary": {"slowdown": 0.12}}},
        "search": {"status": "cut", "results": {"summary": {}}}}}
    aims = gpu_check.evaluate_aims(report)
    assert aims["bert_large_mfu_longest"]["value"] == 0.47 and aims["bert_large_mfu_longest"]["met"] is True
    assert aims["bert_large_mfu_longest"]["at"] == "32 queries, grad_cache"
    assert aims["sidecar_slowdown"]["met"] is False
    assert aims["search_qps"]["met"] is None  # not measured is not "not met"
    report.update(aims=aims, started_at="t", wall_s=1.0)
    for name in report["sections"]:
        report["sections"][name].update(seconds=1.0, budget_s=2.0)
    table = gpu_check.markdown(report)
    assert ">= 45%: met" in table and "<= 10%: not met" in table and "not tabulated" not in table
    assert "| train | bert-large | cut: no time left for this model |" in table
