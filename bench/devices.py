"""What an idle device costs the server over plain HTTP, and how soon a long-poll answers (issue 11).

    PYTHONPATH=src python bench/devices.py [--n 10000] [--samples 300] [--out bench/results/X.md]

Starts ``tidings serve`` (memory broker) pinned to CPU 0, and from this process (CPU 1):

1. ``--n`` idle ``/sse`` connections on one channel, each read until its ``event: subscribed``; server
   RSS (VmRSS) per connection = (RSS with all held, 2 s after the last - RSS before the first) / n;
2. the same for ``--n`` pending ``/poll?since=…&timeout=60`` (held: nothing is newer); then ONE publish
   answers them all (time until the last answer);
3. long-poll latency: ``--samples`` times, one pending poll, one HTTP publish; the time from sending the
   publish to the poll's answer (p50 / p99 / max), and server CPU per publish+answer.

Raw asyncio sockets on the client side (no HTTP client library per connection); the open-files limit is
20,000 per process here, so n = 10,000 fits in each process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import procstat
from bench.stats import percentile

HOST = "127.0.0.1"
KEY = secrets.token_hex(16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


async def healthz(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(f"{base}/healthz") as r:
        body: dict[str, Any] = await r.json()
        return body


async def wait_connections(
    session: aiohttp.ClientSession, base: str, n: int, timeout: float, every: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while (await healthz(session, base))["connections"] != n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"server never reached {n} connections")
        await asyncio.sleep(every)


async def open_raw(port: int, path: str, until: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    if until:
        got = b""
        async with asyncio.timeout(60):
            while until not in got:
                chunk = await reader.read(4096)
                if not chunk:
                    raise ConnectionError(f"closed before {until!r}: {got[:200]!r}")
                got += chunk
    return reader, writer


async def many(n: int, make: Any, batch: int = 500) -> list[Any]:
    out: list[Any] = []
    for i in range(0, n, batch):
        out += await asyncio.gather(*(make() for _ in range(min(batch, n - i))))
    return out


async def publish(session: aiohttp.ClientSession, base: str, channel: str, data: Any) -> dict[str, Any]:
    async with session.post(
        f"{base}/api/publish",
        json={"channel": channel, "data": data},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


def settle_sample(pid: int) -> procstat.Sample:
    time.sleep(2.0)
    return procstat.sample(pid)


def start(cmd: list[str], env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[bytes], Any]:
    log = open(log_path, "wb")  # noqa: SIM115 - closed at the end of run()
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log


@contextlib.asynccontextmanager
async def tidings_server(out: dict[str, Any]) -> AsyncIterator[tuple[str, int, int, aiohttp.ClientSession]]:
    """A fresh ``tidings serve`` (memory broker) pinned to CPU 0; this process on CPU 1."""
    port = free_port()
    base = f"http://{HOST}:{port}"
    data_dir = tempfile.mkdtemp(prefix="tidings-devices-")
    env = {
        **os.environ,
        "TIDINGS_API_KEYS": KEY,
        "TIDINGS_CLIENT_RATE": "0",  # one address opens them all
        "TIDINGS_MAX_CONNECTIONS_PER_IP": "0",
        "TIDINGS_LOG_LEVEL": "warning",
        "TIDINGS_POLL_MAX_TIMEOUT": "300",
    }
    cmd = [sys.executable, "-m", "tidings", "serve", "--host", HOST, "--port", str(port)]
    cmd += ["--data-dir", data_dir, "--broker", "memory://"]
    server, log = start(cmd, env, Path(data_dir) / "server.log")
    out["server_cmd"] = " ".join(cmd).replace(data_dir, "<tmp>").replace(str(port), "<port>")
    try:
        try:
            os.sched_setaffinity(server.pid, {0})
            os.sched_setaffinity(0, {1})
        except OSError as exc:
            out["pinning"] = f"not pinned: {exc}"
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(30):
                while True:
                    try:
                        await healthz(session, base)
                        break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.1)
            yield base, port, server.pid, session
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        log.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"n": args.n, "load_before": os.getloadavg()}
    # 1. idle SSE connections (a server of their own)
    async with tidings_server(out) as (base, port, pid, session):
        s0 = settle_sample(pid)
        t0 = time.monotonic()
        conns = await many(args.n, lambda: open_raw(port, "/sse?channel=bench:idle", b"event: subscribed"))
        out["sse_connect_s"] = time.monotonic() - t0
        s1 = settle_sample(pid)
        d = s1 - s0
        out["sse_rss_kib_per_conn"] = d.rss_kib / args.n
        out["sse_rss_kib"] = (s0.rss_kib, s1.rss_kib)
        out["sse_cpu_us_per_connect"] = d.cpu_s * 1e6 / args.n
        await wait_connections(session, base, args.n, 30)
        for _, w in conns:
            w.close()

    # 2. pending long-polls (a fresh server: no memory freed by the phase before to reuse)
    async with tidings_server(out) as (base, port, pid, session):
        epoch = (await (await session.get(f"{base}/poll?channel=bench:poll")).json())["epoch"]
        s2 = settle_sample(pid)
        t0 = time.monotonic()
        path = f"/poll?channel=bench:poll&since=0:{epoch}&timeout=120"
        polls = await many(args.n, lambda: open_raw(port, path, b""))
        await wait_connections(session, base, args.n, 120)
        out["poll_hold_s"] = time.monotonic() - t0
        s3 = settle_sample(pid)
        d = s3 - s2
        out["poll_rss_kib_per_pending"] = d.rss_kib / args.n
        out["poll_rss_kib"] = (s2.rss_kib, s3.rss_kib)
        c0 = procstat.sample(pid)
        t_pub = time.perf_counter()
        await publish(session, base, "bench:poll", {"t": time.time_ns()})

        async def answered(rw: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> float:
            reader, writer = rw
            got = b""
            async with asyncio.timeout(60):
                while b'"recovered":true}' not in got:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    got += chunk
            writer.close()
            assert b'"offset":1' in got, got[-300:]
            return time.perf_counter()

        ends = await asyncio.gather(*(answered(rw) for rw in polls))
        c1 = procstat.sample(pid)
        out["poll_all_answered_ms"] = (max(ends) - t_pub) * 1000
        out["poll_cpu_us_per_answer"] = (c1 - c0).cpu_s * 1e6 / args.n

    # 3. long-poll latency, one at a time
    async with tidings_server(out) as (base, port, pid, session):
        epoch = (await (await session.get(f"{base}/poll?channel=bench:poll")).json())["epoch"]
        lat: list[float] = []
        c0 = procstat.sample(pid)
        for offset in range(args.samples):
            pending = asyncio.ensure_future(
                session.get(f"{base}/poll?channel=bench:poll&since={offset}:{epoch}&timeout=30")
            )
            await wait_connections(session, base, 1, 10, every=0.005)  # the poll is held
            t0 = time.perf_counter()
            pub_task = asyncio.ensure_future(publish(session, base, "bench:poll", {"t": time.time_ns()}))
            resp = await pending
            body = await resp.json()
            lat.append((time.perf_counter() - t0) * 1000)
            await pub_task
            assert [p["offset"] for p in body["publications"]] == [offset + 1], body
        c1 = procstat.sample(pid)
        lat.sort()
        out["latency_ms"] = {
            "p50": percentile(lat, 0.5),
            "p99": percentile(lat, 0.99),
            "max": lat[-1],
            "n": len(lat),
        }
        out["latency_cpu_us_per_cycle"] = (c1 - c0).cpu_s * 1e6 / args.samples
    out["load_after"] = os.getloadavg()
    return out


def report(r: dict[str, Any], command: str) -> str:
    lat = r["latency_ms"]
    n = r["n"]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = " / ".join(", ".join(f"{x:.2f}" for x in r[k]) for k in ("load_before", "load_after"))
    sse_rss = "VmRSS {:,} → {:,} KiB".format(*r["sse_rss_kib"])
    poll_rss = "VmRSS {:,} → {:,} KiB".format(*r["poll_rss_kib"])
    rows = [
        f"| idle `/sse` connection (one channel, subscribed) | {n:,} "
        f"| **{r['sse_rss_kib_per_conn']:.2f} KiB** ({sse_rss}) "
        f"| {r['sse_cpu_us_per_connect']:.0f} µs server CPU per connect+subscribe; "
        f"all connected in {r['sse_connect_s']:.1f} s |",
        f"| pending `/poll` (held, timeout 120 s) | {n:,} "
        f"| **{r['poll_rss_kib_per_pending']:.2f} KiB** ({poll_rss}) "
        f"| one publish answered all {n:,} in {r['poll_all_answered_ms']:.0f} ms; "
        f"{r['poll_cpu_us_per_answer']:.0f} µs server CPU per answer |",
        f"| long-poll answer after a publish | {lat['n']} | "
        f"| **p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms**, max {lat['max']:.2f} ms (from sending "
        f"the HTTP publish to the poll's answer); {r['latency_cpu_us_per_cycle']:.0f} µs server CPU per "
        "cycle (poll request + publish request + answer, and the `/healthz` requests that see it held) |",
    ]
    table = "\n".join(rows)
    return f"""# tidings: idle devices over plain HTTP, and long-poll latency ({when})

| | |
| --- | --- |
| Machine | {os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()} |
| Placement | server on CPU 0, this script's clients and publisher on CPU 1 |
| Command | `{command}` |
| Server | `{r["server_cmd"]}` (`TIDINGS_CLIENT_RATE=0`, `TIDINGS_MAX_CONNECTIONS_PER_IP=0`) |
| Load average before / after | {load} |

| what | n | server RSS per device | other |
| --- | --- | --- | --- |
{table}

RSS per device = (server VmRSS with every device held, 2 s after the last one was ready - VmRSS before the
first) / n; each of the three rows ran against a fresh server. `/sse` is an `HttpStream` that took the
socket over from aiohttp (like a WebSocket: no task, no timer per connection); a pending `/poll` took
the socket over the same way once it has nothing to answer (its `PollWaiter` is the socket's protocol and
the hub's sink, with one timer; the answer is written there and the socket handed back to aiohttp).
Beside this benchmark the machine ran other sessions' work (see the load averages).
`/stream` is the same object as `/sse` (another format).
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    r = asyncio.run(run(args))
    print(orjson.dumps(r, option=orjson.OPT_INDENT_2).decode())
    if args.out:
        cmd = "python bench/devices.py " + " ".join(sys.argv[1:])
        args.out.write_text(report(r, cmd))


if __name__ == "__main__":
    main()
