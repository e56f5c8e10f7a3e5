"""Decoder-only backbones (issue 16) on tiny random Qwen2 and Llama models: last-token pooling with eos
appended and left padding, LoRA (only adapters train; the merged export equals the adapter model and
loads in sentence-transformers), attention modes and the softmask schedule."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from embedlib.attention import attention_bias, future_weight, softmask_alpha
from embedlib.encoder import Encoder, is_decoder_model
from llm_models import build_tiny_decoder
from training.config import LoraConfig
from training.lora import add_lora, base_backbone, merge_lora, save_adapter, trainable_parameter_groups

TEXTS = ["the cat sat on the mat", "hello", "a dog ran far far away and the cat sat on the long mat",
         "short and long", "what is the world"]
FAMILIES = ["qwen2", "llama"]


@pytest.fixture(scope="module", params=FAMILIES)
def decoder_dir(request, tmp_path_factory):
    return build_tiny_decoder(tmp_path_factory.mktemp(request.param), request.param)


def last_hidden(encoder, batch):
    with torch.no_grad():
        return encoder.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


# ---- pooling --------------------------------------------------------------------------------------------


def test_tokenizer_appends_eos_once_and_pads_left(decoder_dir, tmp_path):
    encoder = Encoder.from_pretrained(decoder_dir)
    tokenizer = encoder.tokenizer
    assert encoder.config.pooling == "last_token" and tokenizer.padding_side == "left"
    ids = tokenizer("the cat")["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    if tokenizer.bos_token is not None:  # llama: its own bos is kept
        assert ids[0] == tokenizer.bos_token_id
    # Truncation keeps room for eos.
    cut = encoder.tokenize([TEXTS[2]], max_length=5)
    assert cut["input_ids"].shape[1] == 5 and cut["input_ids"][0, -1] == tokenizer.eos_token_id
    # Saved and loaded again (an export): still exactly one eos, still left padding.
    encoder.save(tmp_path / "export")
    again = Encoder.from_pretrained(tmp_path / "export").tokenizer
    assert again("the cat")["input_ids"] == ids and again.padding_side == "left"


def test_last_token_pooling_is_the_eos_state_under_left_and_right_padding(decoder_dir):
    encoder = Encoder.from_pretrained(decoder_dir)
    outputs = {}
    for side in ("left", "right"):
        encoder.tokenizer.padding_side = side
        batch = encoder.tokenize(TEXTS)
        hidden = last_hidden(encoder, batch)
        # The last attended position (qwen2 pads with eos itself, so the mask, not the id, finds it).
        eos_at = [int(torch.nonzero(m).max()) for m in batch["attention_mask"]]
        if side == "left":
            assert set(eos_at) == {batch["input_ids"].shape[1] - 1}
        expected = torch.nn.functional.normalize(hidden[torch.arange(len(TEXTS)), eos_at], dim=-1)
        with torch.no_grad():
            outputs[side] = encoder(**batch)
        torch.testing.assert_close(outputs[side], expected)
        for row, at in zip(batch["input_ids"], eos_at):
            assert row[at] == encoder.tokenizer.eos_token_id
    torch.testing.assert_close(outputs["left"], outputs["right"], atol=1e-5, rtol=1e-5)
    # encode() (the miner's and the evaluation's path) batches differently and agrees.
    encoder.tokenizer.padding_side = "left"
    np.testing.assert_allclose(encoder.encode(TEXTS, batch_size=2, show_progress=False), outputs["left"].numpy(),
                               atol=1e-5)


def test_decoder_detection(decoder_dir, tiny_bert_dir, tmp_path):
    assert is_decoder_model(decoder_dir) and not is_decoder_model(tiny_bert_dir)
    Encoder.from_pretrained(decoder_dir).save(tmp_path / "export")  # config.json now says Qwen2Model / LlamaModel
    assert is_decoder_model(tmp_path / "export")


# ---- LoRA -----------------------------------------------------------------------------------------------

LORA = LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])


def lora_encoder(decoder_dir, output_dim=None, seed=0):
    torch.manual_seed(seed)
    encoder = Encoder.from_pretrained(decoder_dir, output_dim=output_dim)
    add_lora(encoder, LORA)
    with torch.no_grad():  # peft starts B at zero (the adapter a no-op): make it do something
        for name, p in encoder.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.2)
    return encoder


def test_only_adapters_and_projection_train_and_get_gradients(decoder_dir):
    encoder = lora_encoder(decoder_dir, output_dim=16)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("projection.") for n in trainable)
    assert any(".lora_A." in n for n in trainable) and any(".lora_B." in n for n in trainable)
    in_optimizer = {id(p) for g in trainable_parameter_groups(encoder, 0.01) for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in encoder.named_parameters() if n in trainable}
    encoder.train()
    encoder(**encoder.tokenize(TEXTS)).sum().backward()
    for name, p in encoder.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_a_missing_target_module_is_a_config_error(decoder_dir):
    from training.config import ConfigError, ModelConfig
    from training.main import load_encoder

    m = ModelConfig(path=str(decoder_dir), lora=LoraConfig(target_modules=["no_such_proj"]))
    with pytest.raises(ConfigError, match="model.lora.target_modules: "):
        load_encoder(m, decoder_dir, {}, seed=0)


def test_gradient_checkpointing_with_lora_leaves_the_frozen_embedding_out_of_backward(decoder_dir):
    """Non-reentrant checkpointing needs no input that requires grad: peft's hook that makes the embedding's
    output require it is removed (under ZeRO-3 it kept the whole embedding gathered through the backward
    pass), and the adapters' gradients are those of the model without checkpointing."""
    from training.config import ModelConfig
    from training.main import load_encoder

    grads, embedded = {}, {}
    for checkpointing in (False, True):
        m = ModelConfig(path=str(decoder_dir), lora=LORA, gradient_checkpointing=checkpointing)
        encoder = load_encoder(m, decoder_dir, {}, seed=0)
        with torch.no_grad():  # B starts at zero: make A's gradients non-zero too
            for name, p in encoder.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
        encoder.train()
        batch = encoder.tokenize(TEXTS)
        embedded[checkpointing] = encoder.backbone.get_input_embeddings()(batch["input_ids"]).requires_grad
        encoder(**batch).pow(3).sum().backward()
        grads[checkpointing] = {n: p.grad for n, p in encoder.named_parameters() if p.requires_grad}
    assert embedded == {False: False, True: False}
    assert grads[True].keys() == grads[False].keys() and all(".lora_" in n for n in grads[True])
    for name, grad in grads[False].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[True][name], grad, atol=1e-6, rtol=1e-5)


def test_zero3_sizes_follow_the_hidden_size(decoder_dir, tmp_path, monkeypatch):
    from training.config import build_ds_config, load_config

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # the recipe names its DeepSpeed JSON relative to the repository
    recipe = repo / "training" / "recipes" / "llm_lora.yaml"

    def zero3(model_dir, *overrides) -> dict:
        config = load_config(recipe, [f"model.path={model_dir}", *overrides])
        return build_ds_config(config, world_size=2, has_gpu=False)["zero_optimization"]

    sizes = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_max_reuse_distance")
    # The tiny model (hidden 32): buckets at their floor of 2**20 elements, parameters under 320 elements whole.
    tiny = zero3(decoder_dir)
    assert [tiny[k] for k in sizes] == [1 << 20] * 3 and tiny["stage3_param_persistence_threshold"] == 320
    assert tiny["stage3_max_live_parameters"] == 16 << 20
    # A 7B-class hidden size: h*h, not DeepSpeed's 5e8-element gradient bucket.
    large = tmp_path / "large"
    large.mkdir()
    (large / "config.json").write_text(json.dumps({"hidden_size": 3584}))
    big = zero3(large)
    assert [big[k] for k in sizes] == [3584 * 3584] * 3 and big["stage3_param_persistence_threshold"] == 35840
    assert big["stage3_max_live_parameters"] == 16 * 3584 * 3584
    # What the JSON sets is kept; without a readable model DeepSpeed's defaults stay (no "auto" reaches it).
    ds = json.loads((repo / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["reduce_bucket_size"] = 12345
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    own = zero3(large, f"deepspeed.config={tmp_path / 'ds.json'}")
    assert own["reduce_bucket_size"] == 12345 and own["stage3_prefetch_bucket_size"] == 3584 * 3584
    unknown = zero3(tmp_path / "missing")
    assert not any(k in unknown for k in (*sizes, "stage3_param_persistence_threshold", "stage3_max_live_parameters"))


@pytest.mark.parametrize("output_dim", [None, 16])
def test_merged_export_equals_adapter_model_and_loads_in_sentence_transformers(decoder_dir, tmp_path, output_dim):
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    encoder = lora_encoder(decoder_dir, output_dim).eval()
    ours = encoder.encode(TEXTS, batch_size=2, show_progress=False)
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    export = tmp_path / "export"
    plain = Encoder(base_backbone(encoder), encoder.tokenizer, encoder.config, encoder.projection)
    plain.save(export, state_dict=merge_lora(state, LORA), prompts={"query": "instruct retrieve "})
    save_adapter(encoder, state, export / "adapter")

    saved = json.loads((export / "config.json").read_text())
    assert not any("lora" in k for k in AutoModel.from_pretrained(export).state_dict())
    assert saved["model_type"] in FAMILIES
    merged = Encoder.from_pretrained(export)
    np.testing.assert_allclose(merged.encode(TEXTS, batch_size=2, show_progress=False), ours, atol=1e-5)
    st = SentenceTransformer(str(export), device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS, batch_size=2), ours, atol=1e-5)
    # The query prompt goes before queries only.
    with_prompt = st.encode(TEXTS[:1], prompt_name="query")
    np.testing.assert_allclose(with_prompt, encoder.encode(["instruct retrieve " + TEXTS[0]], show_progress=False),
                               atol=1e-5)

    # The adapter alone, on the base model, gives the same backbone states.
    base = AutoModel.from_pretrained(decoder_dir)
    adapted = PeftModel.from_pretrained(base, export / "adapter").eval()
    batch = encoder.tokenize(TEXTS)
    with torch.no_grad():
        a = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        b = encoder.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- attention ------------------------------------------------------------------------------------------


def test_softmask_values_at_0_half_and_tau():
    tau = 100
    assert softmask_alpha(0, tau) == 0.0
    assert softmask_alpha(tau // 2, tau) == 0.5
    assert softmask_alpha(tau, tau) == 1.0
    assert softmask_alpha(3 * tau, tau) == 1.0
    assert future_weight("causal", 50, tau) == 0.0 and future_weight("bidirectional", 0, tau) == 1.0
    # The schedule is a function of the step alone: a resumed run (step from its checkpoint) continues it.
    assert future_weight("softmask", 37, tau) == softmask_alpha(37, tau) == 0.37


def test_attention_bias_values():
    mask = torch.tensor([[0, 1, 1]])  # left padded
    lowest = torch.finfo(torch.float32).min
    half = attention_bias(mask, 0.5, torch.float32)[0, 0]
    assert half.shape == (3, 3)
    assert half[1, 0] == lowest and half[2, 0] == lowest  # padding key
    assert half[2, 1] == 0 and half[1, 1] == 0  # past and self
    assert half[1, 2] == pytest.approx(np.log(0.5))  # future, weighted
    assert attention_bias(mask, 0.0, torch.float32)[0, 0, 1, 2] == lowest  # alpha 0: causal
    assert attention_bias(mask, 1.0, torch.float32)[0, 0, 1, 2] == 0  # alpha 1: bidirectional


def test_attention_modes_on_the_backbone(decoder_dir):
    encoder = Encoder.from_pretrained(decoder_dir).eval()
    batch = encoder.tokenize(TEXTS)
    with torch.no_grad():
        causal = encoder(**batch)
        encoder.future_weight = 0.0  # softmask at step 0: the 4D mask path gives the causal model
        at_zero = encoder(**batch)
        encoder.future_weight = 1.0
        bidirectional = encoder(**batch)
        encoder.future_weight = 0.5
        half = encoder(**batch)
    torch.testing.assert_close(at_zero, causal, atol=1e-5, rtol=1e-5)
    # The last token sees everything in every mode, but earlier tokens (and so later layers) change.
    assert (bidirectional - causal).abs().max() > 1e-3
    assert (half - causal).abs().max() > 1e-4 and (half - bidirectional).abs().max() > 1e-4
    # Padding still does not matter with a 4D mask.
    encoder.future_weight = 1.0
    with torch.no_grad():
        alone = torch.cat([encoder(**encoder.tokenize([t])) for t in TEXTS])
    torch.testing.assert_close(alone, bidirectional, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_export_keeps_the_attention(decoder_dir, tmp_path, weight):
    from sentence_transformers import SentenceTransformer

    encoder = Encoder.from_pretrained(decoder_dir).eval()
    encoder.future_weight = weight
    ours = encoder.encode(TEXTS, batch_size=2, show_progress=False)
    encoder.save(tmp_path / "export")
    reloaded = Encoder.from_pretrained(tmp_path / "export")
    np.testing.assert_allclose(reloaded.encode(TEXTS, batch_size=2, show_progress=False), ours, atol=1e-5)
    if weight == 1.0:  # bidirectional: config.json says is_causal false, which transformers itself honours
        assert reloaded.future_weight is None and reloaded.backbone.config.is_causal is False
        theirs = SentenceTransformer(str(tmp_path / "export"), device="cpu").encode(TEXTS, batch_size=2)
        np.testing.assert_allclose(theirs, ours, atol=1e-5)
        alone = np.concatenate([reloaded.encode([t], show_progress=False) for t in TEXTS])  # no padding at all
        np.testing.assert_allclose(alone, ours, atol=1e-5)
    else:
        assert reloaded.future_weight == 0.5
