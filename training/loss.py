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
(It is also what lets training/grad_cache.py take this loss's gradient with respect to cached
embeddings on every rank with no collective.)
Classic mistakes, each caught by tests/test_cbb_gradients.py: dropping the factor W
(gradients W times too small); a gradient-keeping gather (whose backward already sums all ranks'
gradients) plus the full global loss times W on every rank (W times too large); a gather without
gradient plus only the local queries' loss (the loss value is right, the gradient through other
ranks' queries is lost).

In-batch false negatives (loss.false_negative_margin = m, off by default). A batch of thousands of
queries holds candidates that are in fact relevant to a query: another query's positive (SciFact's
claims often cite the same abstract), a hard negative that is a copy of the positive. With m set, a
candidate c of query i other than its own positive is left out of the query's denominator when
s_ic > s_ii + m (s_ii: the query's score with its own positive), or when c's text equals the text of
i's positive (the mask of Qwen3-Embedding, Zhang et al. 2025). Scores are those of the full-size
embeddings, computed without gradient on the gathered candidates of all ranks, and the same mask
applies at every Matryoshka size; texts are compared through keys (RetrievalEmbeddings.positive_keys,
negative_keys: a hash of each passage's token ids, training/grad_cache.text_keys) gathered with the
embeddings, so two texts are equal when the model sees the same tokens. Every rank builds the same
mask from the same gathered values, so the loss stays one global L; StepLoss.masked counts the
(query, candidate) pairs left out.
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
    # In-batch false negatives: a candidate other than the query's own positive that scores above the
    # positive's score plus this margin, or whose text equals the positive's, is left out of the query's
    # denominator (module docstring). Cosine units (Qwen3-Embedding uses 0.1); None: no masking.
    false_negative_margin: float | None = None


@dataclass
class RetrievalEmbeddings:
    """One rank's retrieval batch, L2-normalised."""

    query: Tensor  # [n, D]
    positive: Tensor  # [n, D]
    negatives: Tensor  # [n, m, D], m >= 0 (m = 0: in-batch negatives only)
    # Text identity of each passage (int64, equal for equal texts), needed with false_negative_margin.
    positive_keys: Tensor | None = None  # [n]
    negative_keys: Tensor | None = None  # [n, m]


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
    masked: int | None = None  # with false_negative_margin: (query, candidate) pairs masked this step, all ranks


def info_nce(query: Tensor, positive: Tensor, negatives: Tensor | None = None, temperature: float = 0.02,
             mask: Tensor | None = None) -> Tensor:
    """Mean over queries of -log softmax(s/t) at the query's own positive.

    query, positive: [Q, D]; negatives: [K, D], a pool shared by all queries. The candidates of
    query i are all Q positives (its own plus the in-batch ones) and all K negatives. mask: [Q, Q + K]
    bool, True where a candidate is left out of that query's denominator (never its own positive).
    """
    candidates = positive if negatives is None else torch.cat([positive, negatives])
    logits = query @ candidates.T / temperature
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(query), device=query.device))


def false_negative_mask(query: Tensor, positive: Tensor, negatives: Tensor, positive_keys: Tensor,
                        negative_keys: Tensor, margin: float) -> Tensor:
    """[Q, Q + K] bool: the candidates (positives, then negatives) left out of each query's denominator:
    those scoring above the query's own positive plus `margin`, and those whose key equals the key of the
    query's positive; never the query's own positive. Computed without gradient."""
    with torch.no_grad():
        candidates = torch.cat([positive, negatives])
        scores = query @ candidates.T
        own = (query * positive).sum(-1, keepdim=True)
        mask = scores > own + margin
        mask |= torch.cat([positive_keys, negative_keys])[None, :] == positive_keys[:, None]
        mask.fill_diagonal_(False)  # the first Q columns are the positives: column i is query i's own
    return mask


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
    masking = cfg.false_negative_margin is not None
    if isinstance(local, RetrievalEmbeddings):
        query, positive = local.query.float(), local.positive.float()
        negatives = local.negatives.float().reshape(-1, full_dim)
        negative_scores = torch.einsum("nd,nmd->nm", local.query, local.negatives).detach()
        own_sts_loss = None
        if masking:
            if local.positive_keys is None or local.negative_keys is None:
                raise ValueError("false_negative_margin needs the passages' text keys (positive_keys, negative_keys)")
            keys = torch.cat([local.positive_keys.reshape(-1), local.negative_keys.reshape(-1)]).to(torch.int64)
    else:  # an STS rank takes part in the gathers with no rows
        query = positive = negatives = local.first.new_zeros(0, full_dim, dtype=torch.float32)
        negative_scores = None
        keys = torch.zeros(0, dtype=torch.int64, device=query.device)
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
    mask, masked = None, (0 if masking else None)
    if num_retrieval:
        all_query, all_positive, all_negatives = _gather_retrieval(
            query, positive, negatives, sizes_of_rank, world_size, rank
        )
        if masking:
            all_keys = _gather_keys(keys, sizes_of_rank, world_size)
            num_queries = len(all_query)
            mask = false_negative_mask(all_query, all_positive, all_negatives, all_keys[:num_queries],
                                       all_keys[num_queries:], cfg.false_negative_margin)
            masked = int(mask.sum())
        retrieval_loss = sum(
            info_nce(truncate(all_query, d), truncate(all_positive, d), truncate(all_negatives, d), cfg.temperature,
                     mask)
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
    return StepLoss(loss=world_size * loss, value=value, per_task_kind=per_task_kind, negative_scores=negative_scores,
                    masked=masked)


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


def _gather_keys(keys: Tensor, sizes_of_rank: list[tuple[int, int]], world_size: int) -> Tensor:
    """Text keys of all ranks' candidates in the order of _gather_retrieval: every rank's positives,
    then every rank's negatives (each rank's keys: its n positives, then its k negatives)."""
    if world_size > 1:
        rows = max(n + k for n, k in sizes_of_rank)
        padded = torch.cat([keys, keys.new_zeros(rows - len(keys))])
        gathered = _all_gather_rows(padded[None], world_size)
        per_rank = [gathered[r, : n + k] for r, (n, k) in enumerate(sizes_of_rank)]
    else:
        per_rank = [keys]
    positives = [part[:n] for part, (n, _) in zip(per_rank, sizes_of_rank)]
    negatives = [part[n:] for part, (n, _) in zip(per_rank, sizes_of_rank)]
    return torch.cat(positives + negatives)
