"""The trainer's data: the step sampler (deterministic, exact resume, independent of DataLoader
workers, every row once per epoch) and where hard negatives come from (store window, `neg`, none)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from embedlib.negstore import NegativeStore
from embedlib.records import corpus_fingerprint, queries_fingerprint, read_corpus
from training.config import load_config
from training.data import RetrievalBatch, SamplerState, StepSampler, load_tasks, make_loader, store_specs
from training.negatives import NegativesRuntime, StoreReader

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
    assert task.store.negatives_per_rank == 4 and task.store.rank_offset == 10 and task.num_negatives == 0
    assert task.store.fingerprints == (queries_fingerprint([p["query"] for p in pairs]), corpus_fingerprint(corpus))
    runtime = NegativesRuntime(run_dir, store_specs([task]), config.negatives, lookahead=0)
    runtime.start(0, None)  # picks the one version mined for these pairs and this corpus
    state = runtime.states[task.name]
    assert state.version == 1
    reader = StoreReader(run_dir)

    def negatives_at(row: int, window: int) -> list[str]:
        state.window[row] = window
        plan = runtime.plan(task.name, (row,))
        rows, store_scores = reader.window(task.store, plan, 0, row, task.positive_rows[row])
        expected_scores = [scores[row, list(candidates[row]).index(r)] if r >= 0 else np.nan for r in rows]
        np.testing.assert_array_equal(store_scores, np.float32(expected_scores))  # the mining scores travel too
        query, positive, negatives = task.example(row, 0, 0, rows)
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
    reader.close()
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


# --- the data cache: the same tasks, batches and fingerprints as the in-memory lists ---------------------


def _multi_task_config(tmp_path, run_dir: Path, data_cache: str):
    """The quickstart recipe's SciFact pairs (store negatives once a version is published), pairs with
    `neg` texts, STS and classification: every kind of task, on 4 ranks so that each trains every step."""
    scifact = REPO / "data" / "scifact"
    corpus = read_corpus(scifact / "corpus.jsonl.gz")
    with_neg = tmp_path / "with_neg.jsonl"
    if not with_neg.exists():
        _write_jsonl(with_neg, [{"query": f"claim {i}", "pos": [corpus[i].passage],
                                 "neg": [corpus[i + j].passage for j in range(1, 1 + i % 4)] or [corpus[-1].passage]}
                                for i in range(40)])
        (tmp_path / "sts.tsv").write_text("score\tsentence1\tsentence2\n" + "".join(
            f"{i % 5}\t{corpus[i].title}\t{corpus[i + 1].title}\n" for i in range(30)))
        _write_jsonl(tmp_path / "labels.jsonl", [{"text": corpus[i].text[:200], "label": ["x", 7, "y"][i % 3]}
                                                 for i in range(30)])
    return load_config(QUICKSTART, [
        f"run_dir={run_dir}", f"train.data_cache={data_cache}", "seed=3", "data.0.batch_size=4",
        f"data.1={{name: neg_texts, kind: retrieval, path: {with_neg}, batch_size: 3, num_negatives: 2, "
        f"instruction: 'I: '}}",
        f"data.2={{name: sts, kind: sts, path: {tmp_path / 'sts.tsv'}, batch_size: 5}}",
        f"data.3={{name: cls, kind: classification, path: {tmp_path / 'labels.jsonl'}, batch_size: 4, "
        "num_negatives: 2, limit: 25}"])


def _publish_scifact_store(run_dir: Path) -> None:
    """A store version for the quickstart pairs: 40 pseudo-random candidates per query."""
    from embedlib.records import read_pairs

    scifact = REPO / "data" / "scifact"
    corpus = read_corpus(scifact / "corpus.jsonl.gz")
    pairs = read_pairs(scifact / "pairs.train.jsonl.gz", {d.id: d for d in corpus})
    rng = np.random.default_rng(0)
    candidates = rng.integers(0, len(corpus), size=(len(pairs), 40)).astype(np.int32)
    scores = np.sort(rng.random((len(pairs), 40)).astype(np.float32))[:, ::-1].copy()
    NegativeStore(run_dir).publish(candidates, scores, corpus_fingerprint=corpus_fingerprint(corpus),
                                   queries_fingerprint=queries_fingerprint([p.query for p in pairs]),
                                   model_path="m", model_step=0)


def test_cached_tasks_give_the_batches_of_the_in_memory_lists(tmp_path, tiny_bert_dir):
    """Tasks over the data cache against the reference loader (train.data_cache=null), on the quickstart
    data: every example of every row, then 6 steps of tokenized batches on each of 4 ranks, store
    negatives from a published version included."""
    from transformers import AutoTokenizer

    from training.data import StepDataset

    run_dir = tmp_path / "run"
    _publish_scifact_store(run_dir)
    reference = load_tasks(_multi_task_config(tmp_path, run_dir, "null"))
    config = _multi_task_config(tmp_path, run_dir, "auto")
    cached = load_tasks(config)
    assert (run_dir / "data_cache").is_dir()
    assert [t.fingerprint for t in cached] == [t.fingerprint for t in reference]
    assert [len(t) for t in cached] == [len(t) for t in reference] == [607, 40, 30, 25]
    assert cached[0].store == reference[0].store and cached[0].store is not None
    assert (cached[0].num_negatives, cached[1].num_negatives) == (reference[0].num_negatives, 2)
    for ref, task in zip(reference, cached):
        for row in range(len(ref)):
            if ref.kind == "sts":
                assert (task.first[row], task.second[row], task.scores[row]) == \
                       (ref.first[row], ref.second[row], ref.scores[row])
            else:
                assert task.example(row, 1, 5) == ref.example(row, 1, 5)
    runtimes = []
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    steps = []
    for tasks in (reference, cached):
        runtime = NegativesRuntime(run_dir, store_specs(tasks), config.negatives, lookahead=0)
        runtime.start(0, None)
        runtimes.append(runtime)
        assert runtime.states["scifact"].version == 1
        dataset = StepDataset(tasks, tokenizer, 32, config.seed, StoreReader(run_dir))
        per_rank = []
        for rank in range(4):
            sampler = StepSampler(tasks, {d.name: d.weight for d in config.data}, 4, rank, config.seed,
                                  config.train.schedule_mode, 0, SamplerState.initial(tasks), runtime)
            plans = iter(sampler)
            per_rank.append([dataset[next(plans)] for _ in range(6)])
        steps.append(per_rank)
    for ref_rank, rank in zip(*steps):
        for a, b in zip(ref_rank, rank):
            assert type(a) is type(b) and (a.step, a.task, a.cursors_after) == (b.step, b.task, b.cursors_after)
            for key in ("query", "passages", "first", "second"):
                if hasattr(a, key):
                    assert all(torch.equal(getattr(a, key)[k], getattr(b, key)[k]) for k in getattr(a, key))
            if isinstance(a, RetrievalBatch):
                assert a.rows == b.rows and (a.store_negatives is None) == (b.store_negatives is None)
                if a.store_negatives is not None:
                    assert a.store_negatives.plan == b.store_negatives.plan
                    np.testing.assert_array_equal(a.store_negatives.store_scores, b.store_negatives.store_scores)
                assert (a.passage_labels is None) == (b.passage_labels is None)
                if a.passage_labels is not None:
                    assert torch.equal(a.passage_labels, b.passage_labels)
    assert any(b.store_negatives is not None for rank in steps[1] for b in rank if isinstance(b, RetrievalBatch))
    for runtime in runtimes:
        runtime.close()


def test_the_permutation_is_drawn_once_per_epoch(two_task_config):
    tasks = load_tasks(two_task_config)
    sampler = StepSampler(tasks, {"scifact": 1.0, "sts": 1.0}, 2, 0, 7, "balanced", 0, SamplerState.initial(tasks))
    for epoch in (0, 1, 0):
        first = sampler._permutation(1, epoch)
        assert first.dtype == np.int32
        assert np.array_equal(first, np.random.default_rng([7, 1, epoch]).permutation(13))
        assert sampler._permutation(1, epoch) is first  # not drawn again within the epoch


def test_a_resume_on_changed_data_is_refused(two_task_config, tmp_path):
    """The checkpoint holds each data set's fingerprint: other records (or another row count) are an
    error naming the data set; the same records under a new mtime or a rebuilt cache are not."""
    from training.config import ConfigError

    config = two_task_config
    tasks = load_tasks(config)
    saved = SamplerState.initial(tasks).to_dict()
    shutil.rmtree(Path(config.run_dir) / "data_cache")
    pairs = Path(config.data[0].path)
    os.utime(pairs, ns=(5, 5))
    assert SamplerState.from_dict(saved, load_tasks(config)).fingerprints == saved["data_fingerprints"]
    pairs.write_text(pairs.read_text().replace('"q3"', '"q3 changed"'))
    with pytest.raises(ConfigError, match=r"data set 'scifact' \(data.0\) is not the data the checkpoint"):
        SamplerState.from_dict(saved, load_tasks(config))
    config.data[1].limit = 12
    with pytest.raises(ConfigError, match=r"data set 'sts' \(data.1\)"):
        SamplerState.from_dict({**saved, "data_fingerprints": [load_tasks(config)[0].fingerprint,
                                                               saved["data_fingerprints"][1]]}, load_tasks(config))


def test_ranks_that_read_different_data_stop(two_task_config, monkeypatch):
    """A file rewritten between two ranks' starts gives them different fingerprints: the first collective
    after torch.distributed starts compares them and stops with one line instead of mixing the data."""
    import torch.distributed as dist

    from training.config import ConfigError
    from training.data import check_same_data

    tasks = load_tasks(two_task_config)
    others = [t.fingerprint for t in tasks]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)

    def gather(out, mine):
        out[0], out[1] = mine, others

    monkeypatch.setattr(dist, "all_gather_object", gather)
    check_same_data(tasks)  # the same data everywhere: nothing to say
    others[1] = "another version of sts.tsv"
    with pytest.raises(ConfigError, match=r"data set 'sts' \(data.1\) differs between ranks"):
        check_same_data(tasks)


def test_the_rule_replaces_a_window_trained_once_with_s0_from_the_store(tmp_path):
    """The runtime's loop on one process: a window trained once whose live score fell below its mining
    score / 1.15 moves to the next window at the next check; the new window's s0 is its own mining score;
    a newly adopted version starts every sample at its first window again."""
    corpus = read_corpus(REPO / "data" / "scifact" / "corpus.jsonl.gz")
    pairs = [{"query": f"question {i}", "pos_ids": [corpus[i].id]} for i in range(4)]
    pairs_path = _write_jsonl(tmp_path / "pairs.jsonl", pairs)
    run_dir = tmp_path / "run"
    candidates = np.array([[100 * (i + 1) + j for j in range(20)] for i in range(4)], dtype=np.int32)
    scores = np.tile(np.linspace(0.9, 0.5, 20, dtype=np.float32), (4, 1))
    fingerprints = dict(corpus_fingerprint=corpus_fingerprint(corpus),
                        queries_fingerprint=queries_fingerprint([p["query"] for p in pairs]), model_path="m")
    NegativeStore(run_dir).publish(candidates, scores, model_step=0, **fingerprints)
    config = load_config(QUICKSTART, [f"run_dir={run_dir}", f"data.0.path={pairs_path}", "data.0.num_negatives=2",
                                      "data.0.neg_offset=1", "negatives.check_interval=2"])
    (task,) = load_tasks(config)
    runtime = NegativesRuntime(run_dir, store_specs([task]), config.negatives, lookahead=0)
    runtime.start(0, None)
    reader = StoreReader(run_dir)

    def trained(rows, live: float):
        from training.negatives import BatchNegatives

        plan = runtime.plan(task.name, rows)
        store_scores = np.stack([reader.window(task.store, plan, i, r, task.positive_rows[r])[1]
                                 for i, r in enumerate(rows)])
        return plan, store_scores, BatchNegatives(task.name, rows, plan, store_scores), np.full((len(rows), 2), live)

    plan, store_scores, batch, live = trained((0, 1), live=0.5)
    np.testing.assert_array_equal(store_scores, scores[:2, 1:3])  # ranks 1 and 2 (offset 1)
    assert runtime.after_step(1, batch, live).figures() == {"negatives_version": {task.name: 1}}  # no check yet
    # Sample 0 fell (0.5 * 1.15 < 0.89), sample 1 trained again at its mining score: not stale.
    _, _, batch, _ = trained((1,), live=0.0)
    figures = runtime.after_step(2, batch, np.full((1, 2), 0.88)).figures()
    assert figures[f"negatives/{task.name}/eligible"] == 2 and figures[f"negatives/{task.name}/stale"] == 1
    assert figures[f"negatives/{task.name}/replaced"] == 2
    state = runtime.states[task.name]
    assert list(state.window) == [2, 1, 1, 1] and np.isnan(state.initial_score[0])
    plan, store_scores, batch, live = trained((0,), live=0.1)
    assert plan.ranks == ((3, 4),)  # the next window
    runtime.after_step(3, batch, live)
    state.sync()
    assert state.initial_score[0] == pytest.approx(scores[0, 3:5].mean())  # s0 of the new window, from the store
    # A new version (mined by a newer export): every sample starts at its first window again.
    NegativeStore(run_dir).publish(candidates[:, ::-1].copy(), scores, model_step=3, **fingerprints)
    runtime.feed.poll_seconds = 0
    for step in range(4, 400):
        if runtime.after_step(step, None, None).versions[task.name] == 2:
            break
    assert list(state.window) == [1, 1, 1, 1] and np.isnan(state.score).all()
    assert runtime.plan(task.name, (0,)).ranks == ((1, 2),)
    reader.close()
    runtime.close()


def test_ranks_sharing_queries_draw_the_same_rows_and_positives_and_their_own_negatives(tmp_path):
    """shared_queries: the ranks given a data set at a step hold the same rows and positives; store
    negatives are the r-th group of n of one window, pairs-file and classification negatives their own."""
    corpus = read_corpus(REPO / "data" / "scifact" / "corpus.jsonl.gz")
    with_neg = _write_jsonl(tmp_path / "neg.jsonl", [{"query": f"claim {i}", "pos": [corpus[i].passage],
                                                      "neg": [corpus[i + j].passage for j in range(1, 8)]}
                                                     for i in range(12)])
    labels = _write_jsonl(tmp_path / "labels.jsonl", [{"text": corpus[i].title, "label": "abc"[i % 3]}
                                                       for i in range(24)])
    config = load_config(QUICKSTART, [
        f"run_dir={tmp_path / 'run'}", "loss.cbb_negatives=shared_queries", "train.schedule_mode=random_task",
        "data.0.limit=12", "data.0.batch_size=4",
        f"data.1={{name: neg, kind: retrieval, path: {with_neg}, batch_size: 3, num_negatives: 2}}",
        f"data.2={{name: cls, kind: classification, path: {labels}, batch_size: 3, num_negatives: 2}}"])
    _publish_scifact_store(Path(config.run_dir))
    tasks = load_tasks(config, world_size=3)
    assert tasks[0].store.sharing_ranks == 3 and tasks[0].store.width == 3 * 3
    runtime = NegativesRuntime(config.run_dir, store_specs(tasks), config.negatives, lookahead=0)
    runtime.start(0, None)
    from training.data import shared_query_tasks

    seen = set()
    for step in range(12):
        plans = []
        for rank in range(3):
            sampler = StepSampler(tasks, {d.name: d.weight for d in config.data}, 3, rank, config.seed,
                                  config.train.schedule_mode, step, SamplerState.initial(tasks), runtime,
                                  shared=shared_query_tasks(config))
            plans.append(next(iter(sampler)))
        task = tasks[plans[0].task_index]
        seen.add(task.name)
        assert len({p.rows for p in plans}) == 1 and [p.slice_index for p in plans] == [0, 1, 2]
        for i, row in enumerate(plans[0].rows):
            if task.name == "scifact":
                windows = [p.negatives.ranks[i][p.negatives.own_slice(9)] for p in plans]
                assert sorted(r for w in windows for r in w) == list(range(10, 19))  # 9 distinct ranks
                examples = [task.example(row, 0, 0, np.arange(3) + 3 * p.slice_index, p.slice_index) for p in plans]
            else:
                examples = [task.example(row, 0, 0, slice_index=p.slice_index) for p in plans]
            assert len({e[1] for e in examples}) == 1  # one positive
            negatives = [n for e in examples for n in e[2]]
            assert len(set(negatives)) == len(negatives), (task.name, negatives)  # no negative twice
    assert seen == {"scifact", "neg", "cls"}
    runtime.close()
