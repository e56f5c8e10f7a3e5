"""Record formats and their readers: corpora, queries, qrels, training pairs, scored and labelled texts.

    corpus        BEIR {"_id", "title", "text"}                         .jsonl .jsonl.gz .parquet
    queries       BEIR {"_id", "text"}                                  .jsonl .jsonl.gz .parquet
    qrels         BEIR tsv with the header query-id, corpus-id, score   .tsv .tsv.gz
    pairs         FlagEmbedding {"query", "pos": [...], "neg": [...]}   .jsonl .jsonl.gz .parquet
                  (+ optional query_id, pos_ids, neg_ids, task, instruction)
    scored pairs  STS {"sentence1", "sentence2", "score"}               .tsv .tsv.gz .jsonl .jsonl.gz .parquet
    labelled      {"text", "label"}                                     .jsonl .jsonl.gz .parquet

Every reader checks every record and stops at the first bad one with a RecordError that names the file,
the line (for parquet, the 1-based row) and the field. Nothing is skipped except blank lines, and unknown
keys are errors, so that a typo such as "negs" cannot silently drop data.

Each list reader (read_corpus, read_pairs, ...) is built on a streaming iterator (iter_corpus,
iter_pairs, ...) that holds one record at a time; embedlib/record_cache.py converts files into
memory-mapped Arrow with the same per-record checks (parse_* below), so its errors are these errors.

JSONL is read line by line here and parquet with pyarrow, rather than through datasets.load_dataset:
load_dataset loses the line and row numbers the errors must name, and it writes an Arrow cache.
"""
from __future__ import annotations

import difflib
import gzip
import hashlib
import json
import math
import os
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike


class RecordError(ValueError):
    """Bad input: `path:line: field 'x': message` (line None: the file as a whole; field None: the line)."""

    def __init__(self, path: PathLike, line: int | None, field: str | None, message: str):
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        where = self.path if line is None else f"{self.path}:{line}"
        what = message if field is None else f"field '{field}': {message}"
        super().__init__(f"{where}: {what}")

    def __reduce__(self):  # keep the four parts when the error crosses a process boundary
        return (type(self), (self.path, self.line, self.field, self.message))


@dataclass(frozen=True, slots=True)
class Document:
    id: str
    title: str
    text: str

    @property
    def passage(self) -> str:
        """The text an encoder sees for this document."""
        return f"{self.title} {self.text}".strip()


@dataclass(frozen=True, slots=True)
class Query:
    id: str
    text: str


@dataclass(slots=True)
class PairRecord:
    query: str
    pos: list[str]
    neg: list[str] = field(default_factory=list)
    query_id: str | None = None
    pos_ids: list[str] | None = None
    neg_ids: list[str] | None = None
    task: str | None = None
    instruction: str | None = None
    line: int = field(default=0, compare=False)  # where it came from, for later error messages


@dataclass(frozen=True, slots=True)
class ScoredPair:
    sentence1: str
    sentence2: str
    score: float


@dataclass(frozen=True, slots=True)
class LabeledText:
    text: str
    label: str


# ---------------------------------------------------------------------------------------------------
# Files to (line, record)


def _file_kind(path: Path, allowed: Sequence[str]) -> str:
    name = path.name.lower()
    for suffix, kind in ((".jsonl", "jsonl"), (".jsonl.gz", "jsonl"), (".parquet", "parquet"),
                         (".tsv", "tsv"), (".tsv.gz", "tsv")):
        if name.endswith(suffix) and kind in allowed:
            return kind
    expected = {"jsonl": ".jsonl, .jsonl.gz", "parquet": ".parquet", "tsv": ".tsv, .tsv.gz"}
    raise RecordError(path, None, None,
                      f"unsupported file type; expected {', '.join(expected[k] for k in allowed)}")


def _decode_line(path: Path, line_no: int, raw: bytes, first_of_file: bool) -> str:
    """One line's text without its line ending, strictly UTF-8 decoded (a byte-order mark on the file's
    first line is not content)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(path, line_no, None,
                          f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r})") from None
    if first_of_file and text.startswith("\ufeff"):
        text = text[1:]
    return text.rstrip("\r\n")


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without its line ending), strictly UTF-8 decoded; .gz transparently."""
    line_no = 0
    with gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb") as f:
        try:
            # Splitting bytes on b"\n" is safe for UTF-8: no multi-byte sequence contains 0x0A.
            for line_no, raw in enumerate(f, start=1):
                yield line_no, _decode_line(path, line_no, raw, line_no == 1)
        except (OSError, EOFError, zlib.error) as e:  # damaged or truncated gzip
            raise RecordError(path, line_no + 1, None, f"cannot read: {e}") from e


def iter_block_records(path: PathLike, block: bytes, first_line: int, at_file_start: bool
                       ) -> Iterator[tuple[int, dict]]:
    """(line number, record) of the JSONL lines in `block`, a run of whole lines of `path` whose first
    line is line `first_line` (at_file_start: the block starts the file). The same checks and skips as
    iter_records: this is how embedlib.record_cache reads a byte range of a file."""
    path = Path(path)
    # The empty piece after the block's final newline is skipped like any blank line.
    for offset, raw in enumerate(block.split(b"\n")):
        line_no = first_line + offset
        text = _decode_line(path, line_no, raw, at_file_start and offset == 0)
        if text.strip():
            yield line_no, _decode_record(path, line_no, text)


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow
    import pyarrow.parquet as pq

    row = 0
    with open(path, "rb") as f:
        try:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
                for record in batch.to_pylist():
                    row += 1
                    yield row, record
        except (pyarrow.ArrowException, OSError) as e:
            raise RecordError(path, row + 1 if row else None, None, f"cannot read parquet: {e}") from e


class _DuplicateKey(Exception):
    pass


def _object_without_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    # json.loads would keep the last of two equal keys and silently drop the other value
    record = dict(pairs)
    if len(record) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return record


_decode_json = json.JSONDecoder(object_pairs_hook=_object_without_duplicate_keys).decode


def _decode_record(path: Path, line_no: int, text: str) -> dict:
    try:
        record = _decode_json(text)
    except json.JSONDecodeError as e:
        raise RecordError(path, line_no, None, f"malformed JSON: {e.msg} at column {e.colno}") from None
    except _DuplicateKey as e:
        raise RecordError(path, line_no, str(e), "duplicate key") from None
    if not isinstance(record, dict):
        raise RecordError(path, line_no, None, f"expected a JSON object, got {_type_name(record)}")
    return record


def iter_records(path: PathLike) -> Iterator[tuple[int, dict]]:
    """(1-based line or parquet row number, record) for .jsonl, .jsonl.gz and .parquet; blank lines skipped."""
    path = Path(path)
    if _file_kind(path, ("jsonl", "parquet")) == "parquet":
        yield from _iter_parquet(path)
        return
    for line_no, text in _iter_lines(path):
        if not text.strip():
            continue
        yield line_no, _decode_record(path, line_no, text)


# ---------------------------------------------------------------------------------------------------
# Checking one record's fields


def _type_name(value: Any) -> str:
    names = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
             list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Fields:
    """One raw record at its location, with typed getters that raise RecordError.

    A null value counts as absent: parquet has a column for every field and stores absent ones as null.
    """

    def __init__(self, path: Path, line: int, data: dict, allowed: frozenset[str]):
        self.path, self.line, self.data = path, line, data
        for key in data:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise self.error(str(key), f"unknown field; {hint}expected: {', '.join(sorted(allowed))}")

    def error(self, name: str | None, message: str) -> RecordError:
        return RecordError(self.path, self.line, name, message)

    def get(self, name: str, required: bool) -> Any:
        value = self.data.get(name)
        if value is None and required:
            raise self.error(name, "required field is missing" if name not in self.data else "required field is null")
        return value

    def check_str(self, name: str, value: Any, allow_empty: bool) -> str:
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {_type_name(value)} {_preview(value)}")
        if not allow_empty and not value.strip():
            raise self.error(name, "empty string")
        return value

    def string(self, name: str, required: bool = True, allow_empty: bool = False) -> str | None:
        value = self.get(name, required)
        return None if value is None else self.check_str(name, value, allow_empty)

    def string_list(self, name: str) -> list[str] | None:
        value = self.get(name, required=False)
        if value is None:
            return None
        if not isinstance(value, list):
            raise self.error(name, f"expected a list of strings, got {_type_name(value)} {_preview(value)}")
        return [self.check_str(f"{name}[{i}]", item, allow_empty=False) for i, item in enumerate(value)]

    def number(self, name: str, value: Any) -> float:
        if not _is_number(value):
            raise self.error(name, f"expected a number, got {_type_name(value)} {_preview(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            number = math.inf
        if not math.isfinite(number):
            raise self.error(name, f"not a finite number: {_preview(value)}")
        return number


# ---------------------------------------------------------------------------------------------------
# BEIR corpus, queries, qrels

_BEIR_EXTRA = {"metadata"}  # BEIR's own files carry an (often empty) metadata object
_CORPUS_KEYS = frozenset({"_id", "title", "text"} | _BEIR_EXTRA)
_QUERY_KEYS = frozenset({"_id", "text"} | _BEIR_EXTRA)


def parse_document(path: PathLike, line: int, data: dict) -> Document:
    """One corpus record's checks (all but the duplicate id, which needs the records before it)."""
    rec = _Fields(Path(path), line, data, _CORPUS_KEYS)
    doc_id = rec.string("_id")
    title = rec.string("title", required=False, allow_empty=True) or ""
    return Document(doc_id, title, rec.string("text", allow_empty=True))


def duplicate_id_error(path: PathLike, line: int, doc_id: str, first_line: int) -> RecordError:
    return RecordError(path, line, "_id", f"duplicate id {doc_id!r}, first on line {first_line}")


def iter_corpus(path: PathLike) -> Iterator[tuple[int, Document]]:
    """(line, Document) of a BEIR corpus in file order, checked as read_corpus checks them."""
    path = Path(path)
    first_line: dict[str, int] = {}
    for line, data in iter_records(path):
        # The id is checked first, as a duplicate must be reported before the record's other fields.
        doc_id = _Fields(path, line, data, _CORPUS_KEYS).string("_id")
        if doc_id in first_line:
            raise duplicate_id_error(path, line, doc_id, first_line[doc_id])
        first_line[doc_id] = line
        yield line, parse_document(path, line, data)


def read_corpus(path: PathLike) -> list[Document]:
    """A BEIR corpus in file order. `_id` and `text` are required strings (text may be empty), `title`
    is an optional string; a duplicate id is an error naming both lines."""
    return [doc for _, doc in iter_corpus(path)]


def read_queries(path: PathLike) -> list[Query]:
    """BEIR queries in file order; `_id` and `text` are required non-empty strings, ids unique."""
    path = Path(path)
    queries: list[Query] = []
    first_line: dict[str, int] = {}
    for line, data in iter_records(path):
        rec = _Fields(path, line, data, _QUERY_KEYS)
        query_id = rec.string("_id")
        if query_id in first_line:
            raise rec.error("_id", f"duplicate id {query_id!r}, first on line {first_line[query_id]}")
        first_line[query_id] = line
        queries.append(Query(query_id, rec.string("text")))
    return queries


_QRELS_HEADER = ["query-id", "corpus-id", "score"]


def read_qrels(path: PathLike) -> dict[str, dict[str, int]]:
    """BEIR qrels: {query id: {corpus id: integer relevance}}, in file order; the header is required."""
    path = Path(path)
    _file_kind(path, ("tsv",))
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[tuple[str, str], int] = {}
    header_seen = False
    for line, text in _iter_lines(path):
        if not text.strip(" "):
            continue
        cells = text.split("\t")
        if not header_seen:
            if [c.strip() for c in cells] != _QRELS_HEADER:
                raise RecordError(path, line, None,
                                  f"expected the header 'query-id<TAB>corpus-id<TAB>score', got {_preview(text)}")
            header_seen = True
            continue
        if len(cells) != 3:
            raise RecordError(path, line, None, f"expected 3 tab-separated columns, got {len(cells)}")
        query_id, doc_id, score_text = cells
        for name, value in (("query-id", query_id), ("corpus-id", doc_id)):
            if not value.strip():
                raise RecordError(path, line, name, "empty")
        try:
            score = int(score_text)
        except ValueError:
            raise RecordError(path, line, "score", f"not an integer: {_preview(score_text)}") from None
        if (query_id, doc_id) in first_line:
            raise RecordError(path, line, "corpus-id", f"duplicate judgement of {doc_id!r} for query "
                                                       f"{query_id!r}, first on line {first_line[query_id, doc_id]}")
        first_line[query_id, doc_id] = line
        qrels.setdefault(query_id, {})[doc_id] = score
    return qrels


# ---------------------------------------------------------------------------------------------------
# Training pairs (FlagEmbedding format)

# FlagEmbedding's optional keys: "prompt" is its name for the instruction; the scores (for distillation)
# and "type" are checked and accepted but not kept. data_gen adds "key" (its resume key) and
# "provenance" (generator model, template, source passage, seed), also checked and not kept.
_GENERATED_KEYS = frozenset({"key", "provenance"})
_PAIR_KEYS = frozenset({"query", "pos", "neg", "query_id", "pos_ids", "neg_ids", "task", "instruction",
                        "prompt", "pos_scores", "neg_scores", "type"} | _GENERATED_KEYS)


class AnyId(Mapping):
    """A stand-in corpus for parse_pair(..., resolve=False): every id counts as present, and no text is
    looked up. embedlib.record_cache checks the ids against the corpus's id column afterwards, for a
    whole block at once, and parses a record again with its real ids only to name an unknown one."""

    def __contains__(self, key) -> bool:
        return True

    def __getitem__(self, key):
        raise KeyError(key)

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


def _pair_texts(rec: _Fields, texts_name: str, ids_name: str, corpus: Mapping[str, Document] | None,
                resolve: bool) -> tuple[list[str] | None, list[str] | None, bool]:
    """(texts, ids, from_ids) of one side of a pair: texts from the record, or resolved from ids through
    the corpus (from_ids; with resolve=False the texts are then left None for the caller to look up)."""
    texts = rec.string_list(texts_name)
    ids = rec.string_list(ids_name)
    if ids is not None and corpus is not None:
        for i, doc_id in enumerate(ids):
            if doc_id not in corpus:
                raise rec.error(f"{ids_name}[{i}]", f"unknown id {doc_id!r}: not in the corpus")
    if ids and not texts:
        if corpus is None:
            raise rec.error(texts_name, f"missing or empty, and '{ids_name}' can only be resolved with a corpus")
        return ([corpus[doc_id].passage for doc_id in ids] if resolve else None), ids, True
    if ids is not None and len(ids) != len(texts or []):
        raise rec.error(ids_name, f"has {len(ids)} ids but '{texts_name}' has {len(texts or [])} texts")
    return texts, ids, False


def parse_pair(path: PathLike, line: int, data: dict, corpus: Mapping[str, Document] | None,
               resolve: bool = True) -> tuple[PairRecord, bool, bool]:
    """(record, pos_from_ids, neg_from_ids): one pair record's checks. With resolve=False, a side whose
    texts come from the corpus (from_ids) is left None in the record."""
    rec = _Fields(Path(path), line, data, _PAIR_KEYS)
    query = rec.string("query")
    pos, pos_ids, pos_from_ids = _pair_texts(rec, "pos", "pos_ids", corpus, resolve)
    if not pos and not pos_from_ids:
        raise rec.error("pos", "required field is missing" if pos is None else "empty list: a pair needs a positive")
    neg, neg_ids, neg_from_ids = _pair_texts(rec, "neg", "neg_ids", corpus, resolve)
    if not neg_from_ids:
        neg = neg or []
    for scores_name, count in (("pos_scores", len(pos_ids) if pos_from_ids else len(pos)),
                               ("neg_scores", len(neg_ids) if neg_from_ids else len(neg))):
        scores = rec.data.get(scores_name)
        if scores is None:
            continue
        if not isinstance(scores, list):
            raise rec.error(scores_name, f"expected a list of numbers, got {_type_name(scores)}")
        if len(scores) != count:
            raise rec.error(scores_name, f"has {len(scores)} scores for {count} texts")
        for i, score in enumerate(scores):
            rec.number(f"{scores_name}[{i}]", score)
    rec.string("type", required=False)
    _check_generated_keys(rec)
    instruction = rec.string("instruction", required=False)
    prompt = rec.string("prompt", required=False)
    if instruction is not None and prompt is not None:
        raise rec.error("prompt", "give 'instruction' or its alias 'prompt', not both")
    record = PairRecord(
        query=query, pos=pos, neg=neg, query_id=rec.string("query_id", required=False),
        pos_ids=pos_ids, neg_ids=neg_ids, task=rec.string("task", required=False),
        instruction=instruction if instruction is not None else prompt, line=rec.line,
    )
    return record, pos_from_ids, neg_from_ids


def _check_generated_keys(rec: _Fields) -> None:
    rec.string("key", required=False)
    provenance = rec.data.get("provenance")
    if provenance is not None and not isinstance(provenance, dict):
        raise rec.error("provenance", f"expected an object, got {_type_name(provenance)}")


def iter_pairs(path: PathLike, corpus: Mapping[str, Document] | None = None) -> Iterator[PairRecord]:
    """Training pairs in file order, one at a time; see read_pairs."""
    path = Path(path)
    for line, data in iter_records(path):
        yield parse_pair(path, line, data, corpus)[0]


def read_pairs(path: PathLike, corpus: Mapping[str, Document] | None = None) -> list[PairRecord]:
    """Training pairs in file order. With `corpus` (id -> Document), every id in pos_ids/neg_ids must exist
    and missing pos/neg texts are filled from the corpus passages; without it ids are kept unchecked."""
    return list(iter_pairs(path, corpus))


# ---------------------------------------------------------------------------------------------------
# Scored sentence pairs (STS, pair classification) and labelled texts

_SCORED_KEYS = frozenset({"sentence1", "sentence2", "score", "label"} | _GENERATED_KEYS)


def _parse_score(path: Path, line: int, name: str, text: str, hint: str = "") -> float:
    try:
        score = float(text)
    except ValueError:
        raise RecordError(path, line, name, f"not a number: {_preview(text)}{hint}") from None
    if not math.isfinite(score):
        raise RecordError(path, line, name, f"not a finite number: {_preview(text)}")
    return score


def _iter_scored_tsv(path: Path) -> Iterator[tuple[int, ScoredPair]]:
    """With a header naming sentence1, sentence2 and score (or label) in any order, extra columns allowed;
    without one (detected by the first line's cells), the columns are sentence1, sentence2, score."""
    layout = None  # (width, sentence1 column, sentence2 column, score name, score column)
    for line, text in _iter_lines(path):
        if not text.strip(" "):
            continue
        cells = text.split("\t")
        hint = ""
        if layout is None:
            names = [c.strip().lower() for c in cells]
            score_names = [n for n in ("score", "label") if n in names]
            if "sentence1" in names and "sentence2" in names and score_names:
                if len(score_names) > 1 or len(set(names)) != len(names):
                    raise RecordError(path, line, None, f"ambiguous header: {_preview(text)}")
                score_name = score_names[0]
                layout = (len(cells), names.index("sentence1"), names.index("sentence2"),
                          score_name, names.index(score_name))
                continue
            layout = (3, 0, 1, "score", 2)
            hint = (" (a header must name the columns sentence1, sentence2 and score or label; "
                    "without one they are sentence1, sentence2, score)")
        width, s1_col, s2_col, score_name, score_col = layout
        if len(cells) != width:
            raise RecordError(path, line, None, f"expected {width} tab-separated columns, got {len(cells)}")
        for name, col in (("sentence1", s1_col), ("sentence2", s2_col)):
            if not cells[col].strip():
                raise RecordError(path, line, name, "empty")
        score = _parse_score(path, line, score_name, cells[score_col], hint)
        yield line, ScoredPair(cells[s1_col], cells[s2_col], score)


def parse_scored_pair(path: PathLike, line: int, data: dict) -> ScoredPair:
    """One {"sentence1", "sentence2", "score"} record's checks ("label" is accepted for "score")."""
    rec = _Fields(Path(path), line, data, _SCORED_KEYS)
    s1, s2 = rec.string("sentence1"), rec.string("sentence2")
    if data.get("score") is not None and data.get("label") is not None:
        raise rec.error("label", "give 'score' or its alias 'label', not both")
    name = "label" if data.get("label") is not None else "score"
    _check_generated_keys(rec)
    return ScoredPair(s1, s2, rec.number(name, rec.get(name, required=True)))


def is_tsv(path: PathLike) -> bool:
    """Whether a scored-pairs file is tab-separated (.tsv, .tsv.gz) rather than records; raises
    RecordError for a type no reader takes."""
    return _file_kind(Path(path), ("tsv", "jsonl", "parquet")) == "tsv"


def iter_scored_pairs(path: PathLike) -> Iterator[tuple[int, ScoredPair]]:
    """(line, ScoredPair) one at a time; see read_scored_pairs."""
    path = Path(path)
    if is_tsv(path):
        yield from _iter_scored_tsv(path)
        return
    for line, data in iter_records(path):
        yield line, parse_scored_pair(path, line, data)


def read_scored_pairs(path: PathLike) -> list[ScoredPair]:
    """Sentence pairs with a similarity score or 0/1 label, as floats: .tsv (see _iter_scored_tsv), or
    .jsonl/.parquet records {"sentence1", "sentence2", "score"} ("label" is accepted for "score")."""
    return [pair for _, pair in iter_scored_pairs(path)]


_LABELED_KEYS = frozenset({"text", "label"})


def parse_labeled_text(path: PathLike, line: int, data: dict) -> LabeledText:
    """One {"text", "label"} record's checks; an integer label is kept as a string."""
    rec = _Fields(Path(path), line, data, _LABELED_KEYS)
    text = rec.string("text")
    label = rec.get("label", required=True)
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)
    return LabeledText(text, rec.check_str("label", label, allow_empty=False))


def iter_labeled_texts(path: PathLike) -> Iterator[tuple[int, LabeledText]]:
    """(line, LabeledText) one at a time; see read_labeled_texts."""
    path = Path(path)
    for line, data in iter_records(path):
        yield line, parse_labeled_text(path, line, data)


def read_labeled_texts(path: PathLike) -> list[LabeledText]:
    """{"text", "label"} records; a label is a non-empty string or an integer, kept as a string."""
    return [text for _, text in iter_labeled_texts(path)]


# ---------------------------------------------------------------------------------------------------
# Fingerprints: which corpus and which queries a negative store was mined for


# Each item is hashed as its field lengths (8-byte little-endian) followed by its UTF-8 fields, so no
# two different sequences frame alike; one update per item streams any number of items.
_ONE_LENGTH = struct.Struct("<Q")
_THREE_LENGTHS = struct.Struct("<QQQ")


def corpus_fingerprint(docs: Iterable[Document]) -> str:
    """sha256 hex of the ids, titles and texts in order."""
    digest = hashlib.sha256(b"embedlib.corpus.v1\0")
    for doc in docs:
        doc_id, title, text = doc.id.encode("utf-8"), doc.title.encode("utf-8"), doc.text.encode("utf-8")
        digest.update(b"".join((_THREE_LENGTHS.pack(len(doc_id), len(title), len(text)), doc_id, title, text)))
    return digest.hexdigest()


def queries_fingerprint(texts: Sequence[str]) -> str:
    """sha256 hex of the query texts in order."""
    if isinstance(texts, str):
        raise TypeError("queries_fingerprint takes a sequence of query texts, not one string")
    digest = hashlib.sha256(b"embedlib.queries.v1\0")
    for text in texts:
        data = text.encode("utf-8")
        digest.update(_ONE_LENGTH.pack(len(data)) + data)
    return digest.hexdigest()
