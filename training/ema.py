"""An exponential moving average of the trainable weights, kept while training (train.ema, train.ema_export).

After every optimizer step, in float32, from the weights the module holds after the step:

    ema = decay * ema + (1 - decay) * weight        (torch._foreach_lerp_, weight 1 - decay)

with a constant decay and no warm-up: the average starts at the weights of step 0 (those loaded from
model.path, plus a new projection or adapters). Only the trainable parameters are averaged (under LoRA the
adapters and the projection); frozen weights do not move, and the export takes them as they are.

Where the average lives, sharded as the model is:

    ZeRO-1/2   every rank holds the whole module, so every rank keeps a float32 copy of every trainable
               parameter (replicated, like the model); rank 0 saves it.
    ZeRO-3     each rank keeps the average of its own partition of each parameter (param.ds_tensor, the
               padding at the tail of the last rank's included), so no rank ever holds the whole average.

In the checkpoint (written before complete.json makes the tag usable, training/checkpoint.py):

    RUN/checkpoints/step_N/ema.safetensors            ZeRO-1/2: rank 0's copy, tensors by parameter name
    RUN/checkpoints/step_N/ema.rank00001.safetensors  ZeRO-3: each rank's partitions, tensors by name

each with metadata {decay, world_size, zero3}. --resume loads them, so a resumed run's average equals an
uninterrupted run's bit for bit; ZeRO-3 shards resume only at the world size that wrote them (refused in
one line otherwise); a checkpoint without an average (train.ema turned on at a resume) starts the
average from the resumed weights, with a warning, and another decay at a resume continues the saved
average with the new decay.

In the export (training/export.py) the average is gathered like the weights (ZeRO-3: one parameter at a time)
and put in place of the trainable weights of the gathered state dict, in their dtype; a LoRA export of the
average is merged like the raw one.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from training.config import ConfigError

logger = logging.getLogger(__name__)

FILE = "ema.safetensors"


def shard_file(rank: int) -> str:
    return f"ema.rank{rank:05d}.safetensors"


class WeightAverage:
    """The average of `engine.module`'s trainable parameters, on this rank (see the module docstring).

    Every rank calls every method alike; `gathered` and `export_state` are collective."""

    def __init__(self, engine, decay: float):
        self.decay = decay
        self.zero3 = bool(engine.zero_optimization_partition_weights())
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.params = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
        self.average = [self._local(p).detach().float().clone() for _, p in self.params]

    def _local(self, param) -> torch.Tensor:
        """What this rank holds of a parameter: its flat ZeRO-3 partition, or the whole tensor."""
        return param.ds_tensor if self.zero3 else param

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: every average moves (1 - decay) of the way to its weight."""
        torch._foreach_lerp_(self.average, [self._local(p).detach().float() for _, p in self.params], 1 - self.decay)

    @torch.no_grad()
    def reset(self) -> None:
        """The average restarts at the current weights."""
        for average, (_, p) in zip(self.average, self.params):
            average.copy_(self._local(p).detach())

    # ---- checkpoints -------------------------------------------------------------------------------

    def _file(self, tag_dir: Path, rank: int | None = None) -> Path:
        return tag_dir / (shard_file(self.rank if rank is None else rank) if self.zero3 else FILE)

    def save(self, tag_dir: Path) -> None:
        """Every rank, into a checkpoint tag before it is marked complete: ZeRO-3 each rank its shard
        file, ZeRO-1/2 rank 0 the whole average."""
        if not self.zero3 and self.rank != 0:
            return
        tag_dir.mkdir(parents=True, exist_ok=True)
        tensors = {name: average.detach().cpu().contiguous() for (name, _), average in zip(self.params, self.average)}
        metadata = {"decay": repr(self.decay), "world_size": str(self.world_size), "zero3": str(self.zero3)}
        save_file(tensors, str(self._file(tag_dir)), metadata=metadata)

    def check_checkpoint(self, tag_dir: Path) -> None:
        """Before the engine loads `tag_dir` (every rank finds the same problem): a ZeRO-3 average saved at
        another world size, or under another sharding, is refused in one line."""
        other = tag_dir / (FILE if self.zero3 else shard_file(0))
        if other.is_file():
            raise ConfigError(f"{tag_dir}: its train.ema average was saved {'without' if self.zero3 else 'under'} "
                              f"ZeRO-3 sharding; resume it with the DeepSpeed config of that run")
        if not self.zero3 or not self._file(tag_dir, 0).is_file():
            return
        with safe_open(str(self._file(tag_dir, 0)), framework="pt") as f:
            saved = int(f.metadata()["world_size"])
        if saved != self.world_size:
            raise ConfigError(f"{tag_dir}: its train.ema average is sharded over {saved} ranks (ZeRO-3); resume on "
                              f"{saved} ranks, not {self.world_size}")

    @torch.no_grad()
    def load(self, tag_dir: Path) -> None:
        """After the engine loaded `tag_dir`: the saved average, or (none saved) the loaded weights."""
        path = self._file(tag_dir)
        if not path.is_file():
            if self.rank == 0:
                logger.warning("%s holds no train.ema average: it starts from the resumed weights", tag_dir)
            self.reset()
            return
        saved = load_file(str(path))
        names = [name for name, _ in self.params]
        if sorted(saved) != sorted(names):
            raise ConfigError(f"{path}: the average's parameters {sorted(set(saved) ^ set(names))[:5]} do not match "
                              "the model's trainable parameters")
        for name, average in zip(names, self.average):
            if saved[name].shape != average.shape:
                raise ConfigError(f"{path}: {name} has shape {tuple(saved[name].shape)}, the model's "
                                  f"{tuple(average.shape)}")
            average.copy_(saved[name])
        with safe_open(str(path), framework="pt") as f:
            decay = float(f.metadata()["decay"])
        if decay != self.decay and self.rank == 0:
            logger.info("train.ema: the average saved with decay %g continues with decay %g", decay, self.decay)

    # ---- exports -----------------------------------------------------------------------------------

    @torch.no_grad()
    def gathered(self) -> dict[str, torch.Tensor] | None:
        """Collective. {parameter name: the whole average, float32 on CPU} on rank 0, None elsewhere. ZeRO-3
        gathers one parameter at a time (peak memory: one parameter), as the export gathers the weights."""
        found: dict[str, torch.Tensor] = {}
        for (name, param), average in zip(self.params, self.average):
            if self.zero3:
                group = getattr(param, "ds_process_group", None)
                parts = [torch.empty_like(average) for _ in range(dist.get_world_size(group))]
                dist.all_gather(parts, average, group=group)  # rank r holds elements [r * n, (r + 1) * n)
                if self.rank == 0:
                    found[name] = torch.cat(parts)[:param.ds_numel].view(param.ds_shape).cpu()
            elif self.rank == 0:
                found[name] = average.cpu().clone()
        return found if self.rank == 0 else None

    def export_state(self, state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """Collective. The gathered Encoder state dict `state` (rank 0; training.export.gathered_state_dict)
        with the average in place of every trainable weight, in that weight's dtype; None on other ranks."""
        averages = self.gathered()
        if averages is None:
            return None
        return {**state, **{name: average.to(state[name].dtype) for name, average in averages.items()}}
