"""The standard benchmark set: :data:`SCENARIOS`, one row per scenario (name, what it measures, how it
runs, its parameters at a :class:`Sizes`), and the few runners the rows share.

A runner is ``async (cfg, sizes, name, params) -> Result``; ``params`` is built from the sizes when the
scenario starts (so a publication's ``t`` is taken then, not at import).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
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
    committed,
    key_args,
    nprocs,
    run_publisher,
    run_wrk,
    running_server,
    server_tail,
    snap,
    start_loadgens,
    taskset,
    write_wrk_script,
    wrk_bin,
)
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

    def replace(self, **changes: Any) -> Sizes:
        return dataclasses.replace(self, **changes)


FULL = Sizes(10_000, 100, 19_000, 10_000, 100, 100, 10.0, 30.0, 3000.0, 4, 50, 500)
QUICK = Sizes(500, 10, 1_000, 500, 100, 20, 3.0, 30.0, 300.0, 2, 50, 200)


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


@dataclass(frozen=True)
class PublishOnly:
    """Publishers only, no subscribers; ``procs`` publisher processes at once, their figures summed."""

    what: str
    args: list[str]
    note: str = ""
    procs: int = 1


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


@dataclass(frozen=True)
class Idle:
    conns: int


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

    async def __call__(self, cfg: Cfg, sizes: Sizes) -> Result:
        return await self.run(cfg, sizes, self.name, self.params(sizes))


# --------------------------------------------------------------------------------------------- runners
def commands(srv_cmd: str, lgs: Sequence[Loadgen], *others: str) -> list[str]:
    return [f"server: {srv_cmd}", *others, *(f"loadgen: {shlex.join(lg.argv)}" for lg in lgs)]


async def fanout(cfg: Cfg, sz: Sizes, name: str, p: Fanout) -> Result:
    r = Result(name, p.what)
    async with running_server(cfg, "memory") as srv:
        try:
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
            before = snap(srv)
            common = ["--host", cfg.target_host, "--port", str(srv.port), "--duration", f"{sz.run_s:g}"]
            if not p.chatsocket:
                common += [*key_args(srv), "--channels", str(p.channels), "--channel-fmt", "bench:c{i}"]
            pub, pub_cmd = await run_publisher([*common, *p.pub_args], sz.run_s + 30)
            reps = await asyncio.gather(*(lg.finish(sz.run_s + 20) for lg in lgs))
            after = snap(srv)
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
            r.rss = rss_str(after)
            r.errors = err_str(m, {f"pub:{k}": v for k, v in pub.get("error_kinds", {}).items()})
            r.commands = [*commands(srv.cmd, lgs), f"publisher: {pub_cmd}"]
            if m["received_before_ready"]:
                r.notes.append(f"{m['received_before_ready']:,} frames arrived before all clients were ready")
            if m["close_codes"]:
                r.notes.append(f"close codes seen: {m['close_codes']}")
            r.raw = {
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
    async with running_server(cfg, "sqlite") as srv:
        before = snap(srv)
        argv = [*p.args, "--host", cfg.target_host, "--port", str(srv.port), *key_args(srv)]
        argv += ["--duration", f"{sz.run_s:g}", "--channels", "10", "--channel-fmt", "bench:p{i}"]
        runs = await asyncio.gather(*(run_publisher(argv, sz.run_s + 30) for _ in range(p.procs)))
        after = snap(srv)
        pubs = [pb for pb, _ in runs]
        pub = stats.merge_publishers(pubs)
        pub_cmd = runs[0][1] + (f"  (x{p.procs} at once)" if p.procs > 1 else "")
        published = int(pub.get("published", 0))
        cpu_txt, cpu_raw = cpu_per(before, after, published)
        r.clients = f"concurrency {pub.get('concurrency')}"
        r.result = f"{fmt_int(pub.get('rate', 0))} publishes/s ({fmt_int(published)} acknowledged)"
        offs = await committed(cfg, srv, [f"bench:p{i}" for i in range(10)])
        r.loss = committed_str(sum(offs.values()), published)
        if p.note:
            r.result += f" [{p.note}]"
            r.notes.append(p.note)
        ack = pub.get("ack_ms", {})
        r.latency = f"ack {ack.get('p50', 0):.1f} / {ack.get('p99', 0):.1f} / {ack.get('max', 0):.1f}"
        r.cpu = cpu_txt.replace("op", "publish")
        r.rss = rss_str(after)
        r.errors = err_str(pub)
        r.commands = [f"server: {srv.cmd}", f"publisher: {pub_cmd}"]
        r.raw = {"publisher": pubs, "server_cpu": cpu_raw, "committed": offs}
    return r


async def wrk_publish(cfg: Cfg, sz: Sizes, name: str, p: WrkPublish) -> Result:
    """POST ``p.body`` to ``p.path`` with wrk for run_s seconds; check acknowledged == committed after."""
    wrk = wrk_bin(cfg)
    if wrk is None:
        if p.fallback is not None:
            return await publish_only(cfg, sz, name, p.fallback)
        return Result(name, f"POST {p.path}", errors="skipped: needs wrk (not found or --no-wrk)")
    r = Result(name, p.what)
    async with running_server(cfg, "sqlite") as srv:
        with tempfile.TemporaryDirectory(prefix="tidings-wrk-") as tmp:
            body_txt = orjson.dumps(p.body).decode()
            script, lua = write_wrk_script(srv, Path(tmp), name, p.what, sz.run_s, p.path, body_txt)
            dur = math.ceil(sz.run_s) + 2  # publishing stops after run_s (in the script); 2 s to drain
            argv = [*taskset(cfg.client_cpu), wrk, "-t1", f"-c{p.conns}", f"-d{dur}s", "--timeout", "10s"]
            argv += ["-s", str(script), f"http://{cfg.target_host}:{srv.port}{p.path}"]
            before = snap(srv)
            w, out = await run_wrk(argv, dur + 20)
            after = snap(srv)
            if "error" in w:
                r.errors = f"{w['error']} (rc {w.get('rc')}): {w.get('stderr', '')[-200:]}"
                r.raw = {"wrk": w, "stdout": out}
                return r
            offs = await committed(cfg, srv, p.channels)
            acked = int(w["ok"]) * p.pubs_per_req
            win = w["window_us"] / 1e6
            cpu_txt, cpu_raw = cpu_per(before, after, acked)
            r.clients = f"wrk -t1 -c{p.conns}"
            r.result = (
                f"{fmt_int(stats.rate(acked, win))} {p.unit}/s ({fmt_int(acked)} acknowledged in {win:.1f} s)"
            )
            if p.pubs_per_req > 1:
                r.result += f"; {fmt_int(stats.rate(w['ok'], win))} requests/s"
            r.loss = committed_str(sum(offs.values()), acked)
            r.latency = f"request {w['p50_us'] / 1e3:.1f} / {w['p99_us'] / 1e3:.1f} / {w['max_us'] / 1e3:.1f}"
            r.cpu = cpu_txt.replace("op", p.unit1)
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
            r.notes.append(f"history top offsets afterwards: {offs}")
            r.commands = [
                f"server: {srv.cmd}",
                f"wrk: {shlex.join(argv)}",
                f"  body ({len(body_txt)} bytes): {body_txt[:160]}{'...' if len(body_txt) > 160 else ''}",
            ]
            r.raw = {"wrk": w, "committed": offs, "acknowledged": acked, "server_cpu": cpu_raw, "lua": lua}
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
def _http_fanout(rate: str, concurrency: int, what: str) -> Fanout:
    args = ["--mode", "http", "--rate", rate, "--concurrency", str(concurrency)]
    return Fanout(what, channels=1, pub_args=args)


def _broadcast(s: Sizes) -> Fanout:
    count = max(1, round(s.run_s / s.broadcast_interval))
    args = ["--mode", "http", "--rate", f"{1.0 / s.broadcast_interval:g}", "--concurrency", "1"]
    return Fanout(
        f"{count} single HTTP publishes to 1 channel, one every {s.broadcast_interval * 1e3:g} ms "
        "(no overlap); latency = until the last subscriber got it",
        channels=1,
        pub_args=[*args, "--count", str(count)],
        lg_extra=("--per-offset",),
    )


def _http_publish(s: Sizes) -> WrkPublish:
    c = s.http_concurrency
    return WrkPublish(
        f"POST /api/publish to 1 channel, {c} concurrent keep-alive (wrk), broker default (SQLite)",
        path="/api/publish",
        body=pub_body("bench:c0"),
        conns=c,
        pubs_per_req=1,
        channels=["bench:c0"],
        unit="publishes",
        unit1="publish",
        fallback=PublishOnly(
            f"POST /api/publish, {c} concurrent keep-alive, broker default (SQLite)",
            ["--mode", "http", "--concurrency", str(c)],
            note="Python publisher (wrk not found or --no-wrk): client-bound, below the server's rate",
        ),
    )


def _http_batch(s: Sizes) -> WrkPublish:
    return WrkPublish(
        f"POST /api/batch, {s.batch_size} publications per request over 10 channels, "
        f"{s.batch_conns} concurrent keep-alive (wrk), broker default (SQLite)",
        path="/api/batch",
        body={"publications": [pub_body(f"bench:c{i % 10}") for i in range(s.batch_size)]},
        conns=s.batch_conns,
        pubs_per_req=s.batch_size,
        channels=[f"bench:c{i}" for i in range(10)],
        unit="publications",
        unit1="publication",
    )


SCENARIOS: tuple[Scenario[Any], ...] = (
    Scenario(
        "fanout-1ch-rate",
        "server CPU per delivery and loss, one channel, publishes at a fixed rate",
        fanout,
        lambda s: _http_fanout(f"{s.rate_1ch:g}", 4, f"HTTP publish at {s.rate_1ch:g}/s to 1 channel"),
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
)
BY_NAME: dict[str, Scenario[Any]] = {sc.name: sc for sc in SCENARIOS}
