"""LoRA adapters on the encoder's backbone (through peft), and the export of a LoRA-trained encoder.

    add_lora(encoder, settings)          wraps encoder.backbone in a peft model: every backbone weight
                                         frozen, low-rank adapters (A, B) added to the target modules
    merge_lora(state, settings)          a gathered Encoder state dict with the adapters folded into the
                                         weights they adapt (W + alpha/r * B @ A), under the backbone's
                                         own parameter names: what Encoder.save writes as a plain model
    save_adapter(encoder, state, dir)    the adapter alone, in peft's layout (adapter_config.json,
                                         adapter_model.safetensors): PeftModel.from_pretrained(base, dir)

Merging works on the state dict, not on the module: under ZeRO-3 rank 0 holds the gathered tensors
while the module's own parameters are empty partitions.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from training.config import LoraConfig

# peft names an adapter; there is only ever one here.
ADAPTER = "default"
# What peft puts before the backbone's own parameter names.
PEFT_PREFIX = "base_model.model."


def add_lora(encoder, settings: LoraConfig) -> None:
    """Freeze the backbone and add adapters to its target modules (in place; the projection, if any,
    stays trainable). Seed torch first: every rank must draw the same initial A matrices."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    config = PeftLoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), bias="none")
    encoder.backbone = get_peft_model(encoder.backbone, config)


def has_lora(encoder) -> bool:
    from peft import PeftModel

    return isinstance(encoder.backbone, PeftModel)


def base_backbone(encoder):
    """The backbone without peft's wrapper (its target modules still hold the adapters)."""
    return encoder.backbone.get_base_model() if has_lora(encoder) else encoder.backbone


def merge_lora(state: dict[str, torch.Tensor], settings: LoraConfig) -> dict[str, torch.Tensor]:
    """Encoder state dict with adapters -> the same model as plain weights (keys backbone.* as the
    backbone saves them, projection.* unchanged). Merged in float32, stored in the weight's dtype."""
    scale = settings.alpha / settings.r
    prefix = "backbone." + PEFT_PREFIX
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue  # folded into their base layer below
        if not key.startswith(prefix):
            merged[key] = value  # the projection
            continue
        name = "backbone." + key[len(prefix):]
        if ".base_layer." in name:
            module, kind = name.split(".base_layer.")
            name = f"{module}.{kind}"
            lora_a = state.get(key.replace(".base_layer.weight", f".lora_A.{ADAPTER}.weight"))
            if kind == "weight" and lora_a is not None:
                lora_b = state[key.replace(".base_layer.weight", f".lora_B.{ADAPTER}.weight")]
                value = (value.float() + scale * (lora_b.float() @ lora_a.float())).to(value.dtype)
        merged[name] = value
    return merged


def save_adapter(encoder, state: dict[str, torch.Tensor], directory: str | Path) -> None:
    """Write the adapter alone in peft's layout, from the gathered Encoder state dict."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            name = key[len("backbone."):].replace(f".{ADAPTER}.", ".")  # peft's files omit the adapter name
            tensors[name] = value.detach().cpu().contiguous()
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    encoder.backbone.peft_config[ADAPTER].save_pretrained(directory)  # adapter_config.json


def trainable_parameter_groups(encoder, weight_decay: float) -> list[dict]:
    """AdamW groups of the parameters that train (all of them, or the adapters and the projection under
    LoRA): weight decay on matrices, none on biases and norms."""
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    # Under zero.Init a parameter is already a flat partition; ds_shape is its real shape.
    is_matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in trainable]
    groups = [{"params": [p for p, m in zip(trainable, is_matrix) if m], "weight_decay": weight_decay},
              {"params": [p for p, m in zip(trainable, is_matrix) if not m], "weight_decay": 0.0}]
    # No empty group (LoRA has no biases): ZeRO drops empty groups, and the LR schedule must see the same.
    return [g for g in groups if g["params"]]
