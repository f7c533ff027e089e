"""Benchmark publisher for tidings: HTTP API, /ws publish commands, or the demo /chatsocket.

Every publication's data is ``{"t": time.time_ns(), "pad": "x" * P}`` (``t`` is what the loadgen
uses for latency); ``--size`` picks P so the data is about that many bytes. On /chatsocket the body
is ``"t=<ns> xxx..."``.

Modes:
  http        POST /api/publish with ``Authorization: Bearer <key>``, K concurrent keep-alive requests.
  ws          ``{"op":"publish"}`` commands over --connections /ws sockets, W in flight on each.
  chatsocket  ``{"body": ...}`` frames on /chatsocket (original demo protocol), no acks.

At a target ``--rate`` (publishes/s, spread evenly in time) or saturating (``--rate 0``). Stops after
``--count`` publishes or ``--duration`` seconds, whichever comes first (the duration always applies).
Prints one JSON line: published (acknowledged), errors, achieved rate, ack latency, epoch and offsets.
Loopback targets only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import itertools
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.stats import percentile, rate

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]


@dataclass
class Stats:
    published: int = 0
    sent: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    ack_ns: list[int] = field(default_factory=list)
    per_channel: Counter[str] = field(default_factory=Counter)
    epoch: str | None = None
    first_offset: int | None = None
    last_offset: int | None = None
    first_sent_ns: int = 0
    last_ack_ns: int = 0

    def ack(self, channel: str, result: dict[str, Any], sent_ns: int) -> None:
        now = time.time_ns()
        self.published += 1
        self.per_channel[channel] += 1
        self.ack_ns.append(now - sent_ns)
        self.last_ack_ns = now
        off = result.get("offset")
        if isinstance(off, int):
            if self.first_offset is None:
                self.first_offset = off
                self.epoch = result.get("epoch")
            self.last_offset = off if self.last_offset is None else max(self.last_offset, off)


class Schedule:
    """Hands out publication indexes; with a rate, index i is released at start + i/rate."""

    def __init__(self, rate: float, count: int, deadline: float) -> None:
        self.rate = rate
        self.count = count
        self.deadline = deadline
        self.start = time.monotonic()
        self._next = itertools.count()

    async def take(self) -> int | None:
        i = next(self._next)
        if self.count and i >= self.count:
            return None
        if self.rate > 0:
            due = self.start + i / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        if time.monotonic() >= self.deadline:
            return None
        return i


def pad_for(size: int) -> str:
    """The padding that makes ``make_data`` about ``size`` bytes of JSON (``t`` has 19 digits)."""
    return "x" * max(0, size - 34)


def make_data(pad: str) -> dict[str, Any]:
    return {"t": time.time_ns(), "pad": pad}


def channel_name(fmt: str, i: int, channels: int) -> str:
    return fmt.format(i=i % channels) if "{i}" in fmt else fmt


async def run_http(a: argparse.Namespace, st: Stats, sched: Schedule, pad: str) -> None:
    url = f"http://{a.host}:{a.port}/api/publish"
    headers = {"Authorization": f"Bearer {a.api_key}", "Content-Type": "application/json"}
    conn = aiohttp.TCPConnector(limit=a.concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:

        async def worker() -> None:
            while (i := await sched.take()) is not None:
                ch = channel_name(a.channel_fmt, i, a.channels)
                pub: dict[str, Any] = {"channel": ch, "data": make_data(pad)}
                if a.keys:
                    pub["idempotency_key"] = f"{os.getpid()}-{i}"
                body = orjson.dumps(pub)
                sent = time.time_ns()
                st.sent += 1
                try:
                    async with s.post(url, data=body, headers=headers) as r:
                        raw = await r.read()
                        if r.status == 200:
                            st.ack(ch, orjson.loads(raw), sent)
                        else:
                            code = "?"
                            with contextlib.suppress(Exception):
                                code = orjson.loads(raw)["error"]["code"]
                            st.errors[f"http:{r.status}:{code}"] += 1
                except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as e:
                    st.errors[type(e).__name__] += 1
                    await asyncio.sleep(0.01)

        st.first_sent_ns = time.time_ns()
        await asyncio.gather(*(worker() for _ in range(a.concurrency)))


async def run_ws(a: argparse.Namespace, st: Stats, sched: Schedule, pad: str) -> None:
    url = f"http://{a.host}:{a.port}{a.path or '/ws'}"
    async with aiohttp.ClientSession() as s:

        async def one(k: int) -> None:
            async with s.ws_connect(url, max_msg_size=0, autoping=True) as ws:
                window = asyncio.Semaphore(a.window)
                pending: dict[int, tuple[str, int]] = {}
                done_sending = asyncio.Event()

                async def reader() -> None:
                    async for msg in ws:
                        if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                            continue
                        rep = orjson.loads(msg.data)
                        rid = rep.get("id")
                        if rid is None or rid not in pending:
                            continue
                        ch, sent = pending.pop(rid)
                        window.release()
                        if rep.get("ok"):
                            st.ack(ch, rep.get("result") or {}, sent)
                        else:
                            st.errors[f"ws:{(rep.get('error') or {}).get('code', '?')}"] += 1
                        if done_sending.is_set() and not pending:
                            return
                    if pending:
                        st.errors["ws_closed"] += 1
                    for _ in range(a.window):  # unblock the sender
                        window.release()

                rtask = asyncio.create_task(reader())
                mid = k * 1_000_000_000
                while (i := await sched.take()) is not None:
                    await window.acquire()
                    if rtask.done():
                        break
                    mid += 1
                    ch = channel_name(a.channel_fmt, i, a.channels)
                    pending[mid] = (ch, time.time_ns())
                    st.sent += 1
                    cmd = {"id": mid, "op": "publish", "channel": ch, "data": make_data(pad)}
                    if a.keys:
                        cmd["idempotency_key"] = f"{os.getpid()}-{k}-{mid}"
                    await ws.send_bytes(orjson.dumps(cmd)) if a.binary else await ws.send_str(
                        orjson.dumps(cmd).decode()
                    )
                done_sending.set()
                if pending:
                    try:
                        await asyncio.wait_for(rtask, timeout=max(1.0, sched.deadline - time.monotonic() + 5))
                    except TimeoutError:
                        st.errors["ack_timeout"] += len(pending)
                rtask.cancel()

        st.first_sent_ns = time.time_ns()
        await asyncio.gather(*(one(k) for k in range(a.connections)))


async def run_chatsocket(a: argparse.Namespace, st: Stats, sched: Schedule, pad: str) -> None:
    url = f"http://{a.host}:{a.port}{a.path or '/chatsocket'}"
    mine: dict[str, int] = {}  # body -> send time; the demo sends every message to every client, us too
    echoed = asyncio.Event()
    sending_done = False
    async with aiohttp.ClientSession() as s, s.ws_connect(url, max_msg_size=0) as ws:

        async def drain() -> None:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                    sent = mine.pop(orjson.loads(msg.data)["body"], None)
                    if sent is not None:  # our own message came back: count it as acknowledged
                        st.ack("chat:lobby", {}, sent)
                if sending_done and not mine:
                    echoed.set()
            echoed.set()

        dtask = asyncio.create_task(drain())
        st.first_sent_ns = time.time_ns()
        while await sched.take() is not None:
            sent = time.time_ns()
            body = f"t={sent} {pad}"
            mine[body] = sent
            st.sent += 1
            await ws.send_str(orjson.dumps({"body": body}).decode())
        sending_done = True
        if mine:
            try:  # wait (bounded) until every message we sent came back to us
                await asyncio.wait_for(echoed.wait(), timeout=10)
            except TimeoutError:
                st.errors["not_echoed"] += len(mine)
        dtask.cancel()


async def main_async(a: argparse.Namespace) -> dict[str, Any]:
    st = Stats()
    pad = pad_for(a.size)
    sched = Schedule(a.rate, a.count, time.monotonic() + a.duration)
    runner = {"http": run_http, "ws": run_ws, "chatsocket": run_chatsocket}[a.mode]
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(runner(a, st, sched, pad), timeout=a.duration + 15)
    except TimeoutError:
        st.errors["publisher_timeout"] += 1
    except (aiohttp.ClientError, OSError) as e:
        st.errors[f"{type(e).__name__}"] += 1
    elapsed = time.monotonic() - t0
    span = (st.last_ack_ns - st.first_sent_ns) / 1e9 if st.last_ack_ns else elapsed
    return {
        "mode": a.mode,
        "published": st.published,
        "sent": st.sent,
        "errors": sum(st.errors.values()),
        "error_kinds": dict(st.errors),
        "elapsed_s": round(elapsed, 3),
        "rate": round(rate(st.published, span), 1),
        "target_rate": a.rate,
        "concurrency": a.concurrency if a.mode == "http" else a.window * a.connections,
        "ack_ms": {
            "p50": round(percentile(st.ack_ns, 0.5) / 1e6, 3),
            "p99": round(percentile(st.ack_ns, 0.99) / 1e6, 3),
            "max": round(max(st.ack_ns, default=0) / 1e6, 3),
        },
        "epoch": st.epoch,
        "first_offset": st.first_offset,
        "last_offset": st.last_offset,
        "per_channel": dict(st.per_channel),
        "first_sent_ns": st.first_sent_ns,
        "last_ack_ns": st.last_ack_ns,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["http", "ws", "chatsocket"], default="http")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8888)
    p.add_argument("--path", default=None, help="WebSocket path (default /ws or /chatsocket)")
    p.add_argument("--api-key", default="", help="HTTP API key (or --api-key-file)")
    p.add_argument("--api-key-file", default=None)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--channel-fmt", default="bench:c{i}", help="channel name; {i} = index %% channels")
    p.add_argument("--rate", type=float, default=0.0, help="publishes/s in total; 0 = saturate")
    p.add_argument("--count", type=int, default=0, help="stop after this many (0 = until --duration)")
    p.add_argument("--duration", type=float, default=10.0, help="hard cap in seconds")
    p.add_argument("--concurrency", type=int, default=50, help="http: concurrent keep-alive requests")
    p.add_argument("--connections", type=int, default=1, help="ws: sockets")
    p.add_argument("--window", type=int, default=500, help="ws: publishes in flight per socket")
    p.add_argument("--binary", action="store_true", help="ws: send commands as binary frames")
    p.add_argument("--size", type=int, default=100, help="approximate bytes of each publication's data")
    p.add_argument("--keys", action="store_true", help="give every publish its own idempotency_key")
    a = p.parse_args(argv)
    if not ipaddress.ip_address(a.host).is_loopback:
        p.error("only loopback hosts are allowed")
    if not 0 < a.duration <= 600:
        p.error("--duration must be in (0, 600]")
    if a.api_key_file:
        with open(a.api_key_file) as f:
            a.api_key = f.read().strip()
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop is not None else None) as runner:
        res = runner.run(main_async(a))
    sys.stdout.write(orjson.dumps(res).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
