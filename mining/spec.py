"""What to mine: the settings a standalone job writes to RUN/mining/spec.json and the sidecar reads back."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from embedlib.atomic import atomic_write_json

MINING_DIRNAME = "mining"
SPEC_NAME = "spec.json"
REFRESHES_NAME = "refreshes.jsonl"
INDEX_KINDS = ("exact", "ivf", "hnsw")
ENCODE_DTYPES = ("auto", "float32", "bfloat16")


class MiningError(Exception):
    """Bad input or a bad run directory: the message is one line naming the problem; nothing is published."""


@dataclass
class MiningSpec:
    """Everything a mining pass needs besides the model.

    corpus, pairs:     the corpus (BEIR) and the training pairs (FlagEmbedding jsonl); store rows are the
                       pairs in file order and candidate ids are corpus rows in file order.
    k:                 candidates kept per query, in rank order.
    positive_margin:   NV-Retriever's positive-aware filter: drop candidates scoring above
                       positive_margin * (the query's lowest positive score); None turns it off.
    score_cap:         drop candidates scoring above this absolute value; None turns it off.
    query_instruction: prefix for every query text (decoder embedders need one); a pair's own
                       "instruction" field wins over it.
    max_length:        passage tokens (None: the model's); query_max_length likewise for queries.
    encode_dtype:      compute dtype of encoding: "auto" (bfloat16 on CUDA, float32 on CPU), or forced.
    index:             "exact" (FAISS flat, GPUs when present), or "ivf" / "hnsw" (approximate, CPU,
                       with recall against exact search measured on recall_sample queries).
    block_rows:        corpus rows per encoding call and per cache file. Shards are whole blocks, so
                       the batches, and hence the embeddings, do not depend on the number of ranks.
    search_slack:      candidates searched beyond k + the most excluded rows of any query, so the
                       filters rarely need a second, deeper search; max_depth bounds deepening.
    cache_dir:         corpus embedding cache; None: RUN/mining/cache.
    """

    corpus: str
    pairs: str
    k: int = 200
    positive_margin: float | None = 0.95
    score_cap: float | None = None
    query_instruction: str = ""
    batch_size: int = 64
    max_length: int | None = None
    query_max_length: int | None = None
    encode_dtype: str = "auto"
    index: str = "exact"
    device: str = "auto"
    nlist: int | None = None
    nprobe: int = 32
    hnsw_m: int = 32
    ef_search: int = 256
    recall_sample: int = 1000
    block_rows: int = 4096
    search_slack: int = 32
    max_depth: int = 2048
    cache_dir: str | None = None

    def __post_init__(self):
        checks = [
            (self.k >= 1, f"k must be >= 1, got {self.k}"),
            (self.positive_margin is None or self.positive_margin > 0,
             f"positive_margin must be > 0, got {self.positive_margin}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.encode_dtype in ENCODE_DTYPES, f"encode_dtype must be one of {ENCODE_DTYPES}"),
            (self.index in INDEX_KINDS, f"index must be one of {INDEX_KINDS}, got {self.index!r}"),
            (self.device in ("auto", "cpu", "gpu"), f"device must be auto, cpu or gpu, got {self.device!r}"),
            (self.block_rows >= 1, f"block_rows must be >= 1, got {self.block_rows}"),
            (self.search_slack >= 0, f"search_slack must be >= 0, got {self.search_slack}"),
            (self.max_depth >= self.k, f"max_depth ({self.max_depth}) must be >= k ({self.k})"),
        ]
        for ok, message in checks:
            if not ok:
                raise MiningError(message)
        self.corpus = os.path.abspath(self.corpus)
        self.pairs = os.path.abspath(self.pairs)
        if self.cache_dir is not None:
            self.cache_dir = os.path.abspath(self.cache_dir)


def mining_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / MINING_DIRNAME


def cache_root(spec: MiningSpec, run_dir: str | os.PathLike) -> Path:
    return Path(spec.cache_dir) if spec.cache_dir else mining_dir(run_dir) / "cache"


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
    except TypeError as e:
        raise MiningError(f"{path}: {e}") from None
