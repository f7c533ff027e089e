"""Backends, chosen by URL: memory:// or sqlite:///path."""

from __future__ import annotations

from urllib.parse import urlsplit

from .base import Broker, BrokerError, HistoryOptions, HistoryResult
from .memory import MemoryBroker
from .sqlite import SqliteBroker

__all__ = [
    "Broker",
    "BrokerError",
    "HistoryOptions",
    "HistoryResult",
    "MemoryBroker",
    "SqliteBroker",
    "broker_from_url",
]


def broker_from_url(url: str, *, sqlite_synchronous: str = "normal") -> Broker:
    parts = urlsplit(url)
    if parts.scheme == "memory":
        return MemoryBroker()
    if parts.scheme == "sqlite":
        path = parts.path if not parts.netloc else parts.netloc + parts.path
        if not path:
            raise ValueError("sqlite URL needs a path: sqlite:///path/to/tidings.db")
        return SqliteBroker(path, synchronous=sqlite_synchronous)
    raise ValueError(f"unknown broker URL {url!r}: use memory://, sqlite:///path")
