"""What to mine: the settings a standalone job writes to RUN/mining/spec.json and the sidecar reads back."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from embedlib.atomic import atomic_write_json
from embedlib.embedding_cache import DEFAULT_MAX_GB, run_cache_dir
from embedlib.rundir import MINING
from mining.options import option

SPEC_NAME = "spec.json"
REFRESHES_NAME = "refreshes.jsonl"
INDEX_KINDS = ("exact", "ivf", "hnsw")
ENCODE_DTYPES = ("auto", "float32", "bfloat16")
DEVICES = ("auto", "cpu", "gpu")


class MiningError(Exception):
    """Bad input or a bad run directory: the message is one line naming the problem; nothing is published."""


class InvalidOption(MiningError):
    """A setting out of range. `field` names it, so that the command line can name its flag instead."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def check_options(obj) -> None:
    """InvalidOption for the first field whose value is not among its option()'s choices."""
    for f in dataclasses.fields(obj):
        choices, value = f.metadata.get("choices"), getattr(obj, f.name)
        if choices and value not in choices:
            raise InvalidOption(f.name, f"must be one of {', '.join(choices)}, got {value!r}")


def check_ranges(checks: list[tuple[str, bool, str]]) -> None:
    """InvalidOption for the first (field, ok, problem) that is not ok."""
    for name, ok, problem in checks:
        if not ok:
            raise InvalidOption(name, problem)


@dataclass
class MiningSpec:
    """Everything a mining pass needs besides the model: what `python -m mining mine` takes on its
    command line (made from these fields by mining/options.py) and writes to RUN/mining/spec.json for
    the sidecar. Each field's help is its one description; `python -m mining mine --help` prints them
    with their defaults. Range checks are made here, in __post_init__, for both.
    """

    corpus: str = option("BEIR corpus (.jsonl, .jsonl.gz, .parquet); candidate ids are its rows in file order")
    pairs: str = option("training pairs (FlagEmbedding format); the store's rows are the pairs in file order",
                        flag="--queries")
    k: int = option("candidates kept per query, in rank order", 200)
    positive_margin: float | None = option(
        "NV-Retriever's positive-aware filter: drop candidates scoring above this times the query's lowest "
        "positive score", 0.95)
    score_cap: float | None = option("drop candidates scoring above this absolute score", None)
    query_instruction: str = option(
        "prefix for every query (decoder embedders need one); a pair's own \"instruction\" field wins over it", "")
    batch_size: int = option("texts per encoding batch", 64)
    max_length: int | None = option("passage tokens (default: the model's)", None)
    query_max_length: int | None = option("query tokens (default: the passage length)", None)
    encode_dtype: str = option("compute dtype of encoding: auto is bfloat16 on CUDA, float32 on CPU", "auto",
                               choices=ENCODE_DTYPES)
    index: str = option("exact: flat inner product, on GPUs when present (FAISS where it has GPU support, else "
                        "torch); ivf or hnsw: approximate, FAISS on the CPU, with the recall against exact "
                        "search measured on recall_sample queries", "exact",
                        choices=INDEX_KINDS)
    device: str = option("device of exact search (auto: the GPUs when there are any)", "auto", choices=DEVICES)
    nlist: int | None = option("IVF lists (default: about 4 sqrt(corpus rows))", None)
    nprobe: int = option("IVF lists probed per query", 32)
    hnsw_m: int = option("HNSW links per node", 32)
    ef_search: int = option("HNSW search breadth (efSearch; at least the search depth)", 256)
    recall_sample: int = option("queries on which an approximate index's recall is measured", 1000)
    block_rows: int = option(
        "corpus rows per encoding call and per cache file. Shards are whole blocks, so the batches, and hence "
        "the embeddings, do not depend on the number of ranks", 4096)
    search_slack: int = option(
        "candidates searched beyond k + the most excluded rows of any query, so that the filters rarely need "
        "a second, deeper search", 32)
    max_depth: int = option("deepest search when the filters leave a query fewer than k candidates", 2048)
    cache_dir: str | None = option("corpus embedding cache, shared with evaluation (default: RUN/mining/cache)", None)
    cache_max_gb: float | None = option(
        "bound of the embedding cache in GB: after each pass the least recently used entries are removed until "
        "it fits (the run's bound: the sidecar and the quickstart's evaluations keep to it too)", DEFAULT_MAX_GB)

    def __post_init__(self):
        check_options(self)

        def at_least(low: int, *names: str, optional: bool = False) -> list[tuple[str, bool, str]]:
            values = {name: getattr(self, name) for name in names}
            return [(name, (optional and value is None) or value >= low, f"must be >= {low}, got {value}")
                    for name, value in values.items()]

        check_ranges([
            *at_least(1, "k", "batch_size", "nprobe", "hnsw_m", "ef_search", "recall_sample", "block_rows"),
            *at_least(1, "nlist", optional=True),
            *at_least(2, "max_length", "query_max_length", optional=True),  # the special tokens take two
            *at_least(0, "search_slack"),
            ("positive_margin", self.positive_margin is None or 0 < self.positive_margin < math.inf,
             f"must be > 0 and finite (or off), got {self.positive_margin}"),
            ("score_cap", self.score_cap is None or math.isfinite(self.score_cap),
             f"must be a finite number (or off), got {self.score_cap}"),
            ("max_depth", self.max_depth >= self.k, f"must be >= k ({self.k}), got {self.max_depth}"),
            ("cache_max_gb", self.cache_max_gb is None or 0 <= self.cache_max_gb < math.inf,
             f"must be >= 0 and finite (or off), got {self.cache_max_gb}"),
        ])
        self.corpus = os.path.abspath(self.corpus)
        self.pairs = os.path.abspath(self.pairs)
        if self.cache_dir is not None:
            self.cache_dir = os.path.abspath(self.cache_dir)


def mining_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / MINING


def cache_root(spec: MiningSpec, run_dir: str | os.PathLike) -> Path:
    return Path(spec.cache_dir) if spec.cache_dir else run_cache_dir(run_dir)


def save_spec(spec: MiningSpec, run_dir: str | os.PathLike) -> Path:
    path = mining_dir(run_dir) / SPEC_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, dataclasses.asdict(spec))
    return path


def load_spec(run_dir: str | os.PathLike) -> MiningSpec:
    path = mining_dir(run_dir) / SPEC_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MiningError(f"{path} not found: run `python -m mining mine ... --run-dir {run_dir}` first") from None
    except ValueError as e:
        raise MiningError(f"{path}: not valid JSON ({e})") from None
    known = {f.name for f in dataclasses.fields(MiningSpec)}
    if not isinstance(data, dict) or set(data) - known:
        raise MiningError(f"{path}: unknown fields {sorted(set(data) - known) if isinstance(data, dict) else data}")
    try:
        return MiningSpec(**data)
    except (TypeError, MiningError) as e:  # a missing field, or one out of range
        raise MiningError(f"{path}: {e}") from None
