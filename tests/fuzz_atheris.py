"""Coverage-guided fuzzing of the protocol parser with atheris (libFuzzer for Python).

    python tests/fuzz_atheris.py -runs=50000 -max_len=512 [corpus_dir]

Each input is used four ways: as bytes from a client socket (the WebSocket frame parser), as a raw
frame payload, as text, and as a command object built field by field from the bytes. Only
``FrameError`` with 1002/1007/1009 or ``ProtocolError`` with a parse-time code may come out, and a parsed
command must be well-formed; anything else raises and libFuzzer reports the crashing input.
``tests/test_fuzz.py`` runs it for a bounded number of iterations.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import atheris
import orjson

import tidings.protocol.channels
import tidings.protocol.frames
import tidings.protocol.messages
from tidings.protocol import ErrorCode, HistoryCmd, ProtocolError, PublishCmd, SubscribeCmd, encode_error

# Instrument only the parser (importing tidings loads aiohttp and more, which need no coverage feedback):
# module-level functions are looked up at call time, so replacing them instruments internal calls too.
for _mod in (tidings.protocol.messages, tidings.protocol.channels, tidings.protocol.frames):
    for _name, _obj in list(vars(_mod).items()):
        if inspect.isfunction(_obj) and _obj.__module__.startswith("tidings.protocol"):
            setattr(_mod, _name, atheris.instrument_func(_obj))

decode_frame = tidings.protocol.messages.decode_frame
parse_command = tidings.protocol.messages.parse_command
is_valid_channel = tidings.protocol.channels.is_valid_channel
FrameError = tidings.protocol.frames.FrameError
FrameParser = tidings.protocol.frames.FrameParser
for _name in ("feed", "_finish"):  # the frame parser's methods, too
    setattr(FrameParser, _name, atheris.instrument_func(getattr(FrameParser, _name)))

PARSE_CODES = {
    ErrorCode.BAD_REQUEST,
    ErrorCode.UNKNOWN_OP,
    ErrorCode.INVALID_FIELD,
    ErrorCode.INVALID_CHANNEL,
}
OPS = ["connect", "subscribe", "unsubscribe", "publish", "history", "presence", "ping", "PING", ""]
KEYS = ["id", "op", "channel", "data", "since", "limit", "token", "offset", "epoch"]


def check(raw: str | bytes) -> None:
    try:
        cmd = parse_command(decode_frame(raw))
    except ProtocolError as exc:
        if exc.code not in PARSE_CODES or not exc.message:
            raise AssertionError(f"undocumented parse error {exc.code!r}: {exc.message!r}") from None
        encode_error(exc.id, exc.code, exc.message)
        return
    rid = cmd.id
    if not (rid is None or (isinstance(rid, int) and not isinstance(rid, bool)) or isinstance(rid, str)):
        raise AssertionError(f"bad id {rid!r}")
    channel = getattr(cmd, "channel", None)
    if channel is not None and not is_valid_channel(channel):
        raise AssertionError(f"invalid channel accepted: {channel!r}")
    since = cmd.since if isinstance(cmd, SubscribeCmd | HistoryCmd) else None
    if since is not None and not (isinstance(since.offset, int) and 0 <= since.offset < 2**63):
        raise AssertionError(f"bad since {since!r}")
    if isinstance(cmd, HistoryCmd) and cmd.limit is not None and not 1 <= cmd.limit <= 1000:
        raise AssertionError(f"bad limit {cmd.limit!r}")
    if isinstance(cmd, PublishCmd):
        orjson.dumps(cmd.data)


def value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    kind = fdp.ConsumeIntInRange(0, 9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeIntInRange(-(2**63), 2**64 - 1)
    if kind == 3:
        return fdp.ConsumeRegularFloat()
    if kind == 4:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 80))
    if kind == 5:
        return fdp.PickValueInList(OPS)
    if kind == 6:
        return fdp.ConsumeIntInRange(-2, 1002)
    if kind == 7:
        return [value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {fdp.PickValueInList(KEYS): value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))}


def check_frames(data: bytes, deflate: bool) -> None:
    """Bytes from a client socket: only FrameError(1002/1007/1009); messages within the limit."""
    parser = FrameParser(1000, deflate=deflate)
    try:
        for opcode, payload in parser.feed(data[: len(data) // 2]) + parser.feed(data[len(data) // 2 :]):
            if opcode not in (0x1, 0x2, 0x8, 0x9, 0xA) or (opcode < 0x8 and len(payload) > 1000):
                raise AssertionError(f"bad message {opcode} {len(payload)}")
            if opcode == 0x1:
                payload.decode("utf-8")
    except FrameError as exc:
        if exc.code not in (1002, 1007, 1009):
            raise AssertionError(f"undocumented close code {exc.code}") from None


def test_one_input(data: bytes) -> None:
    check_frames(data, deflate=bool(data[:1]) and data[0] & 1 == 1)
    check(data)
    check(data.decode("utf-8", "replace"))
    fdp = atheris.FuzzedDataProvider(data)
    obj = {fdp.PickValueInList(KEYS): value(fdp) for _ in range(fdp.ConsumeIntInRange(0, 7))}
    try:
        text = orjson.dumps(obj)
    except (TypeError, orjson.JSONEncodeError):
        return
    check(text)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
