"""The records that cross process boundaries through the run directory, one definition for writers and readers.

    StoreManifest   RUN/negatives/vNNNNNN/manifest.json   written by embedlib.negstore for the miners; read
                                                          by the trainer, the sidecar, the miners
    RefreshRecord   a line of RUN/mining/refreshes.jsonl    written by mining/job.py; read by the report,
                                                          the model card, the quickstart
    NegativesCheck  what one dynamic-negatives check saw: flat keys negatives/<data set>/<figure> of a line
                    of RUN/metrics.jsonl (as dashboards and TensorBoard read them)

Each has a writer (`to_json()`, `flat()`) and a reader (`from_json()`, `from_flat()`). Reading is tolerant, as a report over someone's run must be: a missing key,
or a value of the wrong type (a string, a list, an integer too large for a float, NaN where a count
belongs), reads as None rather than raising; whether a manifest is sound enough to train with is
embedlib.negstore's check, made before it parses one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def number(value) -> float | None:
    """A finite float, or None for anything else (bool, str, list, NaN, an int too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


MAX_EXACT_INT = 2 ** 53  # beyond it an int is no step, count or version of ours (and no float holds it)


def integer(value) -> int | None:
    """An int (not a bool) a float holds exactly, or None."""
    ok = isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_EXACT_INT
    return value if ok else None


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _flag(value) -> bool | None:
    return value if isinstance(value, bool) else None


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


# ---- the negative store's manifest -----------------------------------------------------------------


@dataclass(frozen=True)
class StoreManifest:
    format_version: int
    version: int | None  # assigned at publication
    created_at: str | None  # UTC, at publication
    model_path: str  # the model that mined it
    model_step: int  # the training step of that model's export (0: the base model)
    corpus_fingerprint: str  # embedlib.records.corpus_fingerprint of the corpus it indexes
    queries_fingerprint: str  # embedlib.records.queries_fingerprint of the training queries, its rows
    num_queries: int  # Q
    k: int  # candidates per query
    corpus_size: int | None  # bounds the ids, when given
    extra: dict[str, Any] = field(default_factory=dict)  # the miner's own figures (mining/job.py)
    files: dict[str, dict] = field(default_factory=dict)  # data file name -> {size, sha256, dtype, shape}

    def to_json(self) -> dict:
        return {"format_version": self.format_version, "version": self.version, "created_at": self.created_at,
                "model_path": self.model_path, "model_step": self.model_step,
                "corpus_fingerprint": self.corpus_fingerprint, "queries_fingerprint": self.queries_fingerprint,
                "num_queries": self.num_queries, "k": self.k, "corpus_size": self.corpus_size,
                "extra": dict(self.extra), **({"files": self.files} if self.files else {})}

    @classmethod
    def from_json(cls, data: dict) -> StoreManifest:
        data = _mapping(data)
        return cls(format_version=integer(data.get("format_version")), version=integer(data.get("version")),
                   created_at=_text(data.get("created_at")), model_path=_text(data.get("model_path")) or "",
                   model_step=integer(data.get("model_step")),
                   corpus_fingerprint=_text(data.get("corpus_fingerprint")),
                   queries_fingerprint=_text(data.get("queries_fingerprint")),
                   num_queries=integer(data.get("num_queries")), k=integer(data.get("k")),
                   corpus_size=integer(data.get("corpus_size")), extra=_mapping(data.get("extra")),
                   files=_mapping(data.get("files")))


# ---- a mining pass --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefreshRecord:
    """One mining pass (`mining mine`, or the sidecar's): what it published, with what, at what cost."""

    time: str | None  # UTC when published
    mode: str | None  # "mine" or "sidecar"
    version: int | None  # the negative-store version it published
    export_step: int | None  # the training step of the model it mined with
    model_path: str | None = None
    encode_seconds: float | None = None
    search_seconds: float | None = None
    num_queries: int | None = None
    k: int | None = None
    corpus_size: int | None = None
    cache_hit: bool | None = None  # every corpus block came from the embedding cache
    cache_blocks_hit: int | None = None
    cache_blocks: int | None = None
    world_size: int | None = None
    index: str | None = None
    recall: float | None = None  # an approximate index's recall against exact search
    short_queries: int | None = None  # queries left with fewer than k candidates
    deepened_queries: int | None = None
    refresh: str | None = None  # "full" or "partial"
    partials_since_full: int | None = None
    nonpositive_positive_queries: int | None = None  # queries whose positive the model scored <= 0
    encoded_passages: int | None = None
    searched_passages: int | None = None
    padding_fraction: float | None = None
    passage_encode_seconds: float | None = None
    query_encoding: dict = field(default_factory=dict)
    partial_recall: float | None = None  # a full pass: what a partial pass would have found of its top-k
    previous_recall: float | None = None
    removed_versions: list[int] = field(default_factory=list)
    removed_cache_entries: int | None = None

    def to_json(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: dict) -> RefreshRecord:
        data = _mapping(data)
        read = {}
        for name, f in cls.__dataclass_fields__.items():
            value, kind = data.get(name), str(f.type)
            if kind.startswith("int"):
                read[name] = integer(value)
            elif kind.startswith("float"):
                read[name] = number(value)
            elif kind.startswith("bool"):
                read[name] = _flag(value)
            elif kind.startswith("str"):
                read[name] = _text(value)
            elif kind == "dict":
                read[name] = _mapping(value)
            else:  # list[int]
                read[name] = [v for v in value if integer(v) is not None] if isinstance(value, list) else []
        return cls(**read)

    @property
    def seconds(self) -> float:
        """Encode plus search seconds."""
        return (self.encode_seconds or 0.0) + (self.search_seconds or 0.0)


# ---- a training step ----------------------------------------------------------------------------


CHECK_FIGURES = ("eligible", "stale", "replaced", "mean_score", "mean_initial_score", "ratio_q10", "ratio_q50",
                 "ratio_q90", "unobserved", "version", "export_age_steps")
_CHECK_COUNTS = {"eligible", "stale", "replaced", "unobserved", "version", "export_age_steps"}


@dataclass(frozen=True)
class NegativesCheck:
    """One application of the dynamic-negatives rule to a data set (training/negatives/rule.py)."""

    eligible: int | None  # samples with a live score and s0 since their assignment: those it could judge
    stale: int | None  # samples whose negatives it replaced
    replaced: int | None  # negatives replaced
    mean_score: float | None  # mean s over the eligible samples
    mean_initial_score: float | None  # mean s0 (the store's mining score) over the same samples
    ratio_q10: float | None  # s / s0 quantiles over the eligible samples with s0 > 0
    ratio_q50: float | None
    ratio_q90: float | None
    unobserved: int | None  # samples not trained since their assignment
    version: int | None  # the negative-store version in use
    export_age_steps: int | None  # the step minus the training step of the export that mined it

    def flat(self, dataset: str) -> dict:
        return {f"negatives/{dataset}/{name}": getattr(self, name) for name in CHECK_FIGURES}

    @classmethod
    def from_flat(cls, data: dict, dataset: str) -> NegativesCheck:
        return cls(**{name: (integer if name in _CHECK_COUNTS else number)(data.get(f"negatives/{dataset}/{name}"))
                      for name in CHECK_FIGURES})
