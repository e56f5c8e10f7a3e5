"""Two ranks (mpiexec, torchrun) publish the same bytes as one process: real launchers, real processes."""
import json

import pytest

from embedlib.negstore import NegativeStore
from mining.distributed import detect_launcher
from mining_helpers import run_mining, scifact_slice


@pytest.fixture(scope="module")
def job_args(tmp_path_factory, scifact_dir, minilm_dir):
    corpus, pairs = scifact_slice(scifact_dir, tmp_path_factory.mktemp("slice"))
    # A real model, the positive-aware filter on and no search slack, so filtered queries are searched
    # again deeper: that loop's collectives run too. 64-row blocks: 5 blocks, 2 on rank 0 and 3 on rank 1.
    return ["--model", minilm_dir, "--corpus", corpus, "--queries", pairs, "--k", 30, "--max-length", 32,
            "--block-rows", 64, "--search-slack", 0]


def _mine(args, run_dir, launcher):
    result = run_mining("mine", *args, "--run-dir", run_dir, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    with NegativeStore(run_dir).open(1) as version:
        published = {name: (version.path / name).read_bytes() for name in ("candidates.npy", "scores.npy")}
    record = json.loads((run_dir / "mining" / "refreshes.jsonl").read_text().splitlines()[-1])
    return published, record


@pytest.fixture(scope="module")
def one_rank(job_args, tmp_path_factory):
    return _mine(job_args, tmp_path_factory.mktemp("one_rank"), "none")


@pytest.mark.parametrize("launcher", ["mpiexec", "torchrun"])
def test_two_ranks_publish_the_same_bytes_as_one(one_rank, job_args, tmp_path, launcher):
    published, record = _mine(job_args, tmp_path, launcher)  # its own cache: both ranks encode
    assert record["world_size"] == 2 and not record["cache_hit"]
    assert record["deepened_queries"] == one_rank[1]["deepened_queries"] > 0
    assert published == one_rank[0]


def test_launcher_detection():
    assert detect_launcher({}) == "none"
    assert detect_launcher({"PMI_RANK": "0", "PMI_SIZE": "2"}) == "mpi"
    assert detect_launcher({"OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"
    assert detect_launcher({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "1"}) == "mpi"
    assert detect_launcher({"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "8"}) == "none"  # sbatch script
    assert detect_launcher({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "PMI_SIZE": "2"}) == "torchrun"
