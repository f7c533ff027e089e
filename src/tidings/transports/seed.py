"""The original Tornado chat demo, wire-compatible: ``/websocket`` (echo) and ``/chatsocket``.

``/chatsocket`` speaks the demo's own protocol: a client sends ``{"body": "..."}``; every client receives
``{"id", "body", "html"}``. Each client is an ordinary subscriber of ``chat:lobby`` whose wire format is
the demo's, so messages from ``/ws``, the HTTP API and ``/chatsocket`` meet in one room, and each
publication is rendered and framed once for all chatsocket clients (the per-format cache).
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
from typing import Any

import orjson
from aiohttp import web

from ..backends.base import BrokerError, PublishResult
from ..node import Node
from ..protocol import CloseCode, ErrorCode, Event, ProtocolError, Publication, deflate_payload, text_frame
from ..protocol.frames import OP_BINARY, OP_TEXT, data_frame
from ..subscriptions import SubscribeOutcome
from .flush import Flusher
from .wsbase import WsProtocol, upgrade

__all__ = [
    "CHAT_CHANNEL",
    "ChatSocket",
    "EchoSocket",
    "chat_body",
    "chatsocket_handler",
    "demo_frame",
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


def demo_frame(item: Publication | Event) -> bytes | None:
    """The /chatsocket wire format: ``{"id", "body", "html"}`` for a publication; the demo had no
    join/leave events, so those are not sent."""
    if isinstance(item, Event):
        return None
    return text_frame(orjson.dumps(demo_message(item)))


class ChatSocket(WsProtocol):
    """A /chatsocket client: an ordinary subscriber of ``chat:lobby`` (in presence and the channel list)
    whose wire format is the demo's. The demo's ``{"body"}`` in is a publish through the policy gate, with
    the connection's command budget; the demo protocol has no error replies, so a refused message is
    logged, and a client that keeps being refused is closed (4030)."""

    __slots__ = ()
    kind = "chatsocket"

    def __init__(
        self, node: Node, transport: asyncio.Transport, ip: str, flusher: Flusher, deflate: bool = False
    ) -> None:
        super().__init__(node, transport, ip, flusher, deflate)
        self.format = demo_frame

    def start(self, tail: bytes, request: web.Request) -> None:
        super().start(tail, request)
        if self._closing:
            return
        try:
            ns = self.session.authorize(CHAT_CHANNEL, "subscribe")
        except ProtocolError as exc:
            code = CloseCode.UNAUTHORIZED if exc.code is ErrorCode.UNAUTHORIZED else CloseCode.FORBIDDEN
            self.close(code, exc.message[:120])
            return
        task = asyncio.get_running_loop().create_task(
            self.node.subscriptions.subscribe(self, CHAT_CHANNEL, ns, None, _no_reply)
        )
        task.add_done_callback(self._subscribed)

    def reconfigure(self) -> None:
        """A reload: new budgets and limits; a client the ``chat`` namespace's new rules no longer let
        read ``chat:lobby`` is closed as it would be refused at the upgrade (4003, or 4001 when it now
        needs a token): the demo protocol has no way to end one subscription."""
        super().reconfigure()
        if self._closing:
            return
        why = self.session.still_allowed(CHAT_CHANNEL)
        if why is not None:
            code = CloseCode.UNAUTHORIZED if why.code is ErrorCode.UNAUTHORIZED else CloseCode.FORBIDDEN
            self.close(code, why.message[:120])

    def _subscribed(self, task: asyncio.Task[SubscribeOutcome | None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.info("chatsocket: subscribe failed: %s", task.exception())
            self.close(
                CloseCode.GOING_AWAY
                if isinstance(task.exception(), BrokerError)
                else CloseCode.INTERNAL_ERROR
            )

    def on_text(self, payload: bytes) -> None:
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("body"), str):
            log.info("chatsocket: ignored a message without a string body")  # the demo ignored them too
            return
        if not self.spend():
            return
        try:
            req = self.session.publication(CHAT_CHANNEL, {"body": obj["body"]})
        except ProtocolError as exc:
            log.info("chatsocket: message refused: %s %s", exc.code, exc.message)
            self.node.errors.add(
                source="chatsocket", code=str(exc.code), message=exc.message, client=self.client_id
            )
            return
        self.node.submit([req], _log_failure, source="chatsocket")


def _no_reply(outcome: SubscribeOutcome) -> None:
    return None


def _log_failure(result: PublishResult | BrokerError) -> None:
    if isinstance(result, BrokerError):
        log.info("chatsocket: message not stored: %s", result)


class EchoSocket(WsProtocol):
    """/websocket: every text frame comes back as ``You said: <text>``; with ``echo_raw``, every text and
    binary message comes back verbatim (for the Autobahn conformance suite). Every message spends the
    connection's command budget (a client that keeps sending past it is closed with 4030).

    On a compressed connection every reply is compressed too, so what goes out stays about as large as
    what came in (an 81-byte frame that inflates to 64 KiB is answered with about 81 bytes, not 64 KiB)."""

    __slots__ = ()
    kind = "echo"

    def _echo(self, opcode: int, payload: bytes) -> None:
        self.msgs_out += 1
        if self.deflate:
            self.offer(data_frame(opcode, deflate_payload(payload), compressed=True))
        else:
            self.offer(data_frame(opcode, payload))

    def on_text(self, payload: bytes) -> None:
        if self.spend():
            self._echo(OP_TEXT, payload if self.node.settings.echo_raw else b"You said: " + payload)

    def on_binary(self, payload: bytes) -> None:
        if not self.node.settings.echo_raw:
            super().on_binary(payload)  # the demo is text only: 1003
        elif self.spend():
            self._echo(OP_BINARY, payload)


async def echo_handler(request: web.Request) -> web.StreamResponse:
    return await upgrade(request, EchoSocket)


async def chatsocket_handler(request: web.Request) -> web.StreamResponse:
    """``/chatsocket``: the original demo's chat protocol on the hub's ``chat:lobby``."""
    return await upgrade(request, ChatSocket)
