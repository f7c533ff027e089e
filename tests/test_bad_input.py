"""Bad input never crashes the server or disturbs other clients (issue 2).

Every case runs against a real server on a free port with real WebSocket/HTTP clients, asserts the exact
documented error code (reply, connection kept) or close code (protocol violation), and then checks that a
well-behaved *witness* client connected to the same server at the same time still receives a publication.
The codes are listed in docs/protocol.md and docs/http-api.md.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import aiohttp
import orjson
import pytest
from yarl import URL

from tidings.config import Namespace
from tidings.protocol import CloseCode, ErrorCode

from .conftest import API_KEY, Probe, ProbeFactory, Server, ServerFactory, api_headers

WITNESS_CHANNEL = "pub:witness"
_seq = itertools.count(1)


class Witness:
    """A well-behaved subscriber on the same server: after each bad input it must still get publications.

    The publisher is a second connection opened beforehand (publishing over /ws), so the check still works
    when a test has made the server refuse new HTTP requests from this address (429 after bad keys).
    """

    def __init__(self, srv: Server, p: Probe, publisher: Probe, session: aiohttp.ClientSession) -> None:
        self.srv = srv
        self.p = p
        self.publisher = publisher
        self.session = session

    async def check(self) -> None:
        n = next(_seq)
        await self.publisher.ok("publish", channel=WITNESS_CHANNEL, data={"witness": n})
        (msg,) = await self.p.messages(1, timeout=5)
        assert msg["channel"] == WITNESS_CHANNEL and msg["data"] == {"witness": n}
        async with asyncio.timeout(10):
            async with self.session.get(f"{self.srv.http}/healthz") as r:
                assert r.status == 200


async def watch(srv: Server, probe: ProbeFactory, session: aiohttp.ClientSession) -> Witness:
    p = await probe(srv)
    await p.ok("subscribe", channel=WITNESS_CHANNEL)
    return Witness(srv, p, await probe(srv), session)


@pytest.fixture
async def witness(server: Server, probe: ProbeFactory, session: aiohttp.ClientSession) -> Witness:
    return await watch(server, probe, session)


async def send_and_reply(p: Probe, frame: str, rid: Any) -> dict[str, Any]:
    await p.send_raw(frame)
    return await p.reply(rid, timeout=5)


def assert_error(reply: dict[str, Any], code: ErrorCode, rid: Any) -> None:
    assert reply["ok"] is False, reply
    assert reply["id"] == rid, reply
    assert reply["error"]["code"] == code.value, reply
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"], reply


def frame(**fields: Any) -> str:
    return orjson.dumps(fields).decode()


# ---------------------------------------------------------------------------------------------- WebSocket:
# frames that cannot be parsed into a command. Reply with the documented code, connection kept.

_DEEP = '{"id": 1, "op": "publish", "channel": "pub:x", "data": ' + "[" * 1100 + "]" * 1100 + "}"

PARSE_CASES: list[tuple[str, str, ErrorCode, Any]] = [
    # (case id, raw frame, expected code, expected reply id)
    ("not-json", "hello", ErrorCode.BAD_REQUEST, None),
    ("empty-frame", "", ErrorCode.BAD_REQUEST, None),
    ("truncated", '{"id": 1, "op": "ping"', ErrorCode.BAD_REQUEST, None),
    ("single-quotes", "{'id': 1, 'op': 'ping'}", ErrorCode.BAD_REQUEST, None),
    ("nan", '{"id": NaN, "op": "ping"}', ErrorCode.BAD_REQUEST, None),
    ("trailing-garbage", '{"id": 1, "op": "ping"} x', ErrorCode.BAD_REQUEST, None),
    ("too-deep", _DEEP, ErrorCode.BAD_REQUEST, None),
    ("array", '[{"id": 1, "op": "ping"}]', ErrorCode.BAD_REQUEST, None),
    ("number", "42", ErrorCode.BAD_REQUEST, None),
    ("string", '"ping"', ErrorCode.BAD_REQUEST, None),
    ("null", "null", ErrorCode.BAD_REQUEST, None),
    ("bool", "true", ErrorCode.BAD_REQUEST, None),
    ("unknown-op", frame(id=1, op="fly"), ErrorCode.UNKNOWN_OP, 1),
    ("unknown-op-case", frame(id="a", op="PING"), ErrorCode.UNKNOWN_OP, "a"),
    ("unknown-op-empty", frame(id=2, op=""), ErrorCode.UNKNOWN_OP, 2),
    ("op-missing", frame(id=1), ErrorCode.INVALID_FIELD, 1),
    ("op-missing-empty-object", "{}", ErrorCode.INVALID_FIELD, None),
    ("op-null", frame(id=1, op=None), ErrorCode.INVALID_FIELD, 1),
    ("op-number", frame(id=1, op=5), ErrorCode.INVALID_FIELD, 1),
    ("op-list", frame(id=1, op=["ping"]), ErrorCode.INVALID_FIELD, 1),
    ("id-float", frame(id=1.5, op="ping"), ErrorCode.INVALID_FIELD, None),
    ("id-bool", frame(id=True, op="ping"), ErrorCode.INVALID_FIELD, None),
    ("id-list", frame(id=[1], op="ping"), ErrorCode.INVALID_FIELD, None),
    ("id-object", frame(id={"a": 1}, op="ping"), ErrorCode.INVALID_FIELD, None),
    ("id-too-long", frame(id="x" * 65, op="ping"), ErrorCode.INVALID_FIELD, None),
    ("publish-no-channel", frame(id=1, op="publish", data=1), ErrorCode.INVALID_FIELD, 1),
    ("subscribe-no-channel", frame(id=1, op="subscribe"), ErrorCode.INVALID_FIELD, 1),
    ("unsubscribe-no-channel", frame(id=1, op="unsubscribe"), ErrorCode.INVALID_FIELD, 1),
    ("history-no-channel", frame(id=1, op="history"), ErrorCode.INVALID_FIELD, 1),
    ("presence-no-channel", frame(id=1, op="presence"), ErrorCode.INVALID_FIELD, 1),
    ("channel-null", frame(id=1, op="subscribe", channel=None), ErrorCode.INVALID_FIELD, 1),
    ("channel-number", frame(id=1, op="subscribe", channel=5), ErrorCode.INVALID_CHANNEL, 1),
    ("channel-list", frame(id=1, op="publish", channel=["pub:x"], data=1), ErrorCode.INVALID_CHANNEL, 1),
    ("channel-object", frame(id=1, op="history", channel={"a": 1}), ErrorCode.INVALID_CHANNEL, 1),
    ("publish-no-data", frame(id=1, op="publish", channel="pub:x"), ErrorCode.INVALID_FIELD, 1),
    ("since-number", frame(id=1, op="subscribe", channel="pub:x", since=5), ErrorCode.INVALID_FIELD, 1),
    ("since-string", frame(id=1, op="subscribe", channel="pub:x", since="5"), ErrorCode.INVALID_FIELD, 1),
    ("since-list", frame(id=1, op="subscribe", channel="pub:x", since=[1, "e"]), ErrorCode.INVALID_FIELD, 1),
    (
        "since-no-offset",
        frame(id=1, op="subscribe", channel="pub:x", since={"epoch": "e"}),
        ErrorCode.INVALID_FIELD,
        1,
    ),
    (
        "since-offset-string",
        frame(id=1, op="subscribe", channel="pub:x", since={"offset": "3", "epoch": "e"}),
        ErrorCode.INVALID_FIELD,
        1,
    ),
    (
        "since-offset-float",
        frame(id=1, op="subscribe", channel="pub:x", since={"offset": 1.5, "epoch": "e"}),
        ErrorCode.INVALID_FIELD,
        1,
    ),
    (
        "since-offset-bool",
        frame(id=1, op="subscribe", channel="pub:x", since={"offset": True, "epoch": "e"}),
        ErrorCode.INVALID_FIELD,
        1,
    ),
    (
        "since-offset-negative",
        frame(id=1, op="subscribe", channel="pub:x", since={"offset": -1, "epoch": "e"}),
        ErrorCode.INVALID_FIELD,
        1,
    ),
    (
        "since-offset-too-big",
        frame(id=1, op="subscribe", channel="pub:x", since={"offset": 2**63, "epoch": "e"}),
        ErrorCode.INVALID_FIELD,
        1,
    ),
    (
        "since-epoch-number",
        frame(id=1, op="subscribe", channel="pub:x", since={"offset": 1, "epoch": 5}),
        ErrorCode.INVALID_FIELD,
        1,
    ),
    (
        "since-epoch-too-long",
        frame(id=1, op="subscribe", channel="pub:x", since={"offset": 1, "epoch": "e" * 65}),
        ErrorCode.INVALID_FIELD,
        1,
    ),
    (
        "history-since-negative",
        frame(id=1, op="history", channel="pub:x", since={"offset": -5, "epoch": "e"}),
        ErrorCode.INVALID_FIELD,
        1,
    ),
    ("history-limit-zero", frame(id=1, op="history", channel="pub:x", limit=0), ErrorCode.INVALID_FIELD, 1),
    (
        "history-limit-negative",
        frame(id=1, op="history", channel="pub:x", limit=-1),
        ErrorCode.INVALID_FIELD,
        1,
    ),
    (
        "history-limit-too-big",
        frame(id=1, op="history", channel="pub:x", limit=1001),
        ErrorCode.INVALID_FIELD,
        1,
    ),
    (
        "history-limit-string",
        frame(id=1, op="history", channel="pub:x", limit="10"),
        ErrorCode.INVALID_FIELD,
        1,
    ),
    (
        "history-limit-float",
        frame(id=1, op="history", channel="pub:x", limit=2.5),
        ErrorCode.INVALID_FIELD,
        1,
    ),
    (
        "history-limit-bool",
        frame(id=1, op="history", channel="pub:x", limit=True),
        ErrorCode.INVALID_FIELD,
        1,
    ),
    (
        "subscribe-token-number",
        frame(id=1, op="subscribe", channel="pub:x", token=5),
        ErrorCode.INVALID_FIELD,
        1,
    ),
    ("connect-token-object", frame(id=1, op="connect", token={"t": 1}), ErrorCode.INVALID_FIELD, 1),
]


@pytest.mark.parametrize(
    ("raw", "code", "rid"), [c[1:] for c in PARSE_CASES], ids=[c[0] for c in PARSE_CASES]
)
async def test_malformed_frame_gets_error_reply(
    server: Server, probe: ProbeFactory, witness: Witness, raw: str, code: ErrorCode, rid: Any
) -> None:
    bad = await probe(server)
    assert_error(await send_and_reply(bad, raw, rid), code, rid)
    # The connection is kept and still works; nobody else noticed.
    await bad.ok("ping")
    await bad.ok("subscribe", channel=WITNESS_CHANNEL)
    await witness.check()
    (m,) = await bad.messages(1)
    assert m["channel"] == WITNESS_CHANNEL


# ---------------------------------------------------------------------------------------------- channel names

BAD_CHANNELS: list[tuple[str, str]] = [
    ("empty", ""),
    ("256-bytes", "pub:" + "a" * 252),
    ("very-long", "pub:" + "a" * 5000),
    ("space", "pub:two words"),
    ("bang", "pub:lobby!"),
    ("html", "pub:<script>"),
    ("quote", 'pub:"x"'),
    ("star", "pub:*"),
    ("newline", "pub:x\n"),
    ("nul", "pub:x\x00"),
    ("tab", "pub:\tx"),
    ("latin1", "pub:café"),
    ("cjk", "pub:日本"),
    ("emoji", "pub:😀"),
    ("fullwidth-digit", "pub:\uff11"),
    ("rtl-override", "pub:\u202ex"),
]
CHANNEL_OPS: list[tuple[str, dict[str, Any]]] = [
    ("subscribe", {}),
    ("unsubscribe", {}),
    ("publish", {"data": {"x": 1}}),
    ("history", {}),
    ("presence", {}),
]


@pytest.mark.parametrize(("op", "extra"), CHANNEL_OPS, ids=[o for o, _ in CHANNEL_OPS])
@pytest.mark.parametrize("channel", [c for _, c in BAD_CHANNELS], ids=[i for i, _ in BAD_CHANNELS])
async def test_invalid_channel_name(
    server: Server, probe: ProbeFactory, witness: Witness, op: str, extra: dict[str, Any], channel: str
) -> None:
    bad = await probe(server)
    reply = await bad.request(op, channel=channel, **extra)
    assert reply["error"]["code"] == ErrorCode.INVALID_CHANNEL.value, reply
    assert reply["ok"] is False
    await bad.ok("ping")
    await witness.check()


async def test_channel_name_limits_are_exact(server: Server, probe: ProbeFactory, witness: Witness) -> None:
    """255 bytes and every allowed character are accepted; one byte more is refused."""
    p = await probe(server)
    longest = "pub:" + "a" * 251
    assert len(longest.encode()) == 255
    assert (await p.ok("subscribe", channel=longest))["channel"] == longest
    odd = "pub:AZaz09_-:.@/="
    await p.ok("subscribe", channel=odd)
    await p.ok("publish", channel=odd, data=1)
    (m,) = await p.messages(1)
    assert m["channel"] == odd
    reply = await p.request("subscribe", channel=longest + "a")
    assert reply["error"]["code"] == ErrorCode.INVALID_CHANNEL.value
    await witness.check()


# ---------------------------------------------------------------------------- refusals by rule


async def test_publish_to_read_only_namespace(server: Server, probe: ProbeFactory, witness: Witness) -> None:
    bad = await probe(server)
    await bad.ok("subscribe", channel="ro:news")
    reply = await bad.request("publish", channel="ro:news", data={"x": 1})
    assert_error(reply, ErrorCode.PERMISSION_DENIED, reply["id"])
    # Nothing was published; the HTTP API still may publish there.
    assert (await bad.ok("history", channel="ro:news"))["publications"] == []
    async with witness.session.post(
        f"{server.http}/api/publish", json={"channel": "ro:news", "data": "ok"}, headers=api_headers()
    ) as r:
        assert r.status == 200
    (m,) = await bad.messages(1)
    assert m["data"] == "ok" and m["offset"] == 1
    await witness.check()


@pytest.mark.parametrize("channel", ["nowhere:x", "lobby", "roo:x"])
@pytest.mark.parametrize(("op", "extra"), CHANNEL_OPS, ids=[o for o, _ in CHANNEL_OPS])
async def test_unknown_namespace_without_default(
    start_server: ServerFactory,
    probe: ProbeFactory,
    session: aiohttp.ClientSession,
    op: str,
    extra: dict[str, Any],
    channel: str,
) -> None:
    srv = await start_server(default_namespace=None)
    witness = await watch(srv, probe, session)
    bad = await probe(srv)
    reply = await bad.request(op, channel=channel, **extra)
    assert reply["ok"] is False and reply["error"]["code"] == ErrorCode.UNKNOWN_NAMESPACE.value, reply
    await bad.ok("ping")
    await witness.check()


async def test_unsubscribe_when_not_subscribed(server: Server, probe: ProbeFactory, witness: Witness) -> None:
    bad = await probe(server)
    reply = await bad.request("unsubscribe", channel="pub:never")
    assert reply["ok"] is False and reply["error"]["code"] == ErrorCode.NOT_SUBSCRIBED.value, reply
    # Twice: subscribe, unsubscribe, unsubscribe again.
    await bad.ok("subscribe", channel="pub:once")
    await bad.ok("unsubscribe", channel="pub:once")
    reply = await bad.request("unsubscribe", channel="pub:once")
    assert reply["error"]["code"] == ErrorCode.NOT_SUBSCRIBED.value, reply
    # Unsubscribing from a channel someone else is subscribed to does not touch their subscription.
    reply = await bad.request("unsubscribe", channel=WITNESS_CHANNEL)
    assert reply["error"]["code"] == ErrorCode.NOT_SUBSCRIBED.value, reply
    await witness.check()


async def test_double_subscribe(server: Server, probe: ProbeFactory, witness: Witness) -> None:
    bad = await probe(server)
    first = await bad.ok("subscribe", channel=WITNESS_CHANNEL)
    assert first["channel"] == WITNESS_CHANNEL
    reply = await bad.request("subscribe", channel=WITNESS_CHANNEL)
    assert reply["ok"] is False and reply["error"]["code"] == ErrorCode.ALREADY_SUBSCRIBED.value, reply
    reply = await bad.request(
        "subscribe", channel=WITNESS_CHANNEL, since={"offset": 0, "epoch": first["epoch"]}
    )
    assert reply["error"]["code"] == ErrorCode.ALREADY_SUBSCRIBED.value, reply
    await witness.check()
    # The first subscription is intact and delivers exactly one copy.
    (m,) = await bad.messages(1)
    assert m["channel"] == WITNESS_CHANNEL
    await bad.ok("ping")
    assert bad.pushes.empty()
    async with asyncio.timeout(10):
        async with witness.session.get(f"{server.http}/api/channels", headers=api_headers()) as r:
            counts = {c["channel"]: c["subscribers"] for c in (await r.json())["channels"]}
    assert counts[WITNESS_CHANNEL] == 2


async def test_data_above_limit_inside_valid_frame(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(
        max_message_size=1024, namespaces={"tiny": Namespace("tiny", publish=True, max_message_size=100)}
    )
    witness = await watch(srv, probe, session)
    bad = await probe(srv)
    await bad.ok("subscribe", channel="tiny:x")
    reply = await bad.request("publish", channel="tiny:x", data="a" * 200)  # frame ~260 bytes < 1024
    assert reply["ok"] is False and reply["error"]["code"] == ErrorCode.MESSAGE_TOO_LARGE.value, reply
    # Just under the namespace limit is fine (the limit counts the JSON encoding of data: 98 + 2 quotes).
    await bad.ok("publish", channel="tiny:x", data="a" * 98)
    (m,) = await bad.messages(1)
    assert m["offset"] == 1  # the refused one took no offset
    reply = await bad.request("publish", channel="tiny:x", data="a" * 99)
    assert reply["error"]["code"] == ErrorCode.MESSAGE_TOO_LARGE.value, reply
    # The global limit applies to other namespaces: data of 1000 bytes in a frame under 1024 is fine.
    await bad.ok("publish", channel="pub:big", data="b" * 900)
    await witness.check()


# ---------------------------------------------------------------------------- protocol violations:
# the connection is closed with a documented close code, everyone else goes on.


async def test_oversized_frame_closes_1009(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(max_message_size=1024)
    witness = await watch(srv, probe, session)
    fine = await probe(srv)
    await fine.ok("publish", channel="pub:x", data="a" * 900)  # frame below the limit
    bad = await probe(srv)
    await bad.send_raw(frame(id=1, op="publish", channel="pub:x", data="a" * 2000))
    assert await bad.wait_closed() == CloseCode.MESSAGE_TOO_BIG == 1009
    assert not CloseCode.MESSAGE_TOO_BIG.reconnect
    await fine.ok("ping")
    await witness.check()


async def test_oversized_frame_at_default_limit(
    server: Server, probe: ProbeFactory, witness: Witness
) -> None:
    assert server.settings.max_message_size == 64 * 1024
    bad = await probe(server)
    await bad.send_raw(frame(id=1, op="publish", channel="pub:x", data="a" * (64 * 1024)))
    assert await bad.wait_closed() == CloseCode.MESSAGE_TOO_BIG
    await witness.check()


async def test_binary_frame_closes_1003(server: Server, probe: ProbeFactory, witness: Witness) -> None:
    bad = await probe(server)
    await bad.ok("subscribe", channel="pub:x")
    await bad.ws.send_bytes(frame(id=1, op="ping").encode())
    push = await bad.push()
    assert push == {
        "type": "disconnect",
        "code": CloseCode.UNSUPPORTED_DATA.value,
        "reason": "binary frames are not supported",
        "reconnect": False,
    }
    assert await bad.wait_closed() == CloseCode.UNSUPPORTED_DATA == 1003
    await witness.check()
    # Its subscription is gone with it.
    async with asyncio.timeout(10):
        async with witness.session.get(f"{server.http}/api/channels", headers=api_headers()) as r:
            names = [c["channel"] for c in (await r.json())["channels"]]
    assert "pub:x" not in names


async def test_invalid_utf8_text_frame_closes(server: Server, probe: ProbeFactory, witness: Witness) -> None:
    """A text frame that is not UTF-8 is refused by the WebSocket layer with 1007 (RFC 6455 §8.1)."""
    bad = await probe(server)
    await bad.ws.send_frame(b'{"op": "ping", "id": "\xff\xfe"}', aiohttp.WSMsgType.TEXT)
    assert await bad.wait_closed() == 1007
    await witness.check()


async def test_many_malformed_frames_close_4400(
    server: Server, probe: ProbeFactory, witness: Witness
) -> None:
    bad = await probe(server)
    for i in range(1, 101):
        await bad.send_raw(frame(id=i, op="nope"))
    for i in range(1, 101):
        assert_error(await bad.reply(i), ErrorCode.UNKNOWN_OP, i)
    await bad.send_raw(frame(id=101, op="nope"))  # the 101st in a row
    push = await bad.push()
    assert push == {"type": "disconnect", "code": 4400, "reason": "bad protocol", "reconnect": False}
    assert await bad.wait_closed() == CloseCode.BAD_PROTOCOL == 4400
    assert 101 not in bad.replies
    await witness.check()


async def test_malformed_count_resets_after_a_good_frame(
    server: Server, probe: ProbeFactory, witness: Witness
) -> None:
    bad = await probe(server)
    for _ in range(2):
        for _ in range(100):
            await bad.send_raw("not json")
        await bad.ok("ping")  # a good frame in between: the count starts again
    # Refusals of well-formed commands (not_subscribed here) do not count as malformed frames either.
    for _ in range(150):
        reply = await bad.request("unsubscribe", channel="pub:none")
        assert reply["error"]["code"] == ErrorCode.NOT_SUBSCRIBED.value
    assert not bad.closed.is_set()
    await bad.ok("ping")
    await witness.check()


async def test_bad_input_from_many_clients_at_once(
    server: Server, probe: ProbeFactory, witness: Witness
) -> None:
    """A burst of garbage, binary and oversized frames from several connections in parallel."""
    bads = [await probe(server) for _ in range(6)]

    async def garbage(p: Probe, kind: int) -> int | None:
        if kind == 0:
            await p.ws.send_bytes(b"\x00\x01")
        elif kind == 1:
            await p.send_raw("x" * (70 * 1024))
        else:
            for _ in range(101):
                await p.send_raw("{")
        return await p.wait_closed()

    async with asyncio.timeout(20):
        codes = await asyncio.gather(*(garbage(p, i % 3) for i, p in enumerate(bads)))
    assert codes == [1003, 1009, 4400] * 2
    await witness.check()


async def test_invalid_connection_token(server: Server, probe: ProbeFactory, witness: Witness) -> None:
    bad = await probe(server)
    reply = await bad.request("connect", token="not-a-jwt")
    assert reply["ok"] is False and reply["error"]["code"] == ErrorCode.UNAUTHORIZED.value, reply
    push = await bad.push()
    assert push["type"] == "disconnect" and push["code"] == 4001 and push["reconnect"] is False
    assert await bad.wait_closed() == CloseCode.UNAUTHORIZED
    in_url = await probe(server.ws_url + "?token=garbage")
    assert await in_url.wait_closed() == CloseCode.UNAUTHORIZED
    await witness.check()


async def test_invalid_subscription_token_keeps_connection(
    server: Server, probe: ProbeFactory, witness: Witness
) -> None:
    bad = await probe(server)
    reply = await bad.request("subscribe", channel="pub:x", token="not-a-jwt")
    assert reply["ok"] is False and reply["error"]["code"] == ErrorCode.UNAUTHORIZED.value, reply
    await bad.ok("ping")
    await witness.check()


# ---------------------------------------------------------------------------------------------- HTTP API


async def http(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, Any]:
    hdrs = {"Content-Type": "application/json", **(headers if headers is not None else api_headers())}
    async with asyncio.timeout(10):
        async with session.request(method, url, data=body, headers=hdrs) as r:
            raw = await r.read()
            return (
                r.status,
                r.content_type,
                orjson.loads(raw) if r.content_type == "application/json" else raw,
            )


def assert_http_error(result: tuple[int, str, Any], status: int, code: ErrorCode) -> None:
    got_status, ctype, body = result
    assert (got_status, ctype) == (status, "application/json"), result
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code.value, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


ENDPOINTS: list[tuple[str, str, bytes | None]] = [
    ("POST", "/api/publish", b'{"channel": "pub:x", "data": 1}'),
    ("POST", "/api/broadcast", b'{"channels": ["pub:x"], "data": 1}'),
    ("GET", "/api/channels/pub:x/history", None),
    ("GET", "/api/channels", None),
]
AUTH_HEADERS: list[tuple[str, dict[str, str]]] = [
    ("none", {}),
    ("empty", {"Authorization": ""}),
    ("basic", {"Authorization": "Basic dGVzdDp0ZXN0"}),
    ("bearer-no-key", {"Authorization": "Bearer"}),
    ("bearer-blank", {"Authorization": "Bearer "}),
    ("wrong-key", {"Authorization": "Bearer wrong-key"}),
    ("key-prefix", {"Authorization": f"Bearer {API_KEY[:-1]}"}),
    ("key-longer", {"Authorization": f"Bearer {API_KEY}x"}),
    ("token-scheme", {"Authorization": f"Token {API_KEY}"}),
    ("key-without-scheme", {"Authorization": API_KEY}),
]


@pytest.mark.parametrize("headers", [h for _, h in AUTH_HEADERS], ids=[i for i, _ in AUTH_HEADERS])
@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS, ids=[p for _, p, _ in ENDPOINTS])
async def test_http_unauthorized(
    server: Server,
    session: aiohttp.ClientSession,
    witness: Witness,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
) -> None:
    assert_http_error(
        await http(session, method, server.http + path, body=body, headers=headers),
        401,
        ErrorCode.UNAUTHORIZED,
    )
    # Nothing was published by the refused request.
    assert (await http(session, "GET", f"{server.http}/api/channels/pub:x/history"))[2]["offset"] == 0
    # The same request with the key works (scheme is case-insensitive).
    status, _, _ = await http(
        session, method, server.http + path, body=body, headers={"Authorization": f"bearer {API_KEY}"}
    )
    assert status == 200
    await witness.check()


async def test_healthz_needs_no_key(server: Server, session: aiohttp.ClientSession) -> None:
    status, _, body = await http(session, "GET", f"{server.http}/healthz", headers={})
    assert status == 200 and body["status"] == "ok"


BODY_CASES: list[tuple[str, bytes, int, ErrorCode]] = [
    ("empty", b"", 400, ErrorCode.BAD_REQUEST),
    ("not-json", b"channel=pub:x&data=1", 400, ErrorCode.BAD_REQUEST),
    ("truncated", b'{"channel": "pub:x", "data": 1', 400, ErrorCode.BAD_REQUEST),
    ("single-quotes", b"{'channel': 'pub:x', 'data': 1}", 400, ErrorCode.BAD_REQUEST),
    ("nan", b'{"channel": "pub:x", "data": NaN}', 400, ErrorCode.BAD_REQUEST),
    ("not-utf8", b'{"channel": "pub:x", "data": "\xff"}', 400, ErrorCode.BAD_REQUEST),
    ("array", b'[{"channel": "pub:x", "data": 1}]', 400, ErrorCode.BAD_REQUEST),
    ("number", b"1", 400, ErrorCode.BAD_REQUEST),
    ("string", b'"pub:x"', 400, ErrorCode.BAD_REQUEST),
    ("null", b"null", 400, ErrorCode.BAD_REQUEST),
    ("no-data", b'{"channel": "pub:x", "channels": ["pub:x"]}', 400, ErrorCode.INVALID_FIELD),
    (
        "info-not-object",
        b'{"channel": "pub:x", "channels": ["pub:x"], "data": 1, "info": 5}',
        400,
        ErrorCode.INVALID_FIELD,
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "code"), [c[1:] for c in BODY_CASES], ids=[c[0] for c in BODY_CASES]
)
@pytest.mark.parametrize("path", ["/api/publish", "/api/broadcast"])
async def test_http_bad_body(
    server: Server,
    session: aiohttp.ClientSession,
    witness: Witness,
    path: str,
    body: bytes,
    status: int,
    code: ErrorCode,
) -> None:
    assert_http_error(await http(session, "POST", server.http + path, body=body), status, code)
    assert (await http(session, "GET", f"{server.http}/api/channels/pub:x/history"))[2]["offset"] == 0
    await witness.check()


# A missing channel is invalid_field on the HTTP API as on the WebSocket; a wrong one invalid_channel.
HTTP_BAD_CHANNELS: list[tuple[str, Any]] = [
    ("missing", ...),
    ("null", None),
    ("number", 5),
    ("list", ["pub:x"]),
]
HTTP_BAD_CHANNELS += BAD_CHANNELS


@pytest.mark.parametrize("channel", [c for _, c in HTTP_BAD_CHANNELS], ids=[i for i, _ in HTTP_BAD_CHANNELS])
async def test_http_publish_bad_channel(
    server: Server, session: aiohttp.ClientSession, witness: Witness, channel: Any
) -> None:
    body: dict[str, Any] = {"data": {"x": 1}}
    if channel is not ...:
        body["channel"] = channel
    result = await http(session, "POST", f"{server.http}/api/publish", body=orjson.dumps(body))
    missing = channel is ... or channel is None
    assert_http_error(result, 400, ErrorCode.INVALID_FIELD if missing else ErrorCode.INVALID_CHANNEL)
    await witness.check()


async def test_http_history_of_namespace_without_history(
    start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(namespaces={"nohist": Namespace("nohist", history_size=0)})
    result = await http(session, "GET", f"{srv.http}/api/channels/nohist:x/history")
    assert_http_error(result, 404, ErrorCode.NOT_AVAILABLE)


async def test_http_history_empty_epoch_counts_as_absent(
    server: Server, session: aiohttp.ClientSession
) -> None:
    for i in range(3):
        await http(
            session, "POST", f"{server.http}/api/publish", body=orjson.dumps({"channel": "pub:e", "data": i})
        )
    status, _, body = await http(session, "GET", f"{server.http}/api/channels/pub:e/history?since=1&epoch=")
    assert status == 200 and body["recovered"] is True
    assert [p["offset"] for p in body["publications"]] == [2, 3]


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        ("caf%C3%A9", 400, ErrorCode.INVALID_CHANNEL),
        ("two%20words", 400, ErrorCode.INVALID_CHANNEL),
        ("pub:" + "a" * 252, 400, ErrorCode.INVALID_CHANNEL),
        # A newline cannot match the route's {channel} pattern at all: no such route.
        ("pub%3Ax%0A", 404, ErrorCode.NOT_FOUND),
        ("%3Cscript%3E", 400, ErrorCode.INVALID_CHANNEL),
    ],
    ids=["unicode", "space", "256-bytes", "newline", "html"],
)
async def test_http_history_bad_channel(
    server: Server, session: aiohttp.ClientSession, witness: Witness, raw: str, status: int, code: ErrorCode
) -> None:
    url = f"{server.http}/api/channels/{raw}/history"
    async with asyncio.timeout(10):
        async with session.get(URL(url, encoded=True), headers=api_headers()) as r:
            body = await r.json()
            assert (r.status, body["error"]["code"]) == (status, code.value), body
    await witness.check()


HISTORY_QUERIES: list[tuple[str, str]] = [
    ("limit-zero", "limit=0"),
    ("limit-negative", "limit=-1"),
    ("limit-too-big", "limit=1001"),
    ("limit-text", "limit=ten"),
    ("limit-float", "limit=2.5"),
    ("since-negative", "since=-1"),
    ("since-text", "since=abc"),
    ("since-float", "since=1.0"),
    ("since-too-big", f"since={2**63}"),
    ("epoch-without-since", "epoch=abc"),
    ("limit-ok-since-bad", "limit=5&since=x"),
]


@pytest.mark.parametrize("query", [q for _, q in HISTORY_QUERIES], ids=[i for i, _ in HISTORY_QUERIES])
async def test_http_history_bad_query(
    server: Server, session: aiohttp.ClientSession, witness: Witness, query: str
) -> None:
    result = await http(session, "GET", f"{server.http}/api/channels/pub:x/history?{query}")
    assert_http_error(result, 400, ErrorCode.INVALID_FIELD)
    await witness.check()


BROADCAST_CHANNELS: list[tuple[str, Any]] = [
    ("missing", ...),
    ("null", None),
    ("string", "pub:x"),
    ("object", {"pub:x": 1}),
    ("number", 3),
    ("empty-list", []),
    ("too-many", [f"pub:c{i}" for i in range(1001)]),
]


@pytest.mark.parametrize(
    "channels", [c for _, c in BROADCAST_CHANNELS], ids=[i for i, _ in BROADCAST_CHANNELS]
)
async def test_http_broadcast_bad_channels_list(
    server: Server, session: aiohttp.ClientSession, witness: Witness, channels: Any
) -> None:
    body: dict[str, Any] = {"data": {"x": 1}}
    if channels is not ...:
        body["channels"] = channels
    result = await http(session, "POST", f"{server.http}/api/broadcast", body=orjson.dumps(body))
    assert_http_error(result, 400, ErrorCode.INVALID_FIELD)
    status, _, listed = await http(session, "GET", f"{server.http}/api/channels/pub:c0/history")
    assert status == 200 and listed["offset"] == 0
    await witness.check()


async def test_http_broadcast_bad_entries_are_reported_per_channel(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(default_namespace=None)
    witness = await watch(srv, probe, session)
    sub = await probe(srv)
    await sub.ok("subscribe", channel="pub:good")
    channels = ["pub:good", "bad channel", 5, None, "", "nowhere:x", "ro:fine"]
    status, _, body = await http(
        session, "POST", f"{srv.http}/api/broadcast", body=orjson.dumps({"channels": channels, "data": "hi"})
    )
    assert status == 200, body
    results = body["results"]
    assert [r["channel"] for r in results] == channels
    codes = [r["error"]["code"] if "error" in r else "ok" for r in results]
    assert codes == [
        "ok",
        ErrorCode.INVALID_CHANNEL.value,
        ErrorCode.INVALID_CHANNEL.value,
        ErrorCode.INVALID_FIELD.value,  # null: no channel at all, as everywhere
        ErrorCode.INVALID_CHANNEL.value,
        ErrorCode.UNKNOWN_NAMESPACE.value,
        "ok",  # the HTTP API may publish where clients may not
    ]
    assert results[0]["offset"] == 1 and results[0]["epoch"] and results[0]["id"]
    (m,) = await sub.messages(1)
    assert m["data"] == "hi" and m["id"] == results[0]["id"]
    await witness.check()


async def test_http_oversized_body_413(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(max_http_body=4096, max_message_size=1024)
    witness = await watch(srv, probe, session)
    for path in ("/api/publish", "/api/broadcast"):
        big = orjson.dumps({"channel": "pub:x", "channels": ["pub:x"], "data": "a" * 8000})
        assert_http_error(
            await http(session, "POST", srv.http + path, body=big), 413, ErrorCode.MESSAGE_TOO_LARGE
        )
    # A body under max_http_body whose data is above max_message_size: 413 with the same code.
    body = orjson.dumps({"channel": "pub:x", "data": "a" * 2000})
    assert_http_error(
        await http(session, "POST", f"{srv.http}/api/publish", body=body), 413, ErrorCode.MESSAGE_TOO_LARGE
    )
    status, _, hist = await http(session, "GET", f"{srv.http}/api/channels/pub:x/history")
    assert status == 200 and hist["offset"] == 0
    await witness.check()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/publish", b'{"channel": "nowhere:x", "data": 1}'),
        ("POST", "/api/publish", b'{"channel": "lobby", "data": 1}'),
        ("GET", "/api/channels/nowhere:x/history", None),
    ],
    ids=["publish", "publish-no-namespace", "history"],
)
async def test_http_unknown_namespace(
    start_server: ServerFactory,
    probe: ProbeFactory,
    session: aiohttp.ClientSession,
    method: str,
    path: str,
    body: bytes | None,
) -> None:
    srv = await start_server(default_namespace=None)
    witness = await watch(srv, probe, session)
    assert_http_error(
        await http(session, method, srv.http + path, body=body), 404, ErrorCode.UNKNOWN_NAMESPACE
    )
    await witness.check()


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/api/nope", 404, ErrorCode.NOT_FOUND),
        ("POST", "/api/nope", 404, ErrorCode.NOT_FOUND),
        ("GET", "/api/", 404, ErrorCode.NOT_FOUND),
        ("GET", "/api/channels/pub:x", 404, ErrorCode.NOT_FOUND),
        ("GET", "/api/channels/pub:x/history/extra", 404, ErrorCode.NOT_FOUND),
        ("POST", "/api/publish/extra", 404, ErrorCode.NOT_FOUND),
        ("GET", "/api/publish", 405, ErrorCode.BAD_REQUEST),
        ("DELETE", "/api/channels", 405, ErrorCode.BAD_REQUEST),
        ("POST", "/api/channels/pub:x/history", 405, ErrorCode.BAD_REQUEST),
    ],
)
async def test_http_unknown_route_is_json(
    server: Server,
    session: aiohttp.ClientSession,
    witness: Witness,
    method: str,
    path: str,
    status: int,
    code: ErrorCode,
) -> None:
    assert_http_error(await http(session, method, server.http + path, body=b"{}"), status, code)
    await witness.check()


async def test_http_repeated_bad_keys_get_429(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(api_failures_per_minute=3)
    witness = await watch(srv, probe, session)
    wrong = api_headers("wrong-key-0000000000")
    for _ in range(3):
        assert_http_error(
            await http(session, "GET", f"{srv.http}/api/channels", headers=wrong), 401, ErrorCode.UNAUTHORIZED
        )
    # Now even the right key is refused from this address, with Retry-After.
    async with asyncio.timeout(10):
        async with session.get(f"{srv.http}/api/channels", headers=api_headers()) as r:
            assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
            assert (await r.json())["error"]["code"] == ErrorCode.RATE_LIMITED.value
    # Connected clients are not disturbed, and /healthz still answers.
    await witness.check()
