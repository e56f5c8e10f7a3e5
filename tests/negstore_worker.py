"""Processes for tests/test_negstore.py: publishers that can be paused and killed, readers, holders.

    negstore_worker.py publish RUN SEED [--pause POINT]      publish the version of SEED
    negstore_worker.py publish-loop RUN FIRST_SEED COUNT [--keep N] [--rows Q]
    negstore_worker.py read-loop RUN UNTIL_VERSION TIMEOUT_S  check every row of every version seen
    negstore_worker.py hold RUN VERSION                       keep a version open until killed
    negstore_worker.py gc RUN KEEP [--pause gc_rmtree]

With --pause POINT the process prints `PAUSED POINT` when it reaches POINT and sleeps until killed.
Points: begin, mid_write (half the rows written), after_data (files written and hashed, before the
manifest), after_manifest, before_rename, after_rename, gc_rmtree (a version moved to the trash).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time

import numpy as np

from embedlib import negstore
from embedlib.negstore import NegativeStore

CORPUS_SIZE = 1000


def expected_arrays(seed: int, num_queries: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The content of the version published with `seed`: a deterministic function of (seed, row).

    Shapes depend on the seed too, so that files of two versions cannot pass for one.
    """
    q = num_queries or 300 + 37 * (seed % 5)
    k = 16 + seed % 4
    rows, ranks = np.arange(q)[:, None], np.arange(k)[None, :]
    ids = (seed * 131 + rows * 17 + ranks * 7) % CORPUS_SIZE
    scores = (seed + rows / 1000 - ranks / 10).astype(np.float32)
    num_valid = np.where(rows[:, 0] % 3 == 0, k - (rows[:, 0] * (seed + 1)) % k, k)
    num_valid[rows[:, 0] % 97 == 5] = 0  # rows with no candidate at all
    padding = ranks >= num_valid[:, None]
    ids[padding] = -1
    scores[padding] = np.nan
    return ids.astype(np.int32), scores


def check_version(opened: negstore.NegativeVersion) -> list[str]:
    """Every row of an open version against expected_arrays(its manifest's seed); the differences."""
    extra = opened.manifest["extra"]
    ids, scores = expected_arrays(extra["seed"], extra.get("rows"))
    if (opened.num_queries, opened.k) != ids.shape:
        return [f"v{opened.version}: shape {(opened.num_queries, opened.k)} != {ids.shape}"]
    problems = []
    for row in range(opened.num_queries):
        got_ids, got_scores = opened.candidates(row)
        count = int(np.count_nonzero(ids[row] >= 0))
        same_ids = np.array_equal(got_ids, ids[row, :count])
        if not (same_ids and np.array_equal(got_scores, scores[row, :count])):
            problems.append(f"v{opened.version} row {row} differs")
    return problems


def pause(point: str, wanted: str | None) -> None:
    if point == wanted:
        print(f"PAUSED {point}", flush=True)
        time.sleep(3600)


def install_pause_points(wanted: str | None) -> None:
    """Wrap the library's own steps so the process stops exactly between them."""
    write_json, publish_dir, rmtree = negstore.atomic_write_json, negstore.publish_dir, shutil.rmtree

    def paused_write_json(path, obj):
        pause("after_data", wanted)
        write_json(path, obj)
        pause("after_manifest", wanted)

    def paused_publish_dir(tmp_dir, final_dir):
        pause("before_rename", wanted)
        publish_dir(tmp_dir, final_dir)
        pause("after_rename", wanted)

    def paused_rmtree(path, *args, **kwargs):
        if ".trash-" in str(path):
            pause("gc_rmtree", wanted)
        rmtree(path, *args, **kwargs)

    negstore.atomic_write_json = paused_write_json
    negstore.publish_dir = paused_publish_dir
    shutil.rmtree = paused_rmtree  # this process is ours: patching the module is fine


def publish_seed(
    store: NegativeStore, seed: int, rows: int | None = None, wanted: str | None = None
) -> int:
    ids, scores = expected_arrays(seed, rows)
    half = len(ids) // 2
    with store.begin(
        len(ids), ids.shape[1], corpus_fingerprint="corpus", queries_fingerprint="queries",
        model_path=f"exports/step_{seed:08d}", model_step=seed, corpus_size=CORPUS_SIZE,
        extra={"seed": seed, "rows": rows},
    ) as writer:
        pause("begin", wanted)
        writer.write(0, ids[:half], scores[:half])
        pause("mid_write", wanted)
        writer.write(half, ids[half:], scores[half:])
        return writer.commit()


def read_loop(store: NegativeStore, until_version: int, timeout_s: float) -> dict:
    """Open the newest version over and over, checking all its rows, until `until_version` is seen."""
    seen: list[int] = []
    problems: list[str] = []
    iterations = 0
    # A damaged-version warning means this reader saw an incomplete version: a problem, too.
    warnings = logging.Handler(logging.WARNING)
    warnings.emit = lambda record: problems.append(record.getMessage())
    logging.getLogger("embedlib.negstore").addHandler(warnings)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        opened = store.open_latest(verify=True)
        if opened is None:
            time.sleep(0.005)
            continue
        with opened:
            iterations += 1
            if seen and opened.version < seen[-1]:
                problems.append(f"went back from v{seen[-1]} to v{opened.version}")
            if not seen or seen[-1] != opened.version:
                seen.append(opened.version)
            problems += check_version(opened)
        if opened.version >= until_version:
            break
    return {"iterations": iterations, "versions_seen": seen, "problems": problems[:20]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["publish", "publish-loop", "read-loop", "hold", "gc"])
    parser.add_argument("run_dir")
    parser.add_argument("numbers", type=float, nargs="*")
    parser.add_argument("--pause")
    parser.add_argument("--keep", type=int, default=0)
    parser.add_argument("--rows", type=int)
    args = parser.parse_args()
    numbers = [int(n) if n == int(n) else n for n in args.numbers]
    install_pause_points(args.pause)
    store = NegativeStore(args.run_dir)
    print("READY", flush=True)
    if args.mode == "publish":
        print(f"PUBLISHED {publish_seed(store, numbers[0], args.rows, args.pause)}", flush=True)
    elif args.mode == "publish-loop":
        first_seed, count = numbers
        for seed in range(first_seed, first_seed + count):
            print(f"PUBLISHED {publish_seed(store, seed, args.rows)}", flush=True)
            if args.keep:
                store.gc(args.keep)
    elif args.mode == "read-loop":
        print(json.dumps(read_loop(store, numbers[0], numbers[1])), flush=True)
    elif args.mode == "hold":
        opened = store.open(numbers[0])
        print(f"HOLDING {opened.version}", flush=True)
        time.sleep(3600)
    elif args.mode == "gc":
        print(f"REMOVED {store.gc(numbers[0])}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
