"""Web Push (RFC 8030/8291/8292): VAPID keys, SSRF rules for endpoints, and delivery off the publish
path. See docs/devices.md ("Web Push") and docs/security.md."""

from __future__ import annotations

from .guard import EndpointRefused, Guard
from .service import MAX_PAYLOAD, PushService, PushStats, push_payload
from .vapid import Vapid, ensure_vapid_key

__all__ = [
    "MAX_PAYLOAD",
    "EndpointRefused",
    "Guard",
    "PushService",
    "PushStats",
    "Vapid",
    "ensure_vapid_key",
    "push_payload",
]
