"""One step's forward and backward: the plain step, or the same gradient through a gradient cache.

    backward_step(engine, batch, kinds, loss_cfg, chunk_size=None)   forwards, CBB loss, backward

chunk_size None (train.grad_cache.chunk_size off) is the plain step: this rank's two encoder forwards
with gradient (training/main.py), cbb_step_loss, one engine.backward.

With chunk_size N it is GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size
under Memory Limited Setup"), in three passes:

  1. encode every group (queries and passages, or the two STS sides) in chunks of N texts without
     gradient, keeping each chunk's random state (CPU, and CUDA on a GPU) from before its forward;
  2. compute cbb_step_loss, unchanged (all-gather of all ranks' candidates, Matryoshka sizes, the
     false-negative mask), on the cached embeddings made leaves, and take its gradient with respect
     to them: d loss_r / d e, where loss_r is exactly what the plain step hands to engine.backward;
  3. encode each chunk again with gradient, its random state restored so that dropout draws the same
     masks as in pass 1, and back-propagate the surrogate sum(e_chunk * d loss_r / d e_chunk) with
     engine.backward. The sum over chunks of their parameter gradients is the gradient of loss_r.

Activation memory is one chunk's; the cost is one more forward per text. The gradient equals that of
the plain step over the same chunked forwards (the model function with the same dropout masks); when N
covers each group, the cached step encodes exactly as the plain step does and gives its gradient
(tests/test_grad_cache.py proves both on DeepSpeed ZeRO 1, 2 and 3 at 1, 2 and 3 ranks).

DeepSpeed. The trainer runs one micro-batch per optimizer step (gradient_accumulation_steps 1), and the
chunks of pass 3 are that step's micro-batches: every engine.backward but the last runs with
engine.set_gradient_accumulation_boundary(False), the last with True, then engine.step(). That is
DeepSpeed's own gradient accumulation path: ZeRO-1 keeps the chunk gradients locally and reduces them
at the boundary, ZeRO-2 and 3 reduce each backward's gradients into the rank's partition (collectives
in backward hooks), and the loss is not divided by the number of chunks (each chunk's surrogate is a
part of one loss, not a micro-batch mean). Under ZeRO-3 every forward gathers parameters collectively,
and under ZeRO-2 and 3 every backward reduces collectively, so every rank must run the same number of
forwards and backwards: ranks whose batch has fewer chunks (an STS rank beside retrieval ranks,
unequal batches) pad with forwards of one text, whose backward carries a zero gradient. The counts
are agreed with one all_reduce before pass 1; the collectives of the loss stay in its forward
(training/loss.py), so pass 2 runs none in backward.

Gradient checkpointing (model.gradient_checkpointing) combines with it: pass 3's forwards keep only
layer inputs and recompute in backward, with torch.utils.checkpoint restoring the random state it
saw, which is the replayed one.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from training.data import RetrievalBatch, StepBatch
from training.loss import LossConfig, RetrievalEmbeddings, STSEmbeddings, StepLoss, cbb_step_loss

Tokens = dict[str, Tensor]


def backward_step(engine, batch: StepBatch, kinds: list[str], loss_cfg: LossConfig, chunk_size: int | None = None,
                  before_backward: Callable[[StepLoss], None] = lambda out: None) -> StepLoss:
    """This rank's forwards, the CBB loss of the step and its backward into the engine's gradients (the
    caller then takes engine.step()). `before_backward` sees the loss before any gradient is made (the
    trainer stops on a loss that is not finite there). Collective: every rank calls it at every step."""
    if chunk_size is None:
        out = cbb_step_loss(embed(engine, batch, loss_cfg), kinds, loss_cfg, dist.get_world_size(),
                            list(batch.assignment))
        before_backward(out)
        engine.backward(out.loss)
        return out
    return cached_backward_step(engine, batch, kinds, loss_cfg, chunk_size, before_backward)


def embed(engine, batch: StepBatch, loss_cfg: LossConfig) -> RetrievalEmbeddings | STSEmbeddings:
    """This rank's embeddings for its batch: always two forwards (see training/main.py)."""
    return embeddings_of(batch, [forward(engine, group) for group in groups_of(batch)], loss_cfg)


def cached_backward_step(engine, batch: StepBatch, kinds: list[str], loss_cfg: LossConfig, chunk_size: int,
                         before_backward: Callable[[StepLoss], None]) -> StepLoss:
    device = engine.device
    chunked = [split(group, chunk_size) for group in groups_of(batch)]
    own = sum(len(chunks) for chunks in chunked)
    forwards = max_over_ranks(own, device)
    one_text = split({k: v[:1] for k, v in chunked[0][0].items()}, 1)[0]
    padding = [one_text] * (forwards - own)

    # Pass 1: every chunk without gradient, its random state kept for pass 3.
    states: list[RandomState] = []
    cached: list[Tensor] = []
    with torch.no_grad():
        for chunks in chunked:
            parts = []
            for chunk in chunks:
                states.append(RandomState.capture(device))
                parts.append(forward(engine, chunk))
            cached.append(torch.cat(parts))
        for chunk in padding:
            forward(engine, chunk)
    after_pass_one = RandomState.capture(device)

    # Pass 2: the loss on the cached embeddings, and its gradient with respect to them.
    leaves = [embeddings.detach().requires_grad_() for embeddings in cached]
    out = cbb_step_loss(embeddings_of(batch, leaves, loss_cfg), kinds, loss_cfg, dist.get_world_size(),
                        list(batch.assignment))
    before_backward(out)
    grads = torch.autograd.grad(out.loss, leaves, allow_unused=True) if out.loss.requires_grad else [None] * 2
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]

    # Pass 3: each chunk again with gradient and its pass-1 random state; its cached gradient flows back.
    jobs = []
    for chunks, grad in zip(chunked, grads):
        start = 0
        for chunk in chunks:
            rows = len(chunk["input_ids"])
            jobs.append((chunk, grad[start:start + rows]))
            start += rows
    jobs += [(chunk, None) for chunk in padding]
    for i, ((chunk, grad), state) in enumerate(zip(jobs, states + [None] * len(padding))):
        engine.set_gradient_accumulation_boundary(i == len(jobs) - 1)
        if state is not None:
            state.restore()
        embeddings = forward(engine, chunk)
        if grad is None:  # a padding forward: a backward like the others, with a zero gradient
            surrogate = embeddings.float().sum() * 0.0
        else:
            surrogate = torch.dot(embeddings.float().flatten(), grad.float().flatten())
        engine.backward(surrogate)
        del embeddings, surrogate
    after_pass_one.restore()  # the step leaves the random state as the plain step's forwards do
    return out


# ---------------------------------------------------------------------------------------------------
# Pieces


def groups_of(batch: StepBatch) -> list[Tokens]:
    """The two groups of texts a rank encodes: queries and passages (positives, then negatives), or
    the first and second sentences of STS pairs."""
    if isinstance(batch, RetrievalBatch):
        return [batch.query, batch.passages]
    return [batch.first, batch.second]


def embeddings_of(batch: StepBatch, encoded: list[Tensor], loss_cfg: LossConfig) -> RetrievalEmbeddings | STSEmbeddings:
    """The loss's view of a rank's two encoded groups (groups_of order), with the keys the loss needs: the
    passages' text keys for the false-negative mask, the queries' for ranks sharing them, the labels."""
    if not isinstance(batch, RetrievalBatch):
        first, second = encoded
        return STSEmbeddings(first, second, batch.score.to(first.device))
    query, passages = encoded
    n, m = len(query), batch.num_negatives
    out = RetrievalEmbeddings(query, passages[:n], passages[n:].reshape(n, m, passages.shape[-1]))
    if loss_cfg.false_negative_margin is not None:
        passage_keys = text_keys(batch.passages).to(query.device)
        out.positive_keys, out.negative_keys = passage_keys[:n], passage_keys[n:].reshape(n, m)
    if loss_cfg.cbb_negatives == "shared_queries":
        out.query_keys = text_keys(batch.query).to(query.device)
    if batch.passage_labels is not None:
        labels = batch.passage_labels.to(query.device)
        out.label_keys, out.negative_label_keys = labels[:n], labels[n:].reshape(n, m)
    return out


def forward(engine, tokens: Tokens) -> Tensor:
    return engine(**{k: v.to(engine.device) for k, v in tokens.items()})


def split(tokens: Tokens, chunk_size: int) -> list[Tokens]:
    """Chunks of `chunk_size` rows, each cut after its last attended column (trailing padding only, so
    no token's position changes): a chunk of short texts is not padded to the batch's longest."""
    rows = len(tokens["input_ids"])
    chunks = []
    for start in range(0, rows, chunk_size):
        chunk = {k: v[start:start + chunk_size] for k, v in tokens.items()}
        attended = chunk["attention_mask"].bool().any(0).nonzero()
        width = int(attended.max()) + 1 if len(attended) else 1
        chunks.append({k: v[:, :width] for k, v in chunk.items()})
    return chunks


def text_keys(tokens: Tokens) -> Tensor:
    """[rows] int64: a 64-bit hash of each row's attended token ids; equal texts (as the model sees them,
    after truncation) get equal keys, on every rank."""
    ids, mask = tokens["input_ids"].numpy(), tokens["attention_mask"].bool().numpy()
    keys = [int.from_bytes(hashlib.blake2b(row[used].astype("<i8").tobytes(), digest_size=8).digest(), "little",
                           signed=True) for row, used in zip(ids, mask)]
    return torch.tensor(keys, dtype=torch.int64)


def max_over_ranks(value: int, device) -> int:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


@dataclass
class RandomState:
    """The random state dropout draws from: the CPU generator, and on an accelerator (a GPU) the current
    device's generator too (DeepSpeed makes the rank's device current)."""

    cpu: Tensor
    device_type: str
    accelerator: Tensor | None

    @classmethod
    def capture(cls, device) -> RandomState:
        device_type = torch.device(device).type
        accelerator = None if device_type == "cpu" else torch.get_device_module(device_type).get_rng_state()
        return cls(torch.get_rng_state(), device_type, accelerator)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accelerator is not None:
            torch.get_device_module(self.device_type).set_rng_state(self.accelerator)
