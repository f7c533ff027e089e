"""tidings: a self-hosted real-time push and chat server."""

__version__ = "0.1.0"

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
