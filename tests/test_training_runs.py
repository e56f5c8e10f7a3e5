"""The trainer end to end: real launchers (deepspeed, torchrun), 2 CPU ranks over gloo, real DeepSpeed
ZeRO 1/2/3 on a tiny BERT and a slice of SciFact; preemption, resume equivalence, exports."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from embedlib.exports import list_exports
from training.checkpoint import list_checkpoints, tag_of
from training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICKSTART = REPO / "training" / "recipes" / "quickstart.yaml"
PROBES = ["Aspirin lowers the risk of heart attacks.", "Stem cells divide.", "A short query"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(launcher: str, run_dir: Path, model: Path, overrides: list[str], resume: bool = False) -> list[str]:
    port = str(_free_port())
    if launcher == "deepspeed":
        head = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port]
    else:
        head = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port]
    args = ["training/main.py", "--config", str(QUICKSTART), *(["--resume"] if resume else []),
            f"run_dir={run_dir}", f"model.path={model}", "model.max_length=32",
            "data.0.limit=8", "data.0.batch_size=4", "train.num_workers=0", "optim.lr=1e-3",
            "optim.warmup_steps=1", "optim.schedule=constant", "train.save_every=0", "train.export_every=0",
            *overrides]
    return head + args


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(launcher, run_dir, model, overrides, resume=False) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(launcher, run_dir, model, overrides, resume), cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _losses(run_dir: Path) -> list[float]:
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return [r["loss"] for r in records]


def _small_beir(directory: Path) -> Path:
    """Six dev queries of the bundled SciFact, their abstracts and 60 others, in BEIR layout."""
    import gzip

    scifact = REPO / "data" / "scifact"
    directory.mkdir()
    queries = (scifact / "queries.dev.jsonl").read_text().splitlines()[:6]
    ids = {json.loads(q)["_id"] for q in queries}
    qrels = [line for line in (scifact / "qrels.dev.tsv").read_text().splitlines()[1:] if line.split("\t")[0] in ids]
    relevant = {line.split("\t")[1] for line in qrels}
    with gzip.open(scifact / "corpus.jsonl.gz", "rt") as f:
        docs = [line for line in f]
    kept = [d for d in docs if json.loads(d)["_id"] in relevant] + [d for d in docs[:60] if json.loads(d)["_id"] not in relevant]
    (directory / "corpus.jsonl").write_text("".join(kept))
    (directory / "queries.dev.jsonl").write_text("\n".join(queries) + "\n")
    (directory / "qrels.dev.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(qrels) + "\n")
    return directory


def _assert_learns(losses: list[float]) -> None:
    # 2 ranks x 4 queries = the whole 8-query slice every step, so the loss should fall steadily.
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, losses


def test_zero1_with_the_deepspeed_launcher(tmp_path, tiny_bert_dir):
    run_dir = tmp_path / "run"
    result = _run("deepspeed", run_dir, tiny_bert_dir, ["deepspeed.config=ds_configs/zero1.json", "train.max_steps=6"])
    _assert_learns(_losses(run_dir))
    # The console is for a person: no rank's INFO lines, library warnings or loading bars (the launcher's
    # own INFO lines aside: scripts/launch.py passes it --log_level error); they are in each rank's log.
    trainer_lines = [line for line in result.stderr.splitlines() if "launch.py" not in line and "runner.py" not in line]
    for noise in (" INFO ", "Warning", "Loading weights", "Writing model shards", "adopts negatives"):
        assert not any(noise in line for line in trainer_lines), (noise, result.stderr[-3000:])
    for rank in (0, 1):
        log = (run_dir / "logs" / f"trainer.rank{rank}.log").read_text()
        assert " INFO training" in log or " INFO DeepSpeed" in log  # the detail is kept
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["final_step"] == 6 and record["world_size"] == 2
    assert record["ds_config"]["zero_optimization"]["stage"] == 1
    assert [step for step, _ in list_checkpoints(run_dir)] == [6]


@pytest.mark.slow
def test_zero2_preempted_and_resumed_equals_straight_run(tmp_path, tiny_bert_dir):
    """10 steps straight == k steps, SIGTERM (checkpoint at k), --resume, the remaining steps."""
    zero2 = ["deepspeed.config=ds_configs/zero2.json"]
    straight = tmp_path / "straight"
    _run("torchrun", straight, tiny_bert_dir, zero2 + ["train.max_steps=10"])
    expected = _losses(straight)
    _assert_learns(expected)

    # The same run with no end in sight (the LR schedule is constant, so max_steps changes nothing
    # else), stopped by SIGTERM to torchrun as a cluster would, once step 2 is logged.
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(_command("torchrun", interrupted, tiny_bert_dir, zero2 + ["train.max_steps=100000"]),
                               cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while len(read_metrics(interrupted)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    record = json.loads((interrupted / "run.json").read_text())
    assert record["status"] == "preempted", output[-5000:]
    stopped_at = record["final_step"]
    assert [step for step, _ in list_checkpoints(interrupted)] == [stopped_at]
    assert 2 <= stopped_at < 10, f"stopped at step {stopped_at}: the signal came too late to test resuming"

    # A save killed half way leaves a tag without complete.json: --resume must not trust it, and
    # the next save removes it.
    debris = interrupted / "checkpoints" / tag_of(stopped_at + 50)
    debris.mkdir()
    (debris / "mp_rank_00_model_states.pt").write_bytes(b"cut short")

    _run("torchrun", interrupted, tiny_bert_dir, zero2 + ["train.max_steps=10"], resume=True)
    assert _losses(interrupted) == expected  # exactly: same data, same dropout masks, same optimizer state
    record = json.loads((interrupted / "run.json").read_text())
    assert record["status"] == "completed" and record["start_step"] == stopped_at and record["final_step"] == 10
    assert not debris.exists() and [step for step, _ in list_checkpoints(interrupted)] == [stopped_at, 10]


def test_zero3_two_tasks_exports_load_in_transformers_and_sentence_transformers(tmp_path, tiny_bert_dir):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from embedlib.encoder import Encoder

    # Two tasks on two ranks: each step one rank trains retrieval (all 8 queries) and the other STS
    # (8 scored pairs), swapping every step, so ZeRO-3's collectives meet different batches.
    queries = [json.loads(line)["text"] for line in (REPO / "data" / "scifact" / "queries.train.jsonl").open()][:9]
    sts = tmp_path / "sts.tsv"
    sts.write_text("score\tsentence1\tsentence2\n" + "".join(f"{i % 5}\t{queries[i]}\t{queries[i + 1]}\n"
                                                               for i in range(8)))
    run_dir = tmp_path / "run"
    beir = _small_beir(tmp_path / "beir")
    _run("torchrun", run_dir, tiny_bert_dir, [
        "deepspeed.config=ds_configs/zero3.json", "train.max_steps=4", "train.export_every=2",
        "train.num_workers=1", "train.save_every=1", "train.keep_checkpoints=2", "data.0.batch_size=8",
        f"data.1={{name: sts, kind: sts, path: {sts}, batch_size: 8}}",
        f"evaluation.beir={beir}", "evaluation.every=2",
        f"evaluation.sets.0={{name: sts-dev, category: sts, path: {sts}}}"])
    _assert_learns(_losses(run_dir))
    records = read_metrics(run_dir)
    assert all(sorted(r["tasks"]) == ["scifact", "sts"] and {"loss/retrieval", "loss/sts"} <= r.keys()
               for r in records)
    assert records[0]["tasks"] != records[1]["tasks"]  # the schedule rotates tasks over ranks
    assert [e.step for e in list_exports(run_dir)] == [2, 4]
    assert [step for step, _ in list_checkpoints(run_dir)] == [3, 4]  # the newest keep_checkpoints
    assert json.loads((run_dir / "run.json").read_text())["exports"] == [2, 4]
    export = list_exports(run_dir)[-1].path

    # The dev evaluation during training scored each export (rank 0, under ZeRO-3) on each set (evaluation.beir's,
    # named after its directory, and the STS set), one row per set and step, as the CLI does.
    from embedlib.evaluation import evaluate_model
    evaluations = read_metrics(run_dir, "eval.jsonl")
    assert [(r["step"], r["set"], r["category"]) for r in evaluations] == [
        (2, "beir", "retrieval"), (2, "sts-dev", "sts"), (4, "beir", "retrieval"), (4, "sts-dev", "sts")]
    final = evaluate_model(export, beir=beir, split="dev", sts=sts, max_length=32, show_progress=False)
    assert evaluations[-2]["eval/ndcg@10"] == pytest.approx(final["retrieval"]["ndcg@10"], abs=1e-6)
    assert evaluations[-2]["eval/recall@100"] == pytest.approx(final["retrieval"]["recall@100"], abs=1e-6)
    assert evaluations[-1]["eval/spearman"] == pytest.approx(final["sts"]["spearman"], abs=1e-6)
    assert evaluations[-1]["main_score"] == evaluations[-1]["eval/spearman"]

    # The export holds exactly the trained weights: those DeepSpeed consolidates from the ZeRO-3
    # shards of the final checkpoint.
    trained = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag_of(4))
    exported = load_file(str(export / "model.safetensors"))
    for name, tensor in trained.items():
        assert torch.equal(exported[name.removeprefix("backbone.")], tensor), name
    initial = load_file(str(tiny_bert_dir / "model.safetensors"))
    assert not torch.equal(initial["embeddings.word_embeddings.weight"], exported["embeddings.word_embeddings.weight"])

    # The training-time encoder with those weights embeds as the export does in both libraries.
    encoder = Encoder.from_pretrained(tiny_bert_dir, max_length=32)
    encoder.load_state_dict(trained)
    reference = encoder.encode(PROBES, show_progress=False)
    st = SentenceTransformer(str(export), device="cpu")
    np.testing.assert_allclose(st.encode(PROBES), reference, atol=1e-5)
    tokenizer, model = AutoTokenizer.from_pretrained(export), AutoModel.from_pretrained(export)
    batch = tokenizer(PROBES, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    np.testing.assert_allclose(mean.numpy(), reference, atol=1e-5)


def test_a_loss_that_is_not_finite_stops_the_run(tmp_path, tiny_bert_dir):
    """A temperature this small overflows the logits: the trainer stops at step 1 with one line, exit 1,
    run.json "failed", and no export of a model that did not train (it used to log NaN and go on)."""
    run = tmp_path / "run"
    result = subprocess.run(_command("deepspeed", run, tiny_bert_dir, ["loss.temperature=1e-40", "train.max_steps=3"]),
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: step 1: the loss is nan"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "failed" and record["final_step"] is None
    assert read_metrics(run) == [] and list_exports(run) == []


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["gathered", "shared_queries"])
def test_dynamic_negatives_judge_samples_trained_once_and_resume_exactly(tmp_path, tiny_bert_dir, scifact_dir, mode):
    """A seeded 2-rank run on a store whose even rows were mined at score 1.0 and odd rows at 0.5: the check
    after step 2 judges the samples trained once each (s0 from the store: 2 steps x 8 queries, or 2 x 4
    when the two ranks share their queries), moves the even ones (live score below 1.0) and not the odd
    ones; a run stopped at step 3 and resumed gives the same losses, check figures and final state as the
    straight run."""
    from safetensors.numpy import load_file

    from embedlib.negstore import NegativeStore
    from embedlib.records import corpus_fingerprint, queries_fingerprint, read_corpus, read_pairs
    from mining_helpers import scifact_slice
    from training.negatives import STATE_FILENAME

    corpus_path, pairs_path = scifact_slice(scifact_dir, tmp_path / "data", num_pairs=32, num_docs=200)
    corpus = read_corpus(corpus_path)
    pairs = read_pairs(pairs_path, {d.id: d for d in corpus})
    rng = np.random.default_rng(0)
    candidates = np.stack([rng.permutation(len(corpus))[:30] for _ in pairs]).astype(np.int32)
    scores = np.where(np.arange(len(pairs))[:, None] % 2 == 0, 1.0, 0.5) * np.ones((1, 30))
    overrides = [f"data.0.path={pairs_path}", f"data.0.corpus={corpus_path}", "data.0.limit=32",
                 "data.0.num_negatives=3", "data.0.neg_offset=2", "negatives.check_interval=2",
                 # The tiny random model's cosines are all near 0.97: stale below s0 at all, whatever |s|.
                 "negatives.stale_ratio=1.0", "negatives.stale_abs_max=2.0", f"loss.cbb_negatives={mode}"]
    runs = {}
    for name in ("straight", "resumed"):
        run_dir = tmp_path / name
        NegativeStore(run_dir).publish(candidates, scores.astype(np.float32), model_path="m", model_step=0,
                                       corpus_fingerprint=corpus_fingerprint(corpus),
                                       queries_fingerprint=queries_fingerprint([p.query for p in pairs]))
        runs[name] = run_dir
    _run("torchrun", runs["straight"], tiny_bert_dir, overrides + ["train.max_steps=6"])
    _run("torchrun", runs["resumed"], tiny_bert_dir, overrides + ["train.max_steps=3"])
    _run("torchrun", runs["resumed"], tiny_bert_dir, overrides + ["train.max_steps=6"], resume=True)

    straight, resumed = read_metrics(runs["straight"]), read_metrics(runs["resumed"])
    first_check = straight[1]
    trained_once = 16 if mode == "gathered" else 8
    assert first_check["step"] == 2 and first_check["negatives/scifact/eligible"] == trained_once
    assert 0 < first_check["negatives/scifact/stale"] < trained_once
    width = 3 if mode == "gathered" else 2 * 3  # shared: a window of N x n, all of it replaced
    assert first_check["negatives/scifact/replaced"] == width * first_check["negatives/scifact/stale"]
    assert all(r["samples"] == (8 if mode == "gathered" else 4) for r in straight)
    assert first_check["negatives/scifact/mean_initial_score"] not in (None, 1.0, 0.5)  # a mix of both
    assert all("scores/scifact/negative" in r for r in straight)
    keys = [k for k in straight[1] if k.startswith(("negatives/", "scores/", "loss"))]
    assert [[r.get(k) for k in keys] for r in resumed] == [[r.get(k) for k in keys] for r in straight]
    state = {name: load_file(str(run / "checkpoints" / "step_00000006" / STATE_FILENAME)) for name, run in runs.items()}
    for key, value in state["straight"].items():
        np.testing.assert_array_equal(state["resumed"][key], value, err_msg=key)
    moved = np.flatnonzero(state["straight"]["scifact/window"] > 1)
    assert len(moved) and (moved % 2 == 0).all()  # only samples mined at 1.0 went stale
