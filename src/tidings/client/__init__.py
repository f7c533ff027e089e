"""The Python clients: ``Client`` (WebSocket, asyncio) and ``HTTPClient`` (the HTTP API)."""

from .http import ApiError, HTTPClient
from .ws import Client, ClientClosed, ConnectionLost, HistoryPage, RequestError, Subscription

__all__ = [
    "ApiError",
    "Client",
    "ClientClosed",
    "ConnectionLost",
    "HTTPClient",
    "HistoryPage",
    "RequestError",
    "Subscription",
]
