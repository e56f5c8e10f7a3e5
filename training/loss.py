"""Training losses: InfoNCE, CoSENT, Matryoshka averaging and the cross-GPU batch balance (CBB) loss.

The CBB loss (Conan-embedding, Li et al. 2024, §2.3) puts every task into every optimizer step. A schedule
(training/schedule.py) gives each rank one data set for the step; a retrieval or classification data set
is a retrieval term, an STS data set a CoSENT term. With Q the retrieval queries of all ranks (counted once
per rank that holds them), S the STS ranks and d over the Matryoshka sizes:

    L = mean_d [ (1/Q) sum_{queries i} -log( e^{s+_i/t} / sum_{c in C_i} e^{s_ic/t} )
                 + beta * (1/S) sum_{STS ranks r} CoSENT(batch of r) ]

C_i, the candidates of query i (its own positive always among them), depends on how the retrieval ranks
share their hard negatives (loss.cbb_negatives):

  shared_queries  the paper's Eq. 3. The N ranks given a data set at a step hold the SAME queries and
                  positives, and each a different slice of every query's hard negatives (n per rank; the
                  sampler gives the r-th rank the r-th group of n of the query's window). C_i is the
                  query's positive and the N x n hard negatives of its N ranks; with `in_batch` also the
                  other queries' positives of its batch (off in Eq. 3). Each of the N ranks encodes the
                  query (with its own dropout) and contributes one term, so L averages the N copies; with
                  dropout off they are equal and L is Eq. 3 exactly. Each STS rank keeps its own, larger
                  batch.
  gathered        the cross-GPU gather of FlagEmbedding and sentence-transformers: each retrieval rank
                  holds queries of its own, and C_i is the union over all retrieval ranks of the positives
                  (the query's own and the in-batch ones) and all hard negatives; the query meets n hard
                  negatives of its own and the others' as in-batch negatives.

Queries are normalised by the global count Q, so a rank with more queries weighs more, exactly as if one
process held the union. Retrieval ranks may have different numbers of queries and of hard negatives
(sizes are exchanged first and the gathered buffers padded); ranks sharing queries must agree on both,
and on the queries themselves (their text keys are compared when given: the trainer gives them).

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
ranks' queries is lost); ranks sharing a data set drawing different queries or the same slice of negatives.

Masks (candidates left out of a query's denominator; never its own positive):
- Same label (classification data, always): a candidate of the query's own label, another query's
  positive or a negative drawn for another query, is a positive, not a negative. The batch carries each
  passage's label key (RetrievalEmbeddings.label_keys, negative_label_keys; -1 for unlabelled text).
- In-batch false negatives (loss.false_negative_margin = m, off by default). A batch of thousands of
  queries holds candidates that are in fact relevant to a query: another query's positive (SciFact's
  claims often cite the same abstract), a hard negative that is a copy of the positive. With m set, a
  candidate c of query i is left out when s_ic > s_ii + m (s_ii: the query's score with its own positive),
  or when c's text equals the text of i's positive (the mask of Qwen3-Embedding, Zhang et al. 2025).
  Scores are those of the full-size embeddings, computed without gradient on the gathered candidates of
  all ranks, and the same mask applies at every Matryoshka size; texts are compared through keys
  (RetrievalEmbeddings.positive_keys, negative_keys: a hash of each passage's token ids,
  training/grad_cache.text_keys) gathered with the embeddings, so two texts are equal when the model sees
  the same tokens. StepLoss.masked counts the (query, candidate) pairs it left out of C_i.
Every rank builds the same masks from the same gathered values, so the loss stays one global L.

Figures. StepLoss.negative_scores holds, per local query, its score with each of its own hard negatives
(shared_queries: all N x n, in the order of the ranks sharing it), which the dynamic-negatives rule
records; StepLoss.scores the mean positive and hard-negative score per data set (the paper's Fig. 2 view).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    # How the retrieval ranks of a step share hard negatives (module docstring): "gathered", every rank its
    # own queries and every query contrasted with all ranks' positives and hard negatives (the cross-GPU
    # gather of other toolkits); "shared_queries", the ranks given a data set hold the same queries, each a
    # different slice of their hard negatives, so a query meets the N x n negatives of its N ranks
    # (Conan-embedding's Eq. 3).
    cbb_negatives: Literal["gathered", "shared_queries"] = "gathered"
    # shared_queries only: also contrast each query with the other queries' positives of its batch (Eq. 3: off).
    in_batch: bool = False


@dataclass
class RetrievalEmbeddings:
    """One rank's retrieval batch, L2-normalised."""

    query: Tensor  # [n, D]
    positive: Tensor  # [n, D]
    negatives: Tensor  # [n, m, D], m >= 0 (m = 0: in-batch negatives only)
    # Text identity of each passage (int64, equal for equal texts), needed with false_negative_margin.
    positive_keys: Tensor | None = None  # [n]
    negative_keys: Tensor | None = None  # [n, m]
    # Label key of each passage (classification; -1: no label): candidates of a query's label are left out.
    label_keys: Tensor | None = None  # [n], the queries' labels (their positives share them)
    negative_label_keys: Tensor | None = None  # [n, m]
    # Text identity of each query: ranks sharing a data set's queries check that they hold the same ones.
    query_keys: Tensor | None = None  # [n]


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
    # [n, m] (shared_queries: [n, N x m]) detached similarity of each local query with its own hard negatives
    negative_scores: Tensor | None
    masked: int | None = None  # with false_negative_margin: (query, candidate) pairs masked this step, all ranks
    # Per data set trained for retrieval this step: (mean positive score, mean score of the queries' own hard
    # negatives or None without any), full-size embeddings, all ranks (identical on every rank).
    scores: dict[str, tuple[float, float | None]] | None = None


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
    rank_groups: list[str] | None = None,
) -> StepLoss:
    """This rank's share of the CBB loss for one optimizer step (see the module docstring).

    rank_kinds: the loss kind of every rank; rank_groups: the data set of every rank (the schedule's
    assignment), which decides who shares queries under shared_queries (default: each rank its own).
    Collective: every rank of the default process group must call it at the same step, with the same
    rank_kinds and rank_groups. Works without torch.distributed initialised (one rank).
    """
    world_size, rank = _world(world_size)
    _check_kinds(local, rank_kinds, world_size, rank)
    rank_groups = rank_groups if rank_groups is not None else [f"rank {r}" for r in range(world_size)]
    if len(rank_groups) != world_size:
        raise ValueError(f"rank_groups has {len(rank_groups)} entries for {world_size} ranks: {rank_groups}")
    num_retrieval, num_sts = rank_kinds.count("retrieval"), rank_kinds.count("sts")

    full_dim = (local.query if isinstance(local, RetrievalEmbeddings) else local.first).shape[-1]
    sizes = matryoshka_sizes(cfg, full_dim)
    masking = cfg.false_negative_margin is not None
    shared = cfg.cbb_negatives == "shared_queries"
    own_sts_loss = None
    # Scored in float32 whatever the training dtype: logits / 0.02 are too coarse in bf16.
    if isinstance(local, RetrievalEmbeddings):
        query, positive = local.query.float(), local.positive.float()
        negatives = local.negatives.float().reshape(-1, full_dim)
        if masking and (local.positive_keys is None or local.negative_keys is None):
            raise ValueError("false_negative_margin needs the passages' text keys (positive_keys, negative_keys)")
        ints = _passage_ints(local)
        flags = [local.label_keys is not None, local.query_keys is not None]
    else:  # an STS rank takes part in the gathers with no rows
        query = positive = negatives = local.first.new_zeros(0, full_dim, dtype=torch.float32)
        ints = torch.zeros(0, dtype=torch.int64, device=query.device)
        flags = [False, False]
        first, second = local.first.float(), local.second.float()
        own_sts_loss = sum(
            cosent(truncate(first, d), truncate(second, d), local.score, cfg.cosent_scale) for d in sizes
        ) / len(sizes)

    # Exchange the sizes (for padding), what each rank carries and the STS values (for logging).
    own_meta = [len(query), len(negatives), full_dim, own_sts_loss.item() if own_sts_loss is not None else 0.0,
                *map(float, flags)]
    meta = _all_gather_rows(torch.tensor([own_meta], dtype=torch.float64, device=query.device), world_size)
    sizes_of_rank = [(int(n), int(k)) for n, k in meta[:, :2].tolist()]
    if any(int(d) != full_dim for d in meta[:, 2].tolist()):
        raise ValueError(f"embedding sizes differ across ranks: {[int(d) for d in meta[:, 2].tolist()]}")
    retrieval_ranks = [r for r in range(world_size) if rank_kinds[r] == "retrieval"]
    any_labels = any(meta[r, 4].item() for r in retrieval_ranks)
    all_query_keys = bool(retrieval_ranks) and all(meta[r, 5].item() for r in retrieval_ranks)

    per_task_kind: dict[str, float] = {}
    loss = query.new_zeros(())
    masked, scores = (0 if masking else None), None
    negative_scores = None
    if num_retrieval:
        all_query, all_positive, all_negatives = _gather_retrieval(
            query, positive, negatives, sizes_of_rank, world_size, rank
        )
        layout = _Layout(sizes_of_rank, rank_kinds, rank_groups, query.device)
        if shared:
            layout.check_shared(rank_groups)
        gathered_ints = (_gather_ints(ints, sizes_of_rank, world_size) if masking or any_labels or
                         (shared and all_query_keys) else None)
        if shared and all_query_keys:
            layout.check_same_queries(gathered_ints["query"], rank_groups)
        own_negatives = layout.own_negatives(shared)  # [Q, K]: each query's own hard negatives
        excluded = None
        if shared:
            excluded = ~torch.cat([layout.allowed_positives(cfg.in_batch),
                                   own_negatives], dim=1)
        if any_labels:
            labels = gathered_ints["positive_label"]
            candidate_labels = torch.cat([labels, gathered_ints["negative_label"]])
            same_label = (candidate_labels[None, :] == labels[:, None]) & (labels[:, None] >= 0)
            excluded = same_label if excluded is None else excluded | same_label
        if masking:
            false_negatives = false_negative_mask(all_query, all_positive, all_negatives,
                                                  gathered_ints["positive_text"], gathered_ints["negative_text"],
                                                  cfg.false_negative_margin)
            masked = int((false_negatives & ~excluded).sum()) if excluded is not None else int(false_negatives.sum())
            excluded = false_negatives if excluded is None else excluded | false_negatives
        if excluded is not None:
            excluded.fill_diagonal_(False)  # the first Q columns are the positives: column i is query i's own
        retrieval_loss = sum(
            info_nce(truncate(all_query, d), truncate(all_positive, d), truncate(all_negatives, d), cfg.temperature,
                     excluded)
            for d in sizes
        ) / len(sizes)
        per_task_kind["retrieval"] = retrieval_loss.item()
        loss = loss + retrieval_loss
        scores = layout.score_means(all_query, all_positive, all_negatives, own_negatives)
        if isinstance(local, RetrievalEmbeddings):
            negative_scores = layout.local_negative_scores(rank, all_query, all_negatives, own_negatives)
    if num_sts:
        sts_values = [meta[r, 3].item() for r in range(world_size) if rank_kinds[r] == "sts"]
        per_task_kind["sts"] = sum(sts_values) / num_sts
        if own_sts_loss is not None:
            loss = loss + cfg.cbb_beta * own_sts_loss / num_sts

    value = per_task_kind.get("retrieval", 0.0) + cfg.cbb_beta * per_task_kind.get("sts", 0.0)
    return StepLoss(loss=world_size * loss, value=value, per_task_kind=per_task_kind, negative_scores=negative_scores,
                    masked=masked, scores=scores)


class _Layout:
    """Where each gathered row comes from: the rank, the data set and the query index within the rank of
    every query (= positive, Q rows) and every hard negative (K rows), in _gather_retrieval's order."""

    def __init__(self, sizes_of_rank: list[tuple[int, int]], rank_kinds: list[str], rank_groups: list[str], device):
        self.sizes_of_rank, self.rank_kinds = sizes_of_rank, rank_kinds
        group_number = {name: i for i, name in enumerate(dict.fromkeys(rank_groups))}
        self.group_names = list(group_number)
        q_rank, q_index, n_rank, n_index = [], [], [], []
        for r, (n, k) in enumerate(sizes_of_rank):
            m = k // n if n else 0
            q_rank += [r] * n
            q_index += list(range(n))
            n_rank += [r] * k
            n_index += [i for i in range(n) for _ in range(m)]
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
        self.q_rank, self.q_index = as_tensor(q_rank), as_tensor(q_index)
        self.n_rank, self.n_index = as_tensor(n_rank), as_tensor(n_index)
        groups = as_tensor([group_number[g] for g in rank_groups])
        self.q_group = groups[self.q_rank] if len(q_rank) else self.q_rank
        self.n_group = groups[self.n_rank] if len(n_rank) else self.n_rank

    def ranks_of(self, rank_groups: list[str], group: str) -> list[int]:
        return [r for r, g in enumerate(rank_groups) if g == group and self.rank_kinds[r] == "retrieval"]

    def check_shared(self, rank_groups: list[str]) -> None:
        """Ranks sharing a data set's queries must hold as many queries and hard negatives as each other."""
        for group in dict.fromkeys(g for r, g in enumerate(rank_groups) if self.rank_kinds[r] == "retrieval"):
            ranks = self.ranks_of(rank_groups, group)
            shapes = {self.sizes_of_rank[r] for r in ranks}
            if len(shapes) > 1:
                raise ValueError(f"the ranks {ranks} sharing the queries of {group!r} hold different batches "
                                 f"((queries, hard negatives) per rank: {[self.sizes_of_rank[r] for r in ranks]})")

    def check_same_queries(self, query_keys: Tensor, rank_groups: list[str]) -> None:
        offsets = [0]
        for n, _ in self.sizes_of_rank:
            offsets.append(offsets[-1] + n)
        for group in dict.fromkeys(g for r, g in enumerate(rank_groups) if self.rank_kinds[r] == "retrieval"):
            ranks = self.ranks_of(rank_groups, group)
            first = query_keys[offsets[ranks[0]]:offsets[ranks[0] + 1]]
            for r in ranks[1:]:
                if not torch.equal(query_keys[offsets[r]:offsets[r + 1]], first):
                    raise RuntimeError(f"ranks {ranks[0]} and {r} share the queries of {group!r} at this step but "
                                       "hold different ones (loss.cbb_negatives=shared_queries needs the sampler "
                                       "to give them the same rows)")

    def allowed_positives(self, in_batch: bool) -> Tensor:
        """[Q, Q]: each query's own positive, and with in_batch the other positives of its rank's batch."""
        own = torch.eye(len(self.q_rank), dtype=torch.bool, device=self.q_rank.device)
        return own | (self.q_rank[:, None] == self.q_rank[None, :]) if in_batch else own

    def own_negatives(self, shared: bool) -> Tensor:
        """[Q, K]: the hard negatives of each query: those of the same query on every rank sharing it, or
        (gathered) those of the query on its own rank."""
        same_index = self.q_index[:, None] == self.n_index[None, :]
        if shared:
            return same_index & (self.q_group[:, None] == self.n_group[None, :])
        return same_index & (self.q_rank[:, None] == self.n_rank[None, :])

    def score_means(self, query: Tensor, positive: Tensor, negatives: Tensor,
                    own_negatives: Tensor) -> dict[str, tuple[float, float | None]]:
        with torch.no_grad():
            positive_scores = (query * positive).sum(-1)
            negative_scores = query @ negatives.T
            means = {}
            for number, name in enumerate(self.group_names):
                rows = self.q_group == number
                if not rows.any():
                    continue
                used = own_negatives & rows[:, None]
                means[name] = (positive_scores[rows].mean().item(),
                               negative_scores[used].mean().item() if used.any() else None)
        return means

    def local_negative_scores(self, rank: int, query: Tensor, negatives: Tensor, own_negatives: Tensor) -> Tensor:
        """[n, W]: this rank's queries against their own hard negatives, in gathered order (by rank, then slot)."""
        with torch.no_grad():
            rows = self.q_rank == rank
            own = own_negatives[rows]
            width = int(own.sum(1)[0]) if len(own) else 0
            scores = query[rows] @ negatives.T
            return scores[own].reshape(int(rows.sum()), width)


def _passage_ints(local: RetrievalEmbeddings) -> Tensor:
    """Integers that travel with a rank's passages: text keys of its positives and negatives, label keys of
    its positives and negatives, text keys of its queries (zeros or -1 where it has none)."""
    n, m = local.negatives.shape[:2]
    device = local.query.device

    def flat(value: Tensor | None, count: int, missing: int) -> Tensor:
        if value is None:
            return torch.full((count,), missing, dtype=torch.int64, device=device)
        return value.reshape(-1).to(device=device, dtype=torch.int64)

    return torch.cat([flat(local.positive_keys, n, 0), flat(local.negative_keys, n * m, 0),
                      flat(local.label_keys, n, -1), flat(local.negative_label_keys, n * m, -1),
                      flat(local.query_keys, n, 0)])


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


def _gather_ints(ints: Tensor, sizes_of_rank: list[tuple[int, int]], world_size: int) -> dict[str, Tensor]:
    """_passage_ints of all ranks, each kind in the order of _gather_retrieval: every rank's positives'
    (queries'), then every rank's negatives'."""
    if world_size > 1:
        rows = max(3 * n + 2 * k for n, k in sizes_of_rank)
        padded = torch.cat([ints, ints.new_zeros(rows - len(ints))])
        gathered = _all_gather_rows(padded[None], world_size)
        per_rank = [gathered[r, : 3 * n + 2 * k] for r, (n, k) in enumerate(sizes_of_rank)]
    else:
        per_rank = [ints]
    parts: dict[str, list[Tensor]] = {name: [] for name in
                                      ("positive_text", "negative_text", "positive_label", "negative_label", "query")}
    for part, (n, k) in zip(per_rank, sizes_of_rank):
        for name, piece in zip(parts, part.split([n, k, n, k, n])):
            parts[name].append(piece)
    return {name: torch.cat(pieces) for name, pieces in parts.items()}
