"""A Web Push service stand-in on loopback, doing to each request what a browser vendor's push service
does: it checks the VAPID JWT (ES256, ``aud`` = its own origin, ``exp`` at most 24 h ahead, ``sub``)
against the ``k=`` key of ``Authorization: vapid t=..., k=...``, and decrypts the ``aes128gcm`` body with
http_ece using the private key and auth secret of a :class:`Browser` (made as a browser makes them).

Each path ``/push/<id>`` is one device. A device's answers can be scripted (``answers``: statuses and
headers, then 201) and a device can be held (``hold``: requests wait until released)."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import http_ece
import jwt
import orjson
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

MAX_JWT_LIFETIME = 24 * 3600


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


@dataclass
class Browser:
    """What a browser's PushManager.subscribe makes: a P-256 key pair and a 16-byte auth secret."""

    endpoint: str
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    auth: bytes = field(default_factory=lambda: os.urandom(16))

    def subscription(self) -> dict[str, Any]:
        """``PushSubscription.toJSON()``."""
        pub = self.key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return {
            "endpoint": self.endpoint,
            "expirationTime": None,
            "keys": {"p256dh": b64(pub), "auth": b64(self.auth)},
        }


@dataclass
class Received:
    device: str
    at: float  # loop time
    payload: dict[str, Any]
    headers: dict[str, str]
    claims: dict[str, Any]


class PushServiceStandIn:
    def __init__(self) -> None:
        self.browsers: dict[str, Browser] = {}
        self.received: list[Received] = []
        self.attempts: dict[str, list[float]] = {}  # device -> loop times of every request
        self.rejected: list[str] = []  # why requests were refused (VAPID or decryption)
        self.answers: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self.hold: dict[str, asyncio.Event] = {}
        self.held = 0  # requests waiting on a hold now
        self.changed = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/push/{device}", self._push)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        for ev in self.hold.values():
            ev.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def device(self, name: str, origin: str | None = None) -> Browser:
        b = Browser(f"{origin or self.origin}/push/{name}")
        self.browsers[name] = b
        return b

    def of(self, name: str) -> list[Received]:
        return [r for r in self.received if r.device == name]

    async def until(self, pred: Any, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                self.changed.clear()
                await self.changed.wait()

    def _verify(self, request: web.Request) -> dict[str, Any]:
        header = request.headers.get("Authorization", "")
        scheme, _, rest = header.partition(" ")
        if scheme.lower() != "vapid":
            raise ValueError(f"not a vapid Authorization: {header[:20]!r}")
        parts = dict(p.strip().split("=", 1) for p in rest.split(","))
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64(parts["k"]))
        claims: dict[str, Any] = jwt.decode(
            parts["t"],
            key,
            algorithms=["ES256"],
            audience=self.origin,
            options={"require": ["exp", "aud", "sub"]},
        )
        if claims["exp"] > time.time() + MAX_JWT_LIFETIME:
            raise ValueError("exp more than 24 h ahead")
        if not str(claims["sub"]).startswith(("mailto:", "https:")):
            raise ValueError("sub is not mailto: or https:")
        return claims

    async def _push(self, request: web.Request) -> web.Response:
        name = request.match_info["device"]
        loop = asyncio.get_running_loop()
        self.attempts.setdefault(name, []).append(loop.time())
        self.changed.set()
        hold = self.hold.get(name)
        if hold is not None:
            self.held += 1
            try:
                await hold.wait()
            finally:
                self.held -= 1
        body = await request.read()
        try:
            claims = self._verify(request)
            if request.headers.get("Content-Encoding") != "aes128gcm":
                raise ValueError("Content-Encoding is not aes128gcm")
            if len(body) > 4096:
                raise ValueError(f"body of {len(body)} bytes is above 4096")
            b = self.browsers[name]
            plain = http_ece.decrypt(body, private_key=b.key, auth_secret=b.auth, version="aes128gcm")
        except Exception as exc:  # what a real service does: 401/400 and nothing delivered
            self.rejected.append(f"{name}: {type(exc).__name__}: {exc}")
            self.changed.set()
            return web.Response(status=400, text=str(exc))
        script = self.answers.get(name)
        if script:
            status, headers = script.pop(0)
            if status >= 300:
                self.changed.set()
                return web.Response(status=status, headers=headers)
        self.received.append(Received(name, loop.time(), orjson.loads(plain), dict(request.headers), claims))
        self.changed.set()
        return web.Response(status=201)
