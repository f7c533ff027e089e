"""The HTTP API's requests and replies, shared by ``HTTPClient`` (aiohttp) and ``SyncHTTPClient`` (urllib3).

One place for each concept: :class:`Call` objects say what to send (method, path, query, JSON body) and
how to read the reply; :func:`decode` turns a status and body into a value or an :class:`ApiError`;
:class:`RetryPolicy` and :class:`Attempts` decide whether and when a failed attempt is tried again. The
two clients only move bytes.

Every publishing call carries idempotency keys (generated when the caller gives none), so a retry after a
timeout or a dropped connection never stores a publication twice: the server answers a repeated key with
the original position (docs/http-api.md, ``idempotency_key``).
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypedDict, TypeVar
from urllib.parse import quote

import orjson

from ..protocol import Publication, StreamPosition

__all__ = [
    "ApiError",
    "Attempts",
    "BatchEntry",
    "Call",
    "PublishResult",
    "RetryPolicy",
    "batch_call",
    "broadcast_call",
    "channels_call",
    "decode",
    "give_up",
    "headers",
    "health_call",
    "history_call",
    "new_key",
    "presence_call",
    "publish_call",
]

T = TypeVar("T")

MAX_KEY = 64  # characters of an idempotency key (the server refuses longer ones)


class ApiError(Exception):
    """The HTTP API refused a request (``status`` and the server's ``code``), or no answer came.

    ``status`` 0 means there was no HTTP response at all: ``code`` is then ``"timeout"`` or
    ``"disconnected"``, raised once every retry failed (the last transport error is the ``__cause__``).
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class PublishResult(TypedDict):
    """Where a publication was stored: the reply of publish, and of each successful broadcast/batch entry."""

    offset: int
    epoch: str
    id: str


@dataclass(slots=True)
class BatchEntry:
    """One publication of a ``batch``; a plain mapping with the same keys works too."""

    channel: str
    data: Any
    info: dict[str, Any] | None = None
    idempotency_key: str | None = None


def new_key() -> str:
    """A random idempotency key: 32 hex characters (128 bits)."""
    return secrets.token_hex(16)


def _key(key: str | None) -> str:
    if key is None:
        return new_key()
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY:
        raise ValueError(f"idempotency_key must be a string of 1 to {MAX_KEY} characters")
    return key


@dataclass(slots=True)
class Call(Generic[T]):
    """One API request: what to send and how to read the reply's JSON value."""

    method: str
    path: str
    parse: Callable[[Any], T]
    body: bytes | None = None
    params: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """The path with its query string."""
        if not self.params:
            return self.path
        query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in self.params.items())
        return f"{self.path}?{query}"


def _json(body: Any) -> bytes:
    return orjson.dumps(body)


def _as_dict(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ApiError(200, "bad_response", "expected a JSON object")
    return obj


def _pub_result(obj: Any) -> PublishResult:
    d = _as_dict(obj)
    return PublishResult(offset=int(d["offset"]), epoch=str(d["epoch"]), id=str(d["id"]))


def _results(obj: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = _as_dict(obj)["results"]
    return out


def publish_call(
    channel: str, data: Any, info: dict[str, Any] | None = None, idempotency_key: str | None = None
) -> Call[PublishResult]:
    body: dict[str, Any] = {"channel": channel, "data": data, "idempotency_key": _key(idempotency_key)}
    if info is not None:
        body["info"] = info
    return Call("POST", "/api/publish", _pub_result, _json(body))


def broadcast_call(
    channels: list[str], data: Any, info: dict[str, Any] | None = None, idempotency_key: str | None = None
) -> Call[list[dict[str, Any]]]:
    """One key for the whole broadcast: the server applies it on each channel."""
    body: dict[str, Any] = {
        "channels": list(channels),
        "data": data,
        "idempotency_key": _key(idempotency_key),
    }
    if info is not None:
        body["info"] = info
    return Call("POST", "/api/broadcast", _results, _json(body))


def batch_call(entries: Iterable[BatchEntry | Mapping[str, Any]]) -> Call[list[dict[str, Any]]]:
    """Every entry gets a key (its own, or a generated one) before the first attempt: retries repeat it."""
    pubs: list[dict[str, Any]] = []
    for e in entries:
        if isinstance(e, BatchEntry):
            item: dict[str, Any] = {"channel": e.channel, "data": e.data}
            if e.info is not None:
                item["info"] = e.info
            item["idempotency_key"] = _key(e.idempotency_key)
        else:
            item = dict(e)
            if "data" not in item:
                raise ValueError("a batch entry needs data (null is a value)")
            item["idempotency_key"] = _key(item.get("idempotency_key"))
        pubs.append(item)
    return Call("POST", "/api/batch", _results, _json({"publications": pubs}))


def _history(obj: Any) -> tuple[list[Publication], StreamPosition, bool | None]:
    r = _as_dict(obj)
    return (
        [Publication.from_json(p) for p in r["publications"]],
        StreamPosition(int(r["offset"]), str(r["epoch"])),
        r.get("recovered"),
    )


def history_call(
    channel: str, *, limit: int | None = None, since: StreamPosition | None = None
) -> Call[tuple[list[Publication], StreamPosition, bool | None]]:
    params: dict[str, str] = {}
    if limit is not None:
        params["limit"] = str(limit)
    if since is not None:
        params["since"] = str(since.offset)
        params["epoch"] = since.epoch
    return Call("GET", f"/api/channels/{channel}/history", _history, params=params)


def _clients(obj: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = _as_dict(obj)["clients"]
    return out


def presence_call(channel: str) -> Call[list[dict[str, Any]]]:
    return Call("GET", f"/api/channels/{channel}/presence", _clients)


def _channels(obj: Any) -> dict[str, int]:
    return {c["channel"]: int(c["subscribers"]) for c in _as_dict(obj)["channels"]}


def channels_call() -> Call[dict[str, int]]:
    return Call("GET", "/api/channels", _channels)


def health_call() -> Call[dict[str, Any]]:
    return Call("GET", "/healthz", _as_dict)


def decode(status: int, raw: bytes) -> Any:
    """The reply's JSON value; ApiError for an error status or a body that is not JSON."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(status, "bad_response", raw[:200].decode(errors="replace")) from None
    if status >= 400:
        err = obj.get("error", {}) if isinstance(obj, dict) else {}
        if not isinstance(err, dict):
            err = {}
        raise ApiError(status, str(err.get("code", "unknown")), str(err.get("message", "")))
    return obj


def headers(api_key: str, call: Call[Any]) -> dict[str, str]:
    out = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
    if call.body is not None:
        out["Content-Type"] = "application/json"
    return out


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When a request that got no answer (a timeout, a refused or dropped connection) is sent again.

    At most ``retries`` more attempts, all within ``deadline`` seconds from the first; before attempt *n*
    (1-based) a pause drawn uniformly from ``[0, min(max_backoff, min_backoff * 2**n)]``. An answer from
    the server (even an error status) is never retried: it is the answer.
    """

    retries: int = 3
    deadline: float = 30.0
    min_backoff: float = 0.1
    max_backoff: float = 2.0

    def backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_backoff, self.min_backoff * 2**attempt))


class Attempts:
    """The attempts of one call under a :class:`RetryPolicy` (one per call; not shared between threads)."""

    __slots__ = ("_start", "clock", "n", "policy", "timeout")

    def __init__(
        self, policy: RetryPolicy, timeout: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy
        self.timeout = timeout
        self.clock = clock
        self._start = clock()
        self.n = 0  # attempts made so far

    def attempt_timeout(self) -> float:
        """The timeout of the next attempt: the per-attempt timeout, cut to what is left of the deadline."""
        self.n += 1
        left = self.policy.deadline - (self.clock() - self._start)
        return max(0.05, min(self.timeout, left))

    def retry_after(self) -> float | None:
        """After a failed attempt: the pause before the next one, or None to give up."""
        if self.n > self.policy.retries:
            return None
        pause = self.policy.backoff(self.n)
        if self.clock() - self._start + pause >= self.policy.deadline:
            return None
        return pause


def give_up(exc: BaseException, attempts: int) -> ApiError:
    timeout = isinstance(exc, TimeoutError) or "timeout" in type(exc).__name__.lower()
    code = "timeout" if timeout else "disconnected"
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return ApiError(0, code, f"no answer after {attempts} attempt(s) ({what})")
