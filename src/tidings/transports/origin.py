"""Which origin a request came to, and whether its ``Origin`` may use it (WebSocket upgrades, form POSTs).

The server's own origin is, in this order:

1. ``public_url`` when set (one or a list of ``scheme://host[:port]``): scheme, host and port must match;
   this defeats DNS rebinding (``Host: evil`` with ``Origin: http://evil``), which no Host check can.
2. Else what the client asked for: the scheme (``https`` over TLS) and the ``Host`` header, or, from a
   peer in ``trusted_proxies`` only, ``Forwarded: proto=…;host=…`` (RFC 7239) or ``X-Forwarded-Proto`` /
   ``X-Forwarded-Host`` as the nearest proxy set them. When the server listens on a loopback address and
   no proxy forwarded the request, the host must be a loopback name (``localhost``, ``127.x``, ``[::1]``):
   a web page whose name was rebound to 127.0.0.1 is refused.

Every refusal is logged (at most one line per 10 seconds per reason) with the origin, what was expected,
and the setting that would allow it.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from urllib.parse import urlsplit

from aiohttp import web

from ..limits import in_networks
from ..node import NODE

__all__ = [
    "check_origin",
    "normalize_origin",
    "origin_allowed",
    "own_origins",
    "request_scheme",
]

log = logging.getLogger("tidings.origin")
LOG_EVERY = 10.0  # seconds between two log lines for the same reason
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_last_logged: dict[str, float] = {}


def normalize_origin(value: str) -> str | None:
    """``scheme://host:port`` (lowercase, explicit port) of an origin or URL, or None if it is not one."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS[scheme]}"


def _forwarded(request: web.Request) -> tuple[str | None, str | None]:
    """(proto, host) as the nearest proxy set them: the last ``Forwarded`` element, else the last value
    of ``X-Forwarded-Proto`` / ``X-Forwarded-Host``."""
    fwd = request.headers.getall("Forwarded", [])
    if fwd:
        last = ",".join(fwd).split(",")[-1]
        pairs: dict[str, str] = {}
        for item in last.split(";"):
            key, sep, val = item.strip().partition("=")
            if sep:
                pairs[key.strip().lower()] = val.strip().strip('"')
        return pairs.get("proto"), pairs.get("host")

    def last_of(name: str) -> str | None:
        values = ",".join(request.headers.getall(name, [])).split(",")
        value = values[-1].strip()
        return value or None

    return last_of("X-Forwarded-Proto"), last_of("X-Forwarded-Host")


def _from_trusted_proxy(request: web.Request) -> bool:
    trusted = request.app[NODE].trusted_proxies
    return bool(trusted) and in_networks(request.remote or "", trusted)


def request_scheme(request: web.Request) -> str:
    """``https`` when the client reached us over TLS, directly or through a trusted proxy, else ``http``."""
    if _from_trusted_proxy(request):
        proto, _ = _forwarded(request)
        if proto and proto.lower() in ("http", "https"):
            return proto.lower()
    return "https" if request.secure else "http"


def _is_loopback_name(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def own_origins(request: web.Request) -> tuple[list[str], str]:
    """The origins this request counts as same-origin, and a reason code when none applies."""
    settings = request.app[NODE].settings
    if settings.public_url:
        return [o for o in (normalize_origin(u) for u in settings.public_url) if o], ""
    scheme = request_scheme(request)
    host = request.host
    proxied = _from_trusted_proxy(request)
    if proxied:
        _, fhost = _forwarded(request)
        host = fhost or host
    own = normalize_origin(f"{scheme}://{host}")
    if own is None:
        return [], "bad-host"
    if (
        not proxied
        and _is_loopback_name(settings.host)
        and not _is_loopback_name(urlsplit(own).hostname or "")
    ):
        return [], "host-not-local"
    return [own], ""


def check_origin(request: web.Request, origin: str, allowed: list[str] | None = None) -> str:
    """ "" when ``origin`` is this server's own (or in ``allowed``, where "*" allows all), else a reason."""
    if allowed and ("*" in allowed or origin in allowed):
        return ""
    norm = normalize_origin(origin)
    if allowed and norm is not None and norm in {normalize_origin(a) for a in allowed}:
        return ""
    own, why = own_origins(request)
    if why:
        return why
    if norm is None:
        return "bad-origin"
    return "" if norm in own else "cross-origin"


_HINTS = {
    "cross-origin": "add the origin to allowed_origins (other sites), or set public_url to this server's "
    "public address (behind a proxy: list the proxy in trusted_proxies, pass Host as $http_host)",
    "bad-origin": "the Origin header is not a scheme://host[:port] (a sandboxed or file: page sends null)",
    "bad-host": "the Host header is missing or malformed; set public_url",
    "host-not-local": "the server listens on loopback but the Host is not a loopback name (DNS rebinding, "
    "or a proxy not listed in trusted_proxies); set public_url or trusted_proxies",
}


def log_refusal(request: web.Request, what: str, origin: str, reason: str) -> None:
    """One line per reason per LOG_EVERY seconds: what was refused, the origin, what was expected, the fix."""
    key = f"{what}:{reason}"
    now = time.monotonic()
    if now - _last_logged.get(key, -LOG_EVERY) < LOG_EVERY:
        return
    _last_logged[key] = now
    settings = request.app[NODE].settings
    own, _ = own_origins(request)
    expected = own + [a for a in settings.allowed_origins if what == "WebSocket upgrade"]
    log.warning(
        "%s refused (%s) from %s: Origin %r, expected %s; %s (more refusals for this reason are not "
        "logged for %.0f s)",
        what,
        reason,
        request.remote,
        origin[:200],
        ", ".join(expected) or "nothing (no public_url and no usable Host)",
        _HINTS.get(reason, ""),
        LOG_EVERY,
    )


def origin_allowed(request: web.Request, allowed: list[str]) -> bool:
    """A WebSocket upgrade's Origin: absent (not a browser), in ``allowed`` ("*" allows all), or this
    server's own origin. Refusals are logged (rate-limited)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    reason = check_origin(request, origin, allowed)
    if reason:
        log_refusal(request, "WebSocket upgrade", origin, reason)
        return False
    return True
