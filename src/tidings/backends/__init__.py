"""Backends, chosen by the scheme of a URL: ``memory://`` or ``sqlite:///path``.

A new broker registers a factory for its scheme with :func:`register_broker`; :func:`broker_from_url`
refuses an unknown scheme with a :class:`BrokerURLError` that names the known ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from .base import Broker, BrokerError, HistoryOptions, HistoryResult, IdempotencyOptions, PresenceStore
from .memory import MemoryBroker
from .sqlite import SqliteBroker

__all__ = [
    "BROKERS",
    "Broker",
    "BrokerError",
    "BrokerOptions",
    "BrokerURLError",
    "HistoryOptions",
    "HistoryResult",
    "MemoryBroker",
    "PresenceStore",
    "SqliteBroker",
    "broker_from_url",
    "display_url",
    "is_shared_url",
    "register_broker",
]


class BrokerURLError(ValueError):
    """The broker URL names no known scheme or is malformed."""


@dataclass(frozen=True, slots=True)
class BrokerOptions:
    """Settings every broker factory may use."""

    sqlite_synchronous: str = "normal"
    history_cache_bytes: int = 256 << 20
    max_history_bytes: int = 256 << 20
    idempotency_window: float = 300.0  # seconds a publish's idempotency key is remembered
    idempotency_max_keys: int = 100_000


BrokerFactory = Callable[[SplitResult, BrokerOptions], Broker]
BROKERS: dict[str, BrokerFactory] = {}


def register_broker(scheme: str, factory: BrokerFactory) -> None:
    BROKERS[scheme] = factory


def _memory(url: SplitResult, opts: BrokerOptions) -> Broker:
    return MemoryBroker(
        max_history_bytes=opts.max_history_bytes,
        idempotency=IdempotencyOptions(opts.idempotency_window, opts.idempotency_max_keys),
    )


def _sqlite(url: SplitResult, opts: BrokerOptions) -> Broker:
    path = url.path if not url.netloc else url.netloc + url.path
    if not path:
        raise BrokerURLError("a sqlite URL needs a path: sqlite:///path/to/tidings.db")
    return SqliteBroker(
        path,
        synchronous=opts.sqlite_synchronous,
        cache_bytes=opts.history_cache_bytes,
        max_history_bytes=opts.max_history_bytes,
        idempotency=IdempotencyOptions(opts.idempotency_window, opts.idempotency_max_keys),
    )


register_broker("memory", _memory)
register_broker("sqlite", _sqlite)


def broker_from_url(url: str, opts: BrokerOptions | None = None) -> Broker:
    parts = urlsplit(url)
    factory = BROKERS.get(parts.scheme.lower())
    if factory is None:
        known = ", ".join(f"{s}://" for s in sorted(BROKERS))
        what = f"scheme {parts.scheme + '://'!r}" if parts.scheme else "URL without a scheme"
        # The URL itself is not repeated: it may hold a password.
        raise BrokerURLError(f"unknown broker {what}: this server knows {known}")
    return factory(parts, opts or BrokerOptions())


# Brokers whose state lives outside the process, so that several processes (``tidings serve --workers``)
# and several nodes can share it. memory:// and sqlite:// are one process only.
SHARED_SCHEMES = frozenset({"redis", "rediss", "redis+cluster", "redis+sentinel"})


def is_shared_url(url: str) -> bool:
    """Whether the broker named by ``url`` can be shared by several processes, by its scheme alone (no
    connection is made, and the factory need not be installed)."""
    return urlsplit(url).scheme.lower() in SHARED_SCHEMES


_PASSWORD = re.compile(r"(//[^/@:]*:)[^/@]*@|((?:^|[?&])password=)[^&]*", re.I)


def display_url(url: str) -> str:
    """``url`` for a log line: a password (``user:password@``, ``?password=``) replaced by ``***``."""
    return _PASSWORD.sub(lambda m: f"{m[1]}***@" if m[1] else f"{m[2]}***", url)
