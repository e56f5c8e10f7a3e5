"""Rank processes for tests/test_cbb_shared.py: the paper's CBB (loss.cbb_negatives=shared_queries) on real
DeepSpeed ranks, through the trainer's own data path and step.

Each rank loads the tasks from files (a pairs file over a small corpus, a published negative-store version,
an STS file), takes its first batch from the trainer's loader (StepSampler, StepDataset, StoreReader, the
NegativesRuntime's plan), runs training.grad_cache.backward_step (plain or through the gradient cache) in a
DeepSpeed engine and reads every parameter's averaged gradient. Rank 0 then computes, in one process and
from the files alone, Conan-embedding's Eq. 3 for the queries of the step: each query against its positive
and the N x n hard negatives at ranks [offset, offset + N n) of its candidate list (its positives removed),
plus beta x CoSENT of the STS rank's pairs, and its gradient. The two must agree. Planted mistakes (ranks
drawing different queries, every rank taking the same slice of the negatives) must not.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cbb_worker import OUTPUT_DIM, _or_zeros, gradient_mismatch, load_encoder
from embedlib.encoder import tokenize
from embedlib.negstore import NegativeStore
from embedlib.records import read_corpus, read_pairs, read_scored_pairs
from training.loss import cosent, info_nce, truncate

MAX_LENGTH = 32
QUERIES, NEGATIVES, OFFSET = 3, 2, 1  # per step: queries per rank, n per rank, top candidates skipped


@dataclass
class Scenario:
    name: str
    weights: dict[str, float]  # data set -> schedule weight ("pairs": retrieval, "sts": STS)
    zero_stage: int = 2
    chunk_size: int | None = None
    overrides: list[str] = field(default_factory=list)
    mistake: str | None = None  # "different_queries" (the check bypassed), "different_queries_checked", "same_slice"


def scenarios(world_size: int) -> list[Scenario]:
    retrieval = {"pairs": 1.0}
    if world_size == 2:
        return [Scenario("shared", retrieval),
                Scenario("shared_grad_cache", retrieval, chunk_size=2),
                Scenario("shared_zero3_grad_cache", retrieval, zero_stage=3, chunk_size=2),
                Scenario("shared_in_batch_matryoshka", retrieval,
                         overrides=["loss.in_batch=true", f"loss.matryoshka_dims=[12,{OUTPUT_DIM}]"]),
                Scenario("different_queries", retrieval, mistake="different_queries"),
                Scenario("different_queries_checked", retrieval, mistake="different_queries_checked"),
                Scenario("same_slice", retrieval, mistake="same_slice")]
    return [Scenario("shared_with_sts", {"pairs": 2.0, "sts": 1.0}),
            Scenario("shared_with_sts_grad_cache", {"pairs": 2.0, "sts": 1.0}, chunk_size=2),
            Scenario("shared_three", retrieval),
            Scenario("same_slice_three", retrieval, mistake="same_slice")]


def config_for(data_dir: Path, scenario: Scenario):
    from training.config import load_config

    repo = Path(__file__).resolve().parents[1]
    overrides = [f"run_dir={data_dir / 'run'}", f"data.0.path={data_dir / 'pairs.jsonl'}",
                 f"data.0.corpus={data_dir / 'corpus.jsonl'}", "data.0.name=pairs",
                 f"data.0.batch_size={QUERIES}", f"data.0.num_negatives={NEGATIVES}", f"data.0.neg_offset={OFFSET}",
                 f"data.0.weight={scenario.weights['pairs']}", f"model.max_length={MAX_LENGTH}",
                 "train.num_workers=0", "train.data_cache=null", "loss.cbb_negatives=shared_queries", "seed=5",
                 *scenario.overrides]
    if "sts" in scenario.weights:
        overrides.append(f"data.1={{name: sts, kind: sts, path: {data_dir / 'sts.tsv'}, batch_size: 6, "
                         f"weight: {scenario.weights['sts']}}}")
    return load_config(repo / "training" / "recipes" / "quickstart.yaml", overrides)


def first_batch(data_dir: Path, scenario: Scenario, tokenizer, world_size: int, rank: int):
    """This rank's batch of step 0 from the trainer's loader (with the scenario's mistake planted)."""
    import training.data as data
    from training.data import SamplerState, load_tasks, make_loader, store_specs
    from training.negatives import NegativesRuntime

    config = config_for(data_dir, scenario)
    tasks = load_tasks(config, world_size)
    runtime = NegativesRuntime(config.run_dir, store_specs(tasks), config.negatives, lookahead=0)
    runtime.start(0, None)
    shared = data.shared_query_tasks
    if scenario.mistake and scenario.mistake.startswith("different_queries"):
        data.shared_query_tasks = lambda config: frozenset()  # each rank its own queries, the loss still shared
    try:
        batch = next(iter(make_loader(tasks, tokenizer, config, world_size, rank, 0, SamplerState.initial(tasks),
                                      runtime)))
    finally:
        data.shared_query_tasks = shared
    runtime.close()
    return config, batch


def run_scenario(model_dir: str, data_dir: Path, scenario: Scenario) -> dict | None:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from training import grad_cache, loss as loss_module
    from training.negatives import plan as plan_module

    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = load_encoder(model_dir)
    planted = {}
    if scenario.mistake == "same_slice":  # every rank takes the first group of n of each window
        planted["own_slice"] = plan_module.PlannedNegatives.own_slice
        plan_module.PlannedNegatives.own_slice = lambda self, width: slice(0, width // self.sharing_ranks)
    if scenario.mistake == "different_queries":  # the loss's own check bypassed: the gradient must tell
        planted["check_same_queries"] = loss_module._Layout.check_same_queries
        loss_module._Layout.check_same_queries = lambda self, keys, groups: None
    try:
        config, batch = first_batch(data_dir, scenario, model.tokenizer, world_size, rank)
    finally:
        if "own_slice" in planted:
            plan_module.PlannedNegatives.own_slice = planted["own_slice"]
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": scenario.zero_stage}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config=ds_config)
    kinds = ["sts" if name == "sts" else "retrieval" for name in batch.assignment]
    error = None
    try:
        out = grad_cache.backward_step(engine, batch, kinds, config.loss, scenario.chunk_size)
    except RuntimeError as e:  # the loss's check that ranks sharing queries hold the same ones
        error, out = str(e), None
    finally:
        if "check_same_queries" in planted:
            loss_module._Layout.check_same_queries = planted["check_same_queries"]
    grads = ({name: _or_zeros(safe_get_full_grad(p), p).clone() for name, p in engine.module.named_parameters()}
             if error is None else None)
    batches = [None] * world_size
    dist.all_gather_object(batches, {"task": batch.task, "rows": list(batch.rows),
                                     "value": None if out is None else out.value,
                                     "negative_scores": None if out is None or out.negative_scores is None
                                     else out.negative_scores.tolist()})
    del engine
    if rank != 0:
        return None
    if error is not None:
        return {"error": error, "parameters": 0, "mismatched": []}
    ref_value, ref_grads, ref_negative_scores = reference(model_dir, data_dir, config, batches)
    mismatched, worst, atol = gradient_mismatch(grads, ref_grads)
    own = next(b for b in batches if b["task"] == "pairs")
    return {"parameters": len(ref_grads), "mismatched": mismatched, "worst": worst, "atol": atol,
            "values": [b["value"] for b in batches], "reference_value": ref_value,
            "negative_scores": own["negative_scores"], "reference_negative_scores": ref_negative_scores,
            "rows": [b["rows"] for b in batches], "tasks": [b["task"] for b in batches]}


def reference(model_dir: str, data_dir: Path, config, batches: list[dict]):
    """Eq. 3 (+ beta CoSENT) in one process from the files, for the queries rank 0's data set trained:
    (value, gradient, each query's scores with its N x n negatives)."""
    model = load_encoder(model_dir)
    cfg = config.loss
    corpus = read_corpus(data_dir / "corpus.jsonl")
    pairs = read_pairs(data_dir / "pairs.jsonl", {d.id: d for d in corpus})
    row_of = {d.id: i for i, d in enumerate(corpus)}
    version = NegativeStore(data_dir / "run").open(1)
    retrieval_ranks = [b for b in batches if b["task"] == "pairs"]
    sharing = len(retrieval_ranks)
    rows = next(b["rows"] for b in batches if b["task"] == "pairs")
    width = sharing * NEGATIVES
    queries, positives, negatives = [], [], []
    for row in rows:
        queries.append(pairs[row].query)
        positives.append(pairs[row].pos[0])
        ids, _ = version.candidates(row)
        ids = [int(i) for i in ids if i not in {row_of[p] for p in pairs[row].pos_ids}]
        negatives += [corpus[i].passage for i in ids[OFFSET:OFFSET + width]]
    version.close()

    def encode(texts):
        return model(**tokenize(model.tokenizer, texts, MAX_LENGTH))

    q, p = encode(queries), encode(positives)
    y = encode(negatives).reshape(len(rows), width, -1)
    dims = cfg.matryoshka_dims or [OUTPUT_DIM]
    loss = torch.zeros(())
    for d in dims:
        qd, pd, yd = truncate(q, d), truncate(p, d), truncate(y, d)
        own = (qd * pd).sum(-1, keepdim=True)
        hard = torch.einsum("nd,nwd->nw", qd, yd)
        logits = torch.cat([own, hard] + ([_others(qd @ pd.T)] if cfg.in_batch else []), dim=1) / cfg.temperature
        loss = loss + (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean() / len(dims)
    sts_ranks = [b for b in batches if b["task"] == "sts"]
    for b in sts_ranks:
        scored = read_scored_pairs(data_dir / "sts.tsv")
        first = encode([scored[r].sentence1 for r in b["rows"]])
        second = encode([scored[r].sentence2 for r in b["rows"]])
        gold = torch.tensor([scored[r].score for r in b["rows"]], dtype=torch.float32)
        for d in dims:
            loss = loss + cfg.cbb_beta * cosent(truncate(first, d), truncate(second, d), gold, cfg.cosent_scale) \
                / len(sts_ranks) / len(dims)
    loss.backward()
    negative_scores = torch.einsum("nd,nwd->nw", q, y).detach().tolist()
    return loss.item(), {name: _or_zeros(p.grad, p) for name, p in model.named_parameters()}, negative_scores


def _others(scores: torch.Tensor) -> torch.Tensor:
    """[n, n - 1]: each query's scores with the other queries' positives."""
    n = len(scores)
    keep = ~torch.eye(n, dtype=torch.bool)
    return scores[keep].reshape(n, n - 1)


def main(rank: int, world_size: int, port: int, model_dir: str, data_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel("WARNING")
    deepspeed.init_distributed(dist_backend="gloo")
    results = {s.name: run_scenario(model_dir, Path(data_dir), s) for s in scenarios(world_size)}
    if rank == 0:
        Path(data_dir, f"results_{world_size}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def write_data(directory: Path, scifact: Path) -> Path:
    """A 60-passage corpus, 8 queries with one positive each, 20 ranked candidates per query in a published
    store version (the positive among them, at rank 3), 12 STS pairs."""
    import gzip

    directory.mkdir(parents=True, exist_ok=True)
    with gzip.open(scifact / "corpus.jsonl.gz", "rt") as f:
        docs = [json.loads(next(f)) for _ in range(60)]
    (directory / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    pairs = [{"query": f"claim {i}: {docs[i]['title']}", "pos_ids": [docs[i]["_id"]]} for i in range(8)]
    (directory / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    rng = np.random.default_rng(0)
    candidates = np.stack([np.insert(rng.permutation([j for j in range(60) if j != i])[:19], 3, i)
                           for i in range(8)]).astype(np.int32)
    scores = np.tile(np.linspace(0.9, 0.1, 20, dtype=np.float32), (8, 1))
    from embedlib.records import corpus_fingerprint, queries_fingerprint

    NegativeStore(directory / "run").publish(
        candidates, scores, corpus_fingerprint=corpus_fingerprint(read_corpus(directory / "corpus.jsonl")),
        queries_fingerprint=queries_fingerprint([p["query"] for p in pairs]), model_path="m", model_step=0)
    (directory / "sts.tsv").write_text("score\tsentence1\tsentence2\n" + "".join(
        f"{i % 5}\t{docs[i]['title']}\t{docs[i + 1]['title']}\n" for i in range(12)))
    return directory

