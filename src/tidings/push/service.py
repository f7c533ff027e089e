"""Web Push delivery (RFC 8030), off the publish path.

The node hands every acknowledged publication to :meth:`PushService.offer` (``Node.submit``: the one
place every publish path goes through, on the node that accepted the publish, so a publication is pushed
once however many nodes there are). ``offer`` never waits: it queues the publication, or drops it and
counts ``dropped`` when the queue is full (``push_queue_size`` items, ``push_queue_bytes`` payload bytes).
A pool of ``push_senders`` tasks takes items off the queue: a publication becomes one delivery per
registered device (devices of users online anywhere skipped in ``"offline"`` namespaces), and a
delivery is one encrypted POST (RFC 8291 ``aes128gcm`` by http-ece, VAPID by py-vapid) with ``TTL``,
``Urgency`` and ``Topic``.

Answers: 2xx ``sent``; 404/410 ``gone`` (the device is deleted); 429, 5xx and network errors are tried
again after ``Retry-After`` (when given, else 1, 2, 4 ... s), at most ``push_max_attempts`` tries and
never a wait above ``push_retry_max_delay`` or past the push's TTL, then ``failed``; other answers and
endpoints the SSRF rules refuse at send time are ``failed`` at once.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import http_ece
import orjson
from cryptography.hazmat.primitives.asymmetric import ec
from yarl import URL

from ..backends.base import BrokerError, PushDevice, PushStore
from ..config import Namespace, Settings
from ..policy import Policy
from ..protocol import Publication
from .guard import EndpointRefused, Guard, GuardedResolver, RefusedAtConnect
from .vapid import Vapid, default_subject, ensure_vapid_key

__all__ = ["MAX_PAYLOAD", "PushService", "PushStats", "push_payload"]

log = logging.getLogger("tidings.push")

# RFC 8291 §4: one record of at most 4096 bytes; its header (86 bytes with the 65-byte key id), the
# padding delimiter (1) and the tag (16) leave this much for the payload.
MAX_PAYLOAD = 4096 - 86 - 1 - 16
MAX_RESPONSE = 64 << 10  # bytes of a push service's answer read (and ignored)
ITEM_OVERHEAD = 256  # bytes counted per queued item besides its payload


def push_payload(pub: Publication) -> bytes:
    """What a device receives: the /ws ``message`` push, or above :data:`MAX_PAYLOAD` its truncated form
    ``{"type": "message", "channel", "offset", "epoch", "id", "truncated": true}`` (the page fetches the
    publication with recovery)."""
    full = pub.push_bytes()
    if len(full) <= MAX_PAYLOAD:
        return full
    return orjson.dumps(
        {
            "type": "message",
            "channel": pub.channel,
            "offset": pub.offset,
            "epoch": pub.epoch,
            "id": pub.id,
            "truncated": True,
        }
    )


@dataclass(slots=True)
class PushStats:
    """Plain counters (read by ``GET /api/push/stats``)."""

    sent: int = 0  # deliveries a push service accepted (2xx)
    failed: int = 0  # deliveries given up (refused, or retries exhausted)
    gone: int = 0  # devices deleted because their push service answered 404/410
    dropped: int = 0  # publications or deliveries not queued because the queue was full
    retried: int = 0  # tries that were scheduled again (429, 5xx, network errors)
    refused: int = 0  # sends the SSRF rules refused at send time (counted in failed too)

    def to_json(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "failed": self.failed,
            "gone": self.gone,
            "dropped": self.dropped,
            "retried": self.retried,
            "refused": self.refused,
        }


@dataclass(slots=True)
class _Job:
    """A publication to fan out to its channel's devices."""

    channel: str
    payload: bytes
    ns: Namespace


@dataclass(slots=True)
class _Delivery:
    device: PushDevice
    payload: bytes
    ns: Namespace
    deadline: float  # monotonic time after which the push's TTL has passed: no more tries
    attempt: int = 0
    first: float = field(default_factory=time.monotonic)


class PushService:
    """Web Push of one node: registrations (through the store), the queue and the senders."""

    def __init__(self, settings: Settings, policy: Policy, store: PushStore) -> None:
        self.settings = settings
        self.policy = policy
        self.store = store
        self.stats = PushStats()
        self.guard = Guard(settings.push_allowed_hosts, timeout=settings.push_timeout)
        self.enabled = any(
            ns.push for ns in (*settings.namespaces.values(), settings.default_namespace) if ns is not None
        )
        self.vapid: Vapid | None = None
        self.local_users: dict[str, int] = {}  # user -> live connections on this node
        self._queue: deque[_Job | _Delivery] = deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._waiting = 0  # deliveries waiting for a retry (count against the queue's bounds)
        self._tasks: list[asyncio.Task[None]] = []
        self._timers: set[asyncio.TimerHandle] = set()
        self._session: aiohttp.ClientSession | None = None
        self.busy = 0  # items being processed now
        self._urls: dict[str, URL] = {}

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if not self.enabled:
            return
        pem, path, created = ensure_vapid_key(self.settings)
        self.vapid = Vapid(pem, default_subject(self.settings))
        if created:
            log.info("push: VAPID key created in %s", path.resolve())
        await self.store.start()
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self.guard),
            limit=self.settings.push_senders,
            ttl_dns_cache=10,
        )
        t = self.settings.push_timeout
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=t, connect=t, sock_read=t),
            trust_env=False,  # no proxy from the environment: the guard's address is the one connected
            cookie_jar=aiohttp.DummyCookieJar(),  # a push service's cookies are never sent back
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._sender()) for _ in range(self.settings.push_senders)]

    async def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.enabled:
            await self.store.close()

    # ------------------------------------------------------------------------------ connections

    def connected(self, user: str) -> None:
        """A live connection of ``user`` opened on this node (any transport)."""
        if not user or not self.enabled:
            return
        n = self.local_users.get(user, 0)
        self.local_users[user] = n + 1
        if n == 0:
            self.store.set_online(user, True)

    def disconnected(self, user: str) -> None:
        if not user or not self.enabled:
            return
        n = self.local_users.get(user, 0) - 1
        if n > 0:
            self.local_users[user] = n
            return
        if self.local_users.pop(user, None) is not None:
            self.store.set_online(user, False)

    # ------------------------------------------------------------------------------ queue

    @property
    def queued(self) -> int:
        """Items queued or waiting for a retry."""
        return len(self._queue) + self._waiting

    def _admit(self, item: _Job | _Delivery) -> bool:
        s = self.settings
        size = len(item.payload) + ITEM_OVERHEAD
        if self.queued >= s.push_queue_size or self._queued_bytes + size > s.push_queue_bytes:
            self.stats.dropped += 1
            return False
        self._queued_bytes += size
        return True

    def _release(self, item: _Job | _Delivery) -> None:
        self._queued_bytes -= len(item.payload) + ITEM_OVERHEAD

    def _put(self, item: _Job | _Delivery) -> None:
        self._queue.append(item)
        self._wake.set()

    def offer(self, pub: Publication) -> None:
        """An acknowledged publication: queue it if its namespace pushes. Never blocks, never raises."""
        try:
            ns = self.policy.namespace(pub.channel)
        except Exception:
            return
        if not ns.push or self._session is None:
            return
        job = _Job(pub.channel, push_payload(pub), ns)
        if self._admit(job):
            self._put(job)

    # ------------------------------------------------------------------------------ senders

    async def _sender(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            item = self._queue.popleft()
            self.busy += 1
            try:
                if isinstance(item, _Job):
                    await self._fan_out(item)
                else:
                    await self._deliver(item)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("push: delivery failed")
            finally:
                self.busy -= 1
                self._release(item)

    async def _fan_out(self, job: _Job) -> None:
        try:
            devices = await self.store.devices(job.channel)
        except BrokerError as exc:
            log.warning("push: cannot read the devices of %s: %s", job.channel, exc)
            self.stats.failed += 1
            return
        if job.ns.push == "offline":
            devices = await self._offline_only(devices)
        deadline = time.monotonic() + job.ns.push_ttl
        for dev in devices:
            d = _Delivery(dev, job.payload, job.ns, deadline)
            if self._admit(d):
                self._put(d)

    async def _offline_only(self, devices: list[PushDevice]) -> list[PushDevice]:
        """Devices whose user has no live connection on any node (anonymous devices: always, as no
        connection can be theirs)."""
        users = {d.user for d in devices if d.user and d.user not in self.local_users}
        try:
            elsewhere = await self.store.online_elsewhere(users)
        except BrokerError as exc:
            log.warning("push: cannot read who is online: %s (pushing to all)", exc)
            elsewhere = set()
        return [
            d for d in devices if not d.user or (d.user not in self.local_users and d.user not in elsewhere)
        ]

    def encrypt(self, dev: PushDevice, payload: bytes) -> bytes:
        """RFC 8291 ``aes128gcm`` for one device: a fresh sender key pair per message (http-ece)."""
        key = ec.generate_private_key(ec.SECP256R1())
        body: bytes = http_ece.encrypt(
            payload,
            private_key=key,
            dh=_unb64(dev.p256dh),
            auth_secret=_unb64(dev.auth),
            version="aes128gcm",
        )
        return body

    def _url(self, endpoint: str) -> URL:
        """The endpoint parsed once (parsing costs about a tenth of a push), bounded."""
        url = self._urls.get(endpoint)
        if url is None:
            if len(self._urls) >= 10_000:
                self._urls.clear()
            url = self._urls[endpoint] = URL(endpoint)
        return url

    def _refused(self, exc: BaseException) -> None:
        log.warning("push: endpoint refused at send time: %s", exc)
        self.stats.refused += 1
        self.stats.failed += 1

    def headers(self, origin: str, ns: Namespace) -> dict[str, str]:
        """The request headers for a push service at ``origin`` (its VAPID ``aud``)."""
        assert self.vapid is not None
        out = {
            "Authorization": self.vapid.header(origin),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "TTL": str(ns.push_ttl),
            "Urgency": ns.push_urgency,
        }
        if ns.push_topic:
            out["Topic"] = ns.push_topic
        return out

    async def _deliver(self, d: _Delivery) -> None:
        assert self._session is not None
        d.attempt += 1
        dev = d.device
        try:
            origin = self.guard.send_check(dev.endpoint)
        except EndpointRefused as exc:
            self._refused(exc)
            return
        status = 0
        retry_after: str | None = None
        try:
            async with self._session.post(
                self._url(dev.endpoint),
                data=self.encrypt(dev, d.payload),
                headers=self.headers(origin, d.ns),
                allow_redirects=False,
            ) as resp:
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
                await resp.content.read(MAX_RESPONSE)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if RefusedAtConnect.behind(exc):  # the host resolved to a refused address just now
                self._refused(exc)
                return
            log.info("push: %s: %s", urlsplit(dev.endpoint).hostname, exc or type(exc).__name__)
        if 200 <= status < 300:
            self.stats.sent += 1
        elif status in (404, 410):
            self.stats.gone += 1
            try:
                await self.store.remove(dev.endpoint)
            except BrokerError as exc:
                log.warning("push: cannot delete a gone device: %s", exc)
        elif status == 0 or status == 429 or status >= 500:
            self._retry(d, retry_after)
        else:
            log.info("push: %s answered %d", urlsplit(dev.endpoint).hostname, status)
            self.stats.failed += 1

    def _retry(self, d: _Delivery, retry_after: str | None) -> None:
        s = self.settings
        delay = _retry_after(retry_after)
        if delay is None:
            delay = float(2 ** (d.attempt - 1))
        if (
            d.attempt >= s.push_max_attempts
            or delay > s.push_retry_max_delay
            or time.monotonic() + delay > d.deadline
        ):
            self.stats.failed += 1
            return
        self.stats.retried += 1
        # The delivery keeps its place in the queue's bounds while it waits.
        size = len(d.payload) + ITEM_OVERHEAD
        self._queued_bytes += size
        self._waiting += 1
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def again() -> None:
            self._waiting -= 1
            if timer is not None:
                self._timers.discard(timer)
            self._put(d)

        timer = loop.call_later(delay, again)
        self._timers.add(timer)


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` (delta-seconds or an HTTP date); None when absent or malformed."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
