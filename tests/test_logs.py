"""``--log-format json``: every line of a real ``tidings serve``'s log is one JSON object; one access line
per HTTP request (client address after trusted-proxy resolution, no query string), one session line per
WebSocket session of each transport; and no token, API key or Authorization value in the whole log of a
run that sent them in headers, in ``?token=``/``?api_key=`` and in-band. The text format keeps its
lines (no access lines)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest

from tidings.config import ConfigError, load_settings
from tidings.logs import Redactor

from .conftest import API_KEY, Probe
from .serve_process import Node

SECRET = "log-test-token-secret-0123456789abcdefgh"
WRONG_KEY = "not-the-key-but-a-secret-too-42"
FORWARDED = "203.0.113.7"


def token(sub: str, **extra: Any) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + 300), **extra}, SECRET, algorithm="HS256")


def lines(node: Node) -> list[dict[str, Any]]:
    """Every line of the node's log as JSON (fails on the first that is not)."""
    out = []
    for n, line in enumerate(node.text().splitlines(), 1):
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise AssertionError(f"log line {n} is not JSON: {line!r}") from None
        assert isinstance(obj, dict) and {"ts", "level", "logger", "msg"} <= obj.keys(), line
        out.append(obj)
    return out


async def raw_request(port: int, data: bytes) -> bytes:
    """Send raw bytes (a request aiohttp refuses) and read the answer until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def until_logged(node: Node, pred: Any, what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not any(pred(obj) for obj in lines(node)):
            node.check_alive()
            await asyncio.sleep(0.05)


async def test_json_log_lines_parse_have_access_and_session_lines_and_no_secrets(tmp_path: Path) -> None:
    node = Node(
        tmp_path,
        "memory://",
        "json",
        token_secret=SECRET,
        log_format="json",
        log_level="debug",  # the most lines, aiohttp's own included
        trusted_proxies="127.0.0.1",
    )
    conn_token = token("alice")
    url_token = token("alice", jti="url")
    chat_token = token("carol")
    sub_token = token("alice", channel="chat:logs")
    secrets = [API_KEY, SECRET, WRONG_KEY, conn_token, url_token, chat_token, sub_token]
    auth = {"Authorization": f"Bearer {API_KEY}"}
    try:
        async with aiohttp.ClientSession() as s:
            await node.ready(s)
            # /ws with ?token= in the URL, and a token in-band (connect, subscribe with a channel token).
            ws = Probe(await s.ws_connect(f"{node.ws_url}?token={url_token}"))
            await ws.ok("connect", token=conn_token)
            await ws.ok("subscribe", channel="chat:logs", token=sub_token)
            # HTTP: the key as a header, and secrets in the query string of other requests.
            pub = {"channel": "chat:logs", "data": {"text": "hi"}}
            async with s.post(f"{node.http}/api/publish", json=pub, headers=auth) as r:
                assert r.status == 200
                published = await r.json()
            await ws.messages(1)
            hist = f"{node.http}/api/channels/chat:logs/history?token={url_token}&api_key={API_KEY}"
            async with s.get(hist, headers={**auth, "X-Forwarded-For": FORWARDED}) as r:
                assert r.status == 200
            async with s.get(hist, headers={"Authorization": f"Bearer {WRONG_KEY}"}) as r:
                assert r.status == 401
            async with s.get(f"{node.http}/?token={chat_token}&key={WRONG_KEY}") as r:
                assert r.status == 200
            # A bad token in the URL (4001), /chatsocket with ?token=, the echo socket.
            bad = Probe(await s.ws_connect(f"{node.ws_url}?token={conn_token[:-4]}AAAA"))
            assert await bad.wait_closed() == 4001
            chat = await s.ws_connect(f"ws://127.0.0.1:{node.port}/chatsocket?token={chat_token}")
            await chat.send_str('{"body": "hello"}')
            await chat.receive(timeout=5)
            await chat.close()
            echo = await s.ws_connect(f"ws://127.0.0.1:{node.port}/websocket")
            await echo.send_str("ping")
            assert (await echo.receive(timeout=5)).data == "You said: ping"
            await echo.close()
            await ws.close()
            # After the /ws session (its join/leave would count there): /sse with ?token= and
            # ?sub_token=, /stream with the token as a header, /poll with ?token=.
            sse_url = f"{node.http}/sse?channel=chat:logs&token={url_token}&sub_token={sub_token}"
            async with s.get(sse_url) as r:
                assert r.status == 200
                async with asyncio.timeout(5):
                    while b"subscribed" not in await r.content.readline():
                        pass
            stream_url = f"{node.http}/stream?channel=chat:logs"
            async with s.get(stream_url, headers={"Authorization": f"Bearer {conn_token}"}) as r:
                assert r.status == 200
                async with asyncio.timeout(5):
                    while b"subscribed" not in await r.content.readline():
                        pass
            since = f"{published['offset']}:{published['epoch']}"
            poll_url = f"{node.http}/poll?channel=chat:logs&since={since}&timeout=0&token={chat_token}"
            async with s.get(poll_url) as r:
                assert r.status == 200, await r.text()
            # Requests aiohttp itself refuses, with the secrets in the request line and a header.
            await raw_request(
                node.port, f"GET /ws?token={url_token} HTTP/1.1\r\nHost: x\r\n\x00\r\n\r\n".encode()
            )
            await raw_request(
                node.port,
                f"GET /api/channels?api_key={API_KEY} HTTP/1.1\r\nAuthorization: Bearer {API_KEY}\r\n"
                f"Content-Length: x{API_KEY}\r\n\r\n".encode(),
            )

            def session_end(transport: str) -> Any:
                return lambda o: o["logger"] == "tidings.session" and o.get("transport") == transport

            for transport in ("ws", "chatsocket", "echo", "sse", "stream", "poll"):
                await until_logged(node, session_end(transport), f"{transport} session line")
    finally:
        assert node.stop() == 0
    log = lines(node)
    text = node.text()
    for secret in secrets:
        assert secret not in text, f"a secret is in the log: {secret[:12]}…"

    access = [o for o in log if o["logger"] == "tidings.access"]
    assert access, "no access lines"
    for o in access:
        assert {"method", "path", "status", "ms", "client"} <= o.keys(), o
        assert "?" not in o["path"] and isinstance(o["ms"], float) and o["ms"] >= 0
    publish = [o for o in access if o["path"] == "/api/publish"]
    assert publish and publish[0]["method"] == "POST" and publish[0]["status"] == 200
    assert publish[0]["client"] == "127.0.0.1"
    history = [o for o in access if o["path"] == "/api/channels/chat:logs/history"]
    assert sorted(o["status"] for o in history) == [200, 401]
    assert FORWARDED in {o["client"] for o in history}  # X-Forwarded-For from a trusted proxy
    assert any(o["path"] == "/ws" and o["status"] == 101 for o in access)

    sessions = {o["transport"]: o for o in log if o["logger"] == "tidings.session"}
    assert set(sessions) == {"ws", "chatsocket", "echo", "sse", "stream", "poll"}
    assert sessions["sse"]["messages_out"] >= 1 and sessions["sse"]["user"] == "alice"  # subscribed
    assert sessions["poll"]["user"] == "carol" and sessions["poll"]["close_code"] is None
    assert any(o["path"] == "/sse" and o["status"] == 200 for o in access)
    ws_end = [o for o in log if o.get("transport") == "ws" and o.get("close_code") == 1000]
    assert ws_end and ws_end[0]["user"] == "alice"
    assert ws_end[0]["messages_in"] == 2 and ws_end[0]["messages_out"] == 3  # 2 replies + 1 publication
    assert any(o.get("transport") == "ws" and o.get("close_code") == 4001 for o in log)
    assert sessions["echo"]["messages_in"] == 1 and sessions["echo"]["messages_out"] == 1
    for o in sessions.values():
        assert isinstance(o["duration_s"], float) and o["duration_s"] >= 0
        assert o["client"] == "127.0.0.1"


async def test_text_log_format_is_unchanged_and_has_no_access_lines(tmp_path: Path) -> None:
    node = Node(tmp_path, "memory://", "text")
    try:
        async with aiohttp.ClientSession() as s:
            await node.ready(s)
            pub = {"channel": "chat:t", "data": 1}
            async with s.post(
                f"{node.http}/api/publish", json=pub, headers={"Authorization": f"Bearer {API_KEY}"}
            ) as r:
                assert r.status == 200
            ws = await s.ws_connect(node.ws_url)
            await ws.close()
    finally:
        assert node.stop() == 0
    text = node.text()
    assert " INFO tidings: tidings " in text and "listening on http://127.0.0.1:" in text
    assert "tidings.access" not in text and "tidings.session" not in text and "/api/publish" not in text
    assert API_KEY not in text


def test_redactor_removes_known_secrets_and_secret_shaped_values() -> None:
    r = Redactor()
    r.add(["a-configured-api-key-123"])
    jwt_like = token("x")
    cases = {
        "key a-configured-api-key-123 used": "key [redacted] used",
        "GET /ws?token=abc.def&x=1": "GET /ws?token=[redacted]&x=1",
        "GET /a?api_key=zzz HTTP/1.1": "GET /a?api_key=[redacted] HTTP/1.1",
        "Authorization: Bearer s3cr3t-value": "Authorization: Bearer [redacted]",
        "{'authorization': 'Basic dXNlcjpwYXNz'}": "{'authorization': 'Basic [redacted]'}",
        f"bad token {jwt_like}!": "bad token [redacted]!",
        "x-api-key: abcdef": "x-api-key: [redacted]",
        "GET /sse?channel=a&sub_token=opaque-1": "GET /sse?channel=a&sub_token=[redacted]",
        "max_key=5 stays": "max_key=5 stays",
    }
    for given, want in cases.items():
        assert r(given) == want, (given, r(given))


def test_a_bad_log_format_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="log_format must be one of text, json"):
        load_settings(env={"TIDINGS_LOG_FORMAT": "xml"})


def test_every_line_passes_the_redaction_filter(capsys: pytest.CaptureFixture[str]) -> None:
    """The second line of defence, as ``tidings serve`` installs it: a secret in a message, an argument,
    a field or a traceback of any logger is written as ``[redacted]``, in both formats."""
    import logging

    from tidings.logs import setup_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    key = "configured-key-0123456789"
    try:
        for fmt in ("json", "text"):
            setup_logging("info", fmt, secrets=[key])
            log = logging.getLogger("aiohttp.server")
            log.info("GET /ws?token=%s key %s", token("x"), key, extra={"header": f"Bearer {key}"})
            try:
                raise ValueError(f"bad {key}")
            except ValueError:
                log.exception("failed")
            err = capsys.readouterr().err
            assert key not in err and "eyJ" not in err, err
            assert err.count("[redacted]") >= 3 and "ValueError: bad" in err
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
