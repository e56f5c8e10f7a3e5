"""Model exports: the whole Encoder gathered onto rank 0 and published with embedlib.exports.

Under ZeRO-1/2 every rank holds the full (training-dtype) parameters; under ZeRO-3 each holds a
shard, so the parameters are gathered one at a time (peak memory: one parameter, not the model).
Rank 0 writes the directory with Encoder.save (loadable by transformers.AutoModel and
sentence_transformers.SentenceTransformer) and publishes it atomically with its export.json marker.
"""
from __future__ import annotations

import os

import deepspeed
import torch
import torch.distributed as dist

from embedlib.exports import ExportInfo, gc_exports, publish_export


def gathered_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Collective. The full Encoder state dict (CPU tensors) on rank 0, None on other ranks."""
    module = engine.module
    rank = dist.get_rank()
    if not engine.zero_optimization_partition_weights():
        if rank != 0:
            return None
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[name] = param.detach().cpu().clone()
    if rank != 0:
        return None
    persistent = module.state_dict().keys()  # buffers are not partitioned; keep the persistent ones
    state.update({k: v.detach().cpu().clone() for k, v in module.named_buffers() if k in persistent})
    return state


def export_model(engine, run_dir: str | os.PathLike, step: int, keep: int, extra: dict) -> ExportInfo | None:
    """Collective. Publish RUN/exports/step_XXXXXXXX (rank 0 writes) and keep the newest `keep`."""
    state = gathered_state_dict(engine)
    info = None
    if dist.get_rank() == 0:
        encoder = engine.module
        info = publish_export(run_dir, step, lambda tmp: encoder.save(tmp, state_dict=state), extra=extra)
        gc_exports(run_dir, keep, protect={step})
    dist.barrier()
    return info
