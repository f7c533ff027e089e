"""The v1 wire protocol as plain data: parse client frames into commands, serialize replies and pushes.

Sans-I/O: text in, objects out; objects in, bytes out. The server and the Python client both use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import orjson

from .channels import is_valid_channel
from .codes import ErrorCode

__all__ = [
    "PROTOCOL_VERSION",
    "Command",
    "ConnectCmd",
    "HistoryCmd",
    "PingCmd",
    "PresenceCmd",
    "ProtocolError",
    "Publication",
    "PublishCmd",
    "StreamPosition",
    "SubscribeCmd",
    "UnsubscribeCmd",
    "decode_frame",
    "disconnect_push",
    "encode_error",
    "encode_ok",
    "new_publication_id",
    "parse_command",
    "parse_position",
]

PROTOCOL_VERSION = 1


def new_publication_id() -> str:
    """A random UUID4 in canonical text form (what ``str(uuid.uuid4())`` gives, at less than half the
    cost: it is made for every publication)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


MAX_HISTORY_LIMIT = 1000


class ProtocolError(Exception):
    """A bad client frame. ``id`` is the request id when one could be read, so the reply correlates."""

    def __init__(self, code: ErrorCode, message: str, id: int | str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id


@dataclass(frozen=True, slots=True)
class StreamPosition:
    offset: int
    epoch: str

    def to_json(self) -> dict[str, Any]:
        return {"offset": self.offset, "epoch": self.epoch}


@dataclass(slots=True)
class Publication:
    """One message in a channel. ``offset`` grows by 1 per channel; ``time`` is Unix milliseconds."""

    channel: str
    offset: int
    epoch: str
    id: str
    time: int
    data: Any
    info: dict[str, Any] | None = None
    # The WebSocket frame of this publication's push, built on first use and shared by every receiver
    # (live fan-out and replays alike).
    frame_cache: bytes | None = field(default=None, repr=False, compare=False)
    zframe_cache: bytes | None = field(default=None, repr=False, compare=False)  # permessage-deflate

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "channel": self.channel,
            "offset": self.offset,
            "epoch": self.epoch,
            "id": self.id,
            "time": self.time,
            "data": self.data,
        }
        if self.info is not None:
            out["info"] = self.info
        return out

    def push_bytes(self) -> bytes:
        """The ``message`` push for this publication, encoded once for every subscriber."""
        return orjson.dumps({"type": "message", **self.to_json()})

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Publication:
        return cls(
            channel=obj["channel"],
            offset=int(obj["offset"]),
            epoch=str(obj["epoch"]),
            id=str(obj["id"]),
            time=int(obj["time"]),
            data=obj.get("data"),
            info=obj.get("info"),
        )


# ---------------------------------------------------------------------------------------------- commands


@dataclass(slots=True)
class Command:
    id: int | str | None


@dataclass(slots=True)
class ConnectCmd(Command):
    token: str | None = None


@dataclass(slots=True)
class SubscribeCmd(Command):
    channel: str = ""
    since: StreamPosition | None = None
    token: str | None = None  # subscription token for private channels


@dataclass(slots=True)
class UnsubscribeCmd(Command):
    channel: str = ""


@dataclass(slots=True)
class PublishCmd(Command):
    channel: str = ""
    data: Any = None


@dataclass(slots=True)
class HistoryCmd(Command):
    channel: str = ""
    since: StreamPosition | None = None
    limit: int | None = None


@dataclass(slots=True)
class PresenceCmd(Command):
    channel: str = ""


@dataclass(slots=True)
class PingCmd(Command):
    extra: dict[str, Any] = field(default_factory=dict)


def decode_frame(text: str | bytes) -> dict[str, Any]:
    """JSON text to a dict, or ProtocolError(bad_request)."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"invalid JSON: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a command must be a JSON object")
    return obj


def _req_id(obj: dict[str, Any]) -> int | str | None:
    rid = obj.get("id")
    if rid is None:
        return None
    if isinstance(rid, bool) or not isinstance(rid, int | str):
        raise ProtocolError(ErrorCode.INVALID_FIELD, "id must be an integer or a string")
    if isinstance(rid, str) and len(rid) > 64:
        raise ProtocolError(ErrorCode.INVALID_FIELD, "id is longer than 64 characters")
    return rid


def _channel(obj: dict[str, Any], rid: int | str | None) -> str:
    ch = obj.get("channel")
    if ch is None:
        raise ProtocolError(ErrorCode.INVALID_FIELD, "channel is required", rid)
    if not is_valid_channel(ch):
        raise ProtocolError(
            ErrorCode.INVALID_CHANNEL,
            "channel must be 1-255 characters of letters, digits and _-:.@/=",
            rid,
        )
    assert isinstance(ch, str)
    return ch


def parse_position(value: object, rid: int | str | None = None) -> StreamPosition:
    """``{"offset": int >= 0, "epoch": str}`` to a StreamPosition."""
    if not isinstance(value, dict):
        raise ProtocolError(ErrorCode.INVALID_FIELD, "since must be an object {offset, epoch}", rid)
    off = value.get("offset")
    epoch = value.get("epoch", "")
    if isinstance(off, bool) or not isinstance(off, int) or off < 0 or off > 2**63 - 1:
        raise ProtocolError(ErrorCode.INVALID_FIELD, "since.offset must be a non-negative integer", rid)
    if not isinstance(epoch, str) or len(epoch) > 64:
        raise ProtocolError(ErrorCode.INVALID_FIELD, "since.epoch must be a string", rid)
    return StreamPosition(off, epoch)


def _opt_str(obj: dict[str, Any], key: str, rid: int | str | None) -> str | None:
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"{key} must be a string", rid)
    return v


def parse_command(obj: dict[str, Any]) -> Command:
    """A decoded frame to a Command, or ProtocolError with a documented code."""
    rid = _req_id(obj)
    op = obj.get("op")
    if not isinstance(op, str):
        raise ProtocolError(ErrorCode.INVALID_FIELD, "op is required and must be a string", rid)
    if op == "publish":
        if "data" not in obj:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "data is required", rid)
        return PublishCmd(rid, _channel(obj, rid), obj["data"])
    if op == "subscribe":
        since = obj.get("since")
        return SubscribeCmd(
            rid,
            _channel(obj, rid),
            None if since is None else parse_position(since, rid),
            _opt_str(obj, "token", rid),
        )
    if op == "unsubscribe":
        return UnsubscribeCmd(rid, _channel(obj, rid))
    if op == "history":
        since = obj.get("since")
        limit = obj.get("limit")
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_HISTORY_LIMIT
        ):
            raise ProtocolError(
                ErrorCode.INVALID_FIELD, f"limit must be an integer from 1 to {MAX_HISTORY_LIMIT}", rid
            )
        return HistoryCmd(
            rid, _channel(obj, rid), None if since is None else parse_position(since, rid), limit
        )
    if op == "presence":
        return PresenceCmd(rid, _channel(obj, rid))
    if op == "ping":
        return PingCmd(rid)
    if op == "connect":
        return ConnectCmd(rid, _opt_str(obj, "token", rid))
    raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {op[:32]!r}", rid)


# ---------------------------------------------------------------------------------------------- replies


def encode_ok(rid: int | str | None, result: dict[str, Any] | None = None) -> bytes:
    return orjson.dumps({"id": rid, "ok": True, "result": result or {}})


def encode_error(rid: int | str | None, code: ErrorCode, message: str) -> bytes:
    return orjson.dumps({"id": rid, "ok": False, "error": {"code": str(code), "message": message}})


def disconnect_push(code: int, reason: str, reconnect: bool) -> bytes:
    return orjson.dumps({"type": "disconnect", "code": code, "reason": reason, "reconnect": reconnect})
