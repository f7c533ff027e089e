"""The interfaces every backend implements: :class:`Broker` (publish, history, live delivery, interest) and
:class:`PresenceStore` (who is in a channel). Brokers are chosen by URL scheme (``backends/__init__.py``)
and every one passes the same contract suite (``tests/test_broker_contract.py``)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..protocol import Event, Publication, StreamPosition

__all__ = [
    "MAX_LISTED_CHANNELS",
    "Broker",
    "BrokerError",
    "BrokerHandler",
    "HistoryOptions",
    "HistoryResult",
    "IdempotencyOptions",
    "LocalChannels",
    "OneNode",
    "PresenceList",
    "PresenceStore",
    "PublishDone",
    "PublishRequest",
    "PublishResult",
    "PushDevice",
    "PushLimitError",
    "PushStore",
    "Repeat",
    "SharesPresence",
    "StoresPush",
    "land",
    "new_epoch",
]


class BrokerHandler(Protocol):
    """Where a broker hands what it delivers (the node's hub), always on the event loop and never inside
    the call that published it."""

    def deliver(self, pub: Publication) -> object: ...

    def deliver_event(self, event: Event) -> None: ...

    def lost(self, channel: str) -> None:
        """This node can no longer deliver ``channel`` without a gap (its live stream could not be
        repaired from history, or the channel's stream was lost): every local subscription of it ends
        and its clients are told to subscribe again from their last position."""
        ...


class BrokerError(Exception):
    """The backend could not do what was asked (storage failure, connection lost). Clients may retry."""


@dataclass(slots=True)
class PublishRequest:
    """One publication to make, already checked by the policy gate: ``raw`` and ``raw_info`` are ``data``
    and ``info`` as JSON bytes (a broker stores and sends them as they are, never encoding again)."""

    channel: str
    raw: bytes
    opts: HistoryOptions
    raw_info: bytes | None = None
    key: str | None = None  # idempotency key: a repeat within the broker's window stores nothing


@dataclass(frozen=True, slots=True)
class Repeat:
    """The answer to a publish repeated with the idempotency key of an earlier one (same channel, within
    the window): the earlier publication's position and id. Nothing was stored or delivered."""

    channel: str
    offset: int
    epoch: str
    id: str


@dataclass(frozen=True, slots=True)
class IdempotencyOptions:
    """How long (``window`` seconds) and how many (``max_keys``) idempotency keys a broker remembers.
    A key and its channel are at most 64 + 255 characters, so the count bounds the bytes too."""

    window: float = 300.0
    max_keys: int = 100_000


PublishResult = list[Publication | Repeat]
PublishDone = Callable[[PublishResult | BrokerError], None]
log = logging.getLogger("tidings.broker")


def land(
    handler: BrokerHandler,
    result: PublishResult | BrokerError,
    done: PublishDone,
    before: Callable[[Publication], None] | None = None,
) -> None:
    """Hand a committed group to the loop's side: ``before(pub)`` (a cache), ``handler.deliver(pub)``
    for each publication in order, then ``done(result)``. Failure-isolated: an error in one step is
    logged and the rest still runs, so one bad item never leaves a group unacknowledged. A
    :class:`Repeat` is only answered: it was delivered when it was first published."""
    if not isinstance(result, BrokerError):
        for pub in result:
            if isinstance(pub, Repeat):
                continue
            try:
                if before is not None:
                    before(pub)
                handler.deliver(pub)
            except Exception:
                log.exception("delivering %s offset %d failed", pub.channel, pub.offset)
    try:
        done(result)
    except Exception:
        log.exception("a publish callback failed")


def new_epoch() -> str:
    """A fresh epoch: changes whenever a channel's stream is (re)created, so old positions are not trusted."""
    return secrets.token_hex(4)


@dataclass(frozen=True, slots=True)
class HistoryOptions:
    """Per-namespace retention: ``size`` publications (0 keeps none) for ``ttl`` seconds."""

    size: int = 200
    ttl: float = 86400.0


@dataclass(slots=True)
class HistoryResult:
    """Publications oldest first, the stream's current top ``position``, and ``first_offset``: the oldest
    offset still retained (``position.offset + 1`` when nothing is)."""

    publications: list[Publication]
    position: StreamPosition
    first_offset: int


class Broker(Protocol):
    """Pub/sub plus history. A publish and its history append are atomic per channel, and publications of
    one channel reach ``handler.deliver`` in offset order, on the loop, after ``publish_many`` returned."""

    async def start(self, handler: BrokerHandler) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Return when the backend answers a real request now (SQLite: a committed write; Redis: PING
        within ``redis_timeout``); raise :class:`BrokerError` otherwise. ``/readyz`` asks it."""
        ...

    def publish_many(self, reqs: list[PublishRequest], done: PublishDone) -> None:
        """Publish ``reqs`` in order, atomically as a group (one transaction where there is one); then
        ``done`` is called once, on the loop, with the publications or the error. A request whose
        ``key`` the broker saw on the same channel within its idempotency window is answered with a
        :class:`Repeat` of the first result, and stores and delivers nothing."""
        ...

    async def history(
        self, channel: str, opts: HistoryOptions, *, since: int | None = None, limit: int | None = None
    ) -> HistoryResult:
        """With ``since``: publications after that offset, oldest first, at most ``limit``.
        Without: the newest ``limit`` (all retained when None), oldest first. A read never writes: a
        channel nobody published to reads as empty at offset 0 and leaves nothing behind."""
        ...

    def publish_event(self, event: Event) -> None:
        """Hand a join/leave event to every node's subscribers of its channel (not stored)."""
        ...

    def interest(self, channel: str, on: bool) -> None:
        """This node got its first local subscriber of ``channel`` (``on``) or lost its last one."""
        ...


class OneNode:
    """What a broker that serves one node does for events and interest: events go straight to this
    node's handler (on the loop, never inside the caller), and interest changes nothing (every
    publication is delivered here anyway). Subclasses set ``_loop`` and ``_handler`` in ``start``."""

    _loop: asyncio.AbstractEventLoop | None = None
    _handler: BrokerHandler | None = None

    def publish_event(self, event: Event) -> None:
        assert self._loop is not None and self._handler is not None, "broker not started"
        self._loop.call_soon(self._handler.deliver_event, event)

    def interest(self, channel: str, on: bool) -> None:
        return None


@dataclass(frozen=True, slots=True)
class PresenceList:
    """A presence answer: at most the store's ``limit`` ``clients`` (``[{"client", "user"}]`` in join
    order) and ``count``, how many there are in all."""

    clients: list[dict[str, str]]
    count: int


LocalChannels = Callable[[], dict[str, int]]


class PresenceStore(Protocol):
    """Who is subscribed to a channel, and which channels have subscribers, over every node the store
    sees. ``add``/``remove`` never block; reads may, and raise :class:`BrokerError` when the store is
    unreachable. ``LocalPresence`` sees one node; ``RedisPresence`` every node sharing one Redis."""

    async def start(self, local_channels: LocalChannels) -> None:
        """``local_channels()`` gives this node's channels and their local subscriber counts."""
        ...

    async def close(self) -> None: ...

    def add(self, channel: str, client: str, user: str) -> None: ...

    def remove(self, channel: str, client: str) -> None: ...

    async def read(self, channel: str) -> PresenceList: ...

    async def clients(self, channel: str) -> list[dict[str, str]]:
        """``read(channel).clients``: ``[{"client", "user"}]`` in the order they joined."""
        ...

    async def channels(self) -> dict[str, int]:
        """Channels with subscribers and their subscriber counts (at most ``MAX_LISTED_CHANNELS``)."""
        ...


@runtime_checkable
class SharesPresence(Protocol):
    """A broker shared by several nodes that also keeps their presence (``RedisBroker``): the node
    takes its presence store from here instead of a ``LocalPresence``."""

    def presence_store(self, *, ttl: float, limit: int) -> PresenceStore: ...


MAX_LISTED_CHANNELS = 10_000  # channels in one /api/channels answer (the first ones by name)


# ---------------------------------------------------------------------------------------------- Web Push


@dataclass(frozen=True, slots=True)
class PushDevice:
    """One browser's Web Push registration: its push service ``endpoint`` and keys (``p256dh``, ``auth``,
    base64url as the browser gave them), whose it is (``owner``: ``user:<id>``, or ``ip:<address>`` for an
    anonymous registration; what the per-user cap counts), its ``user`` ("" anonymous) and the
    ``channels`` it wants pushes of."""

    endpoint: str
    p256dh: str
    auth: str
    owner: str
    user: str
    channels: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "p256dh": self.p256dh,
            "auth": self.auth,
            "owner": self.owner,
            "user": self.user,
            "channels": list(self.channels),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PushDevice:
        return cls(
            obj["endpoint"], obj["p256dh"], obj["auth"], obj["owner"], obj["user"], tuple(obj["channels"])
        )


class PushLimitError(Exception):
    """A registration would exceed a cap (``scope``: "owner" for the per-user one, "server" for all)."""

    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(f"at most {limit} push subscriptions per {'user' if scope == 'owner' else 'server'}")
        self.scope = scope
        self.limit = limit


class PushStore(Protocol):
    """Where the Web Push registrations live, durable as the broker is (memory: not at all; SQLite: a
    table; Redis: keys), and the cross-node "user online" signal for ``push = "offline"``.

    Writes and reads raise :class:`BrokerError` when the storage is unreachable."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def add(self, device: PushDevice, *, max_per_owner: int, max_total: int) -> None:
        """Register ``device``, replacing an earlier registration of the same endpoint (its channels,
        keys and owner). :class:`PushLimitError` when its owner already has ``max_per_owner`` other
        devices, or the server ``max_total``."""
        ...

    async def remove(self, endpoint: str) -> PushDevice | None:
        """Unregister the device of ``endpoint``; the removed one, or None if there was none."""
        ...

    async def get(self, endpoint: str) -> PushDevice | None:
        """The device registered with ``endpoint``, if any."""
        ...

    async def devices(self, channel: str) -> list[PushDevice]:
        """The devices registered for ``channel``."""
        ...

    def set_online(self, user: str, online: bool) -> None:
        """This node got its first live connection of ``user`` (True) or lost its last one (False);
        never blocks. Stores that serve one node need not remember anything."""
        ...

    async def online_elsewhere(self, users: Iterable[str]) -> set[str]:
        """Which of ``users`` have a live connection on another node (always empty for one node)."""
        ...


@runtime_checkable
class StoresPush(Protocol):
    """A broker that keeps Web Push registrations (every shipped one)."""

    def push_store(self, *, online_ttl: float) -> PushStore: ...
