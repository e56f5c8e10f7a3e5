"""LoRA on a decoder under DeepSpeed (issue 16): at 2 gloo ranks, ZeRO-2 and ZeRO-3 (loaded inside
deepspeed.zero.Init), softmask attention half-way, every trainable parameter's gradient equals the
gradient of one process on the union of both ranks' data (tests/llm_zero_worker.py)."""
from __future__ import annotations

import json

import pytest

import llm_zero_worker
from llm_models import build_tiny_decoder
from rank_processes import spawn_ranks

pytestmark = pytest.mark.slow  # about a minute on 2 busy cores
TIMEOUT_S = 300
WORLD_SIZE = 2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    model_dir = build_tiny_decoder(tmp_path_factory.mktemp("qwen2"), "qwen2")
    out_dir = tmp_path_factory.mktemp("llm_zero")
    spawn_ranks(llm_zero_worker.main, WORLD_SIZE, str(model_dir), str(out_dir), timeout_s=TIMEOUT_S)
    return json.loads((out_dir / "results.json").read_text())


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_gradient_equals_single_process(results, stage):
    result = results[f"zero{stage}"]
    assert result["trainable"] == result["reference_trainable"]
    assert result["trainable"] and all(".lora_" in name for name in result["trainable"])
    assert result["nonzero_lora_a_grads"] > 0  # the check is not on zeros
    assert not result["mismatched"], result
    assert result["value"] == pytest.approx(result["reference_value"], rel=1e-5)


def test_zero3_loads_each_rank_a_partition_only(results):
    # Under zero.Init no rank ever holds the whole model: each holds about 1/W of the base weights.
    assert results["zero3"]["base_held_fraction"] <= 1 / WORLD_SIZE + 0.01
    assert results["zero2"]["base_held_fraction"] == 1.0
