"""The HTTP edge: deadlines for every request and body, keep-alive, connection caps, open files, origins
(public_url, trusted forwarded headers, DNS rebinding), the form POST's XSRF and origin checks, and the
security headers on every response. Real servers on loopback, raw sockets, every wait bounded."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tidings.transports import origin as origin_mod
from tidings.transports import server as server_mod
from tidings.transports.server import fd_reserve, log_accept_errors

from .conftest import API_KEY, ProbeFactory, Server, ServerFactory, bound_socket
from .rawws import raw_upgrade

WS_HEAD = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: (status, headers lowercased, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def eof_within(reader: asyncio.StreamReader, timeout: float) -> float:
    """Seconds until the server hangs up (EOF or reset), reading and dropping anything before it."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(timeout):
        try:
            while await reader.read(65536):
                pass
        except ConnectionResetError:
            pass
    return loop.time() - started


async def request(srv: Server, raw: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(raw.encode())
        async with asyncio.timeout(5):
            return await read_response(reader)
    finally:
        writer.close()


def get(path: str, *headers: str) -> str:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"


# ---------------------------------------------------------------------------------------------- deadlines


async def test_header_deadline_on_every_keepalive_request(start_server: ServerFactory) -> None:
    srv = await start_server(header_timeout=0.5, keepalive_timeout=30)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(get("/healthz").encode())
        async with asyncio.timeout(5):
            assert (await read_response(reader))[0] == 200

        # The second request on the same connection, one header byte every 50 ms, never finished.
        async def drip() -> None:
            writer.write(b"GET /healthz HTTP/1.1\r\n")
            for b in b"X-Slow: " + b"a" * 200:
                await asyncio.sleep(0.05)
                writer.write(bytes([b]))

        dripper = asyncio.create_task(drip())
        try:
            took = await eof_within(reader, 5)
        finally:
            dripper.cancel()
        assert 0.4 <= took < 3, took
    finally:
        writer.close()


async def test_idle_keepalive_is_not_cut_by_the_header_deadline_but_by_keepalive_timeout(
    start_server: ServerFactory,
) -> None:
    srv = await start_server(header_timeout=0.3, keepalive_timeout=1.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(get("/healthz").encode())
        async with asyncio.timeout(5):
            assert (await read_response(reader))[0] == 200
        loop = asyncio.get_running_loop()
        idle_from = loop.time()
        await asyncio.sleep(0.6)  # idle for twice header_timeout: still open for the next request
        writer.write(get("/healthz").encode())
        async with asyncio.timeout(5):
            assert (await read_response(reader))[0] == 200
        idle_from = loop.time()
        await eof_within(reader, 5)
        assert 1.2 <= loop.time() - idle_from < 4
    finally:
        writer.close()


@pytest.mark.parametrize("route", ["/api/publish", "/chat/lobby/messages"])
async def test_slow_body_is_cut_off(
    start_server: ServerFactory, session: aiohttp.ClientSession, route: str
) -> None:
    srv = await start_server(body_timeout=0.5)
    headers = f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
    if route.startswith("/chat"):  # a page's real token, so the form POST reads its body
        async with session.get(srv.http + "/") as r:
            token = r.cookies["_xsrf"].value
        headers = f"Cookie: _xsrf={token}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(f"POST {route} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: 1000000\r\n\r\n".encode())

    async def drip() -> None:
        for _ in range(200):  # 1 byte every 50 ms of a 1 MB body
            writer.write(b"a")
            await asyncio.sleep(0.05)

    dripper = asyncio.create_task(drip())
    try:
        took = await eof_within(reader, 5)
    finally:
        dripper.cancel()
        writer.close()
    assert 0.4 <= took < 3, took
    # A body that arrives in time is fine.
    async with session.post(
        srv.http + "/api/publish",
        json={"channel": "pub:x", "data": "x" * 1000},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as r:
        assert r.status == 200


# ---------------------------------------------------------------------------------------------- caps


def http_limiter(srv: Server) -> Any:
    return srv.runner.server.handler_class.limiter  # type: ignore[union-attr]


async def open_idle(srv: Server, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``n`` TCP connections that send nothing, each counted by the server before the next opens."""
    conns = []
    for _ in range(n):
        conns.append(await asyncio.open_connection("127.0.0.1", srv.port))
    async with asyncio.timeout(5):
        while http_limiter(srv).total < n:
            await asyncio.sleep(0.01)
    return conns


async def test_idle_http_connections_are_capped_per_address(
    start_server: ServerFactory, probe: ProbeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server_mod._last_logged.clear()
    srv = await start_server(max_connections_per_ip=5)
    ws = await probe(srv)  # a WebSocket does not count against HTTP connections
    idle = await open_idle(srv, 5)
    with caplog.at_level(logging.WARNING, "tidings.http"):
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(get("/healthz").encode())
            async with asyncio.timeout(5):
                status, headers, body = await read_response(reader)
            assert status == 503 and headers["server"] == "tidings" and b"max_connections_per_ip" in body
            await eof_within(reader, 5)
            writer.close()
    lines = [r.getMessage() for r in caplog.records if "refusing HTTP connections" in r.getMessage()]
    assert len(lines) == 1 and "127.0.0.1" in lines[0] and "max_connections_per_ip (5)" in lines[0], lines
    assert (await ws.request("ping"))["ok"] is True
    idle[0][1].close()
    async with asyncio.timeout(5):
        while http_limiter(srv).count("127.0.0.1") != 4:
            await asyncio.sleep(0.01)
    assert (await request(srv, get("/healthz")))[0] == 200
    for _, w in idle[1:]:
        w.close()


async def test_trusted_proxy_connections_count_in_the_total_only(start_server: ServerFactory) -> None:
    srv = await start_server(max_connections_per_ip=2, max_http_connections=6, trusted_proxies=["127.0.0.1"])
    idle = await open_idle(srv, 5)  # from the proxy's address: over the per-address cap, under the total
    assert (await request(srv, get("/healthz")))[0] == 200
    idle += await open_idle(srv, 6)
    assert (await request(srv, get("/healthz")))[0] == 503
    for _, w in idle:
        w.close()


async def test_upgrade_hands_the_http_slot_over_exactly_once(
    start_server: ServerFactory, probe: ProbeFactory
) -> None:
    srv = await start_server(max_connections_per_ip=3)
    lim = http_limiter(srv)
    socks = [await probe(srv) for _ in range(3)]  # each took an HTTP slot, then a WebSocket one
    assert lim.count("127.0.0.1") == 0 and lim.total == 0
    assert srv.node.conn_limits.count("127.0.0.1") == 3
    idle = await open_idle(srv, 3)  # the HTTP slots are free again: three idle connections fit
    assert lim.count("127.0.0.1") == 3
    assert (await request(srv, get("/healthz")))[0] == 503
    for p in socks:
        await p.close()
    async with asyncio.timeout(5):
        while srv.node.conn_limits.total:
            await asyncio.sleep(0.01)
    assert lim.count("127.0.0.1") == 3  # closing the WebSockets released nothing of the HTTP count
    # A raw upgrade with no Origin, at the HTTP cap minus one, still upgrades (the slot moves over).
    idle[0][1].close()
    async with asyncio.timeout(5):
        while lim.count("127.0.0.1") != 2:
            await asyncio.sleep(0.01)
    _reader, writer = await raw_upgrade(srv.port)
    assert lim.count("127.0.0.1") == 2 and srv.node.conn_limits.count("127.0.0.1") == 1
    writer.close()
    for _, w in idle[1:]:
        w.close()
    async with asyncio.timeout(5):
        while lim.total or srv.node.conn_limits.total:
            await asyncio.sleep(0.01)


def test_log_accept_errors_is_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    server_mod._last_logged.clear()
    loop = asyncio.new_event_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    try:
        log_accept_errors(loop)
        with caplog.at_level(logging.ERROR, "tidings.http"):
            for _ in range(50):
                loop.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(24, "Too many open files"),
                    }
                )
            loop.call_exception_handler({"message": "something else", "exception": ValueError("x")})
    finally:
        loop.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "tidings.http"]
    assert len(lines) == 1 and "Too many open files" in lines[0] and "max_connections" in lines[0], lines
    assert [c["message"] for c in seen] == ["something else"]


FLOOD = 700  # connections from one address, more than the open-files limit leaves


def test_open_files_limit_raised_and_connections_fit(tmp_path: Path) -> None:
    """``tidings serve`` with a soft limit of 256 and a hard one of 600: it raises the soft limit, lowers
    max_connections to fit, and a flood of 700 connections from one address meets 503s, not EMFILE."""

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 600))

    sock = bound_socket()
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tidings",
                "serve",
                "--fd",
                str(sock.fileno()),
                "--data-dir",
                str(tmp_path / "d"),
            ],
            pass_fds=[sock.fileno()],
            stdout=logf,
            stderr=subprocess.STDOUT,
            preexec_fn=limits,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "TIDINGS_MAX_CONNECTIONS_PER_IP": "0"},
        )
    port = sock.getsockname()[1]
    sock.close()
    try:
        deadline = time.monotonic() + 15
        while b"listening on" not in log_path.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        text = log_path.read_text()
        m = re.search(
            r"open files: limit 600 \(raised from 256\); max_connections 100000 lowered to (\d+)", text
        )
        assert m, text
        reserve = fd_reserve(600)
        assert int(m.group(1)) + 64 + reserve <= 600  # the reserve and the room kept for HTTP connections
        room = 600 - reserve  # what the open-files limit leaves for connections of both kinds

        async def flood() -> tuple[int, int, int]:
            conns, refused, other = [], 0, 0
            for _ in range(FLOOD):
                try:
                    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
                except OSError:
                    other += 1
                    continue
                conns.append((r, w))
            for r, _ in conns:  # the first `room` stay open and silent, the rest were answered 503
                try:
                    head = await asyncio.wait_for(r.read(12), 0.05 if not refused else 0.5)
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    other += 1
                    continue
                if head.startswith(b"HTTP/1.1 503"):
                    refused += 1
                else:
                    other += 1
            open_ = len(conns) - refused - other
            for _, w in conns:
                w.close()
            # After the flood the server answers again.
            await asyncio.sleep(0)
            async with asyncio.timeout(10):
                while True:
                    try:
                        r, w = await asyncio.open_connection("127.0.0.1", port)
                        w.write(get("/healthz").encode())
                        status = (await read_response(r))[0]
                        w.close()
                        if status == 200:
                            break
                    except (OSError, asyncio.IncompleteReadError):
                        pass
                    await asyncio.sleep(0.05)
            return open_, refused, other

        open_, refused, other = asyncio.run(flood())
        assert open_ <= room and refused + other == FLOOD - open_ and refused >= 1, (open_, refused, other)
        text = log_path.read_text()
        assert "Too many open files" not in text and "Traceback" not in text, text
        assert text.count("refusing HTTP connections") == 1, text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ---------------------------------------------------------------------------------------------- origins


async def upgrade_status(srv: Server, *headers: str, path: str = "/ws") -> int:
    raw = f"GET {path} HTTP/1.1\r\n" + WS_HEAD + "".join(h + "\r\n" for h in headers) + "\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(raw.encode())
        async with asyncio.timeout(5):
            line = await reader.readline()
        return int(line.split()[1])
    finally:
        writer.close()


async def test_dns_rebinding_shape_is_refused(start_server: ServerFactory) -> None:
    loopback = await start_server()
    # A page on evil.example whose name now resolves to 127.0.0.1: Host and Origin agree, both evil.
    assert (
        await upgrade_status(loopback, "Host: evil.example:8888", "Origin: http://evil.example:8888") == 403
    )
    assert (
        await upgrade_status(
            loopback, f"Host: 127.0.0.1:{loopback.port}", f"Origin: http://127.0.0.1:{loopback.port}"
        )
        == 101
    )
    assert (
        await upgrade_status(
            loopback, f"Host: localhost:{loopback.port}", f"Origin: http://localhost:{loopback.port}"
        )
        == 101
    )
    # Scheme counts: a plain-http server is not the origin https://127.0.0.1:port.
    assert (
        await upgrade_status(
            loopback, f"Host: 127.0.0.1:{loopback.port}", f"Origin: https://127.0.0.1:{loopback.port}"
        )
        == 403
    )
    public = await start_server(public_url=["https://chat.example.com"], host="0.0.0.0")
    assert await upgrade_status(public, "Host: evil.example", "Origin: http://evil.example") == 403
    assert await upgrade_status(public, "Host: chat.example.com", "Origin: https://chat.example.com") == 101
    assert await upgrade_status(public, "Host: x", "Origin: https://chat.example.com:443") == 101
    for bad in (
        "http://chat.example.com",
        "https://chat.example.com:8443",
        "https://evil.chat.example.com",
        "null",
    ):
        assert await upgrade_status(public, "Host: chat.example.com", f"Origin: {bad}") == 403, bad
    assert await upgrade_status(public, "Host: evil.example") == 101  # no Origin: not a browser


async def test_forwarded_origin_only_from_trusted_proxies(start_server: ServerFactory) -> None:
    fwd = (
        "X-Forwarded-Host: chat.example.com",
        "X-Forwarded-Proto: https",
        "Origin: https://chat.example.com",
    )
    rfc = ('Forwarded: for=192.0.2.1;proto=https;host="chat.example.com"', "Origin: https://chat.example.com")
    trusted = await start_server(trusted_proxies=["127.0.0.1"])
    untrusted = await start_server(trusted_proxies=["10.0.0.0/8"])
    host = "Host: 127.0.0.1:1"
    assert await upgrade_status(trusted, host, *fwd) == 101
    assert await upgrade_status(trusted, host, *rfc) == 101
    assert await upgrade_status(untrusted, host, *fwd) == 403
    assert await upgrade_status(untrusted, host, *rfc) == 403
    # The nearest proxy's value counts, not one the client put in front of it.
    spoof = (
        "X-Forwarded-Host: evil.example, chat.example.com",
        "X-Forwarded-Proto: https",
        "Origin: https://evil.example",
    )
    assert await upgrade_status(trusted, host, *spoof) == 403


async def test_refused_upgrades_are_logged_rate_limited(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    origin_mod._last_logged.clear()
    srv = await start_server(public_url=["https://chat.example.com"])
    with caplog.at_level(logging.WARNING, "tidings.origin"):
        for _ in range(5):
            assert await upgrade_status(srv, "Host: chat.example.com", "Origin: https://other.example") == 403
    lines = [r.getMessage() for r in caplog.records if r.name == "tidings.origin"]
    assert len(lines) == 1, lines
    assert "'https://other.example'" in lines[0] and "https://chat.example.com:443" in lines[0]
    assert "allowed_origins" in lines[0] and "public_url" in lines[0]


# ---------------------------------------------------------------------------------------------- XSRF


async def page_token(srv: Server, *headers: str) -> tuple[str, str]:
    status, h, _ = await request(srv, get("/", *headers))
    assert status == 200
    name, _, rest = h["set-cookie"].partition("=")
    return name, rest.split(";")[0]


def form_post(token: str, cookie: str, *headers: str, body: str = "hi", cookie_name: str = "_xsrf") -> str:
    data = f"body={body}&nick=n&_xsrf={token}"
    return (
        f"POST /chat/lobby/messages HTTP/1.1\r\nHost: x\r\nCookie: {cookie_name}={cookie}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        + "".join(h + "\r\n" for h in headers)
        + f"Content-Length: {len(data)}\r\n\r\n{data}"
    )


async def test_xsrf_token_is_signed_and_origin_checked(start_server: ServerFactory) -> None:
    srv = await start_server()
    name, token = await page_token(srv)
    assert name == "_xsrf"
    own = f"Origin: http://127.0.0.1:{srv.port}"
    here = f"Host: 127.0.0.1:{srv.port}"

    def with_host(raw: str) -> str:
        return raw.replace("Host: x", here)

    assert (await request(srv, with_host(form_post(token, token, own))))[0] == 303
    assert (await request(srv, with_host(form_post(token, token))))[0] == 303  # no Origin, no Referer
    made_up = "A" * 32  # a value the client picked for both cookie and field
    assert (await request(srv, with_host(form_post(made_up, made_up, own))))[0] == 403
    forged = "A" * 32 + "." + token.partition(".")[2]
    assert (await request(srv, with_host(form_post(forged, forged, own))))[0] == 403
    for header in ("Origin: https://evil.example", "Origin: null", "Referer: https://evil.example/page"):
        assert (await request(srv, with_host(form_post(token, token, header))))[0] == 403, header
    assert (await request(srv, with_host(form_post(token, token, f"Referer: http://127.0.0.1:{srv.port}/"))))[
        0
    ] == 303


async def test_xsrf_cookie_and_origin_checked_before_the_body(start_server: ServerFactory) -> None:
    srv = await start_server()
    _, token = await page_token(srv)
    for cookie, origin in (("A" * 32, "Origin: http://127.0.0.1"), (token, "Origin: https://evil.example")):
        head = (
            f"POST /chat/lobby/messages HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nCookie: _xsrf={cookie}\r\n"
            f"{origin}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000000\r\n\r\n"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        try:
            writer.write(head.encode())  # and never the body
            async with asyncio.timeout(3):
                assert (await read_response(reader))[0] == 403
        finally:
            writer.close()


async def test_xsrf_cookie_is_host_prefixed_and_secure_over_https(start_server: ServerFactory) -> None:
    srv = await start_server(trusted_proxies=["127.0.0.1"])
    _, h, _ = await request(srv, get("/", "X-Forwarded-Proto: https"))
    cookie = h["set-cookie"]
    assert cookie.startswith("__Host-xsrf=") and "Secure" in cookie and "Path=/" in cookie
    assert "Domain" not in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    token = cookie.split("=", 1)[1].split(";")[0]
    https = (
        "X-Forwarded-Proto: https",
        "X-Forwarded-Host: chat.example.com",
        "Origin: https://chat.example.com",
    )
    assert (await request(srv, form_post(token, token, *https, cookie_name="__Host-xsrf")))[0] == 303
    # Over https the plain-http cookie name is not accepted, and over http the __Host- one is not sent.
    assert (await request(srv, form_post(token, token, *https, cookie_name="_xsrf")))[0] == 403
    _, h, _ = await request(srv, get("/"))
    assert h["set-cookie"].startswith("_xsrf=") and "Secure" not in h["set-cookie"]
    untrusted = await start_server(trusted_proxies=["10.0.0.0/8"])
    _, h, _ = await request(untrusted, get("/", "X-Forwarded-Proto: https"))
    assert h["set-cookie"].startswith("_xsrf=")


# ---------------------------------------------------------------------------------------------- headers


async def test_security_headers_and_server_name_on_every_response(start_server: ServerFactory) -> None:
    srv = await start_server()
    _, token = await page_token(srv)
    cases = [
        get("/"),
        get("/no-such-page"),
        get("/chat/bad%20room"),
        get("/api/channels"),  # 401
        form_post("A" * 32, "A" * 32),  # 403 raised
        get("/ws", "Origin: https://evil.example", *WS_HEAD.strip().split("\r\n")),  # 403 from the upgrade
        "GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",  # 400 from aiohttp's parser
    ]
    statuses = []
    for raw in cases:
        status, h, _ = await request(srv, raw)
        statuses.append(status)
        assert h.get("server") == "tidings", (status, raw, h)
        for name in (
            "content-security-policy",
            "x-content-type-options",
            "referrer-policy",
            "x-frame-options",
        ):
            assert name in h, (status, raw, name)
    assert statuses == [200, 404, 404, 401, 403, 403, 400], statuses
    assert token
