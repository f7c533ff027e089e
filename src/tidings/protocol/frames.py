"""Building WebSocket frames once, so that one publication's bytes serve every subscriber.

Server-to-client frames are never masked (RFC 6455 §5.1), so a frame is a pure function of its payload.
"""

from __future__ import annotations

import struct
import zlib

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "FrameError",
    "FrameParser",
    "close_frame",
    "control_frame",
    "deflate_payload",
    "text_frame",
]

_OP_TEXT = 0x1
_FIN = 0x80
_RSV1 = 0x40


def text_frame(payload: bytes, *, compressed: bool = False) -> bytes:
    """One complete, unmasked text frame carrying ``payload`` (already deflated when ``compressed``)."""
    first = _FIN | _OP_TEXT | (_RSV1 if compressed else 0)
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", first, n)
    elif n < 65536:
        header = struct.pack("!BBH", first, 126, n)
    else:
        header = struct.pack("!BBQ", first, 127, n)
    return header + payload


def deflate_payload(payload: bytes) -> bytes:
    """permessage-deflate with no context takeover: the same bytes are valid for every receiver."""
    comp = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = comp.compress(payload) + comp.flush(zlib.Z_SYNC_FLUSH)
    # RFC 7692 §7.2.1: remove the trailing 0x00 0x00 0xff 0xff of the sync flush.
    return data[:-4] if data.endswith(b"\x00\x00\xff\xff") else data


# ---------------------------------------------------------------------------------------------- parsing

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_DEFLATE_TAIL = b"\x00\x00\xff\xff"


class FrameError(Exception):
    """The peer broke RFC 6455 (or a limit): close the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _unmask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return payload
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little")


class FrameParser:
    """Client-to-server frames in, complete messages out: ``feed(data)`` returns ``[(opcode, payload)]``.

    Enforces what a server must: masking, valid opcodes and RSV bits, control-frame rules,
    fragmentation order, the message size limit (before buffering a payload, and after inflating one),
    and UTF-8 for text. Violations raise :class:`FrameError` with the close code to use.
    """

    __slots__ = ("_buf", "_deflate", "_frag", "_frag_compressed", "_frag_op", "_frag_size", "max_size")

    def __init__(self, max_size: int, *, deflate: bool = False) -> None:
        self.max_size = max_size
        self._deflate = deflate
        self._buf = b""
        self._frag: list[bytes] | None = None
        self._frag_op = 0
        self._frag_size = 0
        self._frag_compressed = False

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf + data if self._buf else data
        out: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if not b1 & 0x80:
                raise FrameError(1002, "client frames must be masked")
            opcode = b0 & 0x0F
            rsv = b0 & 0x70
            if opcode >= 0x8:
                if n > 125 or not b0 & 0x80:
                    raise FrameError(1002, "control frames must be short and unfragmented")
            elif n > self.max_size or (self._frag is not None and self._frag_size + n > self.max_size):
                raise FrameError(1009, "message too big")
            if rsv and not (rsv == 0x40 and self._deflate and opcode in (OP_TEXT, OP_BINARY)):
                raise FrameError(1002, "unexpected RSV bits")
            if end - pos < head + 4 + n:
                break
            mask = buf[pos + head : pos + head + 4]
            start = pos + head + 4
            payload = _unmask(buf[start : start + n], mask)
            pos = start + n
            fin = b0 & 0x80
            if opcode >= 0x8:
                if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                    raise FrameError(1002, f"unknown opcode {opcode}")
                out.append((opcode, payload))
                continue
            if opcode == OP_CONT:
                if self._frag is None:
                    raise FrameError(1002, "continuation without a message")
                self._frag.append(payload)
                self._frag_size += n
                if fin:
                    msg = b"".join(self._frag)
                    op, compressed = self._frag_op, self._frag_compressed
                    self._frag = None
                    self._frag_size = 0
                    out.append((op, self._finish(op, msg, compressed)))
                continue
            if opcode not in (OP_TEXT, OP_BINARY):
                raise FrameError(1002, f"unknown opcode {opcode}")
            if self._frag is not None:
                raise FrameError(1002, "new message before the last one ended")
            if fin:
                out.append((opcode, self._finish(opcode, payload, bool(rsv))))
            else:
                self._frag = [payload]
                self._frag_op = opcode
                self._frag_size = n
                self._frag_compressed = bool(rsv)
        self._buf = buf[pos:] if pos < end else b""
        return out

    def _finish(self, opcode: int, payload: bytes, compressed: bool) -> bytes:
        if compressed:
            # No context takeover was negotiated: every message inflates on its own.
            d = zlib.decompressobj(-zlib.MAX_WBITS)
            try:
                payload = d.decompress(payload + _DEFLATE_TAIL, self.max_size + 1)
            except zlib.error:
                raise FrameError(1007, "invalid compressed data") from None
            if len(payload) > self.max_size or d.unconsumed_tail:
                raise FrameError(1009, "message too big after decompression")
        if opcode == OP_TEXT:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                raise FrameError(1007, "text is not valid UTF-8") from None
        return payload


def control_frame(opcode: int, payload: bytes = b"") -> bytes:
    """An unmasked close/ping/pong frame (payload at most 125 bytes)."""
    return struct.pack("!BB", 0x80 | opcode, len(payload)) + payload[:125]


def close_frame(code: int, reason: str = "") -> bytes:
    return control_frame(OP_CLOSE, struct.pack("!H", code) + reason.encode()[:123])
