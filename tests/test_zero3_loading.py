"""ZeRO-3 from the first byte (training/zero3_loading.py, issue 16), at 2 gloo ranks on tiny random decoders:
each rank reads only its partition of every weight, and gathered they are the plain load's bit for bit
(a Qwen2 in float32, a Llama stored as bfloat16 in several shards, a Qwen2 saved as the base model
alone, as exports are); a checkpoint that does not map onto
the model is loaded by transformers with a warning that says why; the frozen input embedding split by
vocabulary gives each rank's batch the plain embedding's vectors, exports whole, and an id past the
vocabulary fails on every rank. The worker is tests/zero3_loading_worker.py."""
from __future__ import annotations

import json
import math
import shutil

import pytest

import zero3_loading_worker
from llm_models import WORDS, build_tiny_decoder
from rank_processes import spawn_ranks

pytestmark = pytest.mark.slow  # about a minute on 2 busy cores
TIMEOUT_S = 300
WORLD_SIZE = 2


def _resaved(source, target, dtype=None, drop=None, base_model=False, max_shard_size="10KB"):
    """The model of `source` saved again into `target`: in another dtype, in shards, without a weight, or
    as the base model alone (weight names without the causal LM's "model." prefix, as our exports)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoModelForCausalLM

    shutil.copytree(source, target)
    for f in list(target.glob("model*.safetensors*")):
        f.unlink()
    if drop is None:
        model_class = AutoModel if base_model else AutoModelForCausalLM
        model = model_class.from_pretrained(source, dtype=dtype or torch.float32)
        model.save_pretrained(target, max_shard_size=max_shard_size)
    else:
        weights = load_file(str(source / "model.safetensors"))
        del weights[drop]
        save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("zero3_loading")
    qwen2 = build_tiny_decoder(root / "qwen2", "qwen2")
    llama = build_tiny_decoder(root / "llama_fp32", "llama")
    models = [qwen2, _resaved(llama, root / "llama_bf16_sharded", dtype=torch.bfloat16),
              _resaved(qwen2, root / "qwen2_base_model", base_model=True),
              _resaved(qwen2, root / "qwen2_without_norm", drop="model.norm.weight")]
    out_dir = root / "out"
    out_dir.mkdir()
    spawn_ranks(zero3_loading_worker.main, WORLD_SIZE, [str(m) for m in models], str(out_dir), timeout_s=TIMEOUT_S)
    assert len(list((models[1]).glob("model-*.safetensors"))) > 1  # the bf16 copy really is sharded
    return json.loads((out_dir / "results.json").read_text())


@pytest.mark.parametrize("model", ["qwen2", "llama_bf16_sharded", "qwen2_base_model"])
def test_each_rank_reads_its_partition_and_gathered_it_is_the_plain_load(results, model):
    r = results[model]
    assert r["warnings"] == []  # read by our loader, not handed to transformers
    assert r["backbone_names_equal"] and r["backbone_unequal"] == []
    assert r["backbone_held_fraction"] <= 1 / WORLD_SIZE + 0.01


def test_a_checkpoint_without_a_weight_goes_through_transformers_with_a_warning(results):
    r = results["qwen2_without_norm"]
    assert len(r["warnings"]) == 1 and "no weight for norm.weight" in r["warnings"][0], r["warnings"]
    # transformers initialises the missing norm; every weight the file has is loaded
    assert r["backbone_names_equal"] and r["backbone_unequal"] == []


@pytest.mark.parametrize("model", ["qwen2", "llama_bf16_sharded", "qwen2_base_model"])
def test_frozen_embedding_split_by_vocabulary(results, model):
    r = results[model]
    vocabulary = len(WORDS) + (3 if model.startswith("llama") else 2)  # llm_models: the words and the special tokens
    assert r["sharded_rows"] == [math.ceil(vocabulary / WORLD_SIZE)]  # rank 0's: half the rows
    assert r["forward_max_abs_diff"] < 1e-5  # each rank's batch, other ids on each, as one process encodes it
    assert r["export_missing"] == [] and r["export_unequal"] == []  # the export has the whole embedding
    assert "outside the embedding" in r["out_of_range"]


def test_a_broken_weights_directory_is_an_error_naming_the_file(tmp_path):
    from embedlib.encoder import EncoderError
    from training.zero3_loading import stored_tensors

    model = build_tiny_decoder(tmp_path / "model", "qwen2")
    weights = model / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + good[24:])
    with pytest.raises(EncoderError, match=f"{weights}: not a safetensors file"):
        stored_tensors(model)
    weights.write_bytes(good[:-100])
    with pytest.raises(EncoderError, match=rf"{weights}: .*: the file ends \d+ bytes before this tensor's end"):
        stored_tensors(model)
    weights.write_bytes(good)
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(EncoderError, match="names model-00002-of-00002.safetensors, which is not in"):
        stored_tensors(model)
