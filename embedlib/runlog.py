"""Reading a run directory's records, also while the run is still writing them.

    read_run(RUN) -> RunLog   run.json, config.yaml, metrics.jsonl, eval.jsonl, mining/refreshes.jsonl

The append-only logs can end in a line cut short by a writer that is still writing it or was killed
(docs/ARCHITECTURE.md): such a last line is left out. A bad line anywhere else is damage, not a write
in progress, and is an error naming the file and line. The report (embedlib.report) and the model
card (embedlib.modelcard) read runs through this module; only the trainer and the miners write them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from embedlib.run_records import RefreshRecord
from embedlib.rundir import CONFIG_YAML, EVAL_JSONL, METRICS_JSONL, MINING, RUN_JSON

REFRESHES_JSONL = f"{MINING}/refreshes.jsonl"


class RunLogError(ValueError):
    """A run directory's file that cannot be read: one line naming the file (and line)."""


@dataclass
class RunLog:
    path: Path
    run: dict = field(default_factory=dict)  # run.json ({} before the trainer started)
    config: dict = field(default_factory=dict)  # config.yaml, the resolved configuration ({} before)
    metrics: list[dict] = field(default_factory=list)  # one per step, in step order, each step once
    # eval.jsonl, in step order: one record per evaluation, or, since evaluation sets, per set and evaluation
    # ({"step", "set", "category", "main_score", "eval/<metric>", ...}; records without "set" are older runs')
    evals: list[dict] = field(default_factory=list)
    refreshes: list[RefreshRecord] = field(default_factory=list)  # one per mining pass, in file order

    @property
    def status(self) -> str:
        return self.run.get("status") or ("running" if self.metrics else "not started")

    @property
    def last_step(self) -> int:
        return self.metrics[-1]["step"] if self.metrics else 0

    @property
    def max_steps(self) -> int | None:
        return (self.config.get("train") or {}).get("max_steps")

    def recipe_and_overrides(self) -> tuple[str | None, list[str]]:
        """The trainer's --config and key=value overrides of its latest start, from run.json's argv."""
        return recipe_and_overrides(self.run.get("argv") or [])


def is_run_dir(path: str | os.PathLike) -> bool:
    """Holds something a run writes: the trainer's record or metrics, or a miner's pass."""
    path = Path(path)
    return any((path / name).is_file() for name in (RUN_JSON, METRICS_JSONL, REFRESHES_JSONL))


def read_run(path: str | os.PathLike) -> RunLog:
    path = Path(path)
    # A resumed run rewrites the steps after its checkpoint: the last line of a step is the one that counts.
    metrics = {record["step"]: record for record in read_jsonl(path / METRICS_JSONL)}
    evals = {(record["step"], record.get("set")): record for record in read_jsonl(path / EVAL_JSONL)}
    return RunLog(path=path, run=_read_json(path / RUN_JSON), config=read_config(path),
                  metrics=[metrics[s] for s in sorted(metrics)],
                  evals=[evals[k] for k in sorted(evals, key=lambda k: k[0])],  # the sets in logged order
                  refreshes=read_refreshes(path))


def read_refreshes(path: str | os.PathLike) -> list[RefreshRecord]:
    """RUN/mining/refreshes.jsonl, one record per mining pass in file order ([] before the first)."""
    return [RefreshRecord.from_json(r) for r in read_jsonl(Path(path) / REFRESHES_JSONL, key=None)]


def read_config(path: str | os.PathLike) -> dict:
    """RUN/config.yaml alone ({} before the trainer wrote it)."""
    return _read_yaml(Path(path) / CONFIG_YAML)


def read_jsonl(path: Path, key: str | None = "step") -> list[dict]:
    """Every JSON object of an append-only log ([] when there is none), each with an integer `key`
    (unless None); a torn last line is left out."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as e:
        raise RunLogError(f"{path}: cannot read: {e.strerror or e}") from None
    lines = [(number, line) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
    records = []
    for number, line in lines:
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            if key is not None and (not isinstance(record.get(key), int) or isinstance(record[key], bool)):
                raise ValueError(f"no integer {key!r}")
        except ValueError as e:
            if number == lines[-1][0]:
                break  # the line being written, or cut short by a kill: not a record yet
            raise RunLogError(f"{path}:{number}: not a record of this log ({e})") from None
        records.append(record)
    return records


def latest_evals(evals: list[dict], step: int | None = None) -> list[dict]:
    """The records of the latest evaluation (at or before `step`): one per set, or the one older record."""
    done = [e for e in evals if step is None or e["step"] <= step]
    return [e for e in done if e["step"] == done[-1]["step"]] if done else []


def eval_figures(record: dict) -> list[tuple[str, float]]:
    """(name, value) of an eval.jsonl record's figures ("ndcg@10", ...; not the query count), nDCG first
    as MTEB lists them, then recall, then MRR."""
    figures = [(k.removeprefix("eval/"), float(v)) for k, v in record.items()
               if k.startswith("eval/") and not k.startswith("eval/num_")
               and isinstance(v, (int, float)) and not isinstance(v, bool)]

    def order(item):
        family, _, k = item[0].partition("@")
        rank = ("ndcg", "recall", "mrr").index(family) if family in ("ndcg", "recall", "mrr") else 3
        return rank, family, int(k) if k.isdigit() else 0

    return sorted(figures, key=order)


def recipe_and_overrides(argv: list[str]) -> tuple[str | None, list[str]]:
    recipe, overrides = None, []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            recipe = argv[i + 1]
        elif arg.startswith("--config="):
            recipe = arg.split("=", 1)[1]
        elif not arg.startswith("-") and "=" in arg:
            overrides.append(arg)
    return recipe, overrides


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise RunLogError(f"{path}: cannot read: {e}") from None
    return value if isinstance(value, dict) else {}


def _read_yaml(path: Path) -> dict:
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as e:
        raise RunLogError(f"{path}: cannot read: {str(e).splitlines()[0]}") from None
    return value if isinstance(value, dict) else {}
