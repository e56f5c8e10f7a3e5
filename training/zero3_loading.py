"""ZeRO-3 without any rank ever holding the whole backbone, from the first byte read to the last step.

transformers' own ZeRO-3 load (from_pretrained under HfDeepSpeedConfig) maps every safetensors shard on
rank 0 and gathers each module whole on every rank to copy its weights in, and DeepSpeed gathers the
input embedding whole at every forward. On a Qwen2.5-0.5B that embedding is a quarter of the model, and
gathering it doubled a ZeRO-3 rank's peak. Here instead:

    load_backbone_zero3   builds the model under deepspeed.zero.Init without initialising it, then each
                          rank reads its own partition of every weight straight from the safetensors files
                          (the flattened tensor's elements [rank * p, (rank + 1) * p), DeepSpeed's layout),
                          converting the file's dtype as it copies: nothing is gathered, broadcast or mapped.
                          A checkpoint it cannot map one to one onto the model (a weight missing, another
                          shape, a dtype torch cannot read from bytes), or a model with remote code, is
                          loaded by transformers instead, with a warning that says why.
    shard_frozen_embedding  replaces a frozen input embedding (LoRA trains none of it) with
                          VocabShardedEmbedding: rows split by vocabulary over the ranks, read from the
                          files; a lookup exchanges only the rows the ranks' batches use.
    gather_sharded_embeddings  the full weights of those modules on rank 0, for exports.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from embedlib.encoder import EncoderError

logger = logging.getLogger(__name__)

# safetensors dtype names torch can read from raw bytes
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class UnsupportedCheckpoint(Exception):
    """The checkpoint does not map one to one onto the model's parameters (transformers loads it)."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file: where its bytes start, read a range of its elements at a time."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # byte offset of element 0 in the file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self, start: int, count: int) -> torch.Tensor:
        """Elements [start, start + count) of the flattened tensor, read from the file (1-D, file dtype)."""
        size = self.dtype.itemsize
        data = bytearray(count * size)
        with open(self.file, "rb") as f:
            f.seek(self.offset + start * size)
            got = f.readinto(data)
        if got != len(data):
            raise OSError(f"{self.file}: {self.key}: file ends {len(data) - got} bytes early")
        return torch.frombuffer(data, dtype=self.dtype) if count else torch.empty(0, dtype=self.dtype)


def stored_tensors(backbone_dir: Path) -> dict[str, StoredTensor]:
    """Every tensor of the directory's model.safetensors or of the shards its index names, by key. A file
    that is not safetensors, or was cut short, is an EncoderError naming it: every rank reads the same
    headers, so every rank stops here, before any reads its own range of a file."""
    index = backbone_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as error:
            raise EncoderError(f"{index}: not a safetensors index (no weight_map: {error})") from None
    elif (backbone_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UnsupportedCheckpoint(f"{backbone_dir}: no safetensors weights")
    tensors = {}
    for name in files:
        path = backbone_dir / name
        if not path.is_file():
            raise EncoderError(f"{index}: names {name}, which is not in {backbone_dir}")
        try:
            with open(path, "rb") as f:
                (header_size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_size))
            entries = [(key, SAFETENSORS_DTYPES.get(meta["dtype"]), meta["dtype"], tuple(meta["shape"]),
                        *meta["data_offsets"]) for key, meta in header.items() if key != "__metadata__"]
        except (struct.error, ValueError, KeyError, TypeError, AttributeError) as error:
            raise EncoderError(f"{path}: not a safetensors file (its header does not parse: {error})") from None
        data_size = path.stat().st_size - 8 - header_size
        for key, dtype, dtype_name, shape, begin, end in entries:
            if dtype is None:
                raise UnsupportedCheckpoint(f"{path}: {key}: dtype {dtype_name}")
            stored = StoredTensor(path, key, dtype, shape, 8 + header_size + begin)
            if end - begin != stored.numel * dtype.itemsize or begin > end:
                raise EncoderError(f"{path}: {key}: {end - begin} bytes for shape {list(shape)} in {dtype_name}")
            if end > data_size:
                raise EncoderError(f"{path}: {key}: the file ends {end - data_size} bytes before this tensor's "
                                   "end (cut short while copying?)")
            tensors[key] = stored
    return tensors


def load_backbone_zero3(backbone_dir: Path, hf_config, ds_config: dict, dtype: torch.dtype,
                        trust_remote_code: bool = False) -> nn.Module:
    """The backbone AutoModel.from_pretrained(backbone_dir) would give, partitioned by ZeRO-3 from the
    start: each rank allocates and reads only its partition of each weight (a module's full weights exist
    for a moment while zero.Init builds it, one module at a time)."""
    import deepspeed
    from transformers import AutoModel
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        if trust_remote_code:
            raise UnsupportedCheckpoint("a model with remote code")
        if type(hf_config) not in MODEL_MAPPING:
            raise UnsupportedCheckpoint(f"no AutoModel class for {type(hf_config).__name__}")
        # Imported before zero.Init: it wraps the __init__ of classes defined inside it, and restores on
        # exit the __init__ they had before their decorators (transformers' kernel hooks) for good.
        MODEL_MAPPING[type(hf_config)]
        tensors = stored_tensors(backbone_dir)
    except UnsupportedCheckpoint as reason:
        return _load_through_transformers(backbone_dir, hf_config, ds_config, dtype, trust_remote_code, reason)
    with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = AutoModel.from_config(hf_config, dtype=dtype)
    try:
        plan = _match(model, tensors)
    except UnsupportedCheckpoint as reason:
        del model
        return _load_through_transformers(backbone_dir, hf_config, ds_config, dtype, trust_remote_code, reason)
    with torch.no_grad():
        for target, stored in plan:
            if hasattr(target, "ds_tensor"):
                _read_partition(target, stored)
            else:  # a buffer: every rank holds it whole
                target.copy_(stored.read(0, stored.numel).view(stored.shape))
    model.eval()  # as from_pretrained returns it; the trainer sets train mode
    return model


def _match(model: nn.Module, tensors: dict[str, StoredTensor]) -> list[tuple[torch.Tensor, StoredTensor]]:
    """(parameter or persistent buffer, its stored tensor) for the whole model; the files' own names may
    carry the causal LM's prefix ("model.layers.0..." for the base model's "layers.0...")."""
    plan = []
    for name, param in model.named_parameters():
        stored = _stored_for(tensors, model, name)
        if stored is None:
            raise UnsupportedCheckpoint(f"no weight for {name}")
        if stored.shape != tuple(param.ds_shape):
            raise UnsupportedCheckpoint(f"{stored.key}: shape {stored.shape}, the model's {tuple(param.ds_shape)}")
        plan.append((param, stored))
    persistent = set(model.state_dict().keys())
    for name, buffer in model.named_buffers():
        stored = _stored_for(tensors, model, name) if name in persistent else None
        if stored is not None and stored.shape == tuple(buffer.shape):  # else it keeps its constructed value
            plan.append((buffer, stored))
    return plan


def _stored_for(tensors: dict[str, StoredTensor], model: nn.Module, name: str) -> StoredTensor | None:
    """The stored tensor of the model's `name`, under its own name or the causal LM's prefixed one."""
    prefix = getattr(model, "base_model_prefix", "")
    return tensors.get(name) or (tensors.get(f"{prefix}.{name}") if prefix else None)


def _read_partition(param: torch.Tensor, stored: StoredTensor) -> None:
    """This rank's part of the flattened weight into param.ds_tensor: elements [rank * p, rank * p + p),
    the last rank's tail past the weight zeroed (DeepSpeed's padding)."""
    part = param.ds_tensor
    size = part.numel()
    start = dist.get_rank(group=getattr(param, "ds_process_group", None)) * size
    count = max(0, min(size, stored.numel - start))
    if count < size:
        part.zero_()
    if count:
        part[:count].copy_(stored.read(start, count))


def _load_through_transformers(backbone_dir, hf_config, ds_config, dtype, trust_remote_code, reason) -> nn.Module:
    from transformers import AutoModel
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    logger.warning("%s: loaded through transformers' ZeRO-3 path (each module gathered whole while its weights "
                   "are copied in): %s", backbone_dir, reason)
    zero3_loading = HfDeepSpeedConfig(ds_config)  # noqa: F841 (while it lives, from_pretrained uses zero.Init)
    try:
        model = AutoModel.from_pretrained(backbone_dir, config=hf_config, dtype=dtype,
                                          trust_remote_code=trust_remote_code)
    finally:
        unset_hf_deepspeed_config()  # later loads in this process (an export's evaluation) are plain again
    if hasattr(model, "_weight_conversions"):
        # its ZeRO-3 load keeps legacy renamings (BERT's LayerNorm gamma/beta) and would write exports with
        # them; without, save_pretrained uses the names a plain load saves with
        model._weight_conversions = None
    return model


class VocabShardedEmbedding(nn.Module):
    """A frozen input embedding whose rows are split over the ranks by token id (rank r holds rows
    [r * p, (r + 1) * p), p = _rows_per_rank). A lookup is collective: the ranks exchange the ids their
    batches use, each fills the rows of the union it holds, and one all_reduce gives every rank all of
    them (the others contribute exact zeros, so the sum is the row itself). Memory and traffic are the
    union's rows, not the vocabulary's, which ZeRO-3 gathers whole at every forward. Like any ZeRO-3
    module it must be called the same number of times on every rank."""

    def __init__(self, rows: torch.Tensor, start: int, num_embeddings: int):
        super().__init__()
        self.register_buffer("rows", rows, persistent=False)  # not in state dicts or checkpoints: frozen
        self.start = start
        self.num_embeddings = num_embeddings
        self.embedding_dim = rows.shape[1]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1).to(self.rows.device)
        union = _all_unique(ids)
        if union.numel() and (union[0] < 0 or union[-1] >= self.num_embeddings):  # the same on every rank
            raise IndexError(f"token id {union[0] if union[0] < 0 else union[-1]} outside the embedding's "
                             f"{self.num_embeddings} rows")
        local = union - self.start
        held = (local >= 0) & (local < self.rows.shape[0])
        vectors = torch.zeros(union.numel(), self.embedding_dim, dtype=self.rows.dtype, device=self.rows.device)
        vectors[held] = self.rows[local[held]]
        dist.all_reduce(vectors)
        return vectors[torch.searchsorted(union, ids)].view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.start}, {self.start + self.rows.shape[0]})"


def _rows_per_rank(vocab: int) -> int:
    """Rank r of a VocabShardedEmbedding holds rows [r * this, (r + 1) * this), the last rank fewer."""
    return math.ceil(vocab / dist.get_world_size())


def _all_unique(ids: torch.Tensor) -> torch.Tensor:
    """The sorted union of every rank's ids (gloo's all_gather takes equal sizes: padded, counts first)."""
    world = dist.get_world_size()
    mine = torch.unique(ids)
    count = torch.tensor([mine.numel()], device=ids.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    padded = torch.zeros(max(int(c) for c in counts), dtype=mine.dtype, device=ids.device)
    padded[:mine.numel()] = mine
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.unique(torch.cat([g[:int(c)] for g, c in zip(gathered, counts)]))


def shard_frozen_embedding(backbone: nn.Module, backbone_dir: Path) -> bool:
    """Under ZeRO-3, replace the backbone's input embedding with a VocabShardedEmbedding when nothing of it
    trains (LoRA), its rows read from the checkpoint. False (nothing changed) for a trained embedding, one
    that is not a plain nn.Embedding, or a checkpoint without it."""
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone  # under peft
    embedding = base.get_input_embeddings()
    if type(embedding) is not nn.Embedding or embedding.weight.requires_grad:
        return False
    name = next(n for n, m in base.named_modules() if m is embedding)
    with contextlib.suppress(UnsupportedCheckpoint):
        stored = _stored_for(stored_tensors(backbone_dir), base, f"{name}.weight")
        if stored is not None and stored.shape == tuple(embedding.weight.ds_shape):
            vocab, dim = stored.shape
            per_rank = _rows_per_rank(vocab)
            start = min(vocab, dist.get_rank() * per_rank)
            count = min(per_rank, vocab - start)
            part = embedding.weight.ds_tensor  # the dtype and device the model computes in
            rows = stored.read(start * dim, count * dim).view(count, dim).to(part.device, part.dtype)
            base.set_input_embeddings(VocabShardedEmbedding(rows, start, vocab))
            return True
    return False


def gather_sharded_embeddings(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """Collective. {"<module path>.weight": the full embedding} of every VocabShardedEmbedding in module, on
    rank 0 (CPU tensors); None on other ranks. The names are those the replaced nn.Embedding's weight had."""
    found = {}
    for name, sharded in module.named_modules():
        if not isinstance(sharded, VocabShardedEmbedding):
            continue
        rows = sharded.rows
        padded = torch.zeros(_rows_per_rank(sharded.num_embeddings), sharded.embedding_dim, dtype=rows.dtype,
                             device=rows.device)
        padded[:rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())] if dist.get_rank() == 0 else None
        dist.gather(padded, parts, dst=0)
        if parts is not None:
            found[f"{name}.weight"] = torch.cat(parts)[:sharded.num_embeddings].cpu()
    return found if dist.get_rank() == 0 else None


def sharded_embedding_rows(module: nn.Module) -> list[torch.Tensor]:
    """This rank's rows of every VocabShardedEmbedding in module (frozen weights a checkpoint fingerprints)."""
    return [m.rows for m in module.modules() if isinstance(m, VocabShardedEmbedding)]
