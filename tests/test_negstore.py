"""The negative store: round trip, validation, crash safety under SIGKILL, damage detection with
fallback, concurrent reader and writer processes, and gc that respects live readers."""
from __future__ import annotations

import gc as garbage_collector
import hashlib
import json
import logging
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from embedlib import negstore
from embedlib.negstore import NegativeStore, NegativeStoreError
from negstore_worker import CORPUS_SIZE, check_version, expected_arrays
from negstore_worker import publish_seed as publish

WORKER = Path(__file__).with_name("negstore_worker.py")
META = dict(corpus_fingerprint="c", queries_fingerprint="q", model_path="m", model_step=4)


class Worker:
    """A tests/negstore_worker.py process whose stdout lines arrive on a queue."""

    def __init__(self, *args: object):
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def expect(self, prefix: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        self.kill()
        raise AssertionError(f"worker never printed {prefix!r}; stderr:\n{self.proc.stderr.read()}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def wait_ok(self, timeout: float = 60) -> None:
        assert self.proc.wait(timeout) == 0, self.proc.stderr.read()


def debris(store: NegativeStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.name.startswith((".tmp-", ".trash-")))


def assert_serves(store: NegativeStore, version: int, seed: int) -> None:
    """open_latest returns `version`, checksums verify, and every row is the content of `seed`."""
    with store.open_latest(verify=True) as opened:
        assert opened.version == version
        assert opened.manifest["extra"]["seed"] == seed
        assert check_version(opened) == []


def mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


# ---- round trip ------------------------------------------------------------------------------


def test_publish_and_read_round_trip(tmp_path):
    store = NegativeStore(tmp_path)
    assert store.versions() == [] and store.latest_version() is None and store.open_latest() is None

    ids, scores = expected_arrays(1)
    version = store.publish(
        ids, scores.astype(np.float64), corpus_fingerprint="c" * 64, queries_fingerprint="q" * 64,
        model_path=tmp_path / "exports" / "step_00000100", model_step=100, corpus_size=CORPUS_SIZE,
        extra={"seed": 1, "faiss_index": "flat"},
    )
    assert version == 1 and store.versions() == [1]

    with store.open_latest() as opened:
        assert (opened.version, opened.num_queries, opened.k) == (1, *ids.shape)
        # Memory-mapped, not loaded: both data files appear in this process's mappings.
        assert str(opened.path / "candidates.npy") in mapped_files()
        assert str(opened.path / "scores.npy") in mapped_files()
        assert check_version(opened) == []
        # Padding is stripped: row 3 is padded, row 5 has no candidate at all, row 1 is full.
        row3_ids, row3_scores = opened.candidates(3)
        assert 0 < len(row3_ids) < opened.k and len(row3_scores) == len(row3_ids)
        assert (row3_ids >= 0).all() and not np.isnan(row3_scores).any()
        assert len(opened.candidates(5)[0]) == 0 and len(opened.candidates(1)[0]) == opened.k
        assert opened.candidates(1)[0].dtype == np.int32 and opened.candidates(1)[1].dtype == np.float32
        with pytest.raises(IndexError):
            opened.candidates(opened.num_queries)

        manifest = opened.manifest
        assert manifest["format_version"] == 1 and manifest["version"] == 1
        datetime.strptime(manifest["created_at"], "%Y-%m-%dT%H:%M:%SZ")
        assert manifest["model_path"] == str(tmp_path / "exports" / "step_00000100")
        assert manifest["model_step"] == 100
        assert manifest["corpus_fingerprint"] == "c" * 64 and manifest["queries_fingerprint"] == "q" * 64
        assert [manifest["num_queries"], manifest["k"]] == list(ids.shape)
        assert manifest["corpus_size"] == CORPUS_SIZE
        assert manifest["extra"] == {"seed": 1, "faiss_index": "flat"}
        for name, dtype in (("candidates.npy", "int32"), ("scores.npy", "float32")):
            data = (opened.path / name).read_bytes()
            assert manifest["files"][name] == {
                "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "dtype": dtype,
                "shape": list(ids.shape),
            }
        assert json.loads((opened.path / "manifest.json").read_text()) == manifest
        files = sorted(p.name for p in opened.path.iterdir())
        assert files == ["candidates.npy", "manifest.json", "scores.npy"]
    with pytest.raises(NegativeStoreError, match="closed"):
        opened.candidates(0)
    del opened
    garbage_collector.collect()
    assert str(store.root / "v000001" / "candidates.npy") not in mapped_files()

    assert publish(store, 2) == 2
    assert_serves(store, 2, seed=2)
    with store.open(1) as first:
        assert check_version(first) == []
    with pytest.raises(NegativeStoreError, match="does not exist"):
        store.open(7)


def test_streaming_writer(tmp_path):
    store = NegativeStore(tmp_path)
    ids, scores = expected_arrays(3)
    with store.begin(len(ids), ids.shape[1], corpus_fingerprint="c", queries_fingerprint="q",
                     model_path="m", model_step=3, extra={"seed": 3}) as writer:
        writer.write(200, ids[200:], scores[200:])  # blocks in any order
        writer.write(0, ids[:100], scores[:100])
        with pytest.raises(NegativeStoreError, match="never written.*row 100"):
            writer.commit()
        writer.write(100, ids[100:200], scores[100:200])
        with pytest.raises(ValueError, match="outside"):
            writer.write(len(ids) - 1, ids[:2], scores[:2])
        assert writer.commit() == 1
    assert_serves(store, 1, seed=3)

    # An exception inside the block, or leaving it without commit(), discards everything.
    with pytest.raises(RuntimeError, match="mining failed"):
        with store.begin(10, 4, **META) as w:
            w.write(0, np.zeros((5, 4), np.int32), np.zeros((5, 4), np.float32))
            raise RuntimeError("mining failed")
    with store.begin(10, 4, **META):
        pass
    assert store.versions() == [1] and debris(store) == []
    with pytest.raises(TypeError):  # extra must be JSON, checked before any work
        store.begin(10, 4, **META, extra={"bad": object()})


def test_commit_that_loses_the_race_for_a_number_takes_the_next(tmp_path, monkeypatch):
    store = NegativeStore(tmp_path)
    publish(store, 1)
    ids, scores = expected_arrays(2)
    with store.begin(*ids.shape, **META, extra={"seed": 2}) as writer:
        writer.write(0, ids, scores)
        # As if another publisher took v000001 after we looked: the first attempt collides.
        stale = iter([0])
        real_latest = store.latest_version
        monkeypatch.setattr(store, "latest_version", lambda: next(stale, None) or real_latest())
        assert writer.commit() == 2
    with store.open(1) as first:
        assert first.manifest["extra"]["seed"] == 1 and check_version(first) == []
    assert_serves(store, 2, seed=2)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda ids, s: ids.__setitem__((4, 2), 1000), r"row 4, rank 2: id 1000 outside corpus_size 1000"),
        (lambda ids, s: ids.__setitem__((7, 0), -2), r"row 7, rank 0: id -2 < -1"),
        (lambda ids, s: ids.__setitem__((2, 3), -1), r"row 2, rank 4: a candidate after -1 padding"),
        (lambda ids, s: s.__setitem__((8, 5), 99.0), r"row 8, rank 5: score 99.0 > .* rank order"),
        (lambda ids, s: s.__setitem__((1, 0), np.nan), r"row 1, rank 0: NaN score"),
    ],
)
def test_publish_rejects_bad_rows(tmp_path, edit, message):
    store = NegativeStore(tmp_path)
    ids, scores = expected_arrays(4)
    edit(ids, scores)
    with pytest.raises(ValueError, match=message):
        store.publish(ids, scores, corpus_fingerprint="c", queries_fingerprint="q", model_path="m",
                      model_step=1, corpus_size=CORPUS_SIZE)
    assert store.versions() == [] and debris(store) == []


def test_publish_rejects_bad_arrays(tmp_path):
    store = NegativeStore(tmp_path)
    kwargs = dict(corpus_fingerprint="c", queries_fingerprint="q", model_path="m", model_step=1)
    ids, scores = expected_arrays(1)
    with pytest.raises(ValueError, match="integer"):
        store.publish(ids.astype(np.float32), scores, **kwargs)
    with pytest.raises(ValueError, match="floating"):
        store.publish(ids, ids, **kwargs)
    with pytest.raises(ValueError, match="one shape"):
        store.publish(ids, scores[:, :-1], **kwargs)
    with pytest.raises(ValueError, match="k >= 1"):
        store.publish(np.zeros((3, 0), np.int32), np.zeros((3, 0), np.float32), **kwargs)
    with pytest.raises(ValueError, match="int32 range"):
        store.publish(ids.astype(np.int64) + 2**31, scores, **kwargs)
    assert store.versions() == [] and debris(store) == []


# ---- crash safety ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "point", ["begin", "mid_write", "after_data", "after_manifest", "before_rename", "after_rename"]
)
def test_publisher_killed_at_any_step_leaves_readers_consistent(tmp_path, point):
    store = NegativeStore(tmp_path)
    assert publish(store, 1) == 1
    writer = Worker("publish", tmp_path, 2, "--pause", point)
    writer.expect(f"PAUSED {point}")
    if point == "after_rename":
        assert_serves(store, 2, seed=2)
    else:
        assert_serves(store, 1, seed=1)  # an unfinished publication is invisible
    if point in ("begin", "mid_write"):  # (later points hold the store lock: cleanup would wait)
        assert store.cleanup_tmp() == [] and len(debris(store)) == 1, "removed a live writer's directory"
    writer.kill()

    if point == "after_rename":  # published and complete: only the lock release was lost
        assert_serves(store, 2, seed=2)
        expected_next = 3
    else:
        assert store.versions() == [1]
        assert_serves(store, 1, seed=1)
        expected_next = 2
    store.cleanup_tmp()
    assert debris(store) == []
    assert publish(store, 5) == expected_next
    assert_serves(store, expected_next, seed=5)


def test_gc_killed_midway_leaves_only_trash(tmp_path):
    store = NegativeStore(tmp_path)
    for seed in (1, 2, 3):
        publish(store, seed)
    collector = Worker("gc", tmp_path, 1, "--pause", "gc_rmtree")
    collector.expect("PAUSED gc_rmtree")
    collector.kill()
    assert store.versions() == [2, 3] and len(debris(store)) == 1
    assert_serves(store, 3, seed=3)
    assert store.gc(1) == [2] and debris(store) == []


def test_publisher_killed_at_random_moments(tmp_path):
    store = NegativeStore(tmp_path)
    rng = random.Random(0)
    seed = 1
    for _ in range(5):
        writer = Worker("publish-loop", tmp_path, seed, 1000, "--keep", 3, "--rows", 3000)
        writer.expect("READY")
        time.sleep(rng.uniform(0.0, 0.4))
        writer.kill()
        # Whatever the moment, the newest version is complete and matches its manifest's seed.
        published = store.versions()
        if published:
            with store.open_latest(verify=True) as opened:
                assert opened.version == published[-1] and check_version(opened) == []
            seed = opened.manifest["extra"]["seed"] + 1
        store.cleanup_tmp()
        assert debris(store) == []
    newest = store.latest_version() or 0
    assert newest >= 1, "the publisher never got a version out: the kill loop tested nothing"
    assert publish(store, 99) == newest + 1
    for version in store.versions():
        with store.open(version, verify=True) as opened:
            assert check_version(opened) == []


# ---- damage ----------------------------------------------------------------------------------


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 4)


def rewrite_manifest(path: Path, **changes) -> None:
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage, verify, reason",
    [
        (lambda v: flip_last_byte(v / "scores.npy"), True, "scores.npy has sha256"),
        (lambda v: flip_last_byte(v / "candidates.npy"), True, "candidates.npy has sha256"),
        (lambda v: truncate(v / "candidates.npy"), False, "candidates.npy has .* bytes, the manifest"),
        (lambda v: (v / "scores.npy").unlink(), False, "No such file"),
        (lambda v: (v / "manifest.json").write_text('{"format_version": 1, "vers'), False, "unreadable"),
        (lambda v: (v / "manifest.json").unlink(), False, "no manifest.json"),
        (lambda v: rewrite_manifest(v / "manifest.json", format_version=2), False, "format_version 2"),
        (lambda v: rewrite_manifest(v / "manifest.json", k=3), False, r"expected int32 \[.*, 3\]"),
    ],
)
def test_damaged_newest_version_falls_back_with_warning(tmp_path, caplog, damage, verify, reason):
    store = NegativeStore(tmp_path)
    publish(store, 1)
    publish(store, 2)
    damage(store.root / "v000002")
    reader = NegativeStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger="embedlib.negstore"):
        with reader.open_latest(verify=verify) as opened:
            assert opened.version == 1 and check_version(opened) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "v000002" in warnings[0], warnings
    assert re.search(reason, warnings[0]), warnings[0]
    with pytest.raises(NegativeStoreError, match=reason):
        reader.open(2, verify=verify)


def test_checksum_damage_is_invisible_to_size_checks_but_caught_by_verify(tmp_path):
    store = NegativeStore(tmp_path)
    publish(store, 1)
    flip_last_byte(store.root / "v000001" / "scores.npy")
    with store.open_latest(verify=False) as opened:  # same size: opens (the hot path trusts sizes)
        with pytest.raises(NegativeStoreError, match="sha256"):
            opened.verify_checksums()
    with pytest.raises(NegativeStoreError, match="every negatives version .* is damaged"):
        store.open_latest(verify=True)


def test_checksums_verified_once_per_store_and_thread_safe(tmp_path, monkeypatch):
    store = NegativeStore(tmp_path)
    publish(store, 1)
    hashed = []
    real_sha256 = negstore._sha256_file

    def counting_sha256(path, fsync=False):
        hashed.append(path.name)
        time.sleep(0.05)  # widen the window in which threads could race
        return real_sha256(path, fsync)

    monkeypatch.setattr(negstore, "_sha256_file", counting_sha256)
    reader = NegativeStore(tmp_path)
    with reader.open_latest(verify=False) as opened:
        threads = [threading.Thread(target=opened.verify_checksums) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        opened.verify_checksums()
    with reader.open_latest(verify=True):
        pass
    assert sorted(hashed) == ["candidates.npy", "scores.npy"]
    with NegativeStore(tmp_path).open_latest(verify=True):  # another reader object checks again
        pass
    assert len(hashed) == 4


# ---- concurrency and gc ----------------------------------------------------------------------


def test_concurrent_reader_never_sees_a_partial_version(tmp_path):
    versions = 25
    reader = Worker("read-loop", tmp_path, versions, 60)
    reader.expect("READY")
    writer = Worker("publish-loop", tmp_path, 1, versions, "--keep", 2)
    writer.wait_ok()
    report = json.loads("{" + reader.expect("{", timeout=60))
    reader.wait_ok()
    assert report["problems"] == []
    assert report["versions_seen"][-1] == versions
    assert len(report["versions_seen"]) >= 2, report  # it did read while versions were published
    store = NegativeStore(tmp_path)
    store.gc(2)  # the writer's last gc may have had to keep a version the reader held then
    assert store.versions() == [versions - 1, versions] and debris(store) == []


def test_gc_keeps_newest_and_versions_held_by_live_readers(tmp_path):
    store = NegativeStore(tmp_path)
    for seed in (1, 2, 3, 4):
        publish(store, seed)
    holder = Worker("hold", tmp_path, 1)
    assert holder.expect("HOLDING") == "1"
    in_process = store.open(3)
    with pytest.raises(ValueError, match="keep"):
        store.gc(0)

    assert store.gc(1) == [2]
    assert store.versions() == [1, 3, 4]
    assert check_version(in_process) == []  # still readable while gc ran
    in_process.close()
    assert store.gc(1) == [3]

    holder.kill()  # a dead reader pins nothing: the kernel dropped its lock
    assert store.gc(1) == [1]
    assert store.versions() == [4] and debris(store) == []
    assert_serves(store, 4, seed=4)
    assert store.gc(3) == []


def resident_bytes() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return sum(int(fields[name].split()[0]) * 1024 for name in ("RssAnon", "RssFile", "RssShmem"))


def test_opening_a_large_store_reads_no_data(tmp_path):
    num_queries, k, block = 100_000, 200, 20_000
    store = NegativeStore(tmp_path)
    ranks = np.arange(k)[None, :]
    with store.begin(num_queries, k, corpus_fingerprint="c", queries_fingerprint="q", model_path="m",
                     model_step=1, corpus_size=num_queries) as writer:
        for start in range(0, num_queries, block):
            rows = np.arange(start, start + block)[:, None]
            scores = np.broadcast_to(-ranks, (block, k)).astype(np.float32)
            writer.write(start, (rows + ranks) % num_queries, scores)
        writer.commit()
    data_bytes = 2 * num_queries * k * 4  # 160 MB

    before = resident_bytes()
    opened = store.open_latest(verify=False)
    ids, scores = opened.candidates(77_777)
    grown = resident_bytes() - before
    opened.close()
    assert np.array_equal(ids, (77_777 + np.arange(k)) % num_queries) and scores[1] == -1
    assert grown < data_bytes / 20, f"opening and reading one row made {grown} bytes resident"
