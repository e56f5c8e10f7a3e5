"""embedlib.records: every reader round-trips its formats, reads the real data, and stops on bad input
with an error naming the file, the line and the field."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SCIFACT, SHARED_DATA

from embedlib.records import (
    Document,
    LabeledText,
    PairRecord,
    Query,
    RecordError,
    ScoredPair,
    corpus_fingerprint,
    iter_records,
    queries_fingerprint,
    read_corpus,
    read_labeled_texts,
    read_pairs,
    read_qrels,
    read_queries,
    read_scored_pairs,
)

# --- helpers -----------------------------------------------------------------------------------------


def write_records(path: Path, records: list[dict]) -> Path:
    """jsonl, jsonl.gz or parquet, by suffix."""
    if path.suffix == ".parquet":
        # from_pylist takes its columns from the first record only; name them all (absent ones are null)
        columns = list(dict.fromkeys(key for record in records for key in record))
        pq.write_table(pa.Table.from_pydict({c: [r.get(c) for r in records] for c in columns}), path)
    else:
        write_bytes(path, b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records))
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    return write_bytes(path, "".join(line + "\n" for line in lines).encode())


def raises_at(path: Path, line: int | None, field: str | None, fragment: str):
    """Context manager: a RecordError at exactly this file, line and field, whose message has `fragment`."""
    where = str(path) if line is None else f"{path}:{line}"
    prefix = f"{where}: field '{field}': " if field is not None else f"{where}: "

    class _Check:
        def __enter__(self):
            self._ctx = pytest.raises(RecordError)
            self._info = self._ctx.__enter__()
            return self._info

        def __exit__(self, *exc):
            suppressed = self._ctx.__exit__(*exc)
            error = self._info.value
            message = str(error)
            assert message.startswith(prefix), message
            assert fragment in message, message
            assert (error.path, error.line, error.field) == (str(path), line, field)
            return suppressed

    return _Check()


NaN = float("nan")
FORMATS = [".jsonl", ".jsonl.gz", ".parquet"]

DOCS = [
    {"_id": "d1", "title": "Title one", "text": "Text one."},
    {"_id": "d2", "title": "", "text": "只有正文。"},
    {"_id": "d3", "text": "No title."},
]


@pytest.fixture
def corpus_map() -> dict[str, Document]:
    return {d.id: d for d in [Document("d1", "T1", "x1"), Document("d2", "", "x2"), Document("d3", "T3", "x3")]}


# --- iter_records ------------------------------------------------------------------------------------


def test_iter_records_numbers_lines_and_skips_blank_ones(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", ['{"a": 1}', "", "   ", '{"a": 2}\r'])
    assert list(iter_records(path)) == [(1, {"a": 1}), (4, {"a": 2})]
    bom = write_bytes(tmp_path / "bom.jsonl", b'\xef\xbb\xbf{"a": 1}\n')
    assert list(iter_records(bom)) == [(1, {"a": 1})]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_iter_records_malformed_json(tmp_path, suffix):
    path = write_lines(tmp_path / f"r{suffix}", ['{"a": 1}', "", '{"a": 2,}'])
    with raises_at(path, 3, None, "malformed JSON"):
        list(iter_records(path))


def test_iter_records_duplicate_key(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", ['{"a": 1}', '{"query": "q", "pos": ["p"], "pos": []}'])
    with raises_at(path, 2, "pos", "duplicate key"):
        list(iter_records(path))


def test_iter_records_non_object_line(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", ['{"a": 1}', '["a", 1]'])
    with raises_at(path, 2, None, "expected a JSON object, got list"):
        list(iter_records(path))


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_iter_records_non_utf8(tmp_path, suffix):
    path = write_bytes(tmp_path / f"r{suffix}", b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    with raises_at(path, 2, None, "not valid UTF-8"):
        list(iter_records(path))


def test_iter_records_damaged_files(tmp_path):
    data = gzip.compress(b"".join(b'{"a": %d}\n' % i for i in range(10_000)))
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(RecordError, match=f"^{truncated}:[0-9]+: cannot read"):
        list(iter_records(truncated))
    not_parquet = write_lines(tmp_path / "n.parquet", ['{"a": 1}'])
    with raises_at(not_parquet, None, None, "cannot read parquet"):
        list(iter_records(not_parquet))
    with raises_at(tmp_path / "r.csv", None, None, "unsupported file type"):
        list(iter_records(tmp_path / "r.csv"))


def test_parquet_rows_are_numbered(tmp_path):
    path = write_records(tmp_path / "c.parquet", [{"_id": str(i), "text": "t"} for i in range(5000)]
                         + [{"_id": None, "text": "t"}])
    assert [n for n, _ in iter_records(path)][:3] == [1, 2, 3]
    with raises_at(path, 5001, "_id", "required field is null"):
        read_corpus(path)


def _raise_record_error(_):
    raise RecordError("f.jsonl", 3, "pos", "empty")


def test_record_error_crosses_a_worker_process():
    """DataLoader workers hand exceptions to the parent process; the file, line and field must survive."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool, pytest.raises(RecordError) as caught:
        pool.map(_raise_record_error, [0])
    error = caught.value
    assert (error.path, error.line, error.field, str(error)) == ("f.jsonl", 3, "pos", "f.jsonl:3: field 'pos': empty")


# --- corpus and queries ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", FORMATS)
def test_corpus_round_trip(tmp_path, suffix):
    path = write_records(tmp_path / f"corpus{suffix}", DOCS)
    docs = read_corpus(path)
    assert docs == [Document("d1", "Title one", "Text one."), Document("d2", "", "只有正文。"),
                    Document("d3", "", "No title.")]
    assert docs[0].passage == "Title one Text one." and docs[1].passage == "只有正文。"


@pytest.mark.parametrize(
    "record, field, fragment",
    [
        ({"title": "t", "text": "x"}, "_id", "required field is missing"),
        ({"_id": 7, "text": "x"}, "_id", "expected a string, got integer 7"),
        ({"_id": "", "text": "x"}, "_id", "empty string"),
        ({"_id": "d9"}, "text", "required field is missing"),
        ({"_id": "d9", "text": ["x"]}, "text", "expected a string, got list"),
        ({"_id": "d9", "title": 3, "text": "x"}, "title", "expected a string, got integer"),
        ({"_id": "d9", "titel": "t", "text": "x"}, "titel", "unknown field; did you mean 'title'?"),
    ],
)
def test_corpus_errors(tmp_path, record, field, fragment):
    path = write_records(tmp_path / "corpus.jsonl", [DOCS[0], record])
    with raises_at(path, 2, field, fragment):
        read_corpus(path)


def test_corpus_duplicate_id_names_both_lines(tmp_path):
    path = write_records(tmp_path / "corpus.jsonl", [DOCS[0], DOCS[1], {"_id": "d1", "text": "again"}])
    with raises_at(path, 3, "_id", "duplicate id 'd1', first on line 1"):
        read_corpus(path)


@pytest.mark.parametrize("suffix", FORMATS)
def test_queries_round_trip_and_errors(tmp_path, suffix):
    path = write_records(tmp_path / f"q{suffix}", [{"_id": "1", "text": "what?"}, {"_id": "2", "text": "why?"}])
    assert read_queries(path) == [Query("1", "what?"), Query("2", "why?")]
    bad = write_records(tmp_path / f"bad{suffix}", [{"_id": "1", "text": "what?"}, {"_id": "2", "text": " "}])
    with raises_at(bad, 2, "text", "empty string"):
        read_queries(bad)


# --- qrels -------------------------------------------------------------------------------------------


def test_qrels(tmp_path):
    path = write_lines(tmp_path / "q.tsv", ["query-id\tcorpus-id\tscore", "1\td1\t1", "1\td2\t2", "", "2\td1\t0"])
    assert read_qrels(path) == {"1": {"d1": 1, "d2": 2}, "2": {"d1": 0}}


@pytest.mark.parametrize(
    "lines, line, field, fragment",
    [
        (["1\td1\t1"], 1, None, "expected the header"),
        (["query-id\tcorpus-id\tscore", "1\td1\t1", "1\td2"], 3, None, "expected 3 tab-separated columns, got 2"),
        (["query-id\tcorpus-id\tscore", "1\td1\t1", "1 d2 1"], 3, None, "expected 3 tab-separated columns, got 1"),
        (["query-id\tcorpus-id\tscore", "1\td1\t1.5"], 2, "score", "not an integer: '1.5'"),
        (["query-id\tcorpus-id\tscore", "1\t\t1"], 2, "corpus-id", "empty"),
        (["query-id\tcorpus-id\tscore", "1\td1\t1", "1\td1\t1"], 3, "corpus-id", "first on line 2"),
    ],
)
def test_qrels_errors(tmp_path, lines, line, field, fragment):
    path = write_lines(tmp_path / "q.tsv", lines)
    with raises_at(path, line, field, fragment):
        read_qrels(path)


# --- training pairs ----------------------------------------------------------------------------------

PAIRS = [
    {"query": "q1", "pos": ["p1"], "neg": ["n1", "n2"]},
    {"query": "q2", "pos": ["p2", "p3"], "query_id": "7", "task": "retrieval", "instruction": "Find it: "},
]


@pytest.mark.parametrize("suffix", FORMATS)
def test_pairs_round_trip(tmp_path, suffix):
    path = write_records(tmp_path / f"pairs{suffix}", PAIRS)
    pairs = read_pairs(path)
    assert pairs == [
        PairRecord("q1", ["p1"], ["n1", "n2"]),
        PairRecord("q2", ["p2", "p3"], [], query_id="7", task="retrieval", instruction="Find it: "),
    ]
    assert [p.line for p in pairs] == [1, 2]


def test_pair_line_is_not_part_of_equality():
    assert PairRecord("q", ["p"], line=3) == PairRecord("q", ["p"], line=9)


def test_pairs_resolve_ids_against_the_corpus(tmp_path, corpus_map):
    path = write_records(tmp_path / "pairs.jsonl", [
        {"query": "q", "pos_ids": ["d1"], "neg_ids": ["d2", "d3"]},
        {"query": "q", "pos": [], "pos_ids": ["d3"]},
        {"query": "q", "pos": ["given"], "pos_ids": ["d2"], "neg": ["n"], "neg_ids": ["d1"]},
    ])
    pairs = read_pairs(path, corpus=corpus_map)
    assert pairs[0] == PairRecord("q", ["T1 x1"], ["x2", "T3 x3"], pos_ids=["d1"], neg_ids=["d2", "d3"])
    assert pairs[1].pos == ["T3 x3"]
    assert pairs[2].pos == ["given"] and pairs[2].neg == ["n"]  # texts given win; ids only checked


def test_pairs_accept_flagembedding_keys(tmp_path):
    path = write_records(tmp_path / "pairs.jsonl", [
        {"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [0.9], "neg_scores": [1], "prompt": "Rep: ",
         "type": "normal"},
    ])
    assert read_pairs(path) == [PairRecord("q", ["p"], ["n"], instruction="Rep: ")]


@pytest.mark.parametrize(
    "record, field, fragment",
    [
        ({"pos": ["p"]}, "query", "required field is missing"),
        ({"query": 5, "pos": ["p"]}, "query", "expected a string, got integer"),
        ({"query": "q"}, "pos", "required field is missing"),
        ({"query": "q", "pos": []}, "pos", "empty list"),
        ({"query": "q", "pos": "p"}, "pos", "expected a list of strings, got string"),
        ({"query": "q", "pos": ["p", 3]}, "pos[1]", "expected a string, got integer"),
        ({"query": "q", "pos": ["p", ""]}, "pos[1]", "empty string"),
        ({"query": "q", "pos": ["p"], "neg": [None]}, "neg[0]", "expected a string, got null"),
        ({"query": "q", "pos": ["p"], "negs": ["n"]}, "negs", "unknown field; did you mean 'neg'?"),
        ({"query": "q", "pos": ["p"], "query_id": 3}, "query_id", "expected a string, got integer"),
        ({"query": "q", "pos_ids": ["d1"]}, "pos", "can only be resolved with a corpus"),
        ({"query": "q", "pos": ["p"], "pos_ids": ["d1", "d2"]}, "pos_ids", "has 2 ids but 'pos' has 1 texts"),
        ({"query": "q", "pos": ["p"], "neg_ids": ["d1"]}, "neg", "can only be resolved with a corpus"),
        ({"query": "q", "pos": ["p"], "pos_ids": [1]}, "pos_ids[0]", "expected a string, got integer"),
        ({"query": "q", "pos": ["p"], "instruction": "a", "prompt": "b"}, "prompt", "not both"),
        ({"query": "q", "pos": ["p"], "pos_scores": [1, 2]}, "pos_scores", "has 2 scores for 1 texts"),
        ({"query": "q", "pos": ["p"], "pos_scores": ["high"]}, "pos_scores[0]", "expected a number, got string"),
        ({"query": "q", "pos": ["p"], "pos_scores": [10**400]}, "pos_scores[0]", "not a finite number"),
        ({"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": [NaN]}, "neg_scores[0]", "not a finite number"),
        ({"query": "q", "pos": ["p"], "task": ""}, "task", "empty string"),
    ],
)
def test_pair_errors(tmp_path, record, field, fragment):
    path = write_records(tmp_path / "pairs.jsonl", [PAIRS[0], record])
    with raises_at(path, 2, field, fragment):
        read_pairs(path)


@pytest.mark.parametrize(
    "record, field",
    [
        ({"query": "q", "pos_ids": ["d1", "zz"]}, "pos_ids[1]"),
        ({"query": "q", "pos": ["p"], "pos_ids": ["zz"]}, "pos_ids[0]"),
        ({"query": "q", "pos": ["p"], "neg_ids": ["d2", "zz"]}, "neg_ids[1]"),
    ],
)
def test_pair_unknown_ids(tmp_path, corpus_map, record, field):
    path = write_records(tmp_path / "pairs.jsonl.gz", [PAIRS[0], record])
    with raises_at(path, 2, field, "unknown id 'zz'"):
        read_pairs(path, corpus=corpus_map)


# --- scored pairs and labelled texts -----------------------------------------------------------------


def test_scored_pairs_tsv_with_and_without_header(tmp_path):
    expected = [ScoredPair("a b", "c d", 4.5), ScoredPair("e", "f", 0.0)]
    stsb = write_lines(tmp_path / "stsb.tsv", ["score\tsentence1\tsentence2", "4.5\ta b\tc d", "0\te\tf"])
    reordered = write_lines(tmp_path / "r.tsv.gz",
                            ["sentence2\tid\tLabel\tsentence1", "c d\t1\t4.5\ta b", "f\t2\t0\te"])
    headerless = write_lines(tmp_path / "h.tsv", ["a b\tc d\t4.5", "e\tf\t0"])
    for path in (stsb, reordered, headerless):
        assert read_scored_pairs(path) == expected


@pytest.mark.parametrize(
    "lines, line, field, fragment",
    [
        (["score\tsentence1\tsentence2", "x\ta\tb"], 2, "score", "not a number: 'x'"),
        (["label\tsentence1\tsentence2", "nan\ta\tb"], 2, "label", "not a finite number"),
        (["a\tb\t1", "a\tb\tinf"], 2, "score", "not a finite number"),
        (["a\tb\t1", "a\tb"], 2, None, "expected 3 tab-separated columns, got 2"),
        (["a\tb\t1", "a\tb\t1\t2"], 2, None, "expected 3 tab-separated columns, got 4"),
        (["a\tb\t1", "a\t \t1"], 2, "sentence2", "empty"),
        (["s1\ts2\tscore", "a\tb\t1"], 1, "score", "a header must name the columns"),
        (["score\tlabel\tsentence1\tsentence2"], 1, None, "ambiguous header"),
    ],
)
def test_scored_pair_tsv_errors(tmp_path, lines, line, field, fragment):
    path = write_lines(tmp_path / "p.tsv", lines)
    with raises_at(path, line, field, fragment):
        read_scored_pairs(path)


@pytest.mark.parametrize("suffix", FORMATS)
def test_scored_pairs_records(tmp_path, suffix):
    path = write_records(tmp_path / f"p{suffix}", [{"sentence1": "a", "sentence2": "b", "score": 3.25},
                                                   {"sentence1": "c", "sentence2": "d", "score": 1}])
    assert read_scored_pairs(path) == [ScoredPair("a", "b", 3.25), ScoredPair("c", "d", 1.0)]
    labelled = write_records(tmp_path / f"l{suffix}", [{"sentence1": "a", "sentence2": "b", "label": 0}])
    assert read_scored_pairs(labelled) == [ScoredPair("a", "b", 0.0)]


@pytest.mark.parametrize(
    "record, field, fragment",
    [
        ({"sentence1": "a", "sentence2": "b", "score": "3"}, "score", "expected a number, got string"),
        ({"sentence1": "a", "sentence2": "b", "score": True}, "score", "expected a number, got boolean"),
        ({"sentence1": "a", "sentence2": "b"}, "score", "required field is missing"),
        ({"sentence1": "a", "sentence2": "b", "score": 1, "label": 1}, "label", "not both"),
        ({"sentence1": "a", "score": 1}, "sentence2", "required field is missing"),
        ({"sentence1": "a", "sentence2": "b", "scores": 1}, "scores", "unknown field"),
    ],
)
def test_scored_pair_record_errors(tmp_path, record, field, fragment):
    path = write_records(tmp_path / "p.jsonl", [{"sentence1": "a", "sentence2": "b", "score": 1}, record])
    with raises_at(path, 2, field, fragment):
        read_scored_pairs(path)


@pytest.mark.parametrize("suffix", FORMATS)
def test_labeled_texts(tmp_path, suffix):
    path = write_records(tmp_path / f"t{suffix}", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    assert read_labeled_texts(path) == [LabeledText("good", "pos"), LabeledText("bad", "neg")]
    ints = write_records(tmp_path / f"i{suffix}", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    assert read_labeled_texts(ints) == [LabeledText("good", "1"), LabeledText("bad", "0")]


@pytest.mark.parametrize(
    "record, field, fragment",
    [
        ({"text": "t", "label": 1.5}, "label", "expected a string, got number"),
        ({"text": "t", "label": False}, "label", "expected a string, got boolean"),
        ({"text": "t"}, "label", "required field is missing"),
        ({"text": "", "label": "x"}, "text", "empty string"),
    ],
)
def test_labeled_text_errors(tmp_path, record, field, fragment):
    path = write_records(tmp_path / "t.jsonl", [{"text": "t", "label": "x"}, record])
    with raises_at(path, 2, field, fragment):
        read_labeled_texts(path)


# --- real data ---------------------------------------------------------------------------------------


def test_bundled_scifact_reads_and_pairs_resolve():
    docs = read_corpus(SCIFACT / "corpus.jsonl.gz")
    assert len(docs) == 5183
    train, dev = read_queries(SCIFACT / "queries.train.jsonl"), read_queries(SCIFACT / "queries.dev.jsonl")
    assert (len(train), len(dev)) == (607, 202)
    assert not {q.id for q in train} & {q.id for q in dev}
    qrels = read_qrels(SCIFACT / "qrels.train.tsv")
    assert set(qrels) == {q.id for q in train}
    assert set(read_qrels(SCIFACT / "qrels.dev.tsv")) == {q.id for q in dev}

    corpus = {d.id: d for d in docs}
    pairs = read_pairs(SCIFACT / "pairs.train.jsonl.gz", corpus=corpus)
    assert len(pairs) == 607
    for pair in pairs:
        assert sorted(pair.pos_ids) == sorted(qrels[pair.query_id])
        assert pair.pos == [corpus[doc_id].passage for doc_id in pair.pos_ids]


@pytest.mark.skipif(not (SHARED_DATA / "stsb_en" / "dev.tsv").exists(), reason="needs /work/shared/data")
def test_stsb_dev():
    pairs = read_scored_pairs(SHARED_DATA / "stsb_en" / "dev.tsv")
    assert len(pairs) == 1500
    assert pairs[0] == ScoredPair("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)
    assert all(0.0 <= p.score <= 5.0 for p in pairs)


@pytest.mark.skipif(not (SHARED_DATA / "zh_pairs" / "STS-B" / "valid.tsv").exists(), reason="needs /work/shared/data")
def test_zh_pairs_headerless():
    pairs = read_scored_pairs(SHARED_DATA / "zh_pairs" / "STS-B" / "valid.tsv")
    assert len(pairs) == 1458  # every line is a pair: the first is not taken for a header
    assert pairs[0] == ScoredPair("一个戴着安全帽的男人在跳舞。", "一个戴着安全帽的男人在跳舞。", 5.0)
    assert {p.score for p in pairs} == {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}


# --- fingerprints ------------------------------------------------------------------------------------


def test_corpus_fingerprint_tracks_every_field_and_the_order():
    docs = [Document("1", "ab", "c"), Document("2", "", "text two"), Document("3", "t", "x")]
    base = corpus_fingerprint(docs)
    assert len(base) == 64 and int(base, 16) >= 0
    assert corpus_fingerprint(list(docs)) == base == corpus_fingerprint(iter(docs))
    assert corpus_fingerprint([Document(d.id, d.title, d.text) for d in docs]) == base
    variants = [
        [Document("1x", "ab", "c"), *docs[1:]],            # id
        [Document("1", "aB", "c"), *docs[1:]],             # title
        [Document("1", "ab", "c."), *docs[1:]],            # text
        [Document("1", "a", "bc"), *docs[1:]],             # a character moved between title and text
        [Document("1", "", "ab c"), *docs[1:]],            # same passage, different fields
        [docs[1], docs[0], docs[2]],                       # order
        docs[:2],                                          # a document fewer
    ]
    fingerprints = {corpus_fingerprint(v) for v in variants}
    assert len(fingerprints) == len(variants) and base not in fingerprints


def test_queries_fingerprint_tracks_texts_and_order():
    texts = ["what is a", "b", "c"]
    base = queries_fingerprint(texts)
    assert queries_fingerprint(tuple(texts)) == base
    variants = [["what is ab", "", "c"], ["what is a", "b", "c", ""], ["b", "what is a", "c"], ["what is a", "b"],
                ["what is a", "B", "c"]]
    fingerprints = {queries_fingerprint(v) for v in variants}
    assert len(fingerprints) == len(variants) and base not in fingerprints
    assert queries_fingerprint([]) != corpus_fingerprint([])  # the two kinds never collide
    with pytest.raises(TypeError):
        queries_fingerprint("one string")


def test_generated_records_carry_key_and_provenance(tmp_path):
    """data_gen's output (a resume key and provenance per record) reads as ordinary pairs and STS pairs."""
    import json

    from embedlib.records import RecordError, read_pairs, read_scored_pairs

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"query": "q", "pos": ["p"], "key": "d1|qa|0", "provenance": {"model": "m"}}) + "\n")
    assert read_pairs(pairs)[0].pos == ["p"]
    sts = tmp_path / "sts.jsonl"
    sts.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "score": 4.0, "key": "k", "provenance": {}}) + "\n")
    assert read_scored_pairs(sts)[0].score == 4.0
    pairs.write_text(json.dumps({"query": "q", "pos": ["p"], "provenance": "gpt"}) + "\n")
    with pytest.raises(RecordError, match=r"pairs.jsonl:1: field 'provenance'"):
        read_pairs(pairs)


def test_streaming_iterators_hold_one_record_at_a_time(tmp_path):
    """The list readers are built on iterators that yield each record as it is read and checked: the
    records before a bad line come out before its error (the data cache converts files this way)."""
    from embedlib.records import iter_corpus, iter_labeled_texts, iter_pairs, iter_scored_pairs

    cases = [
        (iter_pairs, [{"query": "q1", "pos": ["p"]}, {"query": "q2", "pos": ["p"]}, {"query": "", "pos": ["p"]}], "query"),
        (iter_corpus, [{"_id": "a", "text": "t"}, {"_id": "b", "text": "t"}, {"_id": "a", "text": "t"}], "_id"),
        (iter_scored_pairs, [{"sentence1": "a", "sentence2": "b", "score": 1}] * 2
         + [{"sentence1": "a", "sentence2": "b", "score": "x"}], "score"),
        (iter_labeled_texts, [{"text": "a", "label": "x"}] * 2 + [{"text": "a"}], "label"),
    ]
    for reader, records, field in cases:
        path = write_records(tmp_path / f"{reader.__name__}.jsonl", records)
        stream = reader(path)
        assert next(stream) is not None and next(stream) is not None
        with raises_at(path, 3, field, ""):
            next(stream)


def test_parse_pair_can_leave_corpus_texts_to_the_caller():
    """resolve=False (the data cache): ids count as present for AnyId, sides from ids stay None."""
    from embedlib.records import AnyId, parse_pair

    record, pos_from_ids, neg_from_ids = parse_pair("p.jsonl", 4, {"query": "q", "pos_ids": ["d1"], "neg": ["n"]},
                                                    AnyId(), resolve=False)
    assert (record.pos, record.pos_ids, record.neg, pos_from_ids, neg_from_ids) == (None, ["d1"], ["n"], True, False)
    with raises_at(Path("p.jsonl"), 4, "pos_ids[0]", "unknown id 'd1'"):
        parse_pair("p.jsonl", 4, {"query": "q", "pos_ids": ["d1"]}, {}, resolve=False)
    with raises_at(Path("p.jsonl"), 4, "pos", "can only be resolved with a corpus"):
        parse_pair("p.jsonl", 4, {"query": "q", "pos_ids": ["d1"]}, None, resolve=False)
