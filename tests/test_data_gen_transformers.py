"""The local transformers backend with a tiny randomly initialised causal LM (no download)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import minilm_path  # noqa: E402
from test_data_gen import make_docs, read_jsonl, write_corpus  # noqa: E402

from data_gen.__main__ import main  # noqa: E402
from data_gen.backends import LocalConfig, TransformersBackend  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}[{{ m.role }}] {{ m.content }} {% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A 2-layer Qwen2 with random weights and the MiniLM WordPiece tokenizer given a chat template."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    directory = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.eos_token = "[SEP]"
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.cls_token_id)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    return directory


def test_batched_left_padded_generation_matches_one_by_one(tiny_lm_dir):
    backend = TransformersBackend(LocalConfig(str(tiny_lm_dir), max_new_tokens=8, device="cpu"))
    assert backend.tokenizer.padding_side == "left"
    conversations = [[{"role": "user", "content": text}] for text in
                     ["short", "a somewhat longer prompt about coral reefs",
                      "the longest prompt of the four, about glaciers, sea level and the warming of the oceans",
                      "medium length prompt here"]]
    batched = backend.generate_batch(conversations)
    singles = [backend.generate_batch([c])[0] for c in conversations]
    assert [g.text for g in batched] == [g.text for g in singles]
    assert [g.completion_tokens for g in batched] == [g.completion_tokens for g in singles]
    assert all(0 < g.completion_tokens <= 8 for g in batched)
    assert len({g.prompt_tokens for g in batched}) == 4  # really different lengths, so really padded


def test_job_with_transformers_backend_counts_non_json_as_rejected(tmp_path, tiny_lm_dir):
    docs = make_docs(3)
    corpus = write_corpus(tmp_path / "corpus.jsonl", docs)
    code = main(["--corpus", str(corpus), "--output", str(tmp_path / "out"), "--backend", "transformers",
                 "--model", str(tiny_lm_dir), "--templates", "query_keyword,title", "--max-tokens", "6",
                 "--batch-size", "4", "--device", "cpu", "--no-progress"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert code == 0 and summary["status"] == "complete"
    # A random model writes word salad: every reply is rejected and counted, none crashes the job.
    assert summary["totals"] == {"written": 0, "rejected": 6, "failed": 0, "pending": 0}
    assert summary["this_run"]["rejected_by_reason"] == {"not_json": 6}
    assert summary["this_run"]["completion_tokens"] > 0
    outcomes = read_jsonl(tmp_path / "out" / "outcomes.jsonl")
    assert sorted((o["source_id"], o["template"]) for o in outcomes) == sorted(
        (d["_id"], t) for d in docs for t in ("query_keyword", "title"))
    assert summary["generator"]["backend"] == "transformers"
