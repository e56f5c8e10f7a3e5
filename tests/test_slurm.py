"""slurm/*.sh under a real SLURM: a one-node cluster on this machine (slurm/testing/start_cluster.sh).

The jobs are real: sbatch runs the scripts, srun starts the ranks, SLURM delivers the time-limit
warning and requeues the job. The node has 2 CPUs and no GPU, so the trainer runs as 2 CPU ranks over
gloo, with a tiny random BERT and a 335-passage slice of SciFact. Everything here but shellcheck skips
unless the cluster answers (start it with `sudo slurm/testing/start_cluster.sh`). About 4 minutes on 2
busy cores, most of it trainer start-up (about 25 s per start).
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, build_tiny_bert
from embedlib.encoder import Encoder
from llm_server import LLMServer

# Run by `make test-slurm` (which starts a one-node cluster), not by `make test`.
pytestmark = pytest.mark.slurm

SLURM_DIR = REPO / "slurm"
JOB_TIMEOUT_S = 600
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}


def _cluster_state() -> str | None:
    """Why the cluster cannot run the tests, or None when it can."""
    if shutil.which("sbatch") is None:
        return "SLURM is not installed: run `sudo slurm/testing/start_cluster.sh` (make test-slurm)"
    try:  # a local controller answers at once; a stopped one makes sinfo retry for about 9 s
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=3).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        states = []
    if not any(s.rstrip("*") in ("idle", "mixed", "allocated", "completing") for s in states):
        return "no SLURM node answers: run `sudo slurm/testing/start_cluster.sh` (make test-slurm)"
    return None


CLUSTER_PROBLEM = _cluster_state()
needs_cluster = pytest.mark.skipif(CLUSTER_PROBLEM is not None, reason=CLUSTER_PROBLEM or "")


# ----------------------------------------------------------------------------------------------- helpers

def job_env(**settings: str) -> dict[str, str]:
    """The submitting environment (sbatch passes it on): conftest's offline settings, CPU DeepSpeed,
    the checkout, and the given slurm/settings.env overrides. SLURM_* of an enclosing job are dropped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(CONAN_REPO=str(REPO), DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", **settings)
    return env


def sbatch(script: str, log: Path, args: list[str] = (), sbatch_args: list[str] = (), **settings: str) -> str:
    command = ["sbatch", "--parsable", f"--output={log}", "--time=10", *sbatch_args, str(SLURM_DIR / script), *args]
    out = subprocess.run(command, env=job_env(**settings), capture_output=True, text=True, check=True).stdout
    return out.strip().split(";")[0]


def job_records(job_id: str) -> list[dict[str, str]]:
    """`scontrol show job` as dicts, one per job (one per task of an array)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return [dict(field.split("=", 1) for field in line.split() if "=" in field) for line in out.splitlines()]


def wait_for_job(job_id: str, log: Path | None = None, timeout: float = JOB_TIMEOUT_S) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = job_records(job_id)
        if records and all(r["JobState"] in TERMINAL_STATES for r in records):
            return records
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} did not finish in {timeout} s; log:\n{read_log(log)}")


def wait_for_first_step(job_id: str, run: Path, log: Path) -> None:
    """Until the trainer has logged a step to RUN/metrics.jsonl."""
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (metrics.exists() and metrics.read_text().strip()):
        assert time.monotonic() < deadline, read_log(log)
        assert job_records(job_id)[0]["JobState"] not in TERMINAL_STATES, read_log(log)
        time.sleep(0.2)


def read_log(log: Path | None) -> str:
    return log.read_text(errors="replace")[-6000:] if log is not None and log.exists() else "(no log)"


def assert_completed(records: list[dict[str, str]], log: Path | None) -> None:
    for r in records:
        assert (r["JobState"], r["ExitCode"]) == ("COMPLETED", "0:0"), f"job {r['JobId']}:\n{read_log(log)}"


def dry_run(settings: dict[str, str], slurm_env: dict[str, str], args: list[str] = ()) -> dict[str, str]:
    """slurm/train.sh with DRY_RUN=1 in a made-up job: the launch plan as KEY -> value."""
    env = job_env(DRY_RUN="1", **settings)
    env.update(slurm_env)
    result = subprocess.run(["bash", str(SLURM_DIR / "train.sh"), *args], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    plan = {}
    for line in result.stdout.splitlines():
        if line.startswith(("HOSTFILE:", "LAUNCH:")):
            key, value = line.split(":", 1)
            plan[key] = value.strip()
        else:
            plan.update(field.split("=", 1) for field in line.split())
    return plan


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("slurm_tiny_bert"))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, scifact_dir) -> dict[str, Path]:
    """48 SciFact training pairs and a corpus of their positives plus the first 300 passages."""
    directory = tmp_path_factory.mktemp("slurm_data")
    with gzip.open(scifact_dir / "pairs.train.jsonl.gz", "rt") as f:
        pairs = [json.loads(line) for line, _ in zip(f, range(48))]
    positives = {pid for pair in pairs for pid in pair["pos_ids"]}
    with gzip.open(scifact_dir / "corpus.jsonl.gz", "rt") as f:
        docs = [json.loads(line) for line in f]
    corpus = [d for i, d in enumerate(docs) if i < 300 or d["_id"] in positives]
    paths = {"pairs": directory / "pairs.jsonl", "corpus": directory / "corpus.jsonl",
             "gen_corpus": directory / "gen_corpus.jsonl"}
    paths["pairs"].write_text("".join(json.dumps(p) + "\n" for p in pairs))
    paths["corpus"].write_text("".join(json.dumps(d) + "\n" for d in corpus))
    paths["gen_corpus"].write_text("".join(json.dumps(d) + "\n" for d in corpus[:12]))
    return paths


MINE_FLAGS = ["--k", "20", "--block-rows", "64", "--batch-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def mined_run(tmp_path_factory, tiny_model, small_data) -> Path:
    """A run directory mined by slurm/mine.sh with 2 torch ranks: negatives v1 and mining/spec.json."""
    run = tmp_path_factory.mktemp("slurm_mined") / "run"
    log = run.parent / "mine.log"
    job = sbatch("mine.sh", log, MINE_FLAGS, MINE_MODEL=str(tiny_model), MINE_CORPUS=str(small_data["corpus"]),
                 MINE_QUERIES=str(small_data["pairs"]), MINE_RUN_DIR=str(run))
    assert_completed(wait_for_job(job, log), log)
    return run


@pytest.fixture(scope="module")
def locally_mined_run(tmp_path_factory, tiny_model, small_data) -> Path:
    """The same mining in one process, without SLURM."""
    run = tmp_path_factory.mktemp("slurm_reference") / "run"
    subprocess.run([sys.executable, "-m", "mining", "mine", "--model", str(tiny_model), "--corpus",
                    str(small_data["corpus"]), "--queries", str(small_data["pairs"]), "--run-dir", str(run),
                    "--launcher", "none", "--threads", "1", *MINE_FLAGS],
                   cwd=REPO, env=job_env(), check=True, capture_output=True)
    return run


def train_overrides(model: Path, data: dict[str, Path], **extra: str) -> list[str]:
    overrides = {"model.path": str(model), "data.0.path": str(data["pairs"]), "data.0.corpus": str(data["corpus"]),
                 "train.progress": "false", **extra}
    return [f"{key}={value}" for key, value in overrides.items()]


def candidates(run: Path, version: int) -> tuple[np.ndarray, np.ndarray]:
    directory = run / "negatives" / f"v{version:06d}"
    return (np.load(directory / "candidates.npy", allow_pickle=False),
            np.load(directory / "scores.npy", allow_pickle=False))


# ------------------------------------------------------------------------------------------------- tests

def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; slurm/testing/start_cluster.sh does)")
    scripts = sorted(str(p) for p in [*SLURM_DIR.glob("*.sh"), *SLURM_DIR.glob("testing/*.sh")])
    result = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@needs_cluster
def test_train_plan_on_three_eight_gpu_nodes(tmp_path):
    """The launch plan derived from SLURM's variables for a job this machine cannot hold."""
    run = tmp_path / "run"
    (run / "mining").mkdir(parents=True)
    (run / "mining" / "spec.json").write_text("{}")  # the sidecar modes only check that it exists
    job = {"SLURM_JOB_NODELIST": "gpu[01-03]", "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_CPUS_ON_NODE": "96"}

    plan = dry_run({"RUN_DIR": str(run), "SIDECAR": "gpu"}, job, ["optim.lr=1e-5"])
    assert plan["HOSTFILE"].split() == ["gpu01"] * 7 + ["gpu02"] * 8 + ["gpu03"] * 8  # GPU 7 of gpu01: sidecar
    assert (plan["MASTER_ADDR"], plan["MASTER_PORT"], plan["WORLD_SIZE"]) == ("gpu01", str(20000 + 4242), "23")
    assert (plan["SIDECAR_NODE"], plan["SIDECAR_GPU"], plan["CPUS_PER_RANK"]) == ("gpu01", "7", "12")
    assert "'--ntasks=23' '--nodes=3' '--distribution=arbitrary'" in plan["LAUNCH"]
    assert "'optim.lr=1e-5' 'run_dir=" in plan["LAUNCH"] and "--resume" not in plan["LAUNCH"]

    plan = dry_run({"RUN_DIR": str(run), "SIDECAR": "step"}, {**job, "SLURM_RESTART_COUNT": "1"})
    assert plan["HOSTFILE"].split() == ["gpu01"] * 8 + ["gpu02"] * 8  # gpu03 runs the sidecar step
    assert (plan["SIDECAR_NODE"], plan["WORLD_SIZE"], plan["RESTARTS"]) == ("gpu03", "16", "1")
    assert "'--resume'" in plan["LAUNCH"]  # a requeued job resumes

    # No GPU: CPU_RANKS_PER_NODE ranks per node, the sidecar beside them.
    cpu_job = {"SLURM_JOB_NODELIST": "cpu[1-2]", "SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "32",
               "SLURM_GPUS_ON_NODE": "0"}
    plan = dry_run({"RUN_DIR": str(run), "SIDECAR": "gpu", "CPU_RANKS_PER_NODE": "4"}, cpu_job)
    assert plan["HOSTFILE"].split() == ["cpu1"] * 4 + ["cpu2"] * 4
    assert (plan["CPUS_PER_RANK"], plan["SIDECAR_NODE"], plan["SIDECAR_GPU"]) == ("8", "cpu1", "")


@needs_cluster
def test_train_plan_rejects_a_sidecar_on_a_one_gpu_node(tmp_path):
    env = job_env(DRY_RUN="1", RUN_DIR=str(tmp_path), SIDECAR="gpu", SLURM_JOB_NODELIST="gpu01", SLURM_JOB_ID="1",
                  SLURM_GPUS_ON_NODE="1")
    (tmp_path / "mining").mkdir()
    (tmp_path / "mining" / "spec.json").write_text("{}")
    result = subprocess.run(["bash", str(SLURM_DIR / "train.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "leaves the trainer no GPU" in result.stderr


@needs_cluster
@pytest.mark.parametrize("launcher", ["torch", "mpi"])
def test_mine_job_over_two_ranks_equals_one_process(launcher, mined_run, locally_mined_run, tmp_path, tiny_model,
                                                    small_data):
    """slurm/mine.sh's 2 srun ranks publish what one local process publishes."""
    if launcher == "torch":
        run = mined_run  # mined by the fixture through slurm/mine.sh with MINE_LAUNCHER=torch
    else:
        run, log = tmp_path / "run", tmp_path / "mine.log"
        job = sbatch("mine.sh", log, MINE_FLAGS, MINE_MODEL=str(tiny_model), MINE_CORPUS=str(small_data["corpus"]),
                     MINE_QUERIES=str(small_data["pairs"]), MINE_RUN_DIR=str(run), MINE_LAUNCHER="mpi")
        assert_completed(wait_for_job(job, log), log)
    assert (run / "mining" / "spec.json").exists()  # what the sidecar of train.sh reads
    refresh = json.loads((run / "mining" / "refreshes.jsonl").read_text().splitlines()[-1])
    assert refresh["world_size"] == 2
    ids, scores = candidates(run, 1)
    ref_ids, ref_scores = candidates(locally_mined_run, 1)
    assert ids.shape == (48, 20)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


@needs_cluster
def test_train_job_exports_and_runs_the_sidecar(mined_run, tmp_path, tiny_model, small_data):
    """sbatch slurm/train.sh: 2 CPU ranks train to the end and export; the sidecar, started beside them
    (SIDECAR=auto finds the spec slurm/mine.sh wrote), mines exports and is stopped when training ends."""
    run = tmp_path / "run"
    shutil.copytree(mined_run, run)
    log = tmp_path / "train.log"
    job = sbatch("train.sh", log, train_overrides(tiny_model, small_data, **{
        "train.max_steps": 30, "train.export_every": 5, "train.save_every": 15}),
        RUN_DIR=str(run), SIDECAR_ARGS="--poll-seconds 0.5 --no-progress")
    [record] = wait_for_job(job, log)
    assert_completed([record], log)
    assert record["Restarts"] == "0"

    record_json = json.loads((run / "run.json").read_text())
    assert (record_json["status"], record_json["final_step"], record_json["world_size"]) == ("completed", 30, 2)
    final_export = run / "exports" / "step_00000030"
    assert (final_export / "export.json").exists() and (final_export / "config.json").exists()
    embedding = Encoder.from_pretrained(final_export).encode(["a query"], show_progress=False)
    assert embedding.shape == (1, 32) and np.isfinite(embedding).all()

    text = log.read_text()
    assert "sidecar (gpu)" in text and "stopping the sidecar" in text
    assert "SIGTERM" in (run / "mining" / "sidecar.log").read_text()  # stopped by train.sh, not killed
    mined_steps = [json.loads((run / "negatives" / f"v{v:06d}" / "manifest.json").read_text())["model_step"]
                   for v in range(2, 100) if (run / "negatives" / f"v{v:06d}").exists()]
    assert mined_steps and set(mined_steps) <= set(range(5, 31, 5)), mined_steps  # exports the sidecar mined


@needs_cluster
def test_warning_signal_checkpoints_requeues_and_resumes(mined_run, tmp_path, tiny_model, small_data):
    """The time-limit warning (SIGUSR1 to the batch shell, as --signal=B:USR1@120 sends it): the ranks
    checkpoint, the job requeues itself and its second start resumes from that checkpoint to the end.
    The sidecar runs as its own job step here (SIDECAR=step)."""
    run = tmp_path / "run"
    shutil.copytree(mined_run, run)
    log = tmp_path / "train.log"
    max_steps = 20
    job = sbatch("train.sh", log, train_overrides(tiny_model, small_data, **{
        "train.max_steps": max_steps, "train.save_every": 1000, "train.export_every": 1000}),
        RUN_DIR=str(run), SIDECAR="step", SIDECAR_ARGS="--poll-seconds 0.5 --no-progress")
    wait_for_first_step(job, run, log)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)

    [record] = wait_for_job(job, log)
    assert_completed([record], log)
    assert record["Restarts"] == "1", read_log(log)
    text = log.read_text()
    assert "time-limit warning" in text and "requeueing job" in text
    assert text.count("sidecar (step)") == 2 and text.count("stopping the sidecar") == 2

    record_json = json.loads((run / "run.json").read_text())  # of the second start
    preempted_at = record_json["start_step"]
    assert 0 < preempted_at < max_steps, "the warning should have come mid-training"
    assert (record_json["status"], record_json["final_step"]) == ("completed", max_steps)
    assert "--resume" in record_json["argv"]
    assert (run / "checkpoints" / f"step_{preempted_at:08d}").is_dir()  # the warning's checkpoint
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(steps) == list(range(1, max_steps + 1))  # each step once, across both starts
    assert (run / "exports" / f"step_{max_steps:08d}" / "export.json").exists()


@needs_cluster
@pytest.mark.parametrize("server", ["running", "started_in_each_task"])
def test_data_gen_array_job_splits_the_corpus(server, tmp_path, small_data):
    """A 2-task array job: each task generates its shard against the local test server, either one
    already running or one the task starts (LLM_SERVER_CMD) and stops."""
    output, log = tmp_path / "gen", tmp_path / "gen_%a.log"
    settings = {"GEN_CORPUS": str(small_data["gen_corpus"]), "GEN_OUTPUT": str(output), "LLM_MODEL": "test-model"}
    with LLMServer() as running:
        if server == "running":
            settings["LLM_BASE_URL"] = running.url
        else:  # the test server on the port the task chose
            settings["LLM_SERVER_CMD"] = (
                f"exec {sys.executable} {REPO / 'tests' / 'llm_server.py'} --port $LLM_PORT --lifetime 300")
        job = sbatch("data_gen.sh", log, ["--no-progress"], ["--array=0-1"], **settings)
        records = wait_for_job(job)
    logs = "\n".join(read_log(tmp_path / f"gen_{i}.log") for i in range(2))
    assert len(records) == 2
    assert all((r["JobState"], r["ExitCode"]) == ("COMPLETED", "0:0") for r in records), logs

    sources = []
    for shard in range(2):
        summary = json.loads((output / f"summary-{shard:05d}-of-00002.json").read_text())
        assert summary["status"] == "complete", logs
        with open(output / f"pairs-{shard:05d}-of-00002.jsonl") as f:
            shard_sources = {json.loads(line)["provenance"]["source_id"] for line in f}
        sources.append(shard_sources)
    expected = {json.loads(line)["_id"] for line in small_data["gen_corpus"].read_text().splitlines()}
    assert not sources[0] & sources[1] and sources[0] | sources[1] == expected, logs
    if server == "running":
        assert running.requests and all(r["body"]["model"] == "test-model" for r in running.requests)
    else:
        assert logs.count("the LLM server answers") == 2 and not running.requests  # each task its own


@needs_cluster
def test_cancelled_job_is_not_requeued(tmp_path, tiny_model, small_data):
    """scancel (SIGTERM to the script and the ranks) ends the job: the trainer may checkpoint, but
    only the time-limit warning requeues."""
    run, log = tmp_path / "run", tmp_path / "train.log"
    job = sbatch("train.sh", log, train_overrides(tiny_model, small_data, **{"train.max_steps": 100000}),
                 RUN_DIR=str(run), SIDECAR="off")
    wait_for_first_step(job, run, log)
    subprocess.run(["scancel", job], check=True)

    [record] = wait_for_job(job, log)
    assert (record["JobState"], record["Restarts"]) == ("CANCELLED", "0"), read_log(log)
    assert "requeueing" not in log.read_text()
