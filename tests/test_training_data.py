"""The trainer's data: the step sampler (deterministic, exact resume, independent of DataLoader
workers, every row once per epoch) and where hard negatives come from (store window, `neg`, none)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from embedlib.negstore import NegativeStore
from embedlib.records import corpus_fingerprint, queries_fingerprint, read_corpus
from training.config import load_config
from training.data import RetrievalBatch, SamplerState, StepSampler, load_tasks, make_loader
from training.negatives_runtime import NegativesRuntime

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "training" / "recipes" / "quickstart.yaml"


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def two_task_config(tmp_path):
    """A retrieval task with `neg` texts and an STS task, 3 ranks' worth of tasks on small files."""
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [
        {"query": f"q{i}", "pos": [f"p{i}"], "neg": [f"n{i}a", f"n{i}b", f"n{i}c"]} for i in range(10)])
    sts = tmp_path / "sts.tsv"
    sts.write_text("score\tsentence1\tsentence2\n" + "".join(f"{i % 5}\ts{i}\tt{i}\n" for i in range(13)))
    return load_config(QUICKSTART, [
        f"run_dir={tmp_path / 'run'}", f"data.0.path={pairs}", "data.0.corpus=null", "data.0.batch_size=3",
        "data.0.num_negatives=2", "data.0.instruction='Q: '",
        f"data.1={{name: sts, kind: sts, path: {sts}, batch_size: 5}}", "seed=7"])


def _plans(tasks, config, world_size, rank, start_step, state, count):
    sampler = StepSampler(tasks, {d.name: d.weight for d in config.data}, world_size, rank, config.seed,
                          config.train.schedule_mode, start_step, state)
    iterator = iter(sampler)
    return [next(iterator) for _ in range(count)]


def test_sampler_covers_each_epoch_and_resumes_exactly(two_task_config):
    config = two_task_config
    tasks = load_tasks(config)
    world = 3
    straight = [_plans(tasks, config, world, r, 0, SamplerState.initial(tasks), 12) for r in range(world)]
    # Every rank computes every rank's slices: the ranks' rows of one task never overlap within an
    # epoch, and each epoch of the STS task (13 rows, 5 per batch) holds every row exactly once.
    sts_rows = [(row, epoch) for step in range(12) for r in range(world)
                for plan in [straight[r][step]] if tasks[plan.task_index].name == "sts"
                for row, epoch in zip(plan.rows, plan.epochs)]
    assert sorted(row for row, epoch in sts_rows if epoch == 0) == list(range(13))
    assert {plan.task_index for r in range(world) for plan in [straight[r][0]]} == {0, 1}  # every task each step
    # Resume from the state after step 5 (as a checkpoint holds it): the same plans follow.
    state = SamplerState(cursors=straight[0][5].cursors_after)
    for r in range(world):
        resumed = _plans(tasks, config, world, r, 6, state, 6)
        assert [(p.rows, p.epochs, p.task_index) for p in resumed] == \
               [(p.rows, p.epochs, p.task_index) for p in straight[r][6:]]
    # Deterministic for the seed: another sampler gives the same plans.
    again = _plans(tasks, config, world, 1, 0, SamplerState.initial(tasks), 12)
    assert [p.rows for p in again] == [p.rows for p in straight[1]]


def test_batches_do_not_depend_on_the_number_of_workers(two_task_config, tiny_bert_dir):
    from transformers import AutoTokenizer

    config = two_task_config
    tasks = load_tasks(config)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)

    def batches(workers: int) -> list:
        config.train.num_workers = workers
        loader = make_loader(tasks, tokenizer, config, 3, 2, 0, SamplerState.initial(tasks))
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == 5:
                break
        return out

    inline, parallel = batches(0), batches(2)
    for a, b in zip(inline, parallel):
        assert type(a) is type(b) and a.step == b.step and a.cursors_after == b.cursors_after
        for key in ("query", "passages", "first", "second"):
            if hasattr(a, key):
                assert all(torch.equal(getattr(a, key)[k], getattr(b, key)[k]) for k in getattr(a, key))
    retrieval = next(b for b in inline if isinstance(b, RetrievalBatch))
    texts = tokenizer.batch_decode(retrieval.query["input_ids"], skip_special_tokens=True)
    assert all(t.startswith("q :") for t in texts)  # the instruction prefix "Q: ", lower-cased by BERT
    assert retrieval.num_negatives == 2
    assert retrieval.passages["input_ids"].shape[0] == 3 * (1 + 2)


def test_negatives_from_the_store_window_skip_positives(tmp_path):
    corpus = read_corpus(REPO / "data" / "scifact" / "corpus.jsonl.gz")
    pairs = [{"query": f"question {i}", "pos_ids": [corpus[i].id], "neg": [] } for i in range(6)]
    pairs_path = _write_jsonl(tmp_path / "pairs.jsonl", pairs)
    run_dir = tmp_path / "run"
    # Candidates of query i: its positive first, then rows 100*i + 1, 100*i + 2, ... in rank order;
    # query 5 has only 12 candidates (11 after its positive): less than one window past the offset.
    candidates = np.array([[i] + [100 * i + j for j in range(1, 30)] for i in range(6)], dtype=np.int32)
    candidates[5, 12:] = -1
    scores = np.tile(np.linspace(1, 0, 30, dtype=np.float32), (6, 1))
    scores[5, 12:] = np.nan
    NegativeStore(run_dir).publish(
        candidates, scores, corpus_fingerprint=corpus_fingerprint(corpus),
        queries_fingerprint=queries_fingerprint([p["query"] for p in pairs]), model_path="m", model_step=0)
    config = load_config(QUICKSTART, [f"run_dir={run_dir}", f"data.0.path={pairs_path}", "data.0.num_negatives=4",
                                      "data.0.neg_offset=10"])
    (task,) = load_tasks(config)
    assert task.store.num_negatives == 4 and task.store.rank_offset == 10 and task.num_negatives == 0
    assert task.store.fingerprints == (queries_fingerprint([p["query"] for p in pairs]), corpus_fingerprint(corpus))
    runtime = NegativesRuntime(run_dir, [task], config.negatives, lookahead=0)
    runtime.start(0, None)  # picks the one version mined for these pairs and this corpus
    state = runtime.states[task.name]
    assert state.version == 1

    def negatives_at(row: int, window: int) -> list[str]:
        state.window[row] = window
        query, positive, negatives = task.example(row, 0, 0, tuple(state.negative_ranks(row)), version=1)
        assert query == f"question {row}" and positive == corpus[row].passage
        return negatives

    # The positive (rank 0) is removed, then the top 10 skipped: window 1 is ranks 11..14 of the candidates.
    assert negatives_at(2, 1) == [corpus[200 + j].passage for j in range(11, 15)]
    assert negatives_at(2, 2) == [corpus[200 + j].passage for j in range(15, 19)]
    # 29 candidates after the positive hold 4 full windows past the offset: window 5 starts over at 1.
    assert negatives_at(2, 5) == negatives_at(2, 1)
    # A list short of one window: what there is (rank 11), topped up with random passages, never the positive.
    topped = negatives_at(5, 1)
    assert len(topped) == 4 and topped[0] == corpus[511].passage and corpus[5].passage not in topped[1:]
    # A plan names its version: the sampler asks the runtime (the live state, not a copy) when it plans.
    sampler = StepSampler(tasks=[task], weights={task.name: 1.0}, world_size=1, rank=0, seed=0, mode="balanced",
                          start_step=0, state=SamplerState.initial([task]), negatives=runtime)
    state.window[:] = 3
    plan = next(iter(sampler))
    assert plan.negatives.version == 1
    assert plan.negatives.generations == tuple(int(state.generation[r]) for r in plan.rows)
    assert plan.negatives.ranks == tuple(tuple(range(18, 22)) for _ in plan.rows)
    runtime.close()


def test_without_store_or_neg_training_uses_in_batch_negatives(tmp_path):
    config = load_config(QUICKSTART, [f"run_dir={tmp_path / 'run'}", "data.0.limit=8"])
    (task,) = load_tasks(config)
    assert task.num_negatives == 0 and len(task) == 8
    assert task.example(0, 0, seed=0)[2] == []


def test_classification_positive_shares_the_label(tmp_path):
    texts = _write_jsonl(tmp_path / "labels.jsonl",
                         [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(8)])
    config = load_config(QUICKSTART, [f"run_dir={tmp_path / 'run'}",
                                      f"data.0={{name: cls, kind: classification, path: {texts}, num_negatives: 3}}"])
    (task,) = load_tasks(config)
    for row in range(8):
        query, positive, negatives = task.example(row, epoch=1, seed=0)
        label = int(query[1:]) % 2
        assert positive != query and int(positive[1:]) % 2 == label
        assert len(negatives) == 3 and all(int(n[1:]) % 2 != label for n in negatives)
