"""Building WebSocket frames once, so that one publication's bytes serve every subscriber.

Server-to-client frames are never masked (RFC 6455 §5.1), so a frame is a pure function of its payload.
"""

from __future__ import annotations

import struct
import sys
import time
import zlib
from collections.abc import Callable

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "Budget",
    "FrameError",
    "FrameParser",
    "close_frame",
    "control_frame",
    "data_frame",
    "deflate_payload",
    "text_frame",
]

_OP_TEXT = 0x1
_FIN = 0x80
_RSV1 = 0x40


def data_frame(opcode: int, payload: bytes, *, compressed: bool = False) -> bytes:
    """One complete, unmasked text or binary frame carrying ``payload`` (already deflated when
    ``compressed``)."""
    first = _FIN | opcode | (_RSV1 if compressed else 0)
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", first, n)
    elif n < 65536:
        header = struct.pack("!BBH", first, 126, n)
    else:
        header = struct.pack("!BBQ", first, 127, n)
    return header + payload


def text_frame(payload: bytes, *, compressed: bool = False) -> bytes:
    """One complete, unmasked text frame carrying ``payload`` (already deflated when ``compressed``)."""
    return data_frame(_OP_TEXT, payload, compressed=compressed)


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
_UNLIMITED = 1 << 62


class FrameError(Exception):
    """The peer broke RFC 6455 (or a limit): close the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Budget:
    """What one connection may make the server do: frames per second, and bytes per second produced by
    inflating compressed messages (the work a small input can multiply), as two token buckets that hold
    up to twice their rate (the inflate bucket at least ``min_bytes``, so that one message of the largest
    size always fits). A rate of 0 is unlimited.

    The clock is read once per :meth:`refill` (once per read), never per frame."""

    __slots__ = ("_bytes", "_frames", "_t", "clock", "frame_cap", "frame_rate", "inflate_cap", "inflate_rate")

    def __init__(
        self,
        frame_rate: float,
        inflate_rate: float,
        *,
        min_bytes: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.frame_rate = frame_rate
        self.inflate_rate = inflate_rate
        self.frame_cap = 2 * frame_rate
        self.inflate_cap = max(2 * inflate_rate, float(min_bytes))
        self.clock = clock
        self._frames = self.frame_cap
        self._bytes = self.inflate_cap
        self._t = clock()

    def refill(self) -> None:
        now = self.clock()
        dt = now - self._t
        if dt > 0:
            self._t = now
            self._frames = min(self.frame_cap, self._frames + dt * self.frame_rate)
            self._bytes = min(self.inflate_cap, self._bytes + dt * self.inflate_rate)

    def take_frame(self) -> bool:
        if not self.frame_rate:
            return True
        if self._frames < 1:
            return False
        self._frames -= 1
        return True

    def allowance(self) -> int:
        """Bytes that inflating may produce now."""
        return int(self._bytes) if self.inflate_rate else _UNLIMITED

    def spend(self, n: int) -> bool:
        if not self.inflate_rate:
            return True
        if n > self._bytes:
            return False
        self._bytes -= n
        return True


def _unmask(payload: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    n = len(payload)
    if n == 0:
        return b""
    key = int.from_bytes((bytes(mask) * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little")


class FrameParser:
    """Client-to-server frames in, complete messages out: :meth:`parse` returns ``([(opcode, payload)],
    error)``, the messages of the bytes given so far in order, and the first violation after them.

    Enforces what a server must: masking, valid opcodes and RSV bits, control-frame rules,
    fragmentation order, the message size limit (before buffering a payload, and while inflating one),
    the number of fragments of one message, the connection's :class:`Budget`, and UTF-8 for text.

    What it holds is bounded: the unparsed tail of the input (at most one frame: its header said it fits)
    and the fragments of one message, each in one ``bytearray`` (:attr:`held`). Buffering is linear: a
    frame that arrives in many reads is appended to, never copied again. Parsing stops after a close
    frame and after an error. With :attr:`discard` set (the connection is closing), data frames are
    skipped without being buffered, inflated or checked; only a close frame still matters.
    """

    __slots__ = (
        "_buf",
        "_deflate",
        "_done",
        "_frag",
        "_frag_compressed",
        "_frag_count",
        "_frag_op",
        "_skip",
        "budget",
        "discard",
        "max_fragments",
        "max_size",
    )

    def __init__(
        self,
        max_size: int,
        *,
        deflate: bool = False,
        max_fragments: int = 0,
        budget: Budget | None = None,
    ) -> None:
        self.max_size = max_size
        self.max_fragments = max_fragments  # frames of one message; 0 is unlimited
        self.budget = budget
        self.discard = False
        self._deflate = deflate
        self._buf: bytearray | None = None  # the unparsed tail
        self._frag: bytearray | None = None  # the fragments of the current message, joined
        self._frag_op = 0
        self._frag_count = 0
        self._frag_compressed = False
        self._skip = 0  # payload bytes of a discarded frame still to drop
        self._done: FrameError | bool = False  # a close frame was parsed (True), or the error

    @property
    def held(self) -> int:
        """Bytes of buffers this parser holds (allocated sizes)."""
        return sum(sys.getsizeof(b) for b in (self._buf, self._frag) if b is not None)

    def skip_data(self) -> None:
        """From now on, skip data frames unbuffered (the connection is closing)."""
        self.discard = True
        self._frag = None

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Like :meth:`parse`, but raise the error (dropping the messages before it)."""
        out, err = self.parse(data)
        if err is not None:
            raise err
        return out

    def parse(self, data: bytes) -> tuple[list[tuple[int, bytes]], FrameError | None]:
        out: list[tuple[int, bytes]] = []
        if self._done is not False:
            return out, None
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return out, None
            data = data[self._skip :]
            self._skip = 0
        if self.budget is not None:
            self.budget.refill()
        buf: bytes | bytearray
        if self._buf:
            self._buf += data
            buf = self._buf
        else:
            buf = data
        pos = 0
        try:
            pos = self._parse(buf, out)
        except FrameError as exc:
            self._done = exc
            self._buf = self._frag = None
            return out, exc
        if self._done is not False:  # a close frame: nothing after it counts
            self._buf = self._frag = None
        elif buf is self._buf:
            del self._buf[:pos]  # O(1) at the front of a bytearray
        elif pos < len(buf):
            self._buf = bytearray(memoryview(buf)[pos:])
        return out, None

    def _parse(self, buf: bytes | bytearray, out: list[tuple[int, bytes]]) -> int:
        pos = 0
        end = len(buf)
        max_size = self.max_size
        budget = self.budget
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
            fin = b0 & 0x80
            if opcode >= 0x8:
                if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                    raise FrameError(1002, f"unknown opcode {opcode}")
                if n > 125 or not fin:
                    raise FrameError(1002, "control frames must be short and unfragmented")
                if rsv:
                    raise FrameError(1002, "unexpected RSV bits")
            elif opcode not in (OP_CONT, OP_TEXT, OP_BINARY):
                raise FrameError(1002, f"unknown opcode {opcode}")
            elif self.discard:
                # Closing: skip the payload without holding it.
                if budget is not None and not budget.take_frame():
                    raise FrameError(4030, "too many frames per second")
                start = pos + head + 4
                if end - start < n:
                    self._skip = n - (end - start)
                    return end
                pos = start + n
                continue
            else:
                if rsv and not (rsv == 0x40 and self._deflate and opcode != OP_CONT):
                    raise FrameError(1002, "unexpected RSV bits")
                if opcode == OP_CONT:
                    if self._frag is None:
                        raise FrameError(1002, "continuation without a message")
                elif self._frag is not None:
                    raise FrameError(1002, "new message before the last one ended")
                if n > max_size or (self._frag is not None and len(self._frag) + n > max_size):
                    raise FrameError(1009, "message too big")
            if end - pos < head + 4 + n:
                break
            if budget is not None and not budget.take_frame():
                raise FrameError(4030, "too many frames per second")
            start = pos + head + 4
            mask = buf[pos + head : start]
            payload = _unmask(buf[start : start + n], mask)
            pos = start + n
            if opcode >= 0x8:
                out.append((opcode, payload))
                if opcode == OP_CLOSE:
                    self._done = True
                    return pos
                continue
            frag = self._frag
            if opcode == OP_CONT:
                assert frag is not None
                self._frag_count += 1
                if self.max_fragments and self._frag_count > self.max_fragments:
                    raise FrameError(1009, "message in too many fragments")
                frag += payload
                if fin:
                    op, compressed = self._frag_op, self._frag_compressed
                    self._frag = None
                    out.append((op, self._finish(op, bytes(frag), compressed)))
            elif fin:
                out.append((opcode, self._finish(opcode, payload, bool(rsv))))
            else:
                self._frag = bytearray(payload)
                self._frag_op = opcode
                self._frag_count = 1
                self._frag_compressed = bool(rsv)
        return pos

    def _finish(self, opcode: int, payload: bytes, compressed: bool) -> bytes:
        budget = self.budget
        if compressed:
            allowance = budget.allowance() if budget is not None else _UNLIMITED
            # No context takeover was negotiated: every message inflates on its own, and never past
            # the size limit or the connection's byte budget (so the work per read is bounded).
            d = zlib.decompressobj(-zlib.MAX_WBITS)
            limit = min(self.max_size, allowance)
            try:
                payload = d.decompress(payload + _DEFLATE_TAIL, limit + 1)
            except zlib.error:
                raise FrameError(1007, "invalid compressed data") from None
            if len(payload) > limit or d.unconsumed_tail:
                if limit == self.max_size:
                    raise FrameError(1009, "message too big after decompression")
                raise FrameError(4030, "too many inflated bytes per second")
            if budget is not None and not budget.spend(len(payload)):
                raise FrameError(4030, "too many inflated bytes per second")
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
    """A close frame; the reason is cut to 123 bytes on a character boundary (it stays valid UTF-8)."""
    raw = reason.encode()
    if len(raw) > 123:
        raw = raw[:123].decode("utf-8", "ignore").encode()
    return control_frame(OP_CLOSE, struct.pack("!H", code) + raw)
