"""train.ema: an exponential moving average of the trainable weights (training/ema.py).

At 2 gloo ranks under ZeRO-2 and ZeRO-3 (tests/ema_worker.py: a real DeepSpeed engine, each rank its
share of one global batch) the average equals one process's on the whole batch, and one process's equals
the average computed by hand from its weights after every step; under ZeRO-3 each rank holds half of it.
Through the trainer (torchrun, ZeRO-3, 2 ranks): the export holds the average in ema/ beside the raw
weights, and a run resumed from a checkpoint exports the same average bit for bit. Bad settings: one line,
exit 2.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ema_worker
from embedlib.exports import list_exports
from rank_processes import spawn_ranks
from test_training_runs import QUICKSTART, REPO, _command, _env, _run
from training.checkpoint import list_checkpoints
from training.config import ConfigError, load_config

TIMEOUT_S = 300
# Weights of 2 ranks against one process after 5 AdamW steps at lr 1e-2. The ranks' gradients agree to
# reduction order (STACK.md: 3e-6 at ZeRO-1/2, about 1e-5 at ZeRO-3), but AdamW divides a gradient by its
# own size, so a parameter whose true gradient is zero (the attention's key bias: the softmax does not see
# it) walks on that rounding noise: 1.3e-5 measured, every other parameter within 4.4e-6. The average and
# the weights differ by 1.4e-2, a hundred times this tolerance.
RTOL, ATOL = 1e-4, 1e-4


@pytest.fixture(scope="module")
def worker_runs(tiny_bert_dir, tmp_path_factory) -> dict[int, Path]:
    """The worker at 2 ranks, then in one process (which also tries the 2-rank ZeRO-3 tag)."""
    two = tmp_path_factory.mktemp("ema_2")
    spawn_ranks(ema_worker.main, 2, str(tiny_bert_dir), str(two), None, timeout_s=TIMEOUT_S)
    one = tmp_path_factory.mktemp("ema_1")
    spawn_ranks(ema_worker.main, 1, str(tiny_bert_dir), str(one), str(two), timeout_s=TIMEOUT_S)
    return {1: one, 2: two}


def _assert_close(got: dict, expected: dict, what: str) -> None:
    assert sorted(got) == sorted(expected), what
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}, {name}: {m}")


STAGES = ["zero2", "zero3", "zero3_lora"]


@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_keep_the_average_of_one_process(worker_runs, stage):
    one, two = (load_file(str(worker_runs[n] / stage / "ema.safetensors")) for n in (1, 2))
    _assert_close(two, one, f"{stage}, 2 ranks against 1 process")
    # The average is not the weights (it lags them): comparing averages compares more than the weights.
    raw = load_file(str(worker_runs[1] / stage / "raw.safetensors"))
    assert max((raw[k] - one[k]).abs().max().item() for k in raw) > 50 * ATOL
    results = json.loads((worker_runs[2] / "results.json").read_text())[stage]
    total, local = results["total_elements"], results["local_elements"]
    if stage != "zero2":  # each rank its own partition: about half of every parameter
        assert all(n < 0.6 * total for n in local) and sum(local) >= total, results
    else:  # replicated as the module is
        assert local == [total, total]


@pytest.mark.parametrize("stage", STAGES)
def test_the_average_is_the_one_computed_by_hand(worker_runs, stage):
    directory = worker_runs[1] / stage
    trace = load_file(str(directory / "trace.safetensors"))
    names = [k.split("/", 1)[1] for k in trace if k.startswith("0/")]
    assert any(n.startswith("projection.") for n in names) and any(n.startswith("backbone.") for n in names)
    if stage.endswith("lora"):  # the adapters and the projection only: frozen weights do not move
        assert all(".lora_" in n or n.startswith("projection.") for n in names)
    decay = ema_worker.DECAY
    expected = {}
    for name in names:
        average = trace[f"0/{name}"].double()  # the weights of step 0
        for step in range(1, ema_worker.STEPS + 1):
            average = decay * average + (1 - decay) * trace[f"{step}/{name}"].double()
        expected[name] = average.float()
    got = load_file(str(directory / "ema.safetensors"))
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7)
    # A checkpoint round trip gives the average back exactly.
    reloaded = load_file(str(directory / "reloaded.safetensors"))
    assert all(torch.equal(reloaded[name], got[name]) for name in names)


def test_a_lora_export_merges_the_average_of_the_adapters(worker_runs, tiny_bert_dir):
    average = load_file(str(worker_runs[1] / "zero3_lora" / "ema.safetensors"))
    export = worker_runs[1] / "zero3_lora" / "run" / "exports" / "step_00000005"
    raw, merged = (load_file(str(d / "model.safetensors")) for d in (export, export / "ema"))
    assert sorted(raw) == sorted(merged) and not any("lora" in k or "base_layer" in k for k in merged)
    base = load_file(str(tiny_bert_dir / "model.safetensors"))
    lora = ema_worker.LORA
    for layer in (0, 1):
        for kind in ("query", "value"):
            name = f"encoder.layer.{layer}.attention.self.{kind}"
            adapter = f"backbone.base_model.model.{name}.lora_%s.default.weight"
            expected = base[f"{name}.weight"] + lora.alpha / lora.r * average[adapter % "B"] @ average[adapter % "A"]
            torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=1e-6, atol=1e-7)
            assert not torch.equal(merged[f"{name}.weight"], raw[f"{name}.weight"])
    assert torch.equal(merged["encoder.layer.0.attention.self.key.weight"],
                       base["encoder.layer.0.attention.self.key.weight"])  # frozen, not adapted
    assert torch.equal(merged["embeddings.word_embeddings.weight"], base["embeddings.word_embeddings.weight"])


def test_zero3_shards_resume_only_at_their_world_size(worker_runs):
    results = json.loads((worker_runs[1] / "results.json").read_text())
    assert results["zero2"]["foreign_error"] is None  # a ZeRO-2 average is whole: any world size
    for stage in ("zero3", "zero3_lora"):
        error = results[stage]["foreign_error"]
        assert error and "sharded over 2 ranks (ZeRO-3); resume on 2 ranks, not 1" in error and "\n" not in error


def test_resumed_run_exports_the_average_of_an_uninterrupted_run(tmp_path, tiny_bert_dir):
    """ZeRO-3, 2 ranks, 4 steps, a checkpoint at step 2: the export holds the raw weights with the average
    beside them in ema/. The run's directory as it was after the checkpoint of step 2, resumed to step 4
    with train.ema_export=instead, exports as its weights the same average, bit for bit."""
    common = ["deepspeed.config=ds_configs/zero3.json", "train.max_steps=4", "train.save_every=2", "train.ema=0.5"]
    straight = tmp_path / "straight"
    _run("torchrun", straight, tiny_bert_dir, common)
    assert [e.step for e in list_exports(straight)] == [4]  # ema/ is inside the export, not one of its own
    export = list_exports(straight)[0].path
    raw, average = (load_file(str(d / "model.safetensors")) for d in (export, export / "ema"))
    assert sorted(raw) == sorted(average) and not all(torch.equal(raw[k], average[k]) for k in raw)
    assert not (export / "ema" / "export.json").exists()
    raw_card, average_card = ((d / "README.md").read_text() for d in (export, export / "ema"))
    assert "* Weights: the trained weights; their exponential moving average (decay 0.5) is in `ema/`" in raw_card
    assert "* Weights: the exponential moving average of the trained weights (decay 0.5" in average_card
    assert json.loads((straight / "run.json").read_text())["ema_decay"] == 0.5
    assert sorted(p.name for p in (straight / "checkpoints" / "step_00000002").glob("ema*")) == [
        "ema.rank00000.safetensors", "ema.rank00001.safetensors"]

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)  # as a run stopped after its checkpoint of step 2 left it
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    shutil.rmtree(resumed / "exports")
    assert [step for step, _ in list_checkpoints(resumed)] == [2]
    # Its ZeRO-3 shards of the average resume at 2 ranks only: one rank is refused before anything loads.
    one_rank = _command("torchrun", resumed, tiny_bert_dir, common, resume=True)
    one_rank[one_rank.index("--nproc_per_node") + 1] = "1"
    refused = subprocess.run(one_rank, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert refused.returncode != 0 and len(errors) == 1, refused.stderr[-3000:]
    assert "train.ema average is sharded over 2 ranks (ZeRO-3); resume on 2 ranks, not 1" in errors[0]
    assert [step for step, _ in list_checkpoints(resumed)] == [2] and not (resumed / "exports").exists()
    _run("torchrun", resumed, tiny_bert_dir, common + ["train.ema_export=instead"], resume=True)
    (resumed_export,) = list_exports(resumed)
    assert not (resumed_export.path / "ema").exists()
    assert "* Weights: the exponential moving average" in (resumed_export.path / "README.md").read_text()
    assert (resumed_export.path / "model.safetensors").read_bytes() == (export / "ema" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("override, message", [
    ("train.ema=1.0", "'train.ema' must be a decay in (0, 1)"),
    ("train.ema=0", "'train.ema' must be a decay in (0, 1)"),
    ("train.ema_export=both", "unknown value 'both' for 'train.ema_export'"),
])
def test_bad_settings_are_refused_at_config_load(override, message):
    with pytest.raises(ConfigError) as raised:
        load_config(QUICKSTART, [override])
    assert message in str(raised.value)


def test_bad_decay_is_one_line_and_exit_2(tmp_path, tiny_bert_dir):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "training/main.py", "--config", str(QUICKSTART), f"run_dir={run_dir}",
                             f"model.path={tiny_bert_dir}", "train.ema=1.5"],
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'train.ema' must be a decay in (0, 1)" in lines[0]
    assert not run_dir.exists()
