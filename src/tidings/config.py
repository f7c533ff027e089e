"""One Settings object: CLI > environment (TIDINGS_*) > TOML file (--config) > defaults.

Every option is documented in docs/configuration.md; a test checks that the two list the same names.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .backends.base import HistoryOptions
from .protocol import namespace_of

__all__ = [
    "LIVE_OPTIONS",
    "ApiKey",
    "ConfigError",
    "Namespace",
    "Problem",
    "Settings",
    "check_file",
    "cpu_count",
    "example_config",
    "find_line",
    "load_settings",
    "parse_workers",
    "reloaded",
]

API_ROLES = ("publish", "read", "admin")
SUBSCRIBE_RULES = ("anyone", "authenticated", "token")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the option. ``key``: where in the file, as a
    path of table keys and array indexes (``("namespaces", "chat", "publish")``, ``("api_keys", 1)``),
    when the value came from the file."""

    def __init__(self, message: str, key: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in a configuration file: where (a key path, see :class:`ConfigError`; or a
    line number tomllib gave for a syntax error) and what."""

    key: tuple[str | int, ...]
    message: str
    line: int | None = None


@dataclass(frozen=True, slots=True)
class Namespace:
    """Rules for the channels ``<name>:...``."""

    name: str
    anonymous: bool = True  # anonymous connections may use this namespace at all
    subscribe: str = "anyone"  # who may subscribe/read: anyone | authenticated | token
    personal: bool = False  # "<ns>:<user>" channels belong to that user alone
    publish: bool = False  # clients may publish over /ws (the HTTP API always may)
    history_size: int = 200
    history_ttl: float = 86400.0
    presence: bool = True
    join_leave: bool = False  # push join/leave events to subscribers
    max_message_size: int | None = None  # bytes of encoded data; None: the global max_message_size
    # Web Push (docs/devices.md): false | "always" | "offline" (only devices of users with no live connection)
    push: bool | str = False
    push_ttl: int = 86400  # seconds a push service keeps an undelivered push (the TTL header)
    push_urgency: str = "normal"  # very-low | low | normal | high (the Urgency header)
    push_topic: str = ""  # the Topic header (a newer push with the same topic replaces an undelivered one)

    @property
    def history(self) -> HistoryOptions:
        return HistoryOptions(self.history_size, self.history_ttl)


_NS_KEYS = {f.name for f in fields(Namespace)} - {"name"}


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A named HTTP API key with one role: publish (publish, broadcast), read (history, channels,
    presence) or admin (everything)."""

    name: str
    key: str = field(repr=False)
    role: str = "admin"

    def may(self, role: str) -> bool:
        return self.role == "admin" or self.role == role


def _default_namespaces() -> dict[str, Namespace]:
    return {
        # Works out of the box for the chat page, /chatsocket and anonymous clients.
        "chat": Namespace("chat", anonymous=True, publish=True, history_size=200, join_leave=True),
        # Personal channels user:<id>: only that user reads them; the backend publishes.
        "user": Namespace("user", anonymous=False, personal=True, publish=False, presence=False),
    }


@dataclass(slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8888
    data_dir: Path = Path("tidings-data")
    broker: str = ""  # "" = sqlite:///<data_dir>/tidings.db
    workers: int = 1  # processes accepting on host:port (serve --workers); "auto" = one per CPU
    api_keys: list[ApiKey] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=list)
    trusted_proxies: list[str] = field(default_factory=list)
    public_url: list[str] = field(default_factory=list)  # this server's public origin(s): https://host[:port]
    # Tokens
    token_secret: str = field(default="", repr=False)
    token_public_key: str = ""  # path to a PEM public key (RS256/ES256/...)
    token_jwks: str = ""  # path to a JWKS file
    token_audience: str = ""
    token_issuer: str = ""
    allow_anonymous: bool = True
    auth_timeout: float = 10.0
    # Limits
    max_message_size: int = 65536  # bytes of one incoming WebSocket message (decompressed)
    max_http_body: int = 1 << 20
    max_buffer: int = 1 << 20  # bytes queued for one connection before it is cut off as slow
    max_connections: int = 100_000
    max_connections_per_ip: int = 1000
    max_http_connections: int = (
        0  # plain HTTP connections on this node; 0: as many as the open-files limit leaves
    )
    max_subscriptions: int = 512
    history_cache_bytes: int = 256 << 20  # bytes of recent history kept in memory for reads (sqlite)
    max_history_bytes: int = (
        1 << 30
    )  # bytes of history stored in all; the least recently used channels lose theirs first
    idempotency_window: float = 300.0  # seconds a publish's idempotency_key is remembered
    idempotency_max_keys: int = 100_000  # idempotency keys remembered at most (the oldest go first)
    redis_prefix: str = "tidings"  # the Redis broker's keys start with this
    redis_timeout: float = 5.0  # seconds a Redis call may take before it answers unavailable
    redis_check_interval: float = 2.0  # seconds between the Redis broker's position checks
    redis_pool_size: int = 32  # Redis connections per process (the Pub/Sub ones included)
    redis_wait_replicas: int = 0  # a publish is acknowledged once this many replicas have it (0: off)
    redis_wait_timeout: float = 1.0  # seconds WAIT may take for them (below redis_timeout)
    redis_pubsub_shards: int = 4  # Pub/Sub connections per process; a channel's is crc32(name) % this
    presence_ttl: float = 30.0  # seconds a node's presence outlives its last refresh (shared presence)
    presence_limit: int = 1000  # clients listed in one presence answer (its count is all of them)
    max_fragments: int = 1024  # frames of one incoming WebSocket message
    ws_frame_rate: float = 5000.0  # incoming WebSocket frames per second per connection (burst: twice that)
    ws_inflate_rate: float = (
        4194304.0  # bytes per second that inflating one connection's messages may produce
    )
    client_rate: float = 100.0  # commands per second per connection (burst: twice that)
    user_rate: float = 200.0  # commands per second per user over all their connections
    api_failures_per_minute: int = 10  # failed API key attempts per address before 429
    header_timeout: float = 10.0  # seconds to send the headers of a request
    body_timeout: float = 30.0  # seconds to send a request body, once its headers are in
    keepalive_timeout: float = 75.0  # seconds an idle HTTP keep-alive connection stays open
    ping_interval: float = 25.0
    drain_delay: float = 0.0  # seconds after SIGTERM that /readyz answers 503 before connections close
    sse_retry: float = 2.0  # seconds an EventSource waits before it reconnects (the SSE retry: hint)
    poll_max_timeout: float = 60.0  # the longest timeout a /poll may ask for (seconds)
    compression: bool = False
    echo_raw: bool = False  # /websocket echoes messages verbatim (text and binary), for conformance suites
    sqlite_synchronous: str = "normal"
    log_level: str = "info"
    log_format: str = "text"  # text (for people) | json (one object per line, with access lines)
    metrics: bool = True  # GET /metrics (read/admin key); false: no metrics routes or listeners
    metrics_host: str = "127.0.0.1"  # with metrics_port: where /metrics answers without a key
    metrics_port: int = 0  # 0: none (GET /metrics on the main port, with a key)
    # Web Push (docs/devices.md, docs/security.md)
    push_vapid_private_key: str = ""  # path to the VAPID private key (PEM); "" = <data_dir>/vapid_private.pem
    push_subject: str = ""  # mailto: or https: contact for push services; "" = derived from public_url/host
    push_max_subscriptions_per_user: int = 10  # devices one user (or one anonymous address) registers
    push_max_subscriptions: int = 100_000  # devices registered on the whole server
    push_max_channels: int = 32  # channels one device registers for
    push_allowed_hosts: list[str] = field(default_factory=list)  # hosts/CIDRs exempt from the SSRF rules
    push_queue_size: int = 100_000  # deliveries waiting to be sent (beyond: dropped and counted)
    push_queue_bytes: int = 64 << 20  # payload bytes waiting to be sent (beyond: dropped and counted)
    push_senders: int = 32  # concurrent POSTs to push services per process
    push_timeout: float = 10.0  # seconds one POST to a push service may take in all
    push_max_attempts: int = 5  # tries per delivery (429, 5xx and network errors are retried)
    push_retry_max_delay: float = 300.0  # longest wait between tries (a longer Retry-After gives up)
    namespaces: dict[str, Namespace] = field(default_factory=_default_namespaces)
    # Rules for channels whose namespace is not listed (and names without a namespace); None refuses them.
    default_namespace: Namespace | None = field(default_factory=lambda: Namespace(""))

    @property
    def broker_url(self) -> str:
        return self.broker or f"sqlite:///{(self.data_dir / 'tidings.db').resolve()}"

    def namespace_for(self, channel: str) -> Namespace | None:
        """The rules for ``channel``. Namespace names are case-sensitive; a namespace that differs from a
        configured one only by case (``USER:42`` next to ``user``) has no rules at all (None:
        ``unknown_namespace``), so a typo in case never falls to the permissive default."""
        name = namespace_of(channel)
        ns = self.namespaces.get(name)
        if ns is not None:
            return ns
        folded = name.casefold()
        if any(n.casefold() == folded for n in self.namespaces):
            return None
        return self.default_namespace


_SCALARS: dict[str, type] = {
    "host": str,
    "port": int,
    "data_dir": Path,
    "broker": str,
    "workers": int,
    "token_secret": str,
    "token_public_key": str,
    "token_jwks": str,
    "token_audience": str,
    "token_issuer": str,
    "allow_anonymous": bool,
    "auth_timeout": float,
    "max_message_size": int,
    "max_http_body": int,
    "max_buffer": int,
    "max_connections": int,
    "max_connections_per_ip": int,
    "max_http_connections": int,
    "max_subscriptions": int,
    "history_cache_bytes": int,
    "max_history_bytes": int,
    "idempotency_window": float,
    "idempotency_max_keys": int,
    "redis_prefix": str,
    "redis_timeout": float,
    "redis_check_interval": float,
    "redis_pool_size": int,
    "redis_wait_replicas": int,
    "redis_wait_timeout": float,
    "redis_pubsub_shards": int,
    "presence_ttl": float,
    "presence_limit": int,
    "max_fragments": int,
    "ws_frame_rate": float,
    "ws_inflate_rate": float,
    "client_rate": float,
    "user_rate": float,
    "api_failures_per_minute": int,
    "header_timeout": float,
    "body_timeout": float,
    "keepalive_timeout": float,
    "ping_interval": float,
    "drain_delay": float,
    "sse_retry": float,
    "poll_max_timeout": float,
    "compression": bool,
    "echo_raw": bool,
    "sqlite_synchronous": str,
    "log_level": str,
    "log_format": str,
    "metrics": bool,
    "metrics_host": str,
    "metrics_port": int,
    "push_vapid_private_key": str,
    "push_subject": str,
    "push_max_subscriptions_per_user": int,
    "push_max_subscriptions": int,
    "push_max_channels": int,
    "push_queue_size": int,
    "push_queue_bytes": int,
    "push_senders": int,
    "push_timeout": float,
    "push_max_attempts": int,
    "push_retry_max_delay": float,
}
_POSITIVE: dict[str, float] = {
    "presence_ttl": 0.3,
    "presence_limit": 1,
    "push_senders": 1,
    "push_timeout": 0.1,
    "push_max_attempts": 1,
    "push_max_channels": 1,
}
_CHOICES: dict[str, tuple[str, ...]] = {"log_format": ("text", "json")}
_LISTS = {"api_keys", "allowed_origins", "trusted_proxies", "public_url", "push_allowed_hosts"}
PUSH_MODES = (False, "always", "offline")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
PUSH_URGENCIES = ("very-low", "low", "normal", "high")
_TOPIC = re.compile(r"[A-Za-z0-9_-]{1,32}")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _api_keys(value: Any, problems: list[Problem] | None = None) -> list[ApiKey]:
    """The ``api_keys`` list; with ``problems``, every bad entry is recorded there instead of raised."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise ConfigError("api_keys must be a list")
    keys: list[ApiKey] = []
    for i, item in enumerate(value, 1):
        try:
            keys.append(_api_key(i, item))
        except ConfigError as exc:
            if problems is None:
                raise
            problems.append(Problem(exc.key, str(exc)))
    return keys


def _api_key(i: int, item: Any) -> ApiKey:
    where = ("api_keys", i - 1)
    if isinstance(item, ApiKey):
        key = item
    elif isinstance(item, str):
        key = ApiKey(f"key{i}", item, "admin")
    elif isinstance(item, dict) and isinstance(item.get("key"), str):
        for name in item:
            if name not in ("name", "key", "role"):
                raise ConfigError(
                    f"api_keys[{i}]: unknown option {name!r}{did_you_mean(name, ('name', 'key', 'role'))}",
                    (*where, name),
                )
        role = item.get("role", "admin")
        if role not in API_ROLES:
            raise ConfigError(f"api_keys[{i}].role must be one of {', '.join(API_ROLES)}", (*where, "role"))
        key = ApiKey(str(item.get("name", f"key{i}")), item["key"], role)
    else:
        raise ConfigError(f"api_keys[{i}] must be a string or a table with name, key and role", where)
    if len(key.key) < 16:
        raise ConfigError(f"api key {key.name!r} is shorter than 16 characters", (*where, "key"))
    return key


def _check_public_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise ConfigError(
            f"public_url {url!r} must be an origin like https://chat.example.com or http://host:8888"
        )


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask, so a container's cpuset counts), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def parse_workers(value: Any) -> int:
    """``workers``: a whole number from 1, or ``"auto"`` for :func:`cpu_count`."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return cpu_count()
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"workers: {value!r} is not a number of processes or 'auto'") from None
    if n < 1:
        raise ConfigError("workers must be at least 1 (or 'auto')")
    return n


def _coerce(name: str, value: Any) -> Any:
    if name == "workers":
        return parse_workers(value)
    if name == "api_keys":
        return _api_keys(value)
    if name in _LISTS:
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            items = list(value)
        else:
            raise ConfigError(f"{name} must be a list of strings")
        if name == "public_url":
            for url in items:
                _check_public_url(url)
        if name == "trusted_proxies":
            import ipaddress

            for item in items:
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ConfigError(f"trusted_proxies: {item!r} is not an address or CIDR") from None
        if name == "push_allowed_hosts":
            from .push.guard import parse_allowed

            try:
                parse_allowed(items)
            except ValueError as exc:
                raise ConfigError(f"push_allowed_hosts: {exc}") from None
        return items
    typ = _SCALARS[name]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{name} must be true or false")
    try:
        if typ is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError
        out = typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a valid {typ.__name__}") from None
    if name in _CHOICES and out not in _CHOICES[name]:
        raise ConfigError(f"{name} must be one of {', '.join(_CHOICES[name])}, not {value!r}")
    if typ in (int, float) and out < 0:
        raise ConfigError(f"{name} must not be negative")
    if name == "log_level" and out.lower() not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
    if name in _POSITIVE and out < _POSITIVE[name]:
        raise ConfigError(f"{name} must be at least {_POSITIVE[name]}")
    if (
        name == "push_subject"
        and out
        and not ((out.startswith("mailto:") and "@" in out) or out.startswith("https://"))
    ):
        raise ConfigError("push_subject must be a mailto: address or an https:// URL")
    return out


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known`` (difflib), or ``""``."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _namespace(name: str, raw: Any, base: Namespace | None, problems: list[Problem]) -> Namespace:
    """The namespace ``name`` from its TOML table (over ``base``); what is wrong goes to ``problems``,
    one entry per key (the namespace is then not usable)."""
    where: tuple[str, ...] = ("namespaces", name) if name else ("default_namespace",)
    label = ".".join(where)
    if not isinstance(raw, dict):
        problems.append(Problem(where, f"{label} must be a table"))
        return base or Namespace(name)
    ns = base or Namespace(name)
    for key, value in raw.items():
        if key not in _NS_KEYS:
            hint = (
                " (a server option: put it above the first [table])"
                if key in _SCALARS or key in _LISTS
                else did_you_mean(key, _NS_KEYS)
            )
            problems.append(Problem((*where, key), f"{label}: unknown option {key!r}{hint}"))
            continue
        if key == "push":
            if value not in PUSH_MODES or value is True:
                problems.append(Problem((*where, key), f'{label}.push must be false, "always" or "offline"'))
            else:
                ns = replace(ns, push=value)
            continue
        want = type(getattr(ns, key)) if getattr(ns, key) is not None else int
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            problems.append(Problem((*where, key), f"{label}.{key} must be {want.__name__}"))
            continue
        ns = replace(ns, **{key: value})  # type: ignore[arg-type]
    checks = (
        ("subscribe", ns.subscribe in SUBSCRIBE_RULES, f"must be one of {', '.join(SUBSCRIBE_RULES)}"),
        ("push_urgency", ns.push_urgency in PUSH_URGENCIES, f"must be one of {', '.join(PUSH_URGENCIES)}"),
        ("push_ttl", ns.push_ttl >= 0, "must not be negative"),
        (
            "push_topic",
            not ns.push_topic or bool(_TOPIC.fullmatch(ns.push_topic)),
            "must be 1 to 32 characters of A-Z a-z 0-9 _ -",
        ),
        ("history_size", ns.history_size >= 0, "must not be negative"),
        ("history_ttl", ns.history_ttl >= 0, "must not be negative"),
    )
    for key, ok, what in checks:
        if not ok:
            problems.append(Problem((*where, key), f"{label}.{key} {what}"))
    return ns


_TOP_KEYS = frozenset((*_SCALARS, *_LISTS, "namespaces", "default_namespace"))


def _apply_file(s: Settings, raw: dict[str, Any]) -> list[Problem]:
    """Apply a parsed TOML file to ``s``; every problem found (none: all of it applied)."""
    problems: list[Problem] = []
    for key, value in raw.items():
        if key == "namespaces":
            if not isinstance(value, dict):
                problems.append(Problem((key,), "namespaces must be a table"))
                continue
            # Listed namespaces start from the shipped ones of the same name (chat, user) and override them.
            s.namespaces = {
                **s.namespaces,
                **{n: _namespace(n, ns, s.namespaces.get(n), problems) for n, ns in value.items()},
            }
        elif key == "default_namespace":
            s.default_namespace = None if value is False else _namespace("", value, None, problems)
        elif key not in _TOP_KEYS:
            problems.append(Problem((key,), f"unknown option {key!r}{did_you_mean(key, _TOP_KEYS)}"))
        elif key == "api_keys" and isinstance(value, list):
            s.api_keys = _api_keys(value, problems)
        else:
            try:
                setattr(s, key, _coerce(key, value))
            except ConfigError as exc:
                problems.append(Problem(exc.key or (key,), str(exc)))
    return problems


def _read_file(path: str | Path) -> tuple[str, dict[str, Any]]:
    """The file's text and its parsed TOML; ConfigError (with the line of a syntax error) if neither."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}:{_toml_error_line(exc, text)}: {exc}") from None


def _toml_error_line(exc: tomllib.TOMLDecodeError, text: str) -> int:
    """The line of a TOML syntax error: tomllib's ``lineno`` (Python 3.14+), else the one its message
    names ("at line N"), else the last line ("at end of document")."""
    lineno = getattr(exc, "lineno", None)
    if isinstance(lineno, int):
        return lineno
    m = re.search(r"at line (\d+)", str(exc))
    return int(m[1]) if m else max(1, len(text.splitlines()))


def _format(path: str | Path, text: str, problems: list[Problem]) -> list[str]:
    return [f"{path}:{p.line or find_line(text, p.key)}: {p.message}" for p in problems]


def load_settings(
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Settings:
    """Build Settings from defaults, then the TOML file, then TIDINGS_* variables, then CLI values.

    A file with problems is refused whole: ConfigError listing every one of them as ``FILE:LINE:
    message``, one per line."""
    env = os.environ if env is None else env
    s = Settings()
    path = config_file or env.get("TIDINGS_CONFIG")
    if path:
        text, raw = _read_file(path)
        problems = _apply_file(s, raw)
        if problems:
            raise ConfigError("\n".join(_format(path, text, problems)))
    for key in (*_SCALARS, *_LISTS):
        value = env.get(f"TIDINGS_{key.upper()}")
        if not value and key == "api_keys":
            # The CLI clients read TIDINGS_API_KEY: one name exported for both sides must work on both.
            value = env.get("TIDINGS_API_KEY") or value
        if value is not None:
            setattr(s, key, _coerce(key, value))
    for key, value in (cli or {}).items():
        if value is not None:
            setattr(s, key, _coerce(key, value))
    return s


def check_file(path: str | Path) -> list[str]:
    """``tidings config check``: every problem of a configuration file as ``FILE:LINE: message`` (an
    empty list: the file is valid, and ``serve --config`` takes it). The same validation as
    :func:`load_settings`, plus what ``serve`` checks only when it starts (the token key files)."""
    try:
        text, raw = _read_file(path)
    except ConfigError as exc:
        return [str(exc)]
    s = Settings()
    problems = _apply_file(s, raw)
    return _format(path, text, problems + start_problems(s))


def start_problems(s: Settings) -> list[Problem]:
    """What only a start (or a reload) finds: token key files that cannot be read or parsed."""
    from .auth import TokenVerifier

    problems: list[Problem] = []
    for key, alone in (
        ("token_public_key", replace(s, token_jwks="")),
        ("token_jwks", replace(s, token_public_key="")),
    ):
        if getattr(s, key):
            try:
                TokenVerifier(alone)  # the one loader of these files
            except Exception as exc:  # OSError, JSON and PyJWT's own errors
                problems.append(Problem((key,), f"{key}: cannot load {getattr(s, key)!r}: {exc}"))
    return problems


# ---------------------------------------------------------------------------------------------- lines

# How a problem gets its line: tomllib reports no positions for keys, so the file's text is scanned once,
# line by line, keeping the current table header ([a.b] or [[a]], array tables counted per path) and
# reading the dotted key left of each "=". A line's key path is the header's path plus its own key; a
# problem is put on the first line whose path equals its key path, else on the line of the longest prefix
# of it that has one (a key inside an inline table gets the line of the table's key), else on line 1.
# Lines inside multi-line strings are skipped.

_KEY_PART = re.compile(r"""\s*([A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')\s*""")


def _parse_key(text: str) -> tuple[list[str], str] | None:
    """A dotted TOML key at the start of ``text``: its parts and the rest of the text; None if none."""
    parts: list[str] = []
    pos = 0
    while True:
        m = _KEY_PART.match(text, pos)
        if m is None:
            return None
        part = m[1]
        parts.append(part[1:-1] if part[0] in "\"'" else part)
        pos = m.end()
        if text.startswith(".", pos):
            pos += 1
            continue
        return parts, text[pos:]


def _key_lines(text: str) -> Iterator[tuple[tuple[str | int, ...], int]]:
    """Each table header and key of a TOML text: (its full key path, its line number)."""
    table: tuple[str | int, ...] = ()
    arrays: dict[tuple[str | int, ...], int] = {}
    in_string: str | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if in_string is not None:
            if line.count(in_string) % 2 == 1:
                in_string = None
            continue
        stripped = line.strip()
        if stripped.startswith("["):
            array = stripped.startswith("[[")
            parsed = _parse_key(stripped[2:] if array else stripped[1:])
            if parsed is None:
                continue
            path: tuple[str | int, ...] = tuple(parsed[0])
            if array:
                arrays[path] = arrays.get(path, -1) + 1
                path = (*path, arrays[path])
            else:  # a table under an array table: [[a]] then [a.b] is a.<last>.b
                for prefix, index in arrays.items():
                    if path[: len(prefix)] == prefix:
                        path = (*prefix, index, *path[len(prefix) :])
                        break
            table = path
            yield table, n
            continue
        parsed = _parse_key(stripped)
        if parsed is None or not parsed[1].startswith("="):
            continue
        yield (*table, *parsed[0]), n
        rest = parsed[1][1:]
        for quote in ('"""', "'''"):
            if rest.count(quote) % 2 == 1:
                in_string = quote


def find_line(text: str, key: tuple[str | int, ...]) -> int:
    """The line of ``key`` (a key path) in a TOML text: see the method above."""
    best, best_len = 1, 0
    for path, n in _key_lines(text):
        if path == key:
            return n
        if best_len < len(path) < len(key) and key[: len(path)] == path:
            best, best_len = n, len(path)
    return best


# ---------------------------------------------------------------------------------------------- reload

# Options a reload (SIGHUP, ``tidings reload``) applies to the running server; every other option keeps
# its running value until a restart (the reload says which ones changed). docs/configuration.md lists
# both; a test checks it does. Options added later are restart-only until they are listed here.
LIVE_OPTIONS = frozenset(
    {
        "api_keys",
        "allowed_origins",
        "trusted_proxies",
        "public_url",
        "token_secret",
        "token_public_key",
        "token_jwks",
        "token_audience",
        "token_issuer",
        "allow_anonymous",
        "auth_timeout",
        "max_message_size",
        "max_buffer",
        "max_connections",
        "max_connections_per_ip",
        "max_http_connections",
        "max_subscriptions",
        "max_fragments",
        "ws_frame_rate",
        "ws_inflate_rate",
        "client_rate",
        "user_rate",
        "api_failures_per_minute",
        "header_timeout",
        "body_timeout",
        "ping_interval",
        "sse_retry",
        "poll_max_timeout",
        "compression",
        "echo_raw",
        "log_level",
        "push_max_subscriptions_per_user",
        "push_max_subscriptions",
        "push_max_channels",
        "namespaces",
        "default_namespace",
    }
)


def reloaded(running: Settings, before: Settings, after: Settings) -> tuple[Settings, list[str], list[str]]:
    """What a reload applies. ``before``/``after``: the settings as loaded (file, environment and
    command line) at the last (re)load and now; ``running``: what the server runs with (``before`` after
    start-up adjustments, such as the port a worker got, or a generated API key). Returns the settings to
    run with (``after``'s live options, ``running``'s others), the live options that changed, and the
    other options that changed but are kept until a restart."""
    new = replace(running)
    live: list[str] = []
    kept: list[str] = []
    for f in fields(Settings):
        if getattr(before, f.name) == getattr(after, f.name):
            continue
        if f.name in LIVE_OPTIONS:
            setattr(new, f.name, getattr(after, f.name))
            live.append(f.name)
        else:
            kept.append(f.name)
    return new, live, kept


def example_config() -> str:
    """``tidings config example``: every option with its default and what it means (example.toml)."""
    return (Path(__file__).parent / "example.toml").read_text()
