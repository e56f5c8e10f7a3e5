"""Evaluation of an embedding model: retrieval (BEIR layout) and STS (scored pairs).

Retrieval searches the whole corpus exactly and reports nDCG@10, Recall@k and MRR@10 with the
definitions trec_eval (and so BEIR and MTEB) uses: linear gain, log2 discount, relevance > 0 counts.
STS reports the Spearman correlation of cosine similarity with the gold score.

    python -m embedlib.evaluation --model DIR --beir data/scifact --split dev
    python -m embedlib.evaluation --model DIR --sts ../shared/data/stsb_en/dev.tsv

The same functions serve the quickstart (scripts/quickstart.py) in-process; `evaluate_model` loads a
model directory and runs whatever is asked of it.

Corpus embeddings are scored as the embedding cache holds them (float16), with or without a cache, so a
figure never depends on whether one was used. With a cache directory (`--cache-dir`; a run's is
RUN/mining/cache, embedlib.embedding_cache) the corpus is encoded only when no miner, sidecar or earlier
evaluation encoded it with this model, max length and dtype; the output's "encoding" says what was
encoded now, from the cache, the padding fraction and the seconds. The cache is kept under
--cache-max-gb (least recently used entries removed).

Bad input is found before the model is loaded: the data files are read and checked first, then the
model directory. The library raises records.RecordError for a bad record (file, line, field) and
EvaluationError for anything else; the command prints either as one line `error: ...`, exits with
status 2 and writes nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedlib.atomic import atomic_write_bytes
from embedlib.embedding_cache import DEFAULT_MAX_GB
from embedlib.records import (Document, Query, RecordError, ScoredPair, _iter_lines, read_corpus, read_qrels,
                              read_queries, read_scored_pairs)

RECALL_CUTOFFS = (10, 100)


class EvaluationError(ValueError):
    """Input that cannot be evaluated (a missing or empty file, no relevant query, a bad argument, a model
    directory that does not load); one line naming the file. Bad records raise records.RecordError."""


def _read(reader, path: Path):
    """reader(path), with an unreadable file (permissions, a directory) as an EvaluationError."""
    try:
        return reader(path)
    except OSError as e:
        raise EvaluationError(f"{path}: cannot read: {e.strerror or e}") from e


@dataclass(frozen=True)
class BeirSplit:
    """A BEIR-layout directory: corpus.jsonl(.gz), queries.<split>.jsonl, qrels.<split>.tsv."""

    corpus: list[Document]
    queries: list[Query]
    qrels: dict[str, dict[str, int]]

    @classmethod
    def load(cls, directory: str | Path, split: str) -> "BeirSplit":
        """Read and check the three files: none may be empty, every judged query and document must exist
        (RecordError at the qrels line otherwise), and at least one query must have a relevant document.
        Only queries with one are kept, as in BEIR."""
        directory = Path(directory)
        if not directory.is_dir():
            raise EvaluationError(f"{directory}: {'not a directory' if directory.exists() else 'no such directory'}"
                                  " (expected a BEIR-layout directory)")
        corpus_file = next((p for p in (directory / "corpus.jsonl.gz", directory / "corpus.jsonl") if p.exists()), None)
        queries_file, qrels_file = directory / f"queries.{split}.jsonl", directory / f"qrels.{split}.tsv"
        missing = [str(p) for p in (queries_file, qrels_file) if not p.exists()]
        hint = ""
        if missing:  # a mistyped --split is the likely cause: say which splits there are
            splits = sorted(p.name[len("qrels."):-len(".tsv")] for p in directory.glob("qrels.*.tsv"))
            hint = f" (splits here: {', '.join(splits)})" if splits else ""
        if corpus_file is None:
            missing.insert(0, f"{directory / 'corpus.jsonl'}[.gz]")
        if missing:
            raise EvaluationError(f"{directory}: missing {', '.join(missing)}{hint}")

        corpus = _read(read_corpus, corpus_file)
        if not corpus:
            raise EvaluationError(f"{corpus_file}: no documents")
        queries = _read(read_queries, queries_file)
        if not queries:
            raise EvaluationError(f"{queries_file}: no queries")
        qrels = _read(read_qrels, qrels_file)
        if not qrels:
            raise EvaluationError(f"{qrels_file}: no judgements")
        _check_qrels_ids(qrels_file, qrels, {q.id for q in queries}, queries_file, {d.id for d in corpus}, corpus_file)
        queries = [q for q in queries if any(v > 0 for v in qrels.get(q.id, {}).values())]
        if not queries:
            raise EvaluationError(f"{qrels_file}: no query has a relevant document (a judgement with score > 0)")
        return cls(corpus=corpus, queries=queries, qrels=qrels)


def _check_qrels_ids(qrels_file: Path, qrels: dict[str, dict[str, int]], query_ids: set[str], queries_file: Path,
                     doc_ids: set[str], corpus_file: Path) -> None:
    """A judgement of an unknown query or document is a RecordError at its line: it would count a relevant
    document that no search can return, or judge a query nobody asked, and silently skew the figures."""
    if all(q in query_ids and doc_ids.issuperset(docs) for q, docs in qrels.items()):
        return
    # read_qrels keeps no line numbers: find the first bad line again with records' own line reader, so
    # the numbers agree (read_qrels has checked the layout already).
    header_seen = False
    for line, text in _iter_lines(qrels_file):
        if not text.strip(" "):
            continue
        if not header_seen:
            header_seen = True
            continue
        query_id, doc_id, _ = text.split("\t")
        if query_id not in query_ids:
            raise RecordError(qrels_file, line, "query-id", f"unknown id {query_id!r}: not in {queries_file}")
        if doc_id not in doc_ids:
            raise RecordError(qrels_file, line, "corpus-id", f"unknown id {doc_id!r}: not in {corpus_file}")
    raise AssertionError(f"{qrels_file}: an unknown id was not found again")  # unreachable


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
    if not scores:  # the means would be NaN
        raise EvaluationError("no query has a relevant document (a judgement with score > 0); nothing to score")
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


def evaluate_retrieval(encoder, split: BeirSplit, *, batch_size: int = 64, query_instruction: str = "",
                       show_progress: bool = True, dtype=None, per_query: bool = False, cache=None,
                       encoding: dict | None = None) -> dict:
    """Encode corpus and queries with `encoder` (an embedlib.encoder.Encoder), search exactly, score.

    dtype: the compute dtype of encoding (None: Encoder.encode's default, bf16 autocast on CUDA).
    cache: an embedlib.embedding_cache.EmbeddingCache entry of this model, corpus, max length and dtype:
    the corpus blocks found there are not encoded again, and those encoded are saved there.
    encoding: a dict to fill with what encoding cost (rows encoded and from the cache, EncodeStats)."""
    from embedlib.encoder import EncodeStats
    from embedlib.search import exact_search

    if not split.corpus or not split.queries:
        raise EvaluationError(f"nothing to search: {len(split.corpus)} documents, {len(split.queries)} queries")
    passages = [d.passage for d in split.corpus]
    stats = EncodeStats()
    if cache is not None:
        from embedlib.embedding_cache import encode_corpus

        corpus = encode_corpus(encoder, passages, cache, batch_size=batch_size, max_length=encoder.config.max_length,
                               dtype=dtype, show_progress=show_progress)
        doc_emb, encoded, stats = corpus.blocks, corpus.encoded_rows, corpus.stats
    else:  # float16, as a cache holds them: the figures do not depend on whether a cache is used
        doc_emb = encoder.encode(passages, batch_size=batch_size, show_progress=show_progress, dtype=dtype,
                                 stats=stats).astype(np.float16)
        encoded = len(passages)
    query_emb = encoder.encode([query_instruction + q.text for q in split.queries], batch_size=batch_size,
                               show_progress=show_progress, dtype=dtype, stats=stats)
    if encoding is not None:
        encoding.update({"corpus_rows": len(passages), "corpus_rows_encoded": encoded,
                         "corpus_rows_from_cache": len(passages) - encoded,
                         "cache": None if cache is None else str(cache.dir), **stats.as_dict()})
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


def read_sts(path: str | Path) -> list[ScoredPair]:
    """Scored pairs (records.read_scored_pairs) that can give a Spearman correlation: at least two
    different gold scores (with one, the correlation is undefined: NaN)."""
    path = Path(path)
    if not path.exists():
        raise EvaluationError(f"{path}: no such file (expected scored sentence pairs)")
    pairs = _read(read_scored_pairs, path)
    if not pairs:
        raise EvaluationError(f"{path}: no sentence pairs")
    _check_sts_scores(pairs, f"{path}: ")
    return pairs


def _check_sts_scores(pairs: list[ScoredPair], where: str = "") -> None:
    if not pairs:
        raise EvaluationError(f"{where}no sentence pairs")
    if len({p.score for p in pairs}) < 2:
        what = "one pair" if len(pairs) == 1 else f"all {len(pairs)} pairs have the score {pairs[0].score:g}"
        raise EvaluationError(f"{where}{what}; Spearman's correlation needs at least two different scores")


def evaluate_sts(encoder, pairs: list[ScoredPair], *, batch_size: int = 64, show_progress: bool = True, dtype=None) -> dict[str, float]:
    _check_sts_scores(pairs)
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


def check_model_dir(model: str | Path, max_length: int | None = None) -> Path:
    """The model directory (`package:<name>` resolved) if it looks loadable, without loading it: it must
    hold config.json (or modules.json, a sentence-transformers directory), and max_length must fit the
    model's position embeddings where config.json gives them."""
    from embedlib.encoder import PACKAGE_PREFIX, EncoderError, resolve_model_dir

    try:
        root = resolve_model_dir(model)
    except EncoderError as e:  # an unknown package
        raise EvaluationError(str(e)) from e
    name = f"{model} ({root})" if str(model).startswith(PACKAGE_PREFIX) else str(root)
    if not root.is_dir():
        raise EvaluationError(f"{name}: {'not a directory' if root.exists() else 'no such directory'}"
                              " (expected a model directory)")
    config_file = root / "config.json"
    if not config_file.is_file() and not (root / "modules.json").is_file():
        raise EvaluationError(f"{name}: not a model directory (no config.json)")
    if max_length is not None and config_file.is_file():
        try:
            positions = json.loads(config_file.read_text(encoding="utf-8")).get("max_position_embeddings")
        except (OSError, ValueError, AttributeError) as e:
            raise EvaluationError(f"{config_file}: not a model configuration ({e})") from e
        # Longer inputs would index past the position embeddings halfway through encoding.
        if isinstance(positions, int) and 0 < positions < max_length:
            raise EvaluationError(f"max length {max_length} exceeds the model's {positions} positions "
                                  f"(max_position_embeddings in {config_file})")
    return root


def _check_options(batch_size: int, max_length: int | None, dtype: str) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch size must be a positive integer, got {batch_size!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise EvaluationError(f"max length must be at least 2 tokens (a text between its two special tokens), "
                              f"got {max_length!r}")
    if dtype not in ENCODE_DTYPES:
        raise EvaluationError(f"unknown encode dtype {dtype!r}; expected one of {', '.join(ENCODE_DTYPES)}")


def _load_encoder(model: str | Path, root: Path, max_length: int | None):
    from embedlib.encoder import Encoder, EncoderError

    try:
        return Encoder.from_pretrained(root, max_length=max_length)
    except EncoderError as e:
        raise EvaluationError(str(e)) from e
    except (OSError, ValueError) as e:  # transformers' messages run over several lines
        first_line = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise EvaluationError(f"{model}: cannot load the model: {first_line}") from e


def evaluate_model(model: str | Path, *, beir: str | Path | None = None, split: str = "dev", sts: str | Path | None = None,
                   query_instruction: str = "", batch_size: int = 64, max_length: int | None = None,
                   dtype: str = "auto", show_progress: bool = True, per_query: bool = False,
                   cache_dir: str | Path | None = None, cache_max_gb: float | None = DEFAULT_MAX_GB) -> dict[str, dict]:
    """Load a model directory and evaluate it: {"retrieval": {...}, "encoding": {...}} and/or {"sts": {...}}.

    max_length: tokens per text (None: what the model directory says), the same for queries and passages.
    per_query: the retrieval figures also hold each query's (see `ranking_metrics`).
    cache_dir: the embedding cache to read the corpus embeddings from and add them to (a run's is
    RUN/mining/cache); afterwards its least recently used entries beyond cache_max_gb (None: no bound)
    are removed. "encoding" says what encoding the retrieval evaluation did.

    The arguments and every data file are checked first, then the model directory, and only then is the
    model loaded, so that bad input fails in seconds: RecordError (a bad record) or EvaluationError.
    """
    _check_options(batch_size, max_length, dtype)
    if cache_max_gb is not None and not 0 <= cache_max_gb < math.inf:
        raise EvaluationError(f"cache bound must be >= 0 GB and finite, got {cache_max_gb!r}")
    if not beir and not sts:
        raise EvaluationError("nothing to evaluate: give a BEIR directory and/or an STS file")
    split_data = BeirSplit.load(beir, split) if beir else None
    sts_pairs = read_sts(sts) if sts else None
    if cache_dir is not None:
        _check_cache_dir(Path(cache_dir))
    root = check_model_dir(model, max_length)

    encoder = _load_encoder(model, root, max_length)
    compute_dtype = encode_dtype(dtype)
    results: dict[str, dict] = {}
    if split_data is not None:
        cache = _cache_entry(cache_dir, encoder, root, split_data, compute_dtype) if cache_dir is not None else None
        encoding: dict = {}
        results["retrieval"] = evaluate_retrieval(encoder, split_data, batch_size=batch_size,
                                                  query_instruction=query_instruction, show_progress=show_progress,
                                                  dtype=compute_dtype, per_query=per_query, cache=cache,
                                                  encoding=encoding)
        results["encoding"] = encoding
        if cache is not None:
            from embedlib.embedding_cache import gigabytes, prune_cache

            prune_cache(cache_dir, gigabytes(cache_max_gb), keep=(cache,))
    if sts_pairs is not None:
        results["sts"] = evaluate_sts(encoder, sts_pairs, batch_size=batch_size,
                                      show_progress=show_progress, dtype=compute_dtype)
    return results


def _check_cache_dir(path: Path) -> None:
    """The cache directory, or its nearest existing ancestor, must be a directory (checked before loading)."""
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                raise EvaluationError(f"cache directory {path}: {existing} exists and is not a directory")
            return


def _cache_entry(cache_dir, encoder, root: Path, split: BeirSplit, compute_dtype):
    """The cache entry of this model, corpus, max length and compute dtype, keyed as the miner keys it."""
    from embedlib.embedding_cache import EmbeddingCache, dtype_name
    from embedlib.encoder import model_fingerprint
    from embedlib.records import corpus_fingerprint

    device = encoder._default_device()
    return EmbeddingCache(cache_dir, model_fingerprint(root), corpus_fingerprint(split.corpus),
                          encoder.config.max_length, dtype_name(compute_dtype, device.type))


class _UsageError(Exception):
    pass


def off_or_float(text: str) -> float | None:
    return None if text.lower() in ("off", "none") else float(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line like every other error of the command, not usage + error
        raise _UsageError(message)


def _check_output(output: Path) -> None:
    """Fail before the model loads rather than after the whole evaluation."""
    parent = output.parent
    if output.is_dir():
        raise EvaluationError(f"--output {output}: is a directory")
    if not parent.is_dir():
        raise EvaluationError(f"--output {output}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise EvaluationError(f"--output {output}: the directory {parent} is not writable")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(description="Evaluate an embedding model directory.")
    parser.add_argument("--model", required=True, help="encoder export or Hugging Face model directory "
                                                       "(or package:<name>)")
    parser.add_argument("--beir", type=Path, help="BEIR-layout directory for retrieval evaluation")
    parser.add_argument("--split", default="dev", help="split name of queries.<split>.jsonl and qrels.<split>.tsv")
    parser.add_argument("--sts", type=Path, help="scored sentence pairs (tsv or jsonl) for STS evaluation")
    parser.add_argument("--query-instruction", default="", help="prefix added to every query")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's)")
    parser.add_argument("--dtype", choices=ENCODE_DTYPES, default="auto",
                        help="compute dtype of encoding (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--per-query", action="store_true", help="also report each query's retrieval figures")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="embedding cache shared with mining (a run's: RUN/mining/cache): corpus embeddings "
                             "of this model found there are not encoded again, and new ones are added")
    parser.add_argument("--cache-max-gb", type=off_or_float, default=DEFAULT_MAX_GB,
                        help="with --cache-dir: remove its least recently used entries beyond this many GB; "
                             f"'off': no bound (default: {DEFAULT_MAX_GB:g})")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--output", type=Path, help="also write the figures to this JSON file")
    try:
        args = parser.parse_args(argv)
        if not args.beir and not args.sts:
            raise _UsageError("give --beir DIR and/or --sts FILE")
        if args.per_query and not args.beir:
            raise _UsageError("--per-query needs --beir (it adds each query's retrieval figures)")
        if args.batch_size < 1:
            raise _UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.max_length is not None and args.max_length < 2:
            raise _UsageError(f"--max-length must be at least 2 (a text between its two special tokens), "
                              f"got {args.max_length}")
        if args.cache_max_gb is not None and not 0 <= args.cache_max_gb < math.inf:
            raise _UsageError(f"--cache-max-gb must be >= 0 and finite, got {args.cache_max_gb}")
        if args.output:
            _check_output(args.output)
        results = evaluate_model(args.model, beir=args.beir, split=args.split, sts=args.sts,
                                 query_instruction=args.query_instruction, batch_size=args.batch_size,
                                 max_length=args.max_length, dtype=args.dtype, show_progress=not args.no_progress,
                                 per_query=args.per_query, cache_dir=args.cache_dir, cache_max_gb=args.cache_max_gb)
        text = json.dumps({"model": str(args.model), **results}, indent=2)
        if args.output:  # written before printing, so that a failed write prints no figures
            try:
                atomic_write_bytes(args.output, (text + "\n").encode("utf-8"))
            except OSError as e:
                raise EvaluationError(f"--output {args.output}: cannot write: {e.strerror or e}") from e
    except (_UsageError, EvaluationError, RecordError) as error:
        print(f"error: {' '.join(str(error).splitlines())}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
