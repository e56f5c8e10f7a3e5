"""The job's files, append-only and crash-safe, and what a restart learns from them.

Per shard, in the output directory (the suffix is empty for a single shard):

    pairs{suffix}.jsonl     training pairs (query and title templates), read by embedlib.records.read_pairs
    sts{suffix}.jsonl       scored sentence pairs, read by embedlib.records.read_scored_pairs
    outcomes{suffix}.jsonl  one line per rejected or failed work item: key, outcome, reason, detail
    summary{suffix}.json    counts of the last run and of the output as a whole (written at the end)
    .lock{suffix}           held (flock) while a job writes the shard

Every record names its work item through provenance (source_id, template, sample_index): the key. Lines
are appended a chunk at a time and fsynced, so a SIGKILL leaves at most one torn last line per file,
which a restart cuts off. A key is final when it has a record or a "rejected" outcome; a "failed" key
(the backend gave no answer) is tried again by the next run.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from embedlib.atomic import fsync_dir
from embedlib.records import RecordError

log = logging.getLogger("data_gen")

Key = tuple[str, str, int]  # (source passage id, template name, sample index)

WRITTEN, REJECTED, FAILED = "written", "rejected", "failed"


class OutputConflict(Exception):
    """The output directory belongs to another job: another sharding, or a job still running."""


@dataclass(frozen=True)
class OutputPaths:
    directory: Path
    pairs: Path
    sts: Path
    outcomes: Path
    summary: Path
    lock: Path

    @classmethod
    def for_shard(cls, directory: Path, shard: int, num_shards: int) -> OutputPaths:
        suffix = "" if num_shards == 1 else f"-{shard:05d}-of-{num_shards:05d}"
        directory = Path(directory)
        return cls(directory, directory / f"pairs{suffix}.jsonl", directory / f"sts{suffix}.jsonl",
                   directory / f"outcomes{suffix}.jsonl", directory / f"summary{suffix}.json",
                   directory / f".lock{suffix}")

    def check_sharding(self, num_shards: int) -> None:
        """Refuse to mix shardings in one directory: a passage would belong to two shards' files, and its
        work would be done twice."""
        pattern = re.compile(r"^(pairs|sts|outcomes)(?:-\d{5}-of-(\d{5}))?\.jsonl$")
        for name in os.listdir(self.directory):
            match = pattern.match(name)
            if match and int(match.group(2) or 1) != num_shards:
                raise OutputConflict(f"{self.directory / name} was written by a job with "
                                 f"{int(match.group(2) or 1)} shard(s), this one has {num_shards}; "
                                 f"use the same --num-shards or another --output")


class ShardLock:
    """One writer per shard: a second job on the same shard (a SLURM requeue while the first still runs)
    would append the same keys twice. An flock, so it dies with its process, however that ends."""

    def __init__(self, path: Path):
        self._file = open(path, "a")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise OutputConflict(f"another data_gen job is writing this shard ({path} is locked)") from None
        except OSError as e:  # a file system without flock (some NFS, Lustre without -o flock)
            log.warning("cannot lock %s (%s): make sure no other job writes this shard", path, e)

    def release(self) -> None:
        self._file.close()


def key_of(provenance: dict) -> Key:
    return (provenance["source_id"], provenance["template"], int(provenance["sample_index"]))


def _recover_lines(path: Path) -> tuple[list[tuple[int, dict]], int]:
    """(line number, object) for each complete line of an append-only JSONL file. A last line without
    its newline was torn by a kill mid-write: it is cut off the file (reported by the count returned).
    A complete line that is not JSON is damage no kill can cause, and an error."""
    if not path.exists():
        return [], 0
    records, good_end, torn = [], 0, 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                torn = 1
                break
            good_end += len(raw)
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RecordError(path, line_no, None, f"malformed JSON in the middle of the file: {e}") from None
            if not isinstance(obj, dict):
                raise RecordError(path, line_no, None, "expected a JSON object")
            records.append((line_no, obj))
    if torn:
        log.warning("%s: cutting off a torn last line (%d bytes) left by an interrupted run",
                    path, path.stat().st_size - good_end)
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return records, torn


@dataclass
class ResumeState:
    """What the existing files say: each key's final outcome, and the records' fields (to seed the
    de-duplication)."""

    outcome: dict[Key, str] = field(default_factory=dict)
    reason: dict[Key, str] = field(default_factory=dict)
    written_fields: list[dict] = field(default_factory=list)
    torn_lines: int = 0

    @classmethod
    def load(cls, paths: OutputPaths) -> ResumeState:
        state = cls()
        for path in (paths.pairs, paths.sts):
            lines, torn = _recover_lines(path)
            state.torn_lines += torn
            for line_no, record in lines:
                try:
                    key = key_of(record["provenance"])
                except (KeyError, TypeError, ValueError) as e:
                    raise RecordError(path, line_no, "provenance", f"missing or incomplete ({e}): every "
                                      f"record needs source_id, template and sample_index") from None
                if state.outcome.get(key) == WRITTEN:
                    raise RecordError(path, line_no, "provenance", f"key {key} already has a record")
                state.outcome[key] = WRITTEN
                if "sentence1" in record:
                    state.written_fields.append({"sentence1": record["sentence1"], "sentence2": record["sentence2"]})
                else:
                    state.written_fields.append({"query": record["query"]})
        lines, torn = _recover_lines(paths.outcomes)
        state.torn_lines += torn
        for line_no, entry in lines:
            try:
                key = key_of(entry)
                outcome = entry["outcome"]
            except (KeyError, TypeError, ValueError) as e:
                raise RecordError(paths.outcomes, line_no, None, f"not an outcome line ({e})") from None
            if outcome not in (REJECTED, FAILED):
                raise RecordError(paths.outcomes, line_no, "outcome", f"{outcome!r} is not rejected or failed")
            if state.outcome.get(key) != WRITTEN:  # a record, once written, is the last word
                state.outcome[key] = outcome
                state.reason[key] = entry.get("reason", "")
        return state

    def is_final(self, key: Key) -> bool:
        return self.outcome.get(key) in (WRITTEN, REJECTED)


class OutputWriter:
    """Appends one chunk at a time to the shard's files, each flushed and fsynced before returning."""

    def __init__(self, paths: OutputPaths):
        paths.directory.mkdir(parents=True, exist_ok=True)
        self._files: dict[Path, IO[bytes]] = {}
        for path in (paths.pairs, paths.sts, paths.outcomes):
            self._files[path] = open(path, "ab")
        fsync_dir(paths.directory)  # the files' names are durable too

    def append(self, lines_by_path: dict[Path, list[dict]]) -> None:
        for path, objects in lines_by_path.items():
            if not objects:
                continue
            f = self._files[path]
            f.write("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        for f in self._files.values():
            f.close()
