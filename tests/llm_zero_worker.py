"""Rank processes for tests/test_llm_zero.py (started with torch.multiprocessing, spawn).

Each rank loads a tiny random Qwen2 with the trainer's own load_encoder (under ZeRO-3 inside
deepspeed.zero.Init), with LoRA adapters and softmask attention half-way through its schedule, wraps it
in a DeepSpeed engine (gloo, fp32, torch AdamW over the trainable parameters) and takes one step's
forward and backward (training.grad_cache.backward_step, the trainer's path) on its own retrieval batch.
Rank 0 then loads the same encoder in one process without DeepSpeed, computes InfoNCE on the union of
all ranks' batches (every query against every rank's passages, as the CBB loss does) and compares every
trainable parameter's gradient.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from cbb_worker import ATOL_FRACTION, RTOL
from llm_models import WORDS
from training import grad_cache
from training.config import LoraConfig, ModelConfig
from training.data import RetrievalBatch
from training.loss import LossConfig, info_nce
from training.main import load_encoder, set_attention
from training.lora import trainable_parameter_groups

QUERIES, NEGATIVES = 3, 2  # per rank
SOFTMASK_STEPS, STEP = 4, 2  # alpha = 0.5


def model_config(model_dir: str) -> ModelConfig:
    return ModelConfig(path=model_dir, lora=LoraConfig(r=4, alpha=8.0, dropout=0.0),
                       attention="softmask", softmask_steps=SOFTMASK_STEPS)


def prepared_encoder(model_dir: str, ds_config: dict):
    m = model_config(model_dir)
    encoder = load_encoder(m, Path(model_dir), ds_config, seed=0)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # peft starts B at zero, which would leave A without gradient
        for name, p in encoder.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    set_attention(encoder, m, STEP)
    return encoder


def texts(generator: torch.Generator, count: int) -> list[str]:
    lengths = torch.randint(2, 9, (count,), generator=generator).tolist()
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=generator).tolist())
            for n in lengths]


def rank_batch(tokenizer, rank: int, world_size: int) -> RetrievalBatch:
    generator = torch.Generator().manual_seed(100 + rank)
    queries = texts(generator, QUERIES)
    passages = texts(generator, QUERIES + QUERIES * NEGATIVES)  # positives, then each query's negatives
    tokenize = lambda t: dict(tokenizer(t, padding=True, return_tensors="pt"))  # noqa: E731
    return RetrievalBatch(step=STEP, task="retrieval", assignment=("retrieval",) * world_size, cursors_after=[],
                          query=tokenize(queries), passages=tokenize(passages), num_negatives=NEGATIVES,
                          rows=tuple(range(QUERIES)))


def run(model_dir: str, stage: int) -> dict | None:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    rank, world_size = dist.get_rank(), dist.get_world_size()
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world_size,
                 "zero_optimization": {"stage": stage}, "bf16": {"enabled": False}}
    encoder = prepared_encoder(model_dir, ds_config)
    # What this rank holds of the frozen base weights right after loading (under zero.Init: its partition).
    base = [p for n, p in encoder.named_parameters() if ".lora_" not in n]
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in base)
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in base)
    optimizer = torch.optim.AdamW(trainable_parameter_groups(encoder, 0.01), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=encoder, optimizer=optimizer, config=ds_config)
    batch = rank_batch(engine.module.tokenizer, rank, world_size)
    out = grad_cache.backward_step(engine, batch, ["retrieval"] * world_size, LossConfig())
    trainable = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    grads = {n: safe_get_full_grad(p).detach().float().clone() for n, p in engine.module.named_parameters()
             if p.requires_grad}
    engine.destroy()
    if rank != 0:
        return None

    reference = prepared_encoder(model_dir, {})
    encoded = []
    for r in range(world_size):
        b = rank_batch(reference.tokenizer, r, world_size)
        passages = reference(**b.passages)
        encoded.append((reference(**b.query), passages[:QUERIES], passages[QUERIES:]))
    query, positive, negatives = (torch.cat([e[i] for e in encoded]) for i in range(3))
    loss = info_nce(query, positive, negatives, LossConfig().temperature)
    loss.backward()
    ref_grads = {n: p.grad.detach().float() for n, p in reference.named_parameters() if p.requires_grad}
    atol = ATOL_FRACTION * max(g.abs().max().item() for g in ref_grads.values())
    mismatched = [n for n, g in ref_grads.items() if not torch.allclose(grads[n], g, rtol=RTOL, atol=atol)]
    worst = max((grads[n] - g).abs().max().item() for n, g in ref_grads.items())
    return {"trainable": trainable, "reference_trainable": list(ref_grads), "mismatched": mismatched,
            "max_abs_diff": worst, "atol": atol, "value": out.value, "reference_value": loss.item(),
            "base_held_fraction": held / total, "nonzero_lora_a_grads": sum(
                int(g.abs().max() > 0) for n, g in ref_grads.items() if ".lora_A." in n)}


def main(rank: int, world_size: int, port: int, model_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel("WARNING")
    deepspeed.init_distributed(dist_backend="gloo")
    results = {f"zero{stage}": run(model_dir, stage) for stage in (2, 3)}
    if rank == 0:
        Path(out_dir, "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
