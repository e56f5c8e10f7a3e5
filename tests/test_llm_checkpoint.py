"""LoRA checkpoints (issue 16): under ZeRO-2 and ZeRO-3 a checkpoint holds the adapters and their optimizer
state but none of the frozen backbone weights (the trainer loads those from model.path), and a run resumed
from it computes the same losses as the uninterrupted run; resuming on other base weights is refused."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from llm_models import build_tiny_decoder
from mining_helpers import scifact_slice
from test_training_runs import BIN, REPO, _env, _free_port, _losses
from training.checkpoint import tag_of
from training.metrics import read_metrics

RECIPE = REPO / "training" / "recipes" / "llm_lora.yaml"
SAVED_AT, STEPS = 2, 4


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return build_tiny_decoder(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="module")
def data(tmp_path_factory, scifact_dir):
    return scifact_slice(scifact_dir, tmp_path_factory.mktemp("data"), num_pairs=12, num_docs=40)


def _train(run_dir: Path, model: Path, data: tuple[Path, Path], stage: int,
           resume: bool = False) -> subprocess.CompletedProcess:
    corpus, pairs = data
    # r=1: the adapters are then much smaller than the tiny backbone, so a frozen weight on disk would show.
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
               "training/main.py", "--config", str(RECIPE), *(["--resume"] if resume else []),
               f"run_dir={run_dir}", f"model.path={model}", f"deepspeed.config=ds_configs/zero{stage}.json",
               "model.max_length=24", "model.lora.r=1", "model.lora.alpha=2", "model.softmask_steps=3",
               "model.gradient_checkpointing=false", f"data.0.path={pairs}", f"data.0.corpus={corpus}",
               "data.0.limit=12", "data.0.batch_size=3", "data.0.num_negatives=1", "train.num_workers=0",
               f"train.max_steps={STEPS}", f"train.save_every={SAVED_AT}", "train.export_every=0",
               "train.progress=false", "train.grad_cache.chunk_size=null", "optim.lr=1e-3", "optim.warmup_steps=1"]
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def _load_deepspeed_file(path: Path) -> dict:
    """One of DeepSpeed's checkpoint .pt files, unpickled with weights_only=True: beyond tensors and
    containers they hold only these three DeepSpeed types, allowed by name."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _tensors(value) -> list[torch.Tensor]:
    """Every tensor in a torch.load'ed checkpoint file, however nested."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_lora_checkpoint_holds_no_frozen_weights_and_resumes_exactly(tmp_path, qwen2_dir, data, stage):
    straight = tmp_path / "straight"
    result = _train(straight, qwen2_dir, data, stage)
    assert result.returncode == 0, result.stderr[-5000:]
    expected = _losses(straight)
    assert len(expected) == STEPS

    tag = straight / "checkpoints" / tag_of(SAVED_AT)
    # The module state (one file under ZeRO-2, one per rank under ZeRO-3): adapters only, no frozen fragments.
    files = sorted(tag.glob("*model_states.pt"))
    assert len(files) == (1 if stage == 2 else 2)
    for f in files:
        module = _load_deepspeed_file(f)
        assert module["frozen_param_fragments"] is None and module["frozen_param_shapes"] is None
        keys = list(module["module"])
        assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), keys
    trainable = sum(torch.Size(shape).numel() for group in module["param_shapes"] for shape in group.values())
    base = _numel(qwen2_dir / "model.safetensors")
    # On disk: at most the adapters' module copy, fp32 master copy and two Adam moments (plus ZeRO's
    # alignment padding); a frozen weight would add the backbone's size.
    stored = sum(t.numel() for f in tag.glob("*.pt")
                 for t in _tensors(_load_deepspeed_file(f)))
    assert stored <= 4 * trainable + 256, (stored, trainable, base)
    assert 4 * trainable + 256 < base  # so the bound above excludes any frozen backbone tensor

    # Stopped at SAVED_AT (its checkpoint alone), resumed: the same losses, bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(tag, resumed / "checkpoints" / tag.name)
    result = _train(resumed, qwen2_dir, data, stage, resume=True)
    assert result.returncode == 0, result.stderr[-5000:]
    records = read_metrics(resumed)
    assert [r["step"] for r in records] == list(range(SAVED_AT + 1, STEPS + 1))
    assert [r["loss"] for r in records] == expected[SAVED_AT:]

    if stage == 2:  # (under ZeRO-3 too; here, where the runs are quicker)
        # Other base weights under the same adapters: refused, not trained on.
        other = build_tiny_decoder(tmp_path / "other", "qwen2", seed=1)
        again = tmp_path / "again"
        shutil.copytree(tag, again / "checkpoints" / tag.name)
        result = _train(again, other, data, stage, resume=True)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.returncode != 0 and len(errors) == 1, result.stderr[-5000:]
        assert "was trained on other frozen base weights" in errors[0]
        assert not (again / "metrics.jsonl").exists()


def _numel(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(torch.Size(f.get_slice(key).get_shape()).numel() for key in f.keys())
