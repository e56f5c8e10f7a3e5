"""embedlib.record_cache: a conversion accepts and rejects exactly what the list readers of embedlib.records
do (same file, line, field and message, over byte ranges and shards converted in parallel), two
processes starting at once convert once, and a damaged or stale entry is converted again."""
from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import embedlib.record_cache as rc
from embedlib.record_cache import RecordCache, source_fingerprint
from embedlib.records import (RecordError, corpus_fingerprint, queries_fingerprint, read_corpus, read_labeled_texts,
                              read_pairs, read_scored_pairs)

REPO = Path(__file__).resolve().parents[1]


def _jsonl(path: Path, lines: list[str]) -> Path:
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _error(call) -> tuple | None:
    try:
        call()
    except RecordError as e:
        return (e.path, e.line, e.field, e.message)
    return None


@pytest.fixture
def small_ranges(monkeypatch):
    """Ranges of ~2 KiB and blocks of ~1 KiB: a small file exercises several ranges, blocks and lines
    recovered across them (blocks only in this process: spawned workers use the module's sizes)."""
    monkeypatch.setattr(rc, "RANGE_BYTES", 2048)
    monkeypatch.setattr(rc, "BLOCK_BYTES", 1024)


def test_arrow_whitespace_is_python_whitespace():
    """The fast path's empty-string check relies on it, for every code point."""
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    array = pa.array(chars)
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(array)), 0).to_pylist()
    assert [c for c, b in zip(chars, blank) if b != (not c.strip())] == []


# --- the same records and the same errors as the list readers ----------------------------------------

CORPUS = [{"_id": f"d{i}", "title": f"title {i}" if i % 3 else "", "text": f"text number {i} " * (i % 5 + 1)}
          for i in range(60)]


def _good_pair(i: int) -> dict:
    variant = i % 5
    if variant == 0:
        return {"query": f"query {i}", "pos": [f"positive {i}"], "neg": [f"negative {i}a", f"negative {i}b"]}
    if variant == 1:
        return {"query": f"query {i}", "pos_ids": [f"d{i % 60}"], "neg_ids": [f"d{(i + 7) % 60}"],
                "instruction": "Q: ", "pos_scores": [1.0], "neg_scores": [0]}
    if variant == 2:
        return {"query": f"query {i}", "pos": [], "pos_ids": [f"d{i % 60}", f"d{(i + 1) % 60}"], "prompt": "P: ",
                "provenance": {"source_id": "x", "template": "t", "sample_index": i}, "key": f"k{i}"}
    if variant == 3:
        return {"query": f"query {i}", "pos": [f"p {i}"], "pos_ids": [f"d{i % 60}"], "neg": [], "task": "t",
                "query_id": f"q{i}", "type": "normal"}
    return {"query": f"q {i} ünïcödé 中文", "pos": [f"p {i}"], "neg": [f"n {i}"], "neg_ids": None}


# Raw lines that the reference rejects or treats specially; each replaces one good line.
BAD_PAIR_LINES = [
    '{"query": "q", "pos": ["p"], "pos": []}',  # duplicate key
    '{"query": "q", "pos": ["p"], "negs": ["n"]}',  # unknown key
    '{"query": "  ", "pos": ["p"]}',  # empty query
    '{"query": "\\u3000", "pos": ["p"]}',  # unicode whitespace only
    '{"query": 5, "pos": ["p"]}',
    '{"query": "q", "pos": ["p", ""]}',
    '{"query": "q", "pos": ["p", null]}',
    '{"query": "q", "pos": []}',
    '{"query": "q"}',
    '{"query": "q", "pos": "p"}',
    '{"query": "q", "pos_ids": ["nope"]}',  # unknown id (with a corpus)
    '{"query": "q", "pos": ["p"], "neg_ids": ["d1", "missing"]}',
    '{"query": "q", "pos": ["a", "b"], "pos_ids": ["d1"]}',  # count mismatch
    '{"query": "q", "pos": ["p"], "pos_scores": [1, 2]}',
    '{"query": "q", "pos": ["p"], "pos_scores": [NaN]}',
    '{"query": "q", "pos": ["p"], "pos_scores": [true]}',
    '{"query": "q", "pos": ["p"], "instruction": "a", "prompt": "b"}',
    '{"query": "q", "pos": ["p"], "provenance": 3}',
    '{"query": "q", "pos": ["p"], "type": ""}',
    '{"query": "q", "pos": ["p"],}',  # malformed
    '["q", "p"]',
    '{"query": "q", "pos": ["p"]} {"query": "r", "pos": ["p"]}',
    '',  # a blank line: skipped, the lines after keep their numbers
    '   {"query": "indented", "pos": ["p"]}',  # fine for both (the slow path takes it)
    '{"query": "q", "pos": ["p"], "provenance": {"a": 1, "a": 2}}',
]


def _check_same(tmp_path, kind: str, path: Path, corpus_path: Path | None, workers: int):
    """The cache and the list reader agree: the same error, or the same records."""
    corpus_docs = read_corpus(corpus_path) if corpus_path else None
    corpus_map = {d.id: d for d in corpus_docs} if corpus_docs else None
    readers = {"pairs": lambda: read_pairs(path, corpus_map), "scored": lambda: read_scored_pairs(path),
               "labeled": lambda: read_labeled_texts(path), "corpus": lambda: read_corpus(path)}
    expected = _error(readers[kind])
    cache = RecordCache(tmp_path / f"cache-{random.random()}", workers=workers, in_process=True)
    corpus = cache.corpus(corpus_path) if corpus_path else None
    got = _error(lambda: cache.open(kind, path, corpus))
    assert got == expected
    if expected is not None:
        assert not any(p.name.startswith(".tmp-") for p in cache.root.iterdir())  # nothing half written
        return None
    table = cache.open(kind, path, corpus)
    records = readers[kind]()
    assert len(table) == len(records)
    if kind == "pairs":
        from training.data import _PositiveRows, _Texts  # the training views read pairs as PairRecords hold them

        pos, neg = _Texts(table, "pos", corpus, len(table)), _Texts(table, "neg", corpus, len(table))
        for i, r in enumerate(records):
            assert (table.value("query", i), pos[i], neg[i], table.value("instruction", i)) == \
                   (r.query, r.pos, r.neg, r.instruction)
            assert table.where(i) == (str(path.resolve()), r.line)
        assert table.manifest["queries_fingerprint"] == queries_fingerprint([r.query for r in records])
        rows = _PositiveRows(table, len(table), corpus is not None)
        assert [list(rows[i]) for i in range(len(table))] == \
               [[next(j for j, d in enumerate(corpus_docs) if d.id == x) for x in (r.pos_ids or [])]
                if corpus else [] for r in records]
    elif kind == "corpus":
        assert [table.document(i) for i in range(len(table))] == records
        assert table.corpus_fingerprint == corpus_fingerprint(records)
    elif kind == "scored":
        assert [(table.value("sentence1", i), table.value("sentence2", i), table.value("score", i))
                for i in range(len(table))] == [(p.sentence1, p.sentence2, p.score) for p in records]
    else:
        assert [(table.value("text", i), table.value("label", i)) for i in range(len(table))] == \
               [(t.text, t.label) for t in records]
    if kind != "corpus":  # the reference path's fingerprint, from the bytes, is the cache's
        assert table.fingerprint == source_fingerprint(kind, path, corpus.fingerprint if corpus else None)
    return table


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_pairs_accepted_and_rejected_as_the_list_reader_does(tmp_path, small_ranges, suffix):
    corpus_path = _jsonl(tmp_path / "corpus.jsonl", [json.dumps(d) for d in CORPUS])
    good = [json.dumps(_good_pair(i), ensure_ascii=False) for i in range(80)]
    _check_same(tmp_path, "pairs", _jsonl(tmp_path / f"good{suffix}", good), corpus_path, workers=1)
    rng = random.Random(0)
    for n, bad in enumerate(BAD_PAIR_LINES):
        lines = list(good)
        lines[rng.randrange(5, 75)] = bad
        if n % 4 == 0:  # a second problem later in the file: the first one is reported
            lines[78] = BAD_PAIR_LINES[(n + 3) % len(BAD_PAIR_LINES)]
        path = _jsonl(tmp_path / f"bad{n}{suffix}", lines)
        _check_same(tmp_path, "pairs", path, corpus_path, workers=1)
        _check_same(tmp_path, "pairs", path, None, workers=1)  # without a corpus ids go unchecked


def test_errors_across_parallel_ranges_name_the_first_in_file_order(tmp_path, small_ranges):
    """Workers convert ranges at once; the line numbers are the file's and the first error wins,
    including the checks across records (an unknown id or duplicate id before another error)."""
    corpus_path = _jsonl(tmp_path / "corpus.jsonl", [json.dumps(d) for d in CORPUS])
    good = [json.dumps(_good_pair(i)) for i in range(200)]
    lines = list(good)
    lines[150] = '{"query": ""}'
    lines[120] = '{"query": "q", "pos_ids": ["unknown"]}'  # earlier, found only by the id lookup
    path = _jsonl(tmp_path / "pairs.jsonl", lines)
    assert path.stat().st_size > 4 * rc.RANGE_BYTES
    _check_same(tmp_path, "pairs", path, corpus_path, workers=2)
    # An unknown id in the same record as a later-checked error: reported first, as read_pairs does.
    lines[120] = '{"query": "q", "pos_ids": ["unknown"], "type": ""}'
    _check_same(tmp_path, "pairs", _jsonl(tmp_path / "pairs2.jsonl", lines), corpus_path, workers=1)
    _check_same(tmp_path, "pairs", _jsonl(tmp_path / "pairs3.jsonl", good), corpus_path, workers=2)

    docs = [json.dumps(d) for d in CORPUS] * 2  # every id twice: the first repeat is line 61
    docs[90] = '{"_id": "x", "text": 5}'
    _check_same(tmp_path, "corpus", _jsonl(tmp_path / "dup.jsonl", docs), None, workers=2)
    docs = [json.dumps(d) for d in CORPUS]
    docs[30] = '{"_id": "x", "text": 5}'
    docs[50] = docs[5]  # the duplicate comes after the bad record: the bad record is reported
    _check_same(tmp_path, "corpus", _jsonl(tmp_path / "dup2.jsonl", docs), None, workers=1)


@pytest.mark.parametrize("kind, lines", [
    ("scored", ['{"sentence1": "a", "sentence2": "b", "score": 1}', '{"sentence1": "c", "sentence2": "d", "label": 0.5}',
                '{"sentence1": "a", "sentence2": "b", "score": 1, "label": 1}', '{"sentence1": "a", "sentence2": "b"}',
                '{"sentence1": "a", "sentence2": " ", "score": 1}', '{"sentence1": "a", "sentence2": "b", "score": NaN}',
                '{"sentence1": "a", "sentence2": "b", "score": "1"}', '{"sentence1": "a", "sentence2": "b", "score": 1e999}']),
    ("labeled", ['{"text": "a", "label": "x"}', '{"text": "b", "label": 3}', '{"text": "c", "label": true}',
                 '{"text": "", "label": "x"}', '{"text": "d", "label": " "}', '{"text": "e"}']),
    ("corpus", ['{"_id": "a", "text": ""}', '{"_id": "b", "title": null, "text": "t", "metadata": {}}',
                '{"_id": "", "text": "t"}', '{"_id": "c"}', '{"_id": "d", "text": "t", "title": 3}',
                '{"_id": "e", "text": "t", "metadata": {"x": [1]}}']),
])
def test_other_kinds_accepted_and_rejected_as_the_list_readers_do(tmp_path, small_ranges, kind, lines):
    good = {"scored": lambda i: {"sentence1": f"s{i}", "sentence2": f"t{i}", "score": i % 5},
            "labeled": lambda i: {"text": f"text {i}", "label": "ab"[i % 2]},
            "corpus": lambda i: {"_id": f"x{i}", "title": "t", "text": f"text {i}"}}[kind]
    base = [json.dumps(good(i)) for i in range(60)]
    _check_same(tmp_path, kind, _jsonl(tmp_path / "good.jsonl", base), None, workers=1)
    for n, line in enumerate(lines):
        bad = list(base)
        bad[20 + n] = line
        _check_same(tmp_path, kind, _jsonl(tmp_path / f"bad{n}.jsonl", bad), None, workers=1)


def test_a_lone_surrogate_is_an_error_at_its_line(tmp_path):
    """JSON's "\\ud800" escape makes a string that no UTF-8 file holds: the list reader lets it through
    (the tokenizer fails on it later); the cache, which stores UTF-8, names its line and field."""
    lines = [json.dumps(_good_pair(i)) for i in range(0, 50, 5)]
    lines[6] = '{"query": "lone \\ud800 surrogate", "pos": ["p"]}'
    path = _jsonl(tmp_path / "pairs.jsonl", lines)
    with pytest.raises(RecordError) as caught:
        RecordCache(tmp_path / "cache", in_process=True).pairs(path)
    assert (caught.value.line, caught.value.field) == (7, "query") and "lone surrogate" in caught.value.message


def test_tsv_parquet_and_a_damaged_gzip(tmp_path):
    sts = tmp_path / "sts.tsv"
    sts.write_text("score\tsentence1\tsentence2\n1\ta\tb\n2.5\tc\td\n")
    _check_same(tmp_path, "scored", sts, None, workers=1)
    sts.write_text("score\tsentence1\tsentence2\n1\ta\tb\nx\tc\td\n")
    _check_same(tmp_path, "scored", sts, None, workers=1)
    records = [_good_pair(i) for i in range(0, 40, 5)]  # pos/neg texts only: a uniform parquet schema
    table = pa.Table.from_pylist(records)
    pq.write_table(table, tmp_path / "pairs.parquet")
    _check_same(tmp_path, "pairs", tmp_path / "pairs.parquet", None, workers=1)
    records[3]["query"] = ""
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "bad.parquet")
    _check_same(tmp_path, "pairs", tmp_path / "bad.parquet", None, workers=1)
    data = gzip.compress(b"".join(b'{"query": "q%d", "pos": ["p"]}\n' % i for i in range(20000)))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    _check_same(tmp_path, "pairs", tmp_path / "cut.jsonl.gz", None, workers=1)


def test_shards_in_a_directory_or_a_glob(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    docs = [json.dumps(d) for d in CORPUS]
    _jsonl(shards / "part-0.jsonl", docs[:20])
    _jsonl(shards / "part-1.jsonl.gz", docs[20:40])
    pq.write_table(pa.Table.from_pylist(CORPUS[40:]), shards / "part-2.parquet")
    whole = corpus_fingerprint(read_corpus(_jsonl(tmp_path / "whole.jsonl", docs)))
    cache = RecordCache(tmp_path / "cache", in_process=True)
    for spec in (shards, f"{shards}/part-*"):
        corpus = cache.corpus(spec)
        assert [corpus.document(i).id for i in range(len(corpus))] == [d["_id"] for d in CORPUS]
        assert corpus.where(45) == (str((shards / "part-2.parquet").resolve()), 6)
        assert corpus.corpus_fingerprint == whole
    # A duplicate id across shards names both.
    _jsonl(shards / "part-3.jsonl", [docs[7]])
    with pytest.raises(RecordError) as caught:
        cache.corpus(shards)
    assert (caught.value.path, caught.value.line, caught.value.field) == (str(shards / "part-3.jsonl"), 1, "_id")
    assert "first on line 8 of" in caught.value.message and "part-0.jsonl" in caught.value.message
    with pytest.raises(RecordError, match="no file matches"):
        cache.corpus(f"{shards}/nothing-*")


# --- reuse, damage, change -----------------------------------------------------------------------------


def _pairs_file(path: Path, n: int = 300) -> Path:
    return _jsonl(path, [json.dumps({"query": f"q{i}", "pos": [f"p{i}"], "neg": [f"n{i}"]}) for i in range(n)])


def test_a_damaged_entry_is_converted_again(tmp_path):
    source = _pairs_file(tmp_path / "pairs.jsonl")
    cache = RecordCache(tmp_path / "cache", in_process=True)
    table = cache.pairs(source)
    entry = table.directory
    part = entry / table.manifest["parts"][0]["file"]
    original = part.read_bytes()
    expected = [table.value("query", i) for i in range(len(table))]

    def reopened():
        again = cache.pairs(source)
        assert again.directory == entry and [again.value("query", i) for i in range(len(again))] == expected
        return again

    assert reopened().manifest["created_at"] == table.manifest["created_at"]  # sound: reused as it is
    damage = {
        "truncated": lambda: part.write_bytes(original[: len(original) // 2]),
        "garbled footer": lambda: part.write_bytes(original[:-40] + bytes(40)),
        "garbled header": lambda: part.write_bytes(b"\xff" * 64 + original[64:]),
        "manifest gone": lambda: (entry / "manifest.json").unlink(),
        "manifest garbled": lambda: (entry / "manifest.json").write_text("{not json"),
        "manifest of another format": lambda: (entry / "manifest.json").write_text('{"format": 99}'),
        "part gone": lambda: part.unlink(),
    }
    for what, spoil in damage.items():
        spoil()
        with pytest.raises(rc.DamagedEntry):
            rc.open_table(entry)
        reopened()
        assert part.read_bytes() == original, what  # converted again, to the same bytes
        original = part.read_bytes()


def test_a_changed_file_is_converted_again_and_its_old_entry_removed(tmp_path):
    source = _pairs_file(tmp_path / "pairs.jsonl")
    cache = RecordCache(tmp_path / "cache", in_process=True)
    first = cache.pairs(source)
    _pairs_file(source, 301)
    second = cache.pairs(source)
    assert len(second) == 301 and second.directory != first.directory and second.fingerprint != first.fingerprint
    assert not first.directory.exists()
    # Touching a file (same bytes) makes a new entry but the same content fingerprint: a resume accepts it.
    os.utime(source, ns=(1, 1))
    third = cache.pairs(source)
    assert third.directory != second.directory and third.fingerprint == second.fingerprint


def test_a_file_changed_during_its_conversion_is_an_error(tmp_path, monkeypatch):
    source = _pairs_file(tmp_path / "pairs.jsonl")
    plan = rc._plan_units

    def plan_then_append(shards, kind):
        units = plan(shards, kind)
        with open(source, "a") as f:
            f.write(json.dumps({"query": "late", "pos": ["p"]}) + "\n")
        return units

    monkeypatch.setattr(rc, "_plan_units", plan_then_append)
    with pytest.raises(RecordError, match="changed while it was being converted"):
        RecordCache(tmp_path / "cache", in_process=True).pairs(source)


_RACER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    import embedlib.record_cache as rc
    converted = []
    convert = rc.RecordCache._convert
    def counting(self, *args):
        converted.append(os.getpid())
        return convert(self, *args)
    rc.RecordCache._convert = counting
    go = Path(sys.argv[1])
    while not go.exists():
        time.sleep(0.001)
    table = rc.RecordCache(sys.argv[2]).pairs(sys.argv[3])
    print(json.dumps({{"converted": bool(converted), "rows": len(table), "dir": str(table.directory),
                       "created_at": table.manifest["created_at"]}}))
""")


def test_two_processes_starting_at_once_convert_once(tmp_path):
    """Two real processes (as two ranks on a node) open the same file at the same moment: one converts,
    the other waits on the lock and maps the result."""
    source = _pairs_file(tmp_path / "pairs.jsonl", 20000)
    script = tmp_path / "racer.py"
    script.write_text(_RACER.format(repo=str(REPO)))
    go = tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, str(script), str(go), str(tmp_path / "cache"), str(source)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    go.touch()
    outputs = []
    for racer in racers:
        out, err = racer.communicate(timeout=240)
        assert racer.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(o["converted"] for o in outputs) == [False, True]
    assert {o["dir"] for o in outputs} == {outputs[0]["dir"]} and {o["rows"] for o in outputs} == {20000}
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [Path(outputs[0]["dir"]).name]


def _rss_file_mb() -> float:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["RssFile"].split()[0]) / 1024


def test_reading_rows_does_not_grow_the_resident_size(tmp_path, monkeypatch):
    """A read maps the pages around it (the kernel's fault-around, large folios): a table unmaps what it
    read every RELEASE_EVERY rows, so random reads over a run do not make a rank's RSS approach the file."""
    text = "word " * 400
    corpus = _jsonl(tmp_path / "corpus.jsonl", [json.dumps({"_id": f"d{i}", "text": f"{i} {text}"}) for i in range(30000)])
    table = RecordCache(tmp_path / "cache", in_process=True).corpus(corpus)  # ~60 MB of text
    rows = random.Random(0).sample(range(len(table)), 3000)

    def grown_by_reading() -> float:
        table.release_pages()
        before = _rss_file_mb()
        for row in rows:
            assert table.passage(row).startswith(f"{row} word")
        return _rss_file_mb() - before

    monkeypatch.setattr(rc, "RELEASE_EVERY", 10**9)
    unreleased = grown_by_reading()
    monkeypatch.setattr(rc, "RELEASE_EVERY", 8)  # a small file: a few reads map most of it
    released = grown_by_reading()
    assert released < 20 and unreleased > released + 10, (unreleased, released)
