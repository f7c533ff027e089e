"""One Settings object: CLI > environment (TIDINGS_*) > TOML file (--config) > defaults.

Every option is documented in docs/configuration.md; a test checks that the two list the same names.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .backends.base import HistoryOptions
from .protocol import namespace_of

__all__ = ["ConfigError", "Namespace", "Settings", "load_settings"]


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the option."""


@dataclass(frozen=True, slots=True)
class Namespace:
    """Rules for the channels ``<name>:...``."""

    name: str
    anonymous: bool = True  # anonymous connections may subscribe and read history
    publish: bool = False  # clients may publish over /ws (the HTTP API always may)
    history_size: int = 200
    history_ttl: float = 86400.0
    presence: bool = True
    join_leave: bool = False  # push join/leave events to subscribers
    max_message_size: int | None = None  # bytes of encoded data; None: the global max_message_size

    @property
    def history(self) -> HistoryOptions:
        return HistoryOptions(self.history_size, self.history_ttl)


_NS_KEYS = {f.name for f in fields(Namespace)} - {"name"}


def _default_namespaces() -> dict[str, Namespace]:
    # The chat namespace works out of the box for the page, /chatsocket and anonymous clients.
    return {"chat": Namespace("chat", anonymous=True, publish=True, history_size=200, join_leave=True)}


@dataclass(slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8888
    data_dir: Path = Path("tidings-data")
    broker: str = ""  # "" = sqlite:///<data_dir>/tidings.db
    api_keys: list[str] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=list)
    max_message_size: int = 65536  # bytes of one incoming WebSocket message
    max_http_body: int = 1 << 20
    max_buffer: int = 1 << 20  # bytes queued for one connection before it is cut off as slow
    ping_interval: float = 25.0
    sqlite_synchronous: str = "normal"
    log_level: str = "info"
    namespaces: dict[str, Namespace] = field(default_factory=_default_namespaces)
    # Rules for channels whose namespace is not listed (and names without a namespace); None refuses them.
    default_namespace: Namespace | None = field(default_factory=lambda: Namespace(""))

    @property
    def broker_url(self) -> str:
        return self.broker or f"sqlite:///{(self.data_dir / 'tidings.db').resolve()}"

    def namespace_for(self, channel: str) -> Namespace | None:
        ns = self.namespaces.get(namespace_of(channel))
        return ns if ns is not None else self.default_namespace


_SCALARS: dict[str, type] = {
    "host": str,
    "port": int,
    "data_dir": Path,
    "broker": str,
    "max_message_size": int,
    "max_http_body": int,
    "max_buffer": int,
    "ping_interval": float,
    "sqlite_synchronous": str,
    "log_level": str,
}
_LISTS = {"api_keys", "allowed_origins"}


def _coerce(name: str, value: Any) -> Any:
    if name in _LISTS:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{name} must be a list of strings")
    typ = _SCALARS[name]
    try:
        if typ is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError
        out = typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a valid {typ.__name__}") from None
    if typ in (int, float) and out < 0:
        raise ConfigError(f"{name} must not be negative")
    return out


def _namespace(name: str, raw: Any) -> Namespace:
    if not isinstance(raw, dict):
        raise ConfigError(f"namespaces.{name} must be a table")
    unknown = set(raw) - _NS_KEYS
    if unknown:
        raise ConfigError(f"namespaces.{name}: unknown option(s) {', '.join(sorted(unknown))}")
    ns = Namespace(name)
    for key, value in raw.items():
        want = type(getattr(ns, key)) if getattr(ns, key) is not None else int
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(f"namespaces.{name}.{key} must be {want.__name__}")
        ns = replace(ns, **{key: value})  # type: ignore[arg-type]
    return ns


def load_settings(
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Settings:
    """Build Settings from defaults, then the TOML file, then TIDINGS_* variables, then CLI values."""
    env = os.environ if env is None else env
    s = Settings()
    path = config_file or env.get("TIDINGS_CONFIG")
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        namespaces = raw.pop("namespaces", None)
        default_ns = raw.pop("default_namespace", ...)
        for key, value in raw.items():
            if key not in _SCALARS and key not in _LISTS:
                raise ConfigError(f"unknown option {key!r} in {path}")
            setattr(s, key, _coerce(key, value))
        if namespaces is not None:
            if not isinstance(namespaces, dict):
                raise ConfigError("namespaces must be a table")
            s.namespaces = {name: _namespace(name, ns) for name, ns in namespaces.items()}
        if default_ns is not ...:
            s.default_namespace = None if default_ns is False else _namespace("", default_ns)
    for key in (*_SCALARS, *_LISTS):
        value = env.get(f"TIDINGS_{key.upper()}")
        if value is not None:
            setattr(s, key, _coerce(key, value))
    for key, value in (cli or {}).items():
        if value is not None:
            setattr(s, key, _coerce(key, value))
    return s
