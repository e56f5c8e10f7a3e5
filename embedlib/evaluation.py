"""Evaluation of an embedding model on sets of four task categories, each with its metric as MTEB and
C-MTEB report it (its main score first):

    retrieval            a BEIR-layout directory: nDCG@10, Recall@10, Recall@100, MRR@10 with the
                         definitions trec_eval (and so BEIR and MTEB) uses: linear gain, log2 discount,
                         relevance > 0 counts; an exact search over the whole corpus
    sts                  scored sentence pairs: Spearman correlation of cosine similarity with the score
    pair_classification  sentence pairs labelled 0/1: average precision of the cosine scores against the
                         labels (MTEB's cosine AP; tied scores count as sklearn counts them)
    classification       labelled texts, a training and a test file: accuracy of a logistic regression
                         (sklearn, max_iter 100, as MTEB) trained on the frozen embeddings of the one and
                         scored on the other

    python -m embedlib.evaluation --model DIR --beir data/scifact --split dev
    python -m embedlib.evaluation --model DIR --sts ../shared/data/stsb_en/dev.tsv
    python -m embedlib.evaluation --model DIR --pairs pairs.dev.tsv --classification train.jsonl test.jsonl
    python -m embedlib.evaluation --model DIR --sets sets.yaml

An evaluation set (`EvalSet`: name, category, path, ...) is one of these; `--sets` reads a YAML or JSON
list of them, and the trainer's `evaluation.sets` is the same list. The output has one result per set
(`{"set", "category", "metrics", "main_score"}`), the mean main score of each category and "average",
the mean of the category means (how the paper's Table 4 averages); each flag's figures also stay under
their category's name ("retrieval", "sts", "pair_classification", "classification").

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
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np

from embedlib.atomic import atomic_write_bytes
from embedlib.embedding_cache import DEFAULT_MAX_GB
from embedlib.records import (Document, LabeledText, Query, RecordError, ScoredPair, _iter_lines, is_tsv,
                              iter_labeled_texts, iter_scored_pairs, read_corpus, read_qrels, read_queries,
                              read_scored_pairs)

RECALL_CUTOFFS = (10, 100)
CATEGORIES = ("retrieval", "sts", "pair_classification", "classification")
# The figure each category is compared by (MTEB's main score), and what the set's "main_score" is.
MAIN_METRIC = {"retrieval": "ndcg@10", "sts": "spearman", "pair_classification": "cosine_ap",
               "classification": "accuracy"}


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


def evaluate_sts(encoder, pairs: list[ScoredPair], *, batch_size: int = 64, show_progress: bool = True, dtype=None,
                 per_pair: bool = False) -> dict:
    """{"spearman", "num_pairs"}; per_pair: also "per_pair_cosine", each pair's cosine in file order (for
    paired bootstrap comparisons of two models, bench/ablation.py)."""
    _check_sts_scores(pairs)
    first = encoder.encode([p.sentence1 for p in pairs], batch_size=batch_size, show_progress=show_progress, dtype=dtype)
    second = encoder.encode([p.sentence2 for p in pairs], batch_size=batch_size, show_progress=show_progress, dtype=dtype)
    cosine = np.sum(first * second, axis=1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1))
    metrics = {"spearman": spearman(cosine, np.array([p.score for p in pairs], dtype=np.float64)), "num_pairs": len(pairs)}
    if per_pair:
        metrics["per_pair_cosine"] = [float(c) for c in cosine]
    return metrics


def _cosine(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    first, second = first.astype(np.float64), second.astype(np.float64)
    return np.sum(first * second, axis=1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1))


# ---- pair classification: average precision of cosine scores against 0/1 labels ------------------------


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of `scores` ranking the positives (labels 1) first, as sklearn's
    average_precision_score computes it: sum over the distinct scores t, from high to low, of
    (recall at t - recall at the previous t) * precision at t, where "at t" takes every pair scored >= t.
    Tied scores are one threshold: their order does not change the figure."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels) == 1
    if not labels.any():
        raise EvaluationError("no positive pair (label 1); average precision is undefined")
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_positives = np.cumsum(labels)[last_of_each_score]
    precision = true_positives / (last_of_each_score + 1)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def read_pair_labels(path: str | Path) -> list[ScoredPair]:
    """Sentence pairs with a 0/1 label (records.read_scored_pairs' formats: a tsv with a header naming
    sentence1, sentence2 and label, or jsonl {"sentence1", "sentence2", "label"}), with both labels present:
    another value is a RecordError at its line."""
    path = Path(path)
    if not path.exists():
        raise EvaluationError(f"{path}: no such file (expected sentence pairs labelled 0 or 1)")

    def read(p: Path) -> list[ScoredPair]:
        pairs = []
        for line, pair in iter_scored_pairs(p):
            if pair.score not in (0.0, 1.0):
                raise RecordError(p, line, "label", f"expected 0 or 1 (a pair classification label), got {pair.score:g}")
            pairs.append(pair)
        return pairs

    pairs = _read(read, path)
    if not pairs:
        raise EvaluationError(f"{path}: no sentence pairs")
    _check_pair_labels(pairs, f"{path}: ")
    return pairs


def _check_pair_labels(pairs: list[ScoredPair], where: str = "") -> None:
    if not pairs:
        raise EvaluationError(f"{where}no sentence pairs")
    labels = {p.score for p in pairs}
    if len(labels) < 2:
        raise EvaluationError(f"{where}every pair has the label {labels.pop():g}; average precision needs pairs "
                              "labelled 1 and pairs labelled 0")


def evaluate_pair_classification(encoder, pairs: list[ScoredPair], *, batch_size: int = 64, show_progress: bool = True,
                                 dtype=None, per_pair: bool = False) -> dict:
    """{"cosine_ap", "num_pairs", "num_positives"}: the average precision of the pairs' cosine similarity
    against their 0/1 labels; per_pair: also "per_pair_cosine", as evaluate_sts."""
    _check_pair_labels(pairs)
    first = encoder.encode([p.sentence1 for p in pairs], batch_size=batch_size, show_progress=show_progress, dtype=dtype)
    second = encoder.encode([p.sentence2 for p in pairs], batch_size=batch_size, show_progress=show_progress, dtype=dtype)
    labels = np.array([p.score for p in pairs])
    cosine = _cosine(first, second)
    metrics = {"cosine_ap": average_precision(cosine, labels), "num_pairs": len(pairs),
               "num_positives": int(labels.sum())}
    if per_pair:
        metrics["per_pair_cosine"] = [float(c) for c in cosine]
    return metrics


# ---- classification: a logistic regression on frozen embeddings ------------------------------------------


@dataclass(frozen=True)
class ClassificationData:
    """The labelled texts a classifier is trained on and those it is scored on."""

    train: list[LabeledText]
    test: list[LabeledText]


def _iter_labeled(path: Path):
    """(line, LabeledText) of a jsonl / parquet file (records' {"text", "label"}) or a tsv: text<TAB>label,
    or a header naming the two columns text and label in either order."""
    if not is_tsv(path):  # RecordError for a type no reader takes
        yield from iter_labeled_texts(path)
        return
    columns = None  # (text column, label column)
    for line, text in _iter_lines(path):
        if not text.strip(" "):
            continue
        cells = text.split("\t")
        if columns is None:
            names = [c.strip().lower() for c in cells]
            columns = (0, 1)
            if sorted(names) == ["label", "text"]:
                columns = (names.index("text"), names.index("label"))
                continue
        if len(cells) != 2:
            raise RecordError(path, line, None, f"expected 2 tab-separated columns (text, label), got {len(cells)}")
        for name, column in zip(("text", "label"), columns):
            if not cells[column].strip():
                raise RecordError(path, line, name, "empty")
        yield line, LabeledText(cells[columns[0]], cells[columns[1]])


def read_classification(train: str | Path, test: str | Path) -> ClassificationData:
    """Both files read and checked: neither empty, at least two labels among the training texts, and every
    test label among them (a RecordError at the test line otherwise: no classifier could predict it)."""
    data = []
    for path, role in ((Path(train), "training"), (Path(test), "test")):
        if not path.exists():
            raise EvaluationError(f"{path}: no such file (expected labelled {role} texts)")
        texts = _read(lambda p: list(_iter_labeled(p)), path)
        if not texts:
            raise EvaluationError(f"{path}: no labelled texts")
        data.append(texts)
    (train_texts, test_texts), train_path = data, Path(train)
    labels = {t.label for _, t in train_texts}
    if len(labels) < 2:
        raise EvaluationError(f"{train_path}: every text has the label {labels.pop()!r}; a classifier needs at "
                              "least two labels")
    for line, text in test_texts:
        if text.label not in labels:
            raise RecordError(test, line, "label", f"{text.label!r} is not a label of the training texts {train_path}")
    return ClassificationData([t for _, t in train_texts], [t for _, t in test_texts])


def classification_accuracy(train_x: np.ndarray, train_y: list[str], test_x: np.ndarray, test_y: list[str], *,
                            samples_per_label: int | None = None, experiments: int = 10, seed: int = 42) -> float:
    """Accuracy on the test embeddings of sklearn's LogisticRegression(max_iter=100) fitted on the training
    ones, as MTEB's classification tasks score. samples_per_label: MTEB's few-shot protocol, `experiments`
    classifiers each on up to that many training texts per label (drawn as mteb draws them: the indices
    shuffled again by RandomState(seed) before each), the accuracies averaged; None: one classifier on
    every training text. Deterministic."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if samples_per_label is None:
        draws = [np.arange(len(train_y))]
    else:
        draws, indices = [], list(range(len(train_y)))
        for _ in range(experiments):
            np.random.RandomState(seed).shuffle(indices)
            taken: dict[str, int] = {}
            draw = []
            for i in indices:
                if taken.get(train_y[i], 0) < samples_per_label:
                    draw.append(i)
                    taken[train_y[i]] = taken.get(train_y[i], 0) + 1
            draws.append(np.array(draw))
    accuracies = []
    for draw in draws:
        with warnings.catch_warnings():  # 100 iterations, as MTEB, converged or not
            warnings.simplefilter("ignore", ConvergenceWarning)
            classifier = LogisticRegression(max_iter=100).fit(train_x[draw], train_y[draw])
        accuracies.append(float(np.mean(classifier.predict(test_x) == test_y)))
    return float(np.mean(accuracies))


def evaluate_classification(encoder, data: ClassificationData, *, batch_size: int = 64, show_progress: bool = True,
                            dtype=None, samples_per_label: int | None = None) -> dict[str, float]:
    """{"accuracy", "num_train", "num_test"}: see `classification_accuracy`."""
    def embed(texts: list[LabeledText]) -> np.ndarray:
        return encoder.encode([t.text for t in texts], batch_size=batch_size, show_progress=show_progress,
                              dtype=dtype).astype(np.float64)

    accuracy = classification_accuracy(embed(data.train), [t.label for t in data.train], embed(data.test),
                                       [t.label for t in data.test], samples_per_label=samples_per_label)
    return {"accuracy": accuracy, "num_train": len(data.train), "num_test": len(data.test)}


# ---- evaluation sets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set. Its options are documented here once; `--sets FILE` (a YAML or JSON list of
    them) and the trainer's `evaluation.sets` (training/config.py) take the same keys. Relative paths
    are relative to the working directory."""

    # The set's name: the "set" of its results and of its RUN/eval.jsonl rows; unique among the sets.
    name: str
    # retrieval (main score nDCG@10), sts (Spearman), pair_classification (cosine AP) or classification
    # (accuracy); see the module's docstring.
    category: Literal["retrieval", "sts", "pair_classification", "classification"]
    # What is scored. retrieval: a BEIR-layout directory; sts: scored sentence pairs (tsv or jsonl, as
    # records.read_scored_pairs reads them); pair_classification: the same with 0/1 labels; classification:
    # the test texts ({"text", "label"} jsonl, or a tsv text<TAB>label).
    path: str
    # retrieval: the split (queries.<split>.jsonl, qrels.<split>.tsv).
    split: str = "dev"
    # classification: the labelled texts the classifier is trained on (the formats of path).
    train: str | None = None
    # retrieval: the prefix of every query (None: the evaluation's query instruction).
    query_instruction: str | None = None
    # classification: MTEB's few-shot protocol, 10 classifiers on this many training texts per label
    # (MTEB: 8), accuracy averaged; None: one classifier on every training text.
    samples_per_label: int | None = None


SET_KEYS = tuple(f.name for f in fields(EvalSet))


def check_set(spec: EvalSet, where: str = "") -> None:
    """The set's options, without reading its files; EvaluationError prefixed by `where`."""
    def fail(message: str):
        raise EvaluationError(f"{where}{message}")

    if spec.category not in CATEGORIES:
        fail(f"unknown category {spec.category!r}; expected one of: {', '.join(CATEGORIES)}")
    for key in ("name", "path", "split"):
        if not isinstance(getattr(spec, key), str) or not getattr(spec, key):
            fail(f"'{key}' must be a non-empty string, got {getattr(spec, key)!r}")
    if (spec.category == "classification") != (spec.train is not None):
        fail("'train' (the training texts) is required for classification" if spec.category == "classification"
             else f"'train' applies to classification sets only, not {spec.category}")
    if spec.train is not None and (not isinstance(spec.train, str) or not spec.train):
        fail(f"'train' must be a non-empty string, got {spec.train!r}")
    if spec.query_instruction is not None and not isinstance(spec.query_instruction, str):
        fail(f"'query_instruction' must be a string, got {spec.query_instruction!r}")
    if spec.samples_per_label is not None:
        if spec.category != "classification":
            fail(f"'samples_per_label' applies to classification sets only, not {spec.category}")
        if not isinstance(spec.samples_per_label, int) or isinstance(spec.samples_per_label, bool) \
                or spec.samples_per_label < 1:
            fail(f"'samples_per_label' must be at least 1 (null: every training text), got {spec.samples_per_label!r}")


def check_set_names(specs: list[EvalSet], where: str = "") -> None:
    names = [s.name for s in specs]
    for name in names:
        if names.count(name) > 1:
            raise EvaluationError(f"{where}two sets are named {name!r}; set names must be unique")


def load_set(spec: EvalSet):
    """The set's data read and checked: a BeirSplit, scored pairs, or ClassificationData."""
    check_set(spec, f"set {spec.name!r}: ")
    if spec.category == "retrieval":
        return BeirSplit.load(spec.path, spec.split)
    if spec.category == "sts":
        return read_sts(spec.path)
    if spec.category == "pair_classification":
        return read_pair_labels(spec.path)
    return read_classification(spec.train, spec.path)


def read_sets(path: str | Path) -> list[EvalSet]:
    """A YAML or JSON file listing sets (a list, or a mapping with the list under "sets"), checked."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvaluationError(f"{path}: no such file (expected a YAML or JSON list of evaluation sets)") from None
    except OSError as e:
        raise EvaluationError(f"{path}: cannot read: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise EvaluationError(f"{path}: not valid YAML or JSON: {str(e).splitlines()[0]}") from None
    if isinstance(raw, dict) and set(raw) == {"sets"}:
        raw = raw["sets"]
    if not isinstance(raw, list) or not raw:
        raise EvaluationError(f"{path}: expected a non-empty list of sets (or a mapping with it under 'sets')")
    specs = []
    for i, item in enumerate(raw):
        where = f"{path}: set {i}: "
        if not isinstance(item, dict):
            raise EvaluationError(f"{where}expected a mapping with name, category and path, got {item!r}")
        unknown = [k for k in item if k not in SET_KEYS]
        if unknown:
            raise EvaluationError(f"{where}unknown key {unknown[0]!r}; expected: {', '.join(SET_KEYS)}")
        missing = [k for k in ("name", "category", "path") if k not in item]
        if missing:
            raise EvaluationError(f"{where}missing {', '.join(repr(k) for k in missing)}")
        spec = EvalSet(**item)
        check_set(spec, where)
        specs.append(spec)
    check_set_names(specs, f"{path}: ")
    return specs


def evaluate_set(encoder, spec: EvalSet, data, *, batch_size: int = 64, query_instruction: str = "",
                 show_progress: bool = True, dtype=None, per_query: bool = False, cache=None) -> dict:
    """{"set", "category", "metrics", "main_score"} (and "encoding" for retrieval) of one loaded set."""
    options = {"batch_size": batch_size, "show_progress": show_progress, "dtype": dtype}
    result: dict = {"set": spec.name, "category": spec.category}
    if spec.category == "retrieval":
        encoding: dict = {}
        instruction = query_instruction if spec.query_instruction is None else spec.query_instruction
        metrics = evaluate_retrieval(encoder, data, query_instruction=instruction, per_query=per_query, cache=cache,
                                     encoding=encoding, **options)
        result["encoding"] = encoding
    elif spec.category == "sts":
        metrics = evaluate_sts(encoder, data, per_pair=per_query, **options)
    elif spec.category == "pair_classification":
        metrics = evaluate_pair_classification(encoder, data, per_pair=per_query, **options)
    else:
        metrics = evaluate_classification(encoder, data, samples_per_label=spec.samples_per_label, **options)
    return {**result, "metrics": metrics, "main_score": metrics[MAIN_METRIC[spec.category]]}


def category_means(results: list[dict]) -> dict:
    """{"categories": {category: mean main score of its sets}, "average": the mean of those means} (the
    paper's Table 4 average: of the task-category means), categories in CATEGORIES order."""
    by_category = {c: [r["main_score"] for r in results if r["category"] == c] for c in CATEGORIES}
    means = {c: float(np.mean(scores)) for c, scores in by_category.items() if scores}
    return {"categories": means, "average": float(np.mean(list(means.values()))) if means else None}


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


FLAG_CATEGORIES = {"beir": "retrieval", "sts": "sts", "pairs": "pair_classification",
                   "classification": "classification"}


def flag_sets(*, beir=None, split: str = "dev", sts=None, pairs=None, classification=None,
              taken: tuple[str, ...] = ()) -> list[EvalSet]:
    """The sets the single-set options stand for, each named after its directory or file (without its
    extensions; "-2", "-3" appended where that name is taken)."""
    specs, names = [], set(taken)

    def name_of(path) -> str:
        base = Path(path).name.split(".")[0] or Path(path).name or "set"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.add(name)
        return name

    if beir:
        specs.append(EvalSet(name_of(beir), "retrieval", str(beir), split=split))
    if sts:
        specs.append(EvalSet(name_of(sts), "sts", str(sts)))
    if pairs:
        specs.append(EvalSet(name_of(pairs), "pair_classification", str(pairs)))
    if classification:
        train, test = classification
        specs.append(EvalSet(name_of(test), "classification", str(test), train=str(train)))
    return specs


def evaluate_model(model: str | Path, *, beir: str | Path | None = None, split: str = "dev", sts: str | Path | None = None,
                   pairs: str | Path | None = None, classification: tuple[str | Path, str | Path] | None = None,
                   sets: list[EvalSet] = (), query_instruction: str = "", batch_size: int = 64,
                   max_length: int | None = None, dtype: str = "auto", show_progress: bool = True,
                   per_query: bool = False, cache_dir: str | Path | None = None,
                   cache_max_gb: float | None = DEFAULT_MAX_GB) -> dict:
    """Load a model directory and evaluate it on the sets given: those of the single-set options (beir with
    split, sts, pairs, classification = (train, test)) and `sets`.

    Returns {"sets": [evaluate_set's result per set], "categories": {category: mean main score},
    "average": the mean of the category means}, and for each single-set option its figures under its
    category's name ({"retrieval": {...}, "encoding": {...}} for beir, {"sts": {...}}, ...).

    max_length: tokens per text (None: what the model directory says), the same for queries and passages.
    per_query: the retrieval figures also hold each query's (see `ranking_metrics`), the STS and pair-classification
               figures each pair's cosine ("per_pair_cosine", in file order).
    cache_dir: the embedding cache to read the corpus embeddings from and add them to (a run's is
    RUN/mining/cache); afterwards its least recently used entries beyond cache_max_gb (None: no bound)
    are removed. "encoding" says what encoding a retrieval evaluation did.

    The arguments and every data file are checked first, then the model directory, and only then is the
    model loaded, so that bad input fails in seconds: RecordError (a bad record) or EvaluationError.
    """
    _check_options(batch_size, max_length, dtype)
    if cache_max_gb is not None and not 0 <= cache_max_gb < math.inf:
        raise EvaluationError(f"cache bound must be >= 0 GB and finite, got {cache_max_gb!r}")
    sets = list(sets)
    for spec in sets:
        check_set(spec, f"set {spec.name!r}: ")
    check_set_names(sets)
    flagged = flag_sets(beir=beir, split=split, sts=sts, pairs=pairs, classification=classification,
                        taken=tuple(s.name for s in sets))
    specs = flagged + sets
    if not specs:
        raise EvaluationError("nothing to evaluate: give a BEIR directory, an STS file, labelled pairs, "
                              "classification texts and/or evaluation sets")
    loaded = [load_set(spec) for spec in specs]
    if cache_dir is not None:
        _check_cache_dir(Path(cache_dir))
    root = check_model_dir(model, max_length)

    encoder = _load_encoder(model, root, max_length)
    compute_dtype = encode_dtype(dtype)
    results, caches = [], []
    for spec, data in zip(specs, loaded):
        cache = None
        if spec.category == "retrieval" and cache_dir is not None:
            cache = corpus_cache_entry(cache_dir, encoder, root, data, compute_dtype)
            caches.append(cache)
        results.append(evaluate_set(encoder, spec, data, batch_size=batch_size, query_instruction=query_instruction,
                                    show_progress=show_progress, dtype=compute_dtype, per_query=per_query,
                                    cache=cache))
    if caches:
        from embedlib.embedding_cache import gigabytes, prune_cache

        prune_cache(cache_dir, gigabytes(cache_max_gb), keep=tuple(caches))
    out: dict = {}
    for spec, result in zip(flagged, results):  # the single-set options' figures, as before there were sets
        out[spec.category] = result["metrics"]
        if spec.category == "retrieval":
            out["encoding"] = result["encoding"]
    return {**out, "sets": results, **category_means(results)}


def _check_cache_dir(path: Path) -> None:
    """The cache directory, or its nearest existing ancestor, must be a directory (checked before loading)."""
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                raise EvaluationError(f"cache directory {path}: {existing} exists and is not a directory")
            return


def corpus_cache_entry(cache_dir, encoder, root: Path, split: BeirSplit, compute_dtype):
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
    parser = _Parser(description="Evaluate an embedding model directory on retrieval, STS, pair classification "
                                 "and classification sets.")
    parser.add_argument("--model", required=True, help="encoder export or Hugging Face model directory "
                                                       "(or package:<name>)")
    parser.add_argument("--beir", type=Path, help="BEIR-layout directory for retrieval evaluation")
    parser.add_argument("--split", default="dev", help="split name of queries.<split>.jsonl and qrels.<split>.tsv")
    parser.add_argument("--sts", type=Path, help="scored sentence pairs (tsv or jsonl) for STS evaluation")
    parser.add_argument("--pairs", type=Path, help="sentence pairs labelled 0/1 (tsv or jsonl) for pair "
                                                   "classification (average precision of cosine)")
    parser.add_argument("--classification", type=Path, nargs=2, metavar=("TRAIN", "TEST"),
                        help="labelled texts (jsonl {text, label} or tsv text<TAB>label): a logistic regression "
                             "trained on TRAIN's embeddings, its accuracy on TEST")
    parser.add_argument("--sets", type=Path, help="a YAML or JSON list of evaluation sets ({name, category, path, "
                                                  "split, train, ...}; embedlib.evaluation.EvalSet)")
    parser.add_argument("--query-instruction", default="", help="prefix added to every query")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's)")
    parser.add_argument("--dtype", choices=ENCODE_DTYPES, default="auto",
                        help="compute dtype of encoding (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--per-query", action="store_true", help="also report each query's retrieval figures and each pair's cosine "
                                                         "(STS, pair classification): for paired comparisons")
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
        if not (args.beir or args.sts or args.pairs or args.classification or args.sets):
            raise _UsageError("give --beir DIR, --sts FILE, --pairs FILE, --classification TRAIN TEST "
                              "and/or --sets FILE")
        if args.per_query and not (args.beir or args.sets or args.sts or args.pairs):
            raise _UsageError("--per-query needs --beir, --sts, --pairs or --sets (it adds each query's retrieval "
                              "figures and each pair's cosine)")
        if args.batch_size < 1:
            raise _UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.max_length is not None and args.max_length < 2:
            raise _UsageError(f"--max-length must be at least 2 (a text between its two special tokens), "
                              f"got {args.max_length}")
        if args.cache_max_gb is not None and not 0 <= args.cache_max_gb < math.inf:
            raise _UsageError(f"--cache-max-gb must be >= 0 and finite, got {args.cache_max_gb}")
        if args.output:
            _check_output(args.output)
        sets = read_sets(args.sets) if args.sets else []
        results = evaluate_model(args.model, beir=args.beir, split=args.split, sts=args.sts, pairs=args.pairs,
                                 classification=args.classification, sets=sets,
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
