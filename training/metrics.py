"""Per-step figures: RUN/metrics.jsonl (one JSON object per optimizer step), RUN/eval.jsonl (one per
evaluation during training), TensorBoard when installed, and the rank-0 progress bar."""
from __future__ import annotations

import json
import os
from pathlib import Path

from rich.progress import TextColumn

from embedlib.atomic import atomic_write_bytes
from embedlib.progress import make_progress
from embedlib.rundir import METRICS_JSONL, TENSORBOARD



class MetricsLog:
    """Appends one line per step to RUN/metrics.jsonl (or `filename`), flushed, so a killed run keeps
    what it logged."""

    def __init__(self, run_dir: str | os.PathLike, resume_step: int, filename: str = METRICS_JSONL):
        self.path = Path(run_dir) / filename
        _truncate_after(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tensorboard = _tensorboard_writer(Path(run_dir) / TENSORBOARD)

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            # eval.jsonl has a row per set and step: each set's figures under its own tags
            prefix = f"{record['set']}/" if isinstance(record.get("set"), str) else ""
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tensorboard.add_scalar(prefix + key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(run_dir: str | os.PathLike, filename: str = METRICS_JSONL) -> list[dict]:
    path = Path(run_dir) / filename
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _truncate_after(path: Path, step: int) -> None:
    """Drop lines of steps after `step`: a resumed run redoes them, and the log should say each once."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            break  # a line cut short by a kill is the last one written
    if len(kept) != len(lines):
        atomic_write_bytes(path, "".join(kept).encode("utf-8"))


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(log_dir))


class StepProgress:
    """The rank-0 progress bar: step, loss per task kind, learning rate, samples/s, and the negatives:
    version in use, the age of its export in steps and the stale samples of the latest check."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self._progress = make_progress(TextColumn("{task.fields[info]}"), disable=not enabled)
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, info="")
        self._progress.start()
        self._checks: dict[str, str] = {}  # data set -> its latest check, shown until the next one
        self._sidecar_alive = True

    def update(self, record: dict) -> None:
        losses = " ".join(f"{k.removeprefix('loss/')}={v:.4f}" for k, v in record.items() if k.startswith("loss/"))
        for key, stale in record.items():
            if key.startswith("negatives/") and key.endswith("/stale"):
                prefix = key.removesuffix("stale")
                age, mean = record.get(f"{prefix}export_age_steps"), record.get(f"{prefix}mean_score")
                self._checks[prefix.removeprefix("negatives/").rstrip("/")] = (
                    (f" age={age}" if age is not None else "") + f" stale={stale}"
                    + (f" s={mean:.3f}" if mean is not None else ""))
        negatives = ",".join(f"v{v}{self._checks.get(name, '')}" for name, v in record["negatives_version"].items()
                             if v is not None) or "in-batch/neg"
        self._sidecar_alive = record.get("negatives/sidecar_alive", self._sidecar_alive)
        if not self._sidecar_alive:
            negatives += " (sidecar dead)"
        info = (f"loss={record['loss']:.4f} {losses} lr={record['lr']:.1e} "
                f"{record['samples_per_s']:.1f}/s negatives={negatives}")
        self._progress.update(self._task, completed=record["step"], info=info)

    def close(self) -> None:
        self._progress.stop()
