"""Processes of a benchmark run: the server, load generators, publishers and wrk; CPU pinning, the
loopback receive-path switch (RPS on lo) and /proc samples of the server.

Everything started here is stopped here, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson
from tests.redis_servers import RedisServer
from tests.redis_servers import command as redis_command

from bench import procstat, stats

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LOADGEN = BENCH / "build" / "loadgen"
PUBLISHER = BENCH / "publisher.py"
WRK_LUA = BENCH / "wrk-publish.lua"  # wrk's script, a LuaTemplate: @what @run_us @key_file @path @body
DEFAULT_SERVER_CMD = (
    "{python} -m tidings serve --host {host} --port {port} --data-dir {data_dir} {broker_args}"
)
PER_PROC_MAX = 9500  # connections per loadgen process (open-files limit is 20,000 per process)
SECRETS: set[str] = set()  # API keys given on the command line, kept out of the results
SRC_IPS = 8  # spread client source addresses over 127.0.0.1..127.0.0.8 (ephemeral ports)
RPS_LO = Path("/sys/class/net/lo/queues/rx-0/rps_cpus")


@dataclass
class Cfg:
    """Where and how the processes run (the scenarios' sizes are separate: ``scenarios.Sizes``)."""

    quick: bool
    host: str
    server_cmd: str
    broker: str  # auto | memory | sqlite (redis scenarios always use the Redis they start)
    attach: tuple[str, int] | None
    server_pid: int | None
    api_key: str
    server_cpu: int | None
    client_cpu: int | None
    scenario_timeout: float
    ready_timeout: float
    out: Path | None
    no_wrk: bool = False
    busy_poll: bool = False
    steer_rx: bool = False

    @property
    def target_host(self) -> str:
        """The server's address as the clients dial it."""
        return self.attach[0] if self.attach else self.host


@dataclass
class Server:
    port: int
    pid: int | None
    api_key: str
    data_dir: str | None = None
    proc: asyncio.subprocess.Process | None = None
    cmd: str = ""
    tmp: tempfile.TemporaryDirectory[str] | None = None
    log: Path | None = None
    key_overridden: bool = False
    loadgens: list[Loadgen] = field(default_factory=list)  # started against it, killed when it stops
    broker: str = "memory"  # memory | sqlite | redis
    workers: int = 1  # --workers N: pid is the supervisor's, worker_pids its N workers
    worker_pids: list[int] = field(default_factory=list)
    redis: RedisServer | None = None  # the redis-server started for this server (broker "redis")


# --------------------------------------------------------------------------------------------- helpers
def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def taskset(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


def nprocs(n: int, at_least: int = 1) -> int:
    """Load-generator processes for n connections."""
    return stats.procs_for(n, PER_PROC_MAX, at_least)


def build_loadgen() -> None:
    """``bench/build.sh``, when the binary is older than ``loadgen.c``."""
    src = BENCH / "loadgen.c"
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= src.stat().st_mtime:
        return
    subprocess.run(["sh", str(BENCH / "build.sh")], check=True, timeout=120, stdout=subprocess.DEVNULL)


@contextlib.contextmanager
def steered_rx(cpu: int | None, enabled: bool) -> Iterator[None]:
    """Process loopback receives on ``cpu`` (the clients' CPU) for the duration; restore after.

    On loopback the sender's CPU normally also runs the receiver's TCP input path (about 4 µs per segment
    here), so the server would be charged for work a client machine's kernel does in production."""
    if not enabled:
        yield
        return
    if cpu is None:
        raise SystemExit("--steer-rx needs pinning (a client CPU)")
    old = RPS_LO.read_text().strip()
    RPS_LO.write_text(f"{1 << cpu:x}\n")
    try:
        yield
    finally:
        RPS_LO.write_text(old + "\n")


# --------------------------------------------------------------------------------------------- loadgen
class Loadgen:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.ready_info: dict[str, Any] = {}
        self.stderr: list[str] = []
        self._out = b""
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        self._tasks = [asyncio.create_task(self._read_err()), asyncio.create_task(self._read_out())]

    async def _read_err(self) -> None:
        assert self.proc and self.proc.stderr
        async for line in self.proc.stderr:
            s = line.decode(errors="replace").rstrip()
            if s.startswith("READY "):
                with contextlib.suppress(orjson.JSONDecodeError):
                    self.ready_info = orjson.loads(s[6:])
                self.ready.set()
            elif len(self.stderr) < 50:
                self.stderr.append(s)
        self.ready.set()  # exited: do not wait forever

    async def _read_out(self) -> None:
        assert self.proc and self.proc.stdout
        self._out = await self.proc.stdout.read()

    def signal_stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGUSR1)

    async def finish(self, timeout: float) -> dict[str, Any]:
        assert self.proc
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.signal_stop()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        lines = [ln for ln in self._out.decode(errors="replace").splitlines() if ln.startswith("{")]
        if not lines:
            return {
                "errors": 1,
                "error_kinds": {"loadgen_no_output": 1},
                "stderr": self.stderr,
                "start_ns": 0,
            }
        return dict(orjson.loads(lines[-1]))

    def kill(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.kill()


async def start_loadgens(
    cfg: Cfg, srv: Server, n: int, procs: int, mode_args: list[str], duration: float
) -> tuple[list[Loadgen], list[dict[str, Any]]]:
    """``procs`` load generators sharing n connections; returns once all are ready (bounded).

    They are ``srv.loadgens`` too, so that :func:`running_server` kills what is left of them."""
    lgs: list[Loadgen] = []
    off = 0
    for k, cnt in enumerate(stats.spread(n, procs)):
        argv = [
            str(LOADGEN),
            *mode_args,
            "--host",
            cfg.target_host,
            "--port",
            str(srv.port),
            "--conns",
            str(cnt),
            "--conn-offset",
            str(off),
            "--src-ips",
            str(SRC_IPS),
            "--src-base",
            str(1 + (k * SRC_IPS) % 240),
            "--duration",
            f"{duration:g}",
            "--ready-timeout",
            f"{cfg.ready_timeout:g}",
            "--hist",
            *(["--busy-poll"] if cfg.busy_poll else []),
        ]
        off += cnt
        lgs.append(Loadgen(argv))
    srv.loadgens.extend(lgs)
    for lg in lgs:
        await lg.start()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(lg.ready.wait() for lg in lgs)), cfg.ready_timeout + 10)
    return lgs, [lg.ready_info for lg in lgs]


# --------------------------------------------------------------------------------------------- publisher
async def run_publisher(args: list[str], timeout: float) -> tuple[dict[str, Any], str]:
    """``bench/publisher.py`` with ``args`` (bounded); its JSON report and its command line."""
    argv = [sys.executable, str(PUBLISHER), *args]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return {"published": 0, "errors": 1, "error_kinds": {"publisher_killed": 1}}, shlex.join(argv)
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    if not lines:
        return {
            "published": 0,
            "errors": 1,
            "error_kinds": {"publisher_failed": 1},
            "stderr": err.decode()[-2000:],
        }, shlex.join(argv)
    return dict(orjson.loads(lines[-1])), shlex.join(argv)


# --------------------------------------------------------------------------------------------- server
async def wait_healthy(host: str, port: int, proc: asyncio.subprocess.Process | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
        while time.monotonic() < deadline:
            if proc is not None and proc.returncode is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with s.get(f"http://{host}:{port}/healthz") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError("server did not become healthy in time")


def _open_log(path: Path) -> IO[bytes]:
    return open(path, "wb")  # handed to the child, closed right after the spawn


def start_redis(cfg: Cfg, dir: Path) -> RedisServer:
    """A fresh ``redis-server`` (no persistence) on a free loopback port, pinned to the server CPU.

    ``tests/redis_servers.py`` starts and stops it by PID (and kills it if this process dies)."""
    r = RedisServer(dir, persistence="none", name="bench-redis").start()
    if cfg.server_cpu is not None and r.pid is not None:
        os.sched_setaffinity(r.pid, {cfg.server_cpu})
    return r


def redis_sample(srv: Server, reset: bool = False) -> procstat.Sample | None:
    """redis-server's CPU time (utime+stime from /proc/PID/stat) and RSS; None without Redis. With
    ``reset``, also zero Redis's command statistics (``CONFIG RESETSTAT``; see :func:`redis_cmdstats`)."""
    if srv.redis is None or srv.redis.pid is None:
        return None
    try:
        if reset:
            redis_command(srv.redis.port, "CONFIG", "RESETSTAT")
        return procstat.sample(srv.redis.pid)
    except OSError:
        return None


def redis_cmdstats(srv: Server) -> dict[str, dict[str, float]]:
    """``INFO commandstats`` since the last reset: {command: {calls, usec, usec_per_call}} (Redis's own
    accounting of the time spent executing each command, without network I/O)."""
    if srv.redis is None or srv.redis.pid is None:
        return {}
    out: dict[str, dict[str, float]] = {}
    try:
        text = redis_command(srv.redis.port, "INFO", "commandstats")
    except OSError:
        return {}
    for line in str(text).splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line[8:].partition(":")
            kv = dict(x.split("=", 1) for x in rest.split(","))
            out[name] = {k: float(kv[k]) for k in ("calls", "usec", "usec_per_call") if k in kv}
    return out


async def _wait_workers(srv: Server, timeout: float) -> None:
    """Until the supervisor logged that all its workers listen; then their PIDs (from its log line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.proc is not None and srv.proc.returncode is not None:
            raise RuntimeError(f"server exited with {srv.proc.returncode}: {server_tail(srv)[-500:]}")
        for line in server_tail(srv, 20000).splitlines():
            if f"{srv.workers} workers (pids " in line:
                pids = line.split("(pids ", 1)[1].split(")", 1)[0].split()
                srv.worker_pids = [int(x) for x in pids]
                return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the {srv.workers} workers did not all listen in time: {server_tail(srv)[-500:]}")


def pin_workers(cfg: Cfg, srv: Server) -> list[int]:
    """Worker k (0-based, in the supervisor's order) on CPU (server_cpu + k) % ncpu: with two CPUs, worker
    2 shares CPU 1 with the clients. Returns the CPUs (empty when not pinning)."""
    if cfg.server_cpu is None or srv.workers <= 1:
        return []
    ncpu = os.cpu_count() or 1
    cpus = []
    for k, pid in enumerate(srv.worker_pids):
        cpu = (cfg.server_cpu + k) % ncpu
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, {cpu})
        cpus.append(cpu)
    return cpus


async def start_server(
    cfg: Cfg, broker: str, workers: int = 1, env_extra: Sequence[tuple[str, str]] = ()
) -> Server:
    """A fresh server (or the attached one) on a free port, healthy, with its API key read.

    ``broker`` "redis" starts a redis-server of its own first; ``workers`` > 1 runs ``--workers N``
    (Redis only) and waits until every worker listens."""
    if cfg.attach:
        host, port = cfg.attach
        await wait_healthy(host, port, None, 5)
        return Server(port=port, pid=cfg.server_pid, api_key=cfg.api_key, cmd="(attached)")
    if cfg.broker != "auto" and broker != "redis":
        broker = cfg.broker
    tmp = tempfile.TemporaryDirectory(prefix="tidings-bench-")
    data_dir = tmp.name
    port = free_port(cfg.host)
    redis = start_redis(cfg, Path(data_dir) / "redis") if broker == "redis" else None
    if broker == "memory":
        broker_args = "--broker memory://"
    elif redis is not None:
        broker_args = f"--broker {redis.url}"
    else:
        broker_args = ""
    if workers > 1:
        broker_args += f" --workers {workers}"
    cmd = cfg.server_cmd.format(
        python=shlex.quote(sys.executable),
        host=cfg.host,
        port=port,
        data_dir=data_dir,
        broker_args=broker_args,
    )
    argv = [*taskset(cfg.server_cpu), *shlex.split(cmd)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TIDINGS_CONFIG", str(BENCH / "tidings-bench.toml"))
    env.update(env_extra)  # a scenario's own settings (TIDINGS_METRICS=false)
    log = Path(data_dir) / "server.log"
    logf = _open_log(log)
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=data_dir, start_new_session=True
    )
    logf.close()
    srv = Server(port=port, pid=proc.pid, api_key="", data_dir=data_dir, proc=proc, cmd=cmd, tmp=tmp, log=log)
    srv.broker, srv.workers, srv.redis = broker, workers, redis
    try:
        if workers > 1:
            await _wait_workers(srv, 60)
            pin_workers(cfg, srv)
        await wait_healthy(cfg.host, port, proc, 20)
        key_file = Path(data_dir) / "api-key"
        for _ in range(50):
            if key_file.exists() and key_file.read_text().strip():
                break
            await asyncio.sleep(0.1)
        srv.key_overridden = bool(cfg.api_key)
        srv.api_key = cfg.api_key or (key_file.read_text().strip() if key_file.exists() else "")
    except Exception:
        await stop_server(srv)
        raise
    return srv


async def stop_server(srv: Server) -> None:
    if srv.proc is not None and srv.proc.returncode is None:
        srv.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(srv.proc.wait(), 5)
        except TimeoutError:
            srv.proc.kill()
            await srv.proc.wait()
    for pid in srv.worker_pids:  # a worker that outlived its supervisor (it should not): by its PID
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if srv.redis is not None:
        await asyncio.to_thread(srv.redis.kill)
    if srv.tmp is not None:
        srv.tmp.cleanup()


@contextlib.asynccontextmanager
async def running_server(
    cfg: Cfg, broker: str, workers: int = 1, env_extra: Sequence[tuple[str, str]] = ()
) -> AsyncIterator[Server]:
    """:func:`start_server`; on the way out its load generators are killed, then it is stopped (with its
    Redis, if any, and its data dir removed)."""
    srv = await start_server(cfg, broker, workers, env_extra)
    try:
        yield srv
    finally:
        for lg in srv.loadgens:
            lg.kill()
        await stop_server(srv)


def server_tail(srv: Server, chars: int = 1500) -> str:
    if srv.log and srv.log.exists():
        return srv.log.read_text(errors="replace")[-chars:]
    return ""


def key_args(srv: Server) -> list[str]:
    """Pass the API key by file so that it never appears in a command line or the results."""
    if srv.data_dir and (Path(srv.data_dir) / "api-key").exists() and not srv.key_overridden:
        return ["--api-key-file", str(Path(srv.data_dir) / "api-key")]
    SECRETS.add(srv.api_key)
    return ["--api-key", srv.api_key]


def redact(text: str) -> str:
    for s in SECRETS:
        if s:
            text = text.replace(s, "<api-key>")
    return text


def snap(srv: Server) -> procstat.Sample | None:
    """The server's CPU time and RSS now; None without a PID (attached) or once it is gone.

    With ``--workers`` it is the sum over the supervisor and its workers (the supervisor serves no
    client: its share is its constant few MiB and no CPU); :func:`worker_snap` is the workers alone."""
    if srv.pid is None:
        return None
    try:
        if srv.worker_pids:
            return procstat.sample_pids([srv.pid, *srv.worker_pids])
        return procstat.sample(srv.pid)
    except OSError:
        return None


def fd_counts(srv: Server) -> dict[int, int]:
    """Open files of each worker (or of the server alone): the difference between two readings is the
    connections each one took."""
    out: dict[int, int] = {}
    for pid in srv.worker_pids or ([srv.pid] if srv.pid else []):
        with contextlib.suppress(OSError):
            out[pid] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def fd_delta(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    return {pid: n - before.get(pid, 0) for pid, n in after.items()}


def worker_snap(srv: Server) -> procstat.Sample | None:
    """The workers' CPU time and VmRSS summed (without the supervisor); the server itself without
    ``--workers``."""
    try:
        return procstat.sample_pids(srv.worker_pids) if srv.worker_pids else snap(srv)
    except OSError:
        return None


async def committed(cfg: Cfg, srv: Server, channels: list[str]) -> dict[str, int]:
    """Top offset of each channel (GET /api/channels/<ch>/history?limit=1); 0 if never published."""
    headers = {"Authorization": f"Bearer {srv.api_key}"}
    out: dict[str, int] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        for ch in channels:
            async with s.get(
                f"http://{cfg.target_host}:{srv.port}/api/channels/{ch}/history",
                params={"limit": "1"},
                headers=headers,
            ) as resp:
                if resp.status == 404:
                    out[ch] = 0
                    continue
                resp.raise_for_status()
                out[ch] = int((await resp.json(loads=orjson.loads))["offset"])
    return out


def redis_tops(srv: Server, channels: list[str], prefix: str = "tidings") -> dict[str, int]:
    """Each channel's top offset as Redis holds it (``HGET <prefix>:{<ch>}:m t``, the counter the publish
    script increments): on a fresh Redis, the number of publications Redis ran for the channel."""
    assert srv.redis is not None
    out: dict[str, int] = {}
    for ch in channels:
        v = redis_command(srv.redis.port, "HGET", f"{prefix}:{{{ch}}}:m", "t")
        out[ch] = int(v) if v is not None else 0
    return out


async def in_store(cfg: Cfg, srv: Server, channels: list[str]) -> dict[str, int]:
    """Top offsets where the broker keeps them: in Redis itself for the Redis broker, else through the
    history API (:func:`committed`)."""
    if srv.redis is not None:
        return await asyncio.to_thread(redis_tops, srv, channels)
    return await committed(cfg, srv, channels)


# --------------------------------------------------------------------------------------------- wrk
class LuaTemplate(string.Template):
    """``@name`` placeholders: ``$`` is a Lua pattern anchor, ``@`` appears nowhere in Lua."""

    delimiter = "@"


def wrk_bin(cfg: Cfg) -> str | None:
    return None if cfg.no_wrk else shutil.which("wrk")


def write_wrk_script(
    srv: Server, tmp: Path, name: str, what: str, run_s: float, path: str, body: str
) -> tuple[Path, str]:
    """``wrk-publish.lua`` filled in, as ``tmp/<name>.lua``; returns its path and text.

    The script reads the API key from a file, so it never appears in a command line or result."""
    key_file = Path(srv.data_dir or "", "api-key")
    if not (srv.data_dir and key_file.exists() and not srv.key_overridden):
        key_file = tmp / "api-key"
        key_file.touch(mode=0o600)
        key_file.write_text(srv.api_key + "\n")
    lua = LuaTemplate(WRK_LUA.read_text()).substitute(
        what=what, run_us=int(run_s * 1e6), key_file=key_file, path=path, body=body
    )
    script = tmp / f"{name}.lua"
    script.write_text(lua)
    return script, lua


async def run_wrk(argv: list[str], timeout: float) -> tuple[dict[str, Any], str]:
    """Run wrk (bounded); returns the done() JSON (plus wrk's own Requests/sec) and wrk's stdout."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out_b, err_b = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        return {"error": "wrk_killed"}, ""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out = out_b.decode(errors="replace")
    lines = out.splitlines()
    js = [ln[8:] for ln in lines if ln.startswith("WRKJSON ")]
    if not js:
        return {"error": "wrk_no_output", "rc": proc.returncode, "stderr": err_b.decode()[-1000:]}, out
    res = dict(orjson.loads(js[-1]))
    for ln in lines:
        if ln.startswith("Requests/sec:"):
            with contextlib.suppress(ValueError):
                res["requests_per_sec_wrk"] = float(ln.split(":", 1)[1])
    return res, out
