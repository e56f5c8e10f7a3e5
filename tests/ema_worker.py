"""Rank processes for tests/test_ema.py (started with torch.multiprocessing, spawn).

Under ZeRO-2 and then ZeRO-3 a tiny BERT with a projection (dropout off, so that the ranks' forwards are
those of one process) trains STEPS AdamW steps in a real DeepSpeed engine on one global batch of texts,
each rank its equal share of it: the engine averages the ranks' gradients of the mean squared distance to
fixed targets, which is the gradient of that mean over the whole batch in one process. training.ema's
WeightAverage is updated after every step. Rank 0 writes, per stage:

    <stage>/ema.safetensors       the gathered average after the last step
    <stage>/raw.safetensors       the gathered trainable weights after the last step
    <stage>/trace.safetensors     one process only: the trainable weights at step 0 and after every step
                                  ("<step>/<name>"), from which the test computes the average by hand
    <stage>/reloaded.safetensors  the average saved into a checkpoint tag (<stage>/tag) and loaded into a
                                  fresh WeightAverage

Then the same under ZeRO-3 with LoRA adapters on the attention's query and value (zero3_lora/), which
also exports (zero3_lora/run/exports/step_00000005/, the average in ema/ beside the raw weights). Rank 0
also writes results.json: each rank's share of the average's elements per stage, and (one process, given the
2-rank run's directory) the error that refuses its ZeRO-3 tag at another world size.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from embedlib.encoder import Encoder
from training.config import ConfigError, LoraConfig
from training.ema import WeightAverage
from training.export import export_model, gathered_state_dict
from training.lora import add_lora, trainable_parameter_groups

DECAY = 0.6  # far from 1, so a few steps move the average well away from both the start and the weights
STEPS = 5
LORA = LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules=["query", "value"])
TEXTS = ["Aspirin lowers the risk of heart attacks.", "Stem cells divide.", "A short query",
         "Vitamin D and bone density in the elderly.", "Smoking causes lung cancer.",
         "Exercise improves sleep quality.", "Antibiotics do not treat viral infections.",
         "Coffee consumption and heart disease."]


def trainable_state(engine) -> dict[str, torch.Tensor] | None:
    """Collective. The gathered trainable weights on rank 0, in float32."""
    state = gathered_state_dict(engine)
    if state is None:
        return None
    names = {name for name, p in engine.module.named_parameters() if p.requires_grad}
    return {name: value.float().clone() for name, value in state.items() if name in names}


def run_stage(model_dir: str, stage: int, out: Path, foreign_tag: Path | None, lora: bool = False) -> dict:
    import deepspeed

    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    encoder = Encoder.from_pretrained(model_dir, pooling="mean", output_dim=8, max_length=16)
    if lora:
        add_lora(encoder, LORA)
    for module in encoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": stage}}
    optimizer = torch.optim.AdamW(trainable_parameter_groups(encoder, 0.0), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=encoder, optimizer=optimizer, config=ds_config)
    share = len(TEXTS) // world_size
    tokens = encoder.tokenizer(TEXTS[rank * share:(rank + 1) * share], padding=True, return_tensors="pt")
    targets = torch.nn.functional.normalize(torch.randn(len(TEXTS), 8, generator=torch.Generator().manual_seed(1)),
                                            dim=-1)[rank * share:(rank + 1) * share]
    ema = WeightAverage(engine, DECAY)
    trace = {f"0/{k}": v for k, v in (trainable_state(engine) or {}).items()} if world_size == 1 else None
    for step in range(1, STEPS + 1):
        loss = ((engine(**tokens) - targets) ** 2).sum(-1).mean()
        engine.backward(loss)
        engine.step()
        ema.update()
        if trace is not None:
            trace.update({f"{step}/{k}": v for k, v in trainable_state(engine).items()})
    directory = out / (f"zero{stage}" + ("_lora" if lora else ""))
    average, raw = ema.gathered(), trainable_state(engine)
    tag = directory / "tag"
    if rank == 0:
        tag.mkdir(parents=True)
    dist.barrier()
    ema.save(tag)
    dist.barrier()
    reloaded = WeightAverage(engine, DECAY)  # starts at the weights, then takes the saved average
    reloaded.check_checkpoint(tag)
    reloaded.load(tag)
    reloaded_average = reloaded.gathered()
    result = {"local_elements": [None] * world_size,
              "total_elements": sum(getattr(p, "ds_numel", p.numel()) for _, p in ema.params)}
    dist.all_gather_object(result["local_elements"], sum(a.numel() for a in ema.average))
    if lora:  # the export of the average beside the raw one, both merged
        export_model(engine, directory / "run", STEPS, keep=1, extra={}, lora=LORA, ema=ema, ema_export="beside")
    if foreign_tag is not None:
        try:
            reloaded.check_checkpoint(foreign_tag / directory.name / "tag")
            result["foreign_error"] = None
        except ConfigError as error:
            result["foreign_error"] = str(error)
    if rank == 0:
        save_file(average, str(directory / "ema.safetensors"))
        save_file(raw, str(directory / "raw.safetensors"))
        save_file(reloaded_average, str(directory / "reloaded.safetensors"))
        if trace is not None:
            save_file(trace, str(directory / "trace.safetensors"))
    engine.destroy()
    return result


def main(rank: int, world_size: int, port: int, model_dir: str, out_dir: str, foreign: str | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel("WARNING")
    deepspeed.init_distributed(dist_backend="gloo")
    out = Path(out_dir)
    foreign_tag = Path(foreign) if foreign else None
    results = {f"zero{stage}": run_stage(model_dir, stage, out, foreign_tag) for stage in (2, 3)}
    results["zero3_lora"] = run_stage(model_dir, 3, out, foreign_tag, lora=True)
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
