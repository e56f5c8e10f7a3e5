"""Checks a parsed reply must pass before it becomes a record: language, exact duplicates, round trip."""
from __future__ import annotations

import logging
import re
import unicodedata
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_PUNCT_OR_SPACE = re.compile(r"[\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    """The form two texts share when they are the same text: NFKC, case-folded, punctuation and
    whitespace collapsed to single spaces."""
    return _PUNCT_OR_SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def language_ok(text: str, language: str) -> bool:
    """A script check, enough to catch a model answering in the wrong language: Chinese text must be
    mostly Han characters (English terms inside are fine); English text must be mostly Latin letters."""
    cjk = len(_CJK.findall(text))
    latin = len(_LATIN.findall(text))
    if cjk + latin == 0:
        return False
    if language == "zh":
        return cjk >= 0.3 * (cjk + latin / 4)  # a Latin letter weighs a quarter: words are ~4 letters
    if language == "en":
        return latin >= 0.8 * (cjk + latin)
    return True  # no check for other languages


class Deduplicator:
    """Exact duplicates after normalisation, across everything this shard has written (also before a
    restart: the job seeds it from the existing output)."""

    def __init__(self):
        self._seen: set[str] = set()

    @staticmethod
    def key(fields: dict) -> str:
        if "sentence1" in fields:  # an STS pair is the same pair in either order
            return "\t".join(sorted((normalize(fields["sentence1"]), normalize(fields["sentence2"]))))
        return normalize(fields.get("query") or fields["title"])

    def add(self, fields: dict) -> bool:
        """True and remembered if new, False if a duplicate."""
        key = self.key(fields)
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


class RoundTripFilter:
    """A generated query must retrieve its source passage within the top k of the whole corpus.

    The corpus (data_gen.corpus.ShardCorpus: its passages are streamed from the file, a block at a time)
    is encoded once (cached next to the output, keyed by model and corpus fingerprints, so restarts and
    the other shards of an array job reuse it); only its embeddings are held.
    """

    def __init__(self, encoder_path: str | Path, corpus, k: int, cache_dir: Path,
                 batch_size: int = 64, device: str | None = None, block_rows: int = 8192):
        from embedlib.atomic import atomic_write_bytes, atomic_write_json
        from embedlib.embedding_cache import DamagedFile, checked_npy_bytes, load_checked_npy
        from embedlib.encoder import Encoder, model_fingerprint

        self.k = k
        self.encoder = Encoder.from_pretrained(encoder_path)
        self.device = device
        self.batch_size = batch_size
        fingerprint = f"{model_fingerprint(encoder_path)[:16]}-{corpus.fingerprint[:16]}"
        cache = Path(cache_dir) / f"roundtrip-corpus-{fingerprint}.npy"
        self.corpus_emb = None
        if cache.exists():
            try:
                self.corpus_emb = np.array(load_checked_npy(cache, fingerprint))
            except (OSError, DamagedFile) as e:
                log.warning("discarding damaged cache file %s (%s): encoding the corpus again", cache, e)
        if self.corpus_emb is None:
            blocks = [self.encoder.encode(block, batch_size=batch_size, device=device, show_progress=False)
                      for block in corpus.iter_passages(block_rows)]
            self.corpus_emb = np.concatenate(blocks) if blocks else np.zeros((0, self.encoder.embedding_dim), np.float32)
            atomic_write_bytes(cache, checked_npy_bytes(self.corpus_emb, fingerprint))
            atomic_write_json(cache.with_suffix(".json"), {"encoder": str(encoder_path), "num_docs": corpus.num_docs})

    def passes(self, queries: list[str], source_rows: list[int]) -> list[bool]:
        """Whether each query retrieves its source passage (by corpus row) within the top k."""
        from embedlib.search import exact_search

        if not queries:
            return []
        query_emb = self.encoder.encode(queries, batch_size=self.batch_size, device=self.device,
                                        show_progress=False)
        _, ids = exact_search(self.corpus_emb, query_emb, min(self.k, len(self.corpus_emb)))
        return [source in set(np.asarray(row).tolist()) for row, source in zip(ids, source_rows)]
