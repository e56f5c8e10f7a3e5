"""Small real inputs for the mining tests: a SciFact slice and a tiny encoder export."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def scifact_slice(scifact_dir: Path, out_dir: Path, num_pairs: int = 40, num_docs: int = 300) -> tuple[Path, Path]:
    """The first `num_pairs` training pairs and a corpus of their positives plus other documents, in the
    bundled corpus's order, `num_docs` in all. Returns (corpus path, pairs path)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with gzip.open(scifact_dir / "pairs.train.jsonl.gz", "rt", encoding="utf-8") as f:
        pairs = [json.loads(line) for line, _ in zip(f, range(num_pairs))]
    with gzip.open(scifact_dir / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    wanted = {doc_id for pair in pairs for doc_id in pair["pos_ids"]}
    others = num_docs - len(wanted)
    keep = []
    for doc in docs:
        if doc["_id"] in wanted:
            keep.append(doc)
        elif others > 0:
            keep.append(doc)
            others -= 1
    corpus, pairs_path = out_dir / "corpus.jsonl", out_dir / "pairs.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in keep), encoding="utf-8")
    pairs_path.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    return corpus, pairs_path


def save_encoder(source: Path, out_dir: Path, seed: int | None = None) -> Path:
    """An encoder export (Encoder.save) of `source`; with a seed, its weights are perturbed (another model)."""
    import torch

    from embedlib.encoder import Encoder

    encoder = Encoder.from_pretrained(source, max_length=64)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in encoder.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    encoder.save(out_dir)
    return out_dir


def mining_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    return env


BIN = Path(sys.executable).parent
LAUNCHERS = {
    "none": [sys.executable],
    "mpiexec": [str(BIN / "mpiexec"), "-n", "2", sys.executable],
    "torchrun": [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"],
}


def mining_command(*args, launcher: str = "none") -> list[str]:
    """`python -m mining ARGS` (one thread per process, no progress bars) under a launcher of LAUNCHERS."""
    return [*LAUNCHERS[launcher], "-m", "mining", *map(str, args), "--threads", "1", "--no-progress"]


def run_mining(*args, launcher: str = "none", timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(mining_command(*args, launcher=launcher), cwd=REPO, env=mining_env(),
                          capture_output=True, text=True, timeout=timeout)
