"""Real ``redis-server`` processes for the tests: standalone, Cluster, Sentinel, on free loopback ports.

Every process is started by this module, in its own directory, and stopped by its PID (never by name).
Readiness is polled (PING, CLUSTER INFO, SENTINEL MASTER) against a deadline; a server that does not come
up raises with the tail of its log. Three safety nets end the processes even when a test forgets to:
the fixtures' teardown, an ``atexit`` handler, and ``PR_SET_PDEATHSIG`` (via ``setpriv``) so that a
pytest killed with ``kill -9`` takes its Redis processes with it.

Waiting for a failover takes seconds: from an ``async`` test that runs a tidings server in its own event
loop, call the ``a``-prefixed coroutine versions (``await cluster.akill_master()``), which run the wait in
a thread so the loop keeps serving meanwhile.

Commands are sent with a tiny RESP2 client (:func:`command`), so the managers need neither redis-py nor
a ``redis-cli`` process per poll; :meth:`RedisServer.client` hands out a redis-py client for the tests.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    import redis

HOST = "127.0.0.1"
REDIS_SERVER = os.environ.get("TIDINGS_REDIS_SERVER", "redis-server")
REDIS_CLI = os.environ.get("TIDINGS_REDIS_CLI", "redis-cli")
SLOTS = 16384
MASTER_NAME = "tidings"

Persistence = Literal["none", "aof"]
T = TypeVar("T")


def missing() -> str:
    """Why real Redis cannot run here ("" when it can): for the fixtures to skip or fail with."""
    for exe, pkg in ((REDIS_SERVER, "redis-server"), (REDIS_CLI, "redis-tools")):
        if shutil.which(exe) is None:
            return f"{exe} not found (apt-get install {pkg}; scripts/test installs it)"
    return ""


class RedisError(Exception):
    """An error reply (``-ERR ...``) from Redis."""


class StartError(RuntimeError):
    """A Redis process did not start or did not become ready in time."""


# ------------------------------------------------------------------------------------------ a RESP client


def _encode(args: Sequence[object]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _read(f: Any) -> Any:
    line: bytes = f.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed by redis")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data: bytes = f.read(n + 2)
        if len(data) != n + 2:
            raise ConnectionError("connection closed by redis")
        return data[:-2].decode(errors="replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read(f) for _ in range(n)]
    raise ConnectionError(f"unexpected reply from redis: {line!r}")


def command(port: int, *args: object, host: str = HOST, timeout: float = 2.0) -> Any:
    """One command on a fresh connection: str / int / None / list (RESP2), or raises RedisError/OSError."""
    with socket.create_connection((host, port), timeout=timeout) as sock, sock.makefile("rb") as f:
        sock.sendall(_encode(args))
        return _read(f)


def pipeline(port: int, *cmds: Sequence[object], host: str = HOST, timeout: float = 5.0) -> list[Any]:
    """Several commands on one connection, pipelined: their replies (raises the first error reply after
    reading them all). ``WAIT`` must share the connection of the writes it waits for: ``command("WAIT",
    ...)`` on its own connection returns at once."""
    with socket.create_connection((host, port), timeout=timeout) as sock, sock.makefile("rb") as f:
        sock.sendall(b"".join(_encode(c) for c in cmds))
        out: list[Any] = []
        error: RedisError | None = None
        for _ in cmds:
            try:
                out.append(_read(f))
            except RedisError as exc:
                error = error or exc
                out.append(exc)
        if error is not None:
            raise error
        return out


def _info(text: str) -> dict[str, str]:
    """``INFO`` / ``CLUSTER INFO`` text -> {field: value}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            out[k] = v.strip()
    return out


def _pairs(flat: list[Any]) -> dict[str, Any]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


# ---------------------------------------------------------------------------------- processes and ports

_LIVE: dict[int, subprocess.Popen[bytes]] = {}  # pid -> every process this module started and not reaped
_LIVE_LOCK = threading.Lock()
_PORTS: set[int] = set()  # ports handed out by this process (kept for restarts on the same port)
# One long-lived thread forks every process, because PR_SET_PDEATHSIG fires when the *thread* that forked
# the child ends: a short-lived thread (asyncio.to_thread's pool ends with its loop) would take the
# server with it.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="redis-spawner")
_SETPRIV = shutil.which("setpriv")


def _spawn(argv: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    if _SETPRIV:
        argv = [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]  # execs: same PID as the server

    def start() -> subprocess.Popen[bytes]:
        with open(log, "ab") as logf:
            proc = subprocess.Popen(
                argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT
            )
        with _LIVE_LOCK:
            _LIVE[proc.pid] = proc
        return proc

    return _SPAWNER.submit(start).result()


def _reap(proc: subprocess.Popen[bytes], sig: int | None, timeout: float) -> None:
    """Signal one process we started (by PID) and wait for it; SIGKILL when it takes longer than timeout."""
    if proc.poll() is None and sig is not None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)
    with _LIVE_LOCK:
        _LIVE.pop(proc.pid, None)


@atexit.register
def kill_all() -> None:
    """The last safety net: SIGKILL every process this module started that is still alive."""
    with _LIVE_LOCK:
        procs = list(_LIVE.values())
    for proc in procs:
        _reap(proc, signal.SIGKILL, 5)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(bus: bool = False) -> int:
    """A free loopback port below the ephemeral range (32768+), so no outgoing connection takes it between
    now and the server's bind; with ``bus``, port + 10000 (the Cluster bus) is free too."""
    for _ in range(1000):
        port = random.randrange(10000, 22000)
        if port in _PORTS or not _port_free(port) or (bus and not _port_free(port + 10000)):
            continue
        _PORTS.add(port)
        return port
    raise StartError("no free loopback port found")


def wait_until(
    check: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.02,
    detail: Callable[[], str] | None = None,
) -> T:
    """Poll ``check`` until it returns something other than None/False; errors count as "not yet". On
    timeout, raise StartError saying what was awaited, the last error and ``detail()`` (e.g. log tails)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if result is not None and result is not False:
                return result
        except (OSError, RedisError, ValueError, KeyError) as exc:
            last = exc
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout:g} s waiting for {what}"
            if last is not None:
                msg += f" (last error: {last!r})"
            raise StartError(msg + (detail() if detail else ""))
        time.sleep(interval)


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


# -------------------------------------------------------------------------------------------- standalone


class RedisServer:
    """One ``redis-server`` in ``dir`` on a loopback port (free, picked once, kept across restarts).

    ``persistence``: ``"none"`` (``--save '' --appendonly no``) or ``"aof"`` (``--appendonly yes
    --appendfsync everysec``); it may be changed between :meth:`stop` and :meth:`start`. ``args`` are
    extra ``--option value`` words; ``replicaof`` a port on loopback to replicate from.
    """

    def __init__(
        self,
        dir: Path,
        *,
        persistence: Persistence = "none",
        port: int | None = None,
        args: Sequence[str] = (),
        replicaof: int | None = None,
        bus: bool = False,
        name: str = "redis",
    ) -> None:
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.persistence: Persistence = persistence
        self.args = list(args)
        self.replicaof = replicaof
        self.name = name
        self._bus = bus
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port(bus)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "redis.log"

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.name} {self.addr} {state}>"

    # -- addresses

    @property
    def host(self) -> str:
        return HOST

    @property
    def addr(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    # -- life cycle

    def argv(self) -> list[str]:
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", HOST, "--dir", str(self.dir)]
        argv += ["--daemonize", "no", "--logfile", "", "--dbfilename", "dump.rdb", "--save", ""]
        # A replica's first sync starts at once (the default waits 5 s for more replicas to share it).
        argv += ["--repl-diskless-sync-delay", "0"]
        if self.persistence == "aof":
            argv += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            argv += ["--appendonly", "no"]
        if self.replicaof is not None:
            argv += ["--replicaof", HOST, str(self.replicaof)]
        return argv + self.args

    def start(self, persistence: Persistence | None = None, timeout: float = 10.0) -> RedisServer:
        """Start (again: same port, same dir, so data persisted there is loaded) and wait for PING."""
        if self.running:
            raise StartError(f"{self!r} is already running")
        if persistence is not None:
            self.persistence = persistence
        for attempt in range(5):
            self.proc = _spawn(self.argv(), self.dir, self.log)
            try:
                self.wait_ready(timeout)
                return self
            except StartError:
                in_use = self.proc.poll() is not None and "Address already in use" in self.log_tail(5)
                self.kill()
                # Someone else took the port we picked: only a first start may move to another one.
                if in_use and not self._fixed_port and attempt < 4:
                    self.port = free_port(self._bus)
                    continue
                raise
        raise AssertionError("unreachable")

    def wait_ready(self, timeout: float = 10.0) -> None:
        def ready() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise StartError(f"{self.name} on port {self.port} exited{self.log_context()}")
            return bool(command(self.port, "PING", timeout=1.0) == "PONG")

        wait_until(ready, timeout, f"{self.name} on port {self.port} to answer PING", detail=self.log_context)

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful: SIGTERM, which redis-server handles like SHUTDOWN (AOF flushed and fsynced)."""
        if self.proc is not None:
            _reap(self.proc, signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: nothing flushed beyond what the OS already has."""
        if self.proc is not None:
            _reap(self.proc, signal.SIGKILL, 5)

    def restart(self, persistence: Persistence | None = None, timeout: float = 10.0) -> RedisServer:
        self.stop()
        return self.start(persistence, timeout)

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers (a hung Redis); :meth:`resume` undoes it."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    async def astart(self, persistence: Persistence | None = None, timeout: float = 10.0) -> RedisServer:
        return await _in_thread(self.start, persistence, timeout)

    async def astop(self, timeout: float = 10.0) -> None:
        await _in_thread(self.stop, timeout)

    async def arestart(self, persistence: Persistence | None = None, timeout: float = 10.0) -> RedisServer:
        return await _in_thread(self.restart, persistence, timeout)

    # -- talking to it

    def command(self, *args: object, timeout: float = 5.0) -> Any:
        """One command over RESP, on a connection of its own (see :func:`command`)."""
        return command(self.port, *args, timeout=timeout)

    def pipeline(self, *cmds: Sequence[object], timeout: float = 5.0) -> list[Any]:
        """Several commands on one connection (see :func:`pipeline`): ``srv.pipeline(["SET", "k", "v"],
        ["WAIT", 1, 2000])``."""
        return pipeline(self.port, *cmds, timeout=timeout)

    def cli(self, *args: str, timeout: float = 10.0) -> str:
        """``redis-cli -h 127.0.0.1 -p PORT ARGS...``: its stdout (raises on a non-zero exit)."""
        return _cli([REDIS_CLI, "-h", HOST, "-p", str(self.port), *args], timeout)

    def client(self, **kw: Any) -> redis.Redis:
        """A synchronous redis-py client (``decode_responses=True`` unless given)."""
        import redis

        kw.setdefault("decode_responses", True)
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5, **kw)

    def info(self, section: str = "") -> dict[str, str]:
        return _info(self.command("INFO", *([section] if section else [])))

    def role(self) -> str:
        """``master``, ``slave`` or ``sentinel``."""
        return str(self.command("ROLE")[0])

    def flushall(self) -> None:
        self.command("FLUSHALL")

    def kill_pubsub_clients(self) -> int:
        """``CLIENT KILL TYPE pubsub``: how many connections were dropped."""
        return int(self.command("CLIENT", "KILL", "TYPE", "pubsub"))

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_context(self) -> str:
        tail = self.log_tail()
        return f"\n--- {self.log} (tail) ---\n{tail}" if tail else f" (no log at {self.log})"


def _cli(argv: list[str], timeout: float) -> str:
    r = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    out = r.stdout.decode(errors="replace")
    if r.returncode != 0:
        raise RedisError(f"{' '.join(argv)} exited {r.returncode}: {out}{r.stderr.decode(errors='replace')}")
    return out.strip()


def _stop_all(servers: Iterable[RedisServer]) -> None:
    for s in servers:
        s.kill()


# ----------------------------------------------------------------------------------------------- cluster


class RedisCluster:
    """``masters`` cluster-enabled ``redis-server`` nodes (+ ``replicas`` per master), made into one cluster
    by ``redis-cli --cluster create ... --cluster-yes``; ``node_timeout_ms`` small so a failover takes ~2 s.

    ``nodes`` keeps the creation order: the first ``masters`` were created as masters (roles change with
    failovers: ask :meth:`masters` / :meth:`master_for_key`).
    """

    def __init__(
        self,
        dir: Path,
        *,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 1000,
        persistence: Persistence = "none",
        args: Sequence[str] = (),
    ) -> None:
        self.dir = Path(dir)
        self.n_masters = masters
        self.n_replicas = replicas
        cluster_args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            # A replica of a long-dead master may still be promoted (tests kill and restart freely).
            "--cluster-replica-validity-factor", "0",
            *args,
        ]  # fmt: skip
        self.nodes = [
            RedisServer(
                self.dir / f"node{i}", persistence=persistence, args=cluster_args, bus=True, name=f"node{i}"
            )
            for i in range(masters * (1 + replicas))
        ]
        self._ids: dict[int, str] = {}  # port -> node id

    def __repr__(self) -> str:
        return f"<RedisCluster {self.url} {self.nodes}>"

    @property
    def url(self) -> str:
        """``redis+cluster://`` with the nodes created as masters (startup nodes)."""
        return "redis+cluster://" + ",".join(n.addr for n in self.nodes[: self.n_masters])

    @property
    def url_all(self) -> str:
        """``redis+cluster://`` with every node: still usable with any one node dead."""
        return "redis+cluster://" + ",".join(n.addr for n in self.nodes)

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, n.port) for n in self.nodes]

    def start(self, timeout: float = 30.0) -> RedisCluster:
        try:
            for n in self.nodes:
                n.start()
            create = [REDIS_CLI, "--cluster", "create", *(n.addr for n in self.nodes), "--cluster-yes"]
            if self.n_replicas:
                create += ["--cluster-replicas", str(self.n_replicas)]
            _cli(create, timeout)
            for n in self.nodes:
                self._ids[n.port] = str(n.command("CLUSTER", "MYID"))
            self.wait_ok(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """SIGKILL every node (data does not matter at teardown)."""
        _stop_all(self.nodes)

    # -- state

    def running(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.running]

    def node_by_port(self, port: int) -> RedisServer:
        for n in self.nodes:
            if n.port == port:
                return n
        raise KeyError(port)

    def masters(self) -> list[RedisServer]:
        return [n for n in self.running() if n.role() == "master"]

    def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        return [
            n
            for n in self.running()
            if n.role() == "slave" and n.info("replication").get("master_port") == str(master.port)
        ]

    def slot_owners(self, via: RedisServer | None = None) -> dict[int, list[tuple[int, int]]]:
        """master port -> its slot ranges, as ``via`` (default: the first running node) sees them."""
        node = via or self.running()[0]
        owners: dict[int, list[tuple[int, int]]] = {}
        for start, end, master, *_ in node.command("CLUSTER", "SLOTS"):
            owners.setdefault(int(master[1]), []).append((int(start), int(end)))
        return owners

    def keyslot(self, key: str) -> int:
        return int(self.running()[0].command("CLUSTER", "KEYSLOT", key))

    def master_for_slot(self, slot: int) -> RedisServer:
        for port, ranges in self.slot_owners().items():
            if any(a <= slot <= b for a, b in ranges):
                return self.node_by_port(port)
        raise KeyError(f"slot {slot} is not assigned")

    def master_for_key(self, key: str) -> RedisServer:
        """The master that holds ``key`` (a channel's keys: ``{prefix}:{C}:...`` share one slot)."""
        return self.master_for_slot(self.keyslot(key))

    def _node_problem(self, n: RedisServer, running_ports: set[int]) -> str:
        info = _info(n.command("CLUSTER", "INFO"))
        if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
            state, ok = info.get("cluster_state"), info.get("cluster_slots_ok")
            return f"{n.name}: cluster_state {state}, slots ok {ok}"
        owners = self.slot_owners(n)
        if not set(owners) <= running_ports:
            return f"{n.name}: slots still owned by stopped nodes {sorted(set(owners) - running_ports)}"
        if sum(b - a + 1 for r in owners.values() for a, b in r) != SLOTS:
            return f"{n.name}: not every slot is assigned"
        # Every running node is known and not flagged failing (a restarted node has been seen again).
        flags = {line.split()[0]: line.split()[2] for line in str(n.command("CLUSTER", "NODES")).splitlines()}
        for port in running_ports:
            f = flags.get(self._ids.get(port, ""), "")
            if not f or "fail" in f or "handshake" in f or "noaddr" in f:
                return f"{n.name}: sees the node on port {port} as {f or 'unknown'!r}"
        if n.role() == "slave":
            repl = n.info("replication")
            if repl.get("master_link_status") != "up" or int(repl.get("master_port", 0)) not in running_ports:
                return (
                    f"{n.name}: replica of {repl.get('master_port')}, link {repl.get('master_link_status')}"
                )
        return ""

    def problem(self) -> str:
        """Why the cluster is not ok yet ("" when it is)."""
        running = self.running()
        if not running:
            return "no node is running"
        ports = {n.port for n in running}
        try:
            for n in running:
                if p := self._node_problem(n, ports):
                    return p
        except (OSError, RedisError, ValueError, KeyError) as exc:
            return repr(exc)
        return ""

    def is_ok(self) -> bool:
        return not self.problem()

    def _problem_and_logs(self) -> str:
        return f": {self.problem()}{self._logs()}"

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every running node says cluster_state:ok with all 16384 slots served by running masters,
        knows every running node as healthy, and every replica's link to its master is up."""
        wait_until(self.is_ok, timeout, "the cluster to be ok", interval=0.05, detail=self._problem_and_logs)

    def _logs(self) -> str:
        return "".join(n.log_context() for n in self.nodes)

    # -- faults

    def kill_master(self, master: RedisServer | None = None, timeout: float = 30.0) -> RedisServer:
        """SIGKILL a master (default: the first) and wait until one of its replicas has been promoted and
        the cluster is ok again. Returns the new master of those slots."""
        master = master or self.masters()[0]
        replicas = self.replicas_of(master)
        if not replicas:
            raise StartError(f"{master!r} has no replica to promote (RedisCluster(replicas=1))")
        master.kill()

        def promoted() -> RedisServer | None:
            for r in replicas:
                if r.running and r.role() == "master":
                    return r
            return None

        new = wait_until(promoted, timeout, f"a replica of {master.addr} to be promoted", detail=self._logs)
        self.wait_ok(timeout)
        return new

    def restart_node(self, node: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Start a stopped/killed node again (same port, dir, nodes.conf) and wait for the cluster to be ok
        (a former master whose replica took over comes back as that replica's replica)."""
        if node.running:
            node.kill()
        node.start()
        self.wait_ok(timeout)
        return node

    def ensure_healthy(self, timeout: float = 30.0) -> None:
        """Restart every dead node (and SIGCONT paused ones), wait until the cluster is ok (fixtures call this
        between tests)."""
        for n in self.nodes:
            if n.running:
                n.resume()
            else:
                n.start()
        self.wait_ok(timeout)

    def flushall(self) -> None:
        for n in self.masters():
            n.flushall()

    def cli(self, *args: str, timeout: float = 10.0) -> str:
        """``redis-cli -c`` (follows MOVED) against the first running node."""
        n = self.running()[0]
        return _cli([REDIS_CLI, "-c", "-h", HOST, "-p", str(n.port), *args], timeout)

    async def akill_master(self, master: RedisServer | None = None, timeout: float = 30.0) -> RedisServer:
        return await _in_thread(self.kill_master, master, timeout)

    async def arestart_node(self, node: RedisServer, timeout: float = 30.0) -> RedisServer:
        return await _in_thread(self.restart_node, node, timeout)

    async def await_ok(self, timeout: float = 30.0) -> None:
        await _in_thread(self.wait_ok, timeout)


# ---------------------------------------------------------------------------------------------- sentinel


class RedisSentinel:
    """A master and a replica (``servers``), watched by three sentinels (``sentinels``, each a
    ``redis-server sentinel.conf --sentinel``) with quorum 2 under the master name ``tidings``.

    ``down_after_ms`` must stay well above 1000: a sentinel pings every min(down_after, 1000) ms and, on a
    fresh link (right after a failover), counts the wait from the link's creation, so with 1000 it may
    find the new master "down" just as its first PING goes out, and fail over again (seen here).
    """

    def __init__(
        self,
        dir: Path,
        *,
        persistence: Persistence = "none",
        down_after_ms: int = 2000,
        failover_timeout_ms: int = 3000,
        quorum: int = 2,
        n_sentinels: int = 3,
        args: Sequence[str] = (),
    ) -> None:
        self.dir = Path(dir)
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.quorum = quorum
        a = RedisServer(self.dir / "a", persistence=persistence, args=args, name="a")
        b = RedisServer(self.dir / "b", persistence=persistence, args=args, replicaof=a.port, name="b")
        self.servers = [a, b]
        self.sentinels = [_SentinelProc(self.dir / f"sentinel{i}", self) for i in range(n_sentinels)]

    def __repr__(self) -> str:
        return f"<RedisSentinel {self.url} {self.servers}>"

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(s.addr for s in self.sentinels) + f"/{MASTER_NAME}"

    @property
    def sentinel_addrs(self) -> list[tuple[str, int]]:
        return [(HOST, s.port) for s in self.sentinels]

    def start(self, timeout: float = 30.0) -> RedisSentinel:
        try:
            a, b = self.servers
            a.start()
            b.replicaof = a.port  # (a's first start may have moved to another port)
            b.start()
            self._wait_link(b, a, timeout)
            for s in self.sentinels:
                s.monitor_port = a.port
                s.start()
            self.wait_ok(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        _stop_all([*self.sentinels, *self.servers])

    # -- state

    def master_port(self, sentinel: RedisServer | None = None) -> int:
        """The master's port as a sentinel (default: the first running one) reports it."""
        s = sentinel or next(s for s in self.sentinels if s.running)
        addr = s.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        return int(addr[1])

    @property
    def master(self) -> RedisServer:
        port = self.master_port()
        return next(s for s in self.servers if s.port == port)

    @property
    def replica(self) -> RedisServer:
        port = self.master_port()
        return next(s for s in self.servers if s.port != port)

    def _wait_link(self, replica: RedisServer, master: RedisServer, timeout: float) -> None:
        def up() -> bool:
            repl = replica.info("replication")
            return repl.get("master_link_status") == "up" and repl.get("master_port") == str(master.port)

        wait_until(up, timeout, f"{replica.addr} to replicate {master.addr}", detail=replica.log_context)

    def problem(self) -> str:
        """Why the group is not healthy yet ("" when it is): every running sentinel agrees on a running
        master and knows the other sentinels and every running replica; each replica's link is up."""
        try:
            ports = {self.master_port(s) for s in self.sentinels if s.running}
            if len(ports) != 1:
                return f"sentinels disagree on the master: {sorted(ports)}"
            (mport,) = ports
            master = next(s for s in self.servers if s.port == mport)
            if not master.running or master.role() != "master":
                return f"the sentinels' master {master!r} is not a running master"
            n_others = sum(1 for s in self.sentinels if s.running) - 1
            n_replicas = sum(1 for x in self.servers if x.running and x is not master)
            for s in self.sentinels:
                if not s.running:
                    continue
                m = _pairs(s.command("SENTINEL", "MASTER", MASTER_NAME))
                if m["flags"] != "master" or int(m["num-other-sentinels"]) < n_others:
                    return f"{s.name}: master flags {m['flags']}, {m['num-other-sentinels']} other sentinels"
                # Known and reachable (the sentinel's copy of the replica's link status is refreshed only
                # every 10 s; every 1 s once the master is down, which is when it matters).
                replicas = [_pairs(r) for r in s.command("SENTINEL", "REPLICAS", MASTER_NAME)]
                healthy = [r for r in replicas if r["flags"] == "slave"]
                if len(healthy) < n_replicas:
                    return f"{s.name}: replicas {[(r['port'], r['flags']) for r in replicas]}"
            for r in self.servers:
                if r.running and r is not master:
                    repl = r.info("replication")
                    if repl.get("master_link_status") != "up" or repl.get("master_port") != str(mport):
                        link = repl.get("master_link_status")
                        return f"{r.name}: replica of {repl.get('master_port')}, link {link}"
            return ""
        except (OSError, RedisError, ValueError, KeyError, StopIteration) as exc:
            return repr(exc)

    def is_ok(self) -> bool:
        return not self.problem()

    def wait_ok(self, timeout: float = 30.0) -> None:
        wait_until(
            self.is_ok, timeout, "the sentinels to agree on a healthy master", 0.05, self._problem_and_logs
        )

    def _logs(self) -> str:
        return "".join(n.log_context() for n in [*self.servers, *self.sentinels])

    def _problem_and_logs(self) -> str:
        return f": {self.problem()}{self._logs()}"

    # -- faults

    def kill_master(self, timeout: float = 30.0) -> RedisServer:
        """SIGKILL the master and wait until every running sentinel reports the replica as the master
        (SENTINEL GET-MASTER-ADDR-BY-NAME) and it answers ROLE as a master. Returns the new master."""
        old, new = self.master, self.replica
        old.kill()

        def switched() -> bool:
            ports = {self.master_port(s) for s in self.sentinels if s.running}
            return ports == {new.port} and new.role() == "master"

        wait_until(switched, timeout, f"the sentinels to promote {new.addr}", 0.05, self._logs)
        return new

    def failover(self, timeout: float = 30.0) -> RedisServer:
        """``SENTINEL FAILOVER``: swap master and replica without killing anything; waits until healthy."""
        old, new = self.master, self.replica
        self.sentinels[0].command("SENTINEL", "FAILOVER", MASTER_NAME)

        def switched() -> bool:
            return {self.master_port(s) for s in self.sentinels if s.running} == {new.port}

        wait_until(switched, timeout, "a manual failover", 0.05, self._logs)
        # The sentinels demote the old master only at their next INFO of it (up to 10 s): do it now.
        if old.role() == "master":
            old.command("REPLICAOF", HOST, new.port)
        self.wait_ok(timeout)
        return new

    def restart(self, server: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Start a dead data server again, as a replica of the current master (so it cannot come back as a
        second master), and wait until the sentinels see it healthy."""
        if server.running:
            server.kill()
        master = self.master
        server.replicaof = master.port if master is not server else None
        server.start()
        self.wait_ok(timeout)
        return server

    def ensure_healthy(self, timeout: float = 30.0) -> None:
        """Resume paused processes, restart dead ones (a data server as a replica), wait until healthy."""
        for p in [*self.sentinels, *self.servers]:
            if p.running:
                p.resume()
        for s in self.sentinels:
            if not s.running:
                s.start()
        for srv in self.servers:
            if not srv.running:
                self.restart(srv, timeout)
        self.wait_ok(timeout)

    def flushall(self) -> None:
        self.master.flushall()

    async def akill_master(self, timeout: float = 30.0) -> RedisServer:
        return await _in_thread(self.kill_master, timeout)

    async def afailover(self, timeout: float = 30.0) -> RedisServer:
        return await _in_thread(self.failover, timeout)

    async def arestart(self, server: RedisServer, timeout: float = 30.0) -> RedisServer:
        return await _in_thread(self.restart, server, timeout)

    async def await_ok(self, timeout: float = 30.0) -> None:
        await _in_thread(self.wait_ok, timeout)


class _SentinelProc(RedisServer):
    """``redis-server sentinel.conf --sentinel``; the config file is the sentinel's own state (it rewrites
    it), written once: a restarted sentinel resumes with what it knew."""

    def __init__(self, dir: Path, group: RedisSentinel) -> None:
        super().__init__(dir, name=dir.name)
        self.group = group
        self.conf = self.dir / "sentinel.conf"
        self.monitor_port = 0
        self._conf_port = 0

    def argv(self) -> list[str]:
        if self._conf_port != self.port:  # first start (or a first start moved to another port)
            self._conf_port = self.port
            g = self.group
            self.conf.write_text(
                f'port {self.port}\nbind {HOST}\ndir {self.dir}\nlogfile ""\ndaemonize no\n'
                f"sentinel monitor {MASTER_NAME} {HOST} {self.monitor_port} {g.quorum}\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {g.down_after_ms}\n"
                f"sentinel failover-timeout {MASTER_NAME} {g.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
        return [REDIS_SERVER, str(self.conf), "--sentinel"]
