"""bench/stats.py: the benchmark's arithmetic, on known inputs (no processes, no network)."""

from __future__ import annotations

from typing import Any

import pytest

from bench import stats

# --------------------------------------------------------------------------------------------- percentiles


def test_floor_rank_clamps_to_one_and_n() -> None:
    assert stats.floor_rank(0.0, 10) == 1
    assert stats.floor_rank(0.5, 10) == 5
    assert stats.floor_rank(0.99, 10) == 9  # int(9.9): one below the worst of ten
    assert stats.floor_rank(1.0, 10) == 10
    assert stats.floor_rank(1.5, 10) == 10
    assert stats.floor_rank(0.99, 1) == 1


def test_percentile_known_values() -> None:
    values = list(range(1, 101))  # 1..100
    assert stats.percentile(values, 0.5) == 50.0
    assert stats.percentile(values, 0.99) == 99.0
    assert stats.percentile(values, 1.0) == 100.0
    assert stats.percentile(values, 0.0) == 1.0


def test_percentile_sorts_its_input() -> None:
    assert stats.percentile([30, 10, 20], 0.5) == 10.0  # rank int(1.5) = 1
    assert stats.percentile([30, 10, 20], 1.0) == 30.0


def test_percentile_empty_and_one_sample() -> None:
    assert stats.percentile([], 0.5) == 0.0
    assert stats.percentile([7], 0.0) == 7.0
    assert stats.percentile([7], 0.99) == 7.0


def test_percentile_ties() -> None:
    assert stats.percentile([5, 5, 5, 5], 0.5) == 5.0
    assert stats.percentile([1, 5, 5, 9], 0.5) == 5.0
    assert stats.percentile([1, 5, 5, 9], 0.75) == 5.0
    assert stats.percentile([1, 5, 5, 9], 1.0) == 9.0


def test_hist_percentile_weights_values_by_count() -> None:
    pairs = [[10.0, 98], [500.0, 1], [20.0, 1]]  # unsorted on purpose
    assert stats.hist_percentile(pairs, 0.5) == 10.0
    assert stats.hist_percentile(pairs, 0.99) == 20.0  # rank 99: 98 tens, then the twenty
    assert stats.hist_percentile(pairs, 1.0) == 500.0


def test_hist_percentile_equals_percentile_of_the_expanded_samples() -> None:
    pairs = [[3.0, 2], [1.0, 3], [8.0, 1]]
    expanded = [1.0, 1.0, 1.0, 3.0, 3.0, 8.0]
    for p in (0.0, 0.1, 0.5, 0.66, 0.9, 0.99, 1.0):
        assert stats.hist_percentile(pairs, p) == stats.percentile(expanded, p), p


def test_hist_percentile_empty_or_all_zero_counts() -> None:
    assert stats.hist_percentile([], 0.5) == 0.0
    assert stats.hist_percentile([[10.0, 0], [20.0, 0]], 0.5) == 0.0


def test_hist_percentile_skips_empty_buckets() -> None:
    assert stats.hist_percentile([[1.0, 0], [2.0, 4], [3.0, 0]], 0.5) == 2.0


def test_nearest_rank_takes_the_worst_of_forty_at_p99() -> None:
    lat = [float(i) for i in range(1, 41)]
    assert stats.nearest_rank(lat, 0.99) == 40.0  # ceil(39.6) = 40, the README's broadcast p99
    assert stats.percentile(lat, 0.99) == 39.0  # the floor rank would be the second worst
    assert stats.nearest_rank(lat, 0.5) == 20.0


def test_nearest_rank_empty_one_and_unsorted() -> None:
    assert stats.nearest_rank([], 0.99) == 0.0
    assert stats.nearest_rank([4.5], 0.0) == 4.5
    assert stats.nearest_rank([4.5], 1.0) == 4.5
    assert stats.nearest_rank([3.0, 1.0, 2.0], 0.5) == 2.0


# --------------------------------------------------------------------------------------------- rates


def test_rate() -> None:
    assert stats.rate(300, 1.5) == 200.0
    assert stats.rate(0, 2.0) == 0.0
    assert stats.rate(10, 0.0) == 0.0
    assert stats.rate(10, -1.0) == 0.0


def test_us_per_op() -> None:
    assert stats.us_per_op(1.5, 1_000_000) == pytest.approx(1.5)
    assert stats.us_per_op(0.25, 100) == pytest.approx(2500.0)
    assert stats.us_per_op(0.0, 10) == 0.0
    assert stats.us_per_op(1.0, 0) is None


def test_kib_per_conn() -> None:
    assert stats.kib_per_conn(54_000, 108_000, 19_000) == pytest.approx(54_000 / 19_000)
    assert stats.kib_per_conn(100, 90, 10) == -1.0  # RSS may shrink; reported as it is
    assert stats.kib_per_conn(100, 200, 0) is None


def test_loss_counts_duplicates_out_and_never_goes_negative() -> None:
    assert stats.loss(100, 100, 0) == 0
    assert stats.loss(100, 90, 0) == 10
    assert stats.loss(100, 100, 5) == 5  # five of the hundred were repeats
    assert stats.loss(100, 120, 0) == 0


# --------------------------------------------------------------------------------------------- spreads


def test_spread_even_and_uneven() -> None:
    assert stats.spread(10, 2) == [5, 5]
    assert stats.spread(10, 3) == [4, 3, 3]
    assert stats.spread(2, 4) == [1, 1, 0, 0]
    assert stats.spread(0, 3) == [0, 0, 0]
    assert sum(stats.spread(19_000, 7)) == 19_000


def test_procs_for() -> None:
    assert stats.procs_for(500, 9500) == 1
    assert stats.procs_for(1999, 9500) == 1
    assert stats.procs_for(2000, 9500) == 2  # two from 2,000 on, to use both loadgen halves
    assert stats.procs_for(19_000, 9500) == 2
    assert stats.procs_for(19_001, 9500) == 3
    assert stats.procs_for(1000, 9500, at_least=2) == 2


def test_expected_deliveries_per_channel_times_its_subscribers() -> None:
    # 10 subscribers over 3 channels: 4, 3, 3
    per_channel = {"bench:c0": 2, "bench:c1": 1, "bench:c2": 0, "other": 99}
    assert stats.expected_deliveries(per_channel, 10, 3, 10, "bench:c%d") == 2 * 4 + 1 * 3
    # only half of them subscribed: half the deliveries expected (rounded down)
    assert stats.expected_deliveries(per_channel, 10, 3, 5, "bench:c%d") == 5
    assert stats.expected_deliveries({}, 10, 3, 10, "bench:c%d") == 0
    assert stats.expected_deliveries(per_channel, 0, 3, 0, "bench:c%d") == 0


# --------------------------------------------------------------------------------------------- merging


def loadgen_report(**kw: Any) -> dict[str, Any]:
    rep: dict[str, Any] = {"start_ns": 1_000_000_000, "hist_us": [], "done_hist_us": []}
    rep.update(kw)
    return rep


def test_merge_loadgens_sums_counters_and_spans_the_receive_window() -> None:
    a = loadgen_report(
        received=600, established=5, dups=1, error_kinds={"connect": 2}, close_codes={"4008": 1},
        first_ns=2_000_000_000, last_ns=3_000_000_000,
    )  # fmt: skip
    b = loadgen_report(
        received=400, established=5, error_kinds={"connect": 1, "read": 1},
        first_ns=2_500_000_000, last_ns=4_000_000_000, start_ns=500_000_000,
    )  # fmt: skip
    m = stats.merge_loadgens([a, b])
    assert m["received"] == 1000
    assert m["established"] == 10
    assert m["dups"] == 1
    assert m["gaps"] == 0  # absent in both: 0
    assert m["error_kinds"] == {"connect": 3, "read": 1}
    assert m["close_codes"] == {"4008": 1}
    assert m["window_s"] == pytest.approx(2.0)  # earliest first to latest last receive
    assert m["rate"] == pytest.approx(500.0)
    assert m["start_ns"] == 500_000_000


def test_merge_loadgens_merges_histograms_and_caps_at_the_max() -> None:
    a = loadgen_report(hist_us=[[1000, 50], [2000, 48]], lat_max_us=9000)
    b = loadgen_report(hist_us=[[1000, 1], [30000, 1]], lat_max_us=25000)
    lat = stats.merge_loadgens([a, b])["latency_ms"]
    assert lat["count"] == 100
    assert lat["p50"] == 1.0
    assert lat["p99"] == 2.0
    assert lat["max"] == 25.0
    # a bucket's value may exceed the exact maximum (bucket error): the percentile is capped
    capped = stats.merge_loadgens([loadgen_report(hist_us=[[30000, 10]], lat_max_us=29500)])["latency_ms"]
    assert capped["p50"] == capped["max"] == 29.5


def test_merge_loadgens_all_done_only_when_every_process_finished() -> None:
    a = loadgen_report(start_ns=1_000_000_000, all_done_ms=500.0)
    b = loadgen_report(start_ns=1_200_000_000, all_done_ms=700.0)
    assert stats.merge_loadgens([a, b])["all_done_ms"] == pytest.approx(900.0)
    c = loadgen_report(all_done_ms=-1)
    assert stats.merge_loadgens([a, c])["all_done_ms"] == -1.0


def test_merge_loadgens_of_nothing_and_of_reports_without_receives() -> None:
    m = stats.merge_loadgens([])
    assert m["received"] == 0 and m["rate"] == 0.0 and m["window_s"] == 0.0 and m["start_ns"] == 0
    assert m["latency_ms"] == {"count": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    assert m["all_done_ms"] == -1.0 and m["ready_ms"] == -1
    failed = {"errors": 1, "error_kinds": {"loadgen_no_output": 1}, "stderr": [], "start_ns": 0}
    m = stats.merge_loadgens([failed])
    assert m["errors"] == 1 and m["error_kinds"] == {"loadgen_no_output": 1} and m["rate"] == 0.0


def test_merge_publishers_one_is_returned_as_it_is() -> None:
    pub = {"published": 5, "rate": 2.5, "concurrency": 500, "extra": "kept"}
    merged = stats.merge_publishers([pub])
    assert merged == pub and merged is not pub


def test_merge_publishers_sums_counts_and_takes_the_worst_ack() -> None:
    a = {
        "published": 100,
        "rate": 10.0,
        "errors": 1,
        "concurrency": 500,
        "ack_ms": {"p50": 1, "p99": 9, "max": 20},
    }
    b = {
        "published": 50,
        "rate": 5.5,
        "errors": 0,
        "concurrency": 500,
        "ack_ms": {"p50": 2, "p99": 3, "max": 30},
    }
    m = stats.merge_publishers([a, b])
    assert m["published"] == 150
    assert m["rate"] == 15.5
    assert m["errors"] == 1
    assert m["concurrency"] == "2 x 500"
    assert m["ack_ms"] == {"p50": 2.0, "p99": 9.0, "max": 30.0}


# --------------------------------------------------------------------------------------------- broadcasts


def test_broadcasts_worst_latency_over_processes_and_receivers_summed() -> None:
    reps: list[dict[str, Any]] = [
        {"per_offset": [[1, 1000, 2], [2, 5000, 2], [3, 800, 1]]},
        {"per_offset": [[1, 3000, 2], [2, 2000, 2]], "per_offset_beyond": 4},
    ]
    b = stats.broadcasts(reps, subscribed=4, first=1, last=3)
    assert b.offsets == [1, 2, 3]
    assert b.worst_us == {1: 3000, 2: 5000, 3: 800}
    assert b.receivers == {1: 4, 2: 4, 3: 1}
    assert b.complete == [1, 2]
    assert b.incomplete == [3]
    assert b.latencies_ms == [3.0, 5.0]
    assert b.beyond == 4


def test_broadcasts_an_offset_nobody_received_is_incomplete() -> None:
    b = stats.broadcasts([{"per_offset": [[1, 100, 3]]}], subscribed=3, first=1, last=2)
    assert b.complete == [1] and b.incomplete == [2]


def test_broadcasts_without_publisher_offsets_uses_those_seen() -> None:
    b = stats.broadcasts([{"per_offset": [[7, 100, 1], [5, 200, 1]]}], subscribed=1, first=None, last=None)
    assert b.offsets == [5, 7] and b.complete == [5, 7]
    assert b.latencies_ms == [0.1, 0.2]


def test_broadcasts_empty() -> None:
    b = stats.broadcasts([], subscribed=10, first=None, last=None)
    assert b.offsets == b.complete == b.incomplete == b.latencies_ms == []
    assert stats.nearest_rank(b.latencies_ms, 0.99) == 0.0
