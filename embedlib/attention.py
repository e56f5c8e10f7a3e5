"""Attention masks for decoder-only backbones used as embedders.

    causal         the backbone as pre-trained: each token sees itself and the tokens before it
    bidirectional  every token sees every (non-padding) token, as in an encoder (NV-Embed, LLM2Vec)
    softmask       Conan-embedding-v2's schedule from causal to bidirectional: the attention a token pays
                   to later tokens is weighted by alpha(t) = min(1, t / tau), t the optimizer steps taken,
                   tau = model.softmask_steps; alpha 0 is causal, alpha 1 bidirectional

The weight enters the softmax as an additive bias log(alpha) on the future-token part of the mask, so a
future token's unnormalised attention is multiplied by alpha. A causal backbone gets the ordinary 2D
padding mask (any attention kernel); the other modes pass a 4D float mask, which transformers uses as it
is (the eager and SDPA kernels; flash-attention kernels take no float mask).
"""
from __future__ import annotations

import math

import torch

ATTENTION_MODES = ("causal", "bidirectional", "softmask")


def softmask_alpha(step: int, softmask_steps: int) -> float:
    """alpha(t) = t / tau, capped at 1: the weight of future tokens after `step` optimizer steps."""
    if softmask_steps <= 0:
        return 1.0
    return min(1.0, max(0, step) / softmask_steps)


def future_weight(mode: str, step: int, softmask_steps: int) -> float:
    """The weight of future tokens at `step` for an attention mode: 0 causal, 1 bidirectional."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"unknown attention mode {mode!r}; expected one of {', '.join(ATTENTION_MODES)}")
    if mode == "causal":
        return 0.0
    if mode == "bidirectional":
        return 1.0
    return softmask_alpha(step, softmask_steps)


def attention_bias(attention_mask: torch.Tensor, weight: float, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] padding mask (1 token, 0 pad) -> [B, 1, T, T] additive bias: 0 for past and present tokens,
    log(weight) for future tokens, the dtype's lowest value for padding keys (and future keys at weight 0).

    The lowest finite value, not -inf: a padding query row that sees only padding keys then gets a
    uniform softmax instead of NaN (its output is never pooled)."""
    lowest = torch.finfo(dtype).min
    length = attention_mask.shape[1]
    positions = torch.arange(length, device=attention_mask.device)
    future = positions[None, :] > positions[:, None]  # [T query, T key]
    future_bias = math.log(weight) if weight > 0 else lowest
    bias = torch.where(future, torch.tensor(future_bias, dtype=dtype, device=attention_mask.device),
                       torch.tensor(0.0, dtype=dtype, device=attention_mask.device))
    padding_key = attention_mask[:, None, None, :] == 0  # [B, 1, 1, T]
    return bias[None, None].masked_fill(padding_key, lowest)
