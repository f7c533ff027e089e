"""A real tidings server for the Node tests of ``insufficient_state`` (insufficient-state.test.mjs).

The memory broker as one node of a multi-node deployment sees a Pub/Sub that drops messages: while a
channel is in the dropped set its publications are stored (history has them) but never reach this node's
live fan-out. Two test-only routes drive it:

- ``POST /_test/drop`` ``{"channel": ..., "on": true|false}``: start / stop dropping the channel's live
  publications;
- ``POST /_test/lost`` ``{"channel": ...}``: ``node.subscriptions.lost(channel)``, the call a broker makes
  when it cannot repair the gap: every ``/ws`` subscriber of the channel gets the ``unsubscribe`` push
  with code ``insufficient_state``.

Usage: ``python lossy_server.py --port N --config FILE`` (prints ``listening on`` when ready).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from tidings.app import create_app
from tidings.config import load_settings
from tidings.node import NODE
from tidings.transports.server import make_runner

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository, for tests.lossy
from tests.lossy import LossyBroker


async def main(port: int, config: str) -> None:
    settings = load_settings({"host": "127.0.0.1", "port": port}, config_file=config)
    broker = LossyBroker()
    app = create_app(settings, broker)

    async def drop(request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        if body.get("on", True):
            broker.dropping.add(body["channel"])
        else:
            broker.dropping.discard(body["channel"])
        return web.json_response({"dropping": sorted(broker.dropping)})

    async def lost(request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        request.app[NODE].subscriptions.lost(body["channel"])
        return web.json_response({"lost": body["channel"]})

    app.router.add_post("/_test/drop", drop)
    app.router.add_post("/_test/lost", lost)
    runner = make_runner(app, settings.header_timeout, access_log=None, shutdown_timeout=2)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"lossy tidings listening on http://127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--config", required=True)
    args, _ = parser.parse_known_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(args.port, args.config))
