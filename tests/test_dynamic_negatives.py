"""Dynamic hard negatives (training/negatives/rule.py): the rules on constructed scores, every
threshold at its boundary; window and per-negative ranks, also past the end of the candidate list and
for N ranks sharing a query; records (latest s, s0 from the store, stale plans dropped); adoptions start
every sample at its first window; checkpoints round trip; and 2 real gloo ranks that end with identical
state, equal to one process applying all their records."""
from __future__ import annotations

import io
import json
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.numpy import load as safetensors_load
from safetensors.numpy import save as safetensors_save

import dynneg_worker
from training.config import NegativesConfig
from training.negatives import DynamicNegativeState, StoreSpec, fit_ranks

f32 = np.float32


def rule_state(num_samples: int, num_negatives: int = 7, rank_offset: int = 10, sharing: int = 1,
               **options) -> DynamicNegativeState:
    """A state with the rule options `options` (config.NegativesConfig) for a data set with n, offset and N."""
    options = NegativesConfig(**options)
    spec = StoreSpec("d", ("q", "c"), num_samples, num_negatives, rank_offset, options.rule, sharing)
    return DynamicNegativeState(spec, options)


def record(state: DynamicNegativeState, samples, scores, step: int, store=None, generations=None) -> None:
    """state.record with live `scores`; `store`: the mining scores (default: none, NaN, so s0 falls back to
    the first live score)."""
    width = state.width
    store = np.full((len(samples), width), np.nan, np.float32) if store is None else store
    state.record(samples, scores, step, store, generations=generations)


def fitted(state: DynamicNegativeState, sample: int, num_candidates: int) -> list[int]:
    """The sample's ranks fitted to a candidate list of num_candidates, as a DataLoader worker fits them."""
    return list(fit_ranks(state.negative_ranks(sample), num_candidates, state.options.rule, state.width,
                          state.rank_offset))


def below(x) -> np.float32:
    return np.nextafter(f32(x), f32(-np.inf))


def above(x) -> np.float32:
    return np.nextafter(f32(x), f32(np.inf))


def window_state(cases: list[tuple[float, float]], **overrides) -> DynamicNegativeState:
    """One sample per (s0, s) case, set directly as if recorded."""
    state = rule_state(len(cases), num_negatives=2, **overrides)
    state.initial_score[:] = [c[0] for c in cases]
    state.score[:] = [c[1] for c in cases]
    return state


def stale_after_check(state: DynamicNegativeState) -> list[bool]:
    before = state.window.copy()
    state.check(100)
    return list(state.window > before)


# --- the window rule ------------------------------------------------------------------------------


def test_window_rule_ratio_boundary():
    s = f32(0.5)
    at = f32(1.15) * s  # exactly 1.15 * s in the rule's float32 arithmetic
    state = window_state([(at, s), (above(at), s), (below(at), s), (1.0, s)])
    assert stale_after_check(state) == [False, True, False, True]


def test_window_rule_ratio_is_configurable_and_strict():
    # 1.25 * 0.5 = 0.625 is exact in binary: the boundary does not depend on rounding.
    state = window_state([(0.625, 0.5), (above(0.625), 0.5), (0.58, 0.5)], stale_ratio=1.25)
    assert stale_after_check(state) == [False, True, False]  # 0.58 would be stale at the default 1.15


def test_window_rule_absolute_score_boundary():
    # s0 = 2 satisfies the ratio for every s here; only |s| < 0.8 decides.
    cases = [(2.0, f32(0.8)), (2.0, below(0.8)), (2.0, f32(-0.8)), (2.0, above(-0.8)), (2.0, -0.9), (2.0, 0.85)]
    assert stale_after_check(window_state(cases)) == [False, True, False, True, False, False]
    state = window_state([(2.0, 0.6), (2.0, 0.4)], stale_abs_max=0.5)
    assert stale_after_check(state) == [False, True]


def test_window_rule_negative_scores():
    # A negative s is below any positive s0 / 1.15: stale while |s| < 0.8. With s0 == s < 0 (one
    # observation), 1.15 * s < s holds too: negatives scoring below zero are not hard.
    state = window_state([(0.3, -0.1), (-0.1, -0.1), (0.1, 0.1), (-0.2, -0.1)])
    assert stale_after_check(state) == [True, True, False, False]


def test_window_rule_never_observed_samples_are_not_stale():
    state = window_state([(np.nan, np.nan), (0.9, np.nan), (np.nan, 0.1), (0.9, 0.1)])
    result = state.check(100)
    assert list(state.window) == [1, 1, 1, 2]
    assert (result.stale_samples, result.replaced_negatives, result.unobserved_samples) == (1, 2, 2)
    assert result.mean_score == pytest.approx(0.1)  # of the eligible samples, before the move
    assert result.eligible_samples == 1


def test_check_moves_stale_samples_to_the_next_window_and_forgets_their_scores():
    state = window_state([(0.9, 0.1), (0.5, 0.5)])
    state.version, state.version_model_step = 3, 40
    result = state.check(100)
    assert list(state.window) == [2, 1] and list(state.generation) == [1, 0]
    assert np.isnan(state.initial_score[0]) and np.isnan(state.score[0])
    assert (state.initial_score[1], state.score[1]) == (0.5, 0.5)
    assert result.record().flat("d") == {
        "negatives/d/eligible": 2, "negatives/d/stale": 1, "negatives/d/replaced": 2,
        "negatives/d/mean_score": pytest.approx(0.3), "negatives/d/mean_initial_score": pytest.approx(0.7),
        "negatives/d/ratio_q10": pytest.approx(0.1 / 0.9 + 0.1 * (1 - 0.1 / 0.9)),
        "negatives/d/ratio_q50": pytest.approx((0.1 / 0.9 + 1) / 2), "negatives/d/ratio_q90": pytest.approx(
            0.1 / 0.9 + 0.9 * (1 - 0.1 / 0.9)), "negatives/d/unobserved": 0, "negatives/d/version": 3,
        "negatives/d/export_age_steps": 60}
    json.dumps(result.record().flat("d"))  # JSON-ready
    state.check(200)
    assert list(state.window) == [2, 1]  # nothing observed since: nothing moves


# --- the per-negative rule ------------------------------------------------------------------------


def per_negative_state(slots: list[tuple[float, float]], **overrides) -> DynamicNegativeState:
    """One sample whose slot j has (s0_j, s_j) = slots[j]."""
    state = rule_state(1, num_negatives=len(slots), rank_offset=10, rule="per_negative", **overrides)
    state.slot_initial_score[0] = [c[0] for c in slots]
    state.slot_score[0] = [c[1] for c in slots]
    return state


def replaced_slots(state: DynamicNegativeState) -> list[bool]:
    before = state.slot_ranks.copy()
    state.check(100)
    return list(state.slot_ranks[0] != before[0])


def test_per_negative_ratio_boundary():
    s = f32(0.5)
    at = f32(1.2) * s
    assert replaced_slots(per_negative_state([(at, s), (above(at), s), (below(at), s)])) == [False, True, False]


def test_per_negative_max_score_boundary_is_not_absolute():
    # The ratio holds in every slot (s0 = 2); s < 0.7 decides, signed: a very negative s is stale.
    slots = [(2.0, f32(0.7)), (2.0, below(0.7)), (2.0, -0.95), (2.0, 0.75)]
    assert replaced_slots(per_negative_state(slots)) == [False, True, True, False]
    assert replaced_slots(per_negative_state([(2.0, 0.6)], per_negative_max_score=0.5)) == [False]


def test_per_negative_low_initial_score_boundary():
    # s above s0: the ratio never holds; only s0 < 0.4 decides.
    slots = [(f32(0.4), 0.9), (below(0.4), 0.9), (-0.3, 0.9), (np.nan, np.nan), (0.45, np.nan)]
    assert replaced_slots(per_negative_state(slots)) == [False, True, True, False, False]
    assert replaced_slots(per_negative_state([(0.45, 0.9)], per_negative_min_initial=0.5)) == [True]


def test_per_negative_replacement_takes_the_next_unused_ranks():
    state = per_negative_state([(0.9, 0.1), (0.9, 0.9), (0.9, 0.1), (0.9, 0.9)])
    assert list(state.negative_ranks(0)) == [10, 11, 12, 13]
    result = state.check(100)
    assert list(state.negative_ranks(0)) == [14, 11, 15, 13]
    assert (result.stale_samples, result.replaced_negatives) == (1, 2)
    assert np.isnan(state.slot_score[0, [0, 2]]).all() and list(state.slot_score[0, [1, 3]]) == [f32(0.9)] * 2
    state.slot_initial_score[0, 1], state.slot_score[0, 1] = 0.9, 0.1
    state.check(200)
    assert list(state.negative_ranks(0)) == [14, 16, 15, 13] and state.next_rank[0] == 17


# --- ranks --------------------------------------------------------------------------------------


def test_window_ranks_for_the_first_three_assignments():
    state = rule_state(1, num_negatives=3, rank_offset=10)
    for i, expected in [(1, [10, 11, 12]), (2, [13, 14, 15]), (3, [16, 17, 18])]:
        state.window[0] = i
        assert list(state.negative_ranks(0)) == expected  # [(i - 1) * n + 10, i * n + 10)
    state = rule_state(1, num_negatives=2, rank_offset=0)
    state.window[0] = 3
    assert list(state.negative_ranks(0)) == [4, 5]


def test_window_ranks_wrap_to_the_first_window_past_the_end():
    state = rule_state(1, num_negatives=3, rank_offset=10)
    # 17 candidates: full windows [10, 13) and [13, 16); rank 16 is never used.
    expected = {1: [10, 11, 12], 2: [13, 14, 15], 3: [10, 11, 12], 4: [13, 14, 15]}
    for i, ranks in expected.items():
        state.window[0] = i
        assert fitted(state, 0, 17) == ranks
        assert fitted(state, 0, 100) == [10 + 3 * (i - 1) + k for k in range(3)]
    state.window[0] = 2
    assert fitted(state, 0, 12) == [10, 11, -1]  # less than one window
    assert fitted(state, 0, 5) == [-1, -1, -1]


def test_a_window_shared_by_n_ranks_holds_n_times_n_ranks_and_moves_whole():
    from training.negatives import PlannedNegatives

    state = rule_state(1, num_negatives=2, rank_offset=10, sharing=3)
    assert state.width == 6 and list(state.negative_ranks(0)) == list(range(10, 16))
    plans = [PlannedNegatives(1, (tuple(state.negative_ranks(0)),), (0,), r, 3) for r in range(3)]
    slices = [list(p.ranks[0][p.own_slice(6)]) for p in plans]
    assert slices == [[10, 11], [12, 13], [14, 15]]  # each rank its own group of n, none repeated
    state.initial_score[0], state.score[0] = 0.9, 0.1
    result = state.check(100)
    assert result.replaced_negatives == 6 and list(state.negative_ranks(0)) == list(range(16, 22))
    assert fitted(state, 0, 21) == list(range(10, 16))  # one full window of 6 past the offset: wraps


def test_per_negative_ranks_wrap_without_repeating():
    state = per_negative_state([(np.nan, np.nan)] * 3)
    state.slot_ranks[0] = [10, 14, 16]
    assert fitted(state, 0, 20) == [10, 14, 16]
    assert fitted(state, 0, 15) == [10, 14, 11]  # 16 wraps to 11
    assert fitted(state, 0, 13) == [10, 11, -1]  # 16 -> 10 repeats slot 0
    assert fitted(state, 0, 10) == [-1, -1, -1]


# --- records ------------------------------------------------------------------------------------


def test_records_keep_the_first_score_as_s0_and_the_latest_as_s_in_step_order():
    state = rule_state(3, num_negatives=2)
    record(state, [0, 1], [[0.2, 0.4], [0.5, 0.5]], step=2)
    record(state, [0], torch.tensor([[0.5, 0.75]], dtype=torch.bfloat16), step=1)  # recorded late, earlier step
    record(state, [0, 0], [[0.1, 0.1], [0.0, 0.2]], step=3)  # twice in one call: the later row wins
    assert np.isnan(state.score).all()  # queued until sync
    state.sync()
    np.testing.assert_allclose(state.initial_score, [0.625, 0.5, np.nan])
    np.testing.assert_allclose(state.score, [0.1, 0.5, np.nan])


def test_records_of_replaced_negatives_are_dropped():
    state = rule_state(2, num_negatives=1)
    record(state, [0, 1], [[0.9], [0.9]], step=1, generations=state.generation[[0, 1]])
    record(state, [0, 1], [[0.1], [0.1]], step=2)
    state.sync()
    planned = state.generation.copy()
    assert state.check(2).stale_samples == 2
    record(state, [0, 1], [[0.3], [0.3]], step=3, generations=planned)  # planned before the check
    record(state, [1], [[0.5]], step=3, generations=state.generation[[1]])
    state.sync()
    assert np.isnan(state.score[0]) and (state.initial_score[1], state.score[1]) == (f32(0.5), f32(0.5))


def test_store_scores_give_s0_so_a_sample_trained_once_is_judged():
    state = rule_state(1, num_negatives=2)
    record(state, [0], [[0.2, 0.2]], step=1, store=[[0.5, 0.75]])
    state.sync()
    assert (state.initial_score[0], state.score[0]) == (f32(0.625), f32(0.2))
    result = state.check(1)
    assert (result.eligible_samples, result.stale_samples) == (1, 1)
    # A slot without a mined candidate (a random top-up) takes its first live score.
    record(state, [0], [[0.4, 0.2]], step=2, store=[[0.8, np.nan]])
    record(state, [0], [[0.1, 0.1]], step=3, store=[[0.8, np.nan]])
    state.sync()
    assert (state.initial_score[0], state.score[0]) == (f32(0.5), f32(0.1))


def test_per_negative_records_fill_each_slot():
    state = rule_state(1, rule="per_negative", num_negatives=2)
    record(state, [0], [[0.9, 0.3]], step=1)
    record(state, [0], [[0.5, 0.35]], step=2)
    state.sync()
    np.testing.assert_allclose(state.slot_initial_score[0], [0.9, 0.3])
    np.testing.assert_allclose(state.slot_score[0], [0.5, 0.35])
    state.check(2)  # slot 0: 1.2 * 0.5 < 0.9 and 0.5 < 0.7; slot 1: initial 0.3 < 0.4
    assert list(state.negative_ranks(0)) == [12, 13]


def test_bad_records_are_errors():
    state = rule_state(2, num_negatives=2)
    with pytest.raises(ValueError, match=r"shape \(1, 3\), expected \(1, 2\)"):
        record(state, [0], [[0.1, 0.2, 0.3]], step=1)
    with pytest.raises(IndexError, match=r"outside \[0, 2\)"):
        record(state, [2], [[0.1, 0.2]], step=1)
    with pytest.raises(ValueError, match="NaN"):
        record(state, [0], [[0.1, np.nan]], step=1)
    with pytest.raises(ValueError, match=r"n 0"):
        rule_state(1, num_negatives=0)


def test_assignment_changes_need_synced_state():
    state = rule_state(1, num_negatives=1)
    record(state, [0], [[0.5]], step=1)
    for call in (lambda: state.check(1), lambda: state.adopt_version(1, 0), state.state_dict):
        with pytest.raises(RuntimeError, match="sync"):
            call()


@pytest.mark.parametrize("rule", ["window", "per_negative"])
def test_adopting_a_version_starts_every_sample_at_its_first_window(rule):
    state = rule_state(2, num_negatives=2, rule=rule)
    first = [list(state.negative_ranks(i)) for i in range(2)]
    record(state, [0, 1], [[0.1, 0.1], [0.1, 0.1]], step=1, store=[[0.9, 0.9], [0.9, 0.9]])
    state.sync()
    state.check(1)
    assert all(list(state.negative_ranks(i)) != first[i] for i in range(2))  # both moved on
    assert state.adopt_version(4, model_step=200)
    assert [list(state.negative_ranks(i)) for i in range(2)] == first
    assert np.isnan(state.score).all() and np.isnan(state.initial_score).all()


def test_adopting_a_version_resets_scores_and_says_the_export_age():
    state = window_state([(0.9, 0.5)])
    state.window[0] = 3
    assert state.adopt_version(4, model_step=200)
    assert np.isnan(state.score[0]) and np.isnan(state.initial_score[0])
    assert state.window[0] == 1 and state.generation[0] == 1
    assert state.check(300).export_age_steps == 100
    assert not state.adopt_version(4, model_step=200)  # the version in use (after a resume): no change
    assert state.generation[0] == 1


def test_due_every_check_interval():
    state = rule_state(1, check_interval=100)
    assert [s for s in range(0, 301) if state.due(s)] == [100, 200, 300]
    state = rule_state(1, dynamic=False)
    assert not state.due(100)


# --- checkpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["window", "per_negative"])
@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_state_round_trip(rule, fmt):
    state = rule_state(5, num_negatives=2, rule=rule)
    record(state, [0, 3, 4], [[0.9, 0.1], [0.2, 0.1], [0.5, 0.3]], step=1)
    record(state, [0, 4], [[0.1, 0.1], [0.4, 0.3]], step=2)
    state.sync()
    state.check(2)
    state.adopt_version(2, 1)
    record(state, [1], [[0.3, 0.3]], step=3)
    state.sync()
    saved = state.state_dict()
    if fmt == "safetensors":
        loaded = safetensors_load(safetensors_save(saved))
    else:
        buffer = io.BytesIO()
        np.savez(buffer, **saved)
        buffer.seek(0)
        loaded = dict(np.load(buffer, allow_pickle=False))
    restored = rule_state(5, num_negatives=2, rule=rule)
    restored.load_state_dict(loaded)
    for key, value in restored.state_dict().items():
        np.testing.assert_array_equal(value, saved[key], err_msg=key)
    assert (restored.version, restored.version_model_step) == (2, 1)
    assert all(np.array_equal(restored.negative_ranks(i), state.negative_ranks(i)) for i in range(5))


def test_loading_another_layout_is_a_clear_error():
    saved = rule_state(5, num_negatives=2).state_dict()
    with pytest.raises(ValueError, match="samples is 5, this run has 6"):
        rule_state(6, num_negatives=2).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"negatives per query \(N ranks sharing a query x num_negatives\) is 2, "
                                         "this run has 3"):
        rule_state(5, num_negatives=3).load_state_dict(saved)
    with pytest.raises(ValueError, match="is 2, this run has 4"):  # the same n over two ranks sharing queries
        rule_state(5, num_negatives=2, sharing=2).load_state_dict(saved)
    with pytest.raises(ValueError, match="keys"):
        rule_state(5, rule="per_negative", num_negatives=2).load_state_dict(saved)
    bad = dict(saved, window=saved["window"].astype(np.int64))
    with pytest.raises(ValueError, match="'window' is int64"):
        rule_state(5, num_negatives=2).load_state_dict(bad)


# --- two real ranks -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gloo_ranks(tmp_path_factory):
    """One 2-rank process group runs the plan of both rules."""
    out_dir = tmp_path_factory.mktemp("dynneg")
    mp.start_processes(dynneg_worker.main, args=(2, free_port(), str(out_dir)), nprocs=2, start_method="spawn")
    return out_dir


@pytest.mark.parametrize("rule", dynneg_worker.RULES)
def test_two_gloo_ranks_equal_one_process(rule, gloo_ranks):
    reference, reference_results = dynneg_worker.run(dynneg_worker.plan(rule), rule, rank=None)
    expected = reference.state_dict()
    assert all(r["stale_samples"] > 0 for r in reference_results)  # the rule did move samples
    for rank in range(2):
        with np.load(gloo_ranks / f"{rule}_rank{rank}.npz", allow_pickle=False) as saved:
            assert set(saved.files) == set(expected)
            for key in expected:
                np.testing.assert_array_equal(saved[key], expected[key], err_msg=f"rank {rank}: {key}")
        assert json.loads((gloo_ranks / f"{rule}_rank{rank}.json").read_text()) == json.loads(json.dumps(reference_results))


# --- the store feed (rank 0's side, one process) ----------------------------------------------------

FINGERPRINTS = ("queries-fp", "corpus-fp")


def publish(run_dir, model_step: int, fingerprints=FINGERPRINTS) -> int:
    from embedlib.negstore import NegativeStore

    candidates = np.arange(12, dtype=np.int32).reshape(2, 6)
    scores = np.tile(np.linspace(1, 0, 6, dtype=np.float32), (2, 1))
    return NegativeStore(run_dir).publish(candidates, scores, queries_fingerprint=fingerprints[0],
                                          corpus_fingerprint=fingerprints[1], model_path="m", model_step=model_step)


def take_when_ready(feed, timeout: float = 30.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = feed.take()
        if found is not None or (feed._worker is None and feed._considered == feed.store.latest_version()):
            return found
        time.sleep(0.01)
    raise AssertionError("the feed never finished verifying")


def test_feed_starts_with_the_checkpoints_version_else_the_newest_sound_one(tmp_path, caplog):
    from training.negatives import VersionFeed

    run = tmp_path / "run"
    for step in (0, 10, 20):
        publish(run, step)
    feed = VersionFeed(run, {"task": FINGERPRINTS}, sidecar_timeout_s=60, poll_seconds=0)
    first = feed.first(restored=2)
    assert (first.version, first.model_step, first.tasks) == (2, 10, ("task",))
    assert take_when_ready(feed).version == 3  # newer than the checkpoint's: picked up by the first polls
    feed.close()

    publish(run, 30, fingerprints=("other", "corpus-fp"))  # mined for other queries
    (run / "negatives" / "v000003" / "scores.npy").write_bytes(b"damaged")
    feed = VersionFeed(run, {"task": FINGERPRINTS}, sidecar_timeout_s=60, poll_seconds=0)
    assert feed.first(restored=None).version == 2  # v4 is for other data, v3 damaged
    assert "skipping negatives v000004" in caplog.text and "skipping negatives v000003" in caplog.text
    feed.close()


def test_feed_never_blocks_skips_a_damaged_version_and_pins_what_plans_name(tmp_path, caplog):
    from embedlib.negstore import NegativeStore
    from training.negatives import VersionFeed

    run = tmp_path / "run"
    store = NegativeStore(run)
    publish(run, 0)
    feed = VersionFeed(run, {"task": FINGERPRINTS}, sidecar_timeout_s=60, poll_seconds=0)
    feed.pin(feed.first(restored=None), step=0, lookahead=2)
    assert feed.take() is None  # nothing new

    publish(run, 5)
    v3 = publish(run, 10)
    (run / "negatives" / "v000003" / "candidates.npy").write_bytes(b"x" * 10)  # the newest is damaged
    assert take_when_ready(feed) is None and "skipping negatives v000003" in caplog.text
    assert feed._considered == v3  # looked at once, then training goes on with the version in use

    v4 = publish(run, 15)
    announcement = take_when_ready(feed)
    assert announcement.version == v4
    feed.pin(announcement, step=7, lookahead=2)
    assert store.gc(keep=1) == [2, 3]  # v1 stays: plans made before step 7 may still name it
    feed.release(9)
    assert 1 in store.versions()
    feed.release(10)  # step 9's plan was the last made before the adoption
    assert store.gc(keep=1) == [1] and store.versions() == [v4]
    feed.close()


def test_feed_warns_once_when_the_sidecar_looks_dead_and_once_when_it_is_back(tmp_path, caplog):
    import time

    from embedlib.exports import publish_export
    from training.negatives import VersionFeed

    run = tmp_path / "run"
    publish(run, 0)
    feed = VersionFeed(run, {"task": FINGERPRINTS}, sidecar_timeout_s=0.2, poll_seconds=0)
    feed.first(restored=None)
    for step in (3, 6):
        publish_export(run, step, lambda tmp: None)
        feed.take()
    assert not feed.sidecar_dead  # the export of step 6 has not waited long yet
    time.sleep(0.3)
    for _ in range(3):
        feed.take()
    assert feed.sidecar_dead and caplog.text.count("looks dead") == 1
    publish(run, 6)
    take_when_ready(feed)
    assert not feed.sidecar_dead and caplog.text.count("is back") == 1
    feed.close()
