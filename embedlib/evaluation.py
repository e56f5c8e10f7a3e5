"""Evaluation of an embedding model: retrieval (BEIR layout) and STS (scored pairs).

Retrieval searches the whole corpus exactly and reports nDCG@10, Recall@k and MRR@10 with the
definitions trec_eval (and so BEIR and MTEB) uses: linear gain, log2 discount, relevance > 0 counts.
STS reports the Spearman correlation of cosine similarity with the gold score.

    python -m embedlib.evaluation --model DIR --beir data/scifact --split dev
    python -m embedlib.evaluation --model DIR --sts ../shared/data/stsb_en/dev.tsv

The same functions serve the quickstart (scripts/quickstart.py) in-process; `evaluate_model` loads a
model directory and runs whatever is asked of it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedlib.atomic import atomic_write_bytes
from embedlib.records import Document, Query, ScoredPair, read_corpus, read_qrels, read_queries, read_scored_pairs

RECALL_CUTOFFS = (10, 100)


@dataclass(frozen=True)
class BeirSplit:
    """A BEIR-layout directory: corpus.jsonl(.gz), queries.<split>.jsonl, qrels.<split>.tsv."""

    corpus: list[Document]
    queries: list[Query]
    qrels: dict[str, dict[str, int]]

    @classmethod
    def load(cls, directory: str | Path, split: str) -> "BeirSplit":
        directory = Path(directory)
        corpus_file = next((p for p in (directory / "corpus.jsonl.gz", directory / "corpus.jsonl") if p.exists()), None)
        if corpus_file is None:
            raise FileNotFoundError(f"{directory}: no corpus.jsonl or corpus.jsonl.gz")
        qrels = read_qrels(directory / f"qrels.{split}.tsv")
        # Only queries with at least one relevant document are evaluated, as in BEIR.
        queries = [q for q in read_queries(directory / f"queries.{split}.jsonl") if any(v > 0 for v in qrels.get(q.id, {}).values())]
        return cls(corpus=read_corpus(corpus_file), queries=queries, qrels=qrels)


def ranking_metrics(ranked_doc_ids: list[list[str]], query_ids: list[str], qrels: dict[str, dict[str, int]],
                    *, per_query: bool = False) -> dict:
    """Mean nDCG@10, MRR@10 and Recall@k over queries, from each query's ranked document ids.

    per_query: also return {"per_query": {query id: {metric: value}}}, for paired comparisons of two models
    on the same queries (`paired_difference`)."""
    scores: dict[str, dict[str, float]] = {}
    for qid, ranked in zip(query_ids, ranked_doc_ids, strict=True):
        relevance = {d: r for d, r in qrels.get(qid, {}).items() if r > 0}
        if not relevance:
            continue
        dcg = sum(relevance.get(d, 0) / math.log2(rank + 2) for rank, d in enumerate(ranked[:10]))
        ideal = sum(r / math.log2(rank + 2) for rank, r in enumerate(sorted(relevance.values(), reverse=True)[:10]))
        first_hit = next((rank for rank, d in enumerate(ranked[:10]) if d in relevance), None)
        scores[qid] = {"ndcg@10": dcg / ideal, "mrr@10": 0.0 if first_hit is None else 1.0 / (first_hit + 1)}
        for k in RECALL_CUTOFFS:
            scores[qid][f"recall@{k}"] = len(relevance.keys() & set(ranked[:k])) / len(relevance)
    names = ["ndcg@10", "mrr@10", *(f"recall@{k}" for k in RECALL_CUTOFFS)]
    metrics: dict = {name: float(np.mean([s[name] for s in scores.values()])) for name in names}
    metrics["num_queries"] = len(scores)
    if per_query:
        metrics["per_query"] = scores
    return metrics


def paired_difference(baseline: dict[str, float], other: dict[str, float], *, samples: int = 10_000,
                      seed: int = 0) -> dict[str, float]:
    """Mean of other - baseline over the queries both scored, with a 95% paired bootstrap interval.

    The interval is the spread from which queries happen to be in the evaluation set (queries resampled
    with replacement, the same resample for both models); it says nothing about training noise, which
    only runs with other seeds measure."""
    common = sorted(baseline.keys() & other.keys())
    if not common:
        raise ValueError("paired_difference: the two models share no query")
    diff = np.array([other[q] - baseline[q] for q in common], dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(diff.mean()), "ci95_low": float(low), "ci95_high": float(high), "num_queries": len(common)}


def evaluate_retrieval(encoder, split: BeirSplit, *, batch_size: int = 64, query_instruction: str = "", show_progress: bool = True, dtype=None, per_query: bool = False) -> dict:
    """Encode corpus and queries with `encoder` (an embedlib.encoder.Encoder), search exactly, score.

    dtype: the compute dtype of encoding (None: Encoder.encode's default, bf16 autocast on CUDA)."""
    from embedlib.search import exact_search

    doc_emb = encoder.encode([d.passage for d in split.corpus], batch_size=batch_size, show_progress=show_progress, dtype=dtype)
    query_emb = encoder.encode([query_instruction + q.text for q in split.queries], batch_size=batch_size, show_progress=show_progress, dtype=dtype)
    _, ids = exact_search(doc_emb, query_emb, k=min(max(RECALL_CUTOFFS), len(split.corpus)))
    ranked = [[split.corpus[i].id for i in row if i >= 0] for row in ids]
    return ranking_metrics(ranked, [q.id for q in split.queries], split.qrels, per_query=per_query)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties."""
    return float(np.corrcoef(_average_ranks(x), _average_ranks(y))[0, 1])


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0
        start = end + 1
    return ranks


def evaluate_sts(encoder, pairs: list[ScoredPair], *, batch_size: int = 64, show_progress: bool = True, dtype=None) -> dict[str, float]:
    first = encoder.encode([p.sentence1 for p in pairs], batch_size=batch_size, show_progress=show_progress, dtype=dtype)
    second = encoder.encode([p.sentence2 for p in pairs], batch_size=batch_size, show_progress=show_progress, dtype=dtype)
    cosine = np.sum(first * second, axis=1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1))
    return {"spearman": spearman(cosine, np.array([p.score for p in pairs], dtype=np.float64)), "num_pairs": len(pairs)}


ENCODE_DTYPES = ("auto", "float32", "bfloat16")


def encode_dtype(name: str):
    """"auto" -> None (Encoder.encode decides: bf16 autocast on CUDA, float32 on CPU), else the torch dtype."""
    import torch

    if name not in ENCODE_DTYPES:
        raise ValueError(f"unknown encode dtype {name!r}; expected one of {', '.join(ENCODE_DTYPES)}")
    return None if name == "auto" else getattr(torch, name)


def evaluate_model(model: str | Path, *, beir: str | Path | None = None, split: str = "dev", sts: str | Path | None = None,
                   query_instruction: str = "", batch_size: int = 64, max_length: int | None = None,
                   dtype: str = "auto", show_progress: bool = True, per_query: bool = False) -> dict[str, dict]:
    """Load a model directory and evaluate it: {"retrieval": {...}} and/or {"sts": {...}}.

    max_length: tokens per text (None: what the model directory says), the same for queries and passages.
    per_query: the retrieval figures also hold each query's (see `ranking_metrics`).
    """
    from embedlib.encoder import Encoder

    encoder = Encoder.from_pretrained(model, max_length=max_length)
    compute_dtype = encode_dtype(dtype)
    results: dict[str, dict] = {}
    if beir:
        results["retrieval"] = evaluate_retrieval(encoder, BeirSplit.load(beir, split), batch_size=batch_size,
                                                  query_instruction=query_instruction, show_progress=show_progress,
                                                  dtype=compute_dtype, per_query=per_query)
    if sts:
        results["sts"] = evaluate_sts(encoder, read_scored_pairs(sts), batch_size=batch_size,
                                      show_progress=show_progress, dtype=compute_dtype)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate an embedding model directory.")
    parser.add_argument("--model", required=True, help="encoder export or Hugging Face model directory")
    parser.add_argument("--beir", type=Path, help="BEIR-layout directory for retrieval evaluation")
    parser.add_argument("--split", default="dev", help="split name of queries.<split>.jsonl and qrels.<split>.tsv")
    parser.add_argument("--sts", type=Path, help="scored sentence pairs (tsv or jsonl) for STS evaluation")
    parser.add_argument("--query-instruction", default="", help="prefix added to every query")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's)")
    parser.add_argument("--dtype", choices=ENCODE_DTYPES, default="auto",
                        help="compute dtype of encoding (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--per-query", action="store_true", help="also report each query's retrieval figures")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--output", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if not args.beir and not args.sts:
        parser.error("give --beir DIR and/or --sts FILE")

    results = evaluate_model(args.model, beir=args.beir, split=args.split, sts=args.sts,
                             query_instruction=args.query_instruction, batch_size=args.batch_size,
                             max_length=args.max_length, dtype=args.dtype, show_progress=not args.no_progress,
                             per_query=args.per_query)
    text = json.dumps({"model": str(args.model), **results}, indent=2)
    print(text)
    if args.output:
        atomic_write_bytes(args.output, (text + "\n").encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
