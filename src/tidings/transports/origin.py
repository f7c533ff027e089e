"""Cross-origin checks for WebSocket upgrades."""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

__all__ = ["origin_allowed"]


def origin_allowed(request: web.Request, allowed: list[str]) -> bool:
    """Same-origin, no Origin header (not a browser), or an origin in ``allowed`` ("*" allows all)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    if "*" in allowed or origin in allowed:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == request.host.lower()
