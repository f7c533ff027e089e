"""Web Push sender throughput: pushes per second from one ``PushService`` (encryption, VAPID, aiohttp POST)
to a loopback push service sink, on one core.

    PYTHONPATH=src python bench/push.py                        # 20,000 pushes, 1,000 devices
    PYTHONPATH=src python bench/push.py --pushes 50000 --profile

This process (the sender: tidings' ``PushService`` with its queue, senders, ``http_ece`` encryption and
aiohttp client) is pinned to CPU 0; the sink (an aiohttp server answering 201 to every POST without
decrypting: its cost is the push service's, not ours) runs in a child process pinned to CPU 1. A
publication in a ``push = "always"`` namespace is offered to the service the way ``Node.submit`` does;
each fans out to ``--devices`` devices (each with its own browser key pair and auth secret).

Reported: pushes/s (wall), this process's CPU per push (getrusage: user+sys, all threads), RSS, and
with ``--profile`` a cProfile of a second run: the share of CPU spent in ``PushService.encrypt``
(RFC 8291: a fresh P-256 key pair, ECDH, HKDF, AES-GCM) and in VAPID signing.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import multiprocessing
import os
import pstats
import resource
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # make `tests` importable

import orjson
from aiohttp import web
from tests.push_service import Browser

from tidings.backends.base import PushDevice
from tidings.backends.push_local import LocalPushStore
from tidings.config import Namespace, Settings
from tidings.policy import Policy
from tidings.protocol import Publication
from tidings.push import PushService


def _sink(sock: socket.socket) -> None:
    os.sched_setaffinity(0, {1 % os.cpu_count()})  # type: ignore[operator]

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=201)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/push/{d}", ok)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock, backlog=1024).start()
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def run(args: argparse.Namespace, port: int, data_dir: Path, profile: bool) -> dict[str, float]:
    settings = Settings(
        data_dir=data_dir,
        push_allowed_hosts=["127.0.0.1"],
        push_senders=args.senders,
        push_queue_size=args.pushes + args.devices + 10,
        push_queue_bytes=1 << 40,
        namespaces={"b": Namespace("b", push="always", publish=True)},
    )
    store = LocalPushStore(None)
    svc = PushService(settings, Policy(settings), store)
    await svc.start()
    for i in range(args.devices):
        sub = Browser(f"http://127.0.0.1:{port}/push/{i}").subscription()
        dev = PushDevice(sub["endpoint"], sub["keys"]["p256dh"], sub["keys"]["auth"], f"ip:{i}", "", ("b:x",))
        await store.add(dev, max_per_owner=10, max_total=10**9)
    data = orjson.dumps({"text": "x" * args.size})
    # The encryption alone, outside any profiler: CPU per call of PushService.encrypt.
    devs = await store.devices("b:x")
    payload = Publication("b:x", 1, "e", "id", 0, raw=data).push_bytes()
    e0 = cpu_s()
    for i in range(2000):
        svc.encrypt(devs[i % len(devs)], payload)
    encrypt_us = (cpu_s() - e0) / 2000 * 1e6
    assert svc.vapid is not None
    v0 = cpu_s()
    for i in range(200):
        svc.vapid.header(f"https://push{i}.example", now=time.time() + 10**6 + i)  # never cached
    sign_us = (cpu_s() - v0) / 200 * 1e6
    pubs = args.pushes // args.devices
    total = pubs * args.devices
    prof = cProfile.Profile() if profile else None
    c0, t0 = cpu_s(), time.perf_counter()
    if prof is not None:
        prof.enable()
    for n in range(1, pubs + 1):
        svc.offer(Publication("b:x", n, "e", f"id{n}", int(time.time() * 1000), raw=data))
    while svc.stats.sent + svc.stats.failed < total:  # noqa: ASYNC110 - a counter, polled
        await asyncio.sleep(0.01)
    if prof is not None:
        prof.disable()
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    out = {
        "pushes": total,
        "failed": svc.stats.failed,
        "retried": svc.stats.retried,
        "seconds": round(wall, 2),
        "pushes_per_s": round(total / wall),
        "cpu_us_per_push": round(cpu / total * 1e6, 1),
        "cpu_util": round(cpu / wall, 2),
        "rss_kib": rss_kib(),
        "payload_bytes": len(payload),
        "encrypt_cpu_us": round(encrypt_us, 1),
        "encrypt_share": round(encrypt_us / (cpu / total * 1e6), 3),
        "vapid_sign_cpu_us": round(sign_us, 1),
    }
    await svc.close()
    if prof is not None:
        st = pstats.Stats(prof)
        tot = sum(v[2] for v in st.stats.values())  # type: ignore[attr-defined]

        def cum(name: str, where: str = "") -> float:
            """Cumulative seconds of functions called ``name`` (in a file ending ``where``); the
            top-level calls only, so recursion or coroutine resumptions are not counted twice."""
            items = st.stats.items()  # type: ignore[attr-defined]
            return sum(v[3] for k, v in items if name in k[2] and k[0].endswith(where))

        out["profile_share_encrypt"] = round(cum("encrypt", "push/service.py") / tot, 3)  # all of RFC 8291
        out["profile_share_keygen"] = round(cum("generate_private_key") / tot, 3)  # its fresh key pair
        out["profile_share_ecdh"] = round(cum("exchange") / tot, 3)
        out["profile_share_vapid"] = round(cum("header", "push/vapid.py") / tot, 3)
        out["profile_share_http"] = round(cum("_request", "aiohttp/client.py") / tot, 3)
        if args.profile_out:
            st.dump_stats(args.profile_out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pushes", type=int, default=20_000)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--senders", type=int, default=32)
    ap.add_argument("--size", type=int, default=100, help="bytes of text in each publication's data")
    ap.add_argument("--profile", action="store_true", help="a second run under cProfile")
    ap.add_argument("--profile-out", default="")
    args = ap.parse_args()
    os.sched_setaffinity(0, {0})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    sink = multiprocessing.get_context("fork").Process(target=_sink, args=(sock,), daemon=True)
    sink.start()
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            try:
                import uvloop

                runner = uvloop.run
            except ImportError:
                runner = asyncio.run
            print(orjson.dumps(runner(run(args, port, Path(tmp), False))).decode(), flush=True)
            if args.profile:
                print(orjson.dumps(runner(run(args, port, Path(tmp), True))).decode(), flush=True)
    finally:
        sink.terminate()
        sink.join(5)


if __name__ == "__main__":
    main()
