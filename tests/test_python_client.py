"""The Python clients against real servers (issue 9): ``Client`` events across kill -9 and restarts,
join/leave, token lifecycles (connection tokens renewed in-band, subscription grants refreshed, a grant
that ends without renewal), transient and permanent refusals on re-subscribe, the server's ``disconnect``
flag, ``SyncHTTPClient`` from a plain script and a thread pool, ``batch``, and retries that never
duplicate (the server frozen with SIGSTOP mid-publish)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tidings import SyncHTTPClient
from tidings.auth import read_api_key
from tidings.backends.base import BrokerError, HistoryOptions, HistoryResult
from tidings.backends.memory import MemoryBroker
from tidings.client import (
    EVENTS,
    BatchEntry,
    Client,
    ClientClosed,
    ConnectedEvent,
    DisconnectEvent,
    GapEvent,
    HTTPClient,
    PresenceEvent,
    RequestError,
    SubscribedEvent,
    Subscription,
    UnsubscribedEvent,
)
from tidings.config import Namespace
from tidings.protocol import CloseCode, StreamPosition
from tidings.transports.websocket import WsConnection

from .conftest import API_KEY, Proc, Server, ServerFactory
from .lossy import LossyBroker
from .test_auth import SECRET, hs

FAST = {"min_backoff": 0.05, "max_backoff": 0.5}


class Recorder:
    """Every event of a client, in order, and a way to wait for a condition on them."""

    def __init__(self, client: Client) -> None:
        self.log: list[tuple[str, Any]] = []
        self._changed = asyncio.Event()
        for event in EVENTS - {"message"}:
            client.on(event, self._handler(event))

    def _handler(self, event: str) -> Callable[..., None]:
        def record(*args: Any) -> None:
            self.log.append((event, args[0] if len(args) == 1 else args))
            self._changed.set()

        return record

    def mark(self) -> int:
        return len(self.log)

    def events(self, event: str, since: int = 0) -> list[Any]:
        return [arg for name, arg in self.log[since:] if name == event]

    def count(self, event: str, since: int = 0) -> int:
        return len(self.events(event, since))

    async def wait(self, pred: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                self._changed.clear()
                await self._changed.wait()

    def trace(self, since: int = 0) -> str:
        """The connection events as one line: D disconnect, R reconnecting, C connected, s:<state>."""
        out = []
        for name, arg in self.log[since:]:
            if name == "state":
                out.append(f"s:{arg[0]}")
            elif name in ("disconnect", "reconnecting", "connected"):
                out.append({"disconnect": "D", "reconnecting": "R", "connected": "C"}[name])
        return ",".join(out)


async def take(sub: Subscription, n: int, timeout: float = 15.0) -> list[Any]:
    return [(await sub.get(timeout=timeout)).data for _ in range(n)]


def drop_connections(srv: Server, code: CloseCode = CloseCode.GOING_AWAY) -> None:
    """The server closes every /ws connection (as on a restart), so the clients reconnect."""
    for conn in list(srv.node.connections):
        if isinstance(conn, WsConnection):
            conn.close(code)


async def publish_paced(api: HTTPClient, channel: str, n: int, rate: float) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(n):
        await api.publish(channel, i)
        await asyncio.sleep(max(0.0, start + (i + 1) / rate - loop.time()))


# ---------------------------------------------------------------------------------------------- states


AFTER_DROP = re.compile(
    r"^D,s:disconnected,R,(s:connecting,(D,)?s:disconnected,R,)*s:connecting,s:connected,C$"
)


async def test_state_events_across_kill9_and_graceful_restart(subprocess_server: Callable[..., Proc]) -> None:
    srv = subprocess_server()
    key = read_api_key(srv.data_dir)
    assert key
    client = Client(srv.ws_url, **FAST)
    rec = Recorder(client)
    messages: list[int] = []
    client.on("message", lambda pub: messages.append(pub.offset))
    received: list[Any] = []
    async with HTTPClient(srv.http, key) as api:
        await client.connect()
        try:
            assert rec.log[0] == ("state", ("connecting", "disconnected"))
            assert rec.trace() == "s:connecting,s:connected,C"
            (hello,) = rec.events("connected")
            assert isinstance(hello, ConnectedEvent) and hello.version == 1
            assert hello.client == client.client_id
            sub = await client.subscribe("pub:life")
            for i in range(10):
                await api.publish("pub:life", i)
            received += await take(sub, 10)

            # kill -9: the drop is seen before the server is back, then it reconnects and recovers.
            mark = rec.mark()
            srv.kill9()
            await rec.wait(lambda: rec.count("disconnect", mark) == 1)
            (drop,) = rec.events("disconnect", mark)
            assert drop.code == 1006 and drop.reconnect is True
            srv.start()
            await api.close()
            for i in range(10, 40):
                await api.publish("pub:life", i)
            received += await take(sub, 30)
            await rec.wait(lambda: rec.count("connected", mark) == 1)
            assert AFTER_DROP.match(rec.trace(mark)), rec.trace(mark)

            # A graceful restart: the server says why (1001 going away, reconnect: true).
            mark = rec.mark()
            srv.stop()
            await rec.wait(lambda: rec.count("disconnect", mark) == 1)
            (bye,) = rec.events("disconnect", mark)
            assert isinstance(bye, DisconnectEvent) and bye.code == 1001 and bye.reconnect is True
            srv.start()
            await api.close()
            for i in range(40, 50):
                await api.publish("pub:life", i)
            received += await take(sub, 10)
            await rec.wait(lambda: rec.count("connected", mark) == 1)
            assert AFTER_DROP.match(rec.trace(mark)), rec.trace(mark)
        finally:
            await client.close()
    assert received == list(range(50))
    assert messages == list(range(1, 51))  # each offset once, in order
    assert client.connects == 3 and sub.gaps == 0 and rec.count("gap") == 0
    subscribed = rec.events("subscribed")
    assert [s.recovered for s in subscribed] == [None, True, True]
    assert rec.log[-1] == ("state", ("closed", "connected"))


# ---------------------------------------------------------------------------------------------- presence


async def test_join_leave_events_and_handlers_that_fail(start_server: ServerFactory) -> None:
    srv = await start_server()
    a, b = Client(srv.ws_url), Client(srv.ws_url)
    joins: asyncio.Queue[PresenceEvent] = asyncio.Queue()
    leaves: asyncio.Queue[PresenceEvent] = asyncio.Queue()
    a.on("join", joins.put_nowait)
    a.on("leave", leaves.put_nowait)

    def broken(event: PresenceEvent) -> None:
        raise RuntimeError("a handler bug")

    async def broken_async(event: PresenceEvent) -> None:
        raise RuntimeError("an async handler bug")

    a.on("join", broken)
    a.on("join", broken_async)
    removed: list[Any] = []
    off = a.on("leave", removed.append)
    off()
    async with a, b:
        sub = await a.subscribe("chat:room")
        await b.subscribe("chat:room")
        assert await asyncio.wait_for(joins.get(), 5) == PresenceEvent("chat:room", b.client_id or "?", "")
        await b.unsubscribe("chat:room")
        assert await asyncio.wait_for(leaves.get(), 5) == PresenceEvent("chat:room", b.client_id or "?", "")
        await b.subscribe("chat:room")
        assert (await asyncio.wait_for(joins.get(), 5)).client == b.client_id
        b_id = b.client_id
        await b.close()  # leaving by disconnecting
        assert await asyncio.wait_for(leaves.get(), 5) == PresenceEvent("chat:room", b_id or "?", "")
        # The failing handlers broke nothing.
        await a.publish("chat:room", "still here")
        assert (await sub.get(timeout=5)).data == "still here"
    assert removed == [] and a.state == "closed"
    with pytest.raises(ValueError, match="unknown event"):
        a.on("joined", print)


# ---------------------------------------------------------------------------------------------- tokens


PRIV = {"priv": Namespace("priv", subscribe="token", publish=True)}


async def token_server(start_server: ServerFactory, **kw: Any) -> Server:
    return await start_server(token_secret=SECRET, api_failures_per_minute=0, namespaces=PRIV, **kw)


@pytest.mark.timeout(90)
async def test_token_lifecycles_over_20_seconds(start_server: ServerFactory) -> None:
    """Three clients at once on one server, 10 publications per second for 20 s each:

    - 3 s connection tokens with ``get_token``: renewed in-band, zero disconnects, each publication once;
    - 3 s subscription tokens with a per-subscription ``get_token``: refreshed in-band (one subscribe,
      never re-subscribed), each publication once;
    - a fixed 3 s subscription token: the app gets ``unsubscribed`` (token_expired) and the Subscription
      ends with end_reason; never silence.
    """
    srv = await token_server(start_server)
    n = 200
    figures: dict[str, Any] = {}

    async def connection_tokens(api: HTTPClient) -> None:
        def get_token() -> str:
            return hs({"sub": "alice", "exp": time.time() + 3})

        client = Client(srv.ws_url, get_token=get_token, **FAST)
        rec = Recorder(client)
        async with client:
            assert client.expires_in is not None and 2.0 < client.expires_in <= 3.0
            sub = await client.subscribe("pub:conn-tokens")
            await publish_paced(api, "pub:conn-tokens", n, 10)
            got = await take(sub, n, timeout=5)
        assert got == list(range(n))
        assert rec.count("disconnect") == 0 and client.connects == 1 and rec.count("error") == 0
        assert client.renewals >= 10  # every ~1.5 s over 20 s
        figures["connection"] = {"renewals": client.renewals, "disconnects": rec.count("disconnect")}

    async def subscription_tokens(api: HTTPClient) -> None:
        calls = 0

        async def get_token() -> str:  # an async getter (e.g. a call to the app's backend)
            nonlocal calls
            calls += 1
            return hs({"channel": "priv:grants", "exp": time.time() + 3})

        client = Client(srv.ws_url, **FAST)
        rec = Recorder(client)
        async with client:
            sub = await client.subscribe("priv:grants", get_token=get_token)
            assert sub.expires_in is not None and 2.0 < sub.expires_in <= 3.0
            await publish_paced(api, "priv:grants", n, 10)
            got = await take(sub, n, timeout=5)
        assert got == list(range(n))
        assert rec.count("subscribed") == 1  # refreshed in-band, never re-subscribed
        assert rec.count("unsubscribed") == 0 and rec.count("disconnect") == 0 and rec.count("error") == 0
        assert client.renewals >= 10 and calls == client.renewals + 1
        figures["subscription"] = {"renewals": client.renewals, "subscribes": rec.count("subscribed")}

    async def fixed_subscription_token(api: HTTPClient) -> None:
        client = Client(srv.ws_url, **FAST)
        rec = Recorder(client)
        async with client:
            token = hs({"channel": "priv:fixed", "exp": time.time() + 3})
            sub = await client.subscribe("priv:fixed", token=token)
            await api.publish("priv:fixed", "before")
            assert (await sub.get(timeout=5)).data == "before"
            await rec.wait(lambda: rec.count("unsubscribed") == 1, timeout=10)
            (ended,) = rec.events("unsubscribed")
            assert ended.channel == "priv:fixed" and ended.code == "token_expired" and ended.resubscribe
            assert not sub.active and sub.end_code == "token_expired" and "token_expired" in sub.end_reason
            assert [p async for p in sub] == []  # iteration ends
            with pytest.raises(ClientClosed, match="token_expired"):
                await sub.get(timeout=1)
            assert "priv:fixed" not in client.subscriptions and client.connected
        figures["fixed"] = {"unsubscribed": ended.code}

    async with HTTPClient(srv.http, API_KEY) as api:
        await asyncio.gather(connection_tokens(api), subscription_tokens(api), fixed_subscription_token(api))
    print("token figures:", figures)


async def test_grant_that_ends_unrenewed_is_resubscribed_with_a_fresh_token(
    start_server: ServerFactory,
) -> None:
    """get_token fails while the grant should be renewed, so it ends (``unsubscribe`` push,
    resubscribe: true); the client gets a fresh token and subscribes again with ``since``: nothing lost,
    no ``unsubscribed`` event, the failures reported as ``error`` (code ``token``)."""
    srv = await token_server(start_server)
    fail_until = 0.0

    def get_token() -> str:
        if time.time() < fail_until:
            raise RuntimeError("the token service is down")
        return hs({"channel": "priv:again", "exp": time.time() + 2})

    client = Client(srv.ws_url, **FAST)
    rec = Recorder(client)
    async with client, HTTPClient(srv.http, API_KEY) as api:
        sub = await client.subscribe("priv:again", get_token=get_token)
        fail_until = time.time() + 2.5  # past the grant's end
        await publish_paced(api, "priv:again", 40, 10)
        assert await take(sub, 40, timeout=5) == list(range(40))
        await rec.wait(lambda: rec.count("subscribed") == 2)
    (again,) = rec.events("subscribed")[1:]
    assert again.recovered is True and rec.count("unsubscribed") == 0 and rec.count("disconnect") == 0
    assert rec.count("error") >= 1 and {e.code for e in rec.events("error")} == {"token"}
    assert sub.gaps == 0


async def test_refused_connect_stops_and_expired_token_reconnects(start_server: ServerFactory) -> None:
    srv = await token_server(start_server)
    bad = Client(srv.ws_url, token="not-a-jwt", **FAST)
    rec = Recorder(bad)
    with pytest.raises(ClientClosed, match="unauthorized"):
        await bad.connect()
    assert [e.code for e in rec.events("error")] == ["unauthorized"]
    assert bad.state == "closed" and rec.events("disconnect")[-1].reconnect is False
    with pytest.raises(ClientClosed):
        await bad.publish("pub:x", 1)
    await bad.close()

    tokens = [hs({"sub": "alice", "exp": time.time() - 60}), hs({"sub": "alice", "exp": time.time() + 60})]
    fresh = Client(srv.ws_url, get_token=lambda: tokens.pop(0), **FAST)
    rec = Recorder(fresh)
    async with fresh:
        assert fresh.user == "alice" and fresh.connects == 1
    assert [e.code for e in rec.events("error")] == ["token_expired"] and tokens == []


# ---------------------------------------------------------------------------------------------- refusals


class FlakyBroker(MemoryBroker):
    """The real memory broker whose ``history`` fails ``fail_next`` times (a storage hiccup)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_next = 0
        self.failed = 0

    async def history(
        self, channel: str, opts: HistoryOptions, *, since: int | None = None, limit: int | None = None
    ) -> HistoryResult:
        if self.fail_next > 0:
            self.fail_next -= 1
            self.failed += 1
            raise BrokerError("injected: storage unreachable")
        return await super().history(channel, opts, since=since, limit=limit)


async def _resubscribe_survives(srv: Server, expect: str, arm: Callable[[], None]) -> dict[str, Any]:
    client = Client(srv.ws_url, **FAST)
    rec = Recorder(client)
    async with client, HTTPClient(srv.http, API_KEY) as api:
        sub = await client.subscribe("pub:flaky", timeout=10)
        for i in range(3):
            await api.publish("pub:flaky", i)
        assert await take(sub, 3) == [0, 1, 2]
        arm()
        mark = rec.mark()
        drop_connections(srv)
        await rec.wait(lambda: rec.count("disconnect", mark) == 1)
        for i in range(3, 6):
            await api.publish("pub:flaky", i)
        assert await take(sub, 3) == [3, 4, 5]
        await rec.wait(lambda: rec.count("subscribed", mark) == 1)
        errors = rec.events("error", mark)
        assert errors and {(e.code, e.channel) for e in errors} == {(expect, "pub:flaky")}, errors
        (again,) = rec.events("subscribed", mark)
        assert again == SubscribedEvent("pub:flaky", again.offset, again.epoch, True)
        assert rec.count("unsubscribed") == 0 and rec.count("disconnect") == 1
        assert sub.active and sub.gaps == 0
        await api.publish("pub:flaky", 6)
        assert await take(sub, 1) == [6]
        return {"errors": len(errors), "connects": client.connects}


async def test_unavailable_once_on_resubscribe_keeps_the_subscription(start_server: ServerFactory) -> None:
    broker = FlakyBroker()
    srv = await start_server(broker_impl=broker)

    def arm() -> None:
        broker.fail_next = 1

    out = await _resubscribe_survives(srv, "unavailable", arm)
    assert broker.failed == 1 and out["errors"] == 1


async def test_rate_limited_resubscribe_keeps_the_subscription(start_server: ServerFactory) -> None:
    # 0.5 commands per second, bursts of 1: `connect` takes the budget, `subscribe` is refused until it
    # refills (about 2 s), on the first connection and on the second.
    srv = await start_server(client_rate=0.5, user_rate=0.0)
    out = await _resubscribe_survives(srv, "rate_limited", lambda: None)
    assert out["errors"] >= 1 and out["connects"] == 2


async def test_permanent_refusal_on_resubscribe_is_told_and_ends_the_subscription(
    start_server: ServerFactory,
) -> None:
    sec = {"sec": Namespace("sec", subscribe="token")}
    srv = await start_server(token_secret=SECRET, api_failures_per_minute=0, namespaces=sec)
    allowed = True

    def get_token() -> str:
        channels = ["sec:*", "pub:*"] if allowed else ["pub:*"]
        return hs({"sub": "bob", "exp": time.time() + 300, "channels": channels})

    client = Client(srv.ws_url, get_token=get_token, **FAST)
    rec = Recorder(client)
    async with client, HTTPClient(srv.http, API_KEY) as api:
        sub = await client.subscribe("sec:plan")
        other = await client.subscribe("pub:open")
        await api.publish("sec:plan", "hush")
        assert await take(sub, 1) == ["hush"]
        allowed = False  # the user lost the right to sec:*
        drop_connections(srv)
        await rec.wait(lambda: rec.count("unsubscribed") == 1)
        assert rec.events("unsubscribed") == [
            UnsubscribedEvent("sec:plan", "permission_denied", rec.events("unsubscribed")[0].reason, False)
        ]
        (err,) = rec.events("error")
        assert isinstance(err, RequestError) and err.code == "permission_denied" and err.channel == "sec:plan"
        assert not sub.active and sub.end_code == "permission_denied"
        with pytest.raises(ClientClosed, match="permission_denied"):
            await sub.get(timeout=1)
        # The client and its other subscription go on.
        await rec.wait(lambda: rec.count("connected") == 2)
        await api.publish("pub:open", "on")
        assert await take(other, 1) == ["on"] and list(client.subscriptions) == ["pub:open"]


async def test_disconnect_push_without_reconnect_stops_the_client(start_server: ServerFactory) -> None:
    srv = await start_server()
    client = Client(srv.ws_url, **FAST)
    rec = Recorder(client)
    async with client:
        sub = await client.subscribe("pub:x")
        drop_connections(srv, CloseCode.BAD_PROTOCOL)  # 4400: the push says reconnect: false
        await rec.wait(lambda: client.state == "closed")
        (event,) = rec.events("disconnect")
        assert event.code == 4400 and event.reconnect is False
        assert rec.count("reconnecting") == 0 and client.connects == 1
        with pytest.raises(ClientClosed, match="4400"):
            await client.publish("pub:x", 1)
        with pytest.raises(ClientClosed):
            await sub.get(timeout=1)
        assert sub.end_code == "closed"


# ------------------------------------------------------------------------------ insufficient_state


async def test_insufficient_state_resubscribes_from_the_last_position(start_server: ServerFactory) -> None:
    """The node misses publications 3-5 of a channel, then ends its subscriptions (``insufficient_state``
    push). The client subscribes again at once with ``since`` on the same connection: recovered true, every
    publication once and in order, the same Subscription, no ``unsubscribed``. A subscription with a fixed
    token (no ``get_token``) goes on the same way."""
    broker = LossyBroker()
    srv = await token_server(start_server, broker_impl=broker)
    client = Client(srv.ws_url, **FAST)
    rec = Recorder(client)
    async with client, HTTPClient(srv.http, API_KEY) as api:
        sub = await client.subscribe("pub:lossy")
        token = hs({"channel": "priv:lossy", "exp": time.time() + 300})
        priv = await client.subscribe("priv:lossy", token=token)
        for i in range(3):
            await api.publish("pub:lossy", i)
            await api.publish("priv:lossy", i)
        assert await take(sub, 3) == [0, 1, 2] and await take(priv, 3) == [0, 1, 2]
        broker.dropping |= {"pub:lossy", "priv:lossy"}
        for i in range(3, 6):  # stored, never delivered live by this node
            await api.publish("pub:lossy", i)
            await api.publish("priv:lossy", i)
        broker.dropping.clear()
        mark = rec.mark()
        srv.node.subscriptions.lost("pub:lossy")
        srv.node.subscriptions.lost("priv:lossy")
        for i in range(6, 9):  # racing the re-subscribe
            await api.publish("pub:lossy", i)
            await api.publish("priv:lossy", i)
        got = [await sub.get(timeout=5) for _ in range(6)]
        assert [p.data for p in got] == [3, 4, 5, 6, 7, 8] and [p.offset for p in got] == [4, 5, 6, 7, 8, 9]
        assert await take(priv, 6) == [3, 4, 5, 6, 7, 8]
        await api.publish("pub:lossy", 9)  # nothing was repeated before it
        assert await take(sub, 1) == [9]
        await rec.wait(lambda: rec.count("subscribed", mark) == 2)
        again = {e.channel: e for e in rec.events("subscribed", mark)}
        assert again["pub:lossy"].recovered is True and again["priv:lossy"].recovered is True
        assert rec.count("unsubscribed") == 0 and rec.count("gap") == 0 and rec.count("error") == 0
        assert rec.count("disconnect") == 0 and client.connects == 1
        assert client.subscriptions == {"pub:lossy": sub, "priv:lossy": priv}
        assert sub.active and priv.active and sub.gaps == 0 and sub.recovered is True
        assert client.position("pub:lossy") == StreamPosition(10, got[0].epoch)


async def test_insufficient_state_beyond_history_tells_the_app(start_server: ServerFactory) -> None:
    """The node misses more than the channel's history keeps (``small``: 5): the re-subscribe answers
    recovered false, so the app gets ``gap`` (not_recovered; ``on_gap`` too) and the subscription goes on
    from the server's top; still no ``unsubscribed``."""
    broker = LossyBroker()
    srv = await start_server(broker_impl=broker)
    client = Client(srv.ws_url, **FAST)
    rec = Recorder(client)
    told: list[Subscription] = []
    async with client, HTTPClient(srv.http, API_KEY) as api:
        sub = await client.subscribe("small:lossy", on_gap=told.append)
        for i in range(2):
            await api.publish("small:lossy", i)
        assert await take(sub, 2) == [0, 1]
        before = sub.position
        assert before is not None and before.offset == 2
        broker.dropping.add("small:lossy")
        for i in range(2, 9):  # offsets 3-9: only 5-9 are kept
            await api.publish("small:lossy", i)
        broker.dropping.clear()
        mark = rec.mark()
        srv.node.subscriptions.lost("small:lossy")
        await rec.wait(lambda: rec.count("gap", mark) == 1 and rec.count("subscribed", mark) == 1)
        top = StreamPosition(9, before.epoch)
        assert rec.events("gap", mark) == [GapEvent("small:lossy", "not_recovered", False, before, top)]
        assert rec.events("subscribed", mark) == [SubscribedEvent("small:lossy", 9, before.epoch, False)]
        assert told == [sub] and sub.gaps == 1 and sub.recovered is False and sub.position == top
        await api.publish("small:lossy", 9)
        got = await sub.get(timeout=5)
        assert (got.data, got.offset) == (9, 10)
        assert rec.count("unsubscribed") == 0 and rec.count("disconnect") == 0 and sub.active


async def test_insufficient_state_again_and_again_while_publishing(start_server: ServerFactory) -> None:
    """``lost`` every few milliseconds while 200 publications flow (some of them while the re-subscribe is
    catching up, so the server sends the push right after its reply): each publication once, in order."""
    srv = await start_server()
    client = Client(srv.ws_url, **FAST)
    rec = Recorder(client)
    async with client, HTTPClient(srv.http, API_KEY) as api:
        sub = await client.subscribe("pub:churn")
        done = False

        async def churn() -> int:
            n = 0
            while not done:
                srv.node.subscriptions.lost("pub:churn")
                n += 1
                await asyncio.sleep(0.005)
            return n

        task = asyncio.create_task(churn())
        try:
            await publish_paced(api, "pub:churn", 200, 400)
        finally:
            done = True
            losses = await task
        got = [await sub.get(timeout=5) for _ in range(200)]
        assert [p.data for p in got] == list(range(200)) and [p.offset for p in got] == list(range(1, 201))
        await api.publish("pub:churn", "last")
        assert await take(sub, 1) == ["last"]
    resubscribes = rec.events("subscribed")[1:]
    assert losses > 10 and len(resubscribes) >= 10, (losses, len(resubscribes))
    assert all(e.recovered is True for e in resubscribes)
    assert rec.count("unsubscribed") == 0 and rec.count("gap") == 0 and rec.count("disconnect") == 0


# ---------------------------------------------------------------------------------------------- HTTP


SCRIPT = """
import asyncio, json, sys
from tidings import SyncHTTPClient
try:
    asyncio.get_running_loop()
except RuntimeError:
    pass
else:
    sys.exit("an event loop is running")
with SyncHTTPClient(sys.argv[1], sys.argv[2], timeout=5) as api:
    one = api.publish("pub:script", {"n": 1})
    many = api.batch([{"channel": "pub:script", "data": {"n": n}} for n in (2, 3)])
    pubs, pos, _ = api.history("pub:script")
    print(json.dumps({"one": one, "many": many, "history": [p.data["n"] for p in pubs],
                      "health": api.health()["status"], "stats": api.pool_stats()}))
"""


async def test_sync_client_from_a_plain_script(server: Server) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SCRIPT, server.http, API_KEY,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    r = json.loads(out)
    assert r["one"]["offset"] == 1 and [m["offset"] for m in r["many"]] == [2, 3]
    assert r["history"] == [1, 2, 3] and r["health"] == "ok"
    assert r["stats"] == {"connections": 1, "requests": 4}  # one kept-alive connection for all four


async def test_sync_client_from_a_thread_pool(server: Server) -> None:
    api = SyncHTTPClient(server.http, API_KEY, pool_size=8)

    def work(t: int) -> list[int]:
        return [api.publish("pub:pool", {"t": t, "i": i})["offset"] for i in range(25)]

    def run() -> list[list[int]]:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            return list(pool.map(work, range(8)))

    offsets = await asyncio.to_thread(run)
    stats = api.pool_stats()
    api.close()
    assert sorted(o for per in offsets for o in per) == list(range(1, 201))
    async with HTTPClient(server.http, API_KEY) as http:
        pubs, pos, _ = await http.history("pub:pool", limit=1000)
    assert pos.offset == 200 and len({(p.data["t"], p.data["i"]) for p in pubs}) == 200
    assert stats["requests"] == 200 and 1 <= stats["connections"] <= 8, stats
    print("thread pool:", stats)


async def test_batch_and_broadcast_with_keys_async_and_sync(server: Server) -> None:
    entries: list[BatchEntry | dict[str, Any]] = [
        BatchEntry("pub:batch", {"n": 1}, idempotency_key="order-1"),
        {"channel": "pub:batch", "data": {"n": 2}, "info": {"source": "test"}, "idempotency_key": "order-2"},
        {"channel": "bad name", "data": 3},
    ]
    sync = SyncHTTPClient(server.http, API_KEY)
    async with HTTPClient(server.http, API_KEY) as api:
        first = await api.batch(entries)
        assert [r.get("offset") for r in first] == [1, 2, None]
        assert first[2]["error"]["code"] == "invalid_channel"
        # The same keys again, async and sync: the same answers, nothing stored twice.
        again = await api.batch(entries[:2])
        sync_again = await asyncio.to_thread(sync.batch, entries[:2])
        assert [r["offset"] for r in again] == [r["offset"] for r in sync_again] == [1, 2]
        assert [r["id"] for r in again] == [r["id"] for r in first[:2]]
        # Without keys each batch entry is new (generated keys differ per call).
        fresh = await asyncio.to_thread(sync.batch, [{"channel": "pub:batch", "data": {"n": 4}}])
        assert fresh[0]["offset"] == 3
        b1 = await api.broadcast(["pub:b1", "pub:b2"], "hi", idempotency_key="news-1")
        b2 = await asyncio.to_thread(sync.broadcast, ["pub:b1", "pub:b2"], "hi", idempotency_key="news-1")
        assert [r["offset"] for r in b1] == [r["offset"] for r in b2] == [1, 1]
        pubs, _, _ = await api.history("pub:batch")
        assert [p.data["n"] for p in pubs] == [1, 2, 4] and pubs[1].info == {"source": "test"}
        with pytest.raises(ValueError, match="idempotency_key"):
            await api.publish("pub:batch", 1, idempotency_key="x" * 65)
    sync.close()


# ---------------------------------------------------------------------------------------------- retries


@pytest.mark.timeout(90)
async def test_retries_through_a_frozen_server_store_each_publication_once(
    subprocess_server: Callable[..., Proc], tmp_path: Path
) -> None:
    """The server is frozen (SIGSTOP) while the three clients publish; they time out and send again
    with the same keys; once it runs again (SIGCONT) history holds each publication exactly once."""
    config = tmp_path / "tidings.toml"
    config.write_text("[namespaces.pub]\npublish = true\n")
    srv = subprocess_server("--config", str(config))
    key = read_api_key(srv.data_dir)
    assert key and srv.proc is not None
    pid = srv.proc.pid
    client = Client(srv.ws_url, request_timeout=0.5, publish_timeout=40, **FAST)
    http = HTTPClient(srv.http, key, timeout=0.5, retries=100, retry_deadline=40)
    sync = SyncHTTPClient(srv.http, key, timeout=0.5, retries=100, retry_deadline=40)
    n = 5
    async with client, http:
        # Warm up: connections open, channels exist.
        await client.publish("pub:idem-ws", "warm")
        await http.publish("pub:idem-http", "warm")
        await asyncio.to_thread(sync.publish, "pub:idem-sync", "warm")

        def sync_publishes() -> list[int]:
            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                return [r["offset"] for r in pool.map(lambda i: sync.publish("pub:idem-sync", i), range(n))]

        os.kill(pid, signal.SIGSTOP)
        try:
            ws_task = asyncio.gather(*(client.publish("pub:idem-ws", i) for i in range(n)))
            http_task = asyncio.gather(*(http.publish("pub:idem-http", i) for i in range(n)))
            sync_task = asyncio.ensure_future(asyncio.to_thread(sync_publishes))
            async with asyncio.timeout(20):
                while client.publish_retries < 2 * n or http.retry_count < 2 * n or sync.retry_count < 2 * n:
                    await asyncio.sleep(0.05)
        finally:
            os.kill(pid, signal.SIGCONT)
        ws_pos = await asyncio.wait_for(ws_task, 30)
        http_res = await asyncio.wait_for(http_task, 30)
        sync_offsets = await asyncio.wait_for(sync_task, 30)
        returned = {
            "pub:idem-ws": sorted(p.offset for p in ws_pos),
            "pub:idem-http": sorted(r["offset"] for r in http_res),
            "pub:idem-sync": sorted(sync_offsets),
        }
        for channel, offsets in returned.items():
            pubs, pos, _ = await http.history(channel)
            assert pubs[0].data == "warm"
            assert sorted(p.data for p in pubs[1:]) == list(range(n)), (channel, [p.data for p in pubs])
            assert offsets == [p.offset for p in pubs[1:]] and pos.offset == n + 1
        assert client.connects == 1  # the ws client sent again on the same connection (timeouts)
    figures = {"ws": client.publish_retries, "http": http.retry_count, "sync": sync.retry_count}
    sync.close()
    print("retries while frozen:", figures)


async def test_publish_resent_after_a_reconnect_is_stored_once(
    subprocess_server: Callable[..., Proc], tmp_path: Path
) -> None:
    """Frozen mid-publish until the client's heartbeat gives the connection up (ConnectionLost); the
    server, resumed, stores what it had read from the old connection, and the client's resends on the new
    connection (same keys) store nothing more and get the same offsets."""
    config = tmp_path / "tidings.toml"
    config.write_text("[namespaces.pub]\npublish = true\n")
    srv = subprocess_server("--config", str(config))
    key = read_api_key(srv.data_dir)
    assert key and srv.proc is not None
    client = Client(srv.ws_url, heartbeat=1.0, request_timeout=5, publish_timeout=40, **FAST)
    rec = Recorder(client)
    n = 5
    async with client, HTTPClient(srv.http, key) as http:
        await client.publish("pub:resend", "warm")
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            task = asyncio.gather(*(client.publish("pub:resend", i) for i in range(n)))
            await rec.wait(lambda: rec.count("disconnect") == 1, timeout=15)
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        positions = await asyncio.wait_for(task, 30)
        pubs, pos, _ = await http.history("pub:resend")
    assert pubs[0].data == "warm" and sorted(p.data for p in pubs[1:]) == list(range(n))
    assert pos.offset == n + 1
    assert sorted(p.offset for p in positions) == list(range(2, n + 2))
    assert client.connects == 2 and client.publish_retries >= n
    print("resent after reconnect:", client.publish_retries)


@pytest.mark.timeout(20)
async def test_fixed_connection_token_that_expires_stops_instead_of_reconnecting(
    start_server: ServerFactory,
) -> None:
    """A fixed token cannot get better: after 4002 (token expired) without get_token the client stops
    (``disconnect`` with reconnect False, state closed) rather than reconnect with the same token."""
    srv = await token_server(start_server)
    stale = Client(srv.ws_url, token=hs({"sub": "alice", "exp": time.time() - 60}), **FAST)
    rec = Recorder(stale)
    with pytest.raises(ClientClosed, match="token"):
        await stale.connect()
    assert stale.state == "closed" and rec.count("reconnecting") == 0
    await stale.close()

    client = Client(srv.ws_url, token=hs({"sub": "alice", "exp": time.time() + 2}), **FAST)
    rec = Recorder(client)
    async with client:
        assert client.user == "alice"
        await rec.wait(lambda: client.state == "closed", timeout=10)
    (gone,) = rec.events("disconnect")
    assert gone.code == CloseCode.TOKEN_EXPIRED and gone.reconnect is False
    assert rec.count("reconnecting") == 0 and client.connects == 1
