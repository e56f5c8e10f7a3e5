"""`python -m mining mine` and `sidecar` on the command line: options are made from MiningSpec's and
SidecarConfig's fields, and every bad option or input file ends with one line `mining: error: ...`,
exit status 2, before any model is loaded, with nothing written anywhere."""
import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import mining.__main__ as cli
from embedlib.encoder import Encoder
from embedlib.negstore import NegativeStore
from mining.options import flag_of, from_options, option
from mining.sidecar import SidecarConfig
from mining.spec import MiningSpec, load_spec, save_spec
from mining_helpers import REPO, mining_command, mining_env, scifact_slice


@pytest.fixture(scope="module")
def data(tmp_path_factory, scifact_dir):
    return scifact_slice(scifact_dir, tmp_path_factory.mktemp("slice"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _parse(*args):
    return cli._parser().parse_args([str(a) for a in args])


# ---- A. options made from the dataclass fields ----------------------------------------------------


MINE_FLAGS = {"--model", "--run-dir", "--corpus", "--queries", "--k", "--positive-margin", "--score-cap",
              "--query-instruction", "--batch-size", "--max-length", "--query-max-length", "--encode-dtype",
              "--index", "--device", "--nlist", "--nprobe", "--hnsw-m", "--ef-search", "--recall-sample",
              "--block-rows", "--search-slack", "--max-depth", "--cache-dir", "--cache-max-gb", "--launcher",
              "--threads", "--no-progress"}
SIDECAR_FLAGS = {"--run-dir", "--poll-seconds", "--every", "--stop-when-finished", "--keep-cache",
                 "--keep-versions", "--full-every", "--partial-depth", "--partial-sample", "--threads",
                 "--no-progress"}


def _subparser(command: str):
    return next(a for a in cli._parser()._actions if a.dest == "command").choices[command]


def _flags(command: str) -> set[str]:
    return {s for a in _subparser(command)._actions for s in a.option_strings if s not in ("-h", "--help")}


def test_flag_names_are_those_of_before_plus_keep_versions_cache_bound_and_partial_refreshes():
    assert _flags("mine") == MINE_FLAGS
    assert _flags("sidecar") == SIDECAR_FLAGS


def test_cli_defaults_are_the_dataclass_defaults():
    args = _parse("mine", "--model", "m", "--corpus", "c.jsonl", "--queries", "p.jsonl", "--run-dir", "r")
    assert from_options(MiningSpec, args) == MiningSpec(corpus="c.jsonl", pairs="p.jsonl")
    assert args.pairs.endswith("p.jsonl") and args.k == 200 and args.positive_margin == 0.95
    args = _parse("sidecar", "--run-dir", "r")
    assert from_options(SidecarConfig, args) == SidecarConfig(run_dir=Path("r"))
    assert (args.poll_seconds, args.every, args.keep_cache_models, args.keep_versions) == (10.0, 1, 2, 3)
    assert (args.full_every, args.partial_depth, args.partial_sample) == (1, None, 0.05)


def test_a_default_changed_in_the_spec_changes_the_cli(monkeypatch):
    @dataclasses.dataclass
    class Changed(MiningSpec):
        k: int = option("candidates kept per query", 7)
        max_depth: int = option("deepest search", 9)

    monkeypatch.setattr(cli, "MiningSpec", Changed)
    args = _parse("mine", "--model", "m", "--corpus", "c.jsonl", "--queries", "p.jsonl", "--run-dir", "r")
    assert (args.k, args.max_depth) == (7, 9)
    assert "(default: 7)" in _subparser("mine").format_help()


def test_optional_floats_take_off_and_none():
    base = ("mine", "--model", "m", "--corpus", "c.jsonl", "--queries", "p.jsonl", "--run-dir", "r")
    assert _parse(*base, "--positive-margin", "off").positive_margin is None
    assert _parse(*base, "--positive-margin", "None", "--score-cap", "0.9").positive_margin is None
    assert _parse(*base, "--score-cap", "0.9").score_cap == 0.9
    assert flag_of(MiningSpec, "pairs") == "--queries" and flag_of(SidecarConfig, "keep_cache_models") == "--keep-cache"


# ---- C. bad options and input files: one line, status 2, nothing written, no model loaded -------------


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(Encoder, "from_pretrained", refuse)


def _tree(root: Path) -> dict[str, tuple]:
    """Every path under root with its kind, size and modification time: any write shows."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            stat = path.lstat()
            out[str(path.relative_to(root))] = (path.is_dir(), stat.st_size, stat.st_mtime_ns)
    return out


def _inputs(tmp: Path, data, tiny_export) -> dict[str, Path]:
    """The good inputs and one bad version of each, in `tmp`."""
    corpus, pairs = data
    bad = tmp / "bad"
    bad.mkdir()
    lines = corpus.read_text().splitlines()
    record = json.loads(lines[2])
    del record["_id"]
    (bad / "corpus.jsonl").write_text("\n".join(lines[:2] + [json.dumps(record)] + lines[3:]) + "\n")
    lines = pairs.read_text().splitlines()
    record = json.loads(lines[2])
    record["pos_ids"] = ["no-such-doc"]
    (bad / "pairs.jsonl").write_text("\n".join(lines[:2] + [json.dumps(record)]) + "\n")
    (bad / "malformed.jsonl").write_text(lines[0] + "\n{not json\n")
    (bad / "empty.jsonl").write_text("")
    (bad / "a_directory.jsonl").mkdir()
    (bad / "not_a_model").mkdir()
    (bad / "a_file").write_text("x")
    return {"corpus": corpus, "pairs": pairs, "model": tiny_export, "bad": bad}


# (case, arguments added to a good command line, what the message must contain); later flags win.
MINE_CASES = [
    ("k", ["--k", "0"], "--k must be >= 1"),
    ("batch_size", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("max_length", ["--max-length", "1"], "--max-length must be >= 2"),
    ("query_max_length", ["--query-max-length", "1"], "--query-max-length must be >= 2"),
    ("nprobe", ["--nprobe", "0"], "--nprobe must be >= 1"),
    ("hnsw_m", ["--hnsw-m", "0"], "--hnsw-m must be >= 1"),
    ("ef_search", ["--ef-search", "0"], "--ef-search must be >= 1"),
    ("nlist", ["--nlist", "0"], "--nlist must be >= 1"),
    ("recall_sample", ["--recall-sample", "0"], "--recall-sample must be >= 1"),
    ("block_rows", ["--block-rows", "0"], "--block-rows must be >= 1"),
    ("search_slack", ["--search-slack", "-1"], "--search-slack must be >= 0"),
    ("max_depth", ["--k", "50", "--max-depth", "49"], "--max-depth must be >= k (50)"),
    ("positive_margin_zero", ["--positive-margin", "0"], "--positive-margin must be > 0"),
    ("positive_margin_negative", ["--positive-margin", "-0.5"], "--positive-margin must be > 0"),
    ("score_cap_nan", ["--score-cap", "nan"], "--score-cap must be a finite number"),
    ("cache_max_gb_negative", ["--cache-max-gb", "-1"], "--cache-max-gb must be >= 0"),
    ("threads", ["--threads", "0"], "--threads must be >= 1"),
    ("not_a_number", ["--k", "many"], "argument --k: invalid int value: 'many'"),
    ("bad_choice", ["--index", "flat"], "argument --index: invalid choice: 'flat'"),
    ("model_missing", ["--model", "{bad}/no_such_model"], "no_such_model: model directory not found"),
    ("model_not_a_model", ["--model", "{bad}/not_a_model"], "not_a_model: not an encoder export"),
    ("model_package_missing", ["--model", "package:no_such_package_xyz"], "no_such_package_xyz"),
    ("corpus_missing", ["--corpus", "{bad}/no_such_corpus.jsonl"], "no_such_corpus.jsonl: corpus file not found"),
    ("corpus_empty", ["--corpus", "{bad}/empty.jsonl"], "empty.jsonl: empty corpus"),
    ("corpus_bad_record", ["--corpus", "{bad}/corpus.jsonl"], "bad/corpus.jsonl:3: field '_id'"),
    ("corpus_a_directory", ["--corpus", "{bad}/a_directory.jsonl"], "a_directory.jsonl: cannot read the corpus"),
    ("pairs_missing", ["--queries", "{bad}/no_such_pairs.jsonl"], "no_such_pairs.jsonl: training pairs file not found"),
    ("pairs_empty", ["--queries", "{bad}/empty.jsonl"], "empty.jsonl: no training pairs"),
    ("pairs_bad_record", ["--queries", "{bad}/pairs.jsonl"], "bad/pairs.jsonl:3: field 'pos_ids[0]'"),
    ("pairs_malformed", ["--queries", "{bad}/malformed.jsonl"], "malformed.jsonl:2: malformed JSON"),
    ("cache_dir_a_file", ["--cache-dir", "{bad}/a_file"], "cache directory"),
    ("cache_dir_under_a_file", ["--cache-dir", "{bad}/a_file/cache"], "a_file exists and is not a directory"),
]


def _mine_args(inputs, run, extra):
    args = ["mine", "--model", inputs["model"], "--corpus", inputs["corpus"], "--queries", inputs["pairs"],
            "--run-dir", run, "--launcher", "none", "--no-progress", "--block-rows", "64", "--k", "10"]
    return [str(a) for a in args] + [a.format(bad=inputs["bad"]) for a in extra]


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mining: error: "), captured.err
    assert captured.out == ""
    return lines[0]


def _main(args) -> int:
    try:
        return cli.main(args)
    except SystemExit as e:  # argparse's usage errors
        return e.code


@pytest.mark.parametrize("case, extra, message", MINE_CASES, ids=[c[0] for c in MINE_CASES])
def test_mine_rejects_bad_input_in_a_fresh_run_dir(case, extra, message, data, tiny_export, tmp_path, capsys,
                                                   no_model_loading):
    inputs = _inputs(tmp_path, data, tiny_export)
    run = tmp_path / "run"
    before = _tree(tmp_path)
    assert _main(_mine_args(inputs, run, extra)) == 2
    assert message in _one_error_line(capsys)
    assert not run.exists() and _tree(tmp_path) == before  # nothing created, anywhere


@pytest.fixture(scope="module")
def mined_run(data, tiny_export, tmp_path_factory):
    """A run directory in which `mine` already published v000001 and wrote spec.json."""
    run = tmp_path_factory.mktemp("mined") / "run"
    inputs = {"corpus": data[0], "pairs": data[1], "model": tiny_export, "bad": run}
    assert cli.main(_mine_args(inputs, run, [])) == 0
    assert NegativeStore(run).versions() == [1] and load_spec(run).k == 10
    return run


@pytest.mark.parametrize("case, extra, message", MINE_CASES, ids=[c[0] for c in MINE_CASES])
def test_mine_rejects_bad_input_and_leaves_an_existing_run_as_it_was(case, extra, message, data, tiny_export,
                                                                     mined_run, tmp_path, capsys, no_model_loading):
    inputs = _inputs(tmp_path, data, tiny_export)
    run = tmp_path / "run"
    shutil.copytree(mined_run, run)
    capsys.readouterr()
    before = _tree(tmp_path)
    assert _main(_mine_args(inputs, run, extra)) == 2
    assert message in _one_error_line(capsys)
    assert _tree(tmp_path) == before


def test_mine_rejects_a_run_dir_that_is_a_file(data, tiny_export, tmp_path, capsys, no_model_loading):
    inputs = _inputs(tmp_path, data, tiny_export)
    before = _tree(tmp_path)
    assert _main(_mine_args(inputs, inputs["bad"] / "a_file", [])) == 2
    assert "run directory" in _one_error_line(capsys) and _tree(tmp_path) == before


def test_the_good_command_line_of_these_cases_mines(data, tiny_export, tmp_path, capsys):
    """The control: without the bad part, the same command line publishes."""
    inputs = _inputs(tmp_path, data, tiny_export)
    assert cli.main(_mine_args(inputs, tmp_path / "run", [])) == 0
    assert NegativeStore(tmp_path / "run").versions() == [1]


# The sidecar: a run whose trainer has finished, so that a sidecar that accepts its inputs exits at once (0).
SIDECAR_CASES = [
    ("poll_seconds_zero", ["--poll-seconds", "0"], "--poll-seconds must be > 0"),
    ("poll_seconds_negative", ["--poll-seconds", "-1"], "--poll-seconds must be > 0"),
    ("every", ["--every", "0"], "--every must be >= 1"),
    ("keep_cache", ["--keep-cache", "0"], "--keep-cache must be >= 1"),
    ("keep_versions", ["--keep-versions", "0"], "--keep-versions must be >= 1"),
    ("full_every", ["--full-every", "0"], "--full-every must be >= 1"),
    ("partial_depth", ["--partial-depth", "0"], "--partial-depth must be >= 1"),
    ("partial_sample", ["--partial-sample", "1.5"], "--partial-sample must be in [0, 1]"),
    ("threads", ["--threads", "0"], "--threads must be >= 1"),
    ("not_a_number", ["--every", "often"], "argument --every: invalid int value: 'often'"),
]
# (case, change to spec.json, what the message must contain)
DELETE = "delete spec.json"
SPEC_CASES = [
    ("no_spec", DELETE, "spec.json not found"),
    ("spec_not_json", "{", "spec.json: not valid JSON"),
    ("spec_k_zero", {"k": 0}, "spec.json: k must be >= 1"),
    ("spec_unknown_field", {"kk": 1}, "spec.json: unknown fields ['kk']"),
    ("corpus_missing", {"corpus": "{bad}/no_such_corpus.jsonl"}, "no_such_corpus.jsonl: corpus file not found"),
    ("corpus_empty", {"corpus": "{bad}/empty.jsonl"}, "empty.jsonl: empty corpus"),
    ("corpus_bad_record", {"corpus": "{bad}/corpus.jsonl"}, "bad/corpus.jsonl:3: field '_id'"),
    ("pairs_missing", {"pairs": "{bad}/no_such_pairs.jsonl"}, "no_such_pairs.jsonl: training pairs file not found"),
    ("pairs_empty", {"pairs": "{bad}/empty.jsonl"}, "empty.jsonl: no training pairs"),
    ("pairs_bad_record", {"pairs": "{bad}/pairs.jsonl"}, "bad/pairs.jsonl:3: field 'pos_ids[0]'"),
    ("cache_dir_a_file", {"cache_dir": "{bad}/a_file"}, "cache directory"),
]


def _sidecar_run(tmp_path, data, tiny_export, spec_change: dict | str | None = None) -> tuple[Path, dict]:
    """A finished run with a good spec.json, changed by `spec_change`: fields to replace, a text to write
    instead, or DELETE."""
    inputs = _inputs(tmp_path, data, tiny_export)
    run = tmp_path / "run"
    save_spec(MiningSpec(corpus=str(inputs["corpus"]), pairs=str(inputs["pairs"]), k=10, block_rows=64), run)
    (run / "run.json").write_text(json.dumps({"status": "completed"}))
    spec_path = run / "mining" / "spec.json"
    if spec_change == DELETE:
        spec_path.unlink()
    elif isinstance(spec_change, str):
        spec_path.write_text(spec_change)
    elif spec_change:
        spec = json.loads(spec_path.read_text())
        spec.update({k: v.format(bad=inputs["bad"]) if isinstance(v, str) else v for k, v in spec_change.items()})
        spec_path.write_text(json.dumps(spec))
    return run, inputs


def _sidecar_args(run, extra=()):
    return ["sidecar", "--run-dir", str(run), "--stop-when-finished", "--poll-seconds", "0.01", "--no-progress",
            *extra]


@pytest.mark.parametrize("case, extra, message", SIDECAR_CASES, ids=[c[0] for c in SIDECAR_CASES])
def test_sidecar_rejects_bad_options(case, extra, message, data, tiny_export, tmp_path, capsys, no_model_loading):
    run, _ = _sidecar_run(tmp_path, data, tiny_export)
    before = _tree(tmp_path)
    assert _main(_sidecar_args(run, extra)) == 2
    assert message in _one_error_line(capsys) and _tree(tmp_path) == before


@pytest.mark.parametrize("case, change, message", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_sidecar_rejects_bad_inputs_at_start(case, change, message, data, tiny_export, tmp_path, capsys,
                                             no_model_loading):
    run, _ = _sidecar_run(tmp_path, data, tiny_export, change)
    before = _tree(tmp_path)
    assert _main(_sidecar_args(run)) == 2
    assert message in _one_error_line(capsys) and _tree(tmp_path) == before


def test_sidecar_rejects_a_run_dir_that_does_not_exist(tmp_path, capsys, no_model_loading):
    assert _main(_sidecar_args(tmp_path / "no_such_run")) == 2
    assert "spec.json not found" in _one_error_line(capsys) and not (tmp_path / "no_such_run").exists()


def test_sidecar_with_good_inputs_starts_and_stops_with_the_finished_run(data, tiny_export, tmp_path, capsys):
    """The control: the same run without the bad part is accepted (and, the run being finished, left at once)."""
    run, _ = _sidecar_run(tmp_path, data, tiny_export)
    assert _main(_sidecar_args(run)) == 0


def test_as_a_process_bad_input_is_one_line_and_status_2(data, tiny_export, tmp_path):
    """Through `python -m mining`: the exit status, and no traceback, for an option and for an input file."""
    corpus, pairs = data
    for args, message in (
        (["mine", "--model", tiny_export, "--corpus", corpus, "--queries", pairs, "--run-dir", tmp_path / "run",
          "--k", "0"], "--k must be >= 1"),
        (["mine", "--model", tiny_export, "--corpus", tmp_path / "none.jsonl", "--queries", pairs, "--run-dir",
          tmp_path / "run"], "corpus file not found"),
        (["sidecar", "--run-dir", tmp_path / "run", "--keep-versions", "0"], "--keep-versions must be >= 1"),
    ):
        result = subprocess.run(mining_command(*args), cwd=REPO, env=mining_env(), capture_output=True, text=True,
                                timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
        assert lines[0].startswith("mining: error: ") and not (tmp_path / "run").exists()
