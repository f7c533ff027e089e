"""The WebSocket transport on real servers and sockets: one close path, budgets, the handshake, the
aiohttp take-over. Each test is a regression test of a bug found by probing the server."""

from __future__ import annotations

import asyncio
import socket
import struct
import zlib

import aiohttp
import orjson
import pytest

from tidings.protocol import CloseCode, deflate_payload
from tidings.transports import wsbase
from tidings.transports.server import check_aiohttp

from .conftest import ProbeFactory, Server, ServerFactory
from .rawws import client_frame, raw_upgrade, read_frame, read_until_close
from .test_limits import watch

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA
KEY_HEADERS = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"


Opened = tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]


async def handshake(port: int, head: str, path: str = "/ws", extra: bytes = b"") -> Opened:
    """Send a request with the given upgrade headers (and ``extra`` bytes in the same write); return the
    response head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{head}\r\n".encode() + extra)
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return response, reader, writer


async def connections_drop_to(srv: Server, n: int, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while len(srv.node.connections) > n:
            await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------------------- closing


async def test_peer_close_with_queued_data_is_dropped_after_the_grace(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client fills its echo queue, never reads, and sends Close: the server's answer waits behind
    megabytes that will never be read. It must still drop the socket CLOSE_GRACE after the close
    (before: no abort timer on this path, and the heartbeat skips closing connections: held forever)."""
    monkeypatch.setattr(wsbase, "CLOSE_GRACE", 0.5)
    srv = await start_server(max_buffer=256 << 20)
    _, writer = await raw_upgrade(srv.port, rcvbuf=4096, path="/websocket")
    writer.transport.pause_reading()  # read nothing more, ever
    frame = client_frame(b"x" * 60000)
    for _ in range(300):  # 18 MB of echoes: far more than the kernel buffers hold
        writer.write(frame)
        await writer.drain()
    (conn,) = srv.node.connections
    async with asyncio.timeout(10):
        while conn.transport.get_write_buffer_size() < 4 << 20:  # the server has read and queued them
            await asyncio.sleep(0.02)
    writer.write(client_frame(struct.pack("!H", 1000), OP_CLOSE))
    await writer.drain()
    await connections_drop_to(srv, 0, timeout=5)
    writer.close()


async def test_server_close_with_queued_data_is_dropped_after_the_grace(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same when the server starts closing (here: a broken frame while megabytes are queued)."""
    monkeypatch.setattr(wsbase, "CLOSE_GRACE", 0.5)
    srv = await start_server(max_buffer=256 << 20)
    _, writer = await raw_upgrade(srv.port, rcvbuf=4096, path="/websocket")
    writer.transport.pause_reading()  # read nothing more, ever
    for _ in range(300):
        writer.write(client_frame(b"x" * 60000))
        await writer.drain()
    (conn,) = srv.node.connections
    async with asyncio.timeout(10):
        while conn.transport.get_write_buffer_size() < 4 << 20:
            await asyncio.sleep(0.02)
    writer.write(client_frame(b"x", masked=False))
    await writer.drain()
    await connections_drop_to(srv, 0, timeout=5)
    writer.close()


async def test_ping_before_a_bad_frame_gets_its_pong(server: Server) -> None:
    """Frames that arrived in the same read before a malformed one are handled first (before: the parser
    raised mid-read and the ping got no pong)."""
    reader, writer = await raw_upgrade(server.port)
    writer.write(client_frame(b"hi", OP_PING) + client_frame(b"x", masked=False))
    op, payload = await asyncio.wait_for(read_frame(reader), 5)
    assert (op, payload) == (OP_PONG, b"hi")
    code, _ = await asyncio.wait_for(read_until_close(reader), 5)
    assert code == CloseCode.PROTOCOL_ERROR
    writer.close()


async def test_command_before_a_bad_frame_is_answered(server: Server) -> None:
    reader, writer = await raw_upgrade(server.port)
    writer.write(client_frame(b'{"id": 1, "op": "ping"}') + client_frame(b"\xff\xfe"))
    code, frames = await asyncio.wait_for(read_until_close(reader), 5)
    assert code == CloseCode.INVALID_TEXT
    assert [orjson.loads(f) for f in frames] == [{"id": 1, "ok": True, "result": {}}]
    writer.close()


# ---------------------------------------------------------------------------------------------- budgets


async def test_empty_pong_flood_closes_4030(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    """Empty pongs cost no command, but each costs a parse: one anonymous connection's flood took 90 %
    CPU and slowed /healthz to 3.7 s. Every frame counts against ws_frame_rate."""
    srv = await start_server()
    w = await watch(srv, probe, session)
    reader, writer = await raw_upgrade(srv.port)
    writer.write(client_frame(b"", OP_PONG) * 20000)
    code, frames = await asyncio.wait_for(read_until_close(reader), 5)
    assert code == CloseCode.RATE_LIMITED
    assert orjson.loads(frames[-1])["code"] == 4030
    writer.close()
    await w.check()


async def test_zero_length_continuations_close_1009(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(ws_frame_rate=0.0)  # the fragment limit alone
    w = await watch(srv, probe, session)
    reader, writer = await raw_upgrade(srv.port)
    writer.write(client_frame(b"{", fin=False) + client_frame(b"", 0, fin=False) * 2000)
    code, _ = await asyncio.wait_for(read_until_close(reader), 5)
    assert code == CloseCode.MESSAGE_TOO_BIG
    writer.close()
    await w.check()


DEFLATE = "Sec-WebSocket-Extensions: permessage-deflate\r\n"


async def test_echo_output_is_bounded_by_its_input_when_compressed(start_server: ServerFactory) -> None:
    """81-byte frames that inflate to 65 KB: /websocket echoed 524 MiB for 0.7 MiB uploaded. Now its
    replies are compressed like the input (what goes out is about what came in), and the inflated bytes
    count against ws_inflate_rate (then 4030)."""
    srv = await start_server(compression=True)
    reader, writer = await raw_upgrade(srv.port, path="/websocket", headers=DEFLATE)
    frame = client_frame(deflate_payload(b"[" * 65000), rsv1=True)
    assert len(frame) < 100
    writer.write(frame * 50)
    got = 0
    for _ in range(50):
        op, payload = await asyncio.wait_for(read_frame(reader), 5)
        assert op == OP_TEXT
        got += len(payload) + 4
        inflated = zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
        assert inflated == b"You said: " + b"[" * 65000
    assert got <= 2 * len(frame) * 50
    # Past the inflate budget (8 MiB of bursts), the connection is closed 4030.
    writer.write(frame * 500)
    code, frames = await asyncio.wait_for(read_until_close(reader), 10)
    assert code == CloseCode.RATE_LIMITED
    assert len(frames) < 200
    writer.close()


# ---------------------------------------------------------------------------------------------- handshake


@pytest.mark.parametrize(
    ("upgrade", "connection", "ok"),
    [
        ("websocket", "Upgrade", True),
        ("WebSocket", "keep-alive, Upgrade", True),
        ("h2c, websocket", "upgrade", True),
        ("notwebsocket", "Upgrade", False),
        ("websocket", "notupgrade", False),
        ("websocketx", "Upgrade", False),
    ],
)
async def test_upgrade_and_connection_are_token_lists(
    server: Server, upgrade: str, connection: str, ok: bool
) -> None:
    head, _, writer = await handshake(
        server.port, f"Upgrade: {upgrade}\r\nConnection: {connection}\r\n{KEY_HEADERS}"
    )
    status = head.split(b"\r\n", 1)[0]
    assert (b" 101 " in status) is ok, head
    if not ok:
        assert b" 400 " in status, head
    writer.close()


@pytest.mark.parametrize(
    ("offer", "accepted"),
    [
        ("permessage-deflate", True),
        ("permessage-deflate; client_max_window_bits", True),
        ("permessage-deflate; client_max_window_bits=10", True),
        ('permessage-deflate; client_max_window_bits="12"', True),
        ("permessage-deflate; server_no_context_takeover; client_no_context_takeover", True),
        ("permessage-deflate; server_max_window_bits=15", True),
        ("permessage-deflate; unknown_parameter", False),
        ("permessage-deflate; server_no_context_takeover; server_no_context_takeover", False),
        ("permessage-deflate; client_max_window_bits=10; client_max_window_bits=11", False),
        ("permessage-deflate; client_max_window_bits=16", False),
        ("permessage-deflate; client_max_window_bits=7", False),
        ("permessage-deflate; client_max_window_bits=abc", False),
        ("permessage-deflate; server_no_context_takeover=1", False),
        ("permessage-deflate; server_max_window_bits", False),  # a value is required
        ("permessage-deflate; server_max_window_bits=10", False),  # valid, but we only do 15
        ("permessage-deflate; foo=1, permessage-deflate; client_max_window_bits", True),  # the second one
        ("x-webkit-deflate-frame", False),
    ],
)
async def test_deflate_offers_per_rfc_7692(start_server: ServerFactory, offer: str, accepted: bool) -> None:
    srv = await start_server(compression=True)
    head, _, writer = await handshake(
        srv.port,
        f"Upgrade: websocket\r\nConnection: Upgrade\r\n{KEY_HEADERS}Sec-WebSocket-Extensions: {offer}\r\n",
    )
    assert b" 101 " in head
    assert (b"permessage-deflate" in head) is accepted, head
    writer.close()


# ---------------------------------------------------------------------------------------------- aiohttp fence


@pytest.mark.parametrize("path", ["/ws", "/websocket"])
async def test_first_frame_in_the_upgrade_write_is_answered(server: Server, path: str) -> None:
    """The first frame in the same write as the upgrade request lands in aiohttp's private
    ``_message_tail``; the take-over must hand it to the WebSocket connection."""
    frame = client_frame(b'{"id": 1, "op": "ping"}')
    head, reader, writer = await handshake(
        server.port, f"Upgrade: websocket\r\nConnection: Upgrade\r\n{KEY_HEADERS}", path=path, extra=frame
    )
    assert b" 101 " in head
    op, payload = await asyncio.wait_for(read_frame(reader), 5)
    assert op == OP_TEXT
    if path == "/ws":
        assert orjson.loads(payload) == {"id": 1, "ok": True, "result": {}}
    else:
        assert payload == b'You said: {"id": 1, "op": "ping"}'
    writer.close()


def test_missing_aiohttp_internals_fail_loudly() -> None:
    check_aiohttp()  # the installed aiohttp has them
    with pytest.raises(RuntimeError, match=r"tidings needs aiohttp >=.*_message_tail"):
        check_aiohttp(type("OldHandler", (), {"__slots__": ("transport",)}), version="3.0")


# ---------------------------------------------------------------------------------------------- echo_raw


async def test_echo_raw_echoes_text_and_binary_verbatim(
    start_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(echo_raw=True)
    async with session.ws_connect(f"ws://127.0.0.1:{srv.port}/websocket") as ws:
        await ws.send_str("héllo")
        assert (await asyncio.wait_for(ws.receive(), 5)).data == "héllo"
        await ws.send_bytes(b"\x00\xff")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type == aiohttp.WSMsgType.BINARY and msg.data == b"\x00\xff"
