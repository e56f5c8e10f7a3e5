"""The paper's CBB loss (loss.cbb_negatives=shared_queries) on real DeepSpeed ranks equals Eq. 3 in one
process: at 2 ranks (ZeRO-2, the gradient cache, ZeRO-3 with the gradient cache, in-batch positives with
Matryoshka sizes) and 3 ranks (two retrieval ranks sharing queries beside an STS rank, plain and through the
gradient cache; three sharing), every parameter's gradient matches the one-process gradient of each query
against its N x n hard negatives (tests/cbb_shared_worker.py). Ranks drawing different queries, or taking the
same slice of the negatives, must fail that comparison; the loss's own check catches the first."""
from __future__ import annotations

import json

import numpy as np
import pytest

import cbb_shared_worker
from rank_processes import spawn_ranks

TIMEOUT_S = 400


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory, scifact_dir):
    return cbb_shared_worker.write_data(tmp_path_factory.mktemp("cbb_shared") / "data", scifact_dir)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def results(request, tiny_bert_dir, shared_data):
    world_size = request.param
    spawn_ranks(cbb_shared_worker.main, world_size, str(tiny_bert_dir), str(shared_data), timeout_s=TIMEOUT_S)
    return world_size, json.loads((shared_data / f"results_{world_size}.json").read_text())


def _scenario(results, name: str) -> dict:
    world_size, found = results
    if name not in found:
        pytest.skip(f"{name} does not run at {world_size} ranks")
    return found[name]


@pytest.mark.parametrize("name", ["shared", "shared_grad_cache", "shared_zero3_grad_cache", "shared_in_batch_matryoshka",
                                  "shared_with_sts", "shared_with_sts_grad_cache", "shared_three"])
def test_gradient_equals_eq3_in_one_process(results, name):
    result = _scenario(results, name)
    assert result["parameters"] > 0 and not result["mismatched"], result["worst"]
    values = [v for v in result["values"] if v is not None]
    assert len(set(values)) == 1 and values[0] == pytest.approx(result["reference_value"], rel=1e-5)
    # The ranks sharing the data set trained the same rows; the first scores each query against all N x n.
    retrieval_rows = [rows for rows, task in zip(result["rows"], result["tasks"]) if task == "pairs"]
    assert len(retrieval_rows) >= 2 and all(rows == retrieval_rows[0] for rows in retrieval_rows)
    scores = np.array(result["negative_scores"])
    assert scores.shape == (cbb_shared_worker.QUERIES, len(retrieval_rows) * cbb_shared_worker.NEGATIVES)
    np.testing.assert_allclose(scores, result["reference_negative_scores"], atol=1e-5)


@pytest.mark.parametrize("name", ["different_queries", "same_slice", "same_slice_three"])
def test_a_planted_mistake_fails_the_comparison(results, name):
    result = _scenario(results, name)
    assert result["parameters"] > 0 and result["mismatched"], f"{name}: the gradient check missed the mistake"


def test_ranks_holding_different_queries_are_stopped_by_the_loss(results):
    result = _scenario(results, "different_queries_checked")
    assert "hold different ones" in result["error"]
