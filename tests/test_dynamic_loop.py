"""The trainer and the mining sidecar as one loop, on CPU: 2 real training ranks (torchrun, DeepSpeed over
gloo) and `python -m mining sidecar` as a real subprocess over one run directory, on a tiny BERT and a
SciFact slice. New versions are adopted by both ranks at the same step, stale samples move windows,
a SIGKILLed sidecar does not stop training (the trainer warns once, and picks up versions again when
a new sidecar comes back), and a resume restores the dynamic negatives state from the checkpoint."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from embedlib.negstore import NegativeStore
from mining_helpers import mining_command, mining_env, run_mining, scifact_slice
from test_training_runs import BIN, QUICKSTART, REPO, _free_port
from training.checkpoint import list_checkpoints
from training.negatives import STATE_FILENAME
from training.metrics import read_metrics

TIMEOUT = 240
TASK = "scifact"  # the quickstart recipe's data set


def _trainer_command(run: Path, model: Path, corpus: Path, pairs: Path, max_steps: int, resume: bool) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
            "training/main.py", "--config", str(QUICKSTART), *(["--resume"] if resume else []),
            f"run_dir={run}", f"model.path={model}", "model.max_length=32", f"data.0.path={pairs}",
            f"data.0.corpus={corpus}", "data.0.batch_size=4", "data.0.num_negatives=3", "data.0.neg_offset=2",
            f"train.max_steps={max_steps}", "train.num_workers=1", "train.save_every=0", "train.export_every=3",
            "train.keep_exports=2", "train.progress=false", "optim.lr=1e-3", "optim.warmup_steps=1",
            "optim.schedule=constant",
            # Thresholds a tiny random model meets within a few steps (the rule is the paper's):
            # stale once s falls below s0 at all.
            "negatives.check_interval=4", "negatives.stale_ratio=1.0", "negatives.stale_abs_max=2.0",
            "negatives.sidecar_timeout_s=8"]


class _Processes:
    def __init__(self):
        self.started: list[subprocess.Popen] = []

    def start(self, command, log_path: Path, **kwargs) -> subprocess.Popen:
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, **kwargs)
        process.log_path = log_path
        self.started.append(process)
        return process


@pytest.fixture
def processes():
    tracked = _Processes()
    yield tracked
    for process in tracked.started:
        if process.poll() is None:
            process.kill()
            process.wait()


def _log(process) -> str:
    return process.log_path.read_text()[-6000:]


def _wait_for(condition, what: str, trainer, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if trainer.poll() is not None:
            raise AssertionError(f"the trainer exited ({trainer.returncode}) waiting for {what}:\n{_log(trainer)}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n{_log(trainer)}")


def _wait_exit(process, what: str) -> int:
    try:
        return process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"timed out waiting for {what}:\n{_log(process)}") from None


def _versions(records: list[dict]) -> list[int]:
    return sorted({r["negatives_version"][TASK] for r in records})


def _rank_logs(run: Path) -> str:
    """Every rank's log file (INFO lines, such as adoptions, go there rather than to the console)."""
    return "".join(path.read_text() for path in sorted((run / "logs").glob("trainer.rank*.log")))


def _adoptions(output: str) -> dict[int, dict[int, int]]:
    """version -> {rank: step} from the ranks' log lines."""
    found: dict[int, dict[int, int]] = {}
    for rank, version, step in re.findall(rf"rank (\d+): {TASK} adopts negatives v(\d+) .* at step (\d+)", output):
        found.setdefault(int(version), {})[int(rank)] = int(step)
    return found


def _state(run: Path, step: int) -> dict[str, np.ndarray]:
    arrays = load_file(str(run / "checkpoints" / f"step_{step:08d}" / STATE_FILENAME))
    return {key.removeprefix(f"{TASK}/"): value for key, value in arrays.items()}


@pytest.mark.slow
def test_trainer_and_sidecar_as_one_loop(scifact_dir, tiny_bert_dir, tmp_path, processes):
    corpus, pairs = scifact_slice(scifact_dir, tmp_path / "data", num_pairs=32, num_docs=400)
    run = tmp_path / "run"
    mined = run_mining("mine", "--model", tiny_bert_dir, "--corpus", corpus, "--queries", pairs, "--run-dir", run,
                       "--k", 40, "--positive-margin", "off", "--max-length", 32, "--block-rows", 128)
    assert mined.returncode == 0, mined.stderr[-3000:]

    sidecar = processes.start(mining_command("sidecar", "--run-dir", run, "--poll-seconds", 0.2),
                              tmp_path / "sidecar1.log", cwd=REPO, env=mining_env())
    env = {**mining_env(), "PYTHONUNBUFFERED": "1"}
    trainer = processes.start(_trainer_command(run, tiny_bert_dir, corpus, pairs, 100000, resume=False),
                              tmp_path / "trainer.log", cwd=REPO, env=env)

    # Two versions mined by the sidecar from the trainer's exports, on top of the first one, and a
    # check that found stale samples.
    _wait_for(lambda: len(_versions(read_metrics(run))) >= 3, "two versions from the sidecar", trainer)
    _wait_for(lambda: any(r.get(f"negatives/{TASK}/stale", 0) > 0 for r in read_metrics(run)),
              "a check with stale samples", trainer)

    # SIGKILL the sidecar: training goes on, and says once that the sidecar looks dead.
    # (A slow machine can make the live sidecar look dead for a while before this: count from here.)
    deaths_before = trainer.log_path.read_text().count("looks dead")
    sidecar.send_signal(signal.SIGKILL)
    sidecar.wait()
    killed_at = read_metrics(run)[-1]["step"]
    _wait_for(lambda: trainer.log_path.read_text().count("looks dead") > deaths_before, "the dead-sidecar warning",
              trainer)
    dead_at = read_metrics(run)[-1]["step"]
    _wait_for(lambda: read_metrics(run)[-1]["step"] >= dead_at + 8, "more steps without a sidecar", trainer)
    assert any(r.get("negatives/sidecar_alive") is False for r in read_metrics(run) if r["step"] > killed_at)

    # A new sidecar: versions are picked up again, and the trainer says so.
    versions_before = _versions(read_metrics(run))
    processes.start(mining_command("sidecar", "--run-dir", run, "--poll-seconds", 0.2),
                    tmp_path / "sidecar2.log", cwd=REPO, env=mining_env())
    _wait_for(lambda: _versions(read_metrics(run))[-1] > versions_before[-1], "a version after the restart",
              trainer)
    # Stop the sidecar first and let the trainer adopt whatever it published last, so that the
    # checkpoint holds the newest version.
    processes.started[-1].send_signal(signal.SIGTERM)
    _wait_exit(processes.started[-1], "the sidecar's exit after SIGTERM")
    newest = NegativeStore(run).latest_version()
    _wait_for(lambda: read_metrics(run)[-1]["negatives_version"][TASK] == newest, "the newest version", trainer)
    # A few steps with it, so that the checkpoint holds scores observed since the adoption reset them.
    adopted_by = read_metrics(run)[-1]["step"]
    _wait_for(lambda: read_metrics(run)[-1]["step"] >= adopted_by + 3, "steps with the newest version", trainer)
    trainer.send_signal(signal.SIGTERM)  # preemption: checkpoint the current step and exit
    trainer.wait(timeout=TIMEOUT)  # torchrun itself exits with 1 on SIGTERM; the record says what happened
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "preempted", _log(trainer)
    stopped_at = record["final_step"]

    output = trainer.log_path.read_text()
    warnings = re.findall(r"the mining sidecar (looks dead|is back)", output)
    assert warnings[0] == "looks dead" and "is back" in warnings, output[-6000:]
    assert all(a != b for a, b in zip(warnings, warnings[1:])), warnings  # each said once per death

    # Every version was adopted by both ranks at the same step, the one metrics.jsonl shows it from.
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, stopped_at + 1))
    adoptions = _adoptions(_rank_logs(run))
    assert adoptions[1] == {0: 0, 1: 0}  # the first mined version, before step 1
    sidecar_versions = [v for v in _versions(records) if v > 1]
    assert len(sidecar_versions) >= 3
    for version in sidecar_versions:
        steps = adoptions[version]
        assert set(steps) == {0, 1} and steps[0] == steps[1], (version, steps)
        assert next(r["step"] for r in records if r["negatives_version"][TASK] == version) == steps[0]

    # Checks every 4 steps report the figures; stale samples moved to later windows.
    checks = [r for r in records if f"negatives/{TASK}/stale" in r]
    assert [r["step"] for r in checks] == list(range(4, stopped_at + 1, 4))
    for r in checks:
        assert r[f"negatives/{TASK}/version"] in _versions(records)
        assert r[f"negatives/{TASK}/export_age_steps"] >= 0 and r[f"negatives/{TASK}/unobserved"] >= 0
    assert sum(r[f"negatives/{TASK}/stale"] for r in checks) > 0
    saved = _state(run, stopped_at)
    assert saved["window"].max() >= 2 and saved["version"][0] == records[-1]["negatives_version"][TASK]

    # Resume for 2 more steps with no sidecar: the checkpoint's state and version carry on.
    (run / "logs").rename(run / "logs.before-resume")  # the resumed ranks start new log files
    result = subprocess.run(_trainer_command(run, tiny_bert_dir, corpus, pairs, stopped_at + 2, resume=True),
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["start_step"] == stopped_at
    resumed = read_metrics(run)[stopped_at:]
    assert [r["negatives_version"][TASK] for r in resumed] == [int(saved["version"][0])] * 2
    assert not _adoptions(_rank_logs(run))  # the checkpoint's version, not a fresh adoption
    final = _state(run, stopped_at + 2)
    assert (final["window"] >= saved["window"]).all() and (final["generation"] >= saved["generation"]).all()
    # Samples with the same negatives as at the checkpoint keep the s0 it held. There may be none: with
    # s0 the store's mining score and stale_ratio 1.0 nearly every judged sample is stale, so a checkpoint
    # at a check step holds almost no s0 (which steps it lands on is the machine's timing); the exact
    # resume of the whole state is proven by test_training_runs' seeded dynamic-negatives run.
    unchanged = (final["generation"] == saved["generation"]) & ~np.isnan(saved["initial_score"])
    np.testing.assert_array_equal(final["initial_score"][unchanged], saved["initial_score"][unchanged])
    assert [step for step, _ in list_checkpoints(run)][-1] == stopped_at + 2
