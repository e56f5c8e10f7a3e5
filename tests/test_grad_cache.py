"""GradCache (train.grad_cache.chunk_size), gradient checkpointing and the false-negative mask
(loss.false_negative_margin), proven on real DeepSpeed ranks.

1, 2 and 3 gloo ranks (tests/grad_cache_worker.py) take one cached step with a tiny BERT, dropout on,
under ZeRO 1, 2 and 3, on a retrieval-only, a mixed CBB (an STS rank beside retrieval ranks; STS-only
on one rank) and a Matryoshka step, with chunks of 2 texts and unequal batches, so the ranks' chunk
counts differ. Rank 0 computes the gradient without any cache in one process (same seeds, same chunked
forwards, hence the same dropout masks; the CBB loss on the union; one backward). Every parameter's
gradient must match within the tolerance of tests/test_cbb_gradients.py. Injected mistakes must fail.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import grad_cache_worker
from rank_processes import free_port, spawn_ranks
from training.config import ConfigError, load_config
from training.grad_cache import split, text_keys
from training.loss import LossConfig, RetrievalEmbeddings, cbb_step_loss, false_negative_mask
from training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "training" / "recipes" / "quickstart.yaml"
TIMEOUT_S = 400  # 20 s (1 rank), 90 s (2 ranks), 65 s (3 ranks) on 2 busy cores


@pytest.fixture(scope="module")
def results(tiny_bert_dir, tmp_path_factory):
    """results(world_size): the worker's results at that world size, one process group each, run once."""
    found = {}

    def of(world_size: int) -> dict:
        if world_size not in found:
            out_dir = tmp_path_factory.mktemp(f"grad_cache_{world_size}")
            spawn_ranks(grad_cache_worker.main, world_size, str(tiny_bert_dir), str(out_dir), timeout_s=TIMEOUT_S)
            found[world_size] = json.loads((out_dir / "results.json").read_text())
        return found[world_size]

    return of


WORLD_SIZES = [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)]  # 20, 80, 70 s


def _matches(result: dict) -> bool:
    return result["parameters"] > 0 and not result["mismatched"]


@pytest.mark.parametrize("step", ["retrieval", "mixed", "matryoshka"])
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_cached_gradient_equals_gradient_without_cache(results, world_size, step, stage):
    result = results(world_size)["cases"][f"{step}_zero{stage}"]
    assert _matches(result), f"mismatched: {result['mismatched']}; worst: {result['worst']}"
    # Every rank logs the same global loss, the one computed without the cache.
    assert all(value == pytest.approx(result["reference_value"], rel=1e-6) for value, _ in result["values"])


@pytest.mark.parametrize("name", ["checkpointing_zero2", "checkpointing_zero3", "checkpointing_plain_zero3",
                                  "false_negatives_zero3", "whole_batch_chunk_zero2", "plain_zero2"])
@pytest.mark.slow
def test_checkpointing_masking_and_the_plain_path_give_the_same_gradient(results, name):
    result = results(2)["cases"][name]
    assert _matches(result), f"mismatched: {result['mismatched']}; worst: {result['worst']}"


@pytest.mark.slow
def test_one_chunk_per_group_is_the_plain_step(results):
    """chunk_size covering the batch encodes exactly as the plain step (same forwards, same dropout masks)."""
    found = results(2)
    assert _matches(found["whole_batch_vs_plain"]), found["whole_batch_vs_plain"]
    assert found["cases"]["whole_batch_chunk_zero2"]["values"] == found["cases"]["plain_zero2"]["values"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16(results, stage):
    """bf16 (ZeRO-1 trains through DeepSpeed's BF16_Optimizer, 2 and 3 through ZeRO's own): against the
    same uncached step in bf16 in one process; bf16 sums differ in order, so the whole gradient is
    compared (relative error of about 0.5%; a mistake gives about 100%)."""
    result = results(2)["cases"][f"bf16_zero{stage}"]
    assert result["rel_error"] < grad_cache_worker.BF16_REL_ERROR, result
    assert result["grad_norm_ratio"] == pytest.approx(1.0, abs=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("name, norm_ratio", [
    ("no_replay_zero2", None),  # pass 3 draws new dropout masks: the cached gradient fits another function
    ("no_replay_zero3", None),
    ("bf16_zero2_no_replay", None),
    ("chunk_scaled_zero2", 1 / 6),  # each chunk's backward divided by the 6 backwards of the step
    ("every_backward_a_boundary_zero1", None),  # DeepSpeed keeps only the last chunk's gradient
    ("every_backward_a_boundary_zero2", None),
])
def test_injected_mistake_is_detected(results, name, norm_ratio):
    result = results(2)["cases"][name]
    assert not _matches(result) and result["rel_error"] > 0.1, f"{name}: the check failed to notice the mistake"
    if norm_ratio is not None:
        assert result["grad_norm_ratio"] == pytest.approx(norm_ratio, rel=1e-4)


@pytest.mark.slow
def test_false_negative_mask_across_ranks(results):
    """Hand-made embeddings on 2 ranks: rank 1's copy of rank 0's first positive and rank 0's
    near-duplicate of rank 1's second query are masked (2 pairs), nothing else; the loss equals InfoNCE
    over the union with exactly those pairs removed by hand."""
    mask = results(2)["mask"]
    assert mask["masked"] == mask["expected_masked"] == 2
    assert mask["value"] == pytest.approx(mask["expected"], rel=1e-5)
    assert mask["unmasked_masked"] is None and mask["unmasked_value"] > mask["value"] + 0.1
    masked = [m for _, m in results(2)["cases"]["false_negatives_zero3"]["values"]]
    assert len(set(masked)) == 1 and masked[0] > 0  # every rank counts the same global mask


def test_ranks_must_pad_their_chunk_counts(tiny_bert_dir):
    """Without padding (ranks with fewer chunks run fewer forwards and backwards) ZeRO-2's reductions in
    backward hooks no longer pair up across ranks and the step fails."""
    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
        spawn_ranks(grad_cache_worker.without_padding, 2, str(tiny_bert_dir), timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------------------------------------------
# One process: the mask by hand, text keys, chunks, options


def _unit(*rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_mask_planted_duplicate_and_near_duplicate_by_hand():
    """Query 0 scores 0.8 with its positive P0. Planted: a hard negative with the text of P0 (same key;
    it scores 0.8 too, so only the text catches it), and query 1's positive P1, which scores 0.95 with
    query 0 (above 0.8 + margin 0.1). Not masked: a negative at 0.85 (within the margin), two at 0."""
    margin = 0.1

    def at(angle: float) -> torch.Tensor:  # a unit vector in the plane of the first two axes
        return torch.tensor([math.cos(angle), math.sin(angle), 0.0, 0.0])

    e = torch.eye(4)
    q0 = math.atan2(0.6, 0.8)
    query = torch.stack([at(q0), at(q0 + math.acos(0.95))])
    positive = torch.stack([e[0], at(q0 + math.acos(0.95))])
    negatives = torch.stack([e[0], e[2], at(q0 - math.acos(0.85)), e[3]]).reshape(2, 2, 4)
    scores = query[0] @ torch.cat([positive, negatives.reshape(-1, 4)]).T
    assert scores.tolist() == pytest.approx([0.8, 0.95, 0.8, 0.0, 0.85, 0.0], abs=1e-6)
    positive_keys = torch.tensor([10, 11])
    negative_keys = torch.tensor([[10, 20], [21, 22]])  # query 0's first negative has the text of P0

    mask = false_negative_mask(query, positive, negatives.reshape(-1, 4), positive_keys, negative_keys.reshape(-1),
                               margin)
    expected = torch.zeros(2, 6, dtype=torch.bool)
    expected[0, 1] = True  # query 1's positive, above query 0's positive + margin
    expected[0, 2] = True  # the copy of query 0's positive
    assert torch.equal(mask, expected), mask

    local = RetrievalEmbeddings(query, positive, negatives, positive_keys, negative_keys)
    out = cbb_step_loss(local, ["retrieval"], LossConfig(temperature=0.05, false_negative_margin=margin))
    assert out.masked == 2
    candidates = torch.cat([positive, negatives.reshape(-1, 4)])
    by_hand = []
    for i, kept in ((0, [0, 3, 4, 5]), (1, [0, 1, 2, 3, 4, 5])):
        logits = query[i] @ candidates[kept].T / 0.05
        by_hand.append(torch.logsumexp(logits, 0) - logits[kept.index(i)])
    assert out.value == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-6)
    plain = cbb_step_loss(local, ["retrieval"], LossConfig(temperature=0.05))
    assert plain.masked is None and plain.value > out.value


def test_mask_needs_the_text_keys():
    local = RetrievalEmbeddings(_unit([1, 0]), _unit([1, 0]), _unit([0, 1])[:, None])
    with pytest.raises(ValueError, match="text keys"):
        cbb_step_loss(local, ["retrieval"], LossConfig(false_negative_margin=0.1))


def test_text_keys_equal_exactly_for_equal_tokens():
    ids = torch.tensor([[101, 7, 8, 102, 0], [101, 7, 8, 102, 0], [101, 7, 9, 102, 0], [101, 7, 8, 102, 5]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    keys = text_keys({"input_ids": ids, "attention_mask": mask}).tolist()
    assert keys[0] == keys[1] and len({keys[0], keys[2], keys[3]}) == 3
    # Padding does not count: the same text padded wider has the same key.
    wider = text_keys({"input_ids": torch.cat([ids[:1], torch.zeros(1, 3, dtype=torch.long)], 1),
                       "attention_mask": torch.cat([mask[:1], torch.zeros(1, 3, dtype=torch.long)], 1)})
    assert wider.tolist() == keys[:1]


def test_chunks_cut_trailing_padding_only():
    ids = torch.arange(24).reshape(4, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]])
    chunks = split({"input_ids": ids, "attention_mask": mask}, 2)
    assert [c["input_ids"].shape for c in chunks] == [(2, 3), (2, 5)]
    assert torch.equal(chunks[1]["input_ids"], ids[2:, :5])
    assert len(split({"input_ids": ids, "attention_mask": mask}, 3)) == 2


@pytest.mark.parametrize("override, expected", [
    ("train.grad_cache.chunk_size=0", "'train.grad_cache.chunk_size' must be at least 1 (null: no gradient cache), got 0"),
    ("loss.false_negative_margin=-0.1", "'loss.false_negative_margin' must not be negative (null: no masking), got -0.1"),
    ("train.grad_cache.chunk=8", "unknown key 'train.grad_cache.chunk' (did you mean 'chunk_size'?)"),
    ("model.gradient_checkpointing=maybe", "'model.gradient_checkpointing' must be bool, got 'maybe'"),
])
def test_options_are_checked(tmp_path, monkeypatch, override, expected):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError) as caught:
        load_config(QUICKSTART, [f"run_dir={tmp_path}", override])
    assert expected in str(caught.value)
    config = load_config(QUICKSTART, [f"run_dir={tmp_path}", "train.grad_cache.chunk_size=8",
                                      "loss.false_negative_margin=0.1", "model.gradient_checkpointing=true"])
    assert (config.train.grad_cache.chunk_size, config.loss.false_negative_margin) == (8, 0.1)
    assert config.model.gradient_checkpointing is True
    defaults = load_config(QUICKSTART, [f"run_dir={tmp_path}"])
    assert defaults.train.grad_cache.chunk_size is None and defaults.loss.false_negative_margin is None


# ---------------------------------------------------------------------------------------------------
# The trainer end to end


def _trainer(run_dir: Path, model: Path, overrides: list[str], resume: bool = False) -> None:
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
               str(free_port()), "training/main.py", "--config", str(QUICKSTART), *(["--resume"] if resume else []),
               f"run_dir={run_dir}", f"model.path={model}", "model.max_length=32", "data.0.limit=10",
               "data.0.batch_size=5", "train.num_workers=0", "optim.lr=1e-3", "optim.warmup_steps=1",
               "optim.schedule=constant", "train.save_every=2", "train.export_every=0", "train.progress=false",
               *overrides]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.mark.slow
def test_resumed_run_with_the_cache_equals_straight_run(tmp_path, tiny_bert_dir):
    """ZeRO-3, a retrieval and an STS task swapping ranks every step, chunks of 2 (6 forwards on the
    retrieval rank, 4 on the STS rank: padding), gradient checkpointing, the false-negative mask: 4 steps straight == 2 steps, then resumed
    from the step-2 checkpoint to step 4, loss for loss."""
    queries = [json.loads(line)["text"] for line in (REPO / "data" / "scifact" / "queries.train.jsonl").open()][:11]
    sts = tmp_path / "sts.tsv"
    sts.write_text("score\tsentence1\tsentence2\n" + "".join(f"{i % 5}\t{queries[i]}\t{queries[i + 1]}\n"
                                                               for i in range(10)))
    overrides = ["deepspeed.config=ds_configs/zero3.json", "train.max_steps=4", "train.grad_cache.chunk_size=2",
                 "model.gradient_checkpointing=true", "loss.false_negative_margin=0.1",
                 f"data.1={{name: sts, kind: sts, path: {sts}, batch_size: 4}}"]
    straight = tmp_path / "straight"
    _trainer(straight, tiny_bert_dir, overrides)
    records = read_metrics(straight)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(isinstance(r["masked_false_negatives"], int) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]

    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    _trainer(resumed, tiny_bert_dir, overrides, resume=True)
    again = read_metrics(resumed)
    assert [r["step"] for r in again] == [3, 4]
    assert [r["loss"] for r in again] == [r["loss"] for r in records[2:]]  # exactly
    assert [r["masked_false_negatives"] for r in again] == [r["masked_false_negatives"] for r in records[2:]]
