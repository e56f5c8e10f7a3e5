"""Bounded disk: after each pass the sidecar removes all but the newest --keep-versions versions of the
negative store (never the newest, never one another process holds open) and all but --keep-cache model
entries of the embedding cache."""
import json
import logging
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import mining.sidecar
from embedlib.exports import publish_export
from embedlib.negstore import NegativeStore
from mining.distributed import LocalComm
from mining.job import mine, prune_versions
from mining.sidecar import SidecarConfig, run_sidecar
from mining.spec import MiningSpec, save_spec
from mining_helpers import save_encoder, scifact_slice
from negstore_worker import check_version, publish_seed

WORKER = Path(__file__).with_name("negstore_worker.py")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture
def holders():
    """Processes that hold a version open (tests/negstore_worker.py hold), killed at the end."""
    started = []

    def hold(run_dir: Path, version: int) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, str(WORKER), "hold", str(run_dir), str(version)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(process)
        for line in process.stdout:  # READY, then HOLDING once the version's lock is taken
            if line.startswith("HOLDING"):
                return process
        raise AssertionError(f"the holder never held v{version}: {process.stderr.read()}")

    yield hold
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def _bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _version_bytes(store: NegativeStore, version: int) -> int:
    return _bytes(store.root / f"v{version:06d}")


def test_fifty_versions_stay_within_keep_plus_the_held_one(tmp_path, holders, caplog):
    keep, held = 3, 2
    store = NegativeStore(tmp_path)
    publish_seed(store, 1, rows=64)
    publish_seed(store, 2, rows=64)
    holder = holders(tmp_path, held)
    caplog.set_level(logging.INFO, logger="mining")

    removed_all, largest = [], 0
    for seed in range(3, 51):
        version = publish_seed(store, seed, rows=64)
        largest = max(largest, _version_bytes(store, version))
        removed_all += prune_versions(tmp_path, keep)  # what the sidecar calls after each publish
        versions = store.versions()
        assert versions[-1] == version == seed  # the newest is never removed
        assert held in versions and set(versions) <= {held, *range(version - keep + 1, version + 1)}, versions
        assert len(versions) <= keep + 1
        assert _bytes(store.root) <= (keep + 1) * largest + 4096, "the store grew beyond keep + held versions"
        assert not [p for p in store.root.iterdir() if p.name.startswith((".tmp-", ".trash-"))]

    assert sorted(removed_all) == [1, *range(3, 48)]  # each removed once, the held one never
    assert "removed negatives v000001" in caplog.text
    with store.open(held) as opened:  # the held version is intact
        assert check_version(opened) == []

    holder.kill()
    holder.wait()
    assert prune_versions(tmp_path, keep) == [held]  # a dead reader pins nothing
    assert store.versions() == [48, 49, 50]


def test_prune_keeps_everything_when_there_is_no_more_than_keep(tmp_path):
    store = NegativeStore(tmp_path)
    assert prune_versions(tmp_path, 3) == []  # no store yet
    for seed in (1, 2, 3):
        publish_seed(store, seed, rows=8)
    assert prune_versions(tmp_path, 3) == [] and store.versions() == [1, 2, 3]
    assert prune_versions(tmp_path, 1) == [1, 2] and store.versions() == [3]


def test_sidecar_removes_old_versions_and_cache_entries_after_each_pass(scifact_dir, tiny_bert_dir, tmp_path,
                                                                       holders, monkeypatch, caplog):
    corpus, pairs = scifact_slice(scifact_dir, tmp_path / "data")
    models = [save_encoder(tiny_bert_dir, tmp_path / f"model{seed}", seed=seed) for seed in range(5)]
    run = tmp_path / "run"
    spec = MiningSpec(corpus=str(corpus), pairs=str(pairs), k=20, positive_margin=None, block_rows=64)
    save_spec(spec, run)
    mine(spec, models[0], run, LocalComm(), show_progress=False)  # v1, held open by "the trainer"
    holders(run, 1)

    # Exports appear one at a time, each when the sidecar has nothing to do and sleeps; then the run ends.
    exports = [(step, model) for step, model in zip((10, 20, 30, 40), models[1:])]
    seen = []

    def sleep(_seconds):
        seen.append(NegativeStore(run).versions())
        if exports:
            step, model = exports.pop(0)
            publish_export(run, step, lambda tmp: shutil.copytree(model, tmp, dirs_exist_ok=True))
        else:
            (run / "run.json").write_text(json.dumps({"status": "completed"}))

    monkeypatch.setattr(mining.sidecar, "time", types.SimpleNamespace(sleep=sleep))
    caplog.set_level(logging.INFO, logger="mining")
    config = SidecarConfig(run, poll_seconds=0.01, stop_when_finished=True, keep_versions=2, keep_cache_models=2,
                           show_progress=False)
    assert run_sidecar(config) == 4

    # The held v1 survives; each pass leaves the newest 2 besides it.
    assert seen == [[1], [1, 2], [1, 2, 3], [1, 3, 4], [1, 4, 5]]
    assert NegativeStore(run).versions() == [1, 4, 5]
    records = [json.loads(line) for line in (run / "mining" / "refreshes.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["version"], r["removed_versions"]) for r in records] == [
        ("mine", 1, []), ("sidecar", 2, []), ("sidecar", 3, []), ("sidecar", 4, [2]), ("sidecar", 5, [3])]
    assert "removed negatives v000002" in caplog.text and "removed negatives v000003" in caplog.text
    # Five models were mined with; the cache keeps the entries of the newest two.
    assert len([p for p in (run / "mining" / "cache").iterdir() if p.is_dir()]) == 2


def test_sidecar_stops_after_a_signal_whose_exception_a_finalizer_dropped(scifact_dir, tiny_bert_dir, tmp_path,
                                                                         monkeypatch):
    """A SIGTERM that lands while a __del__ runs has its exception printed and dropped by Python: the
    sidecar must still stop (at the top of its loop) instead of mining on until it is killed."""
    import os
    import signal

    import mining.job

    corpus, pairs = scifact_slice(scifact_dir, tmp_path / "data")
    run = tmp_path / "run"
    save_spec(MiningSpec(corpus=str(corpus), pairs=str(pairs), k=20, positive_margin=None, block_rows=64), run)
    for step in (10, 20, 30):
        publish_export(run, step, lambda tmp: shutil.copytree(tiny_bert_dir, tmp, dirs_exist_ok=True))
    passes = []

    def mine_then_lose_the_signal(*_args, model_step, **_kwargs):
        passes.append(model_step)
        if len(passes) > 3:
            raise AssertionError(f"the sidecar went on mining after SIGTERM: {passes}")
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, as it would inside a finalizer
        except BaseException:  # what Python does with an exception raised in __del__
            pass

    def sleep(_seconds):
        raise AssertionError("the sidecar went on polling after SIGTERM")

    monkeypatch.setattr(mining.job, "mine", mine_then_lose_the_signal)
    monkeypatch.setattr(mining.sidecar, "time", types.SimpleNamespace(sleep=sleep))
    previous = signal.getsignal(signal.SIGTERM)
    assert run_sidecar(SidecarConfig(run, poll_seconds=0.01, every=1, show_progress=False)) == 1
    assert passes == [30]  # the newest export, once
    assert signal.getsignal(signal.SIGTERM) is previous
