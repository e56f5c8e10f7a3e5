"""python -m data_gen refuses bad input in one line before doing anything, and never shows a secret.

Every refusal: exit status 2, one line `error: ...` on stderr naming the option or the file, no output
directory, no request to the server, no model loaded. Secrets (the API key, the URL's user and password,
their basic-auth token) appear in no log line, message or file, even when the server quotes them back.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from llm_server import LLMServer  # noqa: E402
from test_data_gen import SECRET, make_docs, write_corpus  # noqa: E402

import data_gen.__main__ as cli  # noqa: E402
from data_gen.redact import Redactor, hide_url_credentials, split_credentials  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
USER, PASSWORD = "alice-7Hq", "s3cr@t-pw-71Zq"  # the @ is percent-encoded in the URL
RAW_PASSWORD = PASSWORD.replace("@", "%40")
BASIC_TOKEN = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def with_credentials(url: str) -> str:
    return url.replace("http://", f"http://{USER}:{RAW_PASSWORD}@")


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """Run in tmp_path with good inputs, and bad ones beside them for the cases to pick."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    write_corpus(tmp_path / "corpus.jsonl", make_docs(3))
    (tmp_path / "bad.jsonl").write_text('{"_id": "d1", "text": "fine"}\n{"_id": "d2", "title": 3, "text": "x"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    (tmp_path / "corpus.txt").write_text('{"_id": "d1", "text": "fine"}\n')
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "model-dir").mkdir()  # exists, so that the checks after it are reached

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli, "TransformersBackend", no_model)
    return tmp_path


def refused(capsys, argv: list[str]) -> str:
    """main(argv) must refuse: status 2 and exactly one line on stderr, which is returned."""
    code = cli.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert not captured.out
    return lines[0]


def argv_for(server: LLMServer, *extra: str) -> list[str]:
    # A failing check would let the job run against the server: quickly, thanks to these settings.
    return ["--corpus", "corpus.jsonl", "--output", "out", "--model", "test-model", "--base-url", server.url,
            "--no-progress", "--max-retries", "0", "--backoff-base", "0.01", "--backoff-max", "0.01", *extra]


BAD_INPUT = {  # id: (options, what the one line must name)
    "samples": (["--samples", "0"], "--samples"),
    "samples_not_int": (["--samples", "two"], "--samples"),
    "concurrency": (["--concurrency", "0"], "--concurrency"),
    "timeout_zero": (["--timeout", "0"], "--timeout"),
    "timeout_nan": (["--timeout", "nan"], "--timeout"),
    "max_retries": (["--max-retries", "-1"], "--max-retries"),
    "backoff_base": (["--backoff-base", "-1"], "--backoff-base"),
    "backoff_max": (["--backoff-max", "-1"], "--backoff-max"),
    "backoff_base_over_max": (["--backoff-base", "5", "--backoff-max", "1"], "--backoff-base 5 is more than"),
    "max_tokens": (["--max-tokens", "0"], "--max-tokens"),
    "max_passage_chars": (["--max-passage-chars", "0"], "--max-passage-chars"),
    "max_docs": (["--max-docs", "0"], "--max-docs"),
    "temperature": (["--temperature", "-0.1"], "--temperature"),
    "chunk_size": (["--chunk-size", "0"], "--chunk-size"),
    "flush_seconds": (["--flush-seconds", "0"], "--flush-seconds"),
    "max_failures": (["--max-failures", "-1"], "--max-failures"),
    "roundtrip_k": (["--roundtrip-k", "0"], "--roundtrip-k"),
    "batch_size": (["--batch-size", "0"], "--batch-size"),
    "num_shards": (["--num-shards", "0"], "--num-shards"),
    "shard": (["--shard", "2", "--num-shards", "2"], "--shard 2"),
    "unknown_template": (["--templates", "title,nope"], "no template 'nope'"),
    "no_templates": (["--templates", " , "], "--templates"),
    "template_twice": (["--templates", "title,title"], "--templates names 'title' twice"),
    "language": (["--language", "xx"], "--language xx"),
    "template_dir": (["--template-dir", "no-templates"], "--template-dir no-templates"),
    "base_url_no_scheme": (["--base-url", "localhost:8000/v1"], "--base-url"),
    "base_url_ftp": (["--base-url", "ftp://host/v1"], "--base-url"),
    "base_url_no_host": (["--base-url", "http:///v1"], "--base-url"),
    "base_url_bad_port": (["--base-url", "http://host:port/v1"], "--base-url"),
    "model_empty": (["--model", " "], "--model"),
    "roundtrip_encoder": (["--roundtrip-encoder", "no-encoder"], "--roundtrip-encoder no-encoder"),
    "roundtrip_encoder_not_a_model": (["--roundtrip-encoder", "model-dir"],
                                      "--roundtrip-encoder model-dir: not a model directory"),
    "dtype": (["--dtype", "int8"], "--dtype"),
    "transformers_model": (["--backend", "transformers", "--model", "no-model"], "--model no-model"),
    "device": (["--backend", "transformers", "--model", "model-dir", "--device", "cuda:99"], "--device cuda:99"),
    "device_nonsense": (["--backend", "transformers", "--model", "model-dir", "--device", "nonsense"], "--device"),
    "output_is_a_file": (["--output", "a-file"], "--output a-file"),
    "corpus_missing": (["--corpus", "missing.jsonl"], "--corpus missing.jsonl: no such file"),
    "corpus_is_a_directory": (["--corpus", "model-dir"], "--corpus model-dir"),
    "corpus_empty": (["--corpus", "empty.jsonl"], "error: empty.jsonl: no documents"),
    "corpus_blank_lines": (["--corpus", "blank.jsonl"], "error: blank.jsonl: no documents"),
    "corpus_bad_record": (["--corpus", "bad.jsonl"], "error: bad.jsonl:2: field 'title'"),
    "corpus_file_type": (["--corpus", "corpus.txt"], "error: corpus.txt: unsupported file type"),
    # The model would load last: a bad corpus must be found first.
    "corpus_bad_record_transformers": (["--backend", "transformers", "--model", "model-dir", "--corpus", "bad.jsonl"],
                                       "error: bad.jsonl:2: field 'title'"),
}


@pytest.mark.parametrize("options, named", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_refused_in_one_line_before_anything_happens(options, named, inputs, capsys):
    with LLMServer() as server:
        line = refused(capsys, argv_for(server, *options))
    assert named in line
    assert not (inputs / "out").exists() and not server.requests


def test_empty_corpus_command_writes_nothing(tmp_path):
    """The reviewer's case, as a user runs it."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("")
    result = subprocess.run([sys.executable, "-m", "data_gen", "--corpus", str(corpus), "--output",
                             str(tmp_path / "out"), "--model", "m", "--no-progress"],
                            capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert result.returncode == 2, result
    expected = f"error: {corpus}: no documents (the corpus is empty): nothing to generate from"
    assert result.stderr.splitlines() == [expected]
    assert not result.stdout and not (tmp_path / "out").exists()


def test_model_directory_that_is_no_model_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "corpus.jsonl", make_docs(2))
    (tmp_path / "model-dir").mkdir()
    line = refused(capsys, ["--corpus", "corpus.jsonl", "--output", "out", "--backend", "transformers",
                            "--model", "model-dir", "--device", "cpu", "--no-progress"])
    assert line.startswith("error: --model model-dir: ") and not (tmp_path / "out").exists()


def test_damaged_output_file_is_one_line(tmp_path, monkeypatch, capsys):
    """A line no kill can leave in the middle of an earlier run's file: the file and line, no traceback."""
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "corpus.jsonl", make_docs(2))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "pairs.jsonl").write_text("not json\n{}\n")
    with LLMServer() as server:
        line = refused(capsys, argv_for(server))
    assert line.startswith("error: out/pairs.jsonl:1: malformed JSON") and not server.requests


# ---------------------------------------------------------------------------------------------------
# Secrets


def all_written(out: Path, *streams: str) -> str:
    """Everything the run showed or wrote, as one text."""
    files = [p.read_bytes().decode("utf-8", errors="replace") for p in sorted(out.rglob("*")) if p.is_file()]
    return "\n".join([*streams, *files])


def run_command(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    return subprocess.run([sys.executable, "-m", "data_gen", *argv], capture_output=True, text=True, cwd=REPO,
                          env={**environ, **env}, timeout=120, check=False)


@pytest.mark.parametrize("auth", ["basic", "bearer"])
def test_401_echoing_the_credentials_leaks_none_of_them(auth, tmp_path):
    """The reviewer's leak: HTTP 401 from a server that quotes the credentials in its body."""
    corpus, out = write_corpus(tmp_path / "corpus.jsonl", make_docs(3)), tmp_path / "out"
    with LLMServer(script={"Study": ["401echo"]}) as server:
        base_url = server.url
        if auth == "basic":
            url, env = with_credentials(server.url), {}
            sent, secrets = f"Basic {BASIC_TOKEN}", [PASSWORD, RAW_PASSWORD, USER, BASIC_TOKEN, BASIC_TOKEN[:10]]
        else:
            url, env = server.url, {"OPENAI_API_KEY": SECRET}
            sent, secrets = f"Bearer {SECRET}", [SECRET, SECRET[:10]]
        result = run_command(["--corpus", str(corpus), "--output", str(out), "--model", "test-model",
                              "--base-url", url, "--concurrency", "1", "--no-progress"], env)
    assert server.requests and server.requests[0]["authorization"] == sent  # really sent, and echoed
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "aborted"
    assert f"{base_url}/chat/completions answered HTTP 401" in summary["message"]  # the URL, without them
    assert "invalid credentials" in summary["message"] and "***" in summary["message"]
    assert summary["generator"]["base_url"] == base_url
    shown = all_written(out, result.stdout, result.stderr)
    assert "HTTP 401" in result.stderr
    for secret in secrets:
        assert secret not in shown


def test_url_credentials_with_api_key_are_refused(tmp_path):
    corpus, out = write_corpus(tmp_path / "corpus.jsonl", make_docs(2)), tmp_path / "out"
    with LLMServer() as server:
        result = run_command(["--corpus", str(corpus), "--output", str(out), "--model", "test-model",
                              "--base-url", with_credentials(server.url), "--no-progress"], {"OPENAI_API_KEY": SECRET})
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: --base-url holds credentials") and "$OPENAI_API_KEY is set" in line
    assert not result.stdout and not out.exists() and not server.requests
    for secret in (PASSWORD, RAW_PASSWORD, SECRET):
        assert secret not in line


def test_url_credentials_are_sent_as_basic_auth(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    write_corpus(tmp_path / "corpus.jsonl", make_docs(2))
    with LLMServer() as server:
        base_url = server.url
        code = cli.main(argv_for(server, "--base-url", with_credentials(base_url), "--templates", "title"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert {r["authorization"] for r in server.requests} == {f"Basic {BASIC_TOKEN}"}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["generator"]["base_url"] == base_url
    shown = all_written(tmp_path / "out", captured.out, captured.err)
    for secret in (PASSWORD, RAW_PASSWORD, BASIC_TOKEN):
        assert secret not in shown


def test_connection_errors_show_no_credentials(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    write_corpus(tmp_path / "corpus.jsonl", make_docs(2))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://{USER}:{RAW_PASSWORD}@127.0.0.1:{port}/v1"
    code = cli.main(["--corpus", "corpus.jsonl", "--output", "out", "--model", "m", "--base-url", url,
                     "--templates", "title", "--max-retries", "0", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    outcomes = (tmp_path / "out" / "outcomes.jsonl").read_text()
    assert '"reason": "connection"' in outcomes and f"127.0.0.1:{port}" in outcomes
    shown = all_written(tmp_path / "out", captured.out, captured.err)
    for secret in (PASSWORD, RAW_PASSWORD, USER, BASIC_TOKEN):
        assert secret not in shown


def test_argparse_errors_do_not_quote_url_credentials(capsys):
    line = refused(capsys, ["--corpus", "c.jsonl", "--output", "out", "--model", "m",
                            "--bse-url", f"http://{USER}:{RAW_PASSWORD}@host/v1"])
    assert "unrecognized arguments: --bse-url http://host/v1" in line
    assert RAW_PASSWORD not in line and USER not in line


def test_api_key_that_cannot_be_a_header_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-abc\r\nX-Injected: 1")
    write_corpus(tmp_path / "corpus.jsonl", make_docs(2))
    with LLMServer() as server:
        line = refused(capsys, argv_for(server))
    assert "$OPENAI_API_KEY holds spaces or control characters" in line and "sk-abc" not in line
    assert not (tmp_path / "out").exists() and not server.requests


def test_redactor_masks_every_form_before_cutting():
    url = f"https://{USER}:{RAW_PASSWORD}@llm.example.org/v1"
    assert split_credentials(url) == ("https://llm.example.org/v1", USER, PASSWORD)
    assert split_credentials("http://h/v1") == ("http://h/v1", None, None)
    redact = Redactor(SECRET, url)
    text = f"key {SECRET}; auth Basic {BASIC_TOKEN} = {USER}:{PASSWORD}; raw {RAW_PASSWORD}; url {url}"
    cleaned = redact(text)
    for secret in (SECRET, BASIC_TOKEN, USER, PASSWORD, RAW_PASSWORD):
        assert secret not in cleaned
    assert "https://llm.example.org/v1" in cleaned
    assert hide_url_credentials("see http://a:b@c@h:1/x and HTTPS://u@h2") == "see http://h:1/x and HTTPS://h2"
