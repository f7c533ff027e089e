"""/sse, /stream and /poll: live delivery, resume with Last-Event-ID / since, reset, long-poll, curl,
slow readers, limits, drain, bad inputs. Real servers, real clients (aiohttp, curl)."""

from __future__ import annotations

import asyncio
import re
import shlex
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tidings.config import Namespace
from tidings.protocol import CloseCode

from .conftest import ProbeFactory, Server, ServerFactory, api_headers
from .sse_helpers import sse
from .test_auth import SECRET, claims, hs

T = 10.0  # bound of every wait, seconds
PERSONAL = {"user": Namespace("user", anonymous=False, personal=True)}


async def publish(session: aiohttp.ClientSession, srv: Server, channel: str, data: Any) -> dict[str, Any]:
    async with session.post(
        f"{srv.http}/api/publish", json={"channel": channel, "data": data}, headers=api_headers()
    ) as r:
        assert r.status == 200, await r.text()
        result: dict[str, Any] = await r.json()
        return result


async def live_in(srv: Server, channel: str, n: int) -> None:
    """Wait until ``n`` subscribers of ``channel`` on this node are live (the stream is subscribed)."""
    async with asyncio.timeout(T):
        while sum(srv.node.hub.is_live(channel, s) for s in srv.node.hub.subscribers(channel)) < n:
            await asyncio.sleep(0.01)


async def no_connections(srv: Server) -> None:
    async with asyncio.timeout(T):
        while srv.node.connections:
            await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------------------- SSE


async def test_sse_delivers_the_ws_push_and_resumes_with_last_event_id(
    server: Server, session: aiohttp.ClientSession, probe: ProbeFactory
) -> None:
    ws = await probe(server)
    await ws.ok("subscribe", channel="pub:a")
    url = f"{server.http}/sse?channel=pub:a&channel=pub:b"
    async with sse(session, url) as r:
        hello = await r.until("subscribed")
        assert r.retry == int(server.settings.sse_retry * 1000)
        chans = hello.json()["channels"]
        assert [c["channel"] for c in chans] == ["pub:a", "pub:b"]
        assert [c["recovered"] for c in chans] == [None, None]
        ea, eb = chans[0]["epoch"], chans[1]["epoch"]
        assert hello.id == f"0:{ea};0:{eb}"
        await publish(session, server, "pub:a", {"n": 1})
        await publish(session, server, "pub:b", {"n": 2})
        got = await r.messages(2)
        # The data of each event is exactly the /ws message push.
        assert got[0] == (await ws.messages(1))[0]
        assert [(m["channel"], m["offset"], m["data"]) for m in got] == [
            ("pub:a", 1, {"n": 1}),
            ("pub:b", 1, {"n": 2}),
        ]
        assert r.last_id == f"1:{ea};1:{eb}"
        last = r.last_id
    # Away: three more; the reconnect with Last-Event-ID gets exactly those, then live ones.
    for i in range(3):
        await publish(session, server, "pub:a" if i % 2 else "pub:b", {"away": i})
    async with sse(session, url, headers={"Last-Event-ID": last}) as r:
        got = await r.messages(3)
        # The replay goes channel by channel (in order within each).
        assert [(m["channel"], m["offset"]) for m in got] == [("pub:a", 2), ("pub:b", 2), ("pub:b", 3)]
        hello = await r.until("subscribed")
        assert [c["recovered"] for c in hello.json()["channels"]] == [True, True]
        assert [(c["offset"], c["channel"]) for c in hello.json()["channels"]] == [(2, "pub:a"), (3, "pub:b")]
        await publish(session, server, "pub:a", "live")
        [m] = await r.messages(1)
        assert (m["offset"], m["data"]) == (3, "live")
        assert r.last_id == f"3:{ea};3:{eb}"
    # ?since= works the same way (and Last-Event-ID, when both are given, wins: it is newer).
    async with sse(session, f"{url}&since=2:{ea};-") as r:
        got = await r.messages(1)
        assert (got[0]["channel"], got[0]["offset"]) == ("pub:a", 3)
        chans = (await r.until("subscribed")).json()["channels"]
        assert [c["recovered"] for c in chans] == [True, None]
    async with sse(session, f"{url}&since=0:{ea};-", headers={"Last-Event-ID": f"3:{ea};3:{eb}"}) as r:
        chans = (await r.until("subscribed")).json()["channels"]
        assert [c["recovered"] for c in chans] == [True, True]


async def test_sse_one_channel_event_bytes_are_shared(server: Server, session: aiohttp.ClientSession) -> None:
    """One channel: the whole event (id included) is built once for every subscriber (the format cache)."""
    from tidings.transports.sse import sse_event

    async with (
        sse(session, f"{server.http}/sse?channel=pub:one") as r1,
        sse(session, f"{server.http}/sse?channel=pub:one") as r2,
    ):
        await r1.until("subscribed")
        await r2.until("subscribed")
        seen: list[Any] = []
        orig = server.node.hub.deliver

        def spy(pub: Any) -> int:
            n = orig(pub)
            seen.append(pub)
            return n

        server.node.hub.deliver = spy  # type: ignore[method-assign]
        server.node.subscriptions.deliver = spy  # type: ignore[method-assign]
        await publish(session, server, "pub:one", 1)
        [a] = await r1.messages(1)
        [b] = await r2.messages(1)
        assert a == b
        cache = seen[0].cache
        assert cache is not None and sse_event in cache
        assert cache[sse_event].startswith(b"id: 1:")


async def test_sse_unrecoverable_position_gets_reset(
    start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server()  # namespace small: history_size 5
    url = f"{srv.http}/sse?channel=small:x&channel=pub:y"
    async with sse(session, url) as r:
        ep = (await r.until("subscribed")).json()["channels"]
        es, ey = ep[0]["epoch"], ep[1]["epoch"]
    for i in range(8):
        await publish(session, srv, "small:x", i)
    await publish(session, srv, "pub:y", "y1")
    # Offset 1 of small:x is gone (history keeps 5): reset for it; pub:y recovers.
    async with sse(session, url, headers={"Last-Event-ID": f"1:{es};0:{ey}"}) as r:
        first = await r.next()
        assert first.event == "reset"
        body = first.json()
        assert body["type"] == "reset" and body["channel"] == "small:x" and body["offset"] == 8
        assert body["epoch"] == es and "reload" in body["reason"]
        assert first.id == f"8:{es};-"  # the reset moved the position: no reset again after a reconnect
        [m] = await r.messages(1)
        assert (m["channel"], m["offset"]) == ("pub:y", 1)
        chans = (await r.until("subscribed")).json()["channels"]
        assert [c["recovered"] for c in chans] == [False, True]
        await publish(session, srv, "small:x", "after")
        [m] = await r.messages(1)
        assert (m["channel"], m["offset"], m["data"]) == ("small:x", 9, "after")
    # Another epoch (the channel's stream was lost and restarted): reset too.
    async with sse(session, url, headers={"Last-Event-ID": f"9:stale;1:{ey}"}) as r:
        ev = await r.next()
        assert ev.event == "reset" and ev.json()["channel"] == "small:x"
        chans = (await r.until("subscribed")).json()["channels"]
        assert [c["recovered"] for c in chans] == [False, True]


async def test_sse_join_leave_and_keepalive(
    start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(ping_interval=0.1)
    async with sse(session, f"{srv.http}/sse?channel=chat:room") as r:
        await r.until("subscribed")
        async with sse(session, f"{srv.http}/sse?channel=chat:room") as other:
            await other.until("subscribed")
            join = await r.until("join")
            assert join.json()["type"] == "join" and join.json()["channel"] == "chat:room"
        assert (await r.until("leave")).json()["type"] == "leave"
        async with asyncio.timeout(T):
            while r.comments < 3:
                await asyncio.sleep(0.05)
                with pytest.raises(TimeoutError):
                    await r.next(0.15)


async def test_sse_tokens_header_and_query_and_expiry(
    start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(token_secret=SECRET, allow_anonymous=False, namespaces=PERSONAL)
    async with session.get(f"{srv.http}/sse?channel=pub:t") as resp:
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"
    tok = hs(claims("alice"))
    async with sse(session, f"{srv.http}/sse?channel=user:alice&token={tok}") as r:
        await r.until("subscribed")
    async with sse(
        session,
        f"{srv.http}/stream?channel=user:alice".replace("/stream", "/sse"),
        headers={"Authorization": f"Bearer {tok}"},
    ) as r:
        await r.until("subscribed")
    async with session.get(
        f"{srv.http}/sse?channel=user:bob", headers={"Authorization": f"Bearer {tok}"}
    ) as resp:
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "permission_denied"
    # A connection token that expires ends the stream with 4002 (reconnect with a fresh token).
    short = hs(claims("alice", ttl=1.5))
    async with sse(session, f"{srv.http}/sse?channel=user:alice&token={short}") as r:
        bye = await r.until("disconnect", timeout=T)
        assert bye.json()["code"] == CloseCode.TOKEN_EXPIRED and bye.json()["reconnect"] is True
        with pytest.raises(EOFError):
            await r.next()


async def test_sse_lost_channel_ends_with_1012_and_the_reconnect_recovers(
    server: Server, session: aiohttp.ClientSession
) -> None:
    url = f"{server.http}/sse?channel=pub:l"
    async with sse(session, url) as r:
        await r.until("subscribed")
        await publish(session, server, "pub:l", 1)
        await r.messages(1)
        server.node.subscriptions.lost("pub:l")
        bye = await r.until("disconnect")
        assert bye.json() == {
            "type": "disconnect",
            "code": 1012,
            "reason": "service restart",
            "reconnect": True,
        }
        last = r.last_id
        with pytest.raises(EOFError):
            await r.next()
    await publish(session, server, "pub:l", 2)
    assert last is not None
    async with sse(session, url, headers={"Last-Event-ID": last}) as r:
        [m] = await r.messages(1)
        assert m["offset"] == 2


async def test_drain_ends_streams_with_1001_and_answers_pending_polls(
    start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server()
    async with sse(session, f"{srv.http}/sse?channel=pub:d") as r:
        s = await r.until("subscribed")
        epoch = s.json()["channels"][0]["epoch"]
        poll = asyncio.ensure_future(session.get(f"{srv.http}/poll?channel=pub:d&since=0:{epoch}&timeout=30"))
        await live_in(srv, "pub:d", 2)
        stop = asyncio.ensure_future(srv.stop())
        bye = await r.until("disconnect")
        assert bye.json()["code"] == CloseCode.GOING_AWAY and bye.json()["reconnect"] is True
        async with asyncio.timeout(T):
            resp = await poll
            assert resp.status == 200
            assert (await resp.json())["publications"] == []
            resp.close()
            await stop


# ---------------------------------------------------------------------------------------------- /stream


async def test_stream_with_curl(server: Server, session: aiohttp.ClientSession) -> None:
    """/stream is newline-delimited JSON, read by a real ``curl -N``."""
    curl = await asyncio.create_subprocess_exec(
        "curl",
        "-N",
        "-s",
        "--max-time",
        "20",
        f"{server.http}/stream?channel=pub:c",
        stdout=asyncio.subprocess.PIPE,
    )
    assert curl.stdout is not None
    try:
        async with asyncio.timeout(T):
            first = orjson.loads(await curl.stdout.readline())
            assert first["type"] == "subscribed" and first["channels"][0]["channel"] == "pub:c"
            await publish(session, server, "pub:c", {"x": 1})
            await publish(session, server, "pub:c", {"x": 2})
            lines = [orjson.loads(await curl.stdout.readline()) for _ in range(2)]
        assert [(m["type"], m["offset"], m["data"]) for m in lines] == [
            ("message", 1, {"x": 1}),
            ("message", 2, {"x": 2}),
        ]
        # since= resumes a stream too
        epoch = first["channels"][0]["epoch"]
        async with session.get(f"{server.http}/stream?channel=pub:c&since=1:{epoch}") as resp:
            assert resp.headers["Content-Type"] == "application/x-ndjson"
            async with asyncio.timeout(T):
                m = orjson.loads(await resp.content.readline())
                assert (m["type"], m["offset"]) == ("message", 2)
                s = orjson.loads(await resp.content.readline())
                assert s["type"] == "subscribed" and s["channels"][0]["recovered"] is True
    finally:
        if curl.returncode is None:
            curl.terminate()
        await curl.wait()


# ---------------------------------------------------------------------------------------------- /poll


async def poll(session: aiohttp.ClientSession, srv: Server, query: str, status: int = 200) -> Any:
    async with asyncio.timeout(T + 5):
        async with session.get(f"{srv.http}/poll?{query}") as resp:
            body = await resp.json()
            assert resp.status == status, body
            return body


async def test_poll_position_at_once_then_newer_at_once(
    server: Server, session: aiohttp.ClientSession
) -> None:
    top = await poll(session, server, "channel=pub:p")
    assert top["publications"] == [] and top["offset"] == 0 and top["recovered"] is None
    epoch = top["epoch"]
    for i in range(3):
        await publish(session, server, "pub:p", i)
    t0 = time.monotonic()
    got = await poll(session, server, f"channel=pub:p&since=1:{epoch}&timeout=30")
    assert time.monotonic() - t0 < 5  # at once, not after the timeout
    assert [p["offset"] for p in got["publications"]] == [2, 3]
    assert (got["offset"], got["epoch"], got["recovered"]) == (3, epoch, True)
    assert got["publications"][0]["data"] == 1 and got["publications"][0]["channel"] == "pub:p"


async def test_poll_holds_until_a_publish(server: Server, session: aiohttp.ClientSession) -> None:
    epoch = (await poll(session, server, "channel=pub:h"))["epoch"]
    latencies = []
    for i in range(5):
        pending = asyncio.ensure_future(poll(session, server, f"channel=pub:h&since={i}:{epoch}&timeout=30"))
        await live_in(server, "pub:h", 1)
        assert not pending.done()
        t0 = time.monotonic()
        await publish(session, server, "pub:h", {"i": i})
        got = await pending
        latencies.append(time.monotonic() - t0)
        assert [(p["offset"], p["data"]) for p in got["publications"]] == [(i + 1, {"i": i})]
        assert (got["offset"], got["recovered"]) == (i + 1, True)
    ms = [round(x * 1000, 1) for x in latencies]
    print(f"long-poll answer after publish (incl. the publish request): {ms} ms")
    assert max(latencies) < 2.0  # generous: the figure is measured in bench/


async def test_poll_timeout_answers_empty_same_position(
    server: Server, session: aiohttp.ClientSession
) -> None:
    epoch = (await poll(session, server, "channel=pub:e"))["epoch"]
    t0 = time.monotonic()
    got = await poll(session, server, f"channel=pub:e&since=0:{epoch}&timeout=0.4")
    assert time.monotonic() - t0 >= 0.35
    assert got == {"publications": [], "offset": 0, "epoch": epoch, "recovered": True}
    await no_connections(server)  # the waiter is gone from the node
    assert server.node.hub.subscribers("pub:e") == []


async def _raw_response(reader: asyncio.StreamReader) -> tuple[dict[str, str], Any]:
    """One HTTP/1.1 response with a Content-Length body, read off a raw socket."""
    async with asyncio.timeout(T):
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        assert head[0] == "HTTP/1.1 200 OK", head
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in head[1:] if line)}
        return headers, orjson.loads(await reader.readexactly(int(headers["content-length"])))


async def test_held_poll_answers_on_its_own_socket_and_keeps_it_alive(
    server: Server, session: aiohttp.ClientSession
) -> None:
    """A pending poll is held off aiohttp's request handler (bench/devices.py: its memory); its answer
    is a whole HTTP response, and the same connection serves the client's next requests."""
    epoch = (await poll(session, server, "channel=pub:ka"))["epoch"]
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        for i in range(3):
            writer.write(
                f"GET /poll?channel=pub:ka&since={i}:{epoch}&timeout=30 HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{server.port}\r\nOrigin: {server.http}\r\n\r\n".encode()
            )
            await live_in(server, "pub:ka", 1)
            assert server.node.conn_limits.total == 1  # the held poll has its place
            await publish(session, server, "pub:ka", {"i": i})
            headers, body = await _raw_response(reader)
            assert [(p["offset"], p["data"]) for p in body["publications"]] == [(i + 1, {"i": i})]
            assert (body["offset"], body["epoch"], body["recovered"]) == (i + 1, epoch, True)
            assert headers["content-type"] == "application/json"
            assert headers["cache-control"] == "no-store"
            assert headers["connection"] == "keep-alive"
            assert headers["x-content-type-options"] == "nosniff"
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        headers, body = await _raw_response(reader)
        assert body["status"] == "ok"
        assert server.node.conn_limits.total == 0
    finally:
        writer.close()


async def test_held_poll_closes_when_a_request_is_pipelined_behind_it(server: Server) -> None:
    """A request already queued behind the held poll would be lost with its handler: the answer says
    "Connection: close" and the connection ends, so the client sends it again."""
    epoch = "x"
    async with aiohttp.ClientSession() as session:
        epoch = (await poll(session, server, "channel=pub:pl"))["epoch"]
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            req = f"GET /poll?channel=pub:pl&since=0:{epoch}&timeout=30 HTTP/1.1\r\nHost: a\r\n\r\n"
            writer.write(req.encode() + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            await live_in(server, "pub:pl", 1)
            await publish(session, server, "pub:pl", 1)
            headers, body = await _raw_response(reader)
            assert headers["connection"] == "close" and body["offset"] == 1
            async with asyncio.timeout(T):
                assert await reader.read() == b""  # closed after the answer
        finally:
            writer.close()
        # The same when the next request arrives while the poll is held (read by the held poll itself).
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(
                f"GET /poll?channel=pub:pl&since=1:{epoch}&timeout=30 HTTP/1.1\r\nHost: a\r\n\r\n".encode()
            )
            await live_in(server, "pub:pl", 1)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            await writer.drain()
            async with asyncio.timeout(T):  # read (and dropped) by the held poll
                while all(getattr(c, "_reusable", True) for c in server.node.connections):
                    await asyncio.sleep(0.01)
            await publish(session, server, "pub:pl", 2)
            headers, body = await _raw_response(reader)
            assert headers["connection"] == "close" and body["offset"] == 2
            async with asyncio.timeout(T):
                assert await reader.read() == b""
        finally:
            writer.close()


async def test_held_poll_whose_client_goes_away_is_released(
    server: Server, session: aiohttp.ClientSession
) -> None:
    epoch = (await poll(session, server, "channel=pub:gone"))["epoch"]
    _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        f"GET /poll?channel=pub:gone&since=0:{epoch}&timeout=30 HTTP/1.1\r\nHost: a\r\n\r\n".encode()
    )
    await live_in(server, "pub:gone", 1)
    assert server.node.conn_limits.total == 1
    writer.close()
    await no_connections(server)
    async with asyncio.timeout(T):
        while server.node.conn_limits.total or server.node.hub.subscribers("pub:gone"):
            await asyncio.sleep(0.01)
    await publish(session, server, "pub:gone", 1)  # nothing to write to: no error anywhere


async def test_poll_unrecoverable(server: Server, session: aiohttp.ClientSession) -> None:
    for i in range(7):
        await publish(session, server, "small:p", i)
    top = await poll(session, server, "channel=small:p")
    got = await poll(session, server, f"channel=small:p&since=1:{top['epoch']}&timeout=5")
    assert got == {"publications": [], "offset": 7, "epoch": top["epoch"], "recovered": False}
    got = await poll(session, server, "channel=small:p&since=3:otherepoch&timeout=5")
    assert got["recovered"] is False and got["offset"] == 7


async def test_poll_is_not_in_presence_and_makes_no_join(
    server: Server, session: aiohttp.ClientSession, probe: ProbeFactory
) -> None:
    ws = await probe(server)
    await ws.ok("subscribe", channel="chat:q")
    epoch = (await poll(session, server, "channel=chat:q"))["epoch"]
    pending = asyncio.ensure_future(poll(session, server, f"channel=chat:q&since=0:{epoch}&timeout=30"))
    await live_in(server, "chat:q", 2)
    assert (await ws.ok("presence", channel="chat:q"))["count"] == 1
    await ws.ok("publish", channel="chat:q", data="hi")
    assert [p["data"] for p in (await pending)["publications"]] == ["hi"]
    pushes = [await ws.push()]
    assert [p["type"] for p in pushes] == ["message"]


# ---------------------------------------------------------------------------------------------- bounds


async def never_reading(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client that sends its request and then reads nothing (a small receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


@pytest.mark.parametrize("path", ["/sse?channel=pub:slow", "/stream?channel=pub:slow"])
async def test_slow_reader_is_cut(
    start_server: ServerFactory, session: aiohttp.ClientSession, path: str
) -> None:
    srv = await start_server(max_buffer=64 * 1024, ping_interval=0)
    reader, writer = await never_reading(srv.port, path)
    try:
        async with sse(session, f"{srv.http}/sse?channel=pub:slow") as fast:
            await live_in(srv, "pub:slow", 2)
            n = 0
            async with asyncio.timeout(30):
                # Publish until the server gives up on the reader; the fast one keeps up all along.
                while len(srv.node.hub.subscribers("pub:slow")) == 2:
                    await publish(session, srv, "pub:slow", {"n": n, "blob": "x" * 8000})
                    n += 1
                    [got] = await fast.messages(1)
                    assert got["data"]["n"] == n - 1
                    assert n < 5000, "the slow reader was never cut off"
            await publish(session, srv, "pub:slow", "after")
            assert (await fast.messages(1))[0]["data"] == "after"
        # The slow one, reading again, finds why it was cut (4008, reconnect) at the end of its stream.
        async with asyncio.timeout(T):
            data = await reader.read()
        assert b'"code":4008' in data[-300:] and b'"reconnect":true' in data[-300:]
        await no_connections(srv)
    finally:
        writer.close()


async def test_write_timeout_drops_a_stalled_reader(
    start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    """Less than max_buffer waiting, but the reader takes nothing for two keep-alive ticks: dropped."""
    srv = await start_server(ping_interval=0.2)
    _, writer = await never_reading(srv.port, "/sse?channel=pub:stall")
    try:
        await live_in(srv, "pub:stall", 1)
        [conn] = srv.node.connections
        async with asyncio.timeout(T):
            while conn.transport.get_write_buffer_size() == 0:  # type: ignore[attr-defined]
                await publish(session, srv, "pub:stall", "y" * 8000)  # until the kernel takes no more
        assert conn.transport.get_write_buffer_size() < srv.settings.max_buffer  # type: ignore[attr-defined]
        await no_connections(srv)
        assert srv.node.hub.subscribers("pub:stall") == []
    finally:
        writer.close()


async def test_streams_polls_and_websockets_share_the_connection_limits(
    start_server: ServerFactory, session: aiohttp.ClientSession, probe: ProbeFactory
) -> None:
    srv = await start_server(max_connections_per_ip=3)
    ws = await probe(srv)
    await ws.ok("ping")
    async with sse(session, f"{srv.http}/sse?channel=pub:lim") as r:
        await r.until("subscribed")
        epoch = (await poll(session, srv, "channel=pub:lim"))["epoch"]
        pending = asyncio.ensure_future(poll(session, srv, f"channel=pub:lim&since=0:{epoch}&timeout=30"))
        await live_in(srv, "pub:lim", 2)
        for path in (
            "/stream?channel=pub:lim",
            "/sse?channel=pub:lim",
            f"/poll?channel=pub:lim&since=0:{epoch}",
        ):
            async with session.get(srv.http + path) as resp:
                assert resp.status == 429, path
                assert (await resp.json())["error"]["code"] == "rate_limited"
                assert int(resp.headers["Retry-After"]) >= 1
        await publish(session, srv, "pub:lim", 1)
        await pending
        async with session.get(f"{srv.http}/stream?channel=pub:lim") as resp:
            assert resp.status == 200


BAD = [
    ("/sse", 400, "invalid_field"),
    ("/sse?channel=bad%20name", 400, "invalid_channel"),
    ("/sse?channel=nowhere:x", 404, "unknown_namespace"),
    ("/sse?channel=pub:a&channel=pub:a", 400, "invalid_field"),
    ("/sse?" + "&".join(f"channel=pub:{i}" for i in range(5)), 429, "too_many_subscriptions"),
    ("/sse?channel=pub:a&since=1", 400, "invalid_field"),
    ("/sse?channel=pub:a&since=x:e", 400, "invalid_field"),
    ("/sse?channel=pub:a&since=1:e;2:e", 400, "invalid_field"),
    ("/sse?channel=pub:a&since=99999999999999999999:e", 400, "invalid_field"),
    ("/sse?channel=pub:a&token=nope", 401, "unauthorized"),
    ("/sse?channel=user:bob", 403, "permission_denied"),
    ("/sse?channel=pub:a&sub_token=nope", 401, "unauthorized"),
    ("/stream?channel=pub:a&since=1:e:x", 400, "invalid_field"),
    ("/stream?channel=nowhere:x", 404, "unknown_namespace"),
    ("/poll", 400, "invalid_field"),
    ("/poll?channel=pub:a&channel=pub:b", 429, "too_many_subscriptions"),
    ("/poll?channel=pub:a&since=0:e&timeout=x", 400, "invalid_field"),
    ("/poll?channel=pub:a&since=0:e&timeout=-1", 400, "invalid_field"),
    ("/poll?channel=pub:a&since=0:e&timeout=61", 400, "invalid_field"),
    ("/poll?channel=pub:a&since=0:e&timeout=nan", 400, "invalid_field"),
    ("/poll?channel=pub:a&since=-", 400, "invalid_field"),
    ("/poll?channel=pub:a&since=abc", 400, "invalid_field"),
    ("/poll?channel=user:bob", 403, "permission_denied"),
    ("/poll?channel=bad%20name", 400, "invalid_channel"),
]


async def test_bad_inputs(start_server: ServerFactory, session: aiohttp.ClientSession) -> None:
    srv = await start_server(
        max_subscriptions=4,
        token_secret=SECRET,
        api_failures_per_minute=0,
        namespaces=PERSONAL,
        default_namespace=None,
    )
    for path, status, code in BAD:
        async with asyncio.timeout(T), session.get(srv.http + path) as resp:
            body = await resp.json(content_type=None)
            assert (resp.status, body["error"]["code"]) == (status, code), (path, body)
    # A Last-Event-ID that does not fit the channels: 400 too (never a silent fresh start).
    async with session.get(f"{srv.http}/sse?channel=pub:a", headers={"Last-Event-ID": "1:e;2:e"}) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_field"
    async with session.get(f"{srv.http}/sse?channel=pub:a", headers={"Authorization": "Basic x"}) as resp:
        assert resp.status == 401
    # A cross-origin page that allowed_origins does not list.
    async with session.get(
        f"{srv.http}/sse?channel=pub:a", headers={"Origin": "https://evil.example"}
    ) as resp:
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "permission_denied"
    assert not srv.node.connections


async def test_cross_origin_allowed(start_server: ServerFactory, session: aiohttp.ClientSession) -> None:
    srv = await start_server(allowed_origins=["https://app.example"])
    hdrs = {"Origin": "https://app.example"}
    async with sse(session, f"{srv.http}/sse?channel=pub:o", headers=hdrs) as r:
        assert r.resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
        await r.until("subscribed")
    async with session.get(f"{srv.http}/poll?channel=pub:o", headers=hdrs) as resp:
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "https://app.example"


async def test_subscription_token_grants_a_token_namespace(
    start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(token_secret=SECRET, namespaces={"priv": Namespace("priv", subscribe="token")})
    async with session.get(f"{srv.http}/sse?channel=priv:1") as resp:
        assert resp.status == 403
    grant = hs({"channel": "priv:1", "exp": int(time.time()) + 60})
    async with sse(session, f"{srv.http}/sse?channel=priv:1&sub_token={grant}") as r:
        await r.until("subscribed")
    other = hs({"channel": "priv:2", "exp": int(time.time()) + 60})
    async with session.get(f"{srv.http}/sse?channel=priv:1&sub_token={other}") as resp:
        assert resp.status == 401


async def test_responses_match_openapi(start_server: ServerFactory, session: aiohttp.ClientSession) -> None:
    """Every response openapi.json documents for /sse, /stream and /poll (but 503: a failing backend) is
    produced here, and each validates against its schema."""
    from importlib import resources

    from .test_docs import ResponseChecker

    spec = orjson.loads(resources.files("tidings").joinpath("openapi.json").read_bytes())
    chk = ResponseChecker(spec)
    srv = await start_server(
        max_subscriptions=2,
        token_secret=SECRET,
        namespaces=PERSONAL,
        default_namespace=None,
        client_rate=50.0,
    )
    epoch = ""
    for path in ("/sse", "/stream", "/poll"):
        cases = [
            (f"{path}?channel=pub:a&since=x", 400),
            (f"{path}?channel=pub:a&token=nope", 401),
            (f"{path}?channel=user:bob", 403),
            (f"{path}?channel=nowhere:x", 404),
            (f"{path}?channel=pub:a&channel=pub:b&channel=pub:c", 429),
        ]
        if path == "/poll":
            cases.append(("/poll?channel=pub:a", 200))
        for url, status in cases:
            async with asyncio.timeout(T), session.get(srv.http + url) as resp:
                assert resp.status == status, (url, resp.status)
                body = await resp.json()
                chk.check("get", path, status, resp.content_type, body)
                epoch = body.get("epoch", epoch)
        if path != "/poll":
            async with asyncio.timeout(T), session.get(f"{srv.http}{path}?channel=pub:a") as resp:
                assert resp.status == 200
                assert resp.content_type in spec["paths"][path]["get"]["responses"]["200"]["content"]
                chk.seen.add(("get", path, "200"))
    await publish(session, srv, "pub:a", {"text": "x"})
    async with session.get(f"{srv.http}/poll?channel=pub:a&since=0:{epoch}") as resp:
        body = await resp.json()
        assert len(body["publications"]) == 1
        chk.check("get", "/poll", 200, resp.content_type, body)
    # A wrong method: JSON too.
    async with session.post(f"{srv.http}/sse?channel=pub:a") as resp:
        assert resp.status == 405 and (await resp.json())["error"]["code"] == "bad_request"
    documented = {
        ("get", p, st) for p in ("/sse", "/stream", "/poll") for st in spec["paths"][p]["get"]["responses"]
    }
    assert documented - chk.seen == {("get", "/poll", "503")}


DOCS = Path(__file__).resolve().parent.parent / "docs"
_EXAMPLE = re.compile(r"```sh\n(curl [^\n]*)\n```\n\n```text\n(.*?)```", re.S)


def _normalize(text: str, epoch: str) -> str:
    """Real output in the docs' terms: the channel's epoch, publication ids and times as the docs show."""
    text = text.replace(epoch, "a1b2c3d4")
    text = re.sub(r'"id":"[0-9a-f-]{36}"', '"id":"7f0c5b1e-3d2a-4c8e-9b1f-2a6d0e4c9f10"', text)
    return re.sub(r'"time":\d+', '"time":1767225600000', text)


async def test_devices_md_curl_examples(server: Server, session: aiohttp.ClientSession) -> None:
    """Every curl example of docs/devices.md, in order, with real curl against a real server: its output
    is the text block below it, but for the epoch, ids and times. When the example shows a message after
    `subscribed`, the test publishes it once curl is subscribed."""
    examples = _EXAMPLE.findall((DOCS / "devices.md").read_text())
    assert len(examples) >= 5
    epoch = (await poll(session, server, "channel=alerts:ops"))["epoch"]
    for cmd, expected in examples:
        want = [line for line in expected.splitlines() if line]
        url = cmd.replace("http://127.0.0.1:8888", server.http).replace("a1b2c3d4", epoch)
        argv = shlex.split(url)
        proc = await asyncio.create_subprocess_exec(
            argv[0], "-sS", "--max-time", "20", *argv[1:], stdout=asyncio.subprocess.PIPE
        )
        assert proc.stdout is not None
        got: list[str] = []
        lines: list[str] = []
        published = False
        try:
            async with asyncio.timeout(T):
                while len(got) < len(want):
                    raw = await proc.stdout.readline()
                    assert raw, f"{cmd}: output ended early: {lines}"
                    line = raw.decode().rstrip("\n")
                    lines.append(line)
                    if not line:
                        continue
                    got.append(line)
                    i = len(got) - 1
                    if not published and '"type":"subscribed"' in line:
                        published = any('"type":"message"' in w for w in want[i + 1 :])
                        if published:
                            await publish(session, server, "alerts:ops", {"text": "disk full"})
        finally:
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()
        assert _normalize("\n".join(got), epoch) == "\n".join(want), cmd


async def test_poll_answer_is_bounded_by_max_buffer(
    start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    """A replay larger than max_buffer is answered in parts: each a prefix, the next poll goes on."""
    srv = await start_server(max_buffer=8192)
    for i in range(12):
        await publish(session, srv, "pub:big", {"i": i, "pad": "z" * 1500})
    epoch = (await poll(session, srv, "channel=pub:big"))["epoch"]
    seen: list[int] = []
    since = 0
    async with asyncio.timeout(T):
        while since < 12:
            got = await poll(session, srv, f"channel=pub:big&since={since}:{epoch}&timeout=5")
            offsets = [p["offset"] for p in got["publications"]]
            assert offsets and offsets[0] == since + 1 and len(offsets) < 12
            seen += offsets
            since = got["offset"]
    assert seen == list(range(1, 13))
