"""`python -m mining filter-pairs`: keeps exactly the records whose query-positive cosines are all at least
--min-score (checked against scores computed here with the same encoder), writes them atomically with a
JSON record, gives the same bytes under two ranks, takes passage embeddings from a mining run's cache,
and refuses bad input in one line with nothing written."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import mining.__main__ as cli
from embedlib.encoder import Encoder
from embedlib.records import read_corpus, read_pairs
from mining_helpers import run_mining, scifact_slice


@pytest.fixture(scope="module")
def data(tmp_path_factory, scifact_dir):
    return scifact_slice(scifact_dir, tmp_path_factory.mktemp("slice"), num_pairs=30, num_docs=120)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def text_pairs(data, tmp_path_factory):
    """The slice's pairs with texts instead of ids, some with an instruction and two positives."""
    corpus, pairs = data
    docs = {d.id: d for d in read_corpus(corpus)}
    path = tmp_path_factory.mktemp("text_pairs") / "pairs.jsonl"
    with open(path, "w") as f:
        for i, line in enumerate(pairs.read_text().splitlines()):
            record = json.loads(line)
            texts = [docs[doc_id].passage for doc_id in record.pop("pos_ids")]
            if i % 4 == 1:
                texts.append(docs[sorted(docs)[i]].passage)  # a second, mostly unrelated positive
            record["pos"] = texts
            if i % 3 == 0:
                record["instruction"] = "Represent this claim: "
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def id_pairs(data, tmp_path_factory):
    """The slice's pairs with ids only: their positives are the corpus passages."""
    _, pairs = data
    path = tmp_path_factory.mktemp("id_pairs") / "pairs.jsonl"
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "pos"}) + "\n" for r in records))
    return path


def reference_scores(model: Path, pairs_path: Path, corpus_path: Path | None, instruction: str = "") -> np.ndarray:
    """Each record's lowest query-positive cosine, computed directly with the encoder."""
    encoder = Encoder.from_pretrained(model)
    corpus = {d.id: d for d in read_corpus(corpus_path)} if corpus_path else None
    pairs = read_pairs(pairs_path, corpus=corpus)
    queries = encoder.encode([(p.instruction if p.instruction is not None else instruction) + p.query for p in pairs],
                             show_progress=False)
    scores = []
    for pair, query in zip(pairs, queries):
        positives = encoder.encode(pair.pos, show_progress=False).astype(np.float16).astype(np.float32)
        positives /= np.linalg.norm(positives, axis=1, keepdims=True)
        scores.append(float((positives @ (query / np.linalg.norm(query))).min()))
    return np.array(scores)


def midpoint_threshold(scores: np.ndarray) -> float:
    """A threshold halfway between two neighbouring scores near the median: no score is near it."""
    ordered = np.sort(scores)
    gaps = np.diff(ordered)
    middle = len(ordered) // 2
    i = middle - 3 + int(np.argmax(gaps[middle - 3: middle + 3]))
    return float((ordered[i] + ordered[i + 1]) / 2)


def _filter(*args) -> int:
    try:
        return cli.main(["filter-pairs", "--launcher", "none", "--no-progress", *map(str, args)])
    except SystemExit as e:
        return e.code


def _tree(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            stat = (Path(dirpath) / name).lstat()
            out[str((Path(dirpath) / name).relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return out


@pytest.mark.parametrize("kind", ["texts_and_ids", "ids_only", "texts_only"])
def test_keeps_exactly_the_records_at_or_above_the_threshold(kind, data, id_pairs, text_pairs, tiny_export, tmp_path,
                                                             capsys):
    corpus = data[0]
    pairs = {"texts_and_ids": data[1], "ids_only": id_pairs, "texts_only": text_pairs}[kind]
    with_ids = kind != "texts_only"
    expected_scores = reference_scores(tiny_export, pairs, corpus if with_ids else None, "query: ")
    threshold = midpoint_threshold(expected_scores)
    output = tmp_path / "out" / "kept.jsonl"
    extra = ["--corpus", corpus] if with_ids else []
    assert _filter("--model", tiny_export, "--queries", pairs, "--output", output, "--min-score", threshold,
                   "--query-instruction", "query: ", "--chunk-rows", 7, *extra) == 0
    assert "kept" in capsys.readouterr().out

    inputs = [json.loads(line) for line in pairs.read_text().splitlines()]
    kept = [json.loads(line) for line in output.read_text().splitlines()]
    assert kept == [r for r, s in zip(inputs, expected_scores) if s >= threshold]  # unchanged, in order
    record = json.loads((tmp_path / "out" / "kept.json").read_text())
    assert record["kept"] == len(kept) == record["written"] and record["dropped"] == len(inputs) - len(kept)
    assert 0 < record["kept"] < len(inputs) and record["min_score"] == threshold
    assert record["score"]["quantiles"]["0.5"] == pytest.approx(np.quantile(expected_scores, 0.5), abs=1e-4)
    assert record["score"]["quantiles"]["0"] == pytest.approx(expected_scores.min(), abs=1e-4)
    assert sum(record["score"]["histogram"]["counts"]) == len(inputs)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["kept.json", "kept.jsonl"]  # no temporary left


def test_two_ranks_write_the_same_bytes_as_one(data, tiny_export, tmp_path):
    corpus, pairs = data
    outputs = {}
    for launcher in ("none", "torchrun"):
        output = tmp_path / launcher / "kept.jsonl"
        result = run_mining("filter-pairs", "--model", tiny_export, "--queries", pairs, "--corpus", corpus,
                            "--output", output, "--min-score", 0.3, "--chunk-rows", 5, launcher=launcher)
        assert result.returncode == 0, result.stderr[-3000:]
        record = json.loads(output.with_suffix(".json").read_text())
        assert record["world_size"] == (2 if launcher == "torchrun" else 1)
        outputs[launcher] = (output.read_bytes(), record["score"], record["kept"])
    assert outputs["torchrun"] == outputs["none"]


def test_passage_embeddings_come_from_a_mining_runs_cache(data, id_pairs, tiny_export, tmp_path):
    corpus, pairs = data[0], id_pairs
    run = tmp_path / "run"
    assert cli.main(["mine", "--model", str(tiny_export), "--corpus", str(corpus), "--queries", str(pairs),
                     "--run-dir", str(run), "--launcher", "none", "--no-progress", "--block-rows", "32",
                     "--k", "5"]) == 0
    results = {}
    for name, extra in (("fresh", []), ("cached", ["--cache-dir", run / "mining" / "cache",
                                                   "--data-cache", run / "data_cache"])):
        output = tmp_path / name / "kept.jsonl"
        assert _filter("--model", tiny_export, "--queries", pairs, "--corpus", corpus, "--output", output,
                       "--min-score", 0.3, *extra) == 0
        results[name] = (output.read_bytes(), json.loads(output.with_suffix(".json").read_text()))
    assert results["fresh"][1]["cached_passages"] == 0
    assert results["cached"][1]["cached_passages"] == sum(len(json.loads(line)["pos_ids"])
                                                          for line in pairs.read_text().splitlines())
    assert results["cached"][0] == results["fresh"][0]
    assert results["cached"][1]["score"] == results["fresh"][1]["score"]


def _bad_inputs(tmp: Path, data) -> dict:
    corpus, pairs = data
    bad = tmp / "bad"
    bad.mkdir()
    lines = pairs.read_text().splitlines()
    record = json.loads(lines[3])
    record["pos_ids"] = ["no-such-doc"]
    (bad / "unknown_id.jsonl").write_text("\n".join(lines[:3] + [json.dumps(record)]) + "\n")
    record = json.loads(lines[1])
    record["query"] = 7
    (bad / "query_not_text.jsonl").write_text("\n".join(lines[:1] + [json.dumps(record)] + lines[2:]) + "\n")
    (bad / "ids_only.jsonl").write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "pos"})
                                                + "\n" for line in lines))
    (bad / "empty.jsonl").write_text("")
    (bad / "a_dir.jsonl").mkdir()
    return {"corpus": corpus, "pairs": pairs, "bad": bad}


BAD_CASES = [  # (case, options replacing the good ones, what the one line must contain)
    ("min_score_range", ["--min-score", "1.5"], "--min-score must be in [-1, 1]"),
    ("min_score_nan", ["--min-score", "nan"], "--min-score must be in [-1, 1]"),
    ("min_score_missing", [None, "--min-score"], "--min-score"),
    ("batch_size", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("output_not_jsonl", ["--output", "{tmp}/kept.txt"], "--output must be a .jsonl file"),
    ("output_a_directory", ["--output", "{bad}/a_dir.jsonl"], "a_dir.jsonl: is a directory"),
    ("output_is_the_input", ["--output", "{pairs}"], "is the input file"),
    ("pairs_missing", ["--queries", "{bad}/none.jsonl"], "none.jsonl: pairs file not found"),
    ("pairs_empty", ["--queries", "{bad}/empty.jsonl"], "empty.jsonl: no pairs"),
    ("unknown_id", ["--queries", "{bad}/unknown_id.jsonl"], "unknown_id.jsonl:4: field 'pos_ids[0]'"),
    ("query_not_text", ["--queries", "{bad}/query_not_text.jsonl"], "query_not_text.jsonl:2: field 'query'"),
    ("ids_without_corpus", [None, "--corpus", "--queries", "{bad}/ids_only.jsonl"],
     "ids_only.jsonl:1: field 'pos': missing or empty"),
    ("model_missing", ["--model", "{bad}/no_model"], "no_model: model directory not found"),
]


@pytest.mark.parametrize("case, change, message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_one_line_status_2_and_nothing_written(case, change, message, data, tiny_export, tmp_path,
                                                            capsys, monkeypatch):
    monkeypatch.setattr(Encoder, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    inputs = _bad_inputs(tmp_path, data)
    options = {"--model": tiny_export, "--queries": inputs["pairs"], "--corpus": inputs["corpus"],
               "--output": tmp_path / "out" / "kept.jsonl", "--min-score": 0.5,
               "--data-cache": tmp_path / "run" / "data_cache"}
    for flag, value in zip(change[::2], change[1::2]):
        if flag is None:
            del options[value]
        else:
            options[flag] = value.format(tmp=tmp_path, bad=inputs["bad"], pairs=inputs["pairs"])
    before = _tree(tmp_path)
    assert _filter(*[str(x) for pair in options.items() for x in pair]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mining: error: ") and message in lines[0], captured.err
    assert captured.out == "" and _tree(tmp_path) == before


def test_the_good_command_line_of_the_bad_cases_writes_and_fills_the_data_cache(data, tiny_export, tmp_path):
    inputs = _bad_inputs(tmp_path, data)
    cache = tmp_path / "run" / "data_cache"
    args = ["--model", tiny_export, "--queries", inputs["pairs"], "--corpus", inputs["corpus"],
            "--output", tmp_path / "out" / "kept.jsonl", "--min-score", -1, "--data-cache", cache]
    assert _filter(*args) == 0
    assert len((tmp_path / "out" / "kept.jsonl").read_text().splitlines()) == 30  # -1 keeps everything
    entries = sorted(p.name.split("-")[0] for p in cache.iterdir() if not p.name.startswith("."))
    assert entries == ["corpus", "pairs"]
    shutil.rmtree(tmp_path / "out")
    assert _filter(*args) == 0  # the second run maps the cached entries
