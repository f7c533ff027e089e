"""The standard benchmark set: :data:`SCENARIOS`, one row per scenario (name, what it measures, how it
runs, its parameters at a :class:`Sizes`), and the few runners the rows share.

A runner is ``async (cfg, sizes, name, params) -> Result``; ``params`` is built from the sizes when the
scenario starts (so a publication's ``t`` is taken then, not at import).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import shlex
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import orjson

from bench import publisher, stats
from bench.harness import (
    Cfg,
    Loadgen,
    Server,
    fd_counts,
    fd_delta,
    in_store,
    key_args,
    nprocs,
    redis_cmdstats,
    redis_sample,
    run_publisher,
    run_wrk,
    running_server,
    server_tail,
    snap,
    start_loadgens,
    taskset,
    worker_snap,
    write_wrk_script,
    wrk_bin,
)
from bench.procstat import Sample
from bench.report import Result, committed_str, cpu_per, err_str, fmt_int, lat_str, rss_str

PAD = publisher.pad_for(100)  # data {"t": <19 digits>, "pad": PAD} is 100 bytes of JSON


@dataclass
class Sizes:
    subs: int
    channels_many: int
    idle: int
    storm: int
    storm_msgs: int
    echo_conns: int
    run_s: float
    rate_1ch: float
    rate_many: float
    sat_concurrency: int
    http_concurrency: int
    ws_window: int
    sat16_concurrency: int = 16  # fanout-1ch-sat16: HTTP publishes in flight
    batch_conns: int = 8  # http-batch: wrk connections
    batch_size: int = 100  # http-batch: publications per request
    broadcast_interval: float = 0.25  # fanout-broadcast: seconds between single publishes
    idle_big: int = 100_000  # idle-100k-w6: subscribers held over the workers
    idle_big_workers: int = 6

    def replace(self, **changes: Any) -> Sizes:
        return dataclasses.replace(self, **changes)


FULL = Sizes(10_000, 100, 19_000, 10_000, 100, 100, 10.0, 30.0, 3000.0, 4, 50, 500)
QUICK = Sizes(500, 10, 1_000, 500, 100, 20, 3.0, 30.0, 300.0, 2, 50, 200, idle_big=3_000)


def pub_body(channel: str) -> dict[str, Any]:
    """One publication as the HTTP API takes it, with the publisher's data (``t`` = now)."""
    return {"channel": channel, "data": publisher.make_data(PAD)}


# --------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Fanout:
    """Subscribers (``sizes.subs``, over ``channels``) and one publisher (``publisher.py pub_args``)."""

    what: str
    channels: int
    pub_args: list[str]
    chatsocket: bool = False  # the demo protocol on /chatsocket instead of /ws subscriptions
    lg_extra: tuple[str, ...] = ()
    broker: str = "memory"  # memory | sqlite | redis (a redis-server of its own per scenario)
    workers: int = 1  # tidings serve --workers N (Redis only)
    env: tuple[tuple[str, str], ...] = ()  # the server's extra environment (TIDINGS_METRICS=false)
    scrape: float = 0.0  # > 0: GET /metrics every this many seconds while publishing (a Prometheus)


@dataclass(frozen=True)
class PublishOnly:
    """Publishers only, no subscribers; ``procs`` publisher processes at once, their figures summed."""

    what: str
    args: list[str]
    note: str = ""
    procs: int = 1
    broker: str = "sqlite"
    workers: int = 1


@dataclass(frozen=True)
class WrkPublish:
    """POST ``body`` to ``path`` with wrk; without wrk, ``fallback`` (or the scenario is skipped)."""

    what: str
    path: str
    body: dict[str, Any]
    conns: int
    pubs_per_req: int
    channels: list[str]
    unit: str  # in the Result column: "<n> publications/s"
    unit1: str  # in the CPU column: "µs/publication"
    fallback: PublishOnly | None = None
    broker: str = "sqlite"
    workers: int = 1


@dataclass(frozen=True)
class Idle:
    conns: int


@dataclass(frozen=True)
class IdleBroadcast:
    """``conns`` subscribers of one channel held idle by ``conns / per_proc`` loadgen processes against
    ``--workers`` workers sharing a Redis; RSS per connection; then ``broadcasts`` single publishes."""

    what: str
    conns: int
    workers: int
    per_proc: int  # connections per loadgen process (each may hold at most ~19,990 open files)
    broadcasts: int = 1
    ready_timeout: float = 240.0  # connecting + subscribing 100,000 on two shared cores takes a while


@dataclass(frozen=True)
class Storm:
    clients: int
    msgs: int  # messages each client recovers (one more is published: recovery starts after it)


@dataclass(frozen=True)
class Echo:
    conns: int


P = TypeVar("P")
Runner = Callable[[Cfg, Sizes, str, P], Awaitable[Result]]


@dataclass(frozen=True)
class Scenario(Generic[P]):
    name: str
    measures: str  # what the scenario is for; the report's Load column is its params' ``what``
    run: Runner[P]
    params: Callable[[Sizes], P]
    min_timeout: float = 0.0  # the scenario's cap is at least this (seconds), whatever --scenario-timeout

    async def __call__(self, cfg: Cfg, sizes: Sizes) -> Result:
        return await self.run(cfg, sizes, self.name, self.params(sizes))


# --------------------------------------------------------------------------------------------- runners
async def scrape_metrics(cfg: Cfg, srv: Server, every: float) -> dict[str, int]:
    """A Prometheus stand-in: ``GET /metrics`` with the server's key every ``every`` seconds until
    cancelled; what it did, for the notes."""
    import aiohttp

    out = {"ok": 0, "failed": 0, "bytes": 0}
    headers = {"Authorization": f"Bearer {srv.api_key}"}
    url = f"http://{cfg.target_host}:{srv.port}/metrics"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        try:
            while True:
                try:
                    async with s.get(url, headers=headers) as resp:
                        body = await resp.read()
                        ok = resp.status == 200 and b"tidings_deliveries_total" in body
                    out["ok" if ok else "failed"] += 1
                    out["bytes"] = len(body)
                except (aiohttp.ClientError, OSError, TimeoutError):
                    out["failed"] += 1
                await asyncio.sleep(every)
        except asyncio.CancelledError:
            pass
    return out


async def idle_scrape_cost(cfg: Cfg, srv: Server, conns: int, n: int = 20) -> str:
    """What one scrape costs the server on its own: ``n`` scrapes one after another while the clients
    are connected and nothing is published, server CPU time divided by ``n`` (a note)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {srv.api_key}"}
    url = f"http://{cfg.target_host}:{srv.port}/metrics"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        before = snap(srv)
        for _ in range(n):
            async with s.get(url, headers=headers) as resp:
                await resp.read()
        after = snap(srv)
    if before is None or after is None:
        return "idle scrape cost: not measured (no /proc sample)"
    per = (after - before).per(n)
    if per is None:
        return "idle scrape cost: not measured"
    return (
        f"one GET /metrics with {conns:,} clients connected, idle: "
        f"{per / 1000:.1f} ms server CPU (mean of {n})"
    )


async def stop_scraper(task: asyncio.Task[dict[str, int]] | None) -> dict[str, int]:
    if task is None:
        return {"ok": 0, "failed": 0, "bytes": 0}
    task.cancel()
    return await task


def redis_cpu(r: Result, srv: Server, before: Sample | None, after: Sample | None, n: int, unit: str) -> None:
    """Redis's own CPU (redis-server's utime+stime) per ``unit`` into the CPU cell, a note and raw."""
    if srv.redis is None or before is None or after is None:
        return
    txt, raw = cpu_per(before, after, n)
    r.cpu += f"; Redis {txt.replace('op', unit)}"
    stats_ = redis_cmdstats(srv)
    ev = stats_.get("evalsha", {})
    if ev.get("calls"):
        r.cpu += f" ({ev['usec'] / max(n, 1):.1f} µs in the publish script)"
    r.raw["redis_cpu"] = raw
    r.raw["redis_cmdstats"] = stats_
    top = sorted(stats_.items(), key=lambda kv: -kv[1].get("usec", 0))[:6]
    calls = ", ".join(f"{k} {v.get('calls', 0):.0f} x {v.get('usec_per_call', 0):.1f} µs" for k, v in top)
    r.notes.append(
        f"Redis CPU = redis-server (pid {srv.redis.pid}) utime+stime over the same phase / {n:,} {unit}(s): "
        f"{raw.get('cpu_s', 0):.2f} s (includes its network I/O and its idle timers, 10 ms resolution); "
        "the script's own time is INFO commandstats evalsha usec / publications; top commands: " + calls
    )


def placement_note(r: Result, cfg: Cfg, srv: Server) -> None:
    """Where the server side ran: workers and their CPUs, Redis."""
    if srv.workers > 1:
        cpus = {pid: sorted(os.sched_getaffinity(pid)) for pid in srv.worker_pids if _alive(pid)}
        r.notes.append(
            f"--workers {srv.workers}: worker pids and CPUs {cpus}; load generators/publisher/wrk on CPU "
            f"{cfg.client_cpu}"
            + (" (shared with a worker)" if any(cfg.client_cpu in c for c in cpus.values()) else "")
        )
    if srv.redis is not None:
        r.notes.append(
            f"broker: {srv.redis.url} (redis-server 7, no persistence, pid {srv.redis.pid}, "
            f"CPU {sorted(os.sched_getaffinity(srv.redis.pid)) if srv.redis.pid else '?'})"
        )


def _alive(pid: int) -> bool:
    try:
        os.sched_getaffinity(pid)
        return True
    except OSError:
        return False


def commands(srv_cmd: str, lgs: Sequence[Loadgen], *others: str) -> list[str]:
    return [f"server: {srv_cmd}", *others, *(f"loadgen: {shlex.join(lg.argv)}" for lg in lgs)]


async def fanout(cfg: Cfg, sz: Sizes, name: str, p: Fanout) -> Result:
    r = Result(name, p.what)
    async with running_server(cfg, p.broker, p.workers, p.env) as srv:
        try:
            fd0 = fd_counts(srv)
            n = sz.subs
            procs = nprocs(n)
            mode = (
                ["--chatsocket"]
                if p.chatsocket
                else ["--channels", str(p.channels), "--channel-fmt", "bench:c%d"]
            )
            dur = cfg.ready_timeout + sz.run_s + 15
            lgs, ready = await start_loadgens(cfg, srv, n, procs, [*mode, "--quiet", "2", *p.lg_extra], dur)
            ready_n = sum(int(x.get("subscribed" if not p.chatsocket else "connections", 0)) for x in ready)
            fd1 = fd_counts(srv)
            if p.scrape > 0:
                r.notes.append(await idle_scrape_cost(cfg, srv, ready_n))
            before, rbefore = snap(srv), redis_sample(srv, reset=True)
            common = ["--host", cfg.target_host, "--port", str(srv.port), "--duration", f"{sz.run_s:g}"]
            if not p.chatsocket:
                common += [*key_args(srv), "--channels", str(p.channels), "--channel-fmt", "bench:c{i}"]
            scraper = asyncio.create_task(scrape_metrics(cfg, srv, p.scrape)) if p.scrape > 0 else None
            try:
                pub, pub_cmd = await run_publisher([*common, *p.pub_args], sz.run_s + 30)
            finally:
                scrapes = await stop_scraper(scraper)
            if scraper is not None:
                r.notes.append(
                    f"GET /metrics every {p.scrape:g} s while publishing: {scrapes['ok']} scrapes "
                    f"({scrapes['bytes']:,} bytes each at the last), {scrapes['failed']} failed"
                )
            reps = await asyncio.gather(*(lg.finish(sz.run_s + 20) for lg in lgs))
            after, rafter = snap(srv), redis_sample(srv)
            m = stats.merge_loadgens(reps)
            # expected deliveries: every acknowledged publication times the subscribers of its channel
            if p.chatsocket:  # no acknowledgements in the demo protocol: every message sent must arrive
                expected = int(pub.get("sent", 0)) * m["established"]
            else:
                per_ch = pub.get("per_channel", {})
                expected = stats.expected_deliveries(per_ch, n, p.channels, m["subscribed"], "bench:c%d")
            lost = stats.loss(expected, m["received"], m["dups"])
            cpu_txt, cpu_raw = cpu_per(before, after, m["received"])
            r.clients = f"{m['established']:,} conns ({procs} proc(s)), {p.channels} ch; ready {ready_n:,}"
            r.result = (
                f"{fmt_int(m['rate'])} deliveries/s ({fmt_int(m['received'])} in {m['window_s']:.1f} s); "
                f"{fmt_int(pub.get('rate', 0))} publishes/s"
            )
            r.loss = f"{lost:,} of {expected:,}" + (f", dups {m['dups']}" if m["dups"] else "")
            if m["gaps"]:
                r.loss += f", gaps {m['gaps']}"
            r.latency = lat_str(m["latency_ms"])
            r.cpu = cpu_txt
            redis_cpu(r, srv, rbefore, rafter, int(pub.get("published", 0)), "publish")
            placement_note(r, cfg, srv)
            if srv.workers > 1:
                r.notes.append(f"connections per worker (open files held - before): {fd_delta(fd0, fd1)}")
            r.rss = rss_str(after)
            r.errors = err_str(m, {f"pub:{k}": v for k, v in pub.get("error_kinds", {}).items()})
            r.commands = [*commands(srv.cmd, lgs), f"publisher: {pub_cmd}"]
            if m["received_before_ready"]:
                r.notes.append(f"{m['received_before_ready']:,} frames arrived before all clients were ready")
            if m["close_codes"]:
                r.notes.append(f"close codes seen: {m['close_codes']}")
            r.raw |= {
                "loadgen": reps,
                "merged": m,
                "publisher": pub,
                "server_cpu": cpu_raw,
                "expected": expected,
            }
        finally:
            if not r.raw:
                r.notes.append("server log tail: " + server_tail(srv)[-300:])
    return r


async def broadcast(cfg: Cfg, sz: Sizes, name: str, p: Fanout) -> Result:
    """:func:`fanout` with ``--per-offset``; latency until the LAST subscriber had it, per publication."""
    r = await fanout(cfg, sz, name, p)
    reps = r.raw.get("loadgen")
    if not reps:
        return r
    m, pub = r.raw["merged"], r.raw["publisher"]
    subs = m["subscribed"]
    b = stats.broadcasts(reps, subs, pub.get("first_offset"), pub.get("last_offset"))
    lat = b.latencies_ms
    r.result = (
        f"{len(b.complete)} of {len(b.offsets)} broadcasts reached all {subs:,} subscribers; "
        f"{fmt_int(pub.get('published', 0))} acknowledged"
    )
    if lat:
        r.latency = (
            f"last subscriber {stats.nearest_rank(lat, 0.5):.1f} / {stats.nearest_rank(lat, 0.99):.1f} / "
            f"{lat[-1]:.1f}"
        )
    else:
        r.latency = "-"
    if b.incomplete:
        r.loss += f"; incomplete broadcasts {b.incomplete[:10]}"
    if b.beyond:
        r.notes.append(f"{b.beyond} deliveries had offsets beyond the --per-offset table (4095)")
    r.notes.append(
        "latency = max over subscribers of (receive time - publisher's t) per publication, then p50/p99/max "
        f"over the {len(lat)} complete broadcasts; per-delivery latency p50/p99/max "
        f"{lat_str(m['latency_ms'])} ms"
    )
    r.raw["per_broadcast_ms"] = {str(o): b.worst_us.get(o, 0) / 1e3 for o in b.offsets}
    r.raw["receivers_per_offset"] = {str(o): b.receivers[o] for o in b.offsets}
    return r


async def idle(cfg: Cfg, sz: Sizes, name: str, p: Idle) -> Result:
    r = Result(name, "hold connections, no subscriptions")
    async with running_server(cfg, "memory") as srv:
        await asyncio.sleep(0.5)
        base = snap(srv)
        procs = nprocs(p.conns, at_least=2)
        lgs, ready = await start_loadgens(cfg, srv, p.conns, procs, ["--idle"], cfg.ready_timeout + 20)
        await asyncio.sleep(2.0)  # let the server settle
        held = snap(srv)
        for lg in lgs:
            lg.signal_stop()
        reps = await asyncio.gather(*(lg.finish(10) for lg in lgs))
        m = stats.merge_loadgens(reps)
        est = m["established"]
        r.clients = f"{p.conns:,} requested ({procs} proc(s))"
        r.result = f"{est:,} held; all established in {m['ready_ms'] / 1e3:.1f} s"
        if base and held and (per := stats.kib_per_conn(base.rss_kib, held.rss_kib, est)) is not None:
            r.rss = f"{per:.1f} KiB/conn ({base.rss_kib / 1024:.0f} → {held.rss_kib / 1024:.0f} MiB)"
            r.raw["rss_kib_per_conn"] = per
        r.loss = "-"
        r.latency = "-"
        r.errors = err_str(m)
        r.commands = commands(srv.cmd, lgs)
        r.raw |= {
            "loadgen": reps,
            "merged": m,
            "ready": ready,
            "rss_before": base.as_dict() if base else None,
            "rss_held": held.as_dict() if held else None,
        }
    return r


async def idle_broadcast(cfg: Cfg, sz: Sizes, name: str, p: IdleBroadcast) -> Result:
    """Many idle subscribers over ``--workers`` workers: RSS per connection, then one broadcast to all."""
    r = Result(name, p.what)
    cfg = dataclasses.replace(cfg, ready_timeout=max(cfg.ready_timeout, p.ready_timeout))
    async with running_server(cfg, "redis", p.workers) as srv:
        await asyncio.sleep(1.0)
        base, fd0 = worker_snap(srv), fd_counts(srv)
        procs = max(2, math.ceil(p.conns / p.per_proc))
        mode = ["--channels", "1", "--channel-fmt", "bench:c%d", "--per-offset", "--quiet", "5"]
        mode += ["--max-pending", "1000"]
        dur = cfg.ready_timeout + 60
        t0 = asyncio.get_running_loop().time()
        lgs, ready = await start_loadgens(cfg, srv, p.conns, procs, mode, dur)
        t_ready = asyncio.get_running_loop().time() - t0
        await asyncio.sleep(2.0)  # let the server settle
        held, fd1 = worker_snap(srv), fd_counts(srv)
        before, rbefore = snap(srv), redis_sample(srv, reset=True)
        common = ["--host", cfg.target_host, "--port", str(srv.port), *key_args(srv)]
        common += ["--channels", "1", "--channel-fmt", "bench:c{i}", "--mode", "http", "--concurrency", "1"]
        common += ["--rate", "0.5", "--count", str(p.broadcasts), "--duration", f"{2.0 * p.broadcasts + 5:g}"]
        pub, pub_cmd = await run_publisher(common, 2.0 * p.broadcasts + 40)
        reps = await asyncio.gather(*(lg.finish(60) for lg in lgs))
        after, rafter = snap(srv), redis_sample(srv)
        m = stats.merge_loadgens(reps)
        est, subs = m["established"], m["subscribed"]
        b = stats.broadcasts(reps, subs, pub.get("first_offset"), pub.get("last_offset"))
        expected = int(pub.get("published", 0)) * subs
        lost = stats.loss(expected, m["received"], m["dups"])
        per_conn = stats.kib_per_conn(base.rss_kib, held.rss_kib, est) if base and held else None
        r.clients = (
            f"{est:,} of {p.conns:,} established, {subs:,} subscribed ({procs} loadgen procs x "
            f"<= {p.per_proc:,}, {procs * 8} source addresses); ready in {t_ready:.1f} s"
        )
        lat = b.latencies_ms
        r.result = f"{len(b.complete)} of {len(b.offsets)} broadcast(s) reached all {subs:,} subscribers" + (
            f"; last delivery {lat[-1]:.0f} ms after the publish was sent" if lat else ""
        )
        r.loss = f"{lost:,} of {expected:,}" + (f", dups {m['dups']}" if m["dups"] else "")
        if b.incomplete:
            r.loss += f"; incomplete broadcasts {b.incomplete[:10]} (receivers {dict(b.receivers)})"
        r.latency = (
            f"last subscriber {stats.nearest_rank(lat, 0.5):.0f} / {stats.nearest_rank(lat, 0.99):.0f} / "
            f"{lat[-1]:.0f}; per delivery {lat_str(m['latency_ms'])}"
            if lat
            else "-"
        )
        cpu_txt, cpu_raw = cpu_per(before, after, m["received"])
        r.cpu = cpu_txt.replace("op", "delivery")
        redis_cpu(r, srv, rbefore, rafter, int(pub.get("published", 0)), "publish")
        if per_conn is not None and base and held:
            r.rss = (
                f"{per_conn:.2f} KiB/conn (workers' VmRSS summed: {base.rss_kib / 1024:.0f} → "
                f"{held.rss_kib / 1024:.0f} MiB)"
            )
            r.raw["rss_kib_per_conn"] = per_conn
        r.errors = err_str(m, {f"pub:{k}": v for k, v in pub.get("error_kinds", {}).items()})
        r.notes.append(
            "RSS per connection = (sum of the workers' VmRSS with every connection subscribed and held, 2 s "
            "after the last was ready - the same sum before the first connection) / established connections; "
            "the supervisor is not counted (it holds no connection)"
        )
        r.notes.append(f"connections per worker (open files held - before): {fd_delta(fd0, fd1)}")
        if after and held:
            r.notes.append(
                f"workers' VmRSS after the broadcast: {after.rss_kib / 1024:.0f} MiB (incl. supervisor)"
            )
        r.notes.append(
            "time to last delivery = receive time of the last subscriber - the publisher's t (taken just "
            "before the HTTP publish is sent), so it includes the publish request, the Lua script and Pub/Sub"
        )
        placement_note(r, cfg, srv)
        if m["close_codes"]:
            r.notes.append(f"close codes seen: {m['close_codes']}")
        r.commands = [*commands(srv.cmd, lgs), f"publisher: {pub_cmd}"]
        r.raw |= {
            "loadgen": reps,
            "merged": m,
            "ready": ready,
            "publisher": pub,
            "server_cpu": cpu_raw,
            "rss_base": base.as_dict() if base else None,
            "rss_held": held.as_dict() if held else None,
            "per_broadcast_ms": {str(o): b.worst_us.get(o, 0) / 1e3 for o in b.offsets},
            "fds": {"before": fd0, "held": fd1},
        }
    return r


async def storm(cfg: Cfg, sz: Sizes, name: str, p: Storm) -> Result:
    r = Result(name, f"{p.clients:,} clients connect at once, each recovers {p.msgs} messages")
    async with running_server(cfg, "memory") as srv:
        prefill = ["--mode", "http", "--host", cfg.target_host, "--port", str(srv.port), *key_args(srv)]
        prefill += ["--channel-fmt", "bench:storm", "--count", str(p.msgs + 1), "--concurrency", "1"]
        pub, pub_cmd = await run_publisher([*prefill, "--duration", "20"], 40)
        first, epoch = pub.get("first_offset"), pub.get("epoch")
        if first is None or pub.get("published") != p.msgs + 1:
            r.errors = f"prefill failed: {pub.get('error_kinds')}"
            r.raw = {"publisher": pub}
            return r
        before = snap(srv)
        procs = nprocs(p.clients)
        mode = ["--recover", "--channels", "1", "--channel-fmt", "bench:storm"]
        mode += ["--since-offset", str(first), "--since-epoch", str(epoch)]
        mode += ["--expect", str(p.msgs), "--quiet", "5"]
        lgs, _ = await start_loadgens(cfg, srv, p.clients, procs, mode, 30)
        reps = await asyncio.gather(*(lg.finish(35) for lg in lgs))
        after = snap(srv)
        m = stats.merge_loadgens(reps)
        cpu_txt, cpu_raw = cpu_per(before, after, m["received"])
        r.clients = f"{m['established']:,} conns ({procs} proc(s))"
        done = m["all_done_ms"]
        r.result = (
            f"all done in {done / 1e3:.2f} s"
            if done >= 0
            else f"NOT all done ({m['done']:,} of {p.clients:,})"
        )
        r.result += f"; done p50/p99 {m['done_ms']['p50'] / 1e3:.2f}/{m['done_ms']['p99'] / 1e3:.2f} s"
        expected = p.msgs * m["subscribed"]
        r.loss = f"{stats.loss(expected, m['received'], m['dups']):,} of {expected:,}"
        if m["recovered_false"]:
            r.loss += f"; recovered=false x{m['recovered_false']}"
        if m["dups"] or m["gaps"]:
            r.loss += f"; dups {m['dups']}, gaps {m['gaps']}"
        r.latency = "-"
        r.cpu = cpu_txt.replace("op", "replayed msg")
        r.rss = rss_str(after)
        r.errors = err_str(m)
        r.commands = commands(srv.cmd, lgs, f"prefill: {pub_cmd}")
        r.raw = {"loadgen": reps, "merged": m, "publisher": pub, "server_cpu": cpu_raw}
    return r


async def publish_only(cfg: Cfg, sz: Sizes, name: str, p: PublishOnly) -> Result:
    """Publishers only, no subscribers (one Python process tops out near 40,000 WebSocket messages/s each
    way, below the server's rate, hence ``procs``); acknowledged publications must be committed."""
    r = Result(name, p.what)
    async with running_server(cfg, p.broker, p.workers) as srv:
        before, rbefore = snap(srv), redis_sample(srv, reset=True)
        argv = [*p.args, "--host", cfg.target_host, "--port", str(srv.port), *key_args(srv)]
        argv += ["--duration", f"{sz.run_s:g}", "--channels", "10", "--channel-fmt", "bench:p{i}"]
        runs = await asyncio.gather(*(run_publisher(argv, sz.run_s + 30) for _ in range(p.procs)))
        after, rafter = snap(srv), redis_sample(srv)
        pubs = [pb for pb, _ in runs]
        pub = stats.merge_publishers(pubs)
        pub_cmd = runs[0][1] + (f"  (x{p.procs} at once)" if p.procs > 1 else "")
        published = int(pub.get("published", 0))
        cpu_txt, cpu_raw = cpu_per(before, after, published)
        r.clients = f"concurrency {pub.get('concurrency')}"
        r.result = f"{fmt_int(pub.get('rate', 0))} publishes/s ({fmt_int(published)} acknowledged)"
        offs = await in_store(cfg, srv, [f"bench:p{i}" for i in range(10)])
        r.loss = committed_str(sum(offs.values()), published, "in Redis" if srv.redis else "committed")
        if p.note:
            r.result += f" [{p.note}]"
            r.notes.append(p.note)
        ack = pub.get("ack_ms", {})
        r.latency = f"ack {ack.get('p50', 0):.1f} / {ack.get('p99', 0):.1f} / {ack.get('max', 0):.1f}"
        r.cpu = cpu_txt.replace("op", "publish")
        redis_cpu(r, srv, rbefore, rafter, published, "publish")
        placement_note(r, cfg, srv)
        r.rss = rss_str(after)
        r.errors = err_str(pub)
        r.commands = [f"server: {srv.cmd}", f"publisher: {pub_cmd}"]
        r.raw |= {"publisher": pubs, "server_cpu": cpu_raw, "committed": offs}
    return r


async def wrk_publish(cfg: Cfg, sz: Sizes, name: str, p: WrkPublish) -> Result:
    """POST ``p.body`` to ``p.path`` with wrk for run_s seconds; check acknowledged == committed after."""
    wrk = wrk_bin(cfg)
    if wrk is None:
        if p.fallback is not None:
            return await publish_only(cfg, sz, name, p.fallback)
        return Result(name, f"POST {p.path}", errors="skipped: needs wrk (not found or --no-wrk)")
    r = Result(name, p.what)
    async with running_server(cfg, p.broker, p.workers) as srv:
        with tempfile.TemporaryDirectory(prefix="tidings-wrk-") as tmp:
            body_txt = orjson.dumps(p.body).decode()
            script, lua = write_wrk_script(srv, Path(tmp), name, p.what, sz.run_s, p.path, body_txt)
            dur = math.ceil(sz.run_s) + 2  # publishing stops after run_s (in the script); 2 s to drain
            argv = [*taskset(cfg.client_cpu), wrk, "-t1", f"-c{p.conns}", f"-d{dur}s", "--timeout", "10s"]
            argv += ["-s", str(script), f"http://{cfg.target_host}:{srv.port}{p.path}"]
            before, rbefore = snap(srv), redis_sample(srv, reset=True)
            w, out = await run_wrk(argv, dur + 20)
            after, rafter = snap(srv), redis_sample(srv)
            if "error" in w:
                r.errors = f"{w['error']} (rc {w.get('rc')}): {w.get('stderr', '')[-200:]}"
                r.raw = {"wrk": w, "stdout": out}
                return r
            offs = await in_store(cfg, srv, p.channels)
            acked = int(w["ok"]) * p.pubs_per_req
            win = w["window_us"] / 1e6
            cpu_txt, cpu_raw = cpu_per(before, after, acked)
            r.clients = f"wrk -t1 -c{p.conns}"
            r.result = (
                f"{fmt_int(stats.rate(acked, win))} {p.unit}/s ({fmt_int(acked)} acknowledged in {win:.1f} s)"
            )
            if p.pubs_per_req > 1:
                r.result += f"; {fmt_int(stats.rate(w['ok'], win))} requests/s"
            r.loss = committed_str(sum(offs.values()), acked, "in Redis" if srv.redis else "committed")
            r.latency = f"request {w['p50_us'] / 1e3:.1f} / {w['p99_us'] / 1e3:.1f} / {w['max_us'] / 1e3:.1f}"
            r.cpu = cpu_txt.replace("op", p.unit1)
            redis_cpu(r, srv, rbefore, rafter, acked, p.unit1)
            placement_note(r, cfg, srv)
            r.rss = rss_str(after)
            errs = {
                "non2xx": int(w["non2xx"]),
                "connect": int(w["connect_errors"]),
                "read": int(w["read_errors"]),
                "write": int(w["write_errors"]),
                "timeout": int(w["timeouts"]),
            }
            r.errors = err_str({}, {k: v for k, v in errs.items() if v})
            r.errors = r.errors if r.errors != "0" else "0 (non-2xx 0)"
            in_flight = int(w["sent"]) - int(w["ok"]) - int(w["non2xx"])
            if in_flight:
                r.notes.append(f"{in_flight} request(s) were still in flight when wrk stopped")
            r.notes.append(
                f"wrk's own Requests/sec ({w.get('requests_per_sec_wrk', 0):,.0f}) divides by its whole "
                f"-d{dur}s; the rate above uses the publishing window (first request to last 2xx)"
            )
            src = "HGET <prefix>:{ch}:m t in Redis" if srv.redis else "history API"
            r.notes.append(f"top offsets afterwards ({src}): {offs}")
            r.commands = [
                f"server: {srv.cmd}",
                f"wrk: {shlex.join(argv)}",
                f"  body ({len(body_txt)} bytes): {body_txt[:160]}{'...' if len(body_txt) > 160 else ''}",
            ]
            r.raw |= {"wrk": w, "committed": offs, "acknowledged": acked, "server_cpu": cpu_raw, "lua": lua}
    return r


async def echo(cfg: Cfg, sz: Sizes, name: str, p: Echo) -> Result:
    r = Result(name, f"/websocket round trips, {p.conns} connections, 1 in flight each")
    async with running_server(cfg, "memory") as srv:
        before = snap(srv)
        lgs, _ = await start_loadgens(cfg, srv, p.conns, 1, ["--echo", "--quiet", "0"], sz.run_s + 2)
        reps = await asyncio.gather(*(lg.finish(sz.run_s + 15) for lg in lgs))
        after = snap(srv)
        m = stats.merge_loadgens(reps)
        cpu_txt, _ = cpu_per(before, after, m["echo_round_trips"])
        r.clients = f"{m['established']:,} conns"
        r.result = f"{fmt_int(m['rate'])} round trips/s"
        r.loss = "-"
        r.latency = "RTT " + lat_str(m["latency_ms"])
        r.cpu = cpu_txt.replace("op", "round trip")
        r.rss = rss_str(after)
        r.errors = err_str(m)
        r.commands = commands(srv.cmd, lgs)
        r.raw = {"loadgen": reps, "merged": m}
    return r


# --------------------------------------------------------------------------------------------- the table
def _http_fanout(rate: str, concurrency: int, what: str, broker: str = "memory") -> Fanout:
    args = ["--mode", "http", "--rate", rate, "--concurrency", str(concurrency)]
    return Fanout(what + _on(broker), channels=1, pub_args=args, broker=broker)


def _on(broker: str, workers: int = 1) -> str:
    """The Load column's suffix naming the broker (and workers) when it is not the scenario default."""
    w = f", --workers {workers}" if workers > 1 else ""
    return {"memory": "", "sqlite": ", SQLite broker", "redis": ", Redis broker"}[broker] + w


def _broadcast(s: Sizes, broker: str = "memory", workers: int = 1) -> Fanout:
    count = max(1, round(s.run_s / s.broadcast_interval))
    args = ["--mode", "http", "--rate", f"{1.0 / s.broadcast_interval:g}", "--concurrency", "1"]
    return Fanout(
        f"{count} single HTTP publishes to 1 channel, one every {s.broadcast_interval * 1e3:g} ms "
        "(no overlap); latency = until the last subscriber got it" + _on(broker, workers),
        channels=1,
        pub_args=[*args, "--count", str(count)],
        lg_extra=("--per-offset",),
        broker=broker,
        workers=workers,
    )


def _broker_name(broker: str) -> str:
    return "broker default (SQLite)" if broker == "sqlite" else "Redis broker"


def _http_publish(s: Sizes, broker: str = "sqlite", workers: int = 1) -> WrkPublish:
    c = s.http_concurrency
    w = f", --workers {workers}" if workers > 1 else ""
    return WrkPublish(
        f"POST /api/publish to 1 channel, {c} concurrent keep-alive (wrk), {_broker_name(broker)}{w}",
        path="/api/publish",
        body=pub_body("bench:c0"),
        conns=c,
        pubs_per_req=1,
        channels=["bench:c0"],
        unit="publishes",
        unit1="publish",
        fallback=PublishOnly(
            f"POST /api/publish, {c} concurrent keep-alive, {_broker_name(broker)}{w}",
            ["--mode", "http", "--concurrency", str(c)],
            note="Python publisher (wrk not found or --no-wrk): client-bound, below the server's rate",
            broker=broker,
            workers=workers,
        ),
        broker=broker,
        workers=workers,
    )


def _http_batch(s: Sizes, broker: str = "sqlite", workers: int = 1) -> WrkPublish:
    w = f", --workers {workers}" if workers > 1 else ""
    return WrkPublish(
        f"POST /api/batch, {s.batch_size} publications per request over 10 channels, "
        f"{s.batch_conns} concurrent keep-alive (wrk), {_broker_name(broker)}{w}",
        path="/api/batch",
        body={"publications": [pub_body(f"bench:c{i % 10}") for i in range(s.batch_size)]},
        conns=s.batch_conns,
        pubs_per_req=s.batch_size,
        channels=[f"bench:c{i}" for i in range(10)],
        unit="publications",
        unit1="publication",
        broker=broker,
        workers=workers,
    )


def _ws_publish(s: Sizes, broker: str = "sqlite", workers: int = 1) -> PublishOnly:
    # with several workers each publisher process opens 2 sockets, so that both workers get some
    conns = 2 if workers > 1 else 1
    w = f", --workers {workers}" if workers > 1 else ""
    return PublishOnly(
        f"/ws publish commands, 2 publisher processes x {conns} socket(s) x {s.ws_window} in flight, "
        f"{_broker_name(broker)}{w}",
        ["--mode", "ws", "--window", str(s.ws_window), "--connections", str(conns)],
        procs=2,
        broker=broker,
        workers=workers,
    )


def _idle_100k(s: Sizes) -> IdleBroadcast:
    n = s.idle_big
    return IdleBroadcast(
        f"{n:,} idle subscribers of 1 channel, --workers {s.idle_big_workers}, Redis broker; then 1 HTTP "
        "publish to all",
        conns=n,
        workers=s.idle_big_workers,
        per_proc=18_000,
    )


SCENARIOS: tuple[Scenario[Any], ...] = (
    Scenario(
        "fanout-1ch-rate",
        "server CPU per delivery and loss, one channel, publishes at a fixed rate",
        fanout,
        lambda s: _http_fanout(f"{s.rate_1ch:g}", 4, f"HTTP publish at {s.rate_1ch:g}/s to 1 channel"),
    ),
    Scenario(
        "fanout-1ch-rate-nometrics",
        "fanout-1ch-rate with metrics = false (no /metrics, no collector): the baseline of the next row",
        fanout,
        lambda s: dataclasses.replace(
            _http_fanout(f"{s.rate_1ch:g}", 4, f"HTTP publish at {s.rate_1ch:g}/s to 1 channel, metrics off"),
            env=(("TIDINGS_METRICS", "false"),),
        ),
    ),
    Scenario(
        "fanout-1ch-rate-counting",
        "fanout-1ch-rate with metrics on, not scraped while publishing: what counting alone costs",
        fanout,
        lambda s: dataclasses.replace(
            _http_fanout(
                f"{s.rate_1ch:g}", 4, f"HTTP publish at {s.rate_1ch:g}/s to 1 channel, metrics on, no scrape"
            ),
            env=(("TIDINGS_METRICS", "true"),),
        ),
    ),
    Scenario(
        "fanout-1ch-rate-metrics",
        "fanout-1ch-rate with metrics on and GET /metrics every second: what counting and scraping cost",
        fanout,
        lambda s: dataclasses.replace(
            _http_fanout(
                f"{s.rate_1ch:g}", 4, f"HTTP publish at {s.rate_1ch:g}/s to 1 channel, /metrics scraped 1/s"
            ),
            env=(("TIDINGS_METRICS", "true"),),
            scrape=1.0,
        ),
    ),
    Scenario(
        "fanout-1ch-sat",
        "deliveries/s the server sustains to one channel, publisher saturating",
        fanout,
        lambda s: _http_fanout(
            "0", s.sat_concurrency, f"HTTP publish saturating ({s.sat_concurrency} in flight) to 1 channel"
        ),
    ),
    Scenario(
        "fanout-1ch-sat16",
        "the same with more publishes in flight: several frames per write",
        fanout,
        lambda s: _http_fanout(
            "0",
            s.sat16_concurrency,
            f"HTTP publish saturating ({s.sat16_concurrency} in flight) to 1 channel",
        ),
    ),
    Scenario(
        "fanout-broadcast",
        "latency of one broadcast until the last subscriber has it",
        broadcast,
        _broadcast,
    ),
    Scenario(
        "fanout-many",
        "fan-out over many channels through /ws publish",
        fanout,
        lambda s: Fanout(
            f"/ws publish at {s.rate_many:g}/s round-robin over {s.channels_many} channels",
            channels=s.channels_many,
            pub_args=["--mode", "ws", "--rate", f"{s.rate_many:g}", "--window", "100"],
        ),
    ),
    Scenario("idle", "server RSS per idle connection", idle, lambda s: Idle(s.idle)),
    Scenario(
        "connect-storm",
        "time until every reconnecting client recovered its missed messages",
        storm,
        lambda s: Storm(s.storm, s.storm_msgs),
    ),
    Scenario(
        "http-publish",
        "HTTP publishes/s with SQLite, acknowledged = committed",
        wrk_publish,
        _http_publish,
    ),
    Scenario(
        "http-batch",
        "publications/s through POST /api/batch, acknowledged = committed",
        wrk_publish,
        _http_batch,
    ),
    Scenario(
        "ws-publish",
        "publishes/s through /ws publish commands, acknowledged = committed",
        publish_only,
        lambda s: PublishOnly(
            f"/ws publish commands, 2 publisher processes x {s.ws_window} in flight on 1 socket each, "
            "broker default (SQLite)",
            ["--mode", "ws", "--window", str(s.ws_window)],
            procs=2,
        ),
    ),
    Scenario(
        "ws-publish-keyed",
        "ws-publish with an idempotency_key on every publish (what the clients send)",
        publish_only,
        lambda s: PublishOnly(
            f"/ws publish commands with idempotency keys, 2 publisher processes x {s.ws_window} in flight "
            "on 1 socket each, broker default (SQLite)",
            ["--mode", "ws", "--keys", "--window", str(s.ws_window)],
            procs=2,
        ),
    ),
    Scenario("echo", "round trips/s and server CPU per round trip", echo, lambda s: Echo(s.echo_conns)),
    Scenario(
        "chatsocket-fanout",
        "fan-out with the original demo's protocol on /chatsocket",
        fanout,
        lambda s: Fanout(
            f"demo /chatsocket: one client sends {s.rate_1ch:g}/s, all receive",
            channels=1,
            pub_args=["--mode", "chatsocket", "--rate", f"{s.rate_1ch:g}"],
            chatsocket=True,
        ),
    ),
    # ---- issue 10: the Redis broker and --workers (docs/scaling.md "Benchmarks")
    Scenario(
        "fanout-1ch-rate-sqlite",
        "fanout-1ch-rate with the SQLite broker: the baseline of fanout-1ch-rate-redis",
        fanout,
        lambda s: _http_fanout(
            f"{s.rate_1ch:g}", 4, f"HTTP publish at {s.rate_1ch:g}/s to 1 channel", "sqlite"
        ),
    ),
    Scenario(
        "fanout-1ch-rate-redis",
        "the same with the Redis broker: a publication crosses Redis once, the fan-out stays local",
        fanout,
        lambda s: _http_fanout(
            f"{s.rate_1ch:g}", 4, f"HTTP publish at {s.rate_1ch:g}/s to 1 channel", "redis"
        ),
    ),
    Scenario(
        "fanout-1ch-sat-sqlite",
        "fanout-1ch-sat with the SQLite broker",
        fanout,
        lambda s: _http_fanout(
            "0",
            s.sat_concurrency,
            f"HTTP publish saturating ({s.sat_concurrency} in flight) to 1 channel",
            "sqlite",
        ),
    ),
    Scenario(
        "fanout-1ch-sat-redis",
        "fanout-1ch-sat with the Redis broker",
        fanout,
        lambda s: _http_fanout(
            "0",
            s.sat_concurrency,
            f"HTTP publish saturating ({s.sat_concurrency} in flight) to 1 channel",
            "redis",
        ),
    ),
    Scenario(
        "http-publish-redis",
        "HTTP publishes/s with Redis, acknowledged = in Redis",
        wrk_publish,
        lambda s: _http_publish(s, "redis"),
    ),
    Scenario(
        "http-publish-redis-w2",
        "the same with --workers 2",
        wrk_publish,
        lambda s: _http_publish(s, "redis", 2),
    ),
    Scenario(
        "http-batch-redis",
        "publications/s through POST /api/batch with Redis, acknowledged = in Redis",
        wrk_publish,
        lambda s: _http_batch(s, "redis"),
    ),
    Scenario(
        "http-batch-redis-w2",
        "the same with --workers 2",
        wrk_publish,
        lambda s: _http_batch(s, "redis", 2),
    ),
    Scenario(
        "ws-publish-redis",
        "publishes/s through /ws publish commands with Redis, acknowledged = in Redis",
        publish_only,
        lambda s: _ws_publish(s, "redis"),
    ),
    Scenario(
        "ws-publish-redis-w2",
        "the same with --workers 2",
        publish_only,
        lambda s: _ws_publish(s, "redis", 2),
    ),
    Scenario(
        "idle-100k-w6",
        "server RSS per connection with 100,000 subscribers over 6 workers, then one broadcast to all",
        idle_broadcast,
        _idle_100k,
        min_timeout=420.0,
    ),
    Scenario(
        "fanout-broadcast-redis-w1",
        "fanout-broadcast with the Redis broker, one worker",
        broadcast,
        lambda s: _broadcast(s, "redis", 1),
    ),
    Scenario(
        "fanout-broadcast-redis-w2",
        "the same over 2 workers (the second shares the clients' CPU)",
        broadcast,
        lambda s: _broadcast(s, "redis", 2),
    ),
)
BY_NAME: dict[str, Scenario[Any]] = {sc.name: sc for sc in SCENARIOS}
