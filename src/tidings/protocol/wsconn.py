"""The rules of one server-side WebSocket connection (RFC 6455, RFC 7692), sans I/O.

Bytes in (:meth:`Connection.receive_data`), events out (complete messages, pings to answer, the peer's
close, a failure); the bytes the rules require (:meth:`Connection.data_to_send`) and the frames the
application sends (:meth:`Connection.send_close`, :meth:`~Connection.send_ping`,
:meth:`~Connection.send_pong`) come back as ``bytes`` for the caller to write. No asyncio, no sockets,
no clock but the one given (for the frame and byte budget): tests drive it directly, like
python-websockets' ``protocol.py``.

States::

    OPEN --send_close()--------------> CLOSING --peer's close--> CLOSED
    OPEN --peer's close--------------> CLOSING --data_to_send() or send_close()--> CLOSED
    OPEN --violation / over budget---> CLOSED (our close frame is in data_to_send(); drop the socket)

Once closing, data frames are skipped unparsed (only the peer's close still counts). In CLOSED the
caller closes the TCP connection; either way it must not wait longer than its close grace.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

from .frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Budget,
    FrameParser,
    close_frame,
    control_frame,
)

__all__ = [
    "CloseReceived",
    "Connection",
    "ConnectionFailed",
    "Event",
    "Message",
    "Opcode",
    "Ping",
    "Pong",
    "State",
    "close_code_valid",
]


class State(enum.Enum):
    OPEN = 1
    CLOSING = 2
    CLOSED = 3


class Opcode(enum.IntEnum):
    CONT = OP_CONT
    TEXT = OP_TEXT
    BINARY = OP_BINARY
    CLOSE = OP_CLOSE
    PING = OP_PING
    PONG = OP_PONG


@dataclass(frozen=True, slots=True)
class Message:
    """A complete text (valid UTF-8) or binary message, reassembled and inflated."""

    opcode: Opcode
    data: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    """The peer pinged; answer with :meth:`Connection.send_pong` (if the caller's policy allows)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    data: bytes


@dataclass(frozen=True, slots=True)
class CloseReceived:
    """The peer's close frame: ``code`` 1005 when it carried none. The answer (the same code) is in
    :meth:`Connection.data_to_send`, unless the caller sends its own close first."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """The peer broke a rule or a limit: a close frame with ``code`` is in :meth:`Connection.data_to_send`
    (unless a close was already sent), and the TCP connection must be closed right after it."""

    code: int
    reason: str


Event = Message | Ping | Pong | CloseReceived | ConnectionFailed

_NO_CODE = 1005  # RFC 6455 §7.1.5: the close frame had no status code


def close_code_valid(code: int) -> bool:
    """A code a peer may send in a close frame (RFC 6455 §7.4; 1012-1014 are registered with IANA)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class Connection:
    """The server side of one WebSocket connection: framing rules, the close handshake, the limits.

    ``max_size``: bytes of one message after reassembly and decompression (above: 1009);
    ``max_fragments``: frames of one message (above: 1009); ``frame_rate``/``inflate_rate``: frames per second
    the peer may send, and bytes per second its compressed messages may inflate to, bursts of twice that
    (above: 4030); 0 is unlimited. ``deflate``: permessage-deflate with no context takeover was negotiated.
    """

    __slots__ = (
        "_eof",
        "_parser",
        "_pending",
        "_pending_code",
        "close_rcvd",
        "close_sent",
        "failure",
        "state",
    )

    def __init__(
        self,
        max_size: int,
        *,
        deflate: bool = False,
        max_fragments: int = 0,
        frame_rate: float = 0.0,
        inflate_rate: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        budget = (
            Budget(frame_rate, inflate_rate, min_bytes=max_size, clock=clock)
            if frame_rate or inflate_rate
            else None
        )
        self._parser = FrameParser(max_size, deflate=deflate, max_fragments=max_fragments, budget=budget)
        self.state = State.OPEN
        self.close_sent: int | None = None  # the code of the close frame we sent
        self.close_rcvd: CloseReceived | None = None
        self.failure: ConnectionFailed | None = None
        self._pending = b""  # what the rules require us to send next (an answer to a close)
        self._pending_code = 0
        self._eof = False

    def set_limits(
        self, max_size: int, *, max_fragments: int = 0, frame_rate: float = 0.0, inflate_rate: float = 0.0
    ) -> None:
        """New limits from the next frame on (a configuration reload); the rate budget starts full."""
        parser = self._parser
        clock = parser.budget.clock if parser.budget is not None else time.monotonic
        parser.max_size = max_size
        parser.max_fragments = max_fragments
        parser.budget = (
            Budget(frame_rate, inflate_rate, min_bytes=max_size, clock=clock)
            if frame_rate or inflate_rate
            else None
        )

    @property
    def held(self) -> int:
        """Bytes of input this connection buffers (a partial frame, the fragments of one message)."""
        return self._parser.held

    # ------------------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse ``data``; return the events it completes, in order. Frames that arrived before a
        violation come first, then :class:`ConnectionFailed`. Nothing after the peer's close counts."""
        if self.state is State.CLOSED or (self.close_rcvd is not None):
            return []
        frames, err = self._parser.parse(data)
        events: list[Event] = []
        for opcode, payload in frames:
            if opcode in (OP_TEXT, OP_BINARY):
                events.append(Message(Opcode(opcode), payload))
            elif opcode == OP_PING:
                events.append(Ping(payload))
            elif opcode == OP_PONG:
                events.append(Pong(payload))
            else:  # OP_CLOSE, always the last frame the parser gives
                ev = self._on_close(payload)
                events.append(ev)
                return events
        if err is not None:
            events.append(self._fail(err.code, err.reason))
        return events

    def receive_eof(self) -> None:
        """The peer closed its side of the TCP connection (or the connection is gone)."""
        self.state = State.CLOSED
        self._eof = True
        self._pending = b""

    def _on_close(self, payload: bytes) -> Event:
        if len(payload) == 1:
            return self._fail(1002, "close frame with a 1-byte payload")
        if not payload:
            code, reason = _NO_CODE, ""
        else:
            code = int.from_bytes(payload[:2], "big")
            if not close_code_valid(code):
                return self._fail(1002, f"invalid close code {code}")
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                return self._fail(1007, "close reason is not valid UTF-8")
        ev = CloseReceived(code, reason)
        self.close_rcvd = ev
        if self.close_sent is not None:
            self.state = State.CLOSED  # the handshake we started is complete
        else:
            self.state = State.CLOSING
            self._pending_code = 1000 if code == _NO_CODE else code
            self._pending = close_frame(self._pending_code)
        return ev

    def _fail(self, code: int, reason: str) -> ConnectionFailed:
        """_Fail the WebSocket connection_ (RFC 6455 §7.1.7): our close frame, then the socket closes."""
        ev = ConnectionFailed(code, reason)
        self.failure = ev
        if self.close_sent is None:
            self._pending = close_frame(code, reason)
            self._pending_code = code
        self.state = State.CLOSED
        return ev

    # ------------------------------------------------------------------------------ sending

    def data_to_send(self) -> bytes:
        """The frame the rules require now (the answer to the peer's close, or the close frame of a
        failure), once; ``b""`` when there is none."""
        out, self._pending = self._pending, b""
        if out:
            self.close_sent = self._pending_code
            self.state = State.CLOSED
        return out

    def send_close(self, code: int, reason: str = "") -> bytes:
        """Our close frame, to write after whatever is queued; ``b""`` if a close was already sent.
        It replaces an answer :meth:`data_to_send` has not given yet (to the peer's close, or of a
        failure): the application closed while handling events that came before."""
        if self.close_sent is not None or self._eof:
            return b""
        self.close_sent = code
        self._pending = b""
        if self.close_rcvd is not None or self.failure is not None:
            self.state = State.CLOSED
        else:
            self.state = State.CLOSING
            self._parser.skip_data()  # from now on only the peer's close matters
        return close_frame(code, reason)

    def send_ping(self, data: bytes = b"") -> bytes:
        """A ping frame; ``b""`` once closing."""
        return control_frame(OP_PING, data) if self.state is State.OPEN else b""

    def send_pong(self, data: bytes) -> bytes:
        """A pong frame; ``b""`` once our close frame is sent (a ping that came before the peer's close
        or before a broken frame is still answered)."""
        return control_frame(OP_PONG, data) if self.close_sent is None and not self._eof else b""
