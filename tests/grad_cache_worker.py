"""Rank processes for tests/test_grad_cache.py (started with torch.multiprocessing, spawn).

Each case wraps a tiny BERT (dropout on) in a real DeepSpeed engine (gloo, torch AdamW), seeds every
rank's random state, runs training.grad_cache.backward_step on the rank's batch (the trainer's typed
RetrievalBatch / STSBatch) and reads every parameter's full averaged gradient. Rank 0 then computes
the gradient without any cache in one process: the same model in train mode, each rank's random state
seeded alike, its groups encoded with gradient in the same chunks (so dropout draws the same masks),
the CBB loss L on the union of all ranks' embeddings, one backward. The cached gradient must equal it.

Variants inject mistakes into the cached step (tests show the comparison catches them): no replay of
the random state, every chunk's backward scaled as a gradient-accumulation micro-batch, every chunk's
backward at DeepSpeed's accumulation boundary.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F

import training.grad_cache as grad_cache
from deepspeed.runtime.engine import DeepSpeedEngine
from cbb_worker import Batch, Scenario, _or_zeros, gradient_mismatch, rank_inputs
from embedlib.encoder import Encoder
from training.data import RetrievalBatch, STSBatch
from training.loss import LossConfig, RetrievalEmbeddings, cbb_step_loss, cosent, false_negative_mask, info_nce, truncate

OUTPUT_DIM = 24  # the tiny BERT's hidden size is 32
CHUNK = 2
BF16_REL_ERROR = 0.03  # bf16: |g - ref| / |ref| over the whole model (measured about 0.5%)


@dataclass
class Case:
    name: str
    batches: list[Batch]  # one per rank
    zero_stage: int = 2
    chunk_size: int | None = CHUNK
    loss_cfg: LossConfig = field(default_factory=LossConfig)
    variant: str = "cache"  # or an injected mistake: no_replay, chunk_scaled, every_backward_a_boundary
    bf16: bool = False
    checkpointing: bool = False


def cases(world_size: int) -> list[Case]:
    # Unequal retrieval batches (queries and negatives) and, with 2+ ranks, an STS rank: the ranks' chunk
    # counts differ (at 3 ranks, chunks of 2: 3, 6 and 6 forwards), so padding is exercised.
    retrieval = [Batch("retrieval", queries=2 + r, negatives=1 + r % 2) for r in range(world_size)]
    mixed = list(retrieval)
    if world_size >= 2:
        mixed[1] = Batch("sts", pairs=5)
    else:
        mixed = [Batch("sts", pairs=5)]  # one rank: an STS-only step instead
    matryoshka = LossConfig(matryoshka_dims=[12, OUTPUT_DIM])
    found = []
    for stage in (1, 2, 3):
        found += [Case(f"retrieval_zero{stage}", retrieval, stage),
                  Case(f"mixed_zero{stage}", mixed, stage),
                  Case(f"matryoshka_zero{stage}", mixed if world_size > 1 else retrieval, stage, loss_cfg=matryoshka)]
    if world_size == 2:
        margin = LossConfig(false_negative_margin=0.01, matryoshka_dims=[12, OUTPUT_DIM])
        found += [
            # One chunk per group: the cached step encodes as the plain step does (compared with the plain
            # engine step in the test as well as with the reference).
            Case("whole_batch_chunk_zero2", mixed, 2, chunk_size=64),
            Case("plain_zero2", mixed, 2, chunk_size=None),
            Case("checkpointing_zero2", mixed, 2, checkpointing=True),
            Case("checkpointing_zero3", mixed, 3, checkpointing=True),
            Case("checkpointing_plain_zero3", mixed, 3, chunk_size=None, checkpointing=True),
            Case("false_negatives_zero3", retrieval, 3, loss_cfg=margin),
            Case("bf16_zero1", mixed, 1, bf16=True),
            Case("bf16_zero2", mixed, 2, bf16=True),
            Case("bf16_zero3", mixed, 3, bf16=True),
            Case("bf16_zero2_no_replay", mixed, 2, bf16=True, variant="no_replay"),
            Case("no_replay_zero2", mixed, 2, variant="no_replay"),
            Case("no_replay_zero3", retrieval, 3, variant="no_replay"),
            Case("chunk_scaled_zero2", mixed, 2, variant="chunk_scaled"),
            Case("every_backward_a_boundary_zero1", mixed, 1, variant="every_backward_a_boundary"),
            Case("every_backward_a_boundary_zero2", mixed, 2, variant="every_backward_a_boundary"),
        ]
    return found


def load_encoder(model_dir: str, checkpointing: bool = False) -> Encoder:
    """The production Encoder, the same on every rank and in the reference, with dropout on."""
    torch.manual_seed(0)
    encoder = Encoder.from_pretrained(model_dir, pooling="mean", output_dim=OUTPUT_DIM).train()
    if checkpointing:
        encoder.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return encoder


def step_batch(case: Case, rank: int) -> RetrievalBatch | STSBatch:
    """The trainer's typed batch of a rank, from the data of tests/cbb_worker.py, each group padded to
    its longest text as the tokenizer pads a batch."""
    inputs = rank_inputs(Scenario(case.name, case.batches), rank)
    batch = case.batches[rank]
    common = {"step": 0, "task": batch.kind, "assignment": tuple(b.kind for b in case.batches), "cursors_after": []}
    if batch.kind == "sts":
        return STSBatch(**common, first=as_padded(inputs["first"]), second=as_padded(inputs["second"]),
                        score=inputs["score"])
    passages = {k: torch.cat([inputs["positive"][k], inputs["negatives"][k]]) for k in inputs["query"]}
    if case.name.startswith("false_negatives"):
        plant_duplicates(passages, case)
    return RetrievalBatch(**common, query=as_padded(inputs["query"]), passages=as_padded(passages),
                          num_negatives=batch.negatives, rows=tuple(range(batch.queries)))


def as_padded(tokens: dict) -> dict:
    return grad_cache.split(tokens, len(tokens["input_ids"]))[0]


def plant_duplicates(passages: dict, case: Case) -> None:
    """Every rank's last negative is a copy of rank 0's first positive: masked for rank 0's first query
    by text identity (the copy's score equals the positive's, so the margin alone would not)."""
    source = rank_inputs(Scenario(case.name, case.batches), 0)["positive"]
    for key in passages:
        passages[key][-1] = source[key][0]


def seed_of(rank: int) -> int:
    return 1234 + 17 * rank


def run_case(model_dir: str, case: Case) -> tuple[dict | None, dict[str, torch.Tensor]]:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = load_encoder(model_dir, case.checkpointing)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": case.zero_stage}, "bf16": {"enabled": case.bf16}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config=ds_config)
    batch = step_batch(case, rank)
    kinds = [b.kind for b in case.batches]
    torch.manual_seed(seed_of(rank))
    with injected(case.variant):
        out = grad_cache.backward_step(engine, batch, kinds, case.loss_cfg, case.chunk_size)
    grads = {name: _or_zeros(safe_get_full_grad(p), p).float().clone() for name, p in engine.module.named_parameters()}
    values = [None] * world_size
    dist.all_gather_object(values, (out.value, out.masked))
    engine.destroy()
    del engine
    if rank != 0:
        return None, grads
    ref_value, ref_grads = reference(model_dir, case)
    return {**compare(grads, ref_grads), "values": values, "reference_value": ref_value}, grads


@contextlib.contextmanager
def injected(variant: str):
    """The cached step with a classic mistake put in."""
    if variant == "cache":
        yield
    elif variant == "no_replay":  # pass 3 draws fresh dropout masks
        with mock.patch.object(grad_cache.RandomState, "restore", lambda self: None):
            yield
    elif variant == "chunk_scaled":  # each chunk's backward divided by the number of chunks, as a micro-batch mean
        real_count, real_backward, count = grad_cache.max_over_ranks, DeepSpeedEngine.backward, []

        def max_over_ranks(value, device):
            count.append(real_count(value, device))
            return count[-1]

        def backward(self, loss, **kwargs):
            return real_backward(self, loss / count[-1], **kwargs)

        with mock.patch.object(grad_cache, "max_over_ranks", max_over_ranks), \
                mock.patch.object(DeepSpeedEngine, "backward", backward):
            yield
    elif variant == "every_backward_a_boundary":  # engine.backward per chunk with the flags left alone
        with mock.patch.object(DeepSpeedEngine, "set_gradient_accumulation_boundary", lambda self, flag: None):
            yield
    else:
        raise ValueError(variant)


def reference(model_dir: str, case: Case) -> tuple[float, dict[str, torch.Tensor]]:
    """L without any cache in one process: every rank's groups encoded with gradient, in the rank's
    chunks and from the rank's seed (the same dropout masks), the loss on the union, one backward."""
    model = load_encoder(model_dir)  # no checkpointing: it must not change the gradient
    if case.bf16:
        model = model.to(torch.bfloat16)
    cfg = case.loss_cfg
    retrieval, sts = [], []
    for rank, spec in enumerate(case.batches):
        batch = step_batch(case, rank)
        torch.manual_seed(seed_of(rank))
        encoded = []
        for group in grad_cache.groups_of(batch):
            chunks = grad_cache.split(group, case.chunk_size) if case.chunk_size else [group]
            encoded.append(torch.cat([model(**chunk) for chunk in chunks]))
        embeddings = grad_cache.embeddings_of(batch, encoded, LossConfig(false_negative_margin=0.0))
        (retrieval if spec.kind == "retrieval" else sts).append(embeddings)
    dims = cfg.matryoshka_dims or [OUTPUT_DIM]
    loss = torch.zeros(())
    mask = None
    if retrieval:
        query = torch.cat([e.query for e in retrieval]).float()
        positive = torch.cat([e.positive for e in retrieval]).float()
        negatives = torch.cat([e.negatives.reshape(-1, OUTPUT_DIM) for e in retrieval]).float()
        if cfg.false_negative_margin is not None:
            keys = torch.cat([e.positive_keys for e in retrieval] + [e.negative_keys.reshape(-1) for e in retrieval])
            mask = false_negative_mask(query, positive, negatives, keys[: len(query)], keys[len(query):],
                                       cfg.false_negative_margin)
    for d in dims:
        if retrieval:
            loss = loss + info_nce(truncate(query, d), truncate(positive, d), truncate(negatives, d), cfg.temperature,
                                   mask) / len(dims)
        for e in sts:
            sts_loss = cosent(truncate(e.first.float(), d), truncate(e.second.float(), d), e.score, cfg.cosent_scale)
            loss = loss + cfg.cbb_beta * sts_loss / len(sts) / len(dims)
    loss.backward()
    return loss.item(), {name: _or_zeros(p.grad, p).float() for name, p in model.named_parameters()}


def compare(grads: dict[str, torch.Tensor], ref_grads: dict[str, torch.Tensor]) -> dict:
    mismatched, worst, _ = gradient_mismatch(grads, ref_grads)
    flat = lambda gs: torch.cat([g.double().flatten() for g in gs])  # noqa: E731
    got, ref = flat(grads[n] for n in ref_grads), flat(ref_grads.values())
    return {"parameters": len(ref_grads), "mismatched": mismatched, "worst": worst,
            "rel_error": ((got - ref).norm() / ref.norm()).item(), "grad_norm_ratio": (got.norm() / ref.norm()).item()}


# ---------------------------------------------------------------------------------------------------
# The false-negative mask across ranks, on hand-made embeddings


def mask_check() -> dict:
    """Rank r holds 2 queries with 1 hard negative each, in 4 dimensions. Planted: rank 1's first
    negative is a copy of rank 0's first positive (same key; same vector, so only the key catches it),
    rank 0's second negative lies close to rank 1's second query (score above its positive's + margin).
    Everything else scores at most the positive's. The loss must equal InfoNCE over the union with
    exactly those (query, candidate) pairs removed by hand."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    e = torch.eye(4)
    unit = lambda v: F.normalize(torch.tensor(v, dtype=torch.float32), dim=-1)  # noqa: E731
    # positives: rank 0: e0, e1; rank 1: e2, e3. Queries near their positives (score 0.8).
    queries = {0: [unit([0.8, 0, 0.6, 0]), unit([0, 0.8, 0, 0.6])], 1: [unit([0.6, 0, 0.8, 0]), unit([0, 0.6, 0, 0.8])]}
    positives = {0: [e[0], e[1]], 1: [e[2], e[3]]}
    # negatives: rank 0: [q0 -> -e0], [q1 -> rank 1's q1 direction, scores 0.96 for it]; rank 1: [q0 -> e0 copy], [q1 -> -e1]
    negatives = {0: [-e[0], unit([0, 0.28, 0, 0.96])], 1: [e[0], -e[1]]}
    keys = {0: ([100, 101], [200, 201]), 1: ([102, 103], [100, 203])}  # rank 1's first negative: key of e0
    margin = 0.1
    local = RetrievalEmbeddings(torch.stack(queries[rank]), torch.stack(positives[rank]),
                                torch.stack(negatives[rank])[:, None], torch.tensor(keys[rank][0]),
                                torch.tensor(keys[rank][1])[:, None])
    out = cbb_step_loss(local, ["retrieval"] * world_size, LossConfig(temperature=0.1, false_negative_margin=margin))
    # By hand on the union: queries Q0..Q3 (rank 0's, then rank 1's), candidates P0..P3, N0..N3.
    q = torch.stack(queries[0] + queries[1])
    candidates = torch.stack(positives[0] + positives[1] + negatives[0] + negatives[1])
    removed = {(0, 6): "rank 1's copy of P0, for Q0 (text identity)",
               (3, 5): "rank 0's near-duplicate of Q3's direction, above P3's score + margin"}
    losses = []
    for i in range(4):
        kept = [c for c in range(8) if (i, c) not in removed]
        logits = q[i] @ candidates[kept].T / 0.1
        losses.append(-(logits[kept.index(i)] - torch.logsumexp(logits, 0)))
    expected = torch.stack(losses).mean().item()
    plain = cbb_step_loss(local, ["retrieval"] * world_size, LossConfig(temperature=0.1))
    return {"value": out.value, "expected": expected, "masked": out.masked, "expected_masked": len(removed),
            "unmasked_value": plain.value, "unmasked_masked": plain.masked}


def main(rank: int, world_size: int, port: int, model_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel("WARNING")
    deepspeed.init_distributed(dist_backend="gloo")
    results, kept = {"cases": {}}, {}
    for case in cases(world_size):
        results["cases"][case.name], grads = run_case(model_dir, case)
        if case.name in ("whole_batch_chunk_zero2", "plain_zero2"):
            kept[case.name] = grads
    if kept:  # one chunk per group against the plain engine step: the same forwards, the same gradient
        results["whole_batch_vs_plain"] = compare(kept["whole_batch_chunk_zero2"], kept["plain_zero2"])
    if world_size == 2:
        results["mask"] = mask_check()
    if rank == 0:
        Path(out_dir, "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def without_padding(rank: int, world_size: int, port: int, model_dir: str) -> None:
    """A mixed ZeRO-2 step whose ranks do not pad their chunk counts (expected to fail)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    case = next(c for c in cases(world_size) if c.name == "mixed_zero2")
    with mock.patch.object(grad_cache, "max_over_ranks", lambda value, device: value):
        run_case(model_dir, case)
    dist.destroy_process_group()
