"""The sans-I/O WebSocket frame parser, driven without a network (like websockets' test_protocol)."""

from __future__ import annotations

import asyncio
import struct
import zlib

import pytest

from tidings.protocol.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    FrameError,
    FrameParser,
    deflate_payload,
    text_frame,
)

from .conftest import Server
from .rawws import client_frame, read_frame


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_sizes_round_trip(size: int) -> None:
    p = FrameParser(1 << 20)
    data = b"x" * size
    assert p.feed(client_frame(data)) == [(OP_TEXT, data)]


def test_split_anywhere_and_many_per_read() -> None:
    frames = b"".join(client_frame(f"m{i}".encode() * i) for i in range(50))
    for step in (1, 2, 3, 7, 64, 1000):
        p = FrameParser(1 << 20)
        out = []
        for i in range(0, len(frames), step):
            out += p.feed(frames[i : i + step])
        assert [m for _, m in out] == [f"m{i}".encode() * i for i in range(50)]


def test_fragmented_message_with_interleaved_ping() -> None:
    p = FrameParser(1000)
    data = client_frame(b"hel", fin=False) + client_frame(b"ping", OP_PING) + client_frame(b"lo", 0, fin=True)
    assert p.feed(data) == [(OP_PING, b"ping"), (OP_TEXT, b"hello")]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (client_frame(b"x", masked=False), 1002),
        (client_frame(b"x", rsv1=True), 1002),  # no deflate negotiated
        (client_frame(b"x", 0x3), 1002),  # reserved opcode
        (client_frame(b"x" * 126, OP_PING), 1002),  # control frame too long
        (client_frame(b"x", OP_CLOSE, fin=False), 1002),
        (client_frame(b"x", 0), 1002),  # continuation with nothing to continue
        (client_frame(b"a", fin=False) + client_frame(b"b"), 1002),
        (client_frame(b"\xff\xfe"), 1007),
        (client_frame(b"x" * 1001), 1009),
        (client_frame(b"x" * 600, fin=False) + client_frame(b"x" * 600, 0), 1009),
    ],
)
def test_violations(data: bytes, code: int) -> None:
    with pytest.raises(FrameError) as exc:
        FrameParser(1000).feed(data)
    assert exc.value.code == code


def test_oversize_refused_from_the_header_alone() -> None:
    """A 1 GiB length is refused before any payload arrives: nothing is buffered for it."""
    head = struct.pack("!BBQ", 0x81, 0x80 | 127, 1 << 30) + b"mask"
    with pytest.raises(FrameError) as exc:
        FrameParser(65536).feed(head)
    assert exc.value.code == 1009


def test_deflate_message_and_bomb() -> None:
    p = FrameParser(1000, deflate=True)
    assert p.feed(client_frame(deflate_payload(b'{"op":"ping"}'), rsv1=True)) == [(OP_TEXT, b'{"op":"ping"}')]
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = comp.compress(b"\0" * 10_000_000) + comp.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < 20_000
    with pytest.raises(FrameError) as exc:
        FrameParser(65536, deflate=True).feed(client_frame(bomb[:-4], OP_BINARY, rsv1=True))
    assert exc.value.code == 1009


def test_server_frames_are_unmasked_and_sized() -> None:
    assert text_frame(b"hi") == b"\x81\x02hi"
    assert text_frame(b"x" * 200)[:4] == b"\x81\x7e\x00\xc8"
    assert text_frame(b"x" * 70000)[:2] == b"\x81\x7f"
    assert text_frame(b"z", compressed=True)[0] == 0xC1


async def test_close_codes_are_answered_per_rfc(server: Server) -> None:
    """A valid close code is echoed (1012-1014 are registered: valid); an invalid one (reserved or out of
    range) is answered with 1002; a reason that is not UTF-8 with 1007 (Autobahn 7.5.1)."""
    not_utf8 = b"\xce\xba\xe1\xbd\xb9\xed\xa0\x80"
    cases = [(1000, b"", 1000), (4001, b"", 4001), (3000, b"", 3000), (1005, b"", 1002), (999, b"", 1002),
             (5000, b"", 1002), (1012, b"", 1012), (1013, b"", 1013), (1014, b"", 1014), (1015, b"", 1002),
             (1004, b"", 1002), (1000, b"ok \xce\xba", 1000), (1000, not_utf8, 1007)]  # fmt: skip
    for sent, why, answered in cases:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # the RFC 6455 §1.3 example
        writer.write(client_frame(struct.pack("!H", sent) + why, OP_CLOSE))
        op, payload = await asyncio.wait_for(read_frame(reader), 5)
        assert op == OP_CLOSE and struct.unpack("!H", payload[:2])[0] == answered, (sent, why, payload)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # then the server closes the socket
        writer.close()
