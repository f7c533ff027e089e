"""The benchmark's arithmetic: percentiles, rates, CPU per operation, loss, spreads, merged reports.

Pure functions over numbers and the JSON the load generators and the publisher print; no I/O, no clock.
``tests/test_bench_stats.py`` drives them with known inputs.

Two percentile definitions are in use, each where the README says so:

- :func:`percentile` / :func:`hist_percentile` (latency, ack times): the value at rank
  ``int(p * n)`` (1-based, clamped to 1..n), the same rank ``loadgen.c`` uses for its own histograms;
- :func:`nearest_rank` (per-broadcast latency): rank ``ceil(p * n)``, so with 40 broadcasts p99 is the
  worst one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# the integer counters of loadgen's JSON report that add up over processes
LOADGEN_SUMS = (
    "connections",
    "established",
    "subscribed",
    "open_at_end",
    "received",
    "received_before_ready",
    "expected",
    "loss",
    "dups",
    "gaps",
    "gap_msgs",
    "done",
    "recovered_true",
    "recovered_false",
    "echo_round_trips",
    "errors",
    "closed_after_ready",
    "disconnect_pushes",
    "other_frames",
    "pongs_sent",
)


# --------------------------------------------------------------------------------------------- percentiles
def floor_rank(p: float, n: int) -> int:
    """1-based rank of the p-quantile among n values: ``int(p * n)``, clamped to 1..n (n > 0)."""
    return max(1, min(n, int(p * n)))


def percentile(values: Iterable[float], p: float) -> float:
    """The p-quantile (0 <= p <= 1) of ``values`` at :func:`floor_rank`; 0.0 for no values."""
    v = sorted(values)
    return float(v[floor_rank(p, len(v)) - 1]) if v else 0.0


def hist_percentile(pairs: Iterable[Sequence[float]], p: float) -> float:
    """:func:`percentile` of a histogram given as ``[value, count]`` pairs (in any order)."""
    ordered = sorted((float(v), int(c)) for v, c in pairs)
    total = sum(c for _, c in ordered)
    if total == 0:
        return 0.0
    rank = floor_rank(p, total)
    acc = 0
    for v, c in ordered:
        acc += c
        if acc >= rank:
            return v
    return ordered[-1][0]


def nearest_rank(values: Iterable[float], p: float) -> float:
    """The p-quantile at rank ``ceil(p * n)`` (the nearest-rank method); 0.0 for no values."""
    v = sorted(values)
    return float(v[min(len(v) - 1, max(0, math.ceil(p * len(v)) - 1))]) if v else 0.0


# --------------------------------------------------------------------------------------------- rates
def rate(count: float, seconds: float) -> float:
    """count / seconds; 0.0 for an empty or negative window."""
    return count / seconds if seconds > 0 else 0.0


def us_per_op(cpu_s: float, ops: int) -> float | None:
    """CPU microseconds per operation (delivery, publish, round trip); None when nothing was done."""
    return cpu_s * 1e6 / ops if ops > 0 else None


def kib_per_conn(before_kib: int, after_kib: int, conns: int) -> float | None:
    """RSS growth per connection; None without connections."""
    return (after_kib - before_kib) / conns if conns > 0 else None


def loss(expected: int, received: int, dups: int) -> int:
    """Messages expected but not received once (duplicates do not make up for lost ones)."""
    return max(0, expected - (received - dups))


# --------------------------------------------------------------------------------------------- spreads
def spread(n: int, parts: int) -> list[int]:
    """n split into ``parts`` counts that differ by at most one, the larger ones first.

    Connection i subscribes to channel i % channels, so this is also the subscribers per channel."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def procs_for(n: int, per_proc_max: int, at_least: int = 1) -> int:
    """Load-generator processes for n connections: at most ``per_proc_max`` each, two from 2,000 on."""
    return max(at_least, math.ceil(n / per_proc_max), 2 if n >= 2000 else 1)


def expected_deliveries(
    per_channel: Mapping[str, int], subscribers: int, channels: int, subscribed: int, channel_fmt: str
) -> int:
    """Acknowledged publications times the subscribers of their channel, scaled by the share of the
    ``subscribers`` connections that did subscribe. ``channel_fmt`` has one ``%d`` (the channel index)."""
    subs_of = spread(subscribers, channels)
    ratio = subscribed / subscribers if subscribers else 0
    return int(sum(per_channel.get(channel_fmt % c, 0) * subs_of[c] for c in range(channels)) * ratio)


# --------------------------------------------------------------------------------------------- merging
def merge_loadgens(rs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Combine the JSON reports of several loadgen processes (counters summed, histograms merged)."""
    m: dict[str, Any] = {k: sum(int(r.get(k, 0)) for r in rs) for k in LOADGEN_SUMS}
    ek: Counter[str] = Counter()
    cc: Counter[str] = Counter()
    for r in rs:
        ek.update(r.get("error_kinds", {}))
        cc.update(r.get("close_codes", {}))
    m["error_kinds"], m["close_codes"] = dict(ek), dict(cc)
    firsts = [r["first_ns"] for r in rs if r.get("first_ns")]
    lasts = [r["last_ns"] for r in rs if r.get("last_ns")]
    m["first_ns"] = min(firsts) if firsts else 0
    m["last_ns"] = max(lasts) if lasts else 0
    win = (m["last_ns"] - m["first_ns"]) / 1e9 if firsts else 0.0
    m["window_s"] = win
    m["rate"] = rate(m["received"], win)
    m["start_ns"] = min(r["start_ns"] for r in rs) if rs else 0
    hist: Counter[float] = Counter()
    dh: Counter[float] = Counter()
    for r in rs:
        for v, c in r.get("hist_us", []):
            hist[v] += c
        for v, c in r.get("done_hist_us", []):
            dh[v] += c
    lat_max = max((r.get("lat_max_us", 0) for r in rs), default=0) / 1e3
    pairs = list(hist.items())
    m["latency_ms"] = {
        "count": sum(hist.values()),
        "p50": min(lat_max, hist_percentile(pairs, 0.5) / 1e3),
        "p99": min(lat_max, hist_percentile(pairs, 0.99) / 1e3),
        "max": lat_max,
    }
    done_pairs = list(dh.items())
    done_max = max((r.get("done_max_us", 0) for r in rs), default=0) / 1e3
    m["done_ms"] = {
        "p50": min(done_max, hist_percentile(done_pairs, 0.5) / 1e3),
        "p99": min(done_max, hist_percentile(done_pairs, 0.99) / 1e3),
        "max": done_max,
    }
    # time from the earliest process start until the last connection finished
    ends = [r["start_ns"] + r["all_done_ms"] * 1e6 for r in rs if r.get("all_done_ms", -1) >= 0]
    m["all_done_ms"] = (max(ends) - m["start_ns"]) / 1e6 if ends and len(ends) == len(rs) else -1.0
    m["ready_ms"] = max((r.get("ready_ms", -1) for r in rs), default=-1)
    return m


def merge_publishers(pubs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum the reports of publisher processes that ran at once (one report is returned as it is).

    Counts and rates add up; ack latencies are the worst of the processes; ``error_kinds`` and the
    other fields are the first process's."""
    pub = dict(pubs[0])
    if len(pubs) > 1:
        pub["published"] = sum(int(p.get("published", 0)) for p in pubs)
        pub["rate"] = sum(float(p.get("rate", 0)) for p in pubs)
        pub["concurrency"] = f"{len(pubs)} x {pubs[0].get('concurrency')}"
        pub["errors"] = sum(int(p.get("errors", 0)) for p in pubs)
        acks = [p.get("ack_ms", {}) for p in pubs]
        pub["ack_ms"] = {k: max(float(a.get(k, 0)) for a in acks) for k in ("p50", "p99", "max")}
    return pub


# --------------------------------------------------------------------------------------------- broadcasts
@dataclass
class Broadcasts:
    """Per-publication figures of ``loadgen --per-offset`` over all processes."""

    offsets: list[int]  # the publications looked at
    complete: list[int]  # offsets every subscriber received
    incomplete: list[int]
    worst_us: dict[int, int]  # offset -> largest latency any connection saw
    receivers: Counter[int] = field(default_factory=Counter)  # offset -> connections that received it
    beyond: int = 0  # deliveries whose offset did not fit loadgen's table

    @property
    def latencies_ms(self) -> list[float]:
        """Last-subscriber latency of each complete broadcast, ascending."""
        return sorted(self.worst_us[o] / 1e3 for o in self.complete)


def broadcasts(
    reps: Iterable[Mapping[str, Any]], subscribed: int, first: int | None, last: int | None
) -> Broadcasts:
    """Combine ``per_offset`` tables: the worst latency per offset (max over processes) and its receivers
    (summed). Offsets ``first..last`` are looked at when the publisher reported them, otherwise every
    offset seen; a broadcast is complete when at least ``subscribed`` connections received it."""
    worst: dict[int, int] = {}
    got: Counter[int] = Counter()
    beyond = 0
    for rep in reps:
        for off, us, n in rep.get("per_offset", []):
            worst[off] = max(worst.get(off, 0), int(us))
            got[off] += int(n)
        beyond += int(rep.get("per_offset_beyond", 0))
    offsets = list(range(first, last + 1)) if first is not None and last is not None else sorted(worst)
    complete = [o for o in offsets if got[o] >= subscribed and o in worst]
    incomplete = [o for o in offsets if o not in complete]
    return Broadcasts(offsets, complete, incomplete, worst, got, beyond)
