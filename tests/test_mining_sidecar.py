"""The sidecar as a real process beside a stand-in trainer (this test) that publishes exports: versions in
export order, SIGKILL in the middle of a pass and a restart, SIGTERM in the middle of a pass, a clean
stop when the run is finished."""
import json
import shutil
import signal
import subprocess
import time

import pytest

from embedlib.exports import publish_export
from embedlib.negstore import NegativeStore
from mining.spec import MiningSpec, save_spec
from mining_helpers import REPO, mining_command, mining_env, save_encoder, scifact_slice

TIMEOUT = 120


def _log(process) -> str:
    return process.log_path.read_text()[-4000:]


def _wait_for(condition, what, process, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError(f"sidecar exited ({process.returncode}) while waiting for {what}:\n{_log(process)}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}:\n{_log(process)}")


def _steps(store):
    steps = []
    for version in store.versions():
        with store.open(version, verify=False) as v:
            steps.append(v.manifest["model_step"])
    return steps


def _export(run, step, model):
    publish_export(run, step, lambda tmp: shutil.copytree(model, tmp, dirs_exist_ok=True))


def _start(run, log_path):
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            # every version kept: this test follows the numbering (tests/test_mining_prune.py: removal)
            mining_command("sidecar", "--run-dir", run, "--poll-seconds", 0.1, "--stop-when-finished",
                           "--keep-versions", 100),
            cwd=REPO, env=mining_env(), stdout=log, stderr=subprocess.STDOUT)
    process.log_path = log_path
    return process


@pytest.fixture
def sidecars():
    started = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sidecar_mines_new_exports_in_order_and_survives_sigkill_and_sigterm(scifact_dir, tiny_bert_dir, tmp_path, sidecars):
    corpus, pairs = scifact_slice(scifact_dir, tmp_path / "data")
    models = [save_encoder(tiny_bert_dir, tmp_path / f"model{seed}", seed=seed) for seed in range(5)]
    run = tmp_path / "run"
    save_spec(MiningSpec(corpus=str(corpus), pairs=str(pairs), k=20, positive_margin=None, block_rows=32), run)
    store = NegativeStore(run)

    sidecars.append(_start(run, tmp_path / "sidecar1.log"))
    _export(run, 100, models[0])
    _wait_for(lambda: _steps(store) == [100], "the version of step 100", sidecars[0])
    _export(run, 200, models[1])
    _export(run, 300, models[2])  # perhaps before the sidecar saw 200: then 200 is skipped
    _wait_for(lambda: _steps(store)[-1:] == [300], "the version of step 300", sidecars[0])
    assert _steps(store) in ([100, 200, 300], [100, 300])

    # Kill it as soon as it starts encoding with the next export's model: mid-pass.
    _export_and_wait_for_the_pass(run, 400, models[3], sidecars[0])
    sidecars[0].send_signal(signal.SIGKILL)
    sidecars[0].wait()
    before = _steps(store)

    sidecars.append(_start(run, tmp_path / "sidecar2.log"))
    _wait_for(lambda: _steps(store)[-1:] == [400], "the version of step 400 after the restart", sidecars[1])
    steps = _steps(store)
    assert steps == before + [400] or (before[-1] == 400 and steps == before), (before, steps, _log(sidecars[1]))
    assert store.versions() == list(range(1, len(steps) + 1))  # numbering goes on without gaps
    assert not _temporary_files(run)  # the killed pass's leftovers were removed at the restart

    # SIGTERM in the middle of a pass: a clean exit that leaves no temporary files of its own.
    _export_and_wait_for_the_pass(run, 500, models[4], sidecars[1])
    sidecars[1].send_signal(signal.SIGTERM)
    assert sidecars[1].wait(timeout=TIMEOUT) == 0, _log(sidecars[1])
    assert not _temporary_files(run) and "stopped by SIGTERM" in _log(sidecars[1])

    sidecars.append(_start(run, tmp_path / "sidecar3.log"))
    _wait_for(lambda: _steps(store)[-1:] == [500], "the version of step 500", sidecars[2])
    (run / "run.json").write_text(json.dumps({"status": "completed"}))
    assert sidecars[2].wait(timeout=TIMEOUT) == 0 and "the run is finished" in _log(sidecars[2])
    steps = _steps(store)
    assert steps[-2:] == [400, 500] and store.versions() == list(range(1, len(steps) + 1))

    records = [json.loads(line) for line in (run / "mining" / "refreshes.jsonl").read_text().splitlines()]
    # A kill between publishing a version and logging it loses the log line, nothing else.
    assert [r["export_step"] for r in records] in (steps, [s for s in steps if s != 400]), (records, steps)
    for r in records:
        assert r["mode"] == "sidecar" and r["num_queries"] == 40 and r["k"] == 20
        assert r["encode_seconds"] >= 0 and r["search_seconds"] >= 0


def _export_and_wait_for_the_pass(run, step, model, sidecar):
    """Publish an export and return once the sidecar has begun encoding with it (its cache entry appears)."""
    cache = run / "mining" / "cache"
    known = set(cache.iterdir())
    _export(run, step, model)
    _wait_for(lambda: set(cache.iterdir()) - known, f"the pass for step {step} to start", sidecar)


def _temporary_files(run):
    return [p for p in (run / "negatives").iterdir() if p.name.startswith(".tmp-")] + [
        p for p in (run / "mining" / "cache").rglob("*") if ".tmp-" in p.name]
