"""The few collectives mining needs, over mpi4py (mpirun, mpiexec, srun) or torch.distributed (torchrun).

Only numpy arrays cross process boundaries, as raw buffers (nothing is pickled):
  gather(array)     rank 0 receives every rank's array (same shape and dtype on all ranks)
  broadcast(array)  every rank receives rank 0's 1-D int64 array, of any length
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

LAUNCHERS = ("auto", "none", "mpi", "torchrun")


def detect_launcher(env: Mapping[str, str] = os.environ) -> str:
    """Which launcher started this process: "torchrun", "mpi" (mpirun/mpiexec, or srun with several
    tasks in this step) or "none"."""
    if "TORCHELASTIC_RUN_ID" in env or {"RANK", "WORLD_SIZE", "MASTER_ADDR"} <= env.keys():
        return "torchrun"
    if any(k in env for k in ("PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")):
        return "mpi"
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:  # inside `srun -n N`, set only for job steps
        return "mpi"
    return "none"


class LocalComm:
    rank, world_size, local_rank = 0, 1, 0

    def gather(self, array: np.ndarray) -> list[np.ndarray]:
        return [array]

    def broadcast(self, array: np.ndarray | None) -> np.ndarray:
        return array

    def barrier(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


class MpiComm:
    def __init__(self):
        from mpi4py import MPI

        self._mpi = MPI
        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.world_size = self._comm.Get_size()
        self.local_rank = self._comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()

    def gather(self, array: np.ndarray) -> list[np.ndarray] | None:
        array = np.ascontiguousarray(array)
        received = np.empty((self.world_size,) + array.shape, array.dtype) if self.rank == 0 else None
        self._comm.Gather(array, received, root=0)
        return list(received) if self.rank == 0 else None

    def broadcast(self, array: np.ndarray | None) -> np.ndarray:
        length = np.array([len(array) if self.rank == 0 else 0], dtype=np.int64)
        self._comm.Bcast(length, root=0)
        data = np.ascontiguousarray(array, dtype=np.int64) if self.rank == 0 else np.empty(int(length[0]), np.int64)
        self._comm.Bcast(data, root=0)
        return data

    def barrier(self) -> None:
        self._comm.Barrier()

    def abort(self) -> None:
        self._comm.Abort(1)  # a rank that fails inside a collective would otherwise hang the others

    def close(self) -> None:
        pass


class TorchComm:
    """torch.distributed with gloo on CPU tensors (the collectives here are small: top-k lists)."""

    def __init__(self):
        import torch.distributed as dist

        self._dist = dist
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))

    def gather(self, array: np.ndarray) -> list[np.ndarray] | None:
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(array))
        received = [torch.empty_like(tensor) for _ in range(self.world_size)] if self.rank == 0 else None
        self._dist.gather(tensor, received, dst=0)
        return [t.numpy() for t in received] if self.rank == 0 else None

    def broadcast(self, array: np.ndarray | None) -> np.ndarray:
        import torch

        length = torch.tensor([len(array) if self.rank == 0 else 0], dtype=torch.int64)
        self._dist.broadcast(length, src=0)
        data = (torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)) if self.rank == 0
                else torch.empty(int(length[0]), dtype=torch.int64))
        self._dist.broadcast(data, src=0)
        return data.numpy()

    def barrier(self) -> None:
        self._dist.barrier()

    def abort(self) -> None:
        pass  # torchrun's agent stops the other ranks when one exits with an error

    def close(self) -> None:
        self._dist.barrier()  # leave together: a peer exiting under gloo's feet can abort the other rank
        self._dist.destroy_process_group()


def make_comm(launcher: str = "auto"):
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if launcher == "auto":
        launcher = detect_launcher()
    if launcher == "torchrun":
        return TorchComm()
    if launcher == "mpi":
        return MpiComm()
    return LocalComm()
