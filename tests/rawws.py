"""A hand-written WebSocket client for tests that need what a library will not do: never read, send
malformed or hand-masked frames, read frames one by one."""

from __future__ import annotations

import asyncio
import os
import socket
import struct


async def raw_upgrade(
    port: int, rcvbuf: int | None = None, headers: str = "", path: str = "/ws"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Upgrade a plain TCP connection; it answers nothing and reads only when told to.

    ``rcvbuf`` shrinks the receive buffer before connecting (a slow consumer fills up fast)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b" 101 " in head, head
    return reader, writer


def client_frame(
    payload: bytes, opcode: int = 0x1, *, fin: bool = True, rsv1: bool = False, masked: bool = True
) -> bytes:
    """One client-to-server frame, masked with a random key unless ``masked`` is False."""
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    mbit = 0x80 if masked else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next server frame: (opcode, payload)."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    return b0 & 0x0F, await reader.readexactly(n)


async def read_until_close(reader: asyncio.StreamReader) -> tuple[int, list[bytes]]:
    """Read frames up to the close frame: (close code, the data frames before it)."""
    frames: list[bytes] = []
    while True:
        op, payload = await read_frame(reader)
        if op == 0x8:
            return struct.unpack("!H", payload[:2])[0], frames
        frames.append(payload)
