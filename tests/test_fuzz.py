"""Property/fuzz tests (issue 5): generated inputs thrown at the protocol parser, at the HTTP API and at /ws
of a real running server. No crash, no unhandled exception, every answer a documented code.

Every test counts the inputs it really ran and asserts its quota; the quotas add up to more than 100,000
(``test_quotas_add_up``). The network tests run a server on its own event loop in a thread, so that
Hypothesis drives them with plain synchronous calls. When atheris is installed, ``tests/fuzz_atheris.py``
is run for a bounded number of iterations too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import subprocess
import sys
import threading
import urllib.parse
from collections import Counter
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from tidings.app import create_app
from tidings.config import ApiKey, Namespace
from tidings.protocol import (
    MAX_CHANNEL_BYTES,
    CloseCode,
    Command,
    ConnectCmd,
    ErrorCode,
    HistoryCmd,
    PingCmd,
    PresenceCmd,
    ProtocolError,
    PublishCmd,
    RefreshCmd,
    StreamPosition,
    SubscribeCmd,
    UnsubscribeCmd,
    decode_frame,
    deflate_payload,
    encode_error,
    parse_command,
)
from tidings.protocol.frames import FrameError, FrameParser
from tidings.transports.server import make_runner

from .conftest import API_KEY, bound_socket, make_settings

T = TypeVar("T")

QUOTAS = {  # inputs each test must have run; see the module docstring
    "parser_text": 32_000,
    "parser_bytes": 20_000,
    "parser_commands": 60_000,
    "parser_mutations": 10_000,
    "frame_parser": 8_000,
    "http_api": 2_000,
    "http_raw": 1_200,
    "websocket": 6_000,
}
RAN: dict[str, int] = {}  # inputs each fuzz test really ran in this session (checked by the last test)
ERROR_CODES = {c.value for c in ErrorCode}
PARSE_CODES = {
    ErrorCode.BAD_REQUEST,
    ErrorCode.UNKNOWN_OP,
    ErrorCode.INVALID_FIELD,
    ErrorCode.INVALID_CHANNEL,
}
CLOSE_CODES = {int(c) for c in CloseCode} | {1002, 1006, 1007}  # aiohttp's own, documented in protocol.md
PUSH_TYPES = {"message", "join", "leave", "disconnect"}
OPS = ["connect", "subscribe", "refresh", "unsubscribe", "publish", "history", "presence", "ping"]
CHANNEL_RE = re.compile(r"[A-Za-z0-9_\-:.@/=]{1,255}")
HYP = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)


def hyp(examples: int) -> settings:
    return settings(HYP, max_examples=examples)


# ---------------------------------------------------------------------------------------------- strategies

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
json_scalars = (
    st.none() | st.booleans() | INT64 | st.floats(allow_nan=False, allow_infinity=False) | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=8,
)
# Values at the edges of every rule in docs/protocol.md: types, ranges, lengths, channel names, positions.
EDGE: list[Any] = [
    None, True, False, 0, 1, -1, 7, 1000, 1001, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 1.5, -0.0, 1e300,
    "", "x" * 64, "x" * 65, "chat:lobby", "pub:x", "user:1", "ro:x", "nons", "a" * 255, "a" * 256,
    "bad channel", "ch\u00e9:x", "a:b\n", "ping", "subscribe", "publish", "history", "PING", "0", "\u0000",
    [], [1, "a"], ["pub:x"], {}, {"a": {"b": [None]}},
    {"offset": 1, "epoch": "e"}, {"offset": 0}, {"offset": -1}, {"offset": 2**63}, {"offset": True},
    {"offset": 1.0}, {"offset": "1"}, {"offset": 1, "epoch": 5}, {"offset": 1, "epoch": "e" * 65},
]  # fmt: skip
KEYS = ["id", "op", "channel", "data", "since", "limit", "token", "idempotency_key"]
edge = st.sampled_from(EDGE)
values = st.one_of(edge, edge, json_scalars, json_values)
command_dicts = st.fixed_dictionaries(
    {"op": st.one_of(st.sampled_from(OPS), st.sampled_from(OPS), edge)},
    optional={k: values for k in KEYS if k != "op"},
)
# A few extra keys, and sometimes no op at all.
command_dicts = st.one_of(
    command_dicts,
    st.builds(
        lambda d, extra: {**extra, **d}, command_dicts, st.dictionaries(st.text(max_size=6), edge, max_size=2)
    ),
    st.dictionaries(st.sampled_from(KEYS), values, max_size=4),
)

# Commands that mostly get past parsing, so that the permission and namespace rules are reached too.
SERVER_CHANNELS = ["chat:f", "pub:f", "ro:f", "user:1", "nopres:a", "small:f", "nons", "zz:top"]
plausible_commands = st.builds(
    lambda op, ch, rid, data: {"id": rid, "op": op, "channel": ch, "data": data},
    st.sampled_from(OPS),
    st.sampled_from(SERVER_CHANNELS),
    st.integers(0, 10**6),
    values,
)


def variants(base: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The command, the command without each of its keys, and each key set to each edge value."""
    yield base
    for k in base:
        yield {kk: v for kk, v in base.items() if kk != k}
    for k in KEYS:
        for v in EDGE:
            yield {**base, k: v}


def encode(obj: Any) -> str:
    return orjson.dumps(obj).decode()


# ---------------------------------------------------------------------------------------------- oracle


def is_req_id(v: Any) -> bool:
    return (
        v is None or (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and len(v) <= 64)
    )


def check_command(cmd: Command) -> None:
    """A parsed command is well-formed: the types the server relies on."""
    assert type(cmd) in (
        ConnectCmd,
        SubscribeCmd,
        UnsubscribeCmd,
        PublishCmd,
        RefreshCmd,
        HistoryCmd,
        PresenceCmd,
        PingCmd,
    )
    assert is_req_id(cmd.id), cmd
    if isinstance(cmd, SubscribeCmd | RefreshCmd | UnsubscribeCmd | PublishCmd | HistoryCmd | PresenceCmd):
        assert isinstance(cmd.channel, str) and CHANNEL_RE.fullmatch(cmd.channel), cmd
        assert len(cmd.channel.encode()) <= MAX_CHANNEL_BYTES
    if isinstance(cmd, SubscribeCmd | HistoryCmd) and cmd.since is not None:
        assert isinstance(cmd.since, StreamPosition)
        assert isinstance(cmd.since.offset, int) and not isinstance(cmd.since.offset, bool)
        assert 0 <= cmd.since.offset <= 2**63 - 1 and isinstance(cmd.since.epoch, str)
        assert len(cmd.since.epoch) <= 64
    if isinstance(cmd, HistoryCmd) and cmd.limit is not None:
        assert isinstance(cmd.limit, int) and not isinstance(cmd.limit, bool) and 1 <= cmd.limit <= 1000
    if isinstance(cmd, SubscribeCmd | ConnectCmd):
        assert cmd.token is None or isinstance(cmd.token, str)
    if isinstance(cmd, RefreshCmd):
        assert isinstance(cmd.token, str)
    if isinstance(cmd, PublishCmd):
        orjson.dumps(cmd.data)  # re-encodable
        key = cmd.idempotency_key
        assert key is None or (isinstance(key, str) and 1 <= len(key) <= 64)


def parse(raw: str | bytes) -> Command | ProtocolError:
    """decode_frame + parse_command: a well-formed command or a ProtocolError with a parse-time code.
    Anything else raised is a bug and propagates."""
    try:
        cmd = parse_command(decode_frame(raw))
    except ProtocolError as exc:
        assert exc.code in PARSE_CODES, exc.code
        assert isinstance(exc.message, str) and exc.message
        assert is_req_id(exc.id)
        reply = orjson.loads(encode_error(exc.id, exc.code, exc.message))
        assert reply["error"]["code"] in ERROR_CODES
        return exc
    check_command(cmd)
    return cmd


def expected_errors(obj: dict[str, Any]) -> set[ErrorCode]:
    """Written from docs/protocol.md: which codes a command dict deserves (empty: it is valid)."""
    bad: set[ErrorCode] = set()
    if "id" in obj and not is_req_id(obj["id"]):
        bad.add(ErrorCode.INVALID_FIELD)
    op = obj.get("op")
    if not isinstance(op, str):
        return bad | {ErrorCode.INVALID_FIELD}
    if op not in OPS:
        return bad | {ErrorCode.UNKNOWN_OP}
    if op in ("subscribe", "refresh", "unsubscribe", "publish", "history", "presence"):
        ch = obj.get("channel")
        if ch is None:
            bad.add(ErrorCode.INVALID_FIELD)
        elif not (isinstance(ch, str) and CHANNEL_RE.fullmatch(ch)):
            bad.add(ErrorCode.INVALID_CHANNEL)
    if op == "publish" and "data" not in obj:
        bad.add(ErrorCode.INVALID_FIELD)
    if op in ("subscribe", "history") and obj.get("since") is not None:
        since = obj["since"]
        ok = isinstance(since, dict)
        if ok:
            off, epoch = since.get("offset"), since.get("epoch", "")
            ok = isinstance(off, int) and not isinstance(off, bool) and 0 <= off <= 2**63 - 1
            ok = ok and isinstance(epoch, str) and len(epoch) <= 64
        if not ok:
            bad.add(ErrorCode.INVALID_FIELD)
    if op == "history" and obj.get("limit") is not None:
        lim = obj["limit"]
        if isinstance(lim, bool) or not isinstance(lim, int) or not 1 <= lim <= 1000:
            bad.add(ErrorCode.INVALID_FIELD)
    if op in ("subscribe", "connect") and obj.get("token") is not None and not isinstance(obj["token"], str):
        bad.add(ErrorCode.INVALID_FIELD)
    if op == "refresh" and not isinstance(obj.get("token"), str):
        bad.add(ErrorCode.INVALID_FIELD)
    if op == "publish" and obj.get("idempotency_key") is not None:
        key = obj["idempotency_key"]
        if not (isinstance(key, str) and 1 <= len(key) <= 64):
            bad.add(ErrorCode.INVALID_FIELD)
    return bad


# ---------------------------------------------------------------------------------------------- parser


def run_counted(name: str, strategy: st.SearchStrategy[list[T]], examples: int, each: Any) -> None:
    """Run ``each(item)`` over every item of every generated batch; ``each`` returns how many inputs it
    made of the item. Asserts the test's quota."""
    count = 0

    @hyp(examples)
    @given(strategy)
    def run(batch: list[T]) -> None:
        nonlocal count
        for item in batch:
            count += each(item)

    run()
    RAN[name] = count
    assert count >= QUOTAS[name], (name, count)


def spliced(t: str) -> list[str]:
    """A string as a whole frame, as a JSON value, and spliced raw into places in a valid frame."""
    return [
        t,
        json.dumps({"id": 1, "op": "subscribe", "channel": t, "token": t}),  # \uXXXX escapes, surrogates too
        '{"id":1,"op":"subscribe","channel":' + t + "}",
        '{"id":' + t + ',"op":"history","channel":"pub:x","since":{"offset":' + t + "}}",
    ]


def test_parser_arbitrary_text() -> None:
    alphabet = st.sampled_from('{}[]":,0123456789-.eE+tfrueanl \\/ubx') | st.characters()
    texts = st.one_of(st.text(), st.text(alphabet=alphabet, max_size=60))

    def each(t: str) -> int:
        forms = spliced(t)
        for f in forms:
            parse(f)
        return len(forms)

    run_counted("parser_text", st.lists(texts, min_size=10, max_size=10), 800, each)


def test_parser_arbitrary_bytes() -> None:
    def each(b: bytes) -> int:
        parse(b)
        parse(b'{"id":1,"op":"publish","channel":"pub:x","data":' + b + b"}")
        return 2

    run_counted("parser_bytes", st.lists(st.binary(max_size=200), min_size=10, max_size=10), 1_000, each)


def test_parser_command_shapes() -> None:
    """Structured commands and their edge variants: the parser agrees with an oracle from the docs."""

    def one(obj: dict[str, Any]) -> None:
        try:
            obj = orjson.loads(encode(obj))  # what the wire would carry
        except TypeError:
            return
        out = parse(encode(obj))
        want = expected_errors(obj)
        if isinstance(out, ProtocolError):
            assert want, (obj, out.code, out.message)
            assert out.code in want, (obj, out.code, want)
            if is_req_id(obj.get("id")):
                assert out.id == obj.get("id")
        else:
            assert not want, (obj, out, want)
            assert out.id == obj.get("id")
            if hasattr(out, "channel"):
                assert out.channel == obj["channel"]
            if isinstance(out, PublishCmd):
                assert out.data == obj["data"]

    def each(base: dict[str, Any]) -> int:
        n = 0
        for v in variants(base):
            one(v)
            n += 1
        return n

    run_counted("parser_commands", st.lists(command_dicts, min_size=1, max_size=1), 200, each)


def test_parser_mutated_valid_frames() -> None:
    valid = [
        b'{"id":1,"op":"subscribe","channel":"chat:lobby","since":{"offset":41,"epoch":"a1b2"}}',
        b'{"id":"x","op":"publish","channel":"pub:x","data":{"text":"hi","n":[1,2.5,null,true]}}',
        b'{"id":3,"op":"history","channel":"small:e","limit":10,"since":{"offset":0}}',
        b'{"op":"connect","token":"eyJhbGciOiJIUzI1NiJ9.e30.sig"}',
        b'{"id":5,"op":"presence","channel":"chat:lobby"}',
        b'{"id":6,"op":"ping"}',
    ]
    edits = st.lists(
        st.tuples(
            st.sampled_from(["insert", "delete", "replace"]), st.integers(0, 200), st.binary(max_size=3)
        ),
        min_size=1,
        max_size=4,
    )

    def mutate(item: tuple[bytes, list[tuple[str, int, bytes]]]) -> int:
        raw = bytearray(item[0])
        for kind, pos, blob in item[1]:
            pos %= len(raw) + 1
            if kind == "insert":
                raw[pos:pos] = blob
            elif kind == "delete":
                del raw[pos : pos + len(blob) + 1]
            else:
                raw[pos : pos + len(blob)] = blob
        parse(bytes(raw))
        parse(bytes(raw).decode("utf-8", "replace"))
        return 2

    batch = st.lists(st.tuples(st.sampled_from(valid), edits), min_size=5, max_size=5)
    run_counted("parser_mutations", batch, 1_000, mutate)


# ---------------------------------------------------------------------------------------------- frames


def ws_frame(fin: bool, rsv: int, opcode: int, masked: bool, payload: bytes, wide: int) -> bytes:
    """A client frame, with the length in the shortest form or (``wide``) a longer legal one."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    m = 0x80 if masked else 0
    if n < 126 and wide == 0:
        head = bytes([b0, m | n])
    elif n < 65536 and wide < 2:
        head = bytes([b0, m | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([b0, m | 127]) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = b"\x12\x34\x56\x78"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


frame_payloads = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=100).map(str.encode),
    st.text(max_size=100).map(lambda t: deflate_payload(t.encode())),
    st.integers(100, 5000).map(lambda n: deflate_payload(b"a" * n)),  # inflates past the limit below
)
frames_ = st.builds(
    ws_frame,
    st.booleans() | st.just(True),
    st.sampled_from([0, 0, 4, 1, 2]),  # 4 is RSV1 (compressed)
    st.sampled_from([0x1, 0x1, 0x0, 0x2, 0x8, 0x9, 0xA, 0x3, 0xB, 0xF]),
    st.booleans() | st.just(True),
    frame_payloads,
    st.sampled_from([0, 0, 0, 1, 2]),
)
streams = st.tuples(
    st.lists(st.one_of(frames_, frames_, st.binary(max_size=20)), min_size=1, max_size=8),
    st.lists(st.integers(1, 64), min_size=1, max_size=20),  # chunk sizes
    st.booleans(),  # permessage-deflate negotiated
)
MAX_FRAME_TEST = 1000


def run_parser(data: bytes, chunks: list[int], deflate: bool) -> tuple[list[tuple[int, bytes]], int | None]:
    parser = FrameParser(MAX_FRAME_TEST, deflate=deflate)
    out: list[tuple[int, bytes]] = []
    pos, i = 0, 0
    try:
        while pos < len(data):
            step = chunks[i % len(chunks)]
            out += parser.feed(data[pos : pos + step])
            pos += step
            i += 1
    except FrameError as exc:
        assert exc.code in (1002, 1007, 1009), exc.code
        assert exc.reason
        return out, exc.code
    return out, None


def test_frame_parser_streams() -> None:
    """The WebSocket frame parser: only FrameError(1002/1007/1009) comes out; messages are complete,
    within the limit, text is UTF-8; and how the bytes are split into reads changes nothing."""

    def each(item: tuple[list[bytes], list[int], bool]) -> int:
        parts, chunks, deflate = item
        data = b"".join(parts)
        whole, err = run_parser(data, [len(data) or 1], deflate)
        split, err2 = run_parser(data, chunks, deflate)
        # The same verdict however the bytes are split. (Messages parsed in the same read as a protocol
        # error are dropped with it, so with an error the one-read output may be shorter: a prefix.)
        assert err == err2
        assert split[: len(whole)] == whole
        if err is None:
            assert whole == split
        for opcode, payload in whole:
            assert opcode in (0x1, 0x2, 0x8, 0x9, 0xA)
            if opcode == 0x1:
                payload.decode("utf-8")
            if opcode < 0x8:
                assert len(payload) <= MAX_FRAME_TEST
            else:
                assert len(payload) <= 125
        return len(parts)

    run_counted("frame_parser", st.lists(streams, min_size=4, max_size=4), 600, each)


# ---------------------------------------------------------------------------------------------- servers


class ThreadServer:
    """A real tidings server on its own event loop in a thread; ``run(coro)`` runs client code there."""

    def __init__(self, tmp_path: Path, **kw: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-server", daemon=True)
        self.thread.start()
        self.settings = make_settings(tmp_path, **kw)
        self.runner: web.AppRunner | None = None
        self.session: aiohttp.ClientSession | None = None
        self.port = 0
        self.run(self._start())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self.runner = make_runner(
            create_app(self.settings), self.settings.header_timeout, access_log=None, shutdown_timeout=2
        )
        await self.runner.setup()
        sock = bound_socket()
        await web.SockSite(self.runner, sock).start()
        self.port = sock.getsockname()[1]
        self.session = aiohttp.ClientSession()

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.runner is not None:
            await self.runner.cleanup()

    def close(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    async def healthy(self) -> None:
        assert self.session is not None
        async with self.session.get(f"{self.http}/healthz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        async with self.session.ws_connect(f"ws://127.0.0.1:{self.port}/ws") as ws:
            await ws.send_str('{"id":1,"op":"subscribe","channel":"chat:after"}')
            assert (await ws.receive_json(timeout=5))["ok"] is True
            async with self.session.post(
                f"{self.http}/api/publish",
                json={"channel": "chat:after", "data": "alive"},
                headers={"Authorization": f"Bearer {API_KEY}"},
            ) as r:
                assert r.status == 200
            assert (await ws.receive_json(timeout=5))["data"] == "alive"


ROLE_KEYS = {"publish": "fuzz-publish-key-0123456789", "read": "fuzz-read-key-0123456789ab"}


@pytest.fixture
def fuzz_server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[ThreadServer]:
    caplog.set_level(logging.WARNING)
    srv = ThreadServer(
        tmp_path,
        api_keys=[ApiKey("test", API_KEY, "admin"), *(ApiKey(r, k, r) for r, k in ROLE_KEYS.items())],
        api_failures_per_minute=0,  # otherwise the fuzzer's bad keys would get 429 for everything
        client_rate=0.0,
        user_rate=0.0,
        max_http_body=64 * 1024,
        namespaces={"nopres": Namespace("nopres", presence=False, history_size=0)},
    )
    try:
        yield srv
        srv.run(srv.healthy())  # the server is still up and serving
    finally:
        srv.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and not malformed_http(r)]
    assert not errors, [(r.getMessage(), r.exc_text) for r in errors]


def malformed_http(record: logging.LogRecord) -> bool:
    """aiohttp itself logs requests its HTTP parser rejects (answered 400) at ERROR, with a traceback.
    That is noise the raw-bytes fuzzer makes on purpose, not a server error."""
    exc = record.exc_info[1] if record.exc_info else None
    return record.name == "aiohttp.server" and isinstance(exc, HttpProcessingError) and exc.code == 400


# ---------------------------------------------------------------------------------------------- HTTP API

HTTP_STATUSES = {200, 400, 401, 403, 404, 405, 409, 413, 429}
path_text = st.text(st.characters(codec="utf-8"), max_size=30)
api_paths = st.one_of(
    st.sampled_from(["/api/publish", "/api/broadcast", "/api/channels", "/healthz", "/api/", "/api"]),
    st.builds(
        lambda ch, tail: f"/api/channels/{ch}/{tail}",
        st.one_of(st.sampled_from(["chat:lobby", "pub:x", "nopres:a", "user:1"]), path_text),
        st.sampled_from(["history", "presence", "nope", ""]),
    ),
    st.builds(lambda t: "/api/" + t, path_text),
)
queries = st.dictionaries(
    st.sampled_from(["limit", "since", "epoch", "x"]),
    st.one_of(st.integers(-5, 2000).map(str), INT64.map(str), path_text),
    max_size=3,
)
auth_headers = st.one_of(
    st.just({}),
    st.sampled_from([API_KEY, *ROLE_KEYS.values()]).map(lambda k: {"Authorization": f"Bearer {k}"}),
    st.tuples(
        st.sampled_from(["", "Bearer ", "bearer ", "Basic ", "Bearer  "]),
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
    ).map(lambda t: {"Authorization": t[0] + t[1]}),
)
channel_like = st.one_of(st.sampled_from(["chat:lobby", "pub:x", "nopres:a", "user:1", "ro:x"]), edge)
bodies = st.one_of(
    st.none(),
    st.binary(max_size=300),
    command_dicts.map(lambda d: orjson.dumps(d)),
    st.fixed_dictionaries(
        {},
        optional={
            "channel": channel_like,
            "channels": st.one_of(st.lists(channel_like, max_size=5), edge),
            "data": values,
            "info": st.one_of(edge, st.dictionaries(st.text(max_size=4), edge, max_size=2)),
        },
    ).map(lambda d: orjson.dumps(d)),
    st.just(b"x" * (70 * 1024)),  # over max_http_body
)
ROUTES = [
    ("POST", "/api/publish"),
    ("POST", "/api/broadcast"),
    ("GET", "/api/channels"),
    ("GET", "/api/channels/{}/history"),
    ("GET", "/api/channels/{}/presence"),
    ("GET", "/healthz"),
]
route_paths = st.builds(
    lambda route, ch: (route[0], route[1].format(ch)),
    st.sampled_from(ROUTES),
    st.one_of(st.sampled_from(SERVER_CHANNELS), path_text),
)
random_paths = st.tuples(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]), api_paths
)
requests = st.builds(
    lambda mp, query, headers, body: (mp[0], mp[1], query, headers, body),
    st.one_of(route_paths, route_paths, route_paths, random_paths),
    queries,
    st.one_of(
        st.sampled_from([API_KEY, *ROLE_KEYS.values()]).map(lambda k: {"Authorization": f"Bearer {k}"}),
        auth_headers,
    ),
    bodies,
)


async def http_one(
    srv: ThreadServer, req: tuple[str, str, dict[str, str], dict[str, str], bytes | None], seen: Counter[Any]
) -> None:
    method, path, query, headers, body = req
    assert srv.session is not None
    quoted = urllib.parse.quote(path, safe="/:@=")
    qs = urllib.parse.urlencode(query)
    url = URL(f"{srv.http}{quoted}{'?' + qs if qs else ''}", encoded=True)
    async with srv.session.request(method, url, headers=headers, data=body) as r:
        raw = await r.read()
        assert r.status in HTTP_STATUSES, (method, path, query, r.status, raw[:300])
        seen[r.status] += 1
        if method == "HEAD" or not raw:
            return
        if path.startswith("/api/") or path == "/healthz":
            if r.status >= 400 and (path.startswith("/api/") or r.content_type == "application/json"):
                assert r.content_type == "application/json", (method, path, r.status, raw[:200])
                err = orjson.loads(raw)["error"]
                assert err["code"] in ERROR_CODES and isinstance(err["message"], str), err
                seen[err["code"]] += 1
            elif r.status == 200:
                obj = orjson.loads(raw)
                for res in obj.get("results", []):  # broadcast: per-channel errors are documented codes too
                    if "error" in res:
                        assert res["error"]["code"] in ERROR_CODES


def test_http_api_fuzz(fuzz_server: ThreadServer) -> None:
    count = 0
    seen: Counter[Any] = Counter()

    @hyp(500)
    @given(st.lists(requests, min_size=4, max_size=4))
    def run(batch: list[Any]) -> None:
        nonlocal count

        async def go() -> None:
            await asyncio.gather(*(http_one(fuzz_server, req, seen) for req in batch))

        fuzz_server.run(go())
        count += len(batch)

    run()
    RAN["http_api"] = count
    assert count >= QUOTAS["http_api"]
    # The fuzzer got past authentication and parsing, not only bounced off the door.
    assert {200, 400, 401, 403, 404, 405, 413} <= set(seen), seen
    assert {"invalid_channel", "invalid_field", "bad_request", "unauthorized", "not_found"} <= set(seen), seen


# Raw requests: bytes a client library would refuse to send (non-UTF-8 header values and paths).
_no_controls = st.binary(max_size=40).map(
    lambda b: bytes(x | 0x80 if x < 0x20 or x == 0x7F else x for x in b)
)
header_bytes = st.one_of(
    # Mostly bytes an HTTP parser lets through (no controls), high bytes that are not UTF-8 included...
    _no_controls,
    _no_controls,
    # ...and sometimes anything but the line break.
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
raw_requests = st.tuples(
    st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"G\xc3\xa9T"]),
    st.one_of(
        st.sampled_from([b"/api/publish", b"/api/broadcast", b"/api/channels", b"/healthz", b"/ws", b"/"]),
        st.builds(lambda b: b"/api/channels/" + b.replace(b" ", b"%20") + b"/history", header_bytes),
        st.builds(lambda b: b"/api/channels/chat:x/history?" + b.replace(b" ", b"+"), header_bytes),
        st.sampled_from([b"/api/publish", b"/api/channels", b"/api/channels/chat:x/presence"]),
    ),
    st.lists(
        st.tuples(
            st.one_of(
                st.just(b"Authorization"),
                st.sampled_from(
                    [
                        b"Authorization",
                        b"X-Forwarded-For",
                        b"Content-Type",
                        b"Origin",
                        b"Upgrade",
                        b"Connection",
                        b"Sec-WebSocket-Key",
                        b"Sec-WebSocket-Version",
                        b"Sec-WebSocket-Extensions",
                    ]
                ),
                st.just(b"X-\xff"),
            ),
            st.one_of(
                header_bytes,
                header_bytes.map(lambda b: b"Bearer " + b),
                st.sampled_from([f"Bearer {API_KEY}".encode(), b"websocket", b"13", b"upgrade"]),
            ),
        ),
        max_size=3,
    ),
    st.one_of(st.just(b""), st.binary(max_size=200), command_dicts.map(lambda d: orjson.dumps(d))),
)


async def raw_one(srv: ThreadServer, req: tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]) -> int:
    method, path, headers, body = req
    head = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n" % (method, path)
    head += b"".join(b"%s: %s\r\n" % (k, v) for k, v in headers)
    head += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(head + body)
        async with asyncio.timeout(10):
            status_line = await reader.readline()
            rest = b"" if b" 101 " in status_line else await reader.read()
    finally:
        writer.close()
    assert status_line.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), (req, status_line)
    status = int(status_line.split()[1])
    assert 100 <= status < 500, (req, status_line, rest[:300])
    if b"application/json" in rest.partition(b"\r\n\r\n")[0] and status >= 400 and method != b"HEAD":
        err = orjson.loads(rest.partition(b"\r\n\r\n")[2])["error"]
        assert err["code"] in ERROR_CODES, err
    return status


def test_http_raw_bytes_fuzz(fuzz_server: ThreadServer) -> None:
    count = 0
    seen: Counter[int] = Counter()

    @hyp(300)
    @given(st.lists(raw_requests, min_size=4, max_size=4))
    def run(batch: list[Any]) -> None:
        nonlocal count

        async def go() -> list[int]:
            return await asyncio.gather(*(raw_one(fuzz_server, req) for req in batch))

        seen.update(fuzz_server.run(go()))
        count += len(batch)

    run()
    RAN["http_raw"] = count
    assert count >= QUOTAS["http_raw"]
    assert {200, 401} <= set(seen), seen


# ---------------------------------------------------------------------------------------------- /ws


def closes_connection(frame: str) -> bool:
    """``connect`` with a (necessarily invalid) token closes the connection with 4001: send it last."""
    try:
        obj = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and obj.get("op") == "connect" and isinstance(obj.get("token"), str)


def replaced(base: dict[str, Any], reps: list[tuple[str, Any]]) -> list[str]:
    """The base command and one frame per replacement; a frame that will close the connection goes last."""
    return sorted([encode(base), *(encode({**base, k: v}) for k, v in reps)], key=closes_connection)


replacements = st.lists(st.tuples(st.sampled_from(KEYS), edge), min_size=11, max_size=11)
ws_batches = st.one_of(
    st.builds(replaced, command_dicts, replacements),
    st.builds(replaced, plausible_commands, replacements),
    st.builds(replaced, plausible_commands, replacements),
    st.lists(st.text(max_size=100), min_size=12, max_size=12),
)


class WsFuzzer:
    """One connection; frames go out in batches followed by a sentinel ping, and everything that comes
    back before the sentinel's reply is checked. A close with a documented code reconnects."""

    def __init__(self, srv: ThreadServer) -> None:
        self.srv = srv
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.closes: list[int] = []
        self.seen: Counter[str] = Counter()

    async def connect(self) -> aiohttp.ClientWebSocketResponse:
        assert self.srv.session is not None
        self.ws = await self.srv.session.ws_connect(f"ws://127.0.0.1:{self.srv.port}/ws", max_msg_size=0)
        return self.ws

    async def batch(self, frames: list[str]) -> None:
        ws = self.ws if self.ws is not None and not self.ws.closed else await self.connect()
        sentinel = "s-" + secrets.token_hex(16)
        for f in frames:
            await ws.send_str(f)
        await ws.send_str(encode({"id": sentinel, "op": "ping"}))
        async with asyncio.timeout(10):
            while True:
                msg = await ws.receive()
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                    code = ws.close_code or 1006
                    assert code in CLOSE_CODES, code
                    self.closes.append(code)
                    self.ws = None
                    return
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                obj = orjson.loads(msg.data)
                if "type" in obj:
                    assert obj["type"] in PUSH_TYPES, obj
                    if obj["type"] == "disconnect":
                        assert obj["code"] in CLOSE_CODES
                    continue
                assert set(obj) >= {"id", "ok"}, obj
                if obj["ok"] is False:
                    assert obj["error"]["code"] in ERROR_CODES, obj
                    assert obj["error"]["message"], obj
                    self.seen[obj["error"]["code"]] += 1
                else:
                    assert obj["ok"] is True and isinstance(obj["result"], dict), obj
                    self.seen["ok"] += 1
                if obj["id"] == sentinel:
                    assert obj["ok"] is True
                    return


def test_websocket_fuzz(fuzz_server: ThreadServer) -> None:
    count = 0
    fuzzer = WsFuzzer(fuzz_server)

    @hyp(500)
    @given(ws_batches)
    def run(frames: list[str]) -> None:
        nonlocal count
        fuzz_server.run(fuzzer.batch(frames))
        count += len(frames)

    run()
    RAN["websocket"] = count
    assert count >= QUOTAS["websocket"]
    # Only `connect` with a token (none is configured) closes, with 4001; nothing else may.
    assert set(fuzzer.closes) <= {int(CloseCode.UNAUTHORIZED)}, fuzzer.closes
    want = {"ok", "bad_request", "invalid_field", "invalid_channel", "unknown_op", "permission_denied"}
    assert want <= set(fuzzer.seen), fuzzer.seen


# ---------------------------------------------------------------------------------------------- atheris

ATHERIS_RUNS = 100_000


def test_atheris_protocol_parser(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    harness = Path(__file__).with_name("fuzz_atheris.py")
    proc = subprocess.run(
        [sys.executable, str(harness), f"-runs={ATHERIS_RUNS}", "-max_len=512", "-seed=1", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=55,
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    m = re.search(r"Done (\d+) runs", out)
    assert m is not None and int(m.group(1)) >= ATHERIS_RUNS, out[-2000:]


def test_fuzz_inputs_add_up() -> None:
    """Runs last in this module: the fuzz tests that ran together fed at least 100,000 inputs, counted
    where they were generated (not the quota table's own sum)."""
    if set(RAN) != set(QUOTAS):
        pytest.skip(f"only part of the fuzz suite ran: {sorted(RAN)}")
    assert sum(RAN.values()) >= 100_000, RAN
