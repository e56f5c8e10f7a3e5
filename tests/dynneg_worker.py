"""Rank processes for tests/test_dynamic_negatives.py (torch.multiprocessing, spawn, gloo).

Each rank records only the samples it "trained" in a fixed plan (several steps, the same sample on
both ranks at one step and at different steps, prefetched batches whose negatives a check replaced),
then syncs and checks like the trainer, adopts the store version rank 0 chose, and writes its state
and check results to OUT/{rule}_rank{r}.npz and .json, for both rules. The test compares them with one process
applying every rank's records (`run(plan, None)` below).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

from training.config import NegativesConfig
from training.negatives import DynamicNegativeState, StoreSpec, broadcast_from_rank0

NUM_SAMPLES, WORLD_SIZE, STEPS = 40, 2, 10
RULES = ("window", "per_negative")


def new_state(rule: str) -> DynamicNegativeState:
    return DynamicNegativeState(StoreSpec("d", ("q", "c"), NUM_SAMPLES, 3, 10, rule),
                                NegativesConfig(rule=rule, check_interval=5))


def plan(rule: str) -> list[dict]:
    """Per (step, rank): samples trained, their scores, and whether the batch was planned before the
    previous check (prefetched). Scores fall over time so that samples go stale."""
    rng = np.random.default_rng(7 if rule == "window" else 8)
    records = []
    for step in range(1, STEPS + 1):
        for rank in range(WORLD_SIZE):
            samples = rng.choice(NUM_SAMPLES, size=8, replace=False)
            if rank == 1:
                samples[0] = records[-1]["samples"][0]  # one sample on both ranks at this step
            scores = rng.uniform(0.1, 0.9, size=(8, 3)) * (1.0 - 0.07 * step)
            store = rng.uniform(0.3, 0.9, size=(8, 3)).astype(np.float32)
            store[rng.random((8, 3)) < 0.2] = np.nan  # slots without a mined candidate
            records.append({"step": step, "rank": rank, "samples": samples, "scores": scores.astype(np.float32),
                            "store": store,                            "prefetched": step == 6})  # planned before the check at step 5
    return records


def run(records: list[dict], rule: str, rank: int | None) -> tuple[DynamicNegativeState, list[dict]]:
    """The trainer's calls. rank None: one process given every rank's records (the reference)."""
    state = new_state(rule)
    planned_generation = state.generation.copy()
    results = []
    for step in range(1, STEPS + 1):
        for r in records:
            if r["step"] == step and (rank is None or r["rank"] == rank):
                generations = planned_generation[r["samples"]] if r["prefetched"] else state.generation[r["samples"]]
                state.record(r["samples"], torch.from_numpy(r["scores"]), step, r["store"], generations=generations)
        if state.due(step):
            planned_generation = state.generation.copy()
            state.sync()
            results.append(asdict(state.check(step)))
            offer = (2, step - 3) if rank in (0, None) else None  # only rank 0's view counts
            version, model_step = broadcast_from_rank0(offer)
            state.adopt_version(version, model_step)
    return state, results


def main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for rule in RULES:
            records = [r for r in plan(rule) if r["rank"] == rank]  # a rank sees only its own batches
            state, results = run(records, rule, rank)
            np.savez(os.path.join(out_dir, f"{rule}_rank{rank}.npz"), **state.state_dict())
            with open(os.path.join(out_dir, f"{rule}_rank{rank}.json"), "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()
