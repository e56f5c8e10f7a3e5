"""Rank processes for tests/test_cbb_gradients.py (started with torch.multiprocessing, spawn).

Each rank wraps a tiny BERT in a real DeepSpeed engine (gloo, fp32, torch AdamW), computes one
step's loss on its own data, runs one engine.backward and reads every parameter's full averaged
gradient. Rank 0 then recomputes L in one process on the union of all ranks' data and writes the
comparison to results.json; the test asserts on it.

Scenarios are run with the real cbb_step_loss and with classic scaling mistakes injected, so the
test shows that the comparison can fail.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from embedlib.encoder import Encoder
from training.loss import (
    LossConfig,
    RetrievalEmbeddings,
    STSEmbeddings,
    cbb_step_loss,
    cosent,
    info_nce,
    truncate,
)
from training.schedule import assign_tasks

OUTPUT_DIM = 24  # the tiny BERT's hidden size is 32
RTOL = 1e-5
# atol = this times the largest |reference gradient| entry of the whole model: room for float32
# noise in entries near zero by cancellation. Attention key biases have an exact zero gradient
# (noise 3e-11), and BERT's token-type embedding, a sum over every token, differs by up to 2.6e-6
# of its largest entry between 3 ranks and 1 process.
ATOL_FRACTION = 1e-5


@dataclass
class Batch:
    """Sizes of one rank's batch: retrieval (queries, hard negatives per query) or STS (pairs)."""

    kind: str
    queries: int = 0
    negatives: int = 0
    pairs: int = 0


@dataclass
class Scenario:
    name: str
    batches: list[Batch]  # one per rank
    variant: str = "cbb"  # how each rank computes its loss: "cbb" or an injected mistake
    zero_stage: int = 2
    loss_cfg: LossConfig = field(default_factory=LossConfig)


def scenarios(world_size: int) -> list[Scenario]:
    # Mixed: unequal retrieval batches (queries and negatives), one STS rank with a larger batch, not last.
    mixed = [Batch("retrieval", queries=3 - r // 2, negatives=1 + r) for r in range(world_size)]
    mixed[1] = Batch("sts", pairs=8)
    retrieval = [Batch("retrieval", queries=3, negatives=2) for _ in range(world_size)]
    matryoshka = LossConfig(matryoshka_dims=[12, OUTPUT_DIM])
    found = [
        Scenario("mixed", mixed, loss_cfg=matryoshka),
        Scenario("retrieval", retrieval),
        Scenario("mixed_missing_world_size", mixed, variant="missing_world_size", loss_cfg=matryoshka),
        Scenario("retrieval_missing_world_size", retrieval, variant="missing_world_size"),
        Scenario("retrieval_grad_gather_full_loss", retrieval, variant="grad_gather_full_loss"),
        Scenario("retrieval_no_grad_gather_local_loss", retrieval, variant="no_grad_gather_local_loss"),
        # A second correct recipe (open_clip's gather_with_grad without local_loss): agrees with L.
        Scenario("retrieval_grad_gather_full_loss_unscaled", retrieval, variant="grad_gather_full_loss_unscaled"),
    ]
    # Every rank on STS (a random_task step), with batches of different sizes.
    found.append(Scenario("sts", [Batch("sts", pairs=5 + r) for r in range(world_size)]))
    if world_size == 2:
        found += [Scenario(f"mixed_zero{s}", mixed, zero_stage=s, loss_cfg=matryoshka) for s in (1, 3)]
    if world_size == 3:  # two STS ranks: L takes the mean of their CoSENT losses
        two_sts = [Batch("retrieval", queries=3, negatives=2), Batch("sts", pairs=6), Batch("sts", pairs=9)]
        found.append(Scenario("two_sts", two_sts))
    return found


def load_encoder(model_dir: str) -> Encoder:
    """The production Encoder (mean pooling, a projection, L2 normalisation), the same on every rank
    and in the reference: the projection's random init is seeded, and eval() turns dropout off."""
    torch.manual_seed(0)
    return Encoder.from_pretrained(model_dir, pooling="mean", output_dim=OUTPUT_DIM).eval()


def random_texts(generator: torch.Generator, count: int) -> dict[str, torch.Tensor]:
    """`count` random token sequences of 4 to 12 tokens, padded, as tokenizer output."""
    lengths = torch.randint(4, 13, (count,), generator=generator)
    input_ids = torch.zeros(count, 12, dtype=torch.long)
    attention_mask = torch.zeros(count, 12, dtype=torch.long)
    for i, length in enumerate(lengths.tolist()):
        input_ids[i, :length] = torch.randint(1000, 30000, (length,), generator=generator)
        input_ids[i, 0], input_ids[i, length - 1] = 101, 102  # [CLS] ... [SEP]
        attention_mask[i, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def rank_inputs(scenario: Scenario, rank: int) -> dict[str, dict[str, torch.Tensor] | torch.Tensor]:
    """The data of one rank, a function of (scenario, rank) only, so rank 0 can rebuild everyone's."""
    generator = torch.Generator().manual_seed(1000 + rank)
    batch = scenario.batches[rank]
    if batch.kind == "retrieval":
        return {
            "query": random_texts(generator, batch.queries),
            "positive": random_texts(generator, batch.queries),
            "negatives": random_texts(generator, batch.queries * batch.negatives),
        }
    return {
        "first": random_texts(generator, batch.pairs),
        "second": random_texts(generator, batch.pairs),
        "score": torch.rand(batch.pairs, generator=generator) * 5,
    }


def embed(model: torch.nn.Module, batch: Batch, inputs: dict) -> RetrievalEmbeddings | STSEmbeddings:
    """One forward pass per rank: under ZeRO-3 each forward gathers parameters collectively, so
    every rank must make the same number of calls whatever its task."""
    parts = ["query", "positive", "negatives"] if batch.kind == "retrieval" else ["first", "second"]
    texts = {key: torch.cat([inputs[p][key] for p in parts]) for key in ("input_ids", "attention_mask")}
    embeddings = model(**texts).split([len(inputs[p]["input_ids"]) for p in parts])
    if batch.kind == "retrieval":
        query, positive, negatives = embeddings
        return RetrievalEmbeddings(query, positive, negatives.view(batch.queries, batch.negatives, -1))
    first, second = embeddings
    return STSEmbeddings(first=first, second=second, score=inputs["score"])


def rank_loss(scenario: Scenario, local: RetrievalEmbeddings | STSEmbeddings, rank_kinds: list[str]) -> torch.Tensor:
    """The tensor this rank hands to engine.backward: the real CBB loss or a classic mistake."""
    world_size = dist.get_world_size()
    cfg = scenario.loss_cfg
    if scenario.variant == "cbb":
        return cbb_step_loss(local, rank_kinds, cfg).loss
    if scenario.variant == "missing_world_size":  # the right per-rank loss without the factor W
        return cbb_step_loss(local, rank_kinds, cfg).loss / world_size
    # The remaining variants are for steps where every rank does retrieval with equal batch sizes.
    query, positive = local.query, local.positive
    negatives = local.negatives.reshape(-1, local.negatives.shape[-1])
    if scenario.variant == "no_grad_gather_local_loss":
        # Gather without gradient, keep the own slice live, but only the own queries' loss (mean
        # over them); DeepSpeed's average then matches L's value, not its gradient.
        all_positive, all_negatives = (_gather_with_live_slice(t) for t in (positive, negatives))
        candidates = torch.cat([all_positive, all_negatives])
        target = torch.arange(len(query)) + dist.get_rank() * len(query)
        return F.cross_entropy(query @ candidates.T / cfg.temperature, target)
    # Gradient-keeping gather: its backward sums the gradients of all ranks.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.distributed.nn.functional is deprecated
        from torch.distributed.nn.functional import all_gather

        all_query, all_positive, all_negatives = (torch.cat(all_gather(t)) for t in (query, positive, negatives))
    full_loss = info_nce(all_query, all_positive, all_negatives, cfg.temperature)
    if scenario.variant == "grad_gather_full_loss":  # full loss on every rank, and also times W
        return world_size * full_loss
    assert scenario.variant == "grad_gather_full_loss_unscaled", scenario.variant
    return full_loss


def _gather_with_live_slice(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[dist.get_rank()] = tensor
    return torch.cat(parts)


def gradient_mismatch(grads: dict[str, torch.Tensor], ref_grads: dict[str, torch.Tensor]):
    """(names of the parameters whose gradient differs from the reference beyond RTOL and an atol of
    ATOL_FRACTION x the largest reference entry, the worst (excess, where), that atol)."""
    mismatched, worst = [], (0.0, "")
    atol = ATOL_FRACTION * max(ref.abs().max().item() for ref in ref_grads.values())
    for name, ref in ref_grads.items():
        got = grads[name]
        if not torch.allclose(got, ref, rtol=RTOL, atol=atol):
            mismatched.append(name)
        excess = ((got - ref).abs() - RTOL * ref.abs()).max().item() / atol
        if excess > worst[0]:
            diff, scale = (got - ref).abs().max().item(), ref.abs().max().item()
            worst = (excess, f"{name}: max|diff| {diff:.3g}, max|ref| {scale:.3g}")
    return mismatched, worst, atol


def _or_zeros(grad: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor:
    # ZeRO-3 keeps the full shape in ds_shape; the local tensor is a partition.
    return grad.detach() if grad is not None else torch.zeros(getattr(param, "ds_shape", param.shape))


def reference(model_dir: str, scenario: Scenario) -> tuple[float, dict[str, torch.Tensor]]:
    """L on the union of all ranks' data in one process, and its gradient (written from the formula)."""
    model = load_encoder(model_dir)
    cfg = scenario.loss_cfg
    retrieval, sts = [], []
    for rank, batch in enumerate(scenario.batches):
        embeddings = embed(model, batch, rank_inputs(scenario, rank))
        (retrieval if batch.kind == "retrieval" else sts).append(embeddings)
    dims = cfg.matryoshka_dims or [model.embedding_dim]
    loss = torch.zeros(())
    for d in dims:
        if retrieval:
            query = torch.cat([truncate(e.query, d) for e in retrieval])
            positive = torch.cat([truncate(e.positive, d) for e in retrieval])
            negatives = torch.cat([truncate(e.negatives, d).reshape(-1, d) for e in retrieval])
            loss = loss + info_nce(query, positive, negatives, cfg.temperature) / len(dims)
        for e in sts:
            sts_loss = cosent(truncate(e.first, d), truncate(e.second, d), e.score, cfg.cosent_scale)
            loss = loss + cfg.cbb_beta * sts_loss / len(sts) / len(dims)
    loss.backward()
    # Parameters the loss does not reach (BERT's pooler) have no gradient: compare them as zeros.
    return loss.item(), {name: _or_zeros(p.grad, p) for name, p in model.named_parameters()}


def run_scenario(model_dir: str, scenario: Scenario) -> dict | None:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = load_encoder(model_dir)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": scenario.zero_stage},
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=ds_config
    )
    rank_kinds = [b.kind for b in scenario.batches]
    local = embed(engine, scenario.batches[rank], rank_inputs(scenario, rank))
    step = cbb_step_loss(local, rank_kinds, scenario.loss_cfg)  # forward-only collectives: safe to repeat
    engine.backward(rank_loss(scenario, local, rank_kinds))
    # safe_get_full_grad is collective under ZeRO: every rank reads every parameter, in the same order.
    grads = {name: _or_zeros(safe_get_full_grad(p), p).clone() for name, p in engine.module.named_parameters()}
    values = [None] * world_size
    dist.all_gather_object(values, step.value)
    del engine
    if rank != 0:
        return None

    ref_value, ref_grads = reference(model_dir, scenario)
    mismatched, worst, atol = gradient_mismatch(grads, ref_grads)
    norm = lambda gs: torch.sqrt(sum((g.double() ** 2).sum() for g in gs)).item()  # noqa: E731
    return {
        "parameters": len(ref_grads),
        "mismatched": mismatched,
        "worst": worst,  # (max over entries of (|diff| - rtol |ref|) / atol, where); <= 1: all entries match
        "atol": atol,
        "grad_norm_ratio": norm(grads.values()) / norm(ref_grads.values()),
        "values": values,
        "reference_value": ref_value,
        "per_task_kind": step.per_task_kind,
    }


def schedule_lists(world_size: int) -> dict[str, list[list[list[str]]]]:
    """Every rank's assign_tasks output for 50 steps, gathered: [step][rank] -> list of task names."""
    weights = {"retrieval_msmarco": 3.0, "sts_b": 1.0}
    gathered = {}
    for mode in ("balanced", "random_task"):
        per_step = []
        for step in range(50):
            lists = [None] * world_size
            dist.all_gather_object(lists, assign_tasks(step, world_size, weights, seed=7, mode=mode))
            per_step.append(lists)
        gathered[mode] = per_step
    return gathered


def main(rank: int, world_size: int, port: int, model_dir: str, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel("WARNING")
    deepspeed.init_distributed(dist_backend="gloo")
    results = {"scenarios": {s.name: run_scenario(model_dir, s) for s in scenarios(world_size)}}
    results["schedule"] = schedule_lists(world_size)
    if rank == 0:
        Path(out_dir, "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
