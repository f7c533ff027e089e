"""The v1 wire protocol as plain data: parse client frames into commands, serialize replies and pushes.

Sans-I/O: text in, objects out; objects in, bytes out. The server and the Python client both use it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from .channels import is_valid_channel
from .codes import ErrorCode

__all__ = [
    "MAX_DEPTH",
    "MAX_IDEMPOTENCY_KEY",
    "PROTOCOL_VERSION",
    "Command",
    "ConnectCmd",
    "Event",
    "Format",
    "HistoryCmd",
    "PingCmd",
    "PresenceCmd",
    "ProtocolError",
    "Publication",
    "PublishCmd",
    "RefreshCmd",
    "StreamPosition",
    "SubscribeCmd",
    "UnsubscribeCmd",
    "check_channel",
    "decode_frame",
    "disconnect_push",
    "encode_error",
    "encode_ok",
    "encode_value",
    "encoded",
    "new_publication_id",
    "parse_command",
    "parse_idempotency_key",
    "parse_position",
    "unsubscribe_push",
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
MAX_IDEMPOTENCY_KEY = 64  # characters of a publish's idempotency_key


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


MAX_DEPTH = 128
"""Levels of nesting allowed in ``data`` and ``info``. orjson reads 1,024 levels but writes only 254, and
a publication is written inside other objects (a push, a history reply): deeper values are refused at the
door so that every later encode of them succeeds."""

_WRAP = 254 - MAX_DEPTH  # orjson fails above 254 levels: the wrapper leaves exactly MAX_DEPTH for the value
_chain: list[Any] = [None]
_leaf = _chain
for _ in range(_WRAP - 1):
    _chain = [_chain]


def encode_value(value: Any, what: str, rid: int | str | None = None) -> bytes:
    """``value`` as JSON bytes, or ProtocolError(bad_request) when it is nested deeper than MAX_DEPTH.

    A value that deep has more than MAX_DEPTH brackets, so most values are settled by the plain encode and
    a count; the others are encoded once more inside a fixed chain of lists, which orjson refuses exactly
    when the value is too deep."""
    try:
        out = orjson.dumps(value)
    except TypeError:
        raise _too_deep(what, rid) from None
    if len(out) > 2 * MAX_DEPTH and out.count(b"[") + out.count(b"{") > MAX_DEPTH:
        _leaf[0] = value
        try:
            orjson.dumps(_chain)
        except TypeError:
            raise _too_deep(what, rid) from None
        finally:
            _leaf[0] = None
    return out


def _too_deep(what: str, rid: int | str | None) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, f"{what} is nested more than {MAX_DEPTH} levels deep", rid)


_UNSET: Any = object()

Format = Callable[["Publication | Event"], "bytes | None"]
"""A wire format: the bytes one kind of sink sends for a publication or event (None: it sends nothing)."""


class Publication:
    """One message in a channel. ``offset`` grows by 1 per channel; ``time`` is Unix milliseconds.

    On the server a publication holds its ``data`` and ``info`` as encoded JSON bytes (``raw``,
    ``raw_info``): encoded once at the door, stored and sent as they are, decoded only when something
    needs the value (``data``/``info`` decode on every access). The Python client builds publications
    from decoded values instead. ``cache`` holds the bytes of each wire format (see :func:`encoded`).
    """

    __slots__ = ("_data", "_info", "_raw", "_raw_info", "cache", "channel", "epoch", "id", "offset", "time")

    def __init__(
        self,
        channel: str,
        offset: int,
        epoch: str,
        id: str,
        time: int,
        data: Any = _UNSET,
        info: dict[str, Any] | None = None,
        *,
        raw: bytes | None = None,
        raw_info: bytes | None = None,
    ) -> None:
        if raw is None and data is _UNSET:
            raise TypeError("a Publication needs data or raw")
        self.channel = channel
        self.offset = offset
        self.epoch = epoch
        self.id = id
        self.time = time
        self._data = data
        self._raw = raw
        self._info = info
        self._raw_info = raw_info
        self.cache: dict[Format, bytes | None] | None = None

    @property
    def data(self) -> Any:
        return self._data if self._data is not _UNSET else orjson.loads(self._raw)  # type: ignore[arg-type]

    @property
    def raw(self) -> bytes:
        """``data`` as JSON bytes."""
        if self._raw is None:
            self._raw = orjson.dumps(self._data)
        return self._raw

    @property
    def info(self) -> dict[str, Any] | None:
        if self._info is not None or self._raw_info is None:
            return self._info
        info: dict[str, Any] = orjson.loads(self._raw_info)
        return info

    @property
    def raw_info(self) -> bytes | None:
        if self._raw_info is None and self._info is not None:
            self._raw_info = orjson.dumps(self._info)
        return self._raw_info

    @property
    def size(self) -> int:
        """Bytes this publication holds in a history cache (payloads and a fixed overhead)."""
        return len(self.raw) + len(self.raw_info or b"") + len(self.channel) + 200

    def position(self) -> StreamPosition:
        return StreamPosition(self.offset, self.epoch)

    def to_json(self) -> dict[str, Any]:
        """The publication as a JSON object of decoded values."""
        return self._json(self.data, self.info)

    def wire_json(self) -> dict[str, Any]:
        """Like :meth:`to_json`, with ``data`` and ``info`` as their stored bytes (for ``orjson.dumps``):
        nothing is decoded or encoded again."""
        raw_info = self.raw_info
        return self._json(orjson.Fragment(self.raw), None if raw_info is None else orjson.Fragment(raw_info))

    def _json(self, data: Any, info: Any) -> dict[str, Any]:
        out: dict[str, Any] = {
            "channel": self.channel,
            "offset": self.offset,
            "epoch": self.epoch,
            "id": self.id,
            "time": self.time,
            "data": data,
        }
        if info is not None:
            out["info"] = info
        return out

    def push_bytes(self) -> bytes:
        """The ``message`` push for this publication."""
        return orjson.dumps({"type": "message", **self.wire_json()})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Publication):
            return NotImplemented
        return self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Publication({self.channel!r}, offset={self.offset}, epoch={self.epoch!r}, id={self.id!r})"

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


class Event:
    """A push to a channel's subscribers that is not a publication: ``join`` or ``leave``."""

    __slots__ = ("cache", "channel", "client", "kind", "user")

    def __init__(self, kind: str, channel: str, client: str, user: str) -> None:
        self.kind = kind
        self.channel = channel
        self.client = client
        self.user = user
        self.cache: dict[Format, bytes | None] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, "channel": self.channel, "client": self.client, "user": self.user}

    def push_bytes(self) -> bytes:
        return orjson.dumps(self.to_json())


def encoded(item: Publication | Event, fmt: Format) -> bytes | None:
    """``fmt(item)``, built by the first sink of that format that needs it and reused by every other."""
    cache = item.cache
    if cache is None:
        cache = item.cache = {}
    try:
        return cache[fmt]
    except KeyError:
        out = cache[fmt] = fmt(item)
        return out


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
    idempotency_key: str | None = None  # a repeat within the window answers the first result


@dataclass(slots=True)
class RefreshCmd(Command):
    """Renew the subscription grant of ``channel`` with a fresh subscription token."""

    channel: str = ""
    token: str = ""


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


def check_channel(ch: object, rid: int | str | None = None) -> str:
    """``ch`` if it is a legal channel name; else ProtocolError invalid_field (missing) or
    invalid_channel. The one check of a channel name, for the parser and the policy gate alike."""
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


def _channel(obj: dict[str, Any], rid: int | str | None) -> str:
    return check_channel(obj.get("channel"), rid)


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


def parse_idempotency_key(value: object, rid: int | str | None = None) -> str | None:
    """An ``idempotency_key``: None (absent) or a string of 1 to MAX_IDEMPOTENCY_KEY characters."""
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_IDEMPOTENCY_KEY:
        raise ProtocolError(
            ErrorCode.INVALID_FIELD,
            f"idempotency_key must be a string of 1 to {MAX_IDEMPOTENCY_KEY} characters",
            rid,
        )
    return value


def parse_command(obj: dict[str, Any]) -> Command:
    """A decoded frame to a Command, or ProtocolError with a documented code."""
    rid = _req_id(obj)
    op = obj.get("op")
    if not isinstance(op, str):
        raise ProtocolError(ErrorCode.INVALID_FIELD, "op is required and must be a string", rid)
    if op == "publish":
        if "data" not in obj:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "data is required", rid)
        return PublishCmd(
            rid, _channel(obj, rid), obj["data"], parse_idempotency_key(obj.get("idempotency_key"), rid)
        )
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
    if op == "refresh":
        channel = _channel(obj, rid)
        token = _opt_str(obj, "token", rid)
        if token is None:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "token is required", rid)
        return RefreshCmd(rid, channel, token)
    raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {op[:32]!r}", rid)


# ---------------------------------------------------------------------------------------------- replies


def encode_ok(rid: int | str | None, result: dict[str, Any] | None = None) -> bytes:
    return orjson.dumps({"id": rid, "ok": True, "result": result or {}})


def encode_error(rid: int | str | None, code: ErrorCode, message: str) -> bytes:
    return orjson.dumps({"id": rid, "ok": False, "error": {"code": str(code), "message": message}})


def unsubscribe_push(channel: str, code: ErrorCode, reason: str, resubscribe: bool) -> bytes:
    """The server ended a subscription (its rights expired or were withdrawn); ``resubscribe``: a client
    may subscribe again (with a fresh token)."""
    return orjson.dumps(
        {
            "type": "unsubscribe",
            "channel": channel,
            "code": str(code),
            "reason": reason,
            "resubscribe": resubscribe,
        }
    )


def disconnect_push(code: int, reason: str, reconnect: bool) -> bytes:
    return orjson.dumps({"type": "disconnect", "code": code, "reason": reason, "reconnect": reconnect})
