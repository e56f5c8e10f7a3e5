"""For scripts that drive the entrypoints as subprocesses (scripts/quickstart.py, bench/): the
environment the children need, a free port for a launcher, and whether bfloat16 encoding pays off."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path


def has_bf16(has_gpu: bool) -> bool:
    """bfloat16 encoding pays off on GPUs and on CPUs with native bf16 instructions (AVX512-BF16, AMX)."""
    import torch

    if has_gpu:
        return torch.cuda.is_bf16_supported()
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe is not None and probe() for probe in probes)


def child_env(has_gpu: bool, repo: Path) -> dict:
    """This process's environment, offline, with caches inside the checkout `repo` as the Makefile sets
    them, and this interpreter's bin/ first on PATH (the launchers, ninja and mpiexec of the venv)."""
    env = dict(os.environ)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                       ("TORCH_EXTENSIONS_DIR", str(repo / ".cache" / "torch_extensions")),
                       ("TOKENIZERS_PARALLELISM", "false"), ("PYTHONUNBUFFERED", "1")):
        env.setdefault(key, value)
    if not has_gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
