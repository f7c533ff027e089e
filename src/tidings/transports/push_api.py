"""Web Push endpoints (docs/http-api.md, "Web Push"): the VAPID public key, device registration and
unregistration through the policy gate, and the push counters for backends."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from ..backends.base import PushDevice, PushLimitError
from ..node import NODE, Node
from ..policy import Session
from ..protocol import ErrorCode
from ..push.guard import EndpointRefused
from .http_api import ApiError, _check_key, client_session, json_object, json_response

__all__ = ["MAX_PUSH_BODY", "push_routes"]

MAX_PUSH_BODY = 16 << 10  # bytes of a registration request
_B64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")


def _push(request: web.Request) -> Node:
    node = request.app[NODE]
    if node.push.vapid is None:
        raise ApiError(ErrorCode.NOT_AVAILABLE, "Web Push is off on this server (no namespace has push)")
    return node


async def vapid_public_key(request: web.Request) -> web.Response:
    node = _push(request)
    assert node.push.vapid is not None
    return json_response({"publicKey": node.push.vapid.public_key})


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_PUSH_BODY:
        raise ApiError(ErrorCode.MESSAGE_TOO_LARGE, f"the body is above {MAX_PUSH_BODY} bytes")
    raw = bytearray()
    async for chunk in request.content.iter_chunked(8192):
        raw += chunk
        if len(raw) > MAX_PUSH_BODY:
            raise ApiError(ErrorCode.MESSAGE_TOO_LARGE, f"the body is above {MAX_PUSH_BODY} bytes")
    return json_object(bytes(raw))


def _session(request: web.Request, node: Node) -> Session:
    """The client as the policy gate sees it: anonymous, or the user of ``Authorization: Bearer
    <connection token>`` (never ``?token=``: a registration is no EventSource)."""
    return client_session(request, node, query_token=False)


def _key(keys: dict[str, Any], name: str, size: int) -> str:
    value = keys.get(name)
    if not isinstance(value, str) or len(value) > 200 or not _B64URL.fullmatch(value):
        raise ApiError(ErrorCode.INVALID_FIELD, f"subscription.keys.{name} must be base64url")
    try:
        raw = base64.urlsafe_b64decode(value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4))
    except (binascii.Error, ValueError):
        raise ApiError(ErrorCode.INVALID_FIELD, f"subscription.keys.{name} must be base64url") from None
    if len(raw) != size:
        raise ApiError(ErrorCode.INVALID_FIELD, f"subscription.keys.{name} must be {size} bytes")
    if name == "p256dh":
        try:
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
        except ValueError:
            raise ApiError(
                ErrorCode.INVALID_FIELD, "subscription.keys.p256dh is not an uncompressed P-256 point"
            ) from None
    return value.rstrip("=")


async def _endpoint(node: Node, value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise ApiError(ErrorCode.INVALID_FIELD, f"{field} must be the push service URL")
    try:
        await node.push.guard.check(value)
    except EndpointRefused as exc:
        raise ApiError(ErrorCode.INVALID_FIELD, f"{field} refused: {exc}") from None
    return value


async def register(request: web.Request) -> web.Response:
    """``{"subscription": <PushSubscription.toJSON()>, "channels": [...]}``: this device gets a push for
    every publication in those channels, as long as it is registered."""
    node = _push(request)
    session = _session(request, node)
    body = await _body(request)
    sub = body.get("subscription")
    if not isinstance(sub, dict):
        raise ApiError(ErrorCode.INVALID_FIELD, "subscription must be an object (PushSubscription.toJSON())")
    keys = sub.get("keys")
    if not isinstance(keys, dict):
        raise ApiError(ErrorCode.INVALID_FIELD, "subscription.keys must be an object with p256dh and auth")
    exp = sub.get("expirationTime")
    if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int | float)):
        raise ApiError(ErrorCode.INVALID_FIELD, "subscription.expirationTime must be null or a number")
    p256dh = _key(keys, "p256dh", 65)
    auth = _key(keys, "auth", 16)
    channels = body.get("channels")
    limit = node.settings.push_max_channels
    if not isinstance(channels, list) or not 1 <= len(channels) <= limit:
        raise ApiError(ErrorCode.INVALID_FIELD, f"channels must be a list of 1 to {limit} channel names")
    wanted = list(dict.fromkeys(channels)) if all(isinstance(c, str) for c in channels) else channels
    for ch in wanted:
        ns = session.authorize(ch, "subscribe")  # the same rules as a /ws subscribe
        if not ns.push:
            raise ApiError(ErrorCode.NOT_AVAILABLE, f"push is off in namespace {ns.name!r}")
    endpoint = await _endpoint(node, sub.get("endpoint"), "subscription.endpoint")
    user = session.user
    owner = f"user:{user}" if user else f"ip:{session.ip}"
    device = PushDevice(endpoint, p256dh, auth, owner, user, tuple(wanted))
    old = await node.push.store.get(endpoint)
    if old is not None and old.user and old.user != user:
        raise ApiError(ErrorCode.PERMISSION_DENIED, "this device is registered by another user")
    try:
        await node.push.store.add(
            device,
            max_per_owner=node.settings.push_max_subscriptions_per_user,
            max_total=node.settings.push_max_subscriptions,
        )
    except PushLimitError as exc:
        raise ApiError(ErrorCode.TOO_MANY_SUBSCRIPTIONS, str(exc)) from None
    return json_response({"endpoint": endpoint, "channels": list(wanted)}, status=201)


async def unregister(request: web.Request) -> web.Response:
    """``{"endpoint": ...}`` (or ``{"subscription": {"endpoint": ...}}``): the device gets no more pushes.
    A device registered by a user can be removed only with that user's token."""
    node = _push(request)
    session = _session(request, node)
    body = await _body(request)
    value = body.get("endpoint")
    if value is None and isinstance(body.get("subscription"), dict):
        value = body["subscription"].get("endpoint")
    if not isinstance(value, str) or not value or len(value) > 2048:
        raise ApiError(ErrorCode.INVALID_FIELD, "endpoint must be the push service URL of the device")
    dev = await node.push.store.get(value)
    if dev is None:
        raise ApiError(ErrorCode.NOT_FOUND, "no device is registered with this endpoint")
    if dev.user and dev.user != session.user:
        raise ApiError(ErrorCode.PERMISSION_DENIED, "this device belongs to another user")
    await node.push.store.remove(value)
    return json_response({"endpoint": value, "removed": True})


async def push_stats(request: web.Request) -> web.Response:
    """The push counters of this process (an API key with the read role)."""
    _check_key(request, "read")
    push = request.app[NODE].push
    return json_response({**push.stats.to_json(), "queued": push.queued})


def push_routes() -> list[web.RouteDef]:
    return [
        web.get("/push/vapid-public-key", vapid_public_key),
        web.post("/push/subscriptions", register),
        web.delete("/push/subscriptions", unregister),
        web.get("/api/push/stats", push_stats),
    ]
