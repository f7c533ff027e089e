"""The HTTP API for backends: publish, broadcast, history, channels, health. See docs/http-api.md."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from ..auth import Identity, TokenError, find_api_key
from ..backends.base import BrokerError, PublishRequest, PublishResult, Repeat
from ..config import Settings
from ..limits import client_ip
from ..metrics import metrics_response
from ..node import NODE, Node
from ..policy import Session
from ..protocol import HTTP_STATUS, ErrorCode, ProtocolError, Publication, StreamPosition
from ..protocol.messages import MAX_HISTORY_LIMIT
from ..stats import DEFAULT_CHANNELS, MAX_CHANNELS, MAX_QUERY, snapshot

__all__ = ["ApiError", "api_routes", "error_middleware"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BATCH = 1000  # channels in a broadcast, publications in a batch
MAX_LOGGED_PATH = 300  # characters of a path kept in the recent errors
log = logging.getLogger("tidings.api")


class ApiError(Exception):
    def __init__(
        self, code: ErrorCode, message: str, status: int | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or HTTP_STATUS[code]
        self.headers = headers or {}


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def error_response(code: ErrorCode, message: str, status: int | None = None) -> web.Response:
    return json_response({"error": {"code": str(code), "message": message}}, status or HTTP_STATUS[code])


_STATUS_CODES = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.PERMISSION_DENIED,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.BAD_REQUEST,
    413: ErrorCode.MESSAGE_TOO_LARGE,
    429: ErrorCode.RATE_LIMITED,
}


JSON_ERROR_PATHS = frozenset({"/sse", "/stream", "/poll"})  # besides /api/: JSON errors there too


def _json_errors(path: str) -> bool:
    return path.startswith("/api/") or path in JSON_ERROR_PATHS


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every /api/ error (and every /sse, /stream, /poll one) is JSON with a stable code, counted in
    ``tidings_errors_total{code}`` and kept in the node's ring of recent errors (GET /api/stats)."""
    try:
        return await handler(request)
    except ApiError as exc:
        resp = _failed(request, exc.code, exc.message, exc.status)
        resp.headers.update(exc.headers)
        return resp
    except ProtocolError as exc:
        return _failed(request, exc.code, exc.message)
    except BrokerError as exc:
        return _failed(request, ErrorCode.UNAVAILABLE, str(exc))
    except web.HTTPException as exc:
        if not _json_errors(request.path) or exc.status < 400:
            raise
        code = _STATUS_CODES.get(
            exc.status, ErrorCode.INTERNAL if exc.status >= 500 else ErrorCode.BAD_REQUEST
        )
        return _failed(request, code, exc.reason, exc.status)
    except Exception:
        if not _json_errors(request.path):
            raise
        log.exception("API request failed: %s %s", request.method, request.path)
        return _failed(request, ErrorCode.INTERNAL, "internal error")


def _failed(request: web.Request, code: ErrorCode, message: str, status: int | None = None) -> web.Response:
    resp = error_response(code, message, status)
    node = request.app[NODE]
    node.counters.error(str(code))
    node.errors.add(
        source="http",
        code=str(code),
        message=message,
        status=resp.status,
        request=f"{request.method} {request.path[:MAX_LOGGED_PATH]}",  # no query string: ?token=
    )
    return resp


def _node(request: web.Request) -> Node:
    return request.app[NODE]


def refuse_if_blocked(node: Node, ip: str, what: str) -> None:
    """429 for an address that failed to authenticate too often lately (API keys or tokens)."""
    wait = node.auth_failures.blocked_for(ip)
    if wait > 0:
        raise ApiError(
            ErrorCode.RATE_LIMITED,
            f"too many failed {what} from this address",
            headers={"Retry-After": str(int(wait) + 1)},
        )


def client_session(request: web.Request, node: Node, *, query_token: bool) -> Session:
    """A receiving client's HTTP request (``/sse``, ``/stream``, ``/poll``, ``/push/…``) as the policy
    gate sees it, the same way as a ``/ws`` connection: an address blocked for failed authentications
    gets 429, its command budget is spent, and its connection token (``Authorization: Bearer``, or
    ``?token=`` where ``query_token``: what an ``EventSource`` can send) is verified; a bad one counts
    against the address. No token: anonymous (the namespace rules decide)."""
    ip = client_ip(request, node.trusted_proxies)
    refuse_if_blocked(node, ip, "authentications")
    session = Session(node.policy, ip, connection=False)
    if not session.take():
        raise ApiError(ErrorCode.RATE_LIMITED, "too many requests; slow down", headers={"Retry-After": "1"})
    header = request.headers.get("Authorization")
    token = request.query.get("token") if query_token else None
    if header is not None:
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(ErrorCode.UNAUTHORIZED, "Authorization must be 'Bearer <connection token>'")
        token = given.strip()
    if token is not None:
        try:
            session.authenticate(token)
        except TokenError as exc:
            node.auth_failures.fail(ip)
            raise ApiError(exc.code, exc.message) from None
    return session


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object (400 ``bad_request`` otherwise)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(ErrorCode.BAD_REQUEST, f"invalid JSON: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise ApiError(ErrorCode.BAD_REQUEST, "the body must be a JSON object")
    return obj


def _check_key(request: web.Request, role: str) -> Identity:
    """The backend holding a bearer API key with ``role`` (or admin), as the policy gate's identity.
    Addresses that keep failing get 429 for a while."""
    node = _node(request)
    ip = client_ip(request, node.trusted_proxies)
    refuse_if_blocked(node, ip, "API key attempts")
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    key = find_api_key(node.settings.api_keys, given.strip()) if scheme.lower() == "bearer" else None
    if key is None:
        node.auth_failures.fail(ip)
        raise ApiError(ErrorCode.UNAUTHORIZED, "send Authorization: Bearer <a valid API key>")
    if not key.may(role):
        raise ApiError(ErrorCode.PERMISSION_DENIED, f"API key {key.name!r} may not {role}")
    return Identity(api_key=key)


async def _json_body(request: web.Request) -> dict[str, Any]:
    return json_object(await request.read())


def _pub_result(pub: Publication | Repeat) -> dict[str, Any]:
    return {"offset": pub.offset, "epoch": pub.epoch, "id": pub.id}


def _info(body: dict[str, Any]) -> Any:
    """A request-level ``info`` of the wrong type fails the whole request (400), not each entry."""
    info = body.get("info")
    if info is not None and not isinstance(info, dict):
        raise ApiError(ErrorCode.INVALID_FIELD, "info must be an object")
    return info


async def publish(request: web.Request) -> web.Response:
    started = time.perf_counter()
    identity = _check_key(request, "publish")
    body = await _json_body(request)
    if "data" not in body:
        raise ApiError(ErrorCode.INVALID_FIELD, "data is required")
    node = _node(request)
    req = node.policy.publication(
        identity, body.get("channel"), body["data"], info=body.get("info"), key=body.get("idempotency_key")
    )
    [pub] = await node.publish([req], source="http", started=started)
    return json_response(_pub_result(pub))


async def _publish_many(
    node: Node, identity: Identity, items: list[tuple[Any, Any, Any, Any]], started: float
) -> list[dict[str, Any]]:
    """Publish (channel, data, info, idempotency_key) items as one group (one queue item, one
    transaction); one result per item, in order: the publication's position, or the error for that item
    alone."""

    def error(ch: Any, code: ErrorCode, message: str) -> dict[str, Any]:
        return {"channel": ch, "error": {"code": str(code), "message": message}}

    results: list[dict[str, Any]] = []
    reqs: list[PublishRequest] = []
    slots: list[int] = []  # where each request's result goes
    for ch, data, info, key in items:
        try:
            reqs.append(node.policy.publication(identity, ch, data, info=info, key=key))
        except ProtocolError as exc:
            results.append(error(ch, exc.code, exc.message))
            continue
        slots.append(len(results))
        results.append({})
    if reqs:
        outcome: PublishResult | BrokerError
        try:
            outcome = await node.publish(reqs, source="http", started=started)
        except BrokerError as exc:
            outcome = exc
        for i, (slot, req) in enumerate(zip(slots, reqs, strict=True)):
            if isinstance(outcome, BrokerError):
                results[slot] = error(req.channel, ErrorCode.UNAVAILABLE, str(outcome))
            else:
                results[slot] = {"channel": req.channel, **_pub_result(outcome[i])}
    return results


async def broadcast(request: web.Request) -> web.Response:
    started = time.perf_counter()
    identity = _check_key(request, "publish")
    body = await _json_body(request)
    channels = body.get("channels")
    if not isinstance(channels, list) or not channels or len(channels) > MAX_BATCH:
        raise ApiError(ErrorCode.INVALID_FIELD, f"channels must be a list of 1 to {MAX_BATCH} names")
    if "data" not in body:
        raise ApiError(ErrorCode.INVALID_FIELD, "data is required")
    info = _info(body)
    key = body.get("idempotency_key")  # one key, remembered on each channel
    items = [(ch, body["data"], info, key) for ch in channels]
    results = await _publish_many(_node(request), identity, items, started)
    return json_response({"results": results})


async def batch(request: web.Request) -> web.Response:
    """Many publications in one request:
    ``{"publications": [{"channel", "data", "info"?, "idempotency_key"?}, ...]}``."""
    started = time.perf_counter()
    identity = _check_key(request, "publish")
    body = await _json_body(request)
    pubs = body.get("publications")
    if not isinstance(pubs, list) or not pubs or len(pubs) > MAX_BATCH:
        raise ApiError(ErrorCode.INVALID_FIELD, f"publications must be a list of 1 to {MAX_BATCH} objects")
    items: list[tuple[Any, Any, Any, Any]] = []
    for i, p in enumerate(pubs):
        if not isinstance(p, dict) or "data" not in p:
            raise ApiError(
                ErrorCode.INVALID_FIELD, f"publications[{i}] must be an object with channel and data"
            )
        items.append((p.get("channel"), p["data"], _info(p), p.get("idempotency_key")))
    return json_response({"results": await _publish_many(_node(request), identity, items, started)})


def _int_param(request: web.Request, name: str, lo: int, hi: int) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(ErrorCode.INVALID_FIELD, f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise ApiError(ErrorCode.INVALID_FIELD, f"{name} must be between {lo} and {hi}")
    return value


async def history(request: web.Request) -> web.Response:
    identity = _check_key(request, "read")
    channel = request.match_info["channel"]
    node = _node(request)
    ns = node.policy.authorize(identity, channel, "history")
    limit = _int_param(request, "limit", 1, MAX_HISTORY_LIMIT)
    since_off = _int_param(request, "since", 0, 2**63 - 1)
    epoch = request.query.get("epoch") or None  # an empty value counts as absent
    if since_off is None and epoch is not None:
        raise ApiError(ErrorCode.INVALID_FIELD, "epoch goes with since")
    since = None
    if since_off is not None:
        if epoch is None:  # no epoch given: the offset is taken in the channel's current epoch
            epoch = (await node.subscriptions.read(channel, ns.history, limit=0)).position.epoch
        since = StreamPosition(since_off, epoch)
    res, recovered = await node.subscriptions.history(channel, ns, since, limit)
    out: dict[str, Any] = {
        "publications": [p.wire_json() for p in res.publications],
        **res.position.to_json(),
    }
    if recovered is not None:
        out["recovered"] = recovered
    return json_response(out)


async def presence_api(request: web.Request) -> web.Response:
    identity = _check_key(request, "read")
    channel = request.match_info["channel"]
    node = _node(request)
    ns = node.policy.authorize(identity, channel, "presence")
    if not ns.presence:
        raise ApiError(ErrorCode.NOT_AVAILABLE, f"presence is off in namespace {ns.name!r}")
    found = await node.presence.read(channel)
    return json_response({"clients": found.clients, "count": found.count})


async def channels(request: web.Request) -> web.Response:
    _check_key(request, "read")
    found = await _node(request).presence.channels()  # over every node that shares the presence
    return json_response({"channels": [{"channel": ch, "subscribers": n} for ch, n in found.items()]})


async def stats(request: web.Request) -> web.Response:
    """This process's counters, busiest channels and recent events (docs/admin.md); a read key."""
    _check_key(request, "read")
    limit = _int_param(request, "limit", 1, MAX_CHANNELS)
    query = request.query.get("q", "")
    if len(query) > MAX_QUERY:
        raise ApiError(ErrorCode.INVALID_FIELD, f"q must be at most {MAX_QUERY} characters")
    body = await snapshot(_node(request), DEFAULT_CHANNELS if limit is None else limit, query)
    resp = json_response(body)
    resp.headers["Cache-Control"] = "no-store"
    return resp


async def healthz(request: web.Request) -> web.Response:
    node = _node(request)
    # pid: which process answered (with --workers, which worker this connection landed on)
    return json_response({"status": "ok", "connections": len(node.connections), "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    reason = await _node(request).unready_reason()
    if reason is None:
        return json_response({"status": "ready"})
    return json_response({"status": "unavailable", "reason": reason}, status=503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format (``tidings.metrics``), for a ``read`` or ``admin`` key."""
    _check_key(request, "read")
    return await metrics_response(_node(request))


def api_routes(settings: Settings | None = None) -> list[web.RouteDef]:
    extra = [web.get("/metrics", metrics)] if settings is None or settings.metrics else []
    return [
        *extra,
        web.post("/api/publish", publish),
        web.post("/api/broadcast", broadcast),
        web.post("/api/batch", batch),
        web.get("/api/channels", channels),
        web.get("/api/stats", stats),
        web.get(r"/api/channels/{channel:.+}/history", history),
        web.get(r"/api/channels/{channel:.+}/presence", presence_api),
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
    ]
