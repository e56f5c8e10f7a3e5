"""Training losses: InfoNCE, CoSENT, Matryoshka averaging and the cross-GPU batch balance (CBB) loss.

The CBB loss (Conan-embedding, Li et al. 2024) puts every task into every optimizer step. A
schedule (training/schedule.py) gives each rank one task kind for the step. With R the retrieval
ranks, Q = sum of their query counts, S the STS ranks and d over the Matryoshka sizes:

    L = mean_d [ (1/Q) sum_{queries i} -log( e^{s+_i/t} / sum_{c in C} e^{s_ic/t} )
                 + beta * (1/S) sum_{STS ranks r} CoSENT(batch of r) ]

where C, the candidates of every query, is the union over all retrieval ranks of the positives
(the query's own, and the in-batch ones of every other query) and of all hard negatives. So each
query is contrasted with the negatives of all retrieval ranks, and each STS rank keeps its own
(larger) batch. Queries are normalised by the global count Q, so a rank with more queries weighs
more, exactly as if one process held the union. Retrieval ranks may have different numbers of
queries and of hard negatives (sizes are exchanged first and the gathered buffers padded).

Gradient scaling. DeepSpeed (like DDP) averages gradients over the W ranks (its default, every rank
data parallel), so the per-rank losses must satisfy sum_r grad(loss_r) = W * grad(L). Every rank
gathers the retrieval embeddings of all ranks *without* gradient, puts its own live tensors back in
its slice and computes the global retrieval loss: its gradient is exactly the part of grad(L) that
flows through this rank's embeddings. Hence

    loss_r = W * (L_retrieval[own slice live] + beta * CoSENT_r / S)   (CoSENT term on STS ranks only)

A kind with no rank at a step (random_task mode) contributes nothing. All collectives run in the
forward pass, none in backward: an STS rank's loss does not use the gathered tensors, so it would
never run a gradient-keeping gather's backward collective and the retrieval ranks would wait for it.
Classic mistakes, each caught by tests/test_cbb_gradients.py: dropping the factor W
(gradients W times too small); a gradient-keeping gather (whose backward already sums all ranks'
gradients) plus the full global loss times W on every rank (W times too large); a gather without
gradient plus only the local queries' loss (the loss value is right, the gradient through other
ranks' queries is lost).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from embedlib.encoder import truncate_embeddings

LOSS_KINDS = ("retrieval", "sts")


@dataclass
class LossConfig:
    temperature: float = 0.02  # InfoNCE softmax temperature t
    cosent_scale: float = 20.0  # CoSENT scale (the inverse of its temperature)
    cbb_beta: float = 0.8  # weight beta of the STS (CoSENT) term in the CBB loss
    matryoshka_dims: list[int] | None = None  # output sizes the loss is averaged over; None: full dimension only


@dataclass
class RetrievalEmbeddings:
    """One rank's retrieval batch, L2-normalised."""

    query: Tensor  # [n, D]
    positive: Tensor  # [n, D]
    negatives: Tensor  # [n, m, D], m >= 0 (m = 0: in-batch negatives only)


@dataclass
class STSEmbeddings:
    """One rank's STS batch, L2-normalised."""

    first: Tensor  # [b, D]
    second: Tensor  # [b, D]
    score: Tensor  # [b] gold similarity; only its order matters


@dataclass
class StepLoss:
    loss: Tensor  # what this rank hands to engine.backward() (W times its share; do not log it)
    value: float  # the global L, identical on every rank (for logging)
    per_task_kind: dict[str, float]  # global unweighted term of each kind that has ranks this step
    negative_scores: Tensor | None  # [n, m] detached similarity of each local query with its own hard negatives


def info_nce(query: Tensor, positive: Tensor, negatives: Tensor | None = None, temperature: float = 0.02) -> Tensor:
    """Mean over queries of -log softmax(s/t) at the query's own positive.

    query, positive: [Q, D]; negatives: [K, D], a pool shared by all queries. The candidates of
    query i are all Q positives (its own plus the in-batch ones) and all K negatives.
    """
    candidates = positive if negatives is None else torch.cat([positive, negatives])
    logits = query @ candidates.T / temperature
    return F.cross_entropy(logits, torch.arange(len(query), device=query.device))


def cosent(first: Tensor, second: Tensor, score: Tensor, scale: float = 20.0) -> Tensor:
    """CoSENT: log(1 + sum over pairs i, j with score_i > score_j of e^{scale (cos_j - cos_i)}).

    first, second: [b, D] L2-normalised; score: [b]. Penalises every pair the model orders
    differently from the gold scores; ties in the gold scores are not pairs.
    """
    cos = scale * (first * second).sum(-1)
    wrong_way = cos[None, :] - cos[:, None]  # [i, j] = scale * (cos_j - cos_i)
    ordered = score[:, None] > score[None, :]  # i is more similar than j
    return torch.logsumexp(torch.cat([wrong_way.new_zeros(1), wrong_way[ordered]]), dim=0)


def truncate(embeddings: Tensor, dim: int) -> Tensor:
    """Matryoshka: the first `dim` coordinates, renormalised; the full size is returned as is."""
    return embeddings if dim == embeddings.shape[-1] else truncate_embeddings(embeddings, dim)


def matryoshka_sizes(cfg: LossConfig, full_dim: int) -> list[int]:
    sizes = cfg.matryoshka_dims or [full_dim]
    bad = [d for d in sizes if not 0 < d <= full_dim]
    if bad:
        raise ValueError(f"matryoshka_dims {bad} must be between 1 and the embedding size {full_dim}")
    return list(sizes)


def cbb_step_loss(
    local: RetrievalEmbeddings | STSEmbeddings,
    rank_kinds: list[str],
    cfg: LossConfig,
    world_size: int | None = None,
) -> StepLoss:
    """This rank's share of the CBB loss for one optimizer step (see the module docstring).

    Collective: every rank of the default process group must call it at the same step, with the
    same rank_kinds (the schedule's task kinds of all ranks). Works without torch.distributed
    initialised (one rank).
    """
    world_size, rank = _world(world_size)
    _check_kinds(local, rank_kinds, world_size, rank)
    num_retrieval, num_sts = rank_kinds.count("retrieval"), rank_kinds.count("sts")

    full_dim = (local.query if isinstance(local, RetrievalEmbeddings) else local.first).shape[-1]
    sizes = matryoshka_sizes(cfg, full_dim)
    # Scored in float32 whatever the training dtype: logits / 0.02 are too coarse in bf16.
    if isinstance(local, RetrievalEmbeddings):
        query, positive = local.query.float(), local.positive.float()
        negatives = local.negatives.float().reshape(-1, full_dim)
        negative_scores = torch.einsum("nd,nmd->nm", local.query, local.negatives).detach()
        own_sts_loss = None
    else:  # an STS rank takes part in the gathers with no rows
        query = positive = negatives = local.first.new_zeros(0, full_dim, dtype=torch.float32)
        negative_scores = None
        first, second = local.first.float(), local.second.float()
        own_sts_loss = sum(
            cosent(truncate(first, d), truncate(second, d), local.score, cfg.cosent_scale) for d in sizes
        ) / len(sizes)

    # Exchange the sizes (for padding) and the STS values (for logging) of all ranks.
    own_meta = [len(query), len(negatives), full_dim, own_sts_loss.item() if own_sts_loss is not None else 0.0]
    meta = _all_gather_rows(torch.tensor([own_meta], dtype=torch.float64, device=query.device), world_size)
    sizes_of_rank = [(int(n), int(k)) for n, k in meta[:, :2].tolist()]
    if any(int(d) != full_dim for d in meta[:, 2].tolist()):
        raise ValueError(f"embedding sizes differ across ranks: {[int(d) for d in meta[:, 2].tolist()]}")

    per_task_kind: dict[str, float] = {}
    loss = query.new_zeros(())
    if num_retrieval:
        all_query, all_positive, all_negatives = _gather_retrieval(
            query, positive, negatives, sizes_of_rank, world_size, rank
        )
        retrieval_loss = sum(
            info_nce(truncate(all_query, d), truncate(all_positive, d), truncate(all_negatives, d), cfg.temperature)
            for d in sizes
        ) / len(sizes)
        per_task_kind["retrieval"] = retrieval_loss.item()
        loss = loss + retrieval_loss
    if num_sts:
        sts_values = [meta[r, 3].item() for r in range(world_size) if rank_kinds[r] == "sts"]
        per_task_kind["sts"] = sum(sts_values) / num_sts
        if own_sts_loss is not None:
            loss = loss + cfg.cbb_beta * own_sts_loss / num_sts

    value = per_task_kind.get("retrieval", 0.0) + cfg.cbb_beta * per_task_kind.get("sts", 0.0)
    return StepLoss(loss=world_size * loss, value=value, per_task_kind=per_task_kind, negative_scores=negative_scores)


def _world(world_size: int | None) -> tuple[int, int]:
    initialised = dist.is_available() and dist.is_initialized()
    actual, rank = (dist.get_world_size(), dist.get_rank()) if initialised else (1, 0)
    if world_size is not None and world_size != actual:
        raise ValueError(
            f"world_size={world_size} but the default process group has {actual} rank(s)"
            + ("" if initialised else " (torch.distributed is not initialised)")
        )
    return actual, rank


def _check_kinds(local: RetrievalEmbeddings | STSEmbeddings, rank_kinds: list[str], world_size: int, rank: int) -> None:
    if len(rank_kinds) != world_size:
        raise ValueError(f"rank_kinds has {len(rank_kinds)} entries for {world_size} ranks: {rank_kinds}")
    unknown = sorted(set(rank_kinds) - set(LOSS_KINDS))
    if unknown:
        raise ValueError(f"rank_kinds contains unknown kinds {unknown}; known: {list(LOSS_KINDS)}")
    own_kind = "retrieval" if isinstance(local, RetrievalEmbeddings) else "sts"
    if rank_kinds[rank] != own_kind:
        raise ValueError(f"rank {rank} got {own_kind} embeddings but the schedule says {rank_kinds[rank]!r}")
    if isinstance(local, RetrievalEmbeddings):
        n, dim = local.query.shape
        negatives = local.negatives.shape
        negatives_fit = len(negatives) == 3 and (negatives[0], negatives[2]) == (n, dim)
        if n == 0 or local.positive.shape != (n, dim) or not negatives_fit:
            raise ValueError(
                "retrieval embeddings must be query [n, D], positive [n, D], negatives [n, m, D] with n >= 1; got "
                f"{tuple(local.query.shape)}, {tuple(local.positive.shape)}, {tuple(local.negatives.shape)}"
            )
    elif not (
        local.first.ndim == 2 and local.second.shape == local.first.shape and local.score.shape == local.first.shape[:1]
    ):
        raise ValueError(
            "STS embeddings must be first [b, D], second [b, D], score [b]; got "
            f"{tuple(local.first.shape)}, {tuple(local.second.shape)}, {tuple(local.score.shape)}"
        )


def _all_gather_rows(tensor: Tensor, world_size: int) -> Tensor:
    """Concatenation over ranks of a tensor with the same shape on every rank (no gradient)."""
    if world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _gather_retrieval(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor,
    sizes_of_rank: list[tuple[int, int]],
    world_size: int,
    rank: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The union over ranks of queries, positives and negatives, in rank order.

    Other ranks' rows carry no gradient; this rank's rows are its own live tensors, so the
    gradient of a loss on the union flows into this rank's embeddings only.
    """
    if world_size == 1:
        return query, positive, negatives
    rows = max(2 * n + k for n, k in sizes_of_rank)
    packed = torch.cat([query, positive, negatives]).detach()
    packed = torch.cat([packed, packed.new_zeros(rows - len(packed), packed.shape[-1])])
    gathered = _all_gather_rows(packed[None], world_size)
    queries, positives, negative_pools = [], [], []
    for r, (n, k) in enumerate(sizes_of_rank):
        if r == rank:
            q, p, neg = query, positive, negatives
        else:
            q, p, neg = gathered[r, :n], gathered[r, n : 2 * n], gathered[r, 2 * n : 2 * n + k]
        queries.append(q)
        positives.append(p)
        negative_pools.append(neg)
    return torch.cat(queries), torch.cat(positives), torch.cat(negative_pools)
