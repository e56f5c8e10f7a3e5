"""For scripts that drive the entrypoints as subprocesses (scripts/quickstart.py,
bench/compare_negatives.py): the environment the children need, the trainer and sidecar command
lines, stopping the sidecar, and whether bfloat16 encoding pays off."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def has_bf16(has_gpu: bool) -> bool:
    """bfloat16 encoding pays off on GPUs and on CPUs with AMX tiles. Measured on 2 cores with
    all-MiniLM-L6-v2 at 256 tokens: with AMX bf16 autocast encodes about 3x faster than float32, but on a
    Xeon with AVX512-BF16 and no AMX it took 1.4x the CPU time of float32, so AVX512-BF16 alone does not
    count."""
    import torch

    if has_gpu:
        return torch.cuda.is_bf16_supported()
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return probe is not None and probe()


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


def trainer_command(repo: Path, recipe: Path, args: list[str], has_gpu: bool, cpu_ranks: int = 2) -> list[str]:
    """`deepspeed training/main.py --config RECIPE ARGS` on every GPU, or on `cpu_ranks` CPU ranks without
    one (the launcher starts one process on CPU unless told how many)."""
    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.exists():
        launcher = Path(shutil.which("deepspeed") or "deepspeed")
    ranks = [] if has_gpu else ["--num_gpus", str(cpu_ranks)]
    # The launcher's own INFO lines (command lines, CUDA_VISIBLE_DEVICES) are not for a person;
    # a rank that fails still shows (an error).
    return [str(launcher), "--log_level", "error", *ranks, "--master_port", str(free_port()),
            str(repo / "training" / "main.py"), "--config", str(recipe), *args]


def trainer_env(env: dict, has_gpu: bool, cpu_ranks: int = 2) -> dict:
    """`env` for the trainer: on CPU its ranks share the cores; more threads than cores slow them all."""
    env = dict(env)
    if not has_gpu:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // cpu_ranks)))
    return env


def sidecar_command(run_dir: Path, has_gpu: bool, keep_versions: int | None = None) -> list[str]:
    """The mining sidecar for `run_dir`; on CPU one thread, so that training keeps most of the cores.
    keep_versions: negative-store versions kept (None: the sidecar's default)."""
    return [sys.executable, "-m", "mining", "sidecar", "--run-dir", str(run_dir), "--poll-seconds", "2",
            "--no-progress", *([] if has_gpu else ["--threads", "1"]),
            *([] if keep_versions is None else ["--keep-versions", str(keep_versions)])]


def stop_process(process: subprocess.Popen, grace_seconds: float = 60.0) -> int:
    """SIGTERM, then wait; the sidecar stops cleanly on SIGTERM (mid-pass too). SIGKILL only if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def run_stage(root: Path, record: dict, stage: str, env: dict, cmd: list[str], *, program: str,
              record_name: str = "row.json") -> None:
    """One entrypoint as a subprocess of the script `program`: its output in ROOT/logs/<stage>.log (a '/' in
    the stage as '.'), its command and wall seconds in `record`, written to ROOT/<record_name> after it
    ran; a failure ends the script with one line naming the log."""
    from embedlib.atomic import atomic_write_json

    record["commands"][stage] = shlex.join(cmd)
    log_path = root / "logs" / f"{stage.replace('/', '.')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "ab") as log:
        result = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    record["seconds"][stage] = round(time.perf_counter() - start, 1)
    atomic_write_json(root / record_name, record)
    if result.returncode != 0:
        raise SystemExit(f"{program}: {stage} failed ({result.returncode}); see {log_path}")
