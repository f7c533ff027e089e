"""The composition root: ``create_app(settings)`` wires config, backend, hub, transports and routes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

from aiohttp import web

from .backends import Broker, BrokerOptions, broker_from_url
from .config import Settings
from .logs import access_log
from .metrics import metrics_listeners
from .node import NODE, Node
from .protocol import CloseCode
from .transports.flush import FLUSHER, Flusher
from .transports.http_api import api_routes, error_middleware
from .transports.pages import page_routes, security_headers
from .transports.push_api import push_routes
from .transports.seed import chatsocket_handler, echo_handler
from .transports.server import check_aiohttp
from .transports.sse import sse_routes
from .transports.websocket import ws_handler
from .transports.wsbase import HEARTBEAT, Heartbeat

__all__ = ["broker_options", "create_app"]

log = logging.getLogger("tidings")
SHUTDOWN_GRACE = 3.0


def broker_options(settings: Settings) -> BrokerOptions:
    """What the broker factories take from the settings."""
    return BrokerOptions(
        sqlite_synchronous=settings.sqlite_synchronous,
        history_cache_bytes=settings.history_cache_bytes,
        max_history_bytes=settings.max_history_bytes,
        idempotency_window=settings.idempotency_window,
        idempotency_max_keys=settings.idempotency_max_keys,
        redis_prefix=settings.redis_prefix,
        redis_timeout=settings.redis_timeout,
        redis_check_interval=settings.redis_check_interval,
        redis_pool_size=settings.redis_pool_size,
        redis_wait_replicas=settings.redis_wait_replicas,
        redis_wait_timeout=settings.redis_wait_timeout,
        redis_pubsub_shards=settings.redis_pubsub_shards,
    )


def create_app(settings: Settings, broker: Broker | None = None) -> web.Application:
    """A ready aiohttp application. ``broker`` overrides the one named by ``settings.broker_url``."""
    check_aiohttp()
    node = Node(settings, broker or broker_from_url(settings.broker_url, broker_options(settings)))
    app = web.Application(
        middlewares=[access_log, security_headers, error_middleware], client_max_size=settings.max_http_body
    )
    app[NODE] = node
    app[FLUSHER] = Flusher()
    app[HEARTBEAT] = heartbeat = Heartbeat(node, settings.ping_interval)
    node.reload_hooks.append(lambda new: heartbeat.set_interval(new.ping_interval))
    app.router.add_routes(api_routes(settings))
    app.router.add_routes(push_routes())
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/websocket", echo_handler)
    app.router.add_get("/chatsocket", chatsocket_handler)
    app.router.add_routes(sse_routes())
    app.router.add_routes(page_routes())

    async def on_startup(app: web.Application) -> None:
        await node.start()
        heartbeat.start()
        gc.collect()
        gc.freeze()  # start-up objects never need scanning again

    async def on_shutdown(app: web.Application) -> None:
        node.draining = True
        heartbeat.stop()
        for conn in list(node.connections):
            conn.close(CloseCode.GOING_AWAY)
        # Give peers a moment to answer the close frame; each connection aborts itself after its grace.
        if node.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(node.drained.wait(), SHUTDOWN_GRACE)

    async def on_cleanup(app: web.Application) -> None:
        await node.close()

    app.on_startup.append(on_startup)
    app.cleanup_ctx.append(metrics_listeners)  # metrics_port; a --workers worker's sibling socket
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app
