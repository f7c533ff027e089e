"""``tidings serve --workers N``: one supervisor process and N worker processes on one port.

The **supervisor** serves no client and runs no event loop. Before any worker starts it has validated the
configuration, refused a broker that cannot be shared (memory://, sqlite://), created the API key file in
the data dir (so workers never race on a first start) and reserved the port (:func:`reserve_port`). Then
it starts the workers, each a fresh ``python -m tidings serve ...`` with the same arguments and
environment plus :data:`WORKER_ENV` (``index,count,port,supervisor pid,ready fd``). Worker 1 starts
alone: a start-up error (a bad broker URL, Redis unreachable) is then reported once, by that worker, and
the supervisor exits with its exit code. The others start together once it is ready.

A **worker** is an ordinary ``tidings serve``: its own event loop, broker connection, open-files budget
and connection limits. It binds the same host:port with ``SO_REUSEPORT`` (the kernel spreads new
connections over the listening sockets), writes ``ready`` to its ready pipe once it listens, and asks
the kernel for SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``; elsewhere it polls ``getppid``),
so it drains and exits instead of living on as an orphan.

While running, the supervisor restarts a worker that exits (at once the first time, then after 1, 2, 4 s
...), and gives up (stops every worker, exits 1) when one worker exited :data:`RESTART_LIMIT` times within
:data:`RESTART_WINDOW` seconds. A worker that could not start again because its broker is unreachable
(exit status :data:`EXIT_BROKER_UNAVAILABLE`, e.g. Redis down while the worker was being restarted) is not
a crash loop: it is started again every few seconds (backoff up to :data:`MAX_RESTART_DELAY`), for as long
as it takes, while the other workers keep serving. SIGTERM or SIGINT is forwarded to every worker; each
drains (closes its WebSockets with 1001 and finishes its requests) and the supervisor exits 0 once all
are gone, or kills what is left after :data:`DRAIN_TIMEOUT` seconds and exits 1.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

__all__ = [
    "DRAIN_TIMEOUT",
    "EXIT_BROKER_UNAVAILABLE",
    "RESTART_LIMIT",
    "RESTART_WINDOW",
    "WORKER_ENV",
    "Supervisor",
    "WorkerInfo",
    "notify_ready",
    "reserve_port",
    "restart_delay",
    "tie_to_supervisor",
    "watch_supervisor",
    "worker_info",
]

log = logging.getLogger("tidings.supervisor")

WORKER_ENV = "_TIDINGS_WORKER"  # internal: set by the supervisor in each worker's environment
RESTART_LIMIT = 5  # exits of one worker within RESTART_WINDOW before the supervisor gives up
RESTART_WINDOW = 60.0
MAX_RESTART_DELAY = 10.0
EXIT_BROKER_UNAVAILABLE = 75  # EX_TEMPFAIL: a worker's broker was unreachable at its start; try again later
DRAIN_TIMEOUT = 20.0  # seconds the workers have to drain after SIGTERM (each needs at most ~9 s)
START_TIMEOUT = 60.0  # seconds a worker has to listen after it was started
_READY = b"ready\n"
_PR_SET_PDEATHSIG = 1


# ---------------------------------------------------------------------------------------------- worker side


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    index: int  # 1..count
    count: int
    port: int  # the port the supervisor reserved (the real one when the configuration says 0)
    supervisor: int  # the supervisor's pid
    ready_fd: int  # write end of the ready pipe, -1 when none

    def encode(self) -> str:
        return f"{self.index},{self.count},{self.port},{self.supervisor},{self.ready_fd}"


def worker_info(env: Mapping[str, str]) -> WorkerInfo | None:
    """This process's place among the workers, or None when it is not a worker."""
    raw = env.get(WORKER_ENV)
    if not raw:
        return None
    try:
        index, count, port, supervisor, ready_fd = (int(v) for v in raw.split(","))
    except ValueError:
        raise SystemExit(f"tidings: {WORKER_ENV} is internal to tidings serve --workers: {raw!r}") from None
    return WorkerInfo(index, count, port, supervisor, ready_fd)


def tie_to_supervisor(info: WorkerInfo) -> bool:
    """Ask for SIGTERM when the supervisor dies (Linux). True when the kernel does it; False when the
    worker must poll (:func:`watch_supervisor`). Exits at once if the supervisor is already gone."""
    tied = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            tied = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
        except (OSError, AttributeError):  # pragma: no cover - no prctl in this libc
            tied = False
    if os.getppid() != info.supervisor:  # it died before the prctl: nobody would tell us
        raise SystemExit(f"tidings: worker {info.index}: the supervisor (pid {info.supervisor}) is gone")
    return tied


async def watch_supervisor(info: WorkerInfo, stop: Callable[[], None], every: float = 1.0) -> None:
    """Call ``stop`` once the supervisor is gone (where the kernel does not signal it)."""
    import asyncio

    while True:
        await asyncio.sleep(every)
        if os.getppid() != info.supervisor:
            break
    log.warning("the supervisor (pid %d) is gone: stopping", info.supervisor)
    stop()


def notify_ready(info: WorkerInfo) -> None:
    """Tell the supervisor that this worker listens."""
    if info.ready_fd < 0:
        return
    try:
        os.write(info.ready_fd, _READY)
    except OSError as exc:  # the supervisor is gone; PR_SET_PDEATHSIG or the watch stops us
        log.warning("cannot tell the supervisor that this worker is ready: %s", exc)
    finally:
        with contextlib.suppress(OSError):
            os.close(info.ready_fd)


# ---------------------------------------------------------------------------------------------- the port


def reserve_port(host: str, port: int) -> tuple[list[socket.socket], int]:
    """Check that ``host:port`` is free and hold it for the workers. Returns the sockets to keep open
    while they run, and the port (the one chosen when ``port`` is 0).

    An exclusive bind (SO_REUSEADDR as asyncio sets it, no SO_REUSEPORT) fails with EADDRINUSE when
    anything holds the port, a running ``tidings serve --workers`` included; it is closed at once and the
    port bound again with SO_REUSEPORT and never listened on: the kernel gives connections only to
    listening sockets, the workers' SO_REUSEPORT sockets join it, and no other program (nor another user,
    whose SO_REUSEPORT sockets the kernel keeps apart) can take the port while a worker restarts."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen: set[tuple[int, str]] = set()
    held: list[socket.socket] = []
    try:
        for family, type_, proto, _, addr in infos:
            key = (int(family), str(addr[0]))
            if key in seen:
                continue
            seen.add(key)
            addr = (addr[0], port, *addr[2:])
            probe = _socket(family, type_, proto, exclusive=True)
            try:
                probe.bind(addr)
                port = probe.getsockname()[1]
            except OSError as exc:
                raise _bind_error(exc, addr) from None
            finally:
                probe.close()
            sock = _socket(family, type_, proto, exclusive=False)
            held.append(sock)
            try:
                sock.bind((addr[0], port, *addr[2:]))
            except OSError as exc:
                raise _bind_error(exc, addr) from None
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return held, port


def _socket(family: int, type_: int, proto: int, exclusive: bool) -> socket.socket:
    sock = socket.socket(family, type_, proto)
    if exclusive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds
    return sock


def _bind_error(exc: OSError, addr: tuple[object, ...]) -> OSError:
    where = f"[{addr[0]}]:{addr[1]}" if ":" in str(addr[0]) else f"{addr[0]}:{addr[1]}"
    reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
    return OSError(exc.errno, f"cannot listen on {where}: {reason}")


# ---------------------------------------------------------------------------------------------- supervisor


def restart_delay(exits: int) -> float:
    """Seconds before a worker that exited ``exits`` times within the window starts again."""
    return 0.0 if exits <= 1 else min(MAX_RESTART_DELAY, 2.0 ** (exits - 2))


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


@dataclass(slots=True)
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    ready_fd: int | None  # read end of its ready pipe until it said ready or closed it
    started: float
    ready: bool = False
    restarted: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Supervisor:
    """Run ``count`` workers of ``command`` (default: ``python -m tidings <argv>``) on ``port``."""

    count: int
    argv: Sequence[str] = ()
    port: int = 0
    command: Sequence[str] | None = None
    env: Mapping[str, str] | None = None
    restart_limit: int = RESTART_LIMIT
    restart_window: float = RESTART_WINDOW
    drain_timeout: float = DRAIN_TIMEOUT
    start_timeout: float = START_TIMEOUT
    workers: dict[int, _Worker] = field(default_factory=dict)
    _signals: list[int] = field(default_factory=list)
    _hups: int = 0  # SIGHUPs received and not yet forwarded to the workers
    _forwarded: int = 0
    _exits: dict[int, deque[float]] = field(default_factory=dict)
    _waits: dict[int, int] = field(default_factory=dict)  # index -> starts in a row without its broker
    _restarts: dict[int, float] = field(default_factory=dict)  # index -> when to start it again
    _wake: tuple[int, int] = (-1, -1)

    # ------------------------------------------------------------------ public

    def run(self, on_ready: Callable[[list[int]], None] | None = None) -> int:
        """Start every worker, supervise them until SIGTERM/SIGINT; the exit code for the process."""
        if self.command is None:
            self.command = [sys.executable, "-m", "tidings", *self.argv]
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wake = (r, w)
        previous = self._install_signals()
        try:
            code = self._start_all()
            if code is not None:
                return code
            if on_ready is not None:
                on_ready([self.workers[i].pid for i in sorted(self.workers)])
            return self._supervise()
        finally:
            self._restore_signals(previous)
            for worker in self.workers.values():
                self._close_ready(worker)
            self._wake = (-1, -1)
            os.close(r)
            os.close(w)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop every worker as if the supervisor got ``sig`` (safe from a signal handler or a thread)."""
        self._signals.append(sig)
        with contextlib.suppress(OSError):
            os.write(self._wake[1], b"\0")

    # ------------------------------------------------------------------ signals

    def _install_signals(self) -> dict[int, object]:
        def record(signum: int, frame: FrameType | None) -> None:
            self._signals.append(signum)  # the wakeup fd wakes the loop

        def wake(signum: int, frame: FrameType | None) -> None:
            pass  # the wakeup fd does the work

        def hup(signum: int, frame: FrameType | None) -> None:
            self._hups += 1  # a reload: forwarded to every worker by the loop

        previous: dict[int, object] = {}
        handlers = (
            (signal.SIGTERM, record),
            (signal.SIGINT, record),
            (signal.SIGCHLD, wake),
            (signal.SIGHUP, hup),
        )
        for sig, handler in handlers:
            previous[sig] = signal.signal(sig, handler)
        previous[-1] = signal.set_wakeup_fd(self._wake[1], warn_on_full_buffer=False)
        return previous

    def _restore_signals(self, previous: dict[int, object]) -> None:
        signal.set_wakeup_fd(previous.pop(-1))  # type: ignore[arg-type]
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ processes

    def _spawn(self, index: int, restarted: bool = False) -> _Worker:
        assert self.command is not None
        r, w = os.pipe()
        info = WorkerInfo(index, self.count, self.port, os.getpid(), w)
        env = {**(os.environ if self.env is None else self.env), WORKER_ENV: info.encode()}
        try:
            proc = subprocess.Popen(list(self.command), pass_fds=(w,), env=env)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        worker = _Worker(index, proc, r, time.monotonic(), restarted=restarted)
        self.workers[index] = worker
        return worker

    def _close_ready(self, worker: _Worker) -> None:
        if worker.ready_fd is not None:
            os.close(worker.ready_fd)
            worker.ready_fd = None

    def _wait(self, timeout: float) -> None:
        """Sleep until a signal, a child's exit, a ready message or ``timeout``; read what came."""
        waiting = {w.ready_fd: w for w in self.workers.values() if w.ready_fd is not None}
        try:
            readable, _, _ = select.select([self._wake[0], *waiting], [], [], max(0.0, timeout))
        except InterruptedError:  # pragma: no cover - PEP 475 retries; a handler that raised
            readable = []
        for fd in readable:
            if fd == self._wake[0]:
                with contextlib.suppress(BlockingIOError):
                    while os.read(fd, 512):
                        pass
                continue
            worker = waiting[fd]
            try:
                data = os.read(fd, 64)
            except OSError:
                data = b""
            if _READY.strip() in data:
                worker.ready = True
                self._waits.pop(worker.index, None)
                if worker.restarted:
                    log.info("worker %d is back (pid %d)", worker.index, worker.pid)
            self._close_ready(worker)  # ready, or the pipe closed without a word (it is exiting)

    def _exited(self) -> list[_Worker]:
        return [w for w in self.workers.values() if w.proc.poll() is not None]

    def _signal_all(self, sig: int, workers: Iterable[_Worker] | None = None) -> None:
        for worker in list(self.workers.values()) if workers is None else workers:
            if worker.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(sig)

    # ------------------------------------------------------------------ phases

    def _start_all(self) -> int | None:
        """Worker 1, then the rest. None once all listen; else the exit code (all stopped)."""
        for first, last in ((1, 1), (2, self.count)):
            for index in range(first, last + 1):
                try:
                    self._spawn(index)
                except OSError as exc:  # no process at all (ENOMEM, EAGAIN, a missing interpreter)
                    log.error("cannot start worker %d: %s; stopping", index, exc)
                    self._shutdown()
                    return 1
            code = self._await_ready()
            if code is not None:
                return code
        return None

    def _await_ready(self) -> int | None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._signals:
                return self._shutdown()
            for worker in self._exited():
                log.error(
                    "worker %d (pid %d) %s while starting; stopping",
                    worker.index,
                    worker.pid,
                    describe_exit(worker.proc.returncode),
                )
                code = worker.proc.returncode
                del self.workers[worker.index]
                self._close_ready(worker)
                self._shutdown()
                return code if code > 0 and code != EXIT_BROKER_UNAVAILABLE else 1
            if all(w.ready for w in self.workers.values()):
                return None
            now = time.monotonic()
            if now >= deadline:
                late = [w.index for w in self.workers.values() if not w.ready]
                log.error("worker(s) %s not listening after %.0f s; stopping", late, self.start_timeout)
                self._shutdown()
                return 1
            self._wait(min(deadline - now, 1.0))

    def _supervise(self) -> int:
        while True:
            if self._signals:
                return self._shutdown()
            if self._hups:
                self._hups = 0
                log.info("SIGHUP: reloading the configuration in %d worker(s)", len(self.workers))
                # A worker still starting ignores it, and reads the file as it is now anyway.
                self._signal_all(signal.SIGHUP)
            now = time.monotonic()
            for worker in self._exited():
                if not self._exited_while_running(worker, now):
                    self._shutdown()
                    return 1
            for index, due in list(self._restarts.items()):
                if due <= now:
                    del self._restarts[index]
                    try:
                        self._spawn(index, restarted=True)
                    except OSError as exc:
                        log.error("cannot start worker %d again: %s", index, exc)
                        self._restarts[index] = now + MAX_RESTART_DELAY
            for worker in self.workers.values():
                if (
                    not worker.ready
                    and worker.proc.poll() is None
                    and now - worker.started > self.start_timeout
                ):
                    log.error(
                        "worker %d (pid %d) not listening after %.0f s: killing it",
                        worker.index,
                        worker.pid,
                        self.start_timeout,
                    )
                    worker.proc.kill()
            timeout = min([1.0, *(due - now for due in self._restarts.values())])
            self._wait(timeout)

    def _exited_while_running(self, worker: _Worker, now: float) -> bool:
        """Schedule the restart of a worker that exited; False when it crash-loops (give up)."""
        del self.workers[worker.index]
        self._close_ready(worker)
        if worker.proc.returncode == EXIT_BROKER_UNAVAILABLE and not worker.ready:
            waits = self._waits[worker.index] = self._waits.get(worker.index, 0) + 1
            delay = restart_delay(waits + 1)
            log.warning(
                "worker %d (pid %d) cannot reach its broker; starting it again in %.0f s (attempt %d)",
                worker.index,
                worker.pid,
                delay,
                waits,
            )
            self._restarts[worker.index] = now + delay
            return True
        exits = self._exits.setdefault(worker.index, deque())
        exits.append(now)
        while exits and exits[0] < now - self.restart_window:
            exits.popleft()
        what = describe_exit(worker.proc.returncode)
        if len(exits) >= self.restart_limit:
            log.error(
                "worker %d (pid %d) %s: %d exits within %.0f s, giving up (stopping every worker)",
                worker.index,
                worker.pid,
                what,
                len(exits),
                self.restart_window,
            )
            return False
        delay = restart_delay(len(exits))
        log.warning(
            "worker %d (pid %d) %s; starting it again%s",
            worker.index,
            worker.pid,
            what,
            f" in {delay:.0f} s" if delay else "",
        )
        self._restarts[worker.index] = now + delay
        return True

    def _shutdown(self) -> int:
        """Forward the stop signal (SIGTERM when none came) to every worker and wait for them to drain."""
        self._restarts.clear()
        if not self._signals:
            self._signals.append(signal.SIGTERM)
        if self.workers:
            log.info(
                "stopping %d worker(s) (%s): draining",
                len(self.workers),
                signal.Signals(self._signals[self._forwarded]).name,
            )
        deadline = time.monotonic() + self.drain_timeout
        while True:
            while self._forwarded < len(self._signals):  # every signal that came, once
                self._signal_all(self._signals[self._forwarded])
                self._forwarded += 1
            for worker in self._exited():
                del self.workers[worker.index]
                self._close_ready(worker)
                code = worker.proc.returncode
                if code != 0:
                    log.warning("worker %d (pid %d) %s", worker.index, worker.pid, describe_exit(code))
            now = time.monotonic()
            if not self.workers or now >= deadline:
                break
            self._wait(min(deadline - now, 0.5))
        if not self.workers:
            log.info("all workers stopped")
            return 0
        for worker in self.workers.values():
            log.error(
                "worker %d (pid %d) still running after %.0f s: killing it",
                worker.index,
                worker.pid,
                self.drain_timeout,
            )
            worker.proc.kill()
        for worker in list(self.workers.values()):
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(5)
            self._close_ready(worker)
            del self.workers[worker.index]
        return 1
