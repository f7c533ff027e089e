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
from aiohttp import web

from ..node import Node
from ..protocol import ProtocolError, Publication, deflate_payload, text_frame
from ..protocol.frames import OP_BINARY, OP_TEXT, data_frame
from .flush import Flusher
from .wsbase import WsProtocol, upgrade

__all__ = [
    "CHAT_BRIDGE",
    "CHAT_CHANNEL",
    "ChatBridge",
    "ChatSocket",
    "EchoSocket",
    "chat_body",
    "chatsocket_handler",
    "echo_handler",
    "linkify",
]

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


class ChatSocket(WsProtocol):
    """A /chatsocket client: the demo's ``{"body"}`` in, the bridge's ``{"id", "body", "html"}`` out."""

    __slots__ = ("bridge",)

    def __init__(
        self, node: Node, transport: asyncio.Transport, ip: str, flusher: Flusher, deflate: bool = False
    ) -> None:
        super().__init__(node, transport, ip, flusher, deflate)
        self.bridge: ChatBridge | None = None

    def start(self, tail: bytes, request: web.Request) -> None:
        self.bridge = request.app[CHAT_BRIDGE]
        self.bridge.add(self)
        super().start(tail, request)

    def detach(self) -> None:
        if self.bridge is not None:
            self.bridge.remove(self)
            self.bridge = None

    def on_text(self, payload: bytes) -> None:
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            obj = None
        ns = self.node.settings.namespace_for(CHAT_CHANNEL)
        if not isinstance(obj, dict) or not isinstance(obj.get("body"), str) or ns is None:
            log.info("chatsocket: ignored a message without a string body")  # the demo ignored them too
            return
        try:
            fut = self.node.publish(CHAT_CHANNEL, {"body": obj["body"]}, ns)
        except ProtocolError as exc:
            log.info("chatsocket: message refused: %s", exc)
            return
        fut.add_done_callback(_log_failure)


def _log_failure(fut: asyncio.Future[Publication]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.info("chatsocket: message not stored: %s", fut.exception())


class ChatBridge:
    """Every /chatsocket client of this node, fed from the hub's chat:lobby: each publication is rendered
    and framed once for all of them."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.clients: set[ChatSocket] = set()

    def add(self, client: ChatSocket) -> None:
        if not self.clients:
            self.node.hub.add_listener(CHAT_CHANNEL, self.on_publication)
        self.clients.add(client)

    def remove(self, client: ChatSocket) -> None:
        self.clients.discard(client)
        if not self.clients:
            self.node.hub.remove_listener(CHAT_CHANNEL, self.on_publication)

    def on_publication(self, pub: Publication) -> None:
        frame = text_frame(orjson.dumps(demo_message(pub)))
        for c in list(self.clients):
            c.offer(frame)  # a client that cannot keep up is closed (4008) and leaves the bridge


CHAT_BRIDGE = web.AppKey("tidings.chat_bridge", ChatBridge)


class EchoSocket(WsProtocol):
    """/websocket: every text frame comes back as ``You said: <text>``; with ``echo_raw``, every text and
    binary message comes back verbatim (for the Autobahn conformance suite).

    On a compressed connection every reply is compressed too, so what goes out stays about as large as
    what came in (an 81-byte frame that inflates to 64 KiB is answered with about 81 bytes, not 64 KiB)."""

    __slots__ = ()

    def _echo(self, opcode: int, payload: bytes) -> None:
        if self.deflate:
            self.offer(data_frame(opcode, deflate_payload(payload), compressed=True))
        else:
            self.offer(data_frame(opcode, payload))

    def on_text(self, payload: bytes) -> None:
        self._echo(OP_TEXT, payload if self.node.settings.echo_raw else b"You said: " + payload)

    def on_binary(self, payload: bytes) -> None:
        if self.node.settings.echo_raw:
            self._echo(OP_BINARY, payload)
        else:
            super().on_binary(payload)  # the demo is text only: 1003


async def echo_handler(request: web.Request) -> web.StreamResponse:
    return await upgrade(request, EchoSocket)


async def chatsocket_handler(request: web.Request) -> web.StreamResponse:
    """``/chatsocket``: the original demo's chat protocol on the hub's ``chat:lobby``."""
    return await upgrade(request, ChatSocket)
