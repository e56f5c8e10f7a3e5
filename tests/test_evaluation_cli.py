"""`python -m embedlib.evaluation` on bad input: one line `error: ...` on stderr, exit status 2, nothing
on stdout, no --output file, and the data and options checked before the model is loaded."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedlib.evaluation import main

REPO = Path(__file__).resolve().parents[1]


def write_beir(directory: Path) -> Path:
    """A valid BEIR-layout directory: 4 documents, 2 queries, 3 judgements (one of relevance 0)."""
    directory.mkdir(parents=True, exist_ok=True)
    docs = [{"_id": f"d{i}", "title": f"title {i}", "text": f"text number {i}"} for i in range(1, 5)]
    (directory / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    queries = [{"_id": "q1", "text": "first question"}, {"_id": "q2", "text": "second question"}]
    (directory / "queries.dev.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (directory / "qrels.dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td3\t1\nq2\td4\t0\n")
    return directory


def write_sts(path: Path) -> Path:
    path.write_text("score\tsentence1\tsentence2\n5.0\tA man plays a guitar.\tA man plays the guitar.\n"
                    "0.4\tThe sun is hot.\tHe wrote a letter.\n")
    return path


@pytest.fixture
def beir(tmp_path) -> Path:
    return write_beir(tmp_path / "beir")


@pytest.fixture
def sts(tmp_path) -> Path:
    return write_sts(tmp_path / "sts.tsv")


@pytest.fixture
def output(tmp_path) -> Path:
    return tmp_path / "out" / "figures.json"


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model fails the test: every error here must come before it."""
    from embedlib.encoder import Encoder

    def load(*args, **kwargs):
        pytest.fail("the model was loaded before the input was checked")

    monkeypatch.setattr(Encoder, "from_pretrained", load)


def run_failing(capsys, argv: list[str], output: Path) -> str:
    """main(argv + --output): exit status 2, nothing on stdout, no output file; the one stderr line."""
    output.parent.mkdir(parents=True, exist_ok=True)
    assert main([*argv, "--no-progress", "--output", str(output)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert not output.exists()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


# ---- the valid inputs work, so that each failure below is the one change's doing ------------------------


def test_valid_inputs_evaluate_and_write_the_output(capsys, tiny_bert_dir, beir, sts, output):
    output.parent.mkdir()
    argv = ["--model", str(tiny_bert_dir), "--beir", str(beir), "--sts", str(sts), "--max-length", "32",
            "--per-query", "--no-progress", "--output", str(output)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(output.read_text())
    assert printed["retrieval"]["num_queries"] == 2 and sorted(printed["retrieval"]["per_query"]) == ["q1", "q2"]
    assert printed["sts"]["num_pairs"] == 2


# ---- bad data files: named by file, line and field, before the model is loaded ----------------------------

def _append(name: str, text: str):
    def change(d: Path):
        with open(d / name, "a") as f:
            f.write(text)
    return change


def _write(name: str, text: str):
    return lambda d: (d / name).write_text(text)


DATA_CASES = {
    "duplicate corpus id": (_append("corpus.jsonl", '{"_id": "d2", "text": "again"}\n'),
                            "corpus.jsonl:5: field '_id': duplicate id 'd2', first on line 2"),
    "duplicate query id": (_append("queries.dev.jsonl", '{"_id": "q1", "text": "again"}\n'),
                           "queries.dev.jsonl:3: field '_id': duplicate id 'q1', first on line 1"),
    "corpus text of the wrong type": (_append("corpus.jsonl", '{"_id": "d5", "text": 5}\n'),
                                      "corpus.jsonl:5: field 'text': expected a string, got integer 5"),
    "malformed corpus line": (_append("corpus.jsonl", '{"_id": "d5",\n'),
                              "corpus.jsonl:5: malformed JSON: Expecting property name enclosed in double quotes "
                              "at column 14"),
    "unknown query field": (_append("queries.dev.jsonl", '{"_id": "q3", "txt": "x"}\n'),
                            "queries.dev.jsonl:3: field 'txt': unknown field; did you mean 'text'? "
                            "expected: _id, metadata, text"),
    "qrels score not an integer": (_append("qrels.dev.tsv", "q1\td2\thigh\n"),
                                   "qrels.dev.tsv:5: field 'score': not an integer: 'high'"),
    "qrels without header": (_write("qrels.dev.tsv", "q1\td1\t1\n"),
                             "qrels.dev.tsv:1: expected the header 'query-id<TAB>corpus-id<TAB>score', "
                             "got 'q1\\td1\\t1'"),
    "qrels unknown corpus id": (_append("qrels.dev.tsv", "q1\td9\t1\n"),
                                "qrels.dev.tsv:5: field 'corpus-id': unknown id 'd9': not in {beir}/corpus.jsonl"),
    "qrels unknown query id": (_write("qrels.dev.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\n\nq7\td2\t1\n"),
                               "qrels.dev.tsv:4: field 'query-id': unknown id 'q7': not in "
                               "{beir}/queries.dev.jsonl"),
    "empty corpus": (_write("corpus.jsonl", "\n"), "corpus.jsonl: no documents"),
    "empty queries": (_write("queries.dev.jsonl", ""), "queries.dev.jsonl: no queries"),
    "qrels with only the header": (_write("qrels.dev.tsv", "query-id\tcorpus-id\tscore\n"),
                                   "qrels.dev.tsv: no judgements"),
    "empty qrels file": (_write("qrels.dev.tsv", ""), "qrels.dev.tsv: no judgements"),
    "no relevant document": (_write("qrels.dev.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t0\nq2\td2\t-1\n"),
                             "qrels.dev.tsv: no query has a relevant document (a judgement with score > 0)"),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_beir_data_is_one_line_naming_file_line_and_field(case, capsys, tiny_bert_dir, beir, output,
                                                              no_model_load):
    change, message = DATA_CASES[case]
    change(beir)
    line = run_failing(capsys, ["--model", str(tiny_bert_dir), "--beir", str(beir)], output)
    assert line == f"error: {beir}/{message.format(beir=beir)}"


def test_missing_corpus(capsys, tiny_bert_dir, beir, output, no_model_load):
    (beir / "corpus.jsonl").unlink()
    line = run_failing(capsys, ["--model", str(tiny_bert_dir), "--beir", str(beir)], output)
    assert line == f"error: {beir}: missing {beir}/corpus.jsonl[.gz]"


def test_split_whose_files_are_missing_names_them(capsys, tiny_bert_dir, beir, output, no_model_load):
    line = run_failing(capsys, ["--model", str(tiny_bert_dir), "--beir", str(beir), "--split", "test"], output)
    assert line == (f"error: {beir}: missing {beir}/queries.test.jsonl, {beir}/qrels.test.tsv "
                    "(splits here: dev)")


def test_split_with_only_its_qrels_missing(capsys, tiny_bert_dir, beir, output, no_model_load):
    (beir / "qrels.dev.tsv").rename(beir / "qrels.train.tsv")
    line = run_failing(capsys, ["--model", str(tiny_bert_dir), "--beir", str(beir)], output)
    assert line == f"error: {beir}: missing {beir}/qrels.dev.tsv (splits here: train)"


def test_beir_not_a_directory(capsys, tiny_bert_dir, tmp_path, sts, output, no_model_load):
    line = run_failing(capsys, ["--model", str(tiny_bert_dir), "--beir", str(sts)], output)
    assert line == f"error: {sts}: not a directory (expected a BEIR-layout directory)"
    line = run_failing(capsys, ["--model", str(tiny_bert_dir), "--beir", str(tmp_path / "nowhere")], output)
    assert line == f"error: {tmp_path / 'nowhere'}: no such directory (expected a BEIR-layout directory)"


STS_CASES = {
    "missing file": (None, "no such file (expected scored sentence pairs)"),
    "only a header": ("score\tsentence1\tsentence2\n", "no sentence pairs"),
    "empty file": ("", "no sentence pairs"),
    "one score for every pair": ("score\tsentence1\tsentence2\n3\ta\tb\n3.0\tc\td\n",
                                 "all 2 pairs have the score 3; Spearman's correlation needs at least two "
                                 "different scores"),
    "a single pair": ("score\tsentence1\tsentence2\n3\ta\tb\n",
                      "one pair; Spearman's correlation needs at least two different scores"),
    "score not a number": ("score\tsentence1\tsentence2\n3\ta\tb\nhigh\tc\td\n",
                           "3: field 'score': not a number: 'high'"),
    "empty sentence": ("score\tsentence1\tsentence2\n3\ta\tb\n1\t \td\n", "3: field 'sentence1': empty"),
}


@pytest.mark.parametrize("case", STS_CASES)
def test_bad_sts_file_is_one_line(case, capsys, tiny_bert_dir, tmp_path, output, no_model_load):
    text, message = STS_CASES[case]
    path = tmp_path / "pairs.tsv"
    if text is not None:
        path.write_text(text)
    line = run_failing(capsys, ["--model", str(tiny_bert_dir), "--sts", str(path)], output)
    separator = ":" if message[0].isdigit() else ": "
    assert line == f"error: {path}{separator}{message}"


def test_sts_file_of_an_unsupported_type(capsys, tiny_bert_dir, tmp_path, output, no_model_load):
    path = tmp_path / "pairs.csv"
    path.write_text("score,sentence1,sentence2\n")
    line = run_failing(capsys, ["--model", str(tiny_bert_dir), "--sts", str(path)], output)
    assert line == f"error: {path}: unsupported file type; expected .tsv, .tsv.gz, .jsonl, .jsonl.gz, .parquet"


def test_every_data_file_is_checked_before_the_model_directory(capsys, beir, tmp_path, output):
    """A missing model and a bad STS file: the data error is reported (the data is read first)."""
    (tmp_path / "bad.jsonl").write_text('{"sentence1": "a", "sentence2": "b"}\n')
    line = run_failing(capsys, ["--model", str(tmp_path / "no-model"), "--beir", str(beir),
                                "--sts", str(tmp_path / "bad.jsonl")], output)
    assert line == f"error: {tmp_path / 'bad.jsonl'}:1: field 'score': required field is missing"


# ---- bad options: one line, before the data and the model -------------------------------------------------

OPTION_CASES = {
    "batch size 0": (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    "batch size not a number": (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    "max length 1": (["--max-length", "1"],
                     "--max-length must be at least 2 (a text between its two special tokens), got 1"),
    # argparse's own message; how it quotes the choices differs between Python versions
    "unknown dtype": (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8' (choose from ..."),
    "negative cache bound": (["--cache-max-gb", "-1"], "--cache-max-gb must be >= 0 and finite, got -1.0"),
    "cache bound not a number": (["--cache-max-gb", "big"], "argument --cache-max-gb: invalid off_or_float value: 'big'"),
}


@pytest.mark.parametrize("case", OPTION_CASES)
def test_bad_option_is_one_line(case, capsys, tiny_bert_dir, sts, output, no_model_load):
    extra, message = OPTION_CASES[case]
    line = run_failing(capsys, ["--model", str(tiny_bert_dir), "--sts", str(sts), *extra], output)
    if message.endswith("..."):
        assert line.startswith(f"error: {message[:-3]}")
    else:
        assert line == f"error: {message}"


def test_per_query_without_a_set_it_applies_to(capsys, tiny_bert_dir, sts, output, no_model_load):
    line = run_failing(capsys, ["--model", str(tiny_bert_dir), "--classification", str(sts), str(sts), "--per-query"],
                       output)
    assert line == ("error: --per-query needs --beir, --sts, --pairs or --sets (it adds each query's retrieval "
                    "figures and each pair's cosine)")


def test_cache_dir_under_a_file(capsys, tiny_bert_dir, beir, tmp_path, output, no_model_load):
    (tmp_path / "a_file").write_text("x")
    line = run_failing(capsys, ["--model", str(tiny_bert_dir), "--beir", str(beir),
                                "--cache-dir", str(tmp_path / "a_file" / "cache")], output)
    assert line == f"error: cache directory {tmp_path / 'a_file' / 'cache'}: {tmp_path / 'a_file'} exists and is not a directory"


def test_neither_beir_nor_sts(capsys, tiny_bert_dir, output, no_model_load):
    line = run_failing(capsys, ["--model", str(tiny_bert_dir)], output)
    assert line == "error: give --beir DIR, --sts FILE, --pairs FILE, --classification TRAIN TEST and/or --sets FILE"


def test_missing_model_option(capsys, sts, output):
    line = run_failing(capsys, ["--sts", str(sts)], output)
    assert line == "error: the following arguments are required: --model"


def test_output_in_a_missing_directory(capsys, tiny_bert_dir, sts, tmp_path, no_model_load):
    output = tmp_path / "no" / "such" / "figures.json"
    assert main(["--model", str(tiny_bert_dir), "--sts", str(sts), "--output", str(output)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not (tmp_path / "no").exists()
    assert captured.err == f"error: --output {output}: the directory {output.parent} does not exist\n"


def test_output_that_is_a_directory(capsys, tiny_bert_dir, sts, tmp_path, no_model_load):
    assert main(["--model", str(tiny_bert_dir), "--sts", str(sts), "--output", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: --output {tmp_path}: is a directory\n"


def test_max_length_beyond_the_models_positions(capsys, tiny_bert_dir, sts, output, no_model_load):
    line = run_failing(capsys, ["--model", str(tiny_bert_dir), "--sts", str(sts), "--max-length", "600"], output)
    assert line == (f"error: max length 600 exceeds the model's 512 positions (max_position_embeddings in "
                    f"{tiny_bert_dir / 'config.json'})")


# ---- the model directory: checked after the data, before loading ------------------------------------------


def test_missing_model_directory(capsys, beir, tmp_path, output, no_model_load):
    line = run_failing(capsys, ["--model", str(tmp_path / "no-model"), "--beir", str(beir)], output)
    assert line == f"error: {tmp_path / 'no-model'}: no such directory (expected a model directory)"


def test_model_path_that_is_a_file(capsys, beir, sts, output, no_model_load):
    line = run_failing(capsys, ["--model", str(sts), "--beir", str(beir)], output)
    assert line == f"error: {sts}: not a directory (expected a model directory)"


def test_model_directory_without_config(capsys, beir, tmp_path, output, no_model_load):
    (tmp_path / "empty-model").mkdir()
    line = run_failing(capsys, ["--model", str(tmp_path / "empty-model"), "--beir", str(beir)], output)
    assert line == f"error: {tmp_path / 'empty-model'}: not a model directory (no config.json)"


def test_model_package_not_installed(capsys, beir, output, no_model_load):
    line = run_failing(capsys, ["--model", "package:no_such_model_package", "--beir", str(beir)], output)
    assert line == "error: package:no_such_model_package: no installed Python package named 'no_such_model_package'"


def test_model_directory_that_does_not_load(capsys, beir, tmp_path, output):
    """config.json but no weights: transformers' several-line message becomes the one line."""
    model = tmp_path / "config-only"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    line = run_failing(capsys, ["--model", str(model), "--beir", str(beir)], output)
    assert line.startswith(f"error: {model}: cannot load the model: ") and "model.safetensors" in line


# ---- as a real command ------------------------------------------------------------------------------------


def run_command(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "embedlib.evaluation", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_command_prints_one_line_and_no_traceback(beir, tmp_path, output):
    _append("corpus.jsonl", '{"_id": "d1", "text": "again"}\n')(beir)
    output.parent.mkdir()
    bad_data = run_command("--model", str(tmp_path / "no-model"), "--beir", str(beir), "--output", str(output))
    assert bad_data.returncode == 2 and bad_data.stdout == ""
    assert "Traceback" not in bad_data.stderr
    assert bad_data.stderr == f"error: {beir}/corpus.jsonl:5: field '_id': duplicate id 'd1', first on line 1\n"

    write_beir(beir)  # the data repaired: now the missing model is the error
    no_model = run_command("--model", str(tmp_path / "no-model"), "--beir", str(beir), "--output", str(output))
    assert no_model.returncode == 2 and no_model.stdout == ""
    assert "Traceback" not in no_model.stderr
    assert no_model.stderr == f"error: {tmp_path / 'no-model'}: no such directory (expected a model directory)\n"
    assert not output.exists()
