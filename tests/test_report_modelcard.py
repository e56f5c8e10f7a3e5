"""The model card (README.md) and prompts of an export: the card's evaluation figures are eval.jsonl's,
its facts are the run's (data set sizes, recipe and overrides, steps, loss), its usage snippets run and
give the model's embeddings, and `encode(q, prompt_name="query")` in sentence-transformers gives the
embedding of the instruction-prefixed query that training used. First on exports written by the same
library calls the trainer makes, then through the real trainer (2 CPU ranks)."""
from __future__ import annotations

import gzip
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from embedlib.encoder import Encoder, model_fingerprint
from embedlib.modelcard import (EXAMPLE_DOCUMENT, EXAMPLE_QUERY, dataset_facts, training_prompts,
                                write_model_card)
from report_runs import metrics_record, write_jsonl

REPO = Path(__file__).resolve().parents[1]
SCIFACT = REPO / "data" / "scifact"
INSTRUCTION = "Represent this question for retrieval: "
QUERIES = ["Aspirin lowers the risk of heart attacks.", "Stem cells divide."]


def scifact_pairs(path: Path, n: int) -> Path:
    with gzip.open(SCIFACT / "pairs.train.jsonl.gz", "rt", encoding="utf-8") as f:
        path.write_text("".join(line for _, line in zip(range(n), f)))
    return path


def card_run(root: Path, model: Path) -> Path:
    """A finished 4-step run as the trainer leaves it: retrieval pairs with a data-set instruction (10 of
    12 records trained: limit), STS pairs without one, evaluations at steps 2 and 4."""
    run = root / "run"
    run.mkdir(parents=True)
    pairs = scifact_pairs(root / "pairs.jsonl", 12)
    sts = root / "sts.tsv"
    sts.write_text("score\tsentence1\tsentence2\n" + "".join(f"{i % 5}\tsentence {i}\tsentence {i + 1}\n"
                                                           for i in range(7)))
    config = {"run_dir": str(run), "model": {"path": str(model), "max_length": 32},
              "data": [{"name": "scifact", "kind": "retrieval", "path": str(pairs), "corpus": None,
                        "batch_size": 4, "num_negatives": 0, "instruction": INSTRUCTION, "weight": 1.0, "limit": 10},
                       {"name": "stsb", "kind": "sts", "path": str(sts), "batch_size": 4, "weight": 1.0}],
              "loss": {"temperature": 0.02, "cbb_beta": 0.8}, "train": {"max_steps": 4},
              "evaluation": {"beir": str(root / "scifact-dev"), "split": "dev"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "run.json").write_text(json.dumps({
        "argv": ["--local_rank=0", "--config", "training/recipes/quickstart.yaml", f"run_dir={run}",
                 "train.max_steps=4", "data.0.limit=10"],
        "status": "completed", "world_size": 2, "ds_config": {"zero_optimization": {"stage": 3}},
        "versions": {"python": "3.11.7", "deepspeed": "0.19.8"}}))
    write_jsonl(run / "metrics.jsonl", [metrics_record(s, ("retrieval", "sts")) for s in range(1, 5)])
    write_jsonl(run / "eval.jsonl", [
        {"step": 2, "eval/ndcg@10": 0.123456789, "eval/recall@100": 0.5, "eval/mrr@10": 0.1, "eval/num_queries": 6},
        {"step": 4, "eval/ndcg@10": 0.2345678912, "eval/recall@100": 0.6666666666666666, "eval/mrr@10": 0.19876,
         "eval/num_queries": 6}])
    return run


def export(encoder: Encoder, run: Path, step: int) -> Path:
    """What training/export.py writes on rank 0: the model with its prompts, then its card."""
    directory = run / "exports" / f"step_{step:08d}"
    encoder.save(directory, prompts=training_prompts(dataset_facts(yaml.safe_load((run / "config.yaml").read_text()))))
    write_model_card(directory, run, step)
    return directory


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def figures_of(evaluation: dict) -> dict[str, float]:
    """An eval.jsonl record's figures as the card names them: "ndcg@10", ... (not the query count)."""
    return {k.removeprefix("eval/"): v for k, v in evaluation.items()
            if k.startswith("eval/") and k != "eval/num_queries"}


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


@pytest.mark.parametrize("pooling, output_dim", [("mean", None), ("cls", 48)])
def test_card_figures_facts_usage_and_query_prompt(tmp_path, tiny_bert_dir, pooling, output_dim):
    from sentence_transformers import SentenceTransformer

    run = card_run(tmp_path, tiny_bert_dir)
    encoder = Encoder.from_pretrained(tiny_bert_dir, pooling=pooling, output_dim=output_dim, max_length=32)
    directory = export(encoder, run, 4)
    card = (directory / "README.md").read_text()

    # The evaluation figures are eval.jsonl's latest, in the metadata exactly and in the table to 4 places.
    latest = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    expected = figures_of(latest)
    meta = front_matter(card)
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert {m["name"]: m["value"] for m in metrics} == expected
    assert {m["type"] for m in metrics} == {"ndcg_at_10", "recall_at_100", "mrr_at_10"}
    for name, value in expected.items():
        assert f"| {name} | {value:.4f} |" in card
    assert "at step 4\n" in card and "an earlier export" not in card
    assert meta["library_name"] == "sentence-transformers" and "dataset_size:17" in meta["tags"]  # 10 + 7

    # The run's facts.
    assert "scifact (retrieval, 10 pairs)" in card and "stsb (sts, 7 pairs)" in card
    assert f"* Instruction: {json.dumps(INSTRUCTION)} (10 samples)" in card
    assert "* Recipe: `training/recipes/quickstart.yaml`" in card and "    - `data.0.limit=10`" in card
    assert "* Steps: 4 of 4, 128 samples, world size 2, DeepSpeed ZeRO stage 3" in card
    final = metrics_record(4, ("retrieval", "sts"))
    assert f"* Final loss: {final['loss']:.4f} at step 4" in card
    assert f"- **Output Dimensionality:** {output_dim or 32} dimensions" in card
    assert f"- **Base model:** `{tiny_bert_dir}`" in card
    assert f"| 4 | {final['loss']:.4f} | 0.2346 | 0.6667 | 0.1988 |" in card  # training logs: ndcg, recall, mrr

    # The query prompt is the training instruction, and gives the trained query embedding.
    saved = json.loads((directory / "config_sentence_transformers.json").read_text())
    assert saved["prompts"] == {"document": "", "query": INSTRUCTION, "scifact": INSTRUCTION}
    assert saved["default_prompt_name"] is None  # documents are encoded as trained: without a prompt
    trained = encoder.encode([INSTRUCTION + q for q in QUERIES], show_progress=False)
    model = SentenceTransformer(str(directory), device="cpu")
    np.testing.assert_allclose(model.encode(QUERIES, prompt_name="query"), trained, atol=1e-5)
    assert not np.allclose(model.encode(QUERIES), trained, atol=1e-3)  # without it: another embedding

    # Both usage snippets run as printed and give the model's embeddings (the transformers one with the
    # pooling, projection and normalisation written out).
    blocks = python_blocks(card)
    assert len(blocks) == 2 and 'prompt_name="query"' in blocks[0]
    query = encoder.encode([INSTRUCTION + EXAMPLE_QUERY], show_progress=False)
    document = encoder.encode([EXAMPLE_DOCUMENT], show_progress=False)
    for code in blocks:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
        np.testing.assert_allclose(np.asarray(namespace["query_embeddings"]), query, atol=1e-5)
        np.testing.assert_allclose(np.asarray(namespace["document_embeddings"]), document, atol=1e-5)


def test_an_export_not_evaluated_shows_the_latest_earlier_evaluation(tmp_path, tiny_bert_dir):
    run = card_run(tmp_path, tiny_bert_dir)
    directory = export(Encoder.from_pretrained(tiny_bert_dir, max_length=32), run, 3)
    card = (directory / "README.md").read_text()
    meta = front_matter(card)
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert metrics[0] == {"type": "ndcg_at_10", "value": 0.123456789, "name": "ndcg@10"}  # nDCG@10 first
    assert [m["name"] for m in metrics] == ["ndcg@10", "recall@100", "mrr@10"]
    assert "at step 2 (an earlier export of this run; this export was not evaluated)" in card
    assert "* Steps: 3 of 4" in card

    # Rewriting the card (as the trainer does once an evaluation is logged) leaves the model's identity.
    before = model_fingerprint(directory)
    write_model_card(directory, run, 4)
    assert "at step 4\n" in (directory / "README.md").read_text() and model_fingerprint(directory) == before


def test_prompts_follow_the_instructions_the_texts_were_trained_with(tmp_path):
    generated = tmp_path / "generated.jsonl"
    records = ([{"query": f"q{i}", "pos": ["p"], "instruction": "A: "} for i in range(3)]
               + [{"query": "q3", "pos": ["p"], "prompt": "B: "}, {"query": "q4", "pos": ["p"]},
                  {"query": "q5", "pos": ["p"], "instruction": "B: "}])
    write_jsonl(generated, records)
    labelled = tmp_path / "labelled.jsonl"
    write_jsonl(labelled, [{"text": f"t{i}", "label": str(i % 2)} for i in range(4)])
    config = {"data": [{"name": "gen", "kind": "retrieval", "path": str(generated), "limit": 5},
                       {"name": "topics", "kind": "classification", "path": str(labelled), "instruction": "C: "}]}
    facts = dataset_facts(config)
    assert facts[0].instructions == {"A: ": 3, "B: ": 1, "": 1}  # limit 5: the sixth record is not trained on
    assert facts[1].instructions == {"C: ": 4} and facts[1].size == 4
    # "query": the instruction of most retrieval queries; a data set with one instruction also under its name.
    assert training_prompts(facts) == {"query": "A: ", "topics": "C: "}
    config["data"][0]["limit"] = None
    assert dataset_facts(config)[0].instructions == {"A: ": 3, "B: ": 2, "": 1}
    config["data"][1]["instruction"] = None
    assert training_prompts(dataset_facts(config)) == {"query": "A: "}
    config["data"][0]["instruction"] = "D: "  # the queries without their own instruction get the data set's
    assert training_prompts(dataset_facts(config)) == {"query": "A: "}
    assert dataset_facts(config)[0].instructions == {"A: ": 3, "B: ": 2, "D: ": 1}
    assert training_prompts(dataset_facts({"data": [{"name": "x", "kind": "retrieval", "path": str(labelled)}]})) == {}


# ---- through the real trainer ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _small_beir(directory: Path) -> Path:
    """Six dev queries of SciFact, their abstracts and 40 others."""
    directory.mkdir()
    queries = (SCIFACT / "queries.dev.jsonl").read_text().splitlines()[:6]
    ids = {json.loads(q)["_id"] for q in queries}
    qrels = [line for line in (SCIFACT / "qrels.dev.tsv").read_text().splitlines()[1:] if line.split("\t")[0] in ids]
    relevant = {line.split("\t")[1] for line in qrels}
    with gzip.open(SCIFACT / "corpus.jsonl.gz", "rt") as f:
        docs = list(f)
    kept = [d for d in docs if json.loads(d)["_id"] in relevant] + \
        [d for d in docs[:40] if json.loads(d)["_id"] not in relevant]
    (directory / "corpus.jsonl").write_text("".join(kept))
    (directory / "queries.dev.jsonl").write_text("\n".join(queries) + "\n")
    (directory / "qrels.dev.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(qrels) + "\n")
    return directory


@pytest.mark.slow  # about 35 s on a quiet 2-core machine, over a minute on a busy one
def test_the_trainers_exports_carry_their_card_and_prompt(tmp_path, tiny_bert_dir):
    from sentence_transformers import SentenceTransformer

    run = tmp_path / "run"
    pairs = scifact_pairs(tmp_path / "pairs.jsonl", 8)
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "training/main.py", "--config", "training/recipes/quickstart.yaml",
               f"run_dir={run}", f"model.path={tiny_bert_dir}", "model.max_length=32", f"data.0.path={pairs}",
               "data.0.corpus=null", "data.0.batch_size=4", "data.0.num_negatives=0",
               f"data.0.instruction={json.dumps(INSTRUCTION)}",
               "train.num_workers=0", "train.max_steps=4", "train.export_every=2", "train.save_every=0",
               "train.progress=false", f"evaluation.beir={_small_beir(tmp_path / 'beir')}", "evaluation.every=2",
               "evaluation.max_length=32"]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    log = (run / "logs" / "trainer.rank0.log").read_text()
    assert "no model card" not in log and "no prompts" not in log, log[-3000:]
    evaluations = {json.loads(line)["step"]: json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()}
    assert sorted(evaluations) == [2, 4]
    for step in (2, 4):  # each card shows its own export's evaluation: rewritten after it was logged
        directory = run / "exports" / f"step_{step:08d}"
        card = (directory / "README.md").read_text()
        metrics = front_matter(card)["model-index"][0]["results"][0]["metrics"]
        assert {m["name"]: m["value"] for m in metrics} == figures_of(evaluations[step])
        assert f"at step {step}\n" in card and f"* Steps: {step} of 4" in card
        assert "scifact (retrieval, 8 pairs)" in card
        assert f"    - `data.0.instruction={json.dumps(INSTRUCTION)}`" in card
    directory = run / "exports" / "step_00000004"
    saved = json.loads((directory / "config_sentence_transformers.json").read_text())
    assert saved["prompts"]["query"] == INSTRUCTION
    trained = Encoder.from_pretrained(directory).encode([INSTRUCTION + q for q in QUERIES], show_progress=False)
    st = SentenceTransformer(str(directory), device="cpu")
    np.testing.assert_allclose(st.encode(QUERIES, prompt_name="query"), trained, atol=1e-5)


def test_html_in_names_is_escaped_in_the_card(tmp_path, tiny_bert_dir):
    run = card_run(tmp_path, tiny_bert_dir)
    payload = '<img src=x onerror="alert(1)"><script>alert(2)</script>'
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"][0]["name"] = f"sci{payload}"
    config["data"][1]["path"] = str(tmp_path / "sts`<img src=x onerror=alert(1)>`.tsv")  # closes its code span
    config["optim"] = {"note": payload}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    Path(config["data"][1]["path"]).write_text((tmp_path / "sts.tsv").read_text())
    directory = export(Encoder.from_pretrained(tiny_bert_dir, max_length=32), run, 4)
    card = (directory / "README.md").read_text()
    body = card.split("\n---\n", 1)[1]  # the YAML metadata holds the name as data, not HTML
    outside_code = re.sub(r"(`+)(?:(?!\1).)*?\1", "", body)  # HTML in a code span is shown, not run
    assert "<script" not in outside_code and "<img" not in outside_code
    assert "sci&lt;img src=x" in body
