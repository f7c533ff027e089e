"""The policy gate: the one place that decides who may do what, for every way in.

Every entry point (``/ws``, ``/chatsocket``, ``/websocket``, the chat page and its form, the HTTP API, and
any transport added later) asks the same questions here:

* :meth:`Policy.authorize` — may this identity subscribe to / publish to / read the history or presence
  of this channel? (channel name rules, namespace rules, ``allow_anonymous``, subscription grants, API
  key roles);
* :meth:`Policy.publication` — the checked publish request: authorized, data size and nesting depth
  checked, publisher info attached;
* :meth:`Session.take` — the command budget (per connection or per address, and per user).

A :class:`Session` is one client as the gate sees it, whatever its transport: its identity, address,
command budget and subscription grants.
"""

from __future__ import annotations

import itertools
import secrets
import time
from typing import Any

from .auth import ANONYMOUS, API_ROLE_FOR, Action, Identity, TokenError, TokenVerifier, check_permission
from .backends.base import PublishRequest
from .config import Namespace, Settings
from .limits import RateLimiter, TokenBucket
from .protocol import ErrorCode, ProtocolError, check_channel, encode_value, parse_idempotency_key

__all__ = ["Policy", "Session"]

NS_CACHE_SIZE = 10_000
_ids = itertools.count(1)


def new_client_id() -> str:
    return f"{next(_ids):x}-{secrets.token_hex(4)}"


class Policy:
    """Channel rules, permissions, sizes and rates, from one :class:`~tidings.config.Settings`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tokens = TokenVerifier(settings)
        self.user_rates = RateLimiter(settings.user_rate, settings.user_rate * 2)
        # For entry points without a connection (the chat page, its form): the budget of one address.
        self.ip_rates = RateLimiter(settings.client_rate, settings.client_rate * 2)
        self._ns_cache: dict[str, Namespace] = {}  # valid channel -> its rules

    def reload(self, settings: Settings) -> None:
        """Decide by ``settings`` from now on (``Node.reload``): rules, token keys, rates. The token
        verifier is built first, so a key file that cannot be loaded (OSError, ValueError) leaves the
        policy as it was."""
        tokens = TokenVerifier(settings)
        self.settings = settings
        self.tokens = tokens
        self.user_rates.set_rate(settings.user_rate, settings.user_rate * 2)
        self.ip_rates.set_rate(settings.client_rate, settings.client_rate * 2)
        self._ns_cache.clear()

    def namespace(self, channel: object, rid: int | str | None = None) -> Namespace:
        """The rules for ``channel``; ProtocolError invalid_field, invalid_channel or unknown_namespace."""
        if isinstance(channel, str):
            known = self._ns_cache.get(channel)
            if known is not None:  # validated before: skip the regex on the hot path
                return known
        channel = check_channel(channel, rid)
        ns = self.settings.namespace_for(channel)
        if ns is None:
            raise ProtocolError(ErrorCode.UNKNOWN_NAMESPACE, f"no namespace configured for {channel!r}", rid)
        if len(self._ns_cache) >= NS_CACHE_SIZE:
            self._ns_cache.clear()
        self._ns_cache[channel] = ns
        return ns

    def authorize(
        self,
        identity: Identity,
        channel: object,
        action: Action,
        *,
        grant: float | None = None,
        rid: int | str | None = None,
    ) -> Namespace:
        """The channel's namespace if ``identity`` may do ``action`` on it; else ProtocolError
        (unauthorized, permission_denied, or a channel error). ``grant``: the expiry of a subscription
        token the client holds for this channel."""
        ns = self.namespace(channel, rid)
        assert isinstance(channel, str)
        key = identity.api_key
        if key is not None:  # a backend: its key's role decides, namespace rules do not apply
            role = API_ROLE_FOR[action]
            if not key.may(role):
                raise ProtocolError(ErrorCode.PERMISSION_DENIED, f"API key {key.name!r} may not {role}", rid)
            return ns
        self.admit(identity, rid)
        granted = grant is not None and grant >= time.time()
        try:
            check_permission(ns, identity, channel, action, granted=granted, rid=rid)
        except ProtocolError as exc:
            if grant is not None and not granted and exc.code is ErrorCode.PERMISSION_DENIED:
                # The one right this client had here was a subscription token, and it ran out.
                raise ProtocolError(ErrorCode.TOKEN_EXPIRED, "the subscription token expired", rid) from None
            raise
        return ns

    def admit(self, identity: Identity, rid: int | str | None = None) -> None:
        """ProtocolError(unauthorized) for an anonymous client on a server that needs tokens."""
        if identity.anonymous and not self.settings.allow_anonymous:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "send connect with a token first", rid)

    def publication(
        self,
        identity: Identity,
        channel: object,
        data: Any,
        *,
        info: Any = None,
        publisher: bytes | None = None,
        grant: float | None = None,
        key: object = None,
        rid: int | str | None = None,
    ) -> PublishRequest:
        """A publish request that passed the gate: authorized, ``data`` (and a backend's ``info``) within
        the size and depth limits, publisher info attached. ``publisher``: the client's encoded
        publisher info (:meth:`Session.publisher_info`), for clients; ``info`` is for backends only.
        ``key``: the request's ``idempotency_key`` as given (checked here)."""
        ns = self.authorize(identity, channel, "publish", grant=grant, rid=rid)
        idempotency_key = parse_idempotency_key(key, rid)
        assert isinstance(channel, str)
        raw = encode_value(data, "data", rid)
        limit = ns.max_message_size or self.settings.max_message_size
        if len(raw) > limit:
            raise ProtocolError(
                ErrorCode.MESSAGE_TOO_LARGE, f"data is {len(raw)} bytes; the limit here is {limit}", rid
            )
        if info is not None:
            if identity.api_key is None:
                raise ProtocolError(ErrorCode.INVALID_FIELD, "only backends attach info", rid)
            if not isinstance(info, dict):
                raise ProtocolError(ErrorCode.INVALID_FIELD, "info must be an object", rid)
            publisher = encode_value(info, "info", rid)
            if len(publisher) > limit:
                raise ProtocolError(
                    ErrorCode.MESSAGE_TOO_LARGE, f"info is {len(publisher)} bytes; the limit is {limit}", rid
                )
        return PublishRequest(channel, raw, ns.history, publisher, idempotency_key)


class Session:
    """One client as the policy gate sees it, on any transport.

    ``bucket`` is the connection's command budget; a session without one (a page request) spends its
    address's budget instead. Every command also spends the user's budget (all their connections)."""

    __slots__ = ("_publisher", "bucket", "client_id", "grants", "identity", "ip", "policy")

    def __init__(self, policy: Policy, ip: str, *, connection: bool = True) -> None:
        self.policy = policy
        self.ip = ip
        self.client_id = new_client_id()
        self.identity = ANONYMOUS
        rate = policy.settings.client_rate
        self.bucket: TokenBucket | None = TokenBucket(rate, rate * 2) if connection else None
        self.grants: dict[str, float] = {}  # channel -> expiry of its subscription token
        self._publisher: bytes | None = None

    @property
    def user(self) -> str:
        return self.identity.user

    def reconfigure(self) -> None:
        """The policy's settings changed (a reload): this connection's command budget follows
        ``client_rate`` from its next command on."""
        if self.bucket is not None:
            rate = self.policy.settings.client_rate
            self.bucket.set_rate(rate, rate * 2)

    def take(self) -> bool:
        """Spend one command from this client's budgets; False when one is exhausted (rate_limited)."""
        ok = self.bucket.take() if self.bucket is not None else self.policy.ip_rates.take(self.ip)
        return ok and self.policy.user_rates.take(self.user or self.client_id)

    def authenticate(self, token: str) -> Identity:
        """Verify a connection token and adopt it (TokenError if bad; a connection cannot change user)."""
        identity = self.policy.tokens.connection(token)
        if not self.identity.anonymous and identity.user != self.identity.user:
            raise TokenError(ErrorCode.PERMISSION_DENIED, "a connection cannot change its user")
        info = identity.info
        if info is not None:
            try:
                encode_value(info, "token info")
            except ProtocolError as exc:
                raise TokenError(ErrorCode.UNAUTHORIZED, exc.message) from None
        self.identity = identity
        self._publisher = None
        return identity

    def grant(self, channel: str, token: str) -> None:
        """Check a subscription token for ``channel`` and remember its expiry."""
        self.grants[channel] = self.policy.tokens.subscription(token, channel, self.identity)

    def authorize(self, channel: object, action: Action, rid: int | str | None = None) -> Namespace:
        grant = self.grants.get(channel) if isinstance(channel, str) else None
        return self.policy.authorize(self.identity, channel, action, grant=grant, rid=rid)

    def publication(
        self, channel: object, data: Any, rid: int | str | None = None, key: str | None = None
    ) -> PublishRequest:
        grant = self.grants.get(channel) if isinstance(channel, str) else None
        return self.policy.publication(
            self.identity, channel, data, publisher=self.publisher_info(), grant=grant, key=key, rid=rid
        )

    def publisher_info(self) -> bytes | None:
        """``{"user", "client", "info"?}`` as JSON bytes for an authenticated client (built once)."""
        if self._publisher is None and self.user:
            info: dict[str, Any] = {"user": self.user, "client": self.client_id}
            if self.identity.info:
                info["info"] = self.identity.info
            self._publisher = encode_value(info, "info")
        return self._publisher

    def still_allowed(self, channel: str) -> ProtocolError | None:
        """Why an existing subscription may no longer go on (its grant expired, the renewed connection
        token no longer allows it), or None."""
        try:
            self.authorize(channel, "subscribe")
        except ProtocolError as exc:
            return exc
        return None
