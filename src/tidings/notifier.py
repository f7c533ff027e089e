"""``tidings subscribe --state/--exec/--notify``: the command line as a notifier (docs/devices.md).

The connection, reconnects and recovery are the client's (:class:`tidings.client.Client` with
``since``); this module adds a position that outlives the process (:class:`StateFile`) and the work done
per message (:class:`Notifier`): print, run ``--exec``, show ``--notify``, then save the position, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from .client import GapEvent
from .protocol import Publication, StreamPosition

__all__ = ["ExecSpec", "Notifier", "StateError", "StateFile", "notify_body"]

STATE_VERSION: Final = 1
MAX_STATE_BYTES: Final = 4 * 1024 * 1024  # a state file larger than this is not ours
NOTIFY_BODY_CHARS: Final = 1000


class StateError(Exception):
    """The state file cannot be read or written (the CLI says it in one line and exits 2)."""


class StateFile:
    """``{"version": 1, "channels": {"<channel>": {"offset": N, "epoch": "E"}}}``, replaced atomically
    (temp file in the same directory, fsync, rename, fsync of the directory; mode 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.positions: dict[str, StreamPosition] = {}
        self.writes = 0

    def load(self) -> None:
        try:
            with self.path.open("rb") as f:
                raw = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StateError(f"state file {self.path}: cannot read: {exc.strerror or exc}") from None
        if len(raw) > MAX_STATE_BYTES:
            raise StateError(f"state file {self.path}: larger than {MAX_STATE_BYTES} bytes")
        try:
            obj = orjson.loads(raw)
            if not isinstance(obj, dict) or obj.get("version") != STATE_VERSION:
                raise ValueError(f"not a version-{STATE_VERSION} tidings state file")
            channels = obj["channels"]
            if not isinstance(channels, dict):
                raise ValueError('"channels" is not an object')
            positions = {}
            for ch, pos in channels.items():
                off, epoch = pos["offset"], pos["epoch"]
                if not isinstance(off, int) or isinstance(off, bool) or off < 0 or not isinstance(epoch, str):
                    raise ValueError(f"bad position for {ch!r}")
                positions[ch] = StreamPosition(off, epoch)
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(
                f"state file {self.path} is corrupt ({exc}); move it away to start from the current position"
            ) from None
        self.positions = positions

    def set(self, channel: str, pos: StreamPosition) -> None:
        if self.positions.get(channel) == pos:
            return
        self.positions[channel] = pos
        self.save()

    def save(self) -> None:
        body = orjson.dumps(
            {
                "version": STATE_VERSION,
                "channels": {ch: {"offset": p.offset, "epoch": p.epoch} for ch, p in self.positions.items()},
            }
        )
        directory = self.path.parent
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        except OSError as exc:
            raise StateError(f"state file {self.path}: cannot write: {exc.strerror or exc}") from None
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StateError(f"state file {self.path}: cannot write: {exc.strerror or exc}") from None
        with contextlib.suppress(OSError):  # the rename itself durable
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self.writes += 1


def notify_body(data: Any) -> str:
    """The notification text: ``data["text"]`` when it is a string, a string ``data`` as it is, else
    the data's JSON; at most NOTIFY_BODY_CHARS characters."""
    if isinstance(data, dict) and isinstance(data.get("text"), str):
        text: str = data["text"]
    elif isinstance(data, str):
        text = data
    else:
        text = orjson.dumps(data).decode()
    return text if len(text) <= NOTIFY_BODY_CHARS else text[: NOTIFY_BODY_CHARS - 1] + "…"


@dataclass(slots=True)
class ExecSpec:
    command: str | None
    notify_send: str | None  # the path of notify-send, when --notify
    timeout: float
    concurrency: int


@dataclass(slots=True)
class _Item:
    channel: str
    position: StreamPosition
    pub: Publication | None  # None: a position the server moved us to (a gap), nothing to run
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Notifier:
    """Messages and gaps of every channel, in the order the client delivered them: each message is
    printed, its ``--exec``/``--notify`` run (at most ``concurrency`` at a time), and a channel's position
    is saved once that message and every earlier one of the channel finished (at-least-once)."""

    def __init__(self, spec: ExecSpec, state: StateFile | None) -> None:
        self.spec = spec
        self.state = state
        self._inbox: asyncio.Queue[_Item] = asyncio.Queue()
        self._order: dict[str, deque[_Item]] = {}
        self._slots = asyncio.Semaphore(max(1, spec.concurrency))
        self._tasks: set[asyncio.Task[None]] = set()
        self.failures = 0
        # set when the state file cannot be written: the CLI stops (exit 2) rather than go on unsaved
        self.broken: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # called by the client's events, synchronously, in delivery order
    def on_message(self, pub: Publication) -> None:
        self._inbox.put_nowait(_Item(pub.channel, StreamPosition(pub.offset, pub.epoch), pub))

    def on_gap(self, event: GapEvent) -> None:
        why = {
            "not_recovered": "the server no longer holds them",
            "epoch": "the channel's stream restarted (new epoch)",
            "missing": f"offsets {event.missing} were skipped",
        }[event.reason]
        since = f" after offset {event.previous.offset}" if event.previous is not None else ""
        print(
            f"tidings: {event.channel}: messages{since} may have been missed ({why}); "
            f"continuing from offset {event.position.offset}",
            file=sys.stderr,
            flush=True,
        )
        if event.reason != "missing":  # "missing": the message after the hole comes next and is saved
            self._inbox.put_nowait(_Item(event.channel, event.position, None))

    async def run(self) -> None:
        """Handle items until cancelled."""
        try:
            while True:
                item = await self._inbox.get()
                try:
                    await self._start(item)
                finally:
                    self._inbox.task_done()
        finally:
            for task in list(self._tasks):
                task.cancel()

    async def _start(self, item: _Item) -> None:
        self._order.setdefault(item.channel, deque()).append(item)
        if item.pub is None:
            item.done.set()
            self._advance(item.channel)
            return
        sys.stdout.write(orjson.dumps(item.pub.to_json()).decode() + "\n")
        sys.stdout.flush()
        if self.spec.command is None and self.spec.notify_send is None:
            item.done.set()
            self._advance(item.channel)
            return
        await self._slots.acquire()  # with concurrency 1: the previous one finished
        task = asyncio.get_running_loop().create_task(self._work(item))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _work(self, item: _Item) -> None:
        assert item.pub is not None
        try:
            if self.spec.command is not None:
                await self._exec(item.pub)
            if self.spec.notify_send is not None:
                await self._notify(item.pub)
        except Exception as exc:  # never fatal, never silent
            self._failed(f"{item.channel} offset {item.position.offset}: {exc!r}")
        finally:
            self._slots.release()
            item.done.set()
            self._advance(item.channel)

    def _advance(self, channel: str) -> None:
        """Save the position of the last finished item before the first unfinished one of ``channel``."""
        order = self._order[channel]
        last: _Item | None = None
        while order and order[0].done.is_set():
            last = order.popleft()
        if last is not None and self.state is not None:
            try:
                self.state.set(channel, last.position)
            except StateError as exc:
                if not self.broken.done():
                    self.broken.set_exception(exc)

    async def flush(self) -> None:
        """Wait until every message received so far was handled."""
        await self._inbox.join()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def environment(self, pub: Publication) -> dict[str, str]:
        return {
            **os.environ,
            "TIDINGS_CHANNEL": pub.channel,
            "TIDINGS_OFFSET": str(pub.offset),
            "TIDINGS_EPOCH": pub.epoch,
            "TIDINGS_ID": pub.id,
            "TIDINGS_DATA": orjson.dumps(pub.data).decode(),
        }

    async def _exec(self, pub: Publication) -> None:
        assert self.spec.command is not None
        stdin = orjson.dumps(pub.to_json()) + b"\n"
        await self._spawn(
            "--exec",
            pub,
            ["/bin/sh", "-c", self.spec.command],
            stdin,
            self.environment(pub),
        )

    async def _notify(self, pub: Publication) -> None:
        assert self.spec.notify_send is not None
        argv = [self.spec.notify_send, "--app-name=tidings", "--", pub.channel, notify_body(pub.data)]
        await self._spawn("--notify", pub, argv, b"", None)

    async def _spawn(
        self, what: str, pub: Publication, argv: list[str], stdin: bytes, env: Mapping[str, str] | None
    ) -> None:
        """Run ``argv`` (its stdout and stderr go to our stderr: stdout stays JSON lines) within the
        timeout; a failure is one line on stderr, never fatal."""
        where = f"{pub.channel} offset {pub.offset}"
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=sys.stderr.fileno(),
                stderr=sys.stderr.fileno(),
                env=dict(env) if env is not None else None,
                start_new_session=True,  # its own process group: a timeout ends the whole command
            )
        except OSError as exc:
            self._failed(f"{what} for {where}: cannot start: {exc.strerror or exc}")
            return
        try:
            async with asyncio.timeout(self.spec.timeout):
                assert proc.stdin is not None
                # a command that does not read its stdin may have exited already
                with contextlib.suppress(BrokenPipeError, ConnectionResetError, RuntimeError):
                    proc.stdin.write(stdin)
                    await proc.stdin.drain()
                with contextlib.suppress(RuntimeError):
                    proc.stdin.close()
                code = await proc.wait()
        except TimeoutError:
            self._kill(proc)
            await proc.wait()
            self._failed(f"{what} for {where}: killed after {self.spec.timeout:g}s (--exec-timeout)")
            return
        except asyncio.CancelledError:
            self._kill(proc)
            raise
        if code != 0:
            self._failed(f"{what} for {where}: exited with {code}")

    @staticmethod
    def _kill(proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def _failed(self, line: str) -> None:
        self.failures += 1
        print(f"tidings: {line}", file=sys.stderr, flush=True)


def find_notify_send() -> str | None:
    return shutil.which("notify-send")
