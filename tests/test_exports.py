"""The trainer-to-sidecar export contract: an export is visible only when complete."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from embedlib.exports import gc_exports, latest_export, list_exports, publish_export, read_export_marker


def write_files(directory: Path) -> None:
    (directory / "model.safetensors").write_bytes(b"weights")


def test_publish_list_latest_and_marker(tmp_path):
    assert latest_export(tmp_path) is None
    for step in (10, 2, 30):
        publish_export(tmp_path, step, write_files, extra={"loss": 0.5})
    assert [e.step for e in list_exports(tmp_path)] == [2, 10, 30]
    latest = latest_export(tmp_path)
    assert latest.step == 30 and (latest.path / "model.safetensors").read_bytes() == b"weights"
    assert read_export_marker(latest.path)["step"] == 30 and read_export_marker(latest.path)["loss"] == 0.5
    # Republishing a step keeps the existing export instead of replacing it under a reader.
    publish_export(tmp_path, 30, lambda d: (d / "model.safetensors").write_bytes(b"other"))
    assert (latest.path / "model.safetensors").read_bytes() == b"weights"


def test_failed_write_leaves_nothing_visible(tmp_path):
    def broken(directory: Path) -> None:
        write_files(directory)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        publish_export(tmp_path, 5, broken)
    assert list_exports(tmp_path) == []
    assert os.listdir(tmp_path / "exports") == []


def test_directory_without_marker_is_not_an_export(tmp_path):
    (tmp_path / "exports" / "step_00000007").mkdir(parents=True)
    assert list_exports(tmp_path) == []


def test_writer_killed_mid_write_is_invisible_and_cleaned_up(tmp_path):
    code = (
        "import sys, time; from pathlib import Path; from embedlib.exports import publish_export\n"
        "def slow(d):\n"
        "    (d / 'model.safetensors').write_bytes(b'partial'); print('writing', flush=True); time.sleep(60)\n"
        f"publish_export(Path({str(tmp_path)!r}), 9, slow)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list_exports(tmp_path) == []
    assert any(p.name.startswith(".tmp-") for p in (tmp_path / "exports").iterdir())
    publish_export(tmp_path, 10, write_files)
    gc_exports(tmp_path, keep=5)
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["step_00000010"]


def test_gc_keeps_newest_and_protected(tmp_path):
    for step in range(1, 6):
        publish_export(tmp_path, step, write_files)
    assert gc_exports(tmp_path, keep=2, protect={1}) == [2, 3]
    assert [e.step for e in list_exports(tmp_path)] == [1, 4, 5]
