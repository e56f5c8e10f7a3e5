"""The CBB loss is proven on real DeepSpeed ranks: their averaged gradient equals the gradient of L.

2 and 3 gloo ranks (tests/cbb_worker.py) each take one step with a tiny BERT in a DeepSpeed engine
(ZeRO-2; ZeRO-1 and 3 too at 2 ranks). Rank 0 recomputes L in one process on the union of all
ranks' data. Every parameter's gradient must match within rtol 1e-5 plus an atol of 1e-5 times
the model's largest reference gradient entry (for entries that are near zero by cancellation).
The same check with classic mistakes injected must fail.
"""
from __future__ import annotations

import json

import pytest

import cbb_worker
from rank_processes import spawn_ranks

TIMEOUT_S = 300  # 25 to 45 s per world size on 2 busy cores


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def ranks(request, tiny_bert_dir, tmp_path_factory):
    """One process group per world size; every check of this module reads its results."""
    world_size = request.param
    out_dir = tmp_path_factory.mktemp(f"cbb_{world_size}")
    spawn_ranks(cbb_worker.main, world_size, str(tiny_bert_dir), str(out_dir), timeout_s=TIMEOUT_S)
    return world_size, json.loads((out_dir / "results.json").read_text())


def _matches(result: dict) -> bool:
    return result["parameters"] > 0 and not result["mismatched"]


@pytest.mark.parametrize(
    "scenario",
    ["mixed", "retrieval", "sts", "retrieval_grad_gather_full_loss_unscaled", "mixed_zero1", "mixed_zero3", "two_sts"],
)
def test_gradient_equals_single_process(ranks, scenario):
    world_size, results = ranks
    if scenario not in results["scenarios"]:
        pytest.skip(f"{scenario} does not run at {world_size} ranks")
    result = results["scenarios"][scenario]
    assert _matches(result), result
    # The logged value is the global L, the same on every rank.
    assert len(set(result["values"])) == 1, result["values"]
    assert result["values"][0] == pytest.approx(result["reference_value"], rel=1e-5)


@pytest.mark.parametrize(
    "scenario, expected_norm_ratio",
    [
        ("mixed_missing_world_size", "1/W"),
        ("retrieval_missing_world_size", "1/W"),
        ("retrieval_grad_gather_full_loss", "W"),
        ("retrieval_no_grad_gather_local_loss", None),  # loses the gradient through other ranks' queries
    ],
)
def test_injected_mistake_is_detected(ranks, scenario, expected_norm_ratio):
    world_size, results = ranks
    result = results["scenarios"][scenario]
    assert not _matches(result), f"{scenario}: the gradient check failed to notice the mistake"
    if expected_norm_ratio is not None:
        ratio = {"W": world_size, "1/W": 1 / world_size}[expected_norm_ratio]
        assert result["grad_norm_ratio"] == pytest.approx(ratio, rel=1e-4)


def test_mixed_step_reports_both_task_kinds(ranks):
    _, results = ranks
    assert set(results["scenarios"]["mixed"]["per_task_kind"]) == {"retrieval", "sts"}
    assert set(results["scenarios"]["retrieval"]["per_task_kind"]) == {"retrieval"}


@pytest.mark.parametrize("mode", ["balanced", "random_task"])
def test_all_ranks_agree_on_the_schedule(ranks, mode):
    world_size, results = ranks
    steps = results["schedule"][mode]
    assert len(steps) == 50
    for step, lists in enumerate(steps):
        assert len(lists) == world_size and len(lists[0]) == world_size
        assert all(other == lists[0] for other in lists), f"ranks disagree at step {step}: {lists}"
