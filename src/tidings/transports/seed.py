"""The original Tornado chat demo, wire-compatible: ``/websocket`` (echo) and ``/chatsocket``.

``/chatsocket`` speaks the demo's own protocol: a client sends ``{"body": "..."}``; every client receives
``{"id", "body", "html"}``. It is a bridge onto the hub's channel ``chat:lobby``, so messages from ``/ws``,
the HTTP API and ``/chatsocket`` meet in one room. Each publication is rendered and framed once for all
chatsocket clients.
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from ..backends.base import BrokerError
from ..node import NODE, Node
from ..protocol import CLOSE_REASONS, CloseCode, ProtocolError, Publication, text_frame
from .flush import FLUSHER, Flusher
from .origin import origin_allowed

__all__ = ["CHAT_CHANNEL", "ChatBridge", "chat_body", "chatsocket_handler", "echo_handler", "linkify"]

log = logging.getLogger("tidings.seed")

CHAT_CHANNEL = "chat:lobby"
_URL_RE = re.compile(r"\bhttps?://[^\s<>\"']+", re.IGNORECASE)


def linkify(text: str) -> str:
    """HTML-escape ``text`` and make http(s) URLs clickable; nothing else becomes markup."""
    out: list[str] = []
    pos = 0
    for m in _URL_RE.finditer(text):
        url = m.group(0).rstrip(".,;:!?)")
        end = m.start() + len(url)
        out.append(html.escape(text[pos : m.start()]))
        href = html.escape(url, quote=True)
        out.append(f'<a href="{href}" rel="nofollow noopener noreferrer" target="_blank">{href}</a>')
        pos = end
    out.append(html.escape(text[pos:]))
    return "".join(out)


def chat_body(data: Any) -> str:
    """The text of a chat publication: ``data.body`` (the demo's shape), a plain string, or JSON."""
    if isinstance(data, dict) and isinstance(data.get("body"), str):
        return str(data["body"])
    if isinstance(data, str):
        return data
    return orjson.dumps(data).decode()


def demo_message(pub: Publication) -> dict[str, str]:
    body = chat_body(pub.data)
    return {
        "id": pub.id,
        "body": body,
        "html": f'<div class="message" id="m{html.escape(pub.id, quote=True)}">{linkify(body)}</div>',
    }


class _ChatClient:
    __slots__ = ("close_task", "flusher", "pending", "pending_bytes", "transport", "ws")

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, flusher: Flusher) -> None:
        self.ws = ws
        self.transport = request.transport
        self.flusher = flusher
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.close_task: asyncio.Task[bool] | None = None

    def offer(self, frame: bytes, limit: int) -> bool:
        t = self.transport
        if t is None or t.is_closing():
            return False
        size = self.pending_bytes + len(frame)
        if t.get_write_buffer_size() + size > limit:
            return False
        if not self.pending:
            self.flusher.mark(self)
        self.pending.append(frame)
        self.pending_bytes = size
        return True

    def flush(self) -> None:
        data = b"".join(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close_slow(self) -> None:
        """Cut off a reader that fell behind: close 4008, and abort if it does not take the close frame."""
        code = CloseCode.SLOW_CONSUMER
        self.close_task = asyncio.get_running_loop().create_task(
            self.ws.close(code=int(code), message=CLOSE_REASONS[code].encode())
        )
        transport = self.transport
        if transport is not None:
            asyncio.get_running_loop().call_later(5.0, transport.abort)


class ChatBridge:
    """Every /chatsocket client of this node, fed from the hub's chat:lobby."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.clients: set[_ChatClient] = set()

    def add(self, client: _ChatClient) -> None:
        if not self.clients:
            self.node.hub.add_listener(CHAT_CHANNEL, self.on_publication)
        self.clients.add(client)

    def remove(self, client: _ChatClient) -> None:
        self.clients.discard(client)
        if not self.clients:
            self.node.hub.remove_listener(CHAT_CHANNEL, self.on_publication)

    def on_publication(self, pub: Publication) -> None:
        frame = text_frame(orjson.dumps(demo_message(pub)))
        limit = self.node.settings.max_buffer
        for c in list(self.clients):
            if not c.offer(frame, limit):
                self.remove(c)
                c.close_slow()


CHAT_BRIDGE = web.AppKey("tidings.chat_bridge", ChatBridge)


async def _prepare(request: web.Request) -> web.WebSocketResponse:
    node = request.app[NODE]
    if not origin_allowed(request, node.settings.allowed_origins):
        raise web.HTTPForbidden(text="cross-origin WebSocket refused\n")
    ws = web.WebSocketResponse(
        max_msg_size=node.settings.max_message_size,
        heartbeat=node.settings.ping_interval or None,
    )
    await ws.prepare(request)
    return ws


async def echo_handler(request: web.Request) -> web.StreamResponse:
    """``/websocket``: every text frame comes back as ``You said: <text>``."""
    ws = await _prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str("You said: " + msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.close(code=int(CloseCode.UNSUPPORTED_DATA), message=b"binary frames are not supported")
            break
    return ws


async def chatsocket_handler(request: web.Request) -> web.StreamResponse:
    """``/chatsocket``: the original demo's chat protocol on the hub's ``chat:lobby``."""
    ws = await _prepare(request)
    node = request.app[NODE]
    bridge = request.app[CHAT_BRIDGE]
    client = _ChatClient(ws, request, request.app[FLUSHER])
    bridge.add(client)
    ns = node.settings.namespace_for(CHAT_CHANNEL)
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                await ws.close(
                    code=int(CloseCode.UNSUPPORTED_DATA), message=b"binary frames are not supported"
                )
                break
            if msg.type != WSMsgType.TEXT:
                break
            try:
                obj = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                continue  # the demo ignored what it could not parse; so do we (and log it)
            if not isinstance(obj, dict) or not isinstance(obj.get("body"), str) or ns is None:
                log.info("chatsocket: ignored a message without a string body")
                continue
            try:
                await node.publish(CHAT_CHANNEL, {"body": obj["body"]}, ns)
            except (ProtocolError, BrokerError) as exc:
                log.info("chatsocket: message refused: %s", exc)
    finally:
        bridge.remove(client)
    return ws
