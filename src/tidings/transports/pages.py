"""The chat page: ``/`` (room lobby) and ``/chat/{room}``, server-rendered, then live over /ws (tidings.js).

Security: strict Content-Security-Policy (no inline script or style), XSRF double-submit token for the
form POST fallback, autoescaping templates.
"""

from __future__ import annotations

import hmac
import re
import secrets
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from ..backends.base import BrokerError
from ..limits import client_ip
from ..node import NODE
from ..policy import Session
from ..protocol import HTTP_STATUS, ProtocolError
from .seed import chat_body

__all__ = ["WEB_DIR", "page_routes", "security_headers"]

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
ROOM_RE = re.compile(r"[A-Za-z0-9_\-.]{1,64}")
XSRF_COOKIE = "_xsrf"
MAX_NICK = 32  # the same rule as chat.js: trimmed, at most 32 characters
MAX_BODY_CHARS = 4000
PAGE_HISTORY = 100

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
)

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(WEB_DIR / "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
)


@web.middleware
async def security_headers(request: web.Request, handler: Any) -> web.StreamResponse:
    resp: web.StreamResponse = await handler(request)
    if not request.path.startswith(("/ws", "/chatsocket", "/websocket")):
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        resp.headers.setdefault("X-Frame-Options", "DENY")
    return resp


def nick_of(value: object) -> str:
    """A nickname as the page shows it: trimmed, at most MAX_NICK characters."""
    return str(value).strip()[:MAX_NICK]


def _room(request: web.Request) -> str:
    room = request.match_info.get("room", "lobby")
    if not ROOM_RE.fullmatch(room):
        raise web.HTTPNotFound(text="no such room: room names are 1-64 letters, digits, _ - .\n")
    return room


def _xsrf(request: web.Request) -> tuple[str, bool]:
    token = request.cookies.get(XSRF_COOKIE, "")
    if re.fullmatch(r"[A-Za-z0-9_\-]{32,64}", token):
        return token, False
    return secrets.token_urlsafe(24), True


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
    res = await node.broker.history(channel, ns.history, limit=PAGE_HISTORY)
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
        resp.set_cookie(XSRF_COOKIE, token, httponly=True, samesite="Strict", path="/")
    return resp


async def post_message(request: web.Request) -> web.StreamResponse:
    """The no-JavaScript fallback: a form POST, protected by the XSRF double-submit token."""
    room = _room(request)
    form = await request.post()
    cookie = request.cookies.get(XSRF_COOKIE, "")
    sent = form.get("_xsrf")
    if not cookie or not isinstance(sent, str) or not hmac.compare_digest(cookie.encode(), sent.encode()):
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
        await node.publish([req])
    except ProtocolError as exc:
        return _refused(exc)
    except BrokerError as exc:
        raise web.HTTPServiceUnavailable(text=str(exc)) from None
    raise web.HTTPSeeOther(location="/" if room == "lobby" else f"/chat/{room}")


def page_routes() -> list[web.AbstractRouteDef]:
    return [
        web.get("/", chat_page),
        web.get("/chat/{room}", chat_page),
        web.post("/chat/{room}/messages", post_message),
        web.static("/static", WEB_DIR / "static", append_version=False),
    ]
