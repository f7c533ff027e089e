"""A small loopback TCP load balancer for the fault tests: how users deploy several nodes (no sticky
sessions), made small enough to read.

It accepts on a free loopback port and forwards each TCP connection, bytes unchanged, to a backend:
``"first"`` (the first live backend of the list: every client lands on one node until it dies) or
``"round_robin"``. A backend whose connect fails (refused, or no answer within ``connect_timeout``) is
dropped from the list and the next one is tried, so a client that reconnects after its node was killed
lands on a surviving one. When either side of a forwarded connection closes, the other is closed too (a
killed node's clients see their connection drop, as behind a real balancer).

Bounded: it stops by itself after ``lifetime`` seconds (closing every connection), and on
:meth:`close` / leaving ``async with``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import Counter
from collections.abc import Sequence
from typing import Literal

Backend = tuple[str, int]
HOST = "127.0.0.1"


class TcpBalancer:
    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        mode: Literal["first", "round_robin"] = "first",
        connect_timeout: float = 1.0,
        lifetime: float = 300.0,
    ) -> None:
        self.backends = list(backends)  # live backends, in preference order
        self.mode = mode
        self.connect_timeout = connect_timeout
        self.lifetime = lifetime
        self.dropped: list[Backend] = []  # backends whose connect failed, in that order
        self.accepted = 0
        self.forwarded: Counter[Backend] = Counter()  # connections forwarded, per backend
        self.refused = 0  # client connections closed because no backend was left
        self.port = 0
        self._rr = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def start(self) -> TcpBalancer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._accept, sock=sock, backlog=256)
        self._timer = asyncio.get_running_loop().call_later(self.lifetime, self._expire)
        return self

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}/ws"

    def _expire(self) -> None:
        task = asyncio.get_running_loop().create_task(self.close())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    def cut(self) -> int:
        """A network failure: reset every forwarded connection now (both sides, RST); new connections are
        still accepted (empty :attr:`backends` first to keep clients out). Returns how many were cut."""
        writers = list(self._writers)
        for w in writers:
            w.transport.abort()
        return len(writers)

    async def __aenter__(self) -> TcpBalancer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _order(self) -> list[Backend]:
        live = list(self.backends)
        if self.mode == "round_robin" and live:
            k = self._rr % len(live)
            self._rr += 1
            live = live[k:] + live[:k]
        return live

    async def _connect(self) -> tuple[Backend, asyncio.StreamReader, asyncio.StreamWriter] | None:
        for backend in self._order():
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(*backend), self.connect_timeout)
            except (OSError, TimeoutError):
                if backend in self.backends:
                    self.backends.remove(backend)
                    self.dropped.append(backend)
                continue
            return backend, r, w
        return None

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        self._writers.add(cwriter)
        try:
            up = await self._connect()
            if up is None:
                self.refused += 1
                return
            backend, breader, bwriter = up
            self.forwarded[backend] += 1
            self._writers.add(bwriter)
            try:
                pipes = [
                    asyncio.ensure_future(_pipe(creader, bwriter)),
                    asyncio.ensure_future(_pipe(breader, cwriter)),
                ]
                try:
                    # Either side closing ends the forwarded connection: no half-open leftovers.
                    await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for p in pipes:
                        p.cancel()
                    await asyncio.gather(*pipes, return_exceptions=True)
            finally:
                self._writers.discard(bwriter)
                bwriter.close()
        finally:
            self._writers.discard(cwriter)
            cwriter.close()
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while True:
            data = await reader.read(65536)
            if not data:
                return
            writer.write(data)
            await writer.drain()
