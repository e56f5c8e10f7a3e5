"""The loss building blocks against hand computations, and cbb_step_loss on one process."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.loss import (
    LossConfig,
    RetrievalEmbeddings,
    STSEmbeddings,
    cbb_step_loss,
    cosent,
    info_nce,
    truncate,
)


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def pair_with_cosine(cos: float) -> tuple[list[float], list[float]]:
    return [1.0, 0.0], [cos, math.sqrt(1 - cos**2)]


def test_info_nce_by_hand():
    query = unit([1, 0], [0, 1])
    positive = unit([1, 0], [0, 1])
    negatives = unit([0.6, 0.8])
    # t = 0.5. Query 1 scores (own positive, in-batch positive, negative) = (1, 0, 0.6) / t.
    first = -math.log(math.exp(2) / (math.exp(2) + math.exp(0) + math.exp(1.2)))
    second = -math.log(math.exp(2) / (math.exp(0) + math.exp(2) + math.exp(1.6)))
    assert info_nce(query, positive, negatives, temperature=0.5).item() == pytest.approx((first + second) / 2, rel=1e-6)
    in_batch_only = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert info_nce(query, positive, temperature=0.5).item() == pytest.approx(in_batch_only, rel=1e-6)


def test_cosent_by_hand():
    pairs = [pair_with_cosine(c) for c in (0.9, 0.5, 0.7)]
    first, second = unit(*[p[0] for p in pairs]), unit(*[p[1] for p in pairs])
    # Gold order 0 > 2 > 1; every ordered pair (i above j) adds e^{20 (cos_j - cos_i)}.
    expected = math.log(1 + math.exp(20 * (0.5 - 0.9)) + math.exp(20 * (0.7 - 0.9)) + math.exp(20 * (0.5 - 0.7)))
    assert cosent(first, second, torch.tensor([3.0, 1.0, 2.0])).item() == pytest.approx(expected, rel=1e-5)
    # The model's order reversed against the gold order: a large loss.
    reversed_order = math.log(1 + math.exp(8) + math.exp(4) + math.exp(4))
    assert cosent(first, second, torch.tensor([1.0, 3.0, 2.0])).item() == pytest.approx(reversed_order, rel=1e-5)
    # Ties in the gold scores are not pairs; all tied: log(1) = 0.
    assert cosent(first, second, torch.tensor([1.0, 1.0, 1.0])).item() == 0.0
    assert cosent(first, second, torch.tensor([3.0, 1.0, 2.0]), scale=10.0).item() == pytest.approx(
        math.log(1 + math.exp(-4) + 2 * math.exp(-2)), rel=1e-5
    )


def test_truncate_keeps_prefix_and_renormalises():
    x = unit([3, 4, 12])
    assert torch.allclose(truncate(x, 2), torch.tensor([[0.6, 0.8]]))
    assert truncate(x, 3) is x


def random_retrieval(n: int = 3, m: int = 2, dim: int = 8, seed: int = 0) -> RetrievalEmbeddings:
    g = torch.Generator().manual_seed(seed)
    return RetrievalEmbeddings(
        query=F.normalize(torch.randn(n, dim, generator=g), dim=-1),
        positive=F.normalize(torch.randn(n, dim, generator=g), dim=-1),
        negatives=F.normalize(torch.randn(n, m, dim, generator=g), dim=-1),
    )


def test_single_rank_retrieval_is_info_nce_over_all_candidates():
    batch = random_retrieval()
    step = cbb_step_loss(batch, ["retrieval"], LossConfig(temperature=0.05))
    expected = info_nce(batch.query, batch.positive, batch.negatives.reshape(-1, 8), temperature=0.05)
    assert step.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert step.value == pytest.approx(expected.item(), rel=1e-6)
    assert step.per_task_kind == {"retrieval": pytest.approx(expected.item(), rel=1e-6)}
    assert torch.allclose(step.negative_scores, torch.einsum("nd,nmd->nm", batch.query, batch.negatives))
    assert not step.negative_scores.requires_grad


def test_no_hard_negatives():
    batch = random_retrieval(m=0)
    step = cbb_step_loss(batch, ["retrieval"], LossConfig())
    assert step.value == pytest.approx(info_nce(batch.query, batch.positive).item(), rel=1e-6)
    assert step.negative_scores.shape == (3, 0)


def test_single_rank_sts_is_beta_times_cosent():
    batch = random_retrieval(n=5, m=0, seed=1)
    sts = STSEmbeddings(first=batch.query, second=batch.positive, score=torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))
    step = cbb_step_loss(sts, ["sts"], LossConfig(cbb_beta=0.5, cosent_scale=10.0))
    expected = cosent(sts.first, sts.second, sts.score, scale=10.0).item()
    assert step.value == pytest.approx(0.5 * expected, rel=1e-6)
    assert step.loss.item() == pytest.approx(0.5 * expected, rel=1e-6)
    assert step.per_task_kind == {"sts": pytest.approx(expected, rel=1e-6)}
    assert step.negative_scores is None


def test_matryoshka_averages_the_loss_over_sizes():
    batch = random_retrieval(dim=8)
    step = cbb_step_loss(batch, ["retrieval"], LossConfig(matryoshka_dims=[2, 4, 8]))
    per_size = [
        info_nce(
            F.normalize(batch.query[:, :d], dim=-1),
            F.normalize(batch.positive[:, :d], dim=-1),
            F.normalize(batch.negatives[..., :d], dim=-1).reshape(-1, d),
            temperature=0.02,
        ).item()
        for d in (2, 4, 8)
    ]
    assert len(set(per_size)) == 3  # the sizes give different losses, so the average is a real check
    assert step.value == pytest.approx(sum(per_size) / 3, rel=1e-6)


def test_gradient_reaches_every_input():
    batch = random_retrieval()
    leaves = [t.requires_grad_() for t in (batch.query, batch.positive, batch.negatives)]
    cbb_step_loss(batch, ["retrieval"], LossConfig()).loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves)


def test_bfloat16_embeddings_are_scored_in_float32():
    batch = random_retrieval()
    low = RetrievalEmbeddings(batch.query.bfloat16(), batch.positive.bfloat16(), batch.negatives.bfloat16())
    step = cbb_step_loss(low, ["retrieval"], LossConfig())
    assert step.loss.dtype == torch.float32
    assert step.value == pytest.approx(cbb_step_loss(batch, ["retrieval"], LossConfig()).value, rel=0.05)


@pytest.mark.parametrize(
    "kinds, kwargs, message",
    [
        (["retrieval", "sts"], {}, "2 entries for 1 ranks"),
        (["sts"], {}, "schedule says 'sts'"),
        (["ranking"], {}, "unknown kinds"),
        (["retrieval"], {"world_size": 2}, "not initialised"),
        (["retrieval"], {"cfg": LossConfig(matryoshka_dims=[4, 16])}, "matryoshka_dims [16]"),
    ],
)
def test_clear_errors(kinds, kwargs, message):
    cfg = kwargs.pop("cfg", LossConfig())
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cbb_step_loss(random_retrieval(), kinds, cfg, **kwargs)


def test_malformed_shapes_are_rejected():
    batch = random_retrieval()
    with pytest.raises(ValueError, match="negatives \\[n, m, D\\]"):
        wrong = RetrievalEmbeddings(batch.query, batch.positive, batch.negatives[:2])
        cbb_step_loss(wrong, ["retrieval"], LossConfig())
    with pytest.raises(ValueError, match="score \\[b\\]"):
        cbb_step_loss(STSEmbeddings(batch.query, batch.positive, torch.zeros(2)), ["sts"], LossConfig())


def test_classification_queries_never_meet_their_own_label_in_the_denominator():
    torch.manual_seed(0)
    query, positive = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1)
    negatives = F.normalize(torch.randn(3, 1, 8), dim=-1)
    labels, negative_labels = torch.tensor([5, 5, 6]), torch.tensor([[6], [6], [5]])
    cfg = LossConfig(temperature=0.1)
    out = cbb_step_loss(RetrievalEmbeddings(query, positive, negatives, label_keys=labels,
                                            negative_label_keys=negative_labels), ["retrieval"], cfg)
    candidates = torch.cat([labels, negative_labels.reshape(-1)])
    same_label = candidates[None, :] == labels[:, None]
    same_label.fill_diagonal_(False)
    # Query 0 (label 5): query 1's positive and query 2's negative are left out; query 2 (label 6): the
    # negatives of queries 0 and 1.
    assert same_label.tolist() == [[False, True, False, False, False, True], [True, False, False, False, False, True],
                                   [False, False, False, True, True, False]]
    expected = info_nce(query, positive, negatives.reshape(-1, 8), 0.1, same_label)
    assert out.value == pytest.approx(expected.item(), rel=1e-6)
    unmasked = cbb_step_loss(RetrievalEmbeddings(query, positive, negatives), ["retrieval"], cfg)
    assert unmasked.value != pytest.approx(out.value, rel=1e-3)
    # Unlabelled text (-1) is never masked.
    none = cbb_step_loss(RetrievalEmbeddings(query, positive, negatives, label_keys=torch.full((3,), -1),
                                             negative_label_keys=torch.full((3, 1), -1)), ["retrieval"], cfg)
    assert none.value == pytest.approx(unmasked.value, rel=1e-6)


def test_shared_queries_on_one_rank_is_eq3_and_reports_scores():
    """One rank (N = 1): each query against its positive and its own n negatives only; in_batch adds the
    other positives. negative_scores and the per-data-set means come from the same scores."""
    torch.manual_seed(1)
    query, positive = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    negatives = F.normalize(torch.randn(4, 2, 8), dim=-1)
    local = RetrievalEmbeddings(query, positive, negatives)
    t = 0.05
    own = (query * positive).sum(-1, keepdim=True)
    hard = torch.einsum("nd,nmd->nm", query, negatives)
    logits = torch.cat([own, hard], 1) / t
    eq3 = (torch.logsumexp(logits, 1) - logits[:, 0]).mean()
    out = cbb_step_loss(local, ["retrieval"], LossConfig(temperature=t, cbb_negatives="shared_queries"),
                        rank_groups=["pairs"])
    assert out.value == pytest.approx(eq3.item(), rel=1e-6)
    assert torch.allclose(out.negative_scores, hard)
    positive_mean, negative_mean = out.scores["pairs"]
    assert positive_mean == pytest.approx(own.mean().item(), abs=1e-6)
    assert negative_mean == pytest.approx(hard.mean().item(), abs=1e-6)
    in_batch = cbb_step_loss(local, ["retrieval"], LossConfig(temperature=t, cbb_negatives="shared_queries",
                                                               in_batch=True))
    others = (query @ positive.T)[~torch.eye(4, dtype=torch.bool)].reshape(4, 3)
    logits = torch.cat([own, hard, others], 1) / t
    assert in_batch.value == pytest.approx((torch.logsumexp(logits, 1) - logits[:, 0]).mean().item(), rel=1e-6)
    gathered = cbb_step_loss(local, ["retrieval"], LossConfig(temperature=t))
    assert gathered.value > in_batch.value  # gathered also has the other queries' negatives
