"""Rates, connection counts and failed-auth slow-down. All state is bounded."""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict

from aiohttp import web

__all__ = ["ConnectionLimiter", "FailureLimiter", "RateLimiter", "TokenBucket", "client_ip", "in_networks"]


class TokenBucket:
    """``rate`` tokens per second, up to ``burst``."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self, now: float | None = None) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def set_rate(self, rate: float, burst: float) -> None:
        """New limits from the next take on; tokens saved up beyond the new burst are dropped."""
        self.rate = rate
        self.burst = burst
        self.tokens = min(self.tokens, burst)

    def retry_after(self) -> float:
        return max(0.0, (1 - self.tokens) / self.rate) if self.rate > 0 else 0.0


class RateLimiter:
    """One bucket per key (user id), the least recently used forgotten beyond ``max_keys``."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._max = max_keys

    def set_rate(self, rate: float, burst: float) -> None:
        """New limits for every key, the buckets already there included."""
        self.rate = rate
        self.burst = burst
        for b in self._buckets.values():
            b.set_rate(rate, burst)

    def take(self, key: str) -> bool:
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = TokenBucket(self.rate, self.burst)
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return b.take()


class ConnectionLimiter:
    """Counts open connections in total and per address."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total_max = total
        self.per_ip_max = per_ip
        self.total = 0
        # Of ``total``: places held by requests that are plain HTTP connections too (pending long-polls):
        # the HTTP edge counts their file descriptors already.
        self.http = 0
        self._per_ip: dict[str, int] = {}

    def acquire(self, ip: str, per_ip: bool = True) -> bool:
        """Take a place for a connection from ``ip``; ``per_ip=False`` counts it in the total only (a
        trusted proxy's own connections). False when a limit is reached."""
        if self.total_max and self.total >= self.total_max:
            return False
        if per_ip:
            n = self._per_ip.get(ip, 0)
            if self.per_ip_max and n >= self.per_ip_max:
                return False
            self._per_ip[ip] = n + 1
        self.total += 1
        return True

    def release(self, ip: str, per_ip: bool = True) -> None:
        if per_ip:
            n = self._per_ip.get(ip, 0) - 1
            if n <= 0:
                self._per_ip.pop(ip, None)
            else:
                self._per_ip[ip] = n
        self.total = max(0, self.total - 1)

    def count(self, ip: str) -> int:
        return self._per_ip.get(ip, 0)


class FailureLimiter:
    """After ``limit`` failures from one address within ``window`` seconds, refuse it until the window
    ends. Used for bad API keys and bad tokens."""

    def __init__(self, limit: int, window: float = 60.0, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self._fails: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._max = max_keys

    def blocked_for(self, ip: str) -> float:
        """Seconds until ``ip`` may try again (0: it may now)."""
        entry = self._fails.get(ip)
        if entry is None or not self.limit:
            return 0.0
        start, n = entry
        left = start + self.window - time.monotonic()
        if left <= 0:
            del self._fails[ip]
            return 0.0
        return left if n >= self.limit else 0.0

    def fail(self, ip: str) -> None:
        now = time.monotonic()
        start, n = self._fails.get(ip, (now, 0))
        if now - start > self.window:
            start, n = now, 0
        self._fails[ip] = (start, n + 1)
        self._fails.move_to_end(ip)
        if len(self._fails) > self._max:
            self._fails.popitem(last=False)


def in_networks(ip: str, nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Whether address ``ip`` is in one of ``nets`` (False for anything that is not an address)."""
    return _in(ip, nets)


def _in(ip: str, nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in n for n in nets)


def parse_networks(items: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(i, strict=False) for i in items]


def client_ip(request: web.Request, trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str:
    """The peer address; behind trusted proxies, the rightmost X-Forwarded-For hop that is not one."""
    peer = request.remote or ""
    if not trusted or not _in(peer, trusted):
        return peer
    hops = [
        h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",") if h.strip()
    ]
    for hop in reversed(hops):
        if not _in(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer
    return peer
