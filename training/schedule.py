"""Which task each rank trains on at each optimizer step.

A pure function of its arguments, so every rank computes the same assignment with no
communication and a resumed run continues the same sequence.

"balanced" (the CBB loss): every task is in every step. Ranks are apportioned to tasks in
proportion to their weights by the largest-remainder method, with at least one rank per task.
The resulting slots are shuffled once with the seed and then rotated by one rank per step, so
over any W consecutive steps every rank holds every slot exactly once: no rank is stuck with a
task, and each rank sees each task in the configured proportion.

"random_task" (the paper's baseline): all ranks train on one task per step, drawn by weight with
an RNG seeded by (seed, step).
"""
from __future__ import annotations

import math
import random

MODES = ("balanced", "random_task")


def assign_tasks(
    step: int, world_size: int, task_weights: dict[str, float], seed: int, mode: str = "balanced"
) -> list[str]:
    """The task name of each rank at optimizer step `step`."""
    _check(step, world_size, task_weights, mode)
    tasks = sorted(task_weights)  # independent of the config's key order
    if mode == "random_task":
        task = random.Random(f"{seed}/{step}").choices(tasks, weights=[task_weights[t] for t in tasks])[0]
        return [task] * world_size
    counts = apportion(world_size, task_weights)
    slots = [t for t in tasks for _ in range(counts[t])]
    random.Random(seed).shuffle(slots)
    shift = step % world_size
    return slots[shift:] + slots[:shift]


def ranks_per_task(world_size: int, task_weights: dict[str, float], mode: str = "balanced") -> dict[str, int]:
    """How many ranks train each task at a step it is trained in: the same at every step (balanced: its
    apportioned count; random_task: all of them)."""
    if mode == "random_task":
        return {t: world_size for t in task_weights}
    return apportion(world_size, task_weights)


def apportion(world_size: int, task_weights: dict[str, float]) -> dict[str, int]:
    """Ranks per task: largest remainder on the weights, at least one rank per task."""
    tasks = sorted(task_weights)
    if world_size < len(tasks):
        raise ValueError(
            f"mode 'balanced' needs at least one rank per task: {len(tasks)} tasks {tasks} but world size "
            f"{world_size}; add ranks, or use mode 'random_task' (one task for all ranks per step)"
        )
    total = sum(task_weights.values())
    quota = {t: world_size * task_weights[t] / total for t in tasks}
    counts = {t: max(1, math.floor(quota[t])) for t in tasks}
    # Ties go to the first task in name order (max/min return the first of equals).
    while sum(counts.values()) < world_size:
        counts[max(tasks, key=lambda t: quota[t] - counts[t])] += 1
    while sum(counts.values()) > world_size:  # the minimum of one rank overshot
        counts[max((t for t in tasks if counts[t] > 1), key=lambda t: counts[t] - quota[t])] -= 1
    return counts


def _check(step: int, world_size: int, task_weights: dict[str, float], mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown schedule mode {mode!r}; known: {list(MODES)}")
    if step < 0 or world_size < 1:
        raise ValueError(f"step must be >= 0 and world_size >= 1; got step={step}, world_size={world_size}")
    if not task_weights:
        raise ValueError("task_weights is empty: configure at least one task")
    bad = {t: w for t, w in task_weights.items() if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0)}
    if bad:
        raise ValueError(f"task weights must be positive finite numbers; got {bad}")
