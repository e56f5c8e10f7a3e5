"""Rank processes for tests/test_zero3_loading.py (torch.multiprocessing, spawn, gloo).

For each model directory the test prepared, every rank:
  - loads the backbone with training.zero3_loading.load_backbone_zero3 (each rank reads its partition
    from the files) and gathers every parameter, to compare with a plain AutoModel.from_pretrained;
  - loads the trainer's Encoder with LoRA under ZeRO-3 (training.main.load_encoder), which splits the
    frozen input embedding by vocabulary, wraps it in a DeepSpeed engine, encodes its own batch (other
    token ids on each rank) and gathers the export's state dict (training.export.gathered_state_dict);
    rank 0 compares both with the same Encoder loaded in one process without DeepSpeed;
  - looks up an out-of-range token id, which must fail on every rank rather than hang one.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def check_model(model_dir: str, ds_config: dict) -> dict:
    import deepspeed
    from transformers import AutoConfig, AutoModel

    from llm_models import WORDS
    from training.config import LoraConfig, ModelConfig
    from training.export import gathered_state_dict
    from training.main import load_encoder
    from training.zero3_loading import VocabShardedEmbedding, load_backbone_zero3

    rank = dist.get_rank()
    warnings = Warnings()
    logging.getLogger("training.zero3_loading").addHandler(warnings)
    result: dict = {}

    # 1. The backbone alone: gathered, it is the plain load's.
    hf_config = AutoConfig.from_pretrained(model_dir)
    backbone = load_backbone_zero3(Path(model_dir), hf_config, ds_config, torch.float32)
    held = sum(p.ds_tensor.numel() for p in backbone.parameters())
    total = sum(p.ds_numel for p in backbone.parameters())
    gathered = {}
    for name, param in backbone.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            gathered[name] = param.detach().clone()
    plain = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    expected = dict(plain.named_parameters())
    result["backbone_names_equal"] = sorted(gathered) == sorted(expected)
    result["backbone_unequal"] = [n for n in expected if n in gathered and not torch.equal(gathered[n], expected[n])]
    result["backbone_held_fraction"] = held / total
    result["warnings"] = list(warnings.messages)

    # 2. The trainer's LoRA encoder under ZeRO-3: its forward and its export's weights.
    m = ModelConfig(path=model_dir, lora=LoraConfig(r=4, alpha=8.0, dropout=0.0))
    encoder = load_encoder(m, Path(model_dir), ds_config, seed=0)
    sharded = [mod for mod in encoder.modules() if isinstance(mod, VocabShardedEmbedding)]
    result["sharded_rows"] = [mod.rows.shape[0] for mod in sharded]
    engine, *_ = deepspeed.initialize(model=encoder, optimizer=torch.optim.AdamW(
        [p for p in encoder.parameters() if p.requires_grad], lr=1e-3), config=ds_config)
    words = WORDS[:6] if rank == 0 else WORDS[4:]  # overlapping vocabularies, some ids on one rank only
    texts = [" ".join(words[i % len(words)] for i in range(start, start + 3 + rank)) for start in range(4)]
    batch = dict(engine.module.tokenizer(texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        embeddings = engine.module(**batch)
    state = gathered_state_dict(engine)
    outputs = [None] * dist.get_world_size()
    dist.all_gather_object(outputs, {"texts": texts, "embeddings": embeddings.tolist()})

    try:  # an id past the vocabulary: every rank raises (none is left waiting in a collective)
        (sharded[0] if sharded else encoder.backbone.get_input_embeddings())(torch.tensor([[0, 10_000 * (rank + 1)]]))
        result["out_of_range"] = "no error"
    except IndexError as error:
        result["out_of_range"] = str(error)
    dist.barrier()
    engine.destroy()

    if rank == 0:
        reference = load_encoder(m, Path(model_dir), {}, seed=0)  # one process, no DeepSpeed
        with torch.no_grad():
            result["forward_max_abs_diff"] = max(
                (reference(**dict(reference.tokenizer(o["texts"], padding=True, return_tensors="pt")))
                 - torch.tensor(o["embeddings"])).abs().max().item() for o in outputs)
        wanted = reference.state_dict()
        result["export_missing"] = sorted(set(wanted) - set(state))
        result["export_unequal"] = [k for k in wanted if k in state and not torch.equal(state[k], wanted[k])]
    return result


def main(rank: int, world_size: int, port: int, model_dirs: list[str], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel("WARNING")
    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world_size,
                 "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}
    results = {Path(d).name: check_model(d, ds_config) for d in model_dirs}
    if rank == 0:
        Path(out_dir, "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
