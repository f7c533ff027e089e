"""The interfaces every backend implements. Chosen by URL: memory:// or sqlite:///path."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..protocol import Publication, StreamPosition

__all__ = [
    "Broker",
    "BrokerError",
    "DeliverFn",
    "HistoryOptions",
    "HistoryResult",
    "PublishDone",
    "PublishRequest",
    "new_epoch",
]

DeliverFn = Callable[[Publication], object]


@dataclass(slots=True)
class PublishRequest:
    """One publication to make; ``encoded`` is ``data`` already JSON-encoded."""

    channel: str
    data: Any
    opts: HistoryOptions
    info: dict[str, Any] | None
    encoded: bytes


PublishDone = Callable[["list[Publication] | BrokerError"], None]


class BrokerError(Exception):
    """The backend could not do what was asked (storage failure, connection lost). Clients may retry."""


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
    one channel reach ``deliver`` in offset order."""

    async def start(self, deliver: DeliverFn) -> None: ...

    async def close(self) -> None: ...

    def publish_many(self, reqs: list[PublishRequest], done: PublishDone) -> None:
        """Publish ``reqs`` in order, atomically as a group (one transaction where there is one); then
        ``done`` is called once, on the loop, with the publications or the error."""
        ...

    async def history(
        self, channel: str, opts: HistoryOptions, *, since: int | None = None, limit: int | None = None
    ) -> HistoryResult:
        """With ``since``: publications after that offset, oldest first, at most ``limit``.
        Without: the newest ``limit`` (all retained when None), oldest first."""
        ...
