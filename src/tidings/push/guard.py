"""SSRF rules for Web Push endpoints (docs/security.md): the server POSTs to URLs that clients supply.

* Only ``https://`` endpoints whose host resolves to public addresses only; loopback, private,
  link-local, multicast, reserved, unspecified, shared (100.64/10), documentation and other special
  addresses are refused (``ipaddress``'s ``is_global``, plus multicast).
* ``push_allowed_hosts`` names hosts (exact, case-insensitive) and CIDRs that are exempt: an endpoint
  whose host is named, or whose every address is inside a listed network, passes, and may then also be
  ``http://``.
* Checked when a device registers (400) and again at every send: the host is resolved, the addresses
  checked, and the connection made to a checked address (:class:`GuardedResolver` is the HTTP client's
  resolver), so a DNS answer that changed since the registration cannot reach an internal address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult

__all__ = ["EndpointRefused", "Guard", "GuardedResolver", "RefusedAtConnect", "parse_allowed"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_ENDPOINT = 2048  # characters of an endpoint URL
Lookup = Callable[[str, int], Awaitable[list[str]]]


class EndpointRefused(ValueError):
    """An endpoint the SSRF rules refuse; the message says why (no address is repeated)."""


class RefusedAtConnect(OSError):
    """What :class:`GuardedResolver` raises for a refused host (the HTTP client wraps it)."""

    @staticmethod
    def behind(exc: BaseException | None) -> bool:
        """Whether ``exc`` was caused by one (through the client's wrapping)."""
        seen = 0
        while exc is not None and seen < 10:
            if isinstance(exc, RefusedAtConnect):
                return True
            exc = getattr(exc, "os_error", None) or exc.__cause__ or exc.__context__
            seen += 1
        return False


def parse_allowed(items: Iterable[str]) -> tuple[frozenset[str], tuple[IPNetwork, ...]]:
    """``push_allowed_hosts`` entries: CIDRs or plain addresses (networks), else host names."""
    hosts: set[str] = set()
    nets: list[IPNetwork] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item.strip("[]"), strict=False))
        except ValueError:
            if "/" in item or ":" in item or " " in item:
                raise ValueError(f"{item!r} is neither a host name nor an address/CIDR") from None
            hosts.add(item.lower().rstrip("."))
    return frozenset(hosts), tuple(nets)


def is_public(addr: IPAddress) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not addr.is_multicast


async def system_lookup(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class Guard:
    """The rules, from ``push_allowed_hosts``. ``lookup`` resolves a host to its addresses."""

    def __init__(self, allowed: Iterable[str] = (), *, lookup: Lookup = system_lookup, timeout: float = 5.0):
        self.hosts, self.nets = parse_allowed(allowed)
        self.lookup = lookup
        self.timeout = timeout
        self._shapes: dict[str, tuple[str, bool | None]] = {}  # endpoint -> (origin, literal address ok)

    def send_check(self, url: str) -> str:
        """At send time: the endpoint's origin (the VAPID ``aud``) if its shape passes and, for an address
        literal, the address does; EndpointRefused if not. Host names are checked when the sender's
        resolver resolves them (:class:`GuardedResolver`), at the connection. Cached per endpoint (the
        rules do not change while the server runs)."""
        hit = self._shapes.get(url)
        if hit is None:
            scheme, host, _port = self.check_url(url)
            try:
                literal: IPAddress | None = ipaddress.ip_address(host.strip("[]"))
            except ValueError:
                literal = None
            ok = None if literal is None or self.named(host) else self.address_ok(literal)
            parts = urlsplit(url)
            hit = (f"{scheme}://{parts.netloc}", ok)
            if len(self._shapes) >= 10_000:
                self._shapes.clear()
            self._shapes[url] = hit
        if hit[1] is False:
            raise EndpointRefused("the endpoint's address is not public (loopback, private or special)")
        return hit[0]

    def named(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def address_ok(self, addr: IPAddress) -> bool:
        return is_public(addr) or any(addr in net for net in self.nets)

    def check_url(self, url: str) -> tuple[str, str, int]:
        """(scheme, host, port) of an endpoint URL whose shape is acceptable; EndpointRefused if not.
        Addresses are checked by :meth:`check`."""
        if len(url) > MAX_ENDPOINT:
            raise EndpointRefused(f"the endpoint is longer than {MAX_ENDPOINT} characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise EndpointRefused("the endpoint is not a valid URL") from None
        host = parts.hostname or ""
        if parts.scheme not in ("https", "http") or not host:
            raise EndpointRefused("the endpoint must be an https:// URL")
        if parts.username is not None or parts.password is not None or parts.fragment:
            raise EndpointRefused("the endpoint must not hold credentials or a fragment")
        if not url.isascii() or not url.isprintable() or " " in url:
            raise EndpointRefused("the endpoint must be printable ASCII (IDNs in their xn-- form)")
        if parts.scheme == "http" and not self._exempt_host(host):
            raise EndpointRefused("the endpoint must be https:// (http:// only to push_allowed_hosts)")
        return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)

    def _exempt_host(self, host: str) -> bool:
        if self.named(host):
            return True
        try:
            addr = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return False
        return any(addr in net for net in self.nets)

    async def check(self, url: str) -> None:
        """The whole check of an endpoint (shape, then every address its host resolves to)."""
        _, host, port = self.check_url(url)
        await self.addresses(host, port)

    async def addresses(self, host: str, port: int) -> list[str]:
        """The addresses of ``host`` that may be connected to: all of them must pass (one refused
        address refuses the host, so a round-robin answer cannot slip an internal one in)."""
        if self.named(host):
            found = await self._resolve(host, port)
            if not found:
                raise EndpointRefused("the endpoint's host does not resolve")
            return found
        try:
            literal: IPAddress | None = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            literal = None
        if literal is not None:
            if not self.address_ok(literal):
                raise EndpointRefused("the endpoint's address is not public (loopback, private or special)")
            return [str(literal)]
        found = await self._resolve(host, port)
        if not found:
            raise EndpointRefused("the endpoint's host does not resolve")
        for a in found:
            if not self.address_ok(ipaddress.ip_address(a.split("%", 1)[0])):
                raise EndpointRefused("the endpoint's host resolves to an address that is not public")
        return found

    async def _resolve(self, host: str, port: int) -> list[str]:
        try:
            async with asyncio.timeout(self.timeout):
                return await self.lookup(host, port)
        except (OSError, TimeoutError):
            raise EndpointRefused("the endpoint's host does not resolve") from None


class GuardedResolver(AbstractResolver):
    """The push sender's resolver: resolves through the :class:`Guard`, so the client connects only to
    addresses that passed it. (Hosts that are IP literals never reach a resolver: the sender checks
    those with :meth:`Guard.check_url` and :meth:`Guard.addresses` before each request.)"""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        try:
            found = await self.guard.addresses(host, port)
        except EndpointRefused as exc:
            raise RefusedAtConnect(f"push endpoint refused: {exc}") from None
        out: list[ResolveResult] = []
        for a in found:
            v6 = ":" in a
            out.append(
                {
                    "hostname": host,
                    "host": a,
                    "port": port,
                    "family": socket.AF_INET6 if v6 else socket.AF_INET,
                    "proto": 0,
                    "flags": socket.AI_NUMERICHOST,
                }
            )
        return out

    async def close(self) -> None:
        return None
