"""``tidings serve`` as a real subprocess, for the multi-node, kill -9 and ``--workers`` tests.

:class:`ServeProcess` is the common part: the command line, the log file its output goes to, and
stopping it by its own PID (SIGTERM, then SIGKILL after a deadline; ``kill9`` for the fault tests).
:class:`Node` is one node on a free loopback port, ready once ``/healthz`` answers; :class:`Deployment`
is ``--workers N`` on a port the supervisor picks itself (read from its "listening on" line).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

import aiohttp

from .conftest import API_KEY
from .redis_servers import free_port

PY = sys.executable


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``cond`` every 20 ms until it is true; TimeoutError(what) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


class ServeProcess:
    """``python -m tidings serve ARGS`` with stdout and stderr appended to ``log``."""

    def __init__(self, args: Sequence[str], log: Path, env: Mapping[str, str] | None = None) -> None:
        self.args = list(args)
        self.log_path = log
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [PY, "-m", "tidings", "serve", *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def check_alive(self) -> None:
        assert self.proc is not None, "not started"
        if self.proc.poll() is not None:
            raise RuntimeError(f"tidings serve exited {self.proc.returncode}:\n{self.text()}")

    def kill9(self) -> None:
        """SIGKILL by PID: no drain, no goodbye to clients or Redis."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (graceful drain), SIGKILL after ``timeout``; the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


class Node(ServeProcess):
    """One ``tidings serve`` process on a free loopback port (``tests/redis_servers.free_port``), with
    the tests' API key and a short Redis position check; started at once, :meth:`ready` waits for it.
    ``settings``: more options as ``TIDINGS_<NAME>`` variables (``presence_ttl="2"``)."""

    def __init__(
        self,
        tmp: Path,
        broker: str,
        name: str,
        *,
        check_interval: float = 0.5,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        **settings: str,
    ) -> None:
        self.name = name
        self.port = free_port()
        env = {
            "TIDINGS_API_KEYS": API_KEY,
            "TIDINGS_REDIS_CHECK_INTERVAL": str(check_interval),
            **(env or {}),
            **{f"TIDINGS_{k.upper()}": v for k, v in settings.items()},  # presence_ttl="2"
        }
        argv = ["--port", str(self.port), "--broker", broker, "--data-dir", str(tmp / name), *args]
        super().__init__(argv, tmp / f"{name}.log", env)
        self.spawn()

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def ready(self, session: aiohttp.ClientSession | None = None, timeout: float = 15.0) -> None:
        """Wait until ``/healthz`` answers 200 (raises with the log if the process exited)."""
        async with contextlib.AsyncExitStack() as stack:
            if session is None:
                session = await stack.enter_async_context(aiohttp.ClientSession())
            async with asyncio.timeout(timeout):
                while True:
                    self.check_alive()
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(f"{self.http}/healthz") as r:
                            if r.status == 200:
                                return
                    await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_nodes(
    tmp: Path, broker: str, names: Sequence[str] = ("a", "b"), **settings: str
) -> AsyncIterator[list[Node]]:
    """Nodes ``names`` on ``broker``, all started at once and ready; each stopped (by its PID) on exit."""
    started = [Node(tmp, broker, name, **settings) for name in names]
    try:
        async with aiohttp.ClientSession() as s:
            for n in started:
                await n.ready(s)
        yield started
    finally:
        for n in started:
            n.stop()


_LISTENING = re.compile(r"(\d+) workers \(pids ([\d ]+)\) listening on http://127\.0\.0\.1:(\d+)")


class Deployment(ServeProcess):
    """``tidings serve --workers N`` on a port it chose itself (``--port 0``); :meth:`start` waits for
    the supervisor's "N workers (pids …) listening on …" line and reads the port and worker pids."""

    def __init__(self, tmp: Path, broker: str, count: int = 2) -> None:
        self.tmp = tmp
        self.count = count
        self.port = 0
        self.pids: list[int] = []
        argv = ["--workers", str(count), "--port", "0", "--broker", broker, "--data-dir", str(tmp / "data")]
        super().__init__(argv, tmp / "serve.log")

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def log(self) -> Path:
        return self.log_path

    def start(self) -> None:
        self.spawn()

        def ready() -> re.Match[str] | None:
            self.check_alive()
            return _LISTENING.search(self.text())

        wait_for(ready, 30, "the workers did not start")
        m = ready()
        assert m is not None
        self.port = int(m[3])
        self.pids = [int(p) for p in m[2].split()]

    def api_key(self) -> str:
        return (self.tmp / "data" / "api-key").read_text().strip()

    def stop(self, timeout: float = 30.0) -> int | None:
        return super().stop(timeout)
