"""tidings: a self-hosted real-time push and chat server."""

__version__ = "0.1.0"

from .app import create_app
from .client import ApiError, Client, HTTPClient, RequestError, Subscription
from .config import Namespace, Settings, load_settings
from .protocol import CloseCode, ErrorCode, Publication, StreamPosition

__all__ = [
    "ApiError",
    "Client",
    "CloseCode",
    "ErrorCode",
    "HTTPClient",
    "Namespace",
    "Publication",
    "RequestError",
    "Settings",
    "StreamPosition",
    "Subscription",
    "__version__",
    "create_app",
    "load_settings",
]
