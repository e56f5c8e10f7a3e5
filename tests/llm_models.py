"""Tiny random decoder-only models for the LLM-backbone tests: Qwen2 and Llama configs, saved as
*ForCausalLM with word-level tokenizers shaped like theirs (nothing is downloaded).

    qwen2: eos <|endoftext|>, which is also the pad token, no bos (as Qwen2/2.5/3 tokenizers)
    llama: bos <s> put before every text by the tokenizer's post-processor, eos </s>, no pad token
"""
from __future__ import annotations

from pathlib import Path

WORDS = ("the a cat dog sat on mat and ran far away hello world long short what where is are "
         "query passage instruct retrieve given find").split()
HIDDEN = 32


def build_tiny_decoder(directory: Path, family: str, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = {"qwen2": ["<unk>", "<|endoftext|>"], "llama": ["<unk>", "<s>", "</s>"]}[family]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if family == "qwen2":
        wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<|endoftext|>",
                                          pad_token="<|endoftext|>")
    else:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B:1",
                                                                 special_tokens=[("<s>", vocab["<s>"])])
        wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                          eos_token="</s>")
    wrapped.save_pretrained(directory)

    torch.manual_seed(seed)
    shape = dict(vocab_size=len(vocab), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape))
    model.save_pretrained(directory)
    return directory
