"""The chat page: ``/`` (room lobby) and ``/chat/{room}``, server-rendered, then live over /ws (tidings.js);
and the admin page ``/admin`` (a static shell over ``GET /api/stats``, docs/admin.md).

Security: strict Content-Security-Policy (no inline script or style) and the other security headers on
every response (errors too), autoescaping templates, and for the form POST fallback: the ``Origin`` (or
``Referer``) must be the page's own origin, and a signed XSRF double-submit token (cookie ``__Host-xsrf``
with ``Secure`` over HTTPS, ``_xsrf`` over plain HTTP) must come back in the form.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import weakref
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from ..backends.base import BrokerError
from ..limits import client_ip
from ..node import NODE, Node
from ..policy import Session
from ..protocol import HTTP_STATUS, ProtocolError
from .origin import check_origin, log_refusal, request_scheme
from .seed import chat_body

__all__ = ["WEB_DIR", "page_routes", "security_headers"]

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
ROOM_RE = re.compile(r"[A-Za-z0-9_\-.]{1,64}")
XSRF_COOKIE = "_xsrf"  # over plain HTTP
XSRF_COOKIE_SECURE = "__Host-xsrf"  # over HTTPS: Secure, Path=/, no Domain, so no subdomain can set it
XSRF_FIELD = "_xsrf"
SERVER_NAME = "tidings"  # the Server header: no versions
MAX_NICK = 32  # the same rule as chat.js: trimmed, at most 32 characters
MAX_BODY_CHARS = 4000
PAGE_HISTORY = 100

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; worker-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; "
    "object-src 'none'"
)

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(WEB_DIR / "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
)


SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


def add_security_headers(headers: Any) -> None:
    """The headers every HTTP response carries (set unless a handler set its own)."""
    for name, value in SECURITY_HEADERS.items():
        headers.setdefault(name, value)
    headers["Server"] = SERVER_NAME


@web.middleware
async def security_headers(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        resp: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:  # 403, 404, 413, redirects …: raised, not returned
        add_security_headers(exc.headers)
        raise
    add_security_headers(resp.headers)
    return resp


def nick_of(value: object) -> str:
    """A nickname as the page shows it: trimmed, at most MAX_NICK characters."""
    return str(value).strip()[:MAX_NICK]


def _room(request: web.Request) -> str:
    room = request.match_info.get("room", "lobby")
    if not ROOM_RE.fullmatch(room):
        raise web.HTTPNotFound(text="no such room: room names are 1-64 letters, digits, _ - .\n")
    return room


_xsrf_keys: weakref.WeakKeyDictionary[Node, bytes] = weakref.WeakKeyDictionary()


def _xsrf_key(node: Node) -> bytes:
    """The HMAC key of XSRF tokens: derived from the API keys (so tokens survive restarts and hold on every
    node with the same keys; rotating the keys invalidates open forms), random per process without keys."""
    key = _xsrf_keys.get(node)
    if key is None:
        keys = sorted(k.key for k in node.settings.api_keys)
        material = "\0".join(keys).encode() if keys else secrets.token_bytes(32)
        key = _xsrf_keys[node] = hmac.new(material, b"tidings xsrf v1", hashlib.sha256).digest()
    return key


def _sign(node: Node, nonce: str) -> str:
    mac = hmac.new(_xsrf_key(node), nonce.encode(), hashlib.sha256).digest()[:18]
    return base64.urlsafe_b64encode(mac).decode()


def _valid_xsrf(node: Node, token: str) -> bool:
    """A token this server issued: ``<nonce>.<hmac>``; a value the client made up fails."""
    nonce, dot, sig = token.partition(".")
    if not dot or not re.fullmatch(r"[A-Za-z0-9_\-]{32}", nonce):
        return False
    return hmac.compare_digest(sig.encode(), _sign(node, nonce).encode())


def _xsrf_cookie_name(request: web.Request) -> str:
    return XSRF_COOKIE_SECURE if request_scheme(request) == "https" else XSRF_COOKIE


def _xsrf(request: web.Request) -> tuple[str, bool]:
    node = request.app[NODE]
    token = request.cookies.get(_xsrf_cookie_name(request), "")
    if _valid_xsrf(node, token):
        return token, False
    nonce = secrets.token_urlsafe(24)
    return f"{nonce}.{_sign(node, nonce)}", True


def _set_xsrf_cookie(request: web.Request, resp: web.StreamResponse, token: str) -> None:
    secure = request_scheme(request) == "https"
    name = XSRF_COOKIE_SECURE if secure else XSRF_COOKIE
    resp.set_cookie(name, token, httponly=True, samesite="Strict", path="/", secure=secure or None)


def _form_refused(request: web.Request) -> None:
    """Before the body is read: the form must come from the page's own origin (``Origin``, else
    ``Referer``; neither: not a browser) and carry a valid XSRF cookie; else 403."""
    origin = request.headers.get("Origin")
    if origin is None:
        origin = request.headers.get("Referer")
    if origin is not None:
        reason = check_origin(request, origin)
        if reason:
            log_refusal(request, "form POST", origin, reason)
            raise web.HTTPForbidden(text="cross-origin form POST refused: post from this server's page\n")
    if not _valid_xsrf(request.app[NODE], request.cookies.get(_xsrf_cookie_name(request), "")):
        raise web.HTTPForbidden(text="XSRF token missing or wrong: reload the page and try again\n")


def _session(request: web.Request) -> Session:
    """The page's visitor as the policy gate sees it: anonymous, with its address's command budget."""
    node = request.app[NODE]
    session = Session(node.policy, client_ip(request, node.trusted_proxies), connection=False)
    if not session.take():
        raise web.HTTPTooManyRequests(text="too many requests; slow down\n", headers={"Retry-After": "1"})
    return session


def _refused(exc: ProtocolError) -> web.Response:
    """A gate refusal as the page's HTTP error (the status the HTTP API gives the same code)."""
    return web.Response(status=HTTP_STATUS.get(exc.code, 400), text=exc.message + "\n")


async def chat_page(request: web.Request) -> web.Response:
    """The room, with its last messages rendered by the server: a history read, through the gate."""
    room = _room(request)
    channel = f"chat:{room}"
    node = request.app[NODE]
    session = _session(request)
    try:
        ns = session.authorize(channel, "history")
    except ProtocolError as exc:
        return _refused(exc)
    res = await node.subscriptions.read(channel, ns.history, limit=PAGE_HISTORY)
    messages = [
        {
            "offset": p.offset,
            "id": p.id,
            "time": p.time,
            "nick": nick_of(p.data.get("nick", "")) if isinstance(p.data, dict) else "",
            "body": chat_body(p.data),
        }
        for p in res.publications
    ]
    token, fresh = _xsrf(request)
    text = _env.get_template("chat.html").render(
        room=room,
        channel=channel,
        messages=messages,
        position=res.position.to_json(),
        xsrf_token=token,
        static_url="/static",
    )
    resp = web.Response(text=text, content_type="text/html")
    resp.headers["Cache-Control"] = "no-store"
    if fresh:
        _set_xsrf_cookie(request, resp, token)
    return resp


async def post_message(request: web.Request) -> web.StreamResponse:
    """The no-JavaScript fallback: a form POST, protected by its origin and a signed XSRF token."""
    room = _room(request)
    _form_refused(request)  # before reading the body
    form = await request.post()
    cookie = request.cookies.get(_xsrf_cookie_name(request), "")
    sent = form.get(XSRF_FIELD)
    if not isinstance(sent, str) or not hmac.compare_digest(cookie.encode(), sent.encode()):
        raise web.HTTPForbidden(text="XSRF token missing or wrong: reload the page and try again\n")
    body = form.get("body")
    nick = form.get("nick") or "guest"
    if not isinstance(body, str) or not body.strip() or len(body) > MAX_BODY_CHARS:
        raise web.HTTPBadRequest(text=f"body must be 1-{MAX_BODY_CHARS} characters\n")
    node = request.app[NODE]
    channel = f"chat:{room}"
    session = _session(request)
    try:
        req = session.publication(channel, {"body": body, "nick": nick_of(nick) or "guest"})
        await node.publish([req], source="page")
    except ProtocolError as exc:
        return _refused(exc)
    except BrokerError as exc:
        raise web.HTTPServiceUnavailable(text=str(exc)) from None
    raise web.HTTPSeeOther(location="/" if room == "lobby" else f"/chat/{room}")


async def admin_page(request: web.Request) -> web.Response:
    """``/admin``: the dashboard's shell, the same for everyone. It holds no data and sets no cookie:
    the page asks for an API key and reads everything from ``GET /api/stats`` with it (docs/admin.md)."""
    text = _env.get_template("admin.html").render(static_url="/static")
    resp = web.Response(text=text, content_type="text/html")
    resp.headers["Cache-Control"] = "no-store"
    return resp


async def service_worker(request: web.Request) -> web.StreamResponse:
    """The chat page's service worker (Web Push notifications), at the root so that its scope is ``/``
    (no ``Service-Worker-Allowed`` needed). ``no-cache``: the browser revalidates it on every update check,
    so a new version of the server's worker is picked up at the next page load."""
    return web.FileResponse(
        WEB_DIR / "static" / "sw.js",
        headers={"Content-Type": "text/javascript; charset=utf-8", "Cache-Control": "no-cache"},
    )


def page_routes() -> list[web.AbstractRouteDef]:
    return [
        web.get("/", chat_page),
        web.get("/sw.js", service_worker),
        web.get("/admin", admin_page),
        web.get("/chat/{room}", chat_page),
        web.post("/chat/{room}/messages", post_message),
        web.static("/static", WEB_DIR / "static", append_version=False),
    ]
