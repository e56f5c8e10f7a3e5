"""The corpus as a data_gen job reads it: streamed, never held whole, and de-duplicated across shards.

One pass over the whole file (embedlib.records.iter_corpus: every record checked, so a bad one is an
error naming file, line and field before anything is sent or written) notes, per passage, which shard
it belongs to and a 64-bit hash of its normalised text (data_gen.filters.normalize); later passes
re-read the file for this shard's passages when the job needs them. A job's memory therefore holds
a few bytes per passage (and the ids while the ids are checked for duplicates), not the texts.

Equal passages (the same normalised text under different ids) generate the same queries; their ids
hash to different shards, so each shard's job would ask for, and keep, its own copy. Every shard sees
the whole corpus in the first pass, so every shard knows the same rule without talking to the others:
the first passage in corpus order with a text is generated from, and every later one is rejected as
a duplicate, in whichever shard it is. Hash matches are confirmed on the texts themselves.
"""
from __future__ import annotations

import array
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedlib.records import Document, RecordError, corpus_fingerprint, iter_corpus, iter_records, parse_document

from .filters import normalize


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process and on every machine (unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def shard_of(doc_id: str, num_shards: int) -> int:
    return stable_hash(doc_id) % num_shards


@dataclass(frozen=True)
class ShardPassage:
    row: int  # the passage's row in the corpus (file order)
    doc: Document
    duplicate_of: str | None  # the id of the earlier passage with the same text, if any


class ShardCorpus:
    """One shard's passages of a corpus file, streamed from it in corpus order (see the module doc)."""

    def __init__(self, path: str | os.PathLike, shard: int = 0, num_shards: int = 1, max_docs: int | None = None):
        self.path = Path(path)
        self.shard, self.num_shards = shard, num_shards
        self._state = self._stat()
        shard_rows, hashes = array.array("q"), array.array("Q")

        def scanned() -> Iterator[Document]:
            for row, (_, doc) in enumerate(iter_corpus(self.path)):
                if shard_of(doc.id, num_shards) == shard:
                    shard_rows.append(row)
                text = normalize(doc.passage)
                hashes.append(stable_hash(text) if text else 0)  # 0: nothing to compare (an empty passage)
                yield doc

        self.fingerprint = corpus_fingerprint(scanned())  # of the whole corpus (the round-trip cache's key)
        self.num_docs = len(hashes)
        rows = np.frombuffer(shard_rows, dtype=np.int64) if len(shard_rows) else np.zeros(0, np.int64)
        self.rows = rows[:max_docs].copy()  # the shard's first max_docs passages
        self.duplicate_of = self._duplicates(np.frombuffer(hashes, dtype=np.uint64) if len(hashes)
                                             else np.zeros(0, np.uint64))

    def __len__(self) -> int:
        return len(self.rows)

    def _stat(self) -> tuple:
        st = self.path.stat()
        return st.st_size, st.st_mtime_ns, st.st_ino

    def _check_unchanged(self) -> None:
        try:
            same = self._stat() == self._state
        except FileNotFoundError:
            same = False
        if not same:
            raise RecordError(self.path, None, None, "changed or disappeared after it was read; run again once it "
                                                     "is complete")

    def _iter_documents(self) -> Iterator[tuple[int, Document]]:
        """(row, Document) of every passage, re-read from the file (checked already: parsed, not re-checked
        for duplicate ids)."""
        self._check_unchanged()
        row = -1
        for row, (line, data) in enumerate(iter_records(self.path)):
            yield row, parse_document(self.path, line, data)
        if row + 1 != self.num_docs:
            raise RecordError(self.path, None, None, "changed after it was read; run again once it is complete")

    def _duplicates(self, hashes: np.ndarray) -> dict[int, str]:
        """{row of this shard: id of the first passage with its text} for this shard's duplicate passages."""
        if not len(hashes):
            return {}
        _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
        first_of = first[inverse.reshape(-1)]
        candidates = np.flatnonzero((first_of != np.arange(len(hashes))) & (hashes != 0))
        mine = candidates[np.isin(candidates, self.rows)]
        if not len(mine):
            return {}
        # Confirm on the texts (a 64-bit hash match is almost surely, not certainly, the same text).
        wanted = set(mine.tolist()) | set(first_of[mine].tolist())
        texts, ids = {}, {}
        for row, doc in self._iter_documents():
            if row in wanted:
                texts[row], ids[row] = normalize(doc.passage), doc.id
        return {int(row): ids[int(first_of[row])] for row in mine if texts[int(row)] == texts[int(first_of[row])]}

    def __iter__(self) -> Iterator[ShardPassage]:
        """This shard's passages in corpus order, read from the file."""
        if not len(self.rows):
            return
        wanted = iter(self.rows.tolist())
        next_row = next(wanted)
        for row, doc in self._iter_documents():
            if row == next_row:
                yield ShardPassage(row, doc, self.duplicate_of.get(row))
                next_row = next(wanted, None)
                if next_row is None:
                    return

    def iter_passages(self, block_rows: int = 4096) -> Iterator[list[str]]:
        """The whole corpus's passages (every shard's), in blocks of block_rows, in corpus order."""
        block: list[str] = []
        for _, doc in self._iter_documents():
            block.append(doc.passage)
            if len(block) == block_rows:
                yield block
                block = []
        if block:
            yield block
