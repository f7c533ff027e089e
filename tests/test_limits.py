"""Every limit of issue 5: the refusal, its documented code, and a well-behaved client on the same server
at the same time that is unaffected (it still gets ok replies and receives a publication).

Time-based limits are configured small; every wait is bounded by an asyncio timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import Any

import aiohttp
import orjson
import pytest

from tidings.protocol import CloseCode, ErrorCode, deflate_payload

from .conftest import API_KEY, Probe, ProbeFactory, Server, ServerFactory, api_headers
from .rawws import client_frame, raw_upgrade, read_frame, read_until_close

SECRET = "limits-test-secret-0123456789abcdefghijkl"
WITNESS_CHANNEL = "pub:witness"
_seq = itertools.count(1)


class Witness:
    """A well-behaved subscriber: after each refusal it still gets ok replies and publications."""

    def __init__(self, srv: Server, p: Probe, session: aiohttp.ClientSession) -> None:
        self.srv = srv
        self.p = p
        self.session = session

    async def check(self, headers: dict[str, str] | None = None, http: bool = True) -> None:
        """``http=False``: publish over the witness's own WebSocket (when its address is slowed down)."""
        n = next(_seq)
        assert (await self.p.request("ping"))["ok"] is True
        if not http:
            await self.p.ok("publish", channel=WITNESS_CHANNEL, data={"witness": n})
        else:
            async with asyncio.timeout(10):
                async with self.session.post(
                    f"{self.srv.http}/api/publish",
                    json={"channel": WITNESS_CHANNEL, "data": {"witness": n}},
                    headers={**api_headers(), **(headers or {})},
                ) as r:
                    assert r.status == 200, await r.text()
        (msg,) = await self.p.messages(1, timeout=5)
        assert msg["data"] == {"witness": n}
        assert not self.p.closed.is_set()


async def watch(srv: Server, probe: ProbeFactory, session: aiohttp.ClientSession, **kw: Any) -> Witness:
    p = await probe(srv, **kw)
    await p.ok("subscribe", channel=WITNESS_CHANNEL)
    w = Witness(srv, p, session)
    await w.check()
    return w


def frame(**fields: Any) -> str:
    return orjson.dumps(fields).decode()


async def closed_with(p: Probe, code: int, timeout: float = 10.0) -> None:
    assert await p.wait_closed(timeout) == code


# ---------------------------------------------------------------------------------------------- sizes


async def test_max_frame_size_closes_1009(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(max_message_size=1024)
    w = await watch(srv, probe, session)
    p = await probe(srv)
    # Just under the limit: an ordinary reply (the data is small enough, too).
    fits = frame(id=1, op="publish", channel="pub:x", data="x" * 900)
    assert len(fits) <= 1024
    await p.send_raw(fits)
    assert (await p.reply(1))["ok"] is True
    await p.send_raw(frame(id=2, op="publish", channel="pub:x", data="x" * 2000))
    await closed_with(p, CloseCode.MESSAGE_TOO_BIG)
    await w.check()


async def test_compression_bomb_closes_1009(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(compression=True, max_message_size=64 * 1024)
    w = await watch(srv, probe, session, compress=15)
    assert w.p.ws.compress == 15, "permessage-deflate was not negotiated"
    p = await probe(srv, compress=15)
    assert p.ws.compress == 15
    # A compressed message that inflates within the limit is fine...
    await p.ok("publish", channel=WITNESS_CHANNEL, data="a" * 30_000)
    assert len((await w.p.messages(1))[0]["data"]) == 30_000
    # ...one that inflates to 16 MiB (about 16 KiB on the wire) is closed with 1009.
    bomb = frame(id=9, op="publish", channel="pub:x", data="a" * (16 << 20))
    assert len(deflate_payload(bomb.encode())) < 64 * 1024  # on the wire it is under the limit
    await p.send_raw(bomb)
    await closed_with(p, CloseCode.MESSAGE_TOO_BIG)
    await w.check()


async def test_http_body_size_413(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(max_http_body=1024)
    w = await watch(srv, probe, session)
    big = orjson.dumps({"channel": "pub:x", "data": "x" * 4096})

    async def chunked() -> Any:
        for i in range(0, len(big), 512):
            yield big[i : i + 512]

    for body in (big, chunked()):
        async with session.post(
            f"{srv.http}/api/publish",
            data=body,
            headers={**api_headers(), "Content-Type": "application/json"},
        ) as r:
            assert r.status == 413
            assert r.content_type == "application/json"
            assert (await r.json())["error"]["code"] == ErrorCode.MESSAGE_TOO_LARGE.value
    async with session.post(
        f"{srv.http}/api/publish", json={"channel": "pub:x", "data": "small"}, headers=api_headers()
    ) as r:
        assert r.status == 200
    await w.check()


# ---------------------------------------------------------------------------------------------- dead peers


async def test_slow_consumer_4008(
    start_server: ServerFactory,
    probe: ProbeFactory,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tidings")
    srv = await start_server(max_buffer=64 * 1024, client_rate=0.0, user_rate=0.0)
    w = await watch(srv, probe, session)
    reader, writer = await raw_upgrade(srv.port, rcvbuf=4096)
    writer.write(client_frame(frame(id=1, op="subscribe", channel=WITNESS_CHANNEL).encode()))
    await writer.drain()
    publisher = await probe(srv)
    blob = "x" * 16000
    n = 0
    async with asyncio.timeout(20):
        # Publish until the server gives up on the reader (it logs the close); the witness keeps up.
        while not any(": 4008 slow consumer" in r.getMessage() for r in caplog.records):
            await publisher.ok("publish", channel=WITNESS_CHANNEL, data={"n": n, "blob": blob})
            assert (await w.p.messages(1))[0]["data"]["n"] == n
            n += 1
            assert n < 5000, "the slow consumer was never cut off"
    code, frames = await asyncio.wait_for(read_until_close(reader), 10)
    assert code == CloseCode.SLOW_CONSUMER
    assert orjson.loads(frames[-1]) == {"type": "disconnect", "code": 4008, "reason": "slow consumer",
                                        "reconnect": True}  # fmt: skip
    writer.close()
    await w.check()


async def test_unanswered_pings_drop_the_peer(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(ping_interval=0.4)
    w = await watch(srv, probe, session)  # aiohttp answers pings by itself
    reader, writer = await raw_upgrade(srv.port)
    assert len(srv.node.connections) == 2
    started = time.monotonic()
    pings = 0
    async with asyncio.timeout(10):
        with pytest.raises(asyncio.IncompleteReadError):
            while True:  # read pings, never answer; the server drops us without a close frame (1006)
                op, _ = await read_frame(reader)
                assert op == 0x9, op
                pings += 1
    assert pings >= 1
    assert time.monotonic() - started < 5
    writer.close()
    async with asyncio.timeout(5):
        while len(srv.node.connections) != 1:
            await asyncio.sleep(0.02)
    # The witness has been through several ping intervals and is still here.
    await w.check()


async def test_auth_timeout_4004(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    import jwt

    srv = await start_server(token_secret=SECRET, allow_anonymous=False, auth_timeout=0.3)
    token = jwt.encode({"sub": "w", "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")
    w = await watch(srv, probe, session, params={"token": token})
    p = await probe(srv)
    started = time.monotonic()
    await closed_with(p, CloseCode.AUTH_TIMEOUT, timeout=5)
    assert time.monotonic() - started >= 0.25
    assert (await p.push())["code"] == 4004
    await w.check()


async def test_slow_header_client_is_closed(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(header_timeout=0.5)
    w = await watch(srv, probe, session)
    loop = asyncio.get_running_loop()

    async def eof_after(first: bytes, trickle: bytes = b"") -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        started = loop.time()
        writer.write(first)

        async def drip() -> None:
            for b in trickle:  # slowloris: one header byte at a time, never the blank line
                await asyncio.sleep(0.05)
                writer.write(bytes([b]))

        dripper = asyncio.create_task(drip())
        try:
            async with asyncio.timeout(5):
                # EOF: the server hung up, no response. A close with unread bytes is a reset: the same.
                with contextlib.suppress(ConnectionResetError):
                    assert await reader.read() == b""
        finally:
            dripper.cancel()
            writer.close()
        return loop.time() - started

    partial = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    t1, t2, t3 = await asyncio.gather(
        eof_after(partial),
        eof_after(b""),
        eof_after(b"GET /healthz HTTP/1.1\r\n", b"X-Slow: " + b"a" * 200),
    )
    for t in (t1, t2, t3):
        assert 0.4 <= t < 3, (t1, t2, t3)
    # The witness has been connected longer than header_timeout: upgraded connections are not cut.
    await w.check()


# ---------------------------------------------------------------------------------------------- connections


async def test_max_connections_per_ip_4029(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(max_connections_per_ip=3)
    w = await watch(srv, probe, session)
    others = [await probe(srv) for _ in range(2)]
    refused = await probe(srv)
    await closed_with(refused, CloseCode.TOO_MANY_CONNECTIONS)
    assert (await refused.push()) == {
        "type": "disconnect", "code": 4029, "reason": "too many connections", "reconnect": True,
    }  # fmt: skip
    for o in others:
        assert (await o.request("ping"))["ok"] is True
    await w.check()
    # A slot freed is a slot usable again.
    await others[0].close()
    async with asyncio.timeout(5):
        while len(srv.node.connections) != 2:
            await asyncio.sleep(0.02)
    again = await probe(srv)
    assert (await again.request("ping"))["ok"] is True


async def test_max_connections_total_4029(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    # Each client comes from its own (forwarded) address, so only the total can refuse.
    srv = await start_server(max_connections=3, max_connections_per_ip=0, trusted_proxies=["127.0.0.1"])

    def from_(i: int) -> dict[str, Any]:
        return {"headers": {"X-Forwarded-For": f"203.0.113.{i}"}}

    w = await watch(srv, probe, session, **from_(1))
    a, b = await probe(srv, **from_(2)), await probe(srv, **from_(3))
    refused = await probe(srv, **from_(4))
    await closed_with(refused, CloseCode.TOO_MANY_CONNECTIONS)
    for p in (a, b):
        assert (await p.request("ping"))["ok"] is True
    await w.check()


async def test_forwarded_for_counts_per_ip_only_from_trusted_proxies(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    trusted = await start_server(max_connections_per_ip=2, trusted_proxies=["127.0.0.0/8"])
    w = await watch(trusted, probe, session)  # address 127.0.0.1 (no header: the peer)
    xff = {"headers": {"X-Forwarded-For": "198.51.100.7"}}
    await probe(trusted, **xff)
    await probe(trusted, **xff)
    await closed_with(await probe(trusted, **xff), CloseCode.TOO_MANY_CONNECTIONS)
    # A client-supplied address in front of the proxy's own entry does not dodge the count.
    spoof = {"headers": {"X-Forwarded-For": "192.0.2.1, 198.51.100.7"}}
    await closed_with(await probe(trusted, **spoof), CloseCode.TOO_MANY_CONNECTIONS)
    other = await probe(trusted, headers={"X-Forwarded-For": "198.51.100.8"})
    assert (await other.request("ping"))["ok"] is True
    await w.check()
    # Without trusted proxies the header is ignored: every client is 127.0.0.1.
    untrusted = await start_server(max_connections_per_ip=2, trusted_proxies=["10.0.0.0/8"])
    ok = [await probe(untrusted, headers={"X-Forwarded-For": f"198.51.100.{i}"}) for i in (1, 2)]
    await closed_with(
        await probe(untrusted, headers={"X-Forwarded-For": "198.51.100.3"}), CloseCode.TOO_MANY_CONNECTIONS
    )
    for p in ok:
        assert (await p.request("ping"))["ok"] is True


# ---------------------------------------------------------------------------------------------- rates


async def flood(p: Probe, n: int) -> list[dict[str, Any]]:
    """Send ``n`` pings without waiting, then collect every reply (or stop at the close)."""
    ids = [f"f{next(_seq)}" for _ in range(n)]
    for rid in ids:
        await p.send_raw(frame(id=rid, op="ping"))
    replies = []
    for rid in ids:
        try:
            replies.append(await p.reply(rid))
        except ConnectionError:
            break
    return replies


def codes(replies: list[dict[str, Any]]) -> list[str]:
    return ["ok" if r["ok"] else r["error"]["code"] for r in replies]


async def test_client_rate_limited_then_4030(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(client_rate=5.0, user_rate=0.0)
    w = await watch(srv, probe, session)
    p = await probe(srv)
    got = codes(await flood(p, 30))
    assert got[:8] == ["ok"] * 8  # the burst (2 x rate) passes
    assert got.count("rate_limited") >= 15 and set(got) == {"ok", "rate_limited"}
    await w.check()  # another connection has its own bucket
    # Keep flooding past the rate_limited replies: closed with 4030.
    await flood(p, 300)
    await closed_with(p, CloseCode.RATE_LIMITED)
    assert any(m.get("code") == 4030 for m in [p.pushes.get_nowait() for _ in range(p.pushes.qsize())])
    await w.check()


async def test_user_rate_shared_by_a_users_connections(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    import jwt

    srv = await start_server(token_secret=SECRET, client_rate=0.0, user_rate=5.0)

    def tok(user: str) -> dict[str, Any]:
        exp = int(time.time()) + 300
        return {"params": {"token": jwt.encode({"sub": user, "exp": exp}, SECRET, algorithm="HS256")}}

    w = await watch(srv, probe, session, **tok("victor"))
    u1, u2 = await probe(srv, **tok("ursula")), await probe(srv, **tok("ursula"))
    got = codes(await flood(u1, 20))
    assert "rate_limited" in got
    # The same user's other connection shares the bucket...
    assert codes(await flood(u2, 3)) == ["rate_limited"] * 3
    # ...another user does not.
    await w.check()
    await flood(u2, 300)
    await closed_with(u2, CloseCode.RATE_LIMITED)
    await w.check()


async def test_max_subscriptions(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(max_subscriptions=3)
    w = await watch(srv, probe, session)
    p = await probe(srv)
    for i in range(3):
        await p.ok("subscribe", channel=f"pub:s{i}")
    r = await p.request("subscribe", channel="pub:s3")
    assert r["ok"] is False and r["error"]["code"] == ErrorCode.TOO_MANY_SUBSCRIPTIONS.value
    await p.ok("unsubscribe", channel="pub:s0")
    await p.ok("subscribe", channel="pub:s3")
    await p.ok("publish", channel="pub:s3", data="still works")
    assert (await p.messages(1))[0]["data"] == "still works"
    await w.check()


# ---------------------------------------------------------------------------------------------- failed auth


async def test_failed_api_keys_slowed_down_429(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(api_failures_per_minute=3, trusted_proxies=["127.0.0.1"])
    w = await watch(srv, probe, session)
    attacker = {"X-Forwarded-For": "198.51.100.66"}
    for _ in range(3):
        async with session.get(f"{srv.http}/api/channels", headers={**api_headers("wrong-key-0123456789"),
                                                                     **attacker}) as r:  # fmt: skip
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "unauthorized"
    for key in ("wrong-key-0123456789", API_KEY):  # once slowed, even a right key waits
        async with session.get(f"{srv.http}/api/channels", headers={**api_headers(key), **attacker}) as r:
            assert r.status == 429
            assert (await r.json())["error"]["code"] == ErrorCode.RATE_LIMITED.value
            assert 1 <= int(r.headers["Retry-After"]) <= 61
    # The WebSocket upgrade from that address is refused the same way.
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await session.ws_connect(srv.ws_url, headers=attacker)
    assert exc.value.status == 429 and exc.value.headers is not None and "Retry-After" in exc.value.headers
    # A backend at another address is unaffected, and so is the connected witness.
    await w.check(headers={"X-Forwarded-For": "198.51.100.10"})
    await w.check()


async def test_bad_tokens_count_as_failures(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(token_secret=SECRET, api_failures_per_minute=2)
    w = await watch(srv, probe, session)
    for _ in range(2):
        p = await probe(srv)
        r = await p.request("connect", token="not-a-jwt")
        assert r["error"]["code"] == "unauthorized"
        await closed_with(p, CloseCode.UNAUTHORIZED)
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await session.ws_connect(srv.ws_url)
    assert exc.value.status == 429
    await w.check(http=False)  # HTTP from this address is slowed down too; the witness is not


@pytest.mark.parametrize(
    ("trusted", "keyed_by_header"),
    [([], False), (["10.0.0.0/8"], False), (["127.0.0.1"], True), (["127.0.0.0/8", "::1"], True)],
)
async def test_forwarded_for_keys_the_failure_limiter_only_from_trusted_proxies(
    start_server: ServerFactory,
    probe: ProbeFactory,
    session: aiohttp.ClientSession,
    trusted: list[str],
    keyed_by_header: bool,
) -> None:
    srv = await start_server(api_failures_per_minute=2, trusted_proxies=trusted)
    w = await watch(srv, probe, session)

    async def status(xff: str, key: str = "wrong-key-0123456789") -> int:
        async with session.get(
            f"{srv.http}/api/channels", headers={**api_headers(key), "X-Forwarded-For": xff}
        ) as r:
            await r.read()
            return r.status

    assert [await status("203.0.113.1") for _ in range(3)] == [401, 401, 429]
    # A different forwarded address: a fresh budget only when the header is believed.
    assert await status("203.0.113.2") == (401 if keyed_by_header else 429)
    # Prepending a fake hop does not escape: the rightmost untrusted hop is the client.
    assert await status("192.0.2.50, 203.0.113.1") == 429
    # Garbage in the header falls back to the peer address.
    assert await status("not-an-address") == (401 if keyed_by_header else 429)
    if keyed_by_header:
        await w.check(headers={"X-Forwarded-For": "203.0.113.99"})
    else:  # the HTTP client shares the blocked address; the connected WebSocket is unaffected
        await w.check(http=False)
