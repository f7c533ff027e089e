"""The Python clients: ``Client`` (WebSocket, asyncio), ``HTTPClient`` (the HTTP API, asyncio) and
``SyncHTTPClient`` (the HTTP API without an event loop). See docs/python-client.md."""

from .calls import ApiError, BatchEntry, PublishResult, RetryPolicy
from .http import HTTPClient
from .sync import SyncHTTPClient
from .ws import (
    EVENTS,
    Client,
    ClientClosed,
    ConnectedEvent,
    ConnectionLost,
    DisconnectEvent,
    GapEvent,
    HistoryPage,
    PresenceEvent,
    ReconnectingEvent,
    RequestError,
    RequestTimeout,
    State,
    SubscribedEvent,
    Subscription,
    TidingsError,
    TokenGetter,
    UnsubscribedEvent,
)

__all__ = [
    "EVENTS",
    "ApiError",
    "BatchEntry",
    "Client",
    "ClientClosed",
    "ConnectedEvent",
    "ConnectionLost",
    "DisconnectEvent",
    "GapEvent",
    "HTTPClient",
    "HistoryPage",
    "PresenceEvent",
    "PublishResult",
    "ReconnectingEvent",
    "RequestError",
    "RequestTimeout",
    "RetryPolicy",
    "State",
    "SubscribedEvent",
    "Subscription",
    "SyncHTTPClient",
    "TidingsError",
    "TokenGetter",
    "UnsubscribedEvent",
]
