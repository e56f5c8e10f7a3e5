"""A test's rank processes: torch.multiprocessing (spawn) on a free port, with a deadline, since a
collective that never completes would otherwise hang the suite."""
from __future__ import annotations

import socket
import time

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(entry, world_size: int, *args, timeout_s: float) -> None:
    """entry(rank, world_size, port, *args) in world_size processes; a rank that fails fails the test
    (torch raises its error), and so do ranks still running after timeout_s (killed first)."""
    processes = mp.start_processes(entry, args=(world_size, free_port(), *args), nprocs=world_size,
                                   start_method="spawn", join=False)
    deadline = time.monotonic() + timeout_s
    while not processes.join(timeout=1):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail(f"the {world_size} ranks did not finish within {timeout_s} s")
