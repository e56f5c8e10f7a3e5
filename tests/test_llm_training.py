"""The LLM recipe (training/recipes/llm_lora.yaml) end to end on a tiny random Qwen2: its options and
their errors; 2 CPU ranks under ZeRO-3 + zero.Init, LoRA, SoftMask and gradient checkpointing, resumed
mid-schedule equal to the straight run; the merged export loads in sentence-transformers and the miner
mines with it."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from llm_models import build_tiny_decoder
from mining_helpers import run_mining, scifact_slice
from test_training_runs import BIN, REPO, _env, _free_port
from training.config import ConfigError, check_model, load_config
from training.metrics import read_metrics

RECIPE = REPO / "training" / "recipes" / "llm_lora.yaml"


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return build_tiny_decoder(tmp_path_factory.mktemp("qwen2"), "qwen2")


def test_recipe_parses_and_validates(tmp_path, qwen2_dir):
    config = load_config(RECIPE, [f"run_dir={tmp_path}", f"model.path={qwen2_dir}"])
    m = config.model
    assert (m.attention, m.softmask_steps, m.lora.r, m.lora.alpha) == ("softmask", 1000, 16, 32.0)
    assert "q_proj" in m.lora.target_modules and config.deepspeed.config == "ds_configs/zero3.json"
    assert check_model(config) == qwen2_dir
    off = load_config(RECIPE, [f"run_dir={tmp_path}", "model.lora=null", "model.attention=causal"])
    assert off.model.lora is None and off.model.attention == "causal"


@pytest.mark.parametrize("override, expected", [
    ("model.lora.r=0", "'model.lora.r' must be at least 1, got 0"),
    ("model.lora.alpha=0", "'model.lora.alpha' must be positive, got 0.0"),
    ("model.lora.dropout=1", "'model.lora.dropout' must be in [0, 1), got 1.0"),
    ("model.lora.target_modules=[]", "'model.lora.target_modules' must name at least one module, got []"),
    ("model.softmask_steps=0", "'model.softmask_steps' must be at least 1 with model.attention softmask, got 0"),
    ("model.attention=sideways", "unknown value 'sideways' for 'model.attention'"),
    ("model.lora.rank=4", "unknown key 'model.lora.rank'"),
])
def test_options_are_checked(tmp_path, override, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(RECIPE, [f"run_dir={tmp_path}", override])
    assert expected in str(caught.value)


def test_attention_needs_a_decoder(tmp_path, tiny_bert_dir):
    config = load_config(RECIPE, [f"run_dir={tmp_path}", f"model.path={tiny_bert_dir}", "model.attention=bidirectional"])
    with pytest.raises(ConfigError, match="is not a decoder-only model"):
        check_model(config)


# ---- the trainer ----------------------------------------------------------------------------------------


def _train(run_dir: Path, model: Path, data: tuple[Path, Path], resume: bool = False) -> None:
    corpus, pairs = data
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
               "training/main.py", "--config", str(RECIPE), *(["--resume"] if resume else []),
               f"run_dir={run_dir}", f"model.path={model}", "model.max_length=32", "model.softmask_steps=3",
               "model.lora.save_adapter=true", f"data.0.path={pairs}", f"data.0.corpus={corpus}", "data.0.limit=12",
               "data.0.batch_size=3", "data.0.num_negatives=1", "train.num_workers=0", "train.max_steps=4",
               "train.save_every=2", "train.export_every=0", "train.progress=false", "train.grad_cache.chunk_size=2",
               "optim.lr=1e-3", "optim.warmup_steps=1"]
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.mark.slow
def test_llm_lora_zero3_softmask_run_resume_export_and_mining(tmp_path, qwen2_dir, scifact_dir):
    from safetensors import safe_open
    from sentence_transformers import SentenceTransformer

    from embedlib.encoder import Encoder, is_encoder_export
    from embedlib.exports import list_exports

    data = scifact_slice(scifact_dir, tmp_path / "data", num_pairs=20, num_docs=60)
    straight = tmp_path / "straight"
    _train(straight, qwen2_dir, data)
    records = read_metrics(straight)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # alpha(t) = t / 3 before step t + 1: fully bidirectional for the last step, which the export keeps.
    assert [r["future_weight"] for r in records] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])

    # Resumed from the step-2 checkpoint: the schedule and the losses continue exactly.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    _train(resumed, qwen2_dir, data, resume=True)
    again = read_metrics(resumed)
    assert [r["future_weight"] for r in again] == pytest.approx([2 / 3, 1.0])
    assert [r["loss"] for r in again] == [r["loss"] for r in records[2:]]

    # The export is the merged model: plain weight names, the adapter beside it, loads everywhere.
    export = list_exports(straight)[-1].path
    assert is_encoder_export(export) and (export / "adapter" / "adapter_config.json").is_file()
    assert json.loads((export / "config.json").read_text())["is_causal"] is False  # bidirectional by now
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        assert not any("lora" in key or "base_layer" in key for key in f.keys())
    texts = ["the cat sat on the mat", "hello world", "what is a dog"]
    ours = Encoder.from_pretrained(export).encode(texts, show_progress=False)
    theirs = SentenceTransformer(str(export), device="cpu").encode(texts)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    config = json.loads((export / "config_sentence_transformers.json").read_text())
    assert config["prompts"]["query"].startswith("Instruct: ")

    # The miner encodes with the merged export.
    corpus, pairs = data
    mined = run_mining("mine", "--model", export, "--corpus", corpus, "--queries", pairs,
                       "--run-dir", tmp_path / "mine_run", "--k", "5", "--max-length", "32")
    assert mined.returncode == 0, mined.stderr[-3000:]
    assert (tmp_path / "mine_run" / "negatives" / "v000001" / "manifest.json").is_file()


@pytest.mark.slow
def test_a_weights_file_cut_short_is_one_error_line(tmp_path, qwen2_dir, scifact_dir):
    # Under ZeRO-3 each rank reads its own range of the file, so a rank-local read error would leave the
    # other rank waiting and no one saying why; the headers are checked first, identically on every rank.
    model = tmp_path / "model"
    shutil.copytree(qwen2_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    corpus, pairs = scifact_slice(scifact_dir, tmp_path / "data", num_pairs=20, num_docs=60)
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
               "training/main.py", "--config", str(RECIPE), f"run_dir={tmp_path / 'run'}", f"model.path={model}",
               f"data.0.path={pairs}", f"data.0.corpus={corpus}", "train.num_workers=0", "train.progress=false"]
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert str(weights) in errors[0] and "bytes before this tensor's end" in errors[0], errors


def test_lora_targets_are_checked_against_the_backbone_before_it_loads(tmp_path, qwen2_dir):
    config = load_config(RECIPE, [f"run_dir={tmp_path}", f"model.path={qwen2_dir}"])
    assert check_model(config) == qwen2_dir  # the recipe's targets are all Qwen2 linear layers
    config = load_config(RECIPE, [f"run_dir={tmp_path}", f"model.path={qwen2_dir}",
                                  "model.lora.target_modules=[q_proj, gate_prj]"])
    with pytest.raises(ConfigError, match="'gate_prj' names no linear layer"):
        check_model(config)
