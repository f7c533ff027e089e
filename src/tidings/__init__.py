"""tidings: a self-hosted real-time push and chat server."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("tidings")  # one place: pyproject.toml's version, via the installed metadata
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0.0.0+unknown"

from .app import create_app
from .client import (
    ApiError,
    BatchEntry,
    Client,
    ClientClosed,
    ConnectionLost,
    HTTPClient,
    RequestError,
    RequestTimeout,
    Subscription,
    SyncHTTPClient,
    TidingsError,
)
from .config import Namespace, Settings, load_settings
from .protocol import CloseCode, ErrorCode, Publication, StreamPosition

__all__ = [
    "ApiError",
    "BatchEntry",
    "Client",
    "ClientClosed",
    "CloseCode",
    "ConnectionLost",
    "ErrorCode",
    "HTTPClient",
    "Namespace",
    "Publication",
    "RequestError",
    "RequestTimeout",
    "Settings",
    "StreamPosition",
    "Subscription",
    "SyncHTTPClient",
    "TidingsError",
    "__version__",
    "create_app",
    "load_settings",
]
