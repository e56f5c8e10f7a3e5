"""The corpus and the training queries as mining sees them: passages by row, positives and exclusions by query."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedlib.records import (
    Document,
    PairRecord,
    RecordError,
    corpus_fingerprint,
    queries_fingerprint,
    read_corpus,
    read_pairs,
)
from mining.spec import MiningError, MiningSpec


@dataclass
class MiningInputs:
    docs: list[Document]
    pairs: list[PairRecord]
    corpus_fingerprint: str
    queries_fingerprint: str  # of the pairs' query texts in file order, without instructions
    query_texts: list[str]  # as encoded: instruction + query
    positive_rows: np.ndarray  # int64 [Q, P]: corpus rows of each query's positives, -1 padded
    excluded_rows: np.ndarray  # int64 [Q, E]: positives and rows whose passage equals the query or a
    #                            positive's text, -1 padded; never kept as negatives

    @property
    def passages(self) -> list[str]:
        return [d.passage for d in self.docs]


def _padded(rows: list[list[int]]) -> np.ndarray:
    out = np.full((len(rows), max(1, max(map(len, rows), default=1))), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = sorted(r)
    return out


def load_inputs(spec: MiningSpec) -> MiningInputs:
    """Read and check the corpus and pairs; MiningError (one line, naming file, line and field) if bad."""
    try:
        docs = read_corpus(spec.corpus)
    except FileNotFoundError:
        raise MiningError(f"{spec.corpus}: corpus file not found") from None
    except OSError as e:  # a directory, no permission
        raise MiningError(f"{spec.corpus}: cannot read the corpus file: {e.strerror}") from None
    except RecordError as e:
        raise MiningError(str(e)) from None
    if not docs:
        raise MiningError(f"{spec.corpus}: empty corpus: no documents to mine negatives from")
    row_of_id = {d.id: row for row, d in enumerate(docs)}
    try:
        pairs = read_pairs(spec.pairs, corpus={d.id: d for d in docs})
    except FileNotFoundError:
        raise MiningError(f"{spec.pairs}: training pairs file not found") from None
    except OSError as e:
        raise MiningError(f"{spec.pairs}: cannot read the training pairs file: {e.strerror}") from None
    except RecordError as e:
        if e.field and e.field.startswith("pos_ids"):
            raise MiningError(f"{e} (is this the corpus the pairs were made from?)") from None
        raise MiningError(str(e)) from None
    if not pairs:
        raise MiningError(f"{spec.pairs}: no training pairs")

    # Rows of every passage text that some query or positive has, for the equal-text exclusions.
    wanted = {p.query for p in pairs} | {text for p in pairs for text in p.pos}
    wanted |= {docs[row_of_id[i]].passage for p in pairs for i in p.pos_ids or ()}
    rows_of_text: dict[str, list[int]] = {}
    for row, doc in enumerate(docs):
        passage = doc.passage
        if passage in wanted:
            rows_of_text.setdefault(passage, []).append(row)

    positives, excluded = [], []
    for pair in pairs:
        if pair.pos_ids is not None:
            pos_rows = [row_of_id[doc_id] for doc_id in pair.pos_ids]
        else:
            pos_rows = []
            for i, text in enumerate(pair.pos):
                if text not in rows_of_text:
                    raise MiningError(
                        f"{spec.pairs}:{pair.line}: field 'pos[{i}]': text not found among the corpus passages "
                        "(give pos_ids, or mine with the corpus the positives come from)"
                    )
                pos_rows.extend(rows_of_text[text])
        texts = {pair.query, *pair.pos, *(docs[r].passage for r in pos_rows)}
        same_text = {r for t in texts for r in rows_of_text.get(t, ())}
        positives.append(sorted(set(pos_rows)))
        excluded.append(sorted(set(pos_rows) | same_text))

    def query_text(pair: PairRecord) -> str:
        instruction = pair.instruction if pair.instruction is not None else spec.query_instruction
        return instruction + pair.query

    return MiningInputs(
        docs=docs,
        pairs=pairs,
        corpus_fingerprint=corpus_fingerprint(docs),
        queries_fingerprint=queries_fingerprint([p.query for p in pairs]),
        query_texts=[query_text(p) for p in pairs],
        positive_rows=_padded(positives),
        excluded_rows=_padded(excluded),
    )
