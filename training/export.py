"""Model exports: the whole Encoder gathered onto rank 0 and published with embedlib.exports.

Under ZeRO-1/2 every rank holds the full (training-dtype) parameters; under ZeRO-3 each holds a
shard, so the parameters are gathered one at a time (peak memory: one parameter, not the model), and a
frozen input embedding split by vocabulary (training/zero3_loading.py) is gathered onto rank 0.
Rank 0 writes the directory with Encoder.save (loadable by transformers.AutoModel and
sentence_transformers.SentenceTransformer), with the prompts of the instructions the data had, and its
model card (README.md, embedlib.modelcard), and publishes it atomically with its export.json marker;
with train.ema the average of the weights (training/ema.py) goes beside (ema/) or instead of them.
Once the export's evaluation is logged, refresh_model_card puts its figures on the card.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from embedlib.encoder import Encoder
from embedlib.exports import EMA_DIR, ExportInfo, export_path, gc_exports, publish_export, read_export_marker
from embedlib.modelcard import dataset_facts, training_prompts, write_model_card
from embedlib.runlog import read_config
from training.config import LoraConfig
from training.ema import WeightAverage
from training.lora import base_backbone, has_lora, merge_lora, save_adapter
from training.zero3_loading import gather_sharded_embeddings

logger = logging.getLogger(__name__)


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
    embeddings = gather_sharded_embeddings(module)  # a frozen embedding split by vocabulary
    if rank != 0:
        return None
    state.update(embeddings)
    persistent = module.state_dict().keys()  # buffers are not partitioned; keep the persistent ones
    state.update({k: v.detach().cpu().clone() for k, v in module.named_buffers() if k in persistent})
    return state


def export_model(engine, run_dir: str | os.PathLike, step: int, keep: int, extra: dict,
                 lora: LoraConfig | None = None, ema: WeightAverage | None = None,
                 ema_export: str = "beside") -> ExportInfo | None:
    """Collective. Publish RUN/exports/step_XXXXXXXX (rank 0 writes) and keep the newest `keep`.

    With LoRA (`lora`, the model's settings) the export is the merged model, a plain one that every
    reader loads (sentence-transformers, the mining sidecar, evaluation); lora.save_adapter also writes
    the adapter alone into its adapter/ directory. With `ema` (train.ema) the average of the weights is
    exported `ema_export`: "beside" the raw weights, as a second encoder directory ema/ inside the
    export (published by the same rename; the sidecar lists step_* only), or "instead" of them."""
    state = gathered_state_dict(engine)
    averaged = ema.export_state(state) if ema is not None else None  # collective
    info = None
    if dist.get_rank() == 0:
        encoder = engine.module

        def save(directory: Path, weights: dict[str, torch.Tensor]) -> None:
            if lora is not None and has_lora(encoder):
                plain = Encoder(base_backbone(encoder), encoder.tokenizer, encoder.config, encoder.projection)
                plain.future_weight = encoder.future_weight
                plain.save(directory, state_dict=merge_lora(weights, lora), prompts=_prompts(run_dir, step))
                if lora.save_adapter:
                    save_adapter(encoder, weights, directory / "adapter")
            else:
                encoder.save(directory, state_dict=weights, prompts=_prompts(run_dir, step))

        def write(tmp) -> None:
            tmp = Path(tmp)
            save(tmp, averaged if averaged is not None and ema_export == "instead" else state)
            _write_card(tmp, run_dir, step, export_path(run_dir, step))
            if averaged is not None and ema_export == "beside":
                save(tmp / EMA_DIR, averaged)
                _write_card(tmp / EMA_DIR, run_dir, step, export_path(run_dir, step) / EMA_DIR)

        info = publish_export(run_dir, step, write, extra=extra)
        gc_exports(run_dir, keep, protect={step})
    dist.barrier()
    return info


def refresh_model_card(export_dir: str | os.PathLike, run_dir: str | os.PathLike) -> None:
    """Rank 0, after the export's evaluation is in eval.jsonl: rewrite its card with those figures (README.md
    is not part of the model's identity: embedlib.encoder.model_fingerprint leaves it out)."""
    _write_card(export_dir, run_dir, read_export_marker(export_dir)["step"], export_dir)


# A card or prompts that cannot be made (a data file removed during the run, say) must not stop a
# training run of hours: the export is written without them, and the log says why.

def _prompts(run_dir, step: int) -> dict[str, str] | None:
    try:
        return training_prompts(dataset_facts(read_config(run_dir)))
    except Exception as error:  # noqa: BLE001 (see above)
        logger.warning("export of step %d: no prompts in config_sentence_transformers.json: %s", step, error)
        return None


def _write_card(export_dir, run_dir, step: int, model_path) -> None:
    try:
        write_model_card(export_dir, run_dir, step, model_path)
    except Exception as error:  # noqa: BLE001 (see above)
        logger.warning("export of step %d: no model card: %s", step, error)
