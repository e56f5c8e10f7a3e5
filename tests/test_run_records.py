"""The records that cross process boundaries (embedlib/run_records.py): what a writer puts in reads back the
same, and a reader given odd values (someone else's log, a hand-edited file) gets None, not an exception."""
from __future__ import annotations

import json

from embedlib.run_records import NegativesCheck, RefreshRecord, StoreManifest, integer, number


def test_number_and_integer_refuse_what_is_not_one():
    assert number(1) == 1.0 and number(0.5) == 0.5
    for odd in (True, "1.0", [1], float("nan"), float("inf"), 10 ** 400, None):
        assert number(odd) is None
    assert integer(3) == 3
    for odd in (True, 3.0, "3", None):
        assert integer(odd) is None


def test_manifest_round_trip_and_an_old_manifest_without_files():
    manifest = StoreManifest(format_version=1, version=4, created_at="2026-12-07T00:00:00Z", model_path="/m",
                             model_step=40, corpus_fingerprint="c", queries_fingerprint="q", num_queries=10,
                             k=8, corpus_size=None, extra={"partials_since_full": 1})
    data = json.loads(json.dumps(manifest.to_json()))
    assert "files" not in data and StoreManifest.from_json(data) == manifest
    odd = StoreManifest.from_json({**data, "model_step": "40", "k": 8.0, "extra": [1]})
    assert (odd.model_step, odd.k, odd.extra) == (None, None, {})


def test_refresh_record_round_trip_and_tolerant_reading():
    record = RefreshRecord(time="t", mode="sidecar", version=3, export_step=20, encode_seconds=1.5,
                           search_seconds=0.25, cache_hit=False, refresh="full", removed_versions=[1],
                           query_encoding={"tokens": 5})
    assert RefreshRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert record.seconds == 1.75
    odd = RefreshRecord.from_json({"version": "3", "encode_seconds": 10 ** 400, "cache_hit": 1,
                                   "removed_versions": [2, "x", True], "query_encoding": "no"})
    assert (odd.version, odd.encode_seconds, odd.cache_hit) == (None, None, None)
    assert odd.removed_versions == [2] and odd.query_encoding == {} and odd.seconds == 0.0
    assert RefreshRecord.from_json("not an object").version is None


def test_negatives_check_flat_keys_read_back():
    check = NegativesCheck(eligible=16, stale=3, replaced=6, mean_score=0.4, mean_initial_score=0.5,
                           ratio_q10=0.6, ratio_q50=0.8, ratio_q90=1.1, unobserved=0, version=2,
                           export_age_steps=10)
    flat = check.flat("sci/fact")
    assert flat["negatives/sci/fact/stale"] == 3 and len(flat) == 11
    assert NegativesCheck.from_flat(json.loads(json.dumps(flat)), "sci/fact") == check
    odd = NegativesCheck.from_flat({**flat, "negatives/sci/fact/stale": 2.5,
                                    "negatives/sci/fact/mean_score": "x"}, "sci/fact")
    assert (odd.stale, odd.mean_score, odd.eligible) == (None, None, 16)
