"""Training checkpoints that a kill at any moment cannot spoil.

    RUN/checkpoints/step_00000100/   DeepSpeed's save_checkpoint tag (model, optimizer, scheduler,
                                     ZeRO shards, our client state)
    RUN/checkpoints/step_00000100/dynamic_negatives.safetensors   the trainer's own files (rank 0),
                                     written before the marker
    RUN/checkpoints/step_00000100/ema*.safetensors   train.ema's average (training/ema.py: rank 0's,
                                     or every rank's shard under ZeRO-3), written before the marker
    RUN/checkpoints/step_00000100/complete.json   written by us last: the tag is usable

DeepSpeed 0.19.8 writes the tag's files in place and then rank 0 writes `latest` (plain open/write,
before the final barrier, so it can name a tag whose other ranks are still writing). Neither is
atomic, so neither is trusted: after save_checkpoint has returned on every rank and every rank has
fsynced its files, rank 0 writes complete.json atomically. Only tags holding it count; a tag without
it is the debris of a killed save and is deleted by the next save. `latest` is not written.

Frozen parameters (the backbone under model.lora) are left out of the tag
(exclude_frozen_parameters): they are the base model's weights, which the trainer loads from
model.path before it loads a checkpoint, so saving them again would cost the whole model per save
for nothing (a 7B backbone against megabytes of adapters). complete.json records a fingerprint of
them (float64 sum and sum of absolute values over all ranks); a resume whose base weights differ
from those the checkpoint was trained on (another model.path, another precision) is refused rather
than silently continued on other weights.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from embedlib.atomic import atomic_write_json, fsync_tree
from embedlib.rundir import CHECKPOINTS, TRASH_PREFIX, discard_dir, remove_debris, utc_now
from training.config import ConfigError
from training.zero3_loading import sharded_embedding_rows

MARKER = "complete.json"
_TAG = re.compile(r"^step_(\d{8})$")


def checkpoints_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, tag dir) of the complete checkpoints, oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), e) for e in root.iterdir() if (m := _TAG.match(e.name)) and (e / MARKER).is_file()]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> tuple[int, Path] | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(engine, run_dir: str | os.PathLike, step: int, client_state: dict, keep: int,
                    write_extra: Callable[[Path], None] | None = None,
                    write_every_rank: Callable[[Path], None] | None = None) -> Path:
    """Collective: every rank calls it. Returns the tag directory, complete on return.

    write_extra(tag_dir), called on rank 0, adds the trainer's own files to the checkpoint;
    write_every_rank(tag_dir), called on every rank, adds each rank's own (ZeRO-3 shards of train.ema).
    """
    root = checkpoints_root(run_dir)
    tag_dir = root / tag_of(step)
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists() and not (tag_dir / MARKER).is_file():
            discard_dir(tag_dir)  # left by a save killed at this very step
    dist.barrier()
    if (tag_dir / MARKER).is_file():  # already saved at this step (e.g. periodic save, then the end)
        return tag_dir
    frozen = frozen_fingerprint(engine)  # collective; None when every parameter trains
    engine.save_checkpoint(str(root), tag=tag_of(step), client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=frozen is not None)
    if rank == 0 and write_extra is not None:
        write_extra(tag_dir)
    if write_every_rank is not None:
        write_every_rank(tag_dir)
    fsync_tree(tag_dir)  # every rank: its own shards reach the disk before the marker says complete
    dist.barrier()
    if rank == 0:
        atomic_write_json(tag_dir / MARKER, {"step": step, "world_size": dist.get_world_size(),
                                              "created_at": utc_now(), "frozen_fingerprint": frozen})
        _gc(root, keep)
    dist.barrier()
    return tag_dir


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoints_root(run_dir) / tag_of(step)


def load_checkpoint(engine, run_dir: str | os.PathLike,
                    check: Callable[[Path], None] | None = None) -> tuple[int, dict] | None:
    """Load the newest complete checkpoint into `engine`: (step, client_state), or None if there is none.
    Its directory is checkpoint_dir(run_dir, step). check(tag_dir), on every rank before the engine
    loads anything, may refuse the checkpoint (a ConfigError, one line).

    The ranks must agree on which one: rank 0 decides (a save could complete while ranks list).
    """
    latest = latest_checkpoint(run_dir) if dist.get_rank() == 0 else None
    decision = [latest[0] if latest else None]
    dist.broadcast_object_list(decision, src=0)
    step = decision[0]
    if step is None:
        return None
    tag_dir = checkpoint_dir(run_dir, step)
    if check is not None:
        check(tag_dir)
    saved = json.loads((tag_dir / MARKER).read_text()).get("frozen_fingerprint")
    current = frozen_fingerprint(engine)  # collective
    if saved is not None and not _same_weights(saved, current):
        raise ConfigError(f"{tag_dir} was trained on other frozen base weights than those loaded from model.path "
                          f"(fingerprint {saved}, now {current}): resume with the run's model.path and "
                          "train.precision")
    path, client_state = engine.load_checkpoint(str(checkpoints_root(run_dir)), tag=tag_of(step),
                                                load_optimizer_states=True, load_lr_scheduler_states=True,
                                                custom_load_fn=_load_module_state)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoints_root(run_dir) / tag_of(step)}")
    return step, client_state


def frozen_fingerprint(engine) -> list[float] | None:
    """Collective. [sum, sum of |x|] in float64 of every frozen parameter of the engine's module, the same
    on every rank (under ZeRO-3 each rank adds its partition's share), or None when nothing is frozen."""
    device = engine.device  # the backend's device (NCCL reduces GPU tensors only)
    partitioned = torch.zeros(2, dtype=torch.float64, device=device)  # summed over ranks
    whole = torch.zeros(2, dtype=torch.float64, device=device)  # every rank holds these entire
    frozen = 0
    for param in engine.module.parameters():
        if param.requires_grad:
            continue
        frozen = 1
        if hasattr(param, "ds_tensor"):  # a ZeRO-3 partition: only its first elements are the weight's,
            part = param.ds_tensor  # the tail of the last rank's is uninitialised padding
            start = dist.get_rank(group=getattr(param, "ds_process_group", None)) * part.numel()
            values, total = part.detach().reshape(-1)[:max(0, param.ds_numel - start)], partitioned
        else:
            values, total = param.detach().reshape(-1), whole
        _add_sums(total, values, device)
    for rows in sharded_embedding_rows(engine.module):  # a frozen embedding split by vocabulary over the ranks
        frozen = 1
        _add_sums(partitioned, rows.detach().reshape(-1), device)
    flag = torch.tensor([frozen], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return None
    dist.all_reduce(partitioned)
    return (partitioned + whole).tolist()


def _add_sums(total: torch.Tensor, values: torch.Tensor, device) -> None:
    for chunk in values.split(1 << 22):  # bounded temporaries on a large embedding
        chunk = chunk.to(device, torch.float64)
        total += torch.stack([chunk.sum(), chunk.abs().sum()])


def _same_weights(saved: list[float], current: list[float] | None) -> bool:
    """Two fingerprints of the same weights, summed in another order (another world size partitions
    ZeRO-3 differently): equal up to float64 rounding, relative to the sum of magnitudes (the plain sum
    of random weights can be near zero)."""
    if current is None:
        return False
    scale = max(abs(saved[1]), 1e-30)
    return all(abs(a - b) <= 1e-9 * scale for a, b in zip(saved, current))


def _load_module_state(src: dict, dst) -> None:
    """DeepSpeed's module load, tolerating exactly the frozen parameters a checkpoint left out (they are
    already in place: the base model's weights); any other difference is an error as in a strict load."""
    result = dst.load_state_dict(src, strict=False)
    frozen = {name for name, param in dst.named_parameters() if not param.requires_grad}
    missing = set(result.missing_keys) - frozen
    if missing or result.unexpected_keys:
        raise RuntimeError(f"checkpoint module state does not match the model: missing {sorted(missing)}, "
                           f"unexpected {sorted(result.unexpected_keys)}")


def _gc(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete tags; drop older ones and any incomplete debris."""
    complete = sorted(int(m.group(1)) for e in root.iterdir()
                      if (m := _TAG.match(e.name)) and (e / MARKER).is_file())
    kept = set(complete[-keep:])
    for entry in list(root.iterdir()):
        match = _TAG.match(entry.name)
        if match and int(match.group(1)) not in kept:
            discard_dir(entry)  # never seen half deleted with its marker still in place
    remove_debris(root, (TRASH_PREFIX,))
