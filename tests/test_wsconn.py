"""The sans-I/O WebSocket connection (protocol/wsconn.py), driven without a network like websockets'
tests/test_protocol.py: bytes in, events and bytes out."""

from __future__ import annotations

import struct
import tracemalloc

import pytest

from tidings.protocol.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    deflate_payload,
)
from tidings.protocol.wsconn import (
    CloseReceived,
    Connection,
    ConnectionFailed,
    Message,
    Opcode,
    Ping,
    Pong,
    State,
    close_code_valid,
)

from .rawws import client_frame


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def sent_close(data: bytes) -> int:
    assert data[0] == 0x80 | OP_CLOSE, data
    code: int = struct.unpack("!H", data[2:4])[0]
    return code


# ---------------------------------------------------------------------------------------------- handshake


def test_messages_pings_and_the_peers_close() -> None:
    c = Connection(1000)
    data = (
        client_frame(b"hi")
        + client_frame(b"\x00\x01", OP_BINARY)
        + client_frame(b"p", OP_PING)
        + client_frame(b"", OP_PONG)
        + client_frame(close_payload(1001, b"bye"), OP_CLOSE)
        + client_frame(b"after the close")
    )
    events = c.receive_data(data)
    assert events == [
        Message(Opcode.TEXT, b"hi"),
        Message(Opcode.BINARY, b"\x00\x01"),
        Ping(b"p"),
        Pong(b""),
        CloseReceived(1001, "bye"),
    ]
    assert c.state is State.CLOSING
    assert c.send_pong(b"p") == b"\x8a\x01p"  # the ping came before the close: answered
    assert sent_close(c.data_to_send()) == 1001  # its own code, echoed
    assert c.state is State.CLOSED
    assert c.send_pong(b"p") == b""  # nothing after our close
    assert c.data_to_send() == b""
    assert c.receive_data(client_frame(b"x")) == []


def test_our_close_then_the_peers_answer() -> None:
    c = Connection(1000)
    assert sent_close(c.send_close(4008, "slow consumer")) == 4008
    assert c.state is State.CLOSING
    assert c.send_close(1000) == b""  # one close frame only
    # Closing: data frames are skipped unread (even invalid UTF-8, even oversized), pings unanswered.
    skipped = client_frame(b"\xff\xfe") + client_frame(b"x" * 5000, OP_BINARY) + client_frame(b"a", fin=False)
    events = c.receive_data(skipped + client_frame(close_payload(1000), OP_CLOSE))
    assert events == [CloseReceived(1000, "")]
    assert c.state is State.CLOSED
    assert c.data_to_send() == b""


def test_closing_skips_a_large_frame_without_buffering_it() -> None:
    c = Connection(1 << 20)
    c.send_close(1000)
    frame = client_frame(b"x" * 500_000, OP_BINARY)
    for i in range(0, len(frame), 1000):
        assert c.receive_data(frame[i : i + 1000]) == []
        assert c.held < 2000, c.held  # nothing of the skipped payload is kept
    assert c.receive_data(client_frame(b"", OP_CLOSE)) == [CloseReceived(1005, "")]


def test_application_close_answers_a_pending_peer_close() -> None:
    """The application closes (say 4400) while handling a message that came before the peer's close in
    the same read: its close frame is the answer, and the handshake is complete."""
    c = Connection(1000)
    events = c.receive_data(client_frame(b"hi") + client_frame(close_payload(1000), OP_CLOSE))
    assert [type(e) for e in events] == [Message, CloseReceived]
    assert sent_close(c.send_close(4400, "bad protocol")) == 4400
    assert c.state is State.CLOSED
    assert c.data_to_send() == b""


def test_empty_close_is_answered_1000() -> None:
    c = Connection(1000)
    assert c.receive_data(client_frame(b"", OP_CLOSE)) == [CloseReceived(1005, "")]
    assert sent_close(c.data_to_send()) == 1000


@pytest.mark.parametrize(
    ("payload", "answer"),
    [
        (close_payload(1000, b"\xce\xba\xe1\xbd\xb9\xed\xa0\x80"), 1007),  # Autobahn 7.5.1: not UTF-8
        (b"\x03", 1002),  # 1-byte payload
        (close_payload(1005), 1002),
        (close_payload(1006), 1002),
        (close_payload(1015), 1002),
        (close_payload(1016), 1002),
        (close_payload(2999), 1002),
        (close_payload(5000), 1002),
    ],
)
def test_invalid_close_frames_fail_the_connection(payload: bytes, answer: int) -> None:
    c = Connection(1000)
    (ev,) = c.receive_data(client_frame(payload, OP_CLOSE))
    assert isinstance(ev, ConnectionFailed) and ev.code == answer
    assert c.state is State.CLOSED
    assert sent_close(c.data_to_send()) == answer


@pytest.mark.parametrize(
    "code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999]
)
def test_registered_close_codes_are_echoed(code: int) -> None:
    assert close_code_valid(code)
    c = Connection(1000)
    assert c.receive_data(client_frame(close_payload(code), OP_CLOSE)) == [CloseReceived(code, "")]
    assert sent_close(c.data_to_send()) == code


def test_good_frames_before_a_bad_one_come_first() -> None:
    """A ping, a message, then an unmasked frame in one read: the ping and the message are events, then
    the failure (the parser used to raise and lose them: the ping got no pong)."""
    c = Connection(1000)
    data = client_frame(b"p", OP_PING) + client_frame(b"hello") + client_frame(b"x", masked=False)
    events = c.receive_data(data)
    assert events[:2] == [Ping(b"p"), Message(Opcode.TEXT, b"hello")]
    assert isinstance(events[2], ConnectionFailed) and events[2].code == 1002
    assert c.send_pong(b"p") == b"\x8a\x01p"
    assert sent_close(c.data_to_send()) == 1002
    assert c.send_pong(b"p") == b""


def test_parser_returns_good_frames_and_the_error() -> None:
    p = FrameParser(1000)
    out, err = p.parse(client_frame(b"p", OP_PING) + client_frame(b"\xff"))
    assert out == [(OP_PING, b"p")]
    assert err is not None and err.code == 1007


# ---------------------------------------------------------------------------------------------- fragments


def test_zero_length_continuations_are_bounded() -> None:
    """Empty continuation frames add no payload, so only a count bounds them: more than max_fragments
    closes 1009, and what the parser held meanwhile stays small (it grew without limit: 54 -> 345 MB)."""
    c = Connection(65536, max_fragments=1024)
    assert c.receive_data(client_frame(b"{", fin=False)) == []
    empty = client_frame(b"", 0, fin=False)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        assert c.receive_data(empty * 1022) == []
        held = tracemalloc.get_traced_memory()[0] - base
        events = c.receive_data(empty * 10)
    finally:
        tracemalloc.stop()
    assert held < 8192, held  # 1023 fragments held in one buffer, not 1023 objects
    assert isinstance(events[-1], ConnectionFailed) and events[-1].code == 1009
    assert sent_close(c.data_to_send()) == 1009


def test_one_byte_fragments_hold_about_their_size() -> None:
    """65,535 fragments of 1 byte (with no fragment limit) hold about 64 KiB, not ~34x that in many
    small objects. Measured with tracemalloc while the message is incomplete."""
    p = FrameParser(65536, max_fragments=0)
    data = client_frame(b"a", fin=False) + b"".join(client_frame(b"b", 0, fin=False) for _ in range(65534))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(0, len(data), 65536):
            assert p.feed(data[i : i + 65536]) == []
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert held < 2 * 65536, held
    assert p.feed(client_frame(b"c", 0)) == [(OP_TEXT, b"a" + b"b" * 65534 + b"c")]


def test_fragment_limit_counts_every_frame_of_the_message() -> None:
    c = Connection(1000, max_fragments=3)
    data = client_frame(b"a", fin=False) + client_frame(b"b", 0, fin=False) + client_frame(b"c", 0)
    assert c.receive_data(data) == [Message(Opcode.TEXT, b"abc")]
    data = client_frame(b"a", fin=False) + client_frame(b"b", 0, fin=False) + client_frame(b"c", 0, fin=False)
    events = c.receive_data(data + client_frame(b"d", 0))
    assert isinstance(events[-1], ConnectionFailed) and events[-1].code == 1009


def test_partial_frames_are_appended_to_not_copied() -> None:
    """A frame that arrives in many reads grows one bytearray in place (the buffer used to be copied on
    every read: ``buf = self._buf + data``, quadratic for a 64 KiB frame in 1-byte segments)."""
    p = FrameParser(1 << 20)
    frame = client_frame(b"x" * 65536, OP_BINARY)
    assert p.feed(frame[:10]) == []
    buf = p._buf
    assert isinstance(buf, bytearray)
    for i in range(10, len(frame) - 1):
        assert p.feed(frame[i : i + 1]) == []
        assert p._buf is buf
    assert p.feed(frame[-1:]) == [(OP_BINARY, b"x" * 65536)]


# ---------------------------------------------------------------------------------------------- budgets


def test_every_frame_counts_against_the_frame_budget() -> None:
    clock = Clock()
    c = Connection(1000, frame_rate=100, clock=clock)  # bursts of 200
    pongs = client_frame(b"", OP_PONG) * 200
    assert len(c.receive_data(pongs)) == 200
    clock.t += 1.0  # 100 more
    events = c.receive_data(client_frame(b"", OP_PING) * 50 + client_frame(b"a", fin=False) + pongs)
    # 50 pings, the fragment (counted, no event), 49 pongs: the 101st frame fails the connection.
    assert len(events) == 100 and isinstance(events[-1], ConnectionFailed) and events[-1].code == 4030
    assert sent_close(c.data_to_send()) == 4030


def test_budget_refills_with_time() -> None:
    clock = Clock()
    c = Connection(1000, frame_rate=10, clock=clock)
    for _ in range(50):
        clock.t += 0.1
        assert c.receive_data(client_frame(b"", OP_PONG)) == [Pong(b"")]
    assert c.state is State.OPEN


def test_inflated_bytes_count_against_the_inflate_budget() -> None:
    """81-byte frames that inflate to ~64 KB: the budget (plus one message) bounds the inflating done in
    one read, then the connection is closed 4030."""
    clock = Clock()
    c = Connection(65536, deflate=True, inflate_rate=100_000, clock=clock)  # bursts of 200,000 bytes
    blob = deflate_payload(b"[" * 65000)
    assert len(blob) < 100
    frame = client_frame(blob, OP_BINARY, rsv1=True)
    events = c.receive_data(frame * 1000)
    assert [type(e) for e in events] == [Message] * 3 + [ConnectionFailed]
    assert events[-1] == ConnectionFailed(4030, "too many inflated bytes per second")


def test_one_message_of_the_largest_size_always_fits() -> None:
    c = Connection(65536, deflate=True, inflate_rate=1000)
    frame = client_frame(deflate_payload(b"a" * 65536), OP_TEXT, rsv1=True)
    assert c.receive_data(frame) == [Message(Opcode.TEXT, b"a" * 65536)]


def test_uncompressed_data_does_not_spend_the_inflate_budget() -> None:
    c = Connection(65536, inflate_rate=1000)
    assert len(c.receive_data(client_frame(b"a" * 60000) * 10)) == 10


def test_inflating_stops_at_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inflating is never asked for more than the bytes left in the budget (plus one, to see the
    excess), so the work one read can cause is bounded by the budget, not by frames x max_size."""
    import zlib

    from tidings.protocol import frames

    asked: list[int] = []

    class Inflater:
        def __init__(self, wbits: int) -> None:
            self.d = zlib.decompressobj(wbits)
            self.unconsumed_tail = b""

        def decompress(self, data: bytes, max_length: int) -> bytes:
            asked.append(max_length)
            out = self.d.decompress(data, max_length)
            self.unconsumed_tail = self.d.unconsumed_tail
            return out

    class Zlib:
        MAX_WBITS = zlib.MAX_WBITS
        error = zlib.error
        decompressobj = Inflater

    frame = client_frame(deflate_payload(b"[" * 400_000), OP_BINARY, rsv1=True)
    monkeypatch.setattr(frames, "zlib", Zlib)
    c = Connection(1 << 20, deflate=True, inflate_rate=150_000)  # bursts of 1 MiB (max_size)
    events = c.receive_data(frame * 10)
    assert [type(e) for e in events] == [Message, Message, ConnectionFailed]
    assert events[-1] == ConnectionFailed(4030, "too many inflated bytes per second")
    assert asked[-1] <= (1 << 20) - 800_000 + 1  # the third inflate was cut at what was left


def test_set_limits_applies_from_the_next_frame() -> None:
    """A configuration reload's WebSocket limits (``Connection.set_limits``) hold for an open connection:
    a smaller ``max_size`` refuses the next large message (1009), a frame rate cuts a burst (4030)."""
    clock = Clock()
    c = Connection(1000, clock=clock)
    assert c.receive_data(client_frame(b"x" * 500)) == [Message(Opcode.TEXT, b"x" * 500)]
    c.set_limits(100)
    [failed] = c.receive_data(client_frame(b"x" * 500))
    assert isinstance(failed, ConnectionFailed) and failed.code == 1009
    c = Connection(1000, clock=clock)
    assert len(c.receive_data(client_frame(b"p", OP_PING) * 50)) == 50  # no frame rate at first
    c.set_limits(1000, frame_rate=5.0)  # bursts of 10
    events = c.receive_data(client_frame(b"p", OP_PING) * 50)
    assert isinstance(events[-1], ConnectionFailed) and events[-1].code == 4030 and len(events) <= 11
