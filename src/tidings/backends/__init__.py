"""Backends, chosen by the scheme of a URL: ``memory://``, ``sqlite:///path``, ``redis://``, ``rediss://``,
``redis+sentinel://``, ``redis+cluster://``.

A new broker registers a factory for its scheme with :func:`register_broker`; :func:`broker_from_url`
refuses an unknown scheme with a :class:`BrokerURLError` that names the known ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from .base import Broker, BrokerError, HistoryOptions, HistoryResult, IdempotencyOptions, PresenceStore
from .memory import MemoryBroker
from .sqlite import SqliteBroker

if TYPE_CHECKING:
    from .redis import RedisTarget

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
    redis_wait_replicas: int = 0  # WAIT for this many replicas before a publish is acknowledged (0: off)
    redis_wait_timeout: float = 1.0  # seconds the WAIT may take (below redis_timeout)
    redis_pubsub_shards: int = 4  # Pub/Sub connections per node; a channel's is crc32(name) % shards


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
    from .redis import RedisTarget

    if not opts.redis_prefix or any(c in opts.redis_prefix for c in "{}"):
        raise BrokerURLError("redis_prefix must be non-empty and hold no '{' or '}'")

    try:
        port = url.port or 6379
    except ValueError:
        raise BrokerURLError("a redis URL's port must be a number: redis://host:6379/0") from None
    path = url.path.strip("/")
    if path and not path.isdigit():
        raise BrokerURLError("a redis URL's path is the database number: redis://host:6379/0")
    if url.query:
        raise BrokerURLError("a redis URL takes no query: redis://[user:password@]host:port[/db]")
    target = RedisTarget(
        host=url.hostname or "127.0.0.1",
        port=port,
        db=int(path or 0),
        username=unquote(url.username) if url.username else None,
        password=unquote(url.password) if url.password else None,
        tls=url.scheme.lower() == "rediss",
    )
    return _redis_broker(target, opts)


def _redis_broker(target: RedisTarget, opts: BrokerOptions) -> Broker:
    from .redis import RedisBroker

    _check_redis_options(opts)
    return RedisBroker(
        target,
        prefix=opts.redis_prefix,
        timeout=opts.redis_timeout,
        check_interval=opts.redis_check_interval,
        pool_size=opts.redis_pool_size,
        idempotency=IdempotencyOptions(opts.idempotency_window, opts.idempotency_max_keys),
        wait_replicas=opts.redis_wait_replicas,
        wait_timeout=opts.redis_wait_timeout,
        pubsub_shards=opts.redis_pubsub_shards,
    )


def _check_redis_options(opts: BrokerOptions) -> None:
    if opts.redis_wait_replicas < 0:
        raise BrokerURLError("redis_wait_replicas must be 0 (off) or a number of replicas")
    if opts.redis_wait_replicas and not 0 < opts.redis_wait_timeout < opts.redis_timeout:
        raise BrokerURLError("redis_wait_timeout must be above 0 and below redis_timeout")
    if not 1 <= opts.redis_pubsub_shards <= 64:
        raise BrokerURLError("redis_pubsub_shards must be between 1 and 64")
    if opts.redis_pool_size < opts.redis_pubsub_shards + 2:
        raise BrokerURLError("redis_pool_size must exceed redis_pubsub_shards by 2 or more")


_SENTINEL_SHAPE = "redis+sentinel://[user:password@]host:port[,host:port...]/master-name[?db=N]"
_SENTINEL_QUERY = {"db", "sentinel_username", "sentinel_password"}


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    if item.startswith("["):
        host, sep, rest = item[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(item)
        port_s = rest[1:]
    else:
        host, _, port_s = item.rpartition(":") if ":" in item else (item, "", "")
    if not host or (port_s and not port_s.isdigit()):
        raise ValueError(item)
    port = int(port_s) if port_s else default_port
    if not 0 < port < 65536:
        raise ValueError(item)
    return host, port


def _redis_sentinel(url: SplitResult, opts: BrokerOptions) -> Broker:
    """``redis+sentinel://[user:password@]h:p[,h:p...]/master-name[?db=N]``: the user and password are the
    master's (and its replicas'), ``?sentinel_username=``/``?sentinel_password=`` the sentinels' (when
    they require auth); sentinel port default 26379."""
    from .redis import RedisTarget

    if not opts.redis_prefix or any(c in opts.redis_prefix for c in "{}"):
        raise BrokerURLError("redis_prefix must be non-empty and hold no '{' or '}'")
    userinfo, _, hosts = url.netloc.rpartition("@")
    try:
        sentinels = tuple(_host_port(h, 26379) for h in hosts.split(","))
    except ValueError:
        raise BrokerURLError(f"a Sentinel URL lists the sentinels as host:port: {_SENTINEL_SHAPE}") from None
    name = unquote(url.path.strip("/"))
    if not name or "/" in name:
        raise BrokerURLError(f"a Sentinel URL's path is the master name: {_SENTINEL_SHAPE}")
    try:
        query = parse_qs(url.query, keep_blank_values=True, strict_parsing=bool(url.query))
    except ValueError:
        raise BrokerURLError(f"a Sentinel URL's query is malformed: {_SENTINEL_SHAPE}") from None
    unknown = set(query) - _SENTINEL_QUERY
    if unknown or any(len(v) > 1 for v in query.values()):
        what = ", ".join(sorted(unknown)) or "a repeated option"
        takes = "?db=N, ?sentinel_username=, ?sentinel_password="
        raise BrokerURLError(f"a Sentinel URL takes {takes} (not {what})")
    db = query.get("db", ["0"])[0]
    if not db.isdigit():
        raise BrokerURLError(f"a Sentinel URL's db is the database number: {_SENTINEL_SHAPE}")
    user, _, password = userinfo.partition(":")
    target = RedisTarget(
        host=sentinels[0][0],
        port=sentinels[0][1],
        db=int(db),
        username=unquote(user) or None,
        password=unquote(password) or None,
        sentinels=sentinels,
        master_name=name,
        sentinel_username=query.get("sentinel_username", [""])[0] or None,
        sentinel_password=query.get("sentinel_password", [""])[0] or None,
    )
    return _redis_broker(target, opts)


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
    if opts.redis_wait_replicas < 0:
        raise BrokerURLError("redis_wait_replicas must be 0 (off) or a number of replicas")
    if opts.redis_wait_replicas and not 0 < opts.redis_wait_timeout < opts.redis_timeout:
        raise BrokerURLError("redis_wait_timeout must be above 0 and below redis_timeout")
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
        wait_timeout=opts.redis_wait_timeout,
        idempotency=IdempotencyOptions(opts.idempotency_window, opts.idempotency_max_keys),
    )


register_broker("memory", _memory)
register_broker("sqlite", _sqlite)
register_broker("redis", _redis)
register_broker("rediss", _redis)
register_broker("redis+sentinel", _redis_sentinel)
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


_PASSWORD = re.compile(r"(//[^/@:]*:)[^/@]*@|((?:^|[?&])(?:sentinel_)?password=)[^&]*", re.I)


def display_url(url: str) -> str:
    """``url`` for a log line: a password (``user:password@``, ``?password=``) replaced by ``***``."""
    return _PASSWORD.sub(lambda m: f"{m[1]}***@" if m[1] else f"{m[2]}***", url)
