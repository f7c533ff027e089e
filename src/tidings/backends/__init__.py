"""Backends, chosen by the scheme of a URL: ``memory://``, ``sqlite:///path``, ``redis://``,
``redis+cluster://``.

A new broker registers a factory for its scheme with :func:`register_broker`; :func:`broker_from_url`
refuses an unknown scheme with a :class:`BrokerURLError` that names the known ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

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
    redis_prefix: str = "tidings"
    redis_timeout: float = 5.0
    redis_check_interval: float = 2.0
    redis_pool_size: int = 32
    redis_wait_replicas: int = 0  # publish acknowledged once this many replicas have it (WAIT)


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


def _redis(url: SplitResult, opts: BrokerOptions) -> Broker:
    from .redis import RedisBroker, RedisTarget

    if not opts.redis_prefix or any(c in opts.redis_prefix for c in "{}"):
        raise BrokerURLError("redis_prefix must be non-empty and hold no '{' or '}'")

    try:
        port = url.port or 6379
    except ValueError:
        raise BrokerURLError("a redis URL's port must be a number: redis://host:6379/0") from None
    path = url.path.strip("/")
    if path and not path.isdigit():
        raise BrokerURLError("a redis URL's path is the database number: redis://host:6379/0")
    target = RedisTarget(
        host=url.hostname or "127.0.0.1",
        port=port,
        db=int(path or 0),
        username=unquote(url.username) if url.username else None,
        password=unquote(url.password) if url.password else None,
        tls=url.scheme.lower() == "rediss",
    )
    return RedisBroker(
        target,
        prefix=opts.redis_prefix,
        timeout=opts.redis_timeout,
        check_interval=opts.redis_check_interval,
        pool_size=opts.redis_pool_size,
        idempotency=IdempotencyOptions(opts.idempotency_window, opts.idempotency_max_keys),
    )


def _redis_cluster(url: SplitResult, opts: BrokerOptions) -> Broker:
    """``redis+cluster://[user:password@]host:port[,host:port...]``: startup nodes (any reachable one
    suffices; the others are found by the cluster client). ``rediss+cluster://`` for TLS."""
    from .redis_cluster import RedisClusterBroker

    if not opts.redis_prefix or any(c in opts.redis_prefix for c in "{}"):
        raise BrokerURLError("redis_prefix must be non-empty and hold no '{' or '}'")
    usage = "redis+cluster://host:port[,host:port...]"
    userinfo, _, hosts = url.netloc.rpartition("@")
    if url.path.strip("/") or url.query:
        raise BrokerURLError(f"a Redis Cluster URL has no database or options: {usage}")
    nodes: list[tuple[str, int]] = []
    for part in hosts.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep:
            host, port = port, "6379"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise BrokerURLError(f"a Redis Cluster URL lists host:port startup nodes: {usage}")
        nodes.append((host, int(port)))
    user, _, password = userinfo.partition(":")
    return RedisClusterBroker(
        nodes,
        username=unquote(user) if user else None,
        password=unquote(password) if password else None,
        tls=url.scheme.lower().startswith("rediss"),
        prefix=opts.redis_prefix,
        timeout=opts.redis_timeout,
        check_interval=opts.redis_check_interval,
        pool_size=opts.redis_pool_size,
        wait_replicas=opts.redis_wait_replicas,
        idempotency=IdempotencyOptions(opts.idempotency_window, opts.idempotency_max_keys),
    )


register_broker("memory", _memory)
register_broker("sqlite", _sqlite)
register_broker("redis", _redis)
register_broker("rediss", _redis)
register_broker("redis+cluster", _redis_cluster)
register_broker("rediss+cluster", _redis_cluster)


def is_shared_url(url: str) -> bool:
    """True for a broker that several processes can share (``--workers`` above 1 needs one)."""
    return urlsplit(url).scheme.lower() in (
        "redis",
        "rediss",
        "redis+cluster",
        "rediss+cluster",
        "redis+sentinel",
    )


def broker_from_url(url: str, opts: BrokerOptions | None = None) -> Broker:
    parts = urlsplit(url)
    factory = BROKERS.get(parts.scheme.lower())
    if factory is None:
        known = ", ".join(f"{s}://" for s in sorted(BROKERS))
        what = f"scheme {parts.scheme + '://'!r}" if parts.scheme else "URL without a scheme"
        # The URL itself is not repeated: it may hold a password.
        raise BrokerURLError(f"unknown broker {what}: this server knows {known}")
    return factory(parts, opts or BrokerOptions())


_PASSWORD = re.compile(r"(//[^/@:]*:)[^/@]*@|((?:^|[?&])password=)[^&]*", re.I)


def display_url(url: str) -> str:
    """``url`` for a log line: a password (``user:password@``, ``?password=``) replaced by ``***``."""
    return _PASSWORD.sub(lambda m: f"{m[1]}***@" if m[1] else f"{m[2]}***", url)
