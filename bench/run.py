"""Run the standard tidings benchmark set and write ``bench/results/<date>.md``.

    python bench/run.py                 # full set (10,000 subscribers, 19,000 idle, ...)
    python bench/run.py --quick         # smoke run with small N (about a minute)
    python bench/run.py --only fanout-1ch-rate,idle

For every scenario a fresh server is started (``python -m tidings serve`` on a free loopback port, a
temporary data dir, pinned to CPU 0); load generators (``bench/build/loadgen``, built on demand) and
the publisher (``bench/publisher.py``) run pinned to CPU 1. Server CPU time and RSS come from
/proc (``bench/procstat.py``). Every phase is bounded in time; everything started here is stopped here.
Raw per-process JSON goes to ``bench/results/raw/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
import procstat  # noqa: E402

LOADGEN = BENCH / "build" / "loadgen"
PUBLISHER = BENCH / "publisher.py"
DEFAULT_SERVER_CMD = (
    "{python} -m tidings serve --host {host} --port {port} --data-dir {data_dir} {broker_args}"
)
PER_PROC_MAX = 9500  # connections per loadgen process (open-files limit is 20,000 per process)
SECRETS: set[str] = set()  # API keys given on the command line, kept out of the results
SRC_IPS = 8  # spread client source addresses over 127.0.0.1..127.0.0.8 (ephemeral ports)
PAD = "x" * 66  # data {"t": <19 digits>, "pad": PAD} is 100 bytes of JSON, as publisher.py --size 100


# --------------------------------------------------------------------------------------------- config
@dataclass
class Sizes:
    subs: int
    channels_many: int
    idle: int
    storm: int
    storm_msgs: int
    echo_conns: int
    run_s: float
    rate_1ch: float
    rate_many: float
    sat_concurrency: int
    http_concurrency: int
    ws_window: int
    sat16_concurrency: int = 16  # fanout-1ch-sat16: HTTP publishes in flight
    batch_conns: int = 8  # http-batch: wrk connections
    batch_size: int = 100  # http-batch: publications per request
    broadcast_interval: float = 0.25  # fanout-broadcast: seconds between single publishes


FULL = Sizes(10_000, 100, 19_000, 10_000, 100, 100, 10.0, 30.0, 3000.0, 4, 50, 500)
QUICK = Sizes(500, 10, 1_000, 500, 100, 20, 3.0, 30.0, 300.0, 2, 50, 200)


@dataclass
class Cfg:
    sizes: Sizes
    quick: bool
    host: str
    server_cmd: str
    broker: str  # auto | memory | sqlite
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


@dataclass
class Result:
    name: str
    what: str
    clients: str = ""
    result: str = ""
    loss: str = ""
    latency: str = ""
    cpu: str = ""
    rss: str = ""
    errors: str = ""
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- helpers
def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def taskset(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


def fmt_int(n: float) -> str:
    return f"{n:,.0f}"


def build_loadgen() -> None:
    src = BENCH / "loadgen.c"
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= src.stat().st_mtime:
        return
    LOADGEN.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cc", "-O2", "-o", str(LOADGEN), str(src)], check=True, timeout=120)


def pct_from_hist(pairs: list[list[float]], p: float) -> float:
    total = sum(int(c) for _, c in pairs)
    if total == 0:
        return 0.0
    rank = max(1, min(total, int(p * total)))
    acc = 0
    for v, c in sorted(pairs):
        acc += int(c)
        if acc >= rank:
            return float(v)
    return float(sorted(pairs)[-1][0])


def merge(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine the JSON reports of several loadgen processes."""
    m: dict[str, Any] = {}
    for k in (
        "connections",
        "established",
        "subscribed",
        "open_at_end",
        "received",
        "received_before_ready",
        "expected",
        "loss",
        "dups",
        "gaps",
        "gap_msgs",
        "done",
        "recovered_true",
        "recovered_false",
        "echo_round_trips",
        "errors",
        "closed_after_ready",
        "disconnect_pushes",
        "other_frames",
        "pongs_sent",
    ):
        m[k] = sum(int(r.get(k, 0)) for r in rs)
    ek: Counter[str] = Counter()
    cc: Counter[str] = Counter()
    for r in rs:
        ek.update(r.get("error_kinds", {}))
        cc.update(r.get("close_codes", {}))
    m["error_kinds"], m["close_codes"] = dict(ek), dict(cc)
    firsts = [r["first_ns"] for r in rs if r.get("first_ns")]
    lasts = [r["last_ns"] for r in rs if r.get("last_ns")]
    m["first_ns"] = min(firsts) if firsts else 0
    m["last_ns"] = max(lasts) if lasts else 0
    win = (m["last_ns"] - m["first_ns"]) / 1e9 if firsts else 0.0
    m["window_s"] = win
    m["rate"] = m["received"] / win if win > 0 else 0.0
    m["start_ns"] = min(r["start_ns"] for r in rs) if rs else 0
    hist: Counter[float] = Counter()
    dh: Counter[float] = Counter()
    for r in rs:
        for v, c in r.get("hist_us", []):
            hist[v] += c
        for v, c in r.get("done_hist_us", []):
            dh[v] += c
    lat_max = max((r.get("lat_max_us", 0) for r in rs), default=0) / 1e3
    pairs = [[v, c] for v, c in hist.items()]
    m["latency_ms"] = {
        "count": sum(hist.values()),
        "p50": min(lat_max, pct_from_hist(pairs, 0.5) / 1e3),
        "p99": min(lat_max, pct_from_hist(pairs, 0.99) / 1e3),
        "max": lat_max,
    }
    done_pairs = [[v, c] for v, c in dh.items()]
    done_max = max((r.get("done_max_us", 0) for r in rs), default=0) / 1e3
    m["done_ms"] = {
        "p50": min(done_max, pct_from_hist(done_pairs, 0.5) / 1e3),
        "p99": min(done_max, pct_from_hist(done_pairs, 0.99) / 1e3),
        "max": done_max,
    }
    # time from the earliest process start until the last connection finished
    ends = [r["start_ns"] + r["all_done_ms"] * 1e6 for r in rs if r.get("all_done_ms", -1) >= 0]
    m["all_done_ms"] = (max(ends) - m["start_ns"]) / 1e6 if ends and len(ends) == len(rs) else -1.0
    m["ready_ms"] = max((r.get("ready_ms", -1) for r in rs), default=-1)
    return m


def lat_str(lat: dict[str, float]) -> str:
    if not lat.get("count", 1):
        return "-"
    return f"{lat['p50']:.1f} / {lat['p99']:.1f} / {lat['max']:.1f}"


def err_str(m: dict[str, Any], extra: dict[str, int] | None = None) -> str:
    kinds = Counter(m.get("error_kinds", {}))
    if extra:
        kinds.update(extra)
    if not kinds:
        return "0"
    return ", ".join(f"{k}x{v}" for k, v in kinds.most_common(4))


def split(n: int, procs: int) -> list[int]:
    base, extra = divmod(n, procs)
    return [base + (1 if i < extra else 0) for i in range(procs)]


def nprocs(n: int, at_least: int = 1) -> int:
    return max(at_least, math.ceil(n / PER_PROC_MAX), 2 if n >= 2000 else 1)


# --------------------------------------------------------------------------------------------- processes
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
    lgs: list[Loadgen] = []
    off = 0
    for k, cnt in enumerate(split(n, procs)):
        argv = [
            str(LOADGEN),
            *mode_args,
            "--host",
            cfg.attach[0] if cfg.attach else cfg.host,
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
    for lg in lgs:
        await lg.start()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(lg.ready.wait() for lg in lgs)), cfg.ready_timeout + 10)
    return lgs, [lg.ready_info for lg in lgs]


async def run_publisher(args: list[str], timeout: float) -> tuple[dict[str, Any], str]:
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


def _open_log(path: Path) -> Any:
    return open(path, "wb")  # handed to the child, closed right after the spawn


async def start_server(cfg: Cfg, broker: str) -> Server:
    if cfg.attach:
        host, port = cfg.attach
        await wait_healthy(host, port, None, 5)
        return Server(port=port, pid=cfg.server_pid, api_key=cfg.api_key, cmd="(attached)")
    if cfg.broker != "auto":
        broker = cfg.broker
    tmp = tempfile.TemporaryDirectory(prefix="tidings-bench-")
    data_dir = tmp.name
    port = free_port(cfg.host)
    broker_args = "--broker memory://" if broker == "memory" else ""
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
    env.setdefault("TIDINGS_CONFIG", str(REPO / "bench" / "tidings-bench.toml"))
    log = Path(data_dir) / "server.log"
    logf = _open_log(log)
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=data_dir, start_new_session=True
    )
    logf.close()
    srv = Server(port=port, pid=proc.pid, api_key="", data_dir=data_dir, proc=proc, cmd=cmd, tmp=tmp, log=log)
    try:
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
    if srv.tmp is not None:
        srv.tmp.cleanup()


def server_tail(srv: Server) -> str:
    if srv.log and srv.log.exists():
        return srv.log.read_text(errors="replace")[-1500:]
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
    if srv.pid is None:
        return None
    try:
        return procstat.sample(srv.pid)
    except OSError:
        return None


def cpu_per(
    before: procstat.Sample | None, after: procstat.Sample | None, n: int
) -> tuple[str, dict[str, Any]]:
    if before is None or after is None:
        return "-", {}
    d = after - before
    per = d.per(n)
    txt = f"{per:.2f} µs/op ({d.cpu_util * 100:.0f}% core)" if per is not None else "-"
    return txt, d.as_dict() | {"us_per_op": per}


# --------------------------------------------------------------------------------------------- wrk
WRK_LUA = """-- generated by bench/run.py: {what}
-- Publishes for RUN_US microseconds, then lets every connection go idle (delay() returns an hour),
-- so that nothing is in flight when wrk stops: acknowledged (2xx) can be compared with committed.
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} tb_timespec;
int clock_gettime(int clk, tb_timespec *tp);
]]
local ts = ffi.new("tb_timespec")
local function now_us()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000000 + math.floor(tonumber(ts.tv_nsec) / 1000)
end

local RUN_US = {run_us}
local kf = assert(io.open([==[{key_file}]==], "r"))
local key = kf:read("*l"):gsub("%s+$", "")
kf:close()

wrk.method = "POST"
wrk.path = [==[{path}]==]
wrk.body = [==[{body}]==]
wrk.headers["Authorization"] = "Bearer " .. key
wrk.headers["Content-Type"] = "application/json"

local threads = {{}}
function setup(thread) table.insert(threads, thread) end

-- per-thread counters (globals, read by done() through thread:get)
sent, ok, bad, first_us, last_us, deadline = 0, 0, 0, 0, 0, 0

function delay()
  local now = now_us()
  if deadline == 0 then deadline = now + RUN_US; first_us = now end
  if now >= deadline then return 3600000 end
  sent = sent + 1
  return 0
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
    last_us = now_us()
  else
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local s, o, b, first, last = 0, 0, 0, 0, 0
  for _, t in ipairs(threads) do
    s = s + t:get("sent"); o = o + t:get("ok"); b = b + t:get("bad")
    local f = t:get("first_us")
    if f > 0 and (first == 0 or f < first) then first = f end
    if t:get("last_us") > last then last = t:get("last_us") end
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"sent":%d,"ok":%d,"non2xx":%d,"status_errors":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,"window_us":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}}\\n',
    summary.requests, summary.duration, s, o, b, e.status, e.connect, e.read, e.write, e.timeout,
    (last > first) and (last - first) or 0, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


def wrk_bin(cfg: Cfg) -> str | None:
    return None if cfg.no_wrk else shutil.which("wrk")


def pub_body(channel: str) -> dict[str, Any]:
    return {"channel": channel, "data": {"t": time.time_ns(), "pad": PAD}}


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


async def committed(cfg: Cfg, srv: Server, channels: list[str]) -> dict[str, int]:
    """Top offset of each channel (GET /api/channels/<ch>/history?limit=1); 0 if never published."""
    host = cfg.attach[0] if cfg.attach else cfg.host
    headers = {"Authorization": f"Bearer {srv.api_key}"}
    out: dict[str, int] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        for ch in channels:
            async with s.get(
                f"http://{host}:{srv.port}/api/channels/{ch}/history", params={"limit": "1"}, headers=headers
            ) as resp:
                if resp.status == 404:
                    out[ch] = 0
                    continue
                resp.raise_for_status()
                out[ch] = int((await resp.json(loads=orjson.loads))["offset"])
    return out


def write_wrk_script(
    srv: Server, tmp: Path, name: str, what: str, run_s: float, path: str, body: str
) -> tuple[Path, str]:
    """The Lua script reads the API key from a file, so it never appears in a command line or result."""
    key_file = Path(srv.data_dir or "", "api-key")
    if not (srv.data_dir and key_file.exists() and not srv.key_overridden):
        key_file = tmp / "api-key"
        key_file.touch(mode=0o600)
        key_file.write_text(srv.api_key + "\n")
    lua = WRK_LUA.format(what=what, run_us=int(run_s * 1e6), key_file=key_file, path=path, body=body)
    script = tmp / f"{name}.lua"
    script.write_text(lua)
    return script, lua


async def wrk_publish(
    cfg: Cfg,
    name: str,
    what: str,
    *,
    path: str,
    body: dict[str, Any],
    conns: int,
    pubs_per_req: int,
    channels: list[str],
    unit: str,
    unit1: str,
) -> Result:
    """POST `body` to `path` with wrk for run_s seconds; check acknowledged == committed afterwards."""
    wrk = wrk_bin(cfg)
    assert wrk is not None
    sz = cfg.sizes
    r = Result(name, what)
    srv = await start_server(cfg, "sqlite")
    tmp = tempfile.TemporaryDirectory(prefix="tidings-wrk-")
    try:
        body_txt = orjson.dumps(body).decode()
        script, lua = write_wrk_script(srv, Path(tmp.name), name, what, sz.run_s, path, body_txt)
        host = cfg.attach[0] if cfg.attach else cfg.host
        dur = math.ceil(sz.run_s) + 2  # publishing stops after run_s (in the script); 2 s to drain
        argv = [
            *taskset(cfg.client_cpu),
            wrk,
            "-t1",
            f"-c{conns}",
            f"-d{dur}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            f"http://{host}:{srv.port}{path}",
        ]
        before = snap(srv)
        w, out = await run_wrk(argv, dur + 20)
        after = snap(srv)
        if "error" in w:
            r.errors = f"{w['error']} (rc {w.get('rc')}): {w.get('stderr', '')[-200:]}"
            r.raw = {"wrk": w, "stdout": out}
            return r
        offs = await committed(cfg, srv, channels)
        acked = int(w["ok"]) * pubs_per_req
        total = sum(offs.values())
        win = w["window_us"] / 1e6
        rate = acked / win if win > 0 else 0.0
        cpu_txt, cpu_raw = cpu_per(before, after, acked)
        r.clients = f"wrk -t1 -c{conns}"
        r.result = f"{fmt_int(rate)} {unit}/s ({fmt_int(acked)} acknowledged in {win:.1f} s)"
        if pubs_per_req > 1:
            r.result += f"; {fmt_int(w['ok'] / win if win > 0 else 0)} requests/s"
        r.loss = (
            f"committed = acknowledged ({fmt_int(total)})"
            if total == acked
            else f"MISMATCH: committed {fmt_int(total)}, acknowledged {fmt_int(acked)}"
        )
        r.latency = f"request {w['p50_us'] / 1e3:.1f} / {w['p99_us'] / 1e3:.1f} / {w['max_us'] / 1e3:.1f}"
        r.cpu = cpu_txt.replace("op", unit1)
        r.rss = f"{after.rss_kib / 1024:.0f} MiB" if after else "-"
        errs = {
            "non2xx": int(w["non2xx"]),
            "connect": int(w["connect_errors"]),
            "read": int(w["read_errors"]),
            "write": int(w["write_errors"]),
            "timeout": int(w["timeouts"]),
        }
        r.errors = err_str({}, {k: v for k, v in errs.items() if v})
        r.errors = r.errors if r.errors != "0" else "0 (non-2xx 0)"
        in_flight = int(w["sent"]) - int(w["ok"]) - int(w["non2xx"])
        if in_flight:
            r.notes.append(f"{in_flight} request(s) were still in flight when wrk stopped")
        r.notes.append(
            f"wrk's own Requests/sec ({w.get('requests_per_sec_wrk', 0):,.0f}) divides by its whole "
            f"-d{dur}s; the rate above uses the publishing window (first request to last 2xx)"
        )
        r.notes.append(f"history top offsets afterwards: {offs}")
        r.commands = [
            f"server: {srv.cmd}",
            f"wrk: {shlex.join(argv)}",
            f"  body ({len(body_txt)} bytes): {body_txt[:160]}{'...' if len(body_txt) > 160 else ''}",
        ]
        r.raw = {"wrk": w, "committed": offs, "acknowledged": acked, "server_cpu": cpu_raw, "lua": lua}
    finally:
        tmp.cleanup()
        await stop_server(srv)
    return r


# --------------------------------------------------------------------------------------------- scenarios
async def fanout(
    cfg: Cfg,
    name: str,
    *,
    channels: int,
    pub_args: list[str],
    pub_desc: str,
    chatsocket: bool = False,
    lg_extra: list[str] | None = None,
) -> Result:
    sz = cfg.sizes
    r = Result(name, pub_desc)
    srv = await start_server(cfg, "memory")
    lgs: list[Loadgen] = []
    try:
        n = sz.subs
        procs = nprocs(n)
        mode = ["--chatsocket"] if chatsocket else ["--channels", str(channels), "--channel-fmt", "bench:c%d"]
        dur = cfg.ready_timeout + sz.run_s + 15
        lgs, ready = await start_loadgens(cfg, srv, n, procs, [*mode, "--quiet", "2", *(lg_extra or [])], dur)
        ready_n = sum(int(x.get("subscribed" if not chatsocket else "connections", 0)) for x in ready)
        before = snap(srv)
        host = cfg.attach[0] if cfg.attach else cfg.host
        common = ["--host", host, "--port", str(srv.port), "--duration", f"{sz.run_s:g}"]
        if not chatsocket:
            common += [*key_args(srv), "--channels", str(channels), "--channel-fmt", "bench:c{i}"]
        pub, pub_cmd = await run_publisher([*common, *pub_args], sz.run_s + 30)
        reps = await asyncio.gather(*(lg.finish(sz.run_s + 20) for lg in lgs))
        after = snap(srv)
        m = merge(reps)
        # expected deliveries: every acknowledged publication times the subscribers of its channel
        if chatsocket:  # no acknowledgements in the demo protocol: every message sent must arrive
            expected = int(pub.get("sent", 0)) * m["established"]
        else:
            per_ch = pub.get("per_channel", {})
            subs_of = split(n, channels)  # connection i subscribes to channel i % channels
            subs_ratio = m["subscribed"] / n if n else 0
            expected = int(
                sum(per_ch.get(f"bench:c{c}", 0) * subs_of[c] for c in range(channels)) * subs_ratio
            )
        uniq = m["received"] - m["dups"]
        loss = max(0, expected - uniq)
        cpu_txt, cpu_raw = cpu_per(before, after, m["received"])
        r.clients = f"{m['established']:,} conns ({procs} proc(s)), {channels} ch; ready {ready_n:,}"
        r.result = (
            f"{fmt_int(m['rate'])} deliveries/s ({fmt_int(m['received'])} in {m['window_s']:.1f} s); "
            f"{fmt_int(pub.get('rate', 0))} publishes/s"
        )
        r.loss = f"{loss:,} of {expected:,}" + (f", dups {m['dups']}" if m["dups"] else "")
        if m["gaps"]:
            r.loss += f", gaps {m['gaps']}"
        r.latency = lat_str(m["latency_ms"])
        r.cpu = cpu_txt
        r.rss = f"{after.rss_kib / 1024:.0f} MiB" if after else "-"
        r.errors = err_str(m, {f"pub:{k}": v for k, v in pub.get("error_kinds", {}).items()})
        r.commands = [
            f"server: {srv.cmd}",
            *(f"loadgen: {shlex.join(lg.argv)}" for lg in lgs),
            f"publisher: {pub_cmd}",
        ]
        if m["received_before_ready"]:
            r.notes.append(f"{m['received_before_ready']:,} frames arrived before all clients were ready")
        if m["close_codes"]:
            r.notes.append(f"close codes seen: {m['close_codes']}")
        r.raw = {"loadgen": reps, "merged": m, "publisher": pub, "server_cpu": cpu_raw, "expected": expected}
    finally:
        for lg in lgs:
            lg.kill()
        if not r.raw:
            r.notes.append("server log tail: " + server_tail(srv)[-300:])
        await stop_server(srv)
    return r


async def sc_fanout_1ch_rate(cfg: Cfg) -> Result:
    s = cfg.sizes
    args = ["--mode", "http", "--rate", f"{s.rate_1ch:g}", "--concurrency", "4"]
    return await fanout(
        cfg,
        "fanout-1ch-rate",
        channels=1,
        pub_args=args,
        pub_desc=f"HTTP publish at {s.rate_1ch:g}/s to 1 channel",
    )


async def sc_fanout_1ch_sat(cfg: Cfg) -> Result:
    s = cfg.sizes
    args = ["--mode", "http", "--rate", "0", "--concurrency", str(s.sat_concurrency)]
    return await fanout(
        cfg,
        "fanout-1ch-sat",
        channels=1,
        pub_args=args,
        pub_desc=f"HTTP publish saturating ({s.sat_concurrency} in flight) to 1 channel",
    )


async def sc_fanout_1ch_sat16(cfg: Cfg) -> Result:
    s = cfg.sizes
    args = ["--mode", "http", "--rate", "0", "--concurrency", str(s.sat16_concurrency)]
    return await fanout(
        cfg,
        "fanout-1ch-sat16",
        channels=1,
        pub_args=args,
        pub_desc=f"HTTP publish saturating ({s.sat16_concurrency} in flight) to 1 channel",
    )


async def sc_fanout_broadcast(cfg: Cfg) -> Result:
    """One publication at a time; latency until the LAST subscriber has it, per publication."""
    s = cfg.sizes
    count = max(1, round(s.run_s / s.broadcast_interval))
    rate = 1.0 / s.broadcast_interval
    args = ["--mode", "http", "--rate", f"{rate:g}", "--concurrency", "1", "--count", str(count)]
    r = await fanout(
        cfg,
        "fanout-broadcast",
        channels=1,
        pub_args=args,
        pub_desc=f"{count} single HTTP publishes to 1 channel, one every {s.broadcast_interval * 1e3:g} ms "
        "(no overlap); latency = until the last subscriber got it",
        lg_extra=["--per-offset"],
    )
    reps = r.raw.get("loadgen")
    if not reps:
        return r
    m, pub = r.raw["merged"], r.raw["publisher"]
    worst: dict[int, int] = {}
    got: Counter[int] = Counter()
    for rep in reps:
        for off, us, n in rep.get("per_offset", []):
            worst[off] = max(worst.get(off, 0), int(us))
            got[off] += int(n)
    first, last = pub.get("first_offset"), pub.get("last_offset")
    offsets = list(range(first, last + 1)) if first is not None and last is not None else sorted(worst)
    subs = m["subscribed"]
    complete = [o for o in offsets if got[o] >= subs and o in worst]
    incomplete = [o for o in offsets if o not in complete]
    lat = sorted(worst[o] / 1e3 for o in complete)

    def pick(p: float) -> float:
        return lat[min(len(lat) - 1, max(0, math.ceil(p * len(lat)) - 1))] if lat else 0.0

    r.result = (
        f"{len(complete)} of {len(offsets)} broadcasts reached all {subs:,} subscribers; "
        f"{fmt_int(pub.get('published', 0))} acknowledged"
    )
    if lat:
        r.latency = f"last subscriber {pick(0.5):.1f} / {pick(0.99):.1f} / {lat[-1]:.1f}"
    else:
        r.latency = "-"
    if incomplete:
        r.loss += f"; incomplete broadcasts {incomplete[:10]}"
    beyond = sum(int(x.get("per_offset_beyond", 0)) for x in reps)
    if beyond:
        r.notes.append(f"{beyond} deliveries had offsets beyond the --per-offset table (4095)")
    r.notes.append(
        "latency = max over subscribers of (receive time - publisher's t) per publication, then p50/p99/max "
        f"over the {len(lat)} complete broadcasts; per-delivery latency p50/p99/max "
        f"{lat_str(m['latency_ms'])} ms"
    )
    r.raw["per_broadcast_ms"] = {str(o): worst.get(o, 0) / 1e3 for o in offsets}
    r.raw["receivers_per_offset"] = {str(o): got[o] for o in offsets}
    return r


async def sc_fanout_many(cfg: Cfg) -> Result:
    s = cfg.sizes
    args = ["--mode", "ws", "--rate", f"{s.rate_many:g}", "--window", "100"]
    return await fanout(
        cfg,
        "fanout-many",
        channels=s.channels_many,
        pub_args=args,
        pub_desc=f"/ws publish at {s.rate_many:g}/s round-robin over {s.channels_many} channels",
    )


async def sc_chatsocket(cfg: Cfg) -> Result:
    s = cfg.sizes
    args = ["--mode", "chatsocket", "--rate", f"{s.rate_1ch:g}"]
    return await fanout(
        cfg,
        "chatsocket-fanout",
        channels=1,
        pub_args=args,
        chatsocket=True,
        pub_desc=f"demo /chatsocket: one client sends {s.rate_1ch:g}/s, all receive",
    )


async def sc_idle(cfg: Cfg) -> Result:
    s = cfg.sizes
    r = Result("idle", "hold connections, no subscriptions")
    srv = await start_server(cfg, "memory")
    lgs: list[Loadgen] = []
    try:
        await asyncio.sleep(0.5)
        base = snap(srv)
        procs = nprocs(s.idle, at_least=2)
        lgs, ready = await start_loadgens(cfg, srv, s.idle, procs, ["--idle"], cfg.ready_timeout + 20)
        await asyncio.sleep(2.0)  # let the server settle
        held = snap(srv)
        for lg in lgs:
            lg.signal_stop()
        reps = await asyncio.gather(*(lg.finish(10) for lg in lgs))
        m = merge(reps)
        est = m["established"]
        r.clients = f"{s.idle:,} requested ({procs} proc(s))"
        r.result = f"{est:,} held; all established in {m['ready_ms'] / 1e3:.1f} s"
        if base and held and est:
            per = (held.rss_kib - base.rss_kib) / est
            r.rss = f"{per:.1f} KiB/conn ({base.rss_kib / 1024:.0f} → {held.rss_kib / 1024:.0f} MiB)"
            r.raw["rss_kib_per_conn"] = per
        r.loss = "-"
        r.latency = "-"
        r.errors = err_str(m)
        r.commands = [f"server: {srv.cmd}", *(f"loadgen: {shlex.join(lg.argv)}" for lg in lgs)]
        r.raw |= {
            "loadgen": reps,
            "merged": m,
            "ready": ready,
            "rss_before": base.as_dict() if base else None,
            "rss_held": held.as_dict() if held else None,
        }
    finally:
        for lg in lgs:
            lg.kill()
        await stop_server(srv)
    return r


async def sc_storm(cfg: Cfg) -> Result:
    s = cfg.sizes
    r = Result("connect-storm", f"{s.storm:,} clients connect at once, each recovers {s.storm_msgs} messages")
    srv = await start_server(cfg, "memory")
    lgs: list[Loadgen] = []
    try:
        host = cfg.attach[0] if cfg.attach else cfg.host
        pub, pub_cmd = await run_publisher(
            [
                "--mode",
                "http",
                "--host",
                host,
                "--port",
                str(srv.port),
                *key_args(srv),
                "--channel-fmt",
                "bench:storm",
                "--count",
                str(s.storm_msgs + 1),
                "--concurrency",
                "1",
                "--duration",
                "20",
            ],
            40,
        )
        first, epoch = pub.get("first_offset"), pub.get("epoch")
        if first is None or pub.get("published") != s.storm_msgs + 1:
            r.errors = f"prefill failed: {pub.get('error_kinds')}"
            r.raw = {"publisher": pub}
            return r
        before = snap(srv)
        procs = nprocs(s.storm)
        mode = [
            "--recover",
            "--channels",
            "1",
            "--channel-fmt",
            "bench:storm",
            "--since-offset",
            str(first),
            "--since-epoch",
            str(epoch),
            "--expect",
            str(s.storm_msgs),
            "--quiet",
            "5",
        ]
        lgs, _ = await start_loadgens(cfg, srv, s.storm, procs, mode, 30)
        reps = await asyncio.gather(*(lg.finish(35) for lg in lgs))
        after = snap(srv)
        m = merge(reps)
        cpu_txt, cpu_raw = cpu_per(before, after, m["received"])
        r.clients = f"{m['established']:,} conns ({procs} proc(s))"
        done = m["all_done_ms"]
        r.result = (
            f"all done in {done / 1e3:.2f} s" if done >= 0 else f"NOT all done ({m['done']:,} of {s.storm:,})"
        )
        r.result += f"; done p50/p99 {m['done_ms']['p50'] / 1e3:.2f}/{m['done_ms']['p99'] / 1e3:.2f} s"
        expected = s.storm_msgs * m["subscribed"]
        loss = max(0, expected - (m["received"] - m["dups"]))
        r.loss = f"{loss:,} of {expected:,}"
        if m["recovered_false"]:
            r.loss += f"; recovered=false x{m['recovered_false']}"
        if m["dups"] or m["gaps"]:
            r.loss += f"; dups {m['dups']}, gaps {m['gaps']}"
        r.latency = "-"
        r.cpu = cpu_txt.replace("op", "replayed msg")
        r.rss = f"{after.rss_kib / 1024:.0f} MiB" if after else "-"
        r.errors = err_str(m)
        r.commands = [
            f"server: {srv.cmd}",
            f"prefill: {pub_cmd}",
            *(f"loadgen: {shlex.join(lg.argv)}" for lg in lgs),
        ]
        r.raw = {"loadgen": reps, "merged": m, "publisher": pub, "server_cpu": cpu_raw}
    finally:
        for lg in lgs:
            lg.kill()
        await stop_server(srv)
    return r


async def publish_only(
    cfg: Cfg, name: str, args: list[str], what: str, note: str = "", procs: int = 1
) -> Result:
    """Publishers only, no subscribers. ``procs`` publisher processes run at once (one Python process
    tops out near 40,000 WebSocket messages/s each way, below the server's rate), their figures summed."""
    s = cfg.sizes
    r = Result(name, what)
    srv = await start_server(cfg, "sqlite")
    try:
        host = cfg.attach[0] if cfg.attach else cfg.host
        before = snap(srv)
        argv = [
            *args,
            "--host",
            host,
            "--port",
            str(srv.port),
            *key_args(srv),
            "--duration",
            f"{s.run_s:g}",
            "--channels",
            "10",
            "--channel-fmt",
            "bench:p{i}",
        ]
        runs = await asyncio.gather(*(run_publisher(argv, s.run_s + 30) for _ in range(procs)))
        after = snap(srv)
        pubs = [p for p, _ in runs]
        pub = dict(pubs[0])
        if procs > 1:
            pub["published"] = sum(int(p.get("published", 0)) for p in pubs)
            pub["rate"] = sum(float(p.get("rate", 0)) for p in pubs)
            pub["concurrency"] = f"{procs} x {pubs[0].get('concurrency')}"
            pub["errors"] = sum(int(p.get("errors", 0)) for p in pubs)
            acks = [p.get("ack_ms", {}) for p in pubs]
            pub["ack_ms"] = {k: max(float(a.get(k, 0)) for a in acks) for k in ("p50", "p99", "max")}
        pub_cmd = runs[0][1] + (f"  (x{procs} at once)" if procs > 1 else "")
        published = int(pub.get("published", 0))
        cpu_txt, cpu_raw = cpu_per(before, after, published)
        r.clients = f"concurrency {pub.get('concurrency')}"
        r.result = f"{fmt_int(pub.get('rate', 0))} publishes/s ({fmt_int(published)} acknowledged)"
        offs = await committed(cfg, srv, [f"bench:p{i}" for i in range(10)])
        total = sum(offs.values())
        r.loss = (
            f"committed = acknowledged ({fmt_int(total)})"
            if total == published
            else f"MISMATCH: committed {fmt_int(total)}, acknowledged {fmt_int(published)}"
        )
        if note:
            r.result += f" [{note}]"
            r.notes.append(note)
        ack = pub.get("ack_ms", {})
        r.latency = f"ack {ack.get('p50', 0):.1f} / {ack.get('p99', 0):.1f} / {ack.get('max', 0):.1f}"
        r.cpu = cpu_txt.replace("op", "publish")
        r.rss = f"{after.rss_kib / 1024:.0f} MiB" if after else "-"
        r.errors = err_str(pub)
        r.commands = [f"server: {srv.cmd}", f"publisher: {pub_cmd}"]
        r.raw = {"publisher": pubs, "server_cpu": cpu_raw, "committed": offs}
    finally:
        await stop_server(srv)
    return r


async def sc_http_publish(cfg: Cfg) -> Result:
    c = cfg.sizes.http_concurrency
    if wrk_bin(cfg) is None:
        return await publish_only(
            cfg,
            "http-publish",
            ["--mode", "http", "--concurrency", str(c)],
            f"POST /api/publish, {c} concurrent keep-alive, broker default (SQLite)",
            note="Python publisher (wrk not found or --no-wrk): client-bound, below the server's rate",
        )
    return await wrk_publish(
        cfg,
        "http-publish",
        f"POST /api/publish to 1 channel, {c} concurrent keep-alive (wrk), broker default (SQLite)",
        path="/api/publish",
        body=pub_body("bench:c0"),
        conns=c,
        pubs_per_req=1,
        channels=["bench:c0"],
        unit="publishes",
        unit1="publish",
    )


async def sc_http_batch(cfg: Cfg) -> Result:
    s = cfg.sizes
    if wrk_bin(cfg) is None:
        return Result("http-batch", "POST /api/batch", errors="skipped: needs wrk (not found or --no-wrk)")
    body = {"publications": [pub_body(f"bench:c{i % 10}") for i in range(s.batch_size)]}
    return await wrk_publish(
        cfg,
        "http-batch",
        f"POST /api/batch, {s.batch_size} publications per request over 10 channels, "
        f"{s.batch_conns} concurrent keep-alive (wrk), broker default (SQLite)",
        path="/api/batch",
        body=body,
        conns=s.batch_conns,
        pubs_per_req=s.batch_size,
        channels=[f"bench:c{i}" for i in range(10)],
        unit="publications",
        unit1="publication",
    )


async def sc_ws_publish(cfg: Cfg) -> Result:
    w = cfg.sizes.ws_window
    return await publish_only(
        cfg,
        "ws-publish",
        ["--mode", "ws", "--window", str(w)],
        f"/ws publish commands, 2 publisher processes x {w} in flight on 1 socket each, "
        "broker default (SQLite)",
        procs=2,
    )


async def sc_echo(cfg: Cfg) -> Result:
    s = cfg.sizes
    r = Result("echo", f"/websocket round trips, {s.echo_conns} connections, 1 in flight each")
    srv = await start_server(cfg, "memory")
    lgs: list[Loadgen] = []
    try:
        before = snap(srv)
        lgs, _ = await start_loadgens(cfg, srv, s.echo_conns, 1, ["--echo", "--quiet", "0"], s.run_s + 2)
        reps = await asyncio.gather(*(lg.finish(s.run_s + 15) for lg in lgs))
        after = snap(srv)
        m = merge(reps)
        cpu_txt, _ = cpu_per(before, after, m["echo_round_trips"])
        r.clients = f"{m['established']:,} conns"
        r.result = f"{fmt_int(m['rate'])} round trips/s"
        r.loss = "-"
        r.latency = "RTT " + lat_str(m["latency_ms"])
        r.cpu = cpu_txt.replace("op", "round trip")
        r.rss = f"{after.rss_kib / 1024:.0f} MiB" if after else "-"
        r.errors = err_str(m)
        r.commands = [f"server: {srv.cmd}", *(f"loadgen: {shlex.join(lg.argv)}" for lg in lgs)]
        r.raw = {"loadgen": reps, "merged": m}
    finally:
        for lg in lgs:
            lg.kill()
        await stop_server(srv)
    return r


SCENARIOS: dict[str, Callable[[Cfg], Coroutine[Any, Any, Result]]] = {
    "fanout-1ch-rate": sc_fanout_1ch_rate,
    "fanout-1ch-sat": sc_fanout_1ch_sat,
    "fanout-1ch-sat16": sc_fanout_1ch_sat16,
    "fanout-broadcast": sc_fanout_broadcast,
    "fanout-many": sc_fanout_many,
    "idle": sc_idle,
    "connect-storm": sc_storm,
    "http-publish": sc_http_publish,
    "http-batch": sc_http_batch,
    "ws-publish": sc_ws_publish,
    "echo": sc_echo,
    "chatsocket-fanout": sc_chatsocket,
}


# --------------------------------------------------------------------------------------------- report
def machine() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break

    def ver(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": ver("aiohttp"),
        "uvloop": ver("uvloop"),
        "orjson": ver("orjson"),
        "tidings": ver("tidings"),
        "nofile": " / ".join(
            str(x) for x in __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)
        ),
    }


def write_report(cfg: Cfg, results: list[Result], started: dt.datetime, argv: list[str]) -> Path:
    mach = machine()
    stamp = started.strftime("%Y-%m-%d")
    out = cfg.out or BENCH / "results" / (f"{stamp}-quick.md" if cfg.quick else f"{stamp}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    L: list[str] = []
    L.append(
        f"# tidings benchmark results, {started.strftime('%Y-%m-%d %H:%M UTC')}"
        + (" (quick)" if cfg.quick else "")
    )
    L.append("")
    L.append("| | |")
    L.append("| --- | --- |")
    L.append(f"| Machine | {mach['nproc']} CPUs ({mach['cpu']}), {mach['memory']}, Linux {mach['kernel']} |")
    L.append(f"| Open files (soft / hard) | {mach['nofile']} |")
    L.append(
        f"| Software | Python {mach['python']}, aiohttp {mach['aiohttp']}, uvloop {mach['uvloop']}, "
        f"orjson {mach['orjson']}, tidings {mach['tidings']} |"
    )
    L.append(
        f"| Placement | server on CPU {cfg.server_cpu}, "
        f"load generators and publisher on CPU {cfg.client_cpu} |"
    )
    L.append(
        "| Loopback receive path | "
        + (
            f"steered to CPU {cfg.client_cpu} (RPS on lo), as a client machine's own kernel would do it |"
            if cfg.steer_rx
            else "on the sending CPU (the Linux default for lo): the server pays its clients' receive path |"
        )
    )
    L.append(
        f"| Load generators | {'busy-polling (never sleep)' if cfg.busy_poll else 'sleep in epoll_wait'} |"
    )
    L.append(f"| Command | `{redact(shlex.join(['python', *argv]))}` |")
    L.append("")
    L.append(
        "| Scenario | Load | Clients | Result | Loss | Latency p50 / p99 / max (ms) "
        "| Server CPU | Server RSS | Errors |"
    )
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        cells = [r.name, r.what, r.clients, r.result, r.loss, r.latency, r.cpu, r.rss, r.errors]
        L.append("| " + " | ".join(c.replace("|", "\\|") or "-" for c in cells) + " |")
    L.append("")
    L.append(
        "Server CPU = server process CPU time (utime+stime, /proc/PID/stat) during the measured phase "
        "divided by"
    )
    L.append(
        "the deliveries (or publishes, round trips) in it. Latency = receive time minus the publisher's `t`."
    )
    L.append("")
    L.append("## Commands and notes")
    for r in results:
        L.append("")
        L.append(f"### {r.name}")
        L.append("")
        if r.notes:
            for n in r.notes:
                L.append(f"- {n}")
            L.append("")
        L.append("```")
        L.extend(redact(c) for c in r.commands or ["(did not run)"])
        L.append("```")
    out.write_text("\n".join(L) + "\n")
    raw_dir = BENCH / "results" / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    raw = raw_dir / f"{started.strftime('%Y-%m-%dT%H%M%S')}{'-quick' if cfg.quick else ''}.json"
    raw.write_bytes(
        orjson.dumps(
            {"machine": mach, "results": [r.__dict__ for r in results]},
            option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS,
        )
    )
    return out


# --------------------------------------------------------------------------------------------- main
async def main_async(cfg: Cfg, names: list[str], argv: list[str]) -> Path:
    started = dt.datetime.now(dt.UTC)
    results: list[Result] = []
    for name in names:
        t0 = time.monotonic()
        print(f"== {name} ...", file=sys.stderr, flush=True)
        try:
            res = await asyncio.wait_for(SCENARIOS[name](cfg), cfg.scenario_timeout)
        except TimeoutError:
            res = Result(name, "", errors=f"scenario timed out after {cfg.scenario_timeout:g} s")
        except Exception as e:  # a failed scenario must not stop the set
            res = Result(name, "", errors=f"failed: {type(e).__name__}: {e}"[:300])
        print(f"   {res.result or res.errors}  [{time.monotonic() - t0:.0f} s]", file=sys.stderr, flush=True)
        results.append(res)
        await asyncio.sleep(1.0)  # let sockets drain between scenarios
    return write_report(cfg, results, started, argv)


def parse_args(argv: list[str]) -> tuple[Cfg, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small N and short runs (smoke test)")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(SCENARIOS)}")
    p.add_argument(
        "--server-cmd",
        default=DEFAULT_SERVER_CMD,
        help="server command template; {python} {host} {port} {data_dir} {broker_args}",
    )
    p.add_argument(
        "--broker",
        choices=["auto", "memory", "sqlite"],
        default="auto",
        help="auto: memory for fan-out/idle/storm/echo, SQLite (server default) for publish rates",
    )
    p.add_argument("--attach", default="", help="HOST:PORT of a running server instead of starting one")
    p.add_argument("--server-pid", type=int, default=None, help="with --attach: PID for CPU/RSS figures")
    p.add_argument("--api-key", default="", help="HTTP API key (default: read <data-dir>/api-key)")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument("--subs", type=int, default=0, help="override the number of subscribers")
    p.add_argument("--run-seconds", type=float, default=0, help="override the publishing time")
    p.add_argument("--scenario-timeout", type=float, default=90.0, help="hard cap per scenario, seconds")
    p.add_argument(
        "--ready-timeout", type=float, default=25.0, help="cap for connecting+subscribing, seconds"
    )
    p.add_argument("--out", default="", help="Markdown output path")
    p.add_argument(
        "--no-wrk", action="store_true", help="http-publish via the Python publisher even with wrk"
    )
    p.add_argument(
        "--steer-rx",
        action="store_true",
        help="receive processing of loopback packets on the client CPU (RPS on lo; root; restored after)",
    )
    p.add_argument(
        "--busy-poll",
        action="store_true",
        help="load generators never sleep: the server's writes need no cross-CPU wakeup (see README)",
    )
    a = p.parse_args(argv)
    sizes = QUICK if a.quick else FULL
    if a.subs:
        sizes = Sizes(**(sizes.__dict__ | {"subs": a.subs}))
    if a.run_seconds:
        sizes = Sizes(**(sizes.__dict__ | {"run_s": min(a.run_seconds, 30.0)}))
    attach = None
    if a.attach:
        h, _, pt = a.attach.rpartition(":")
        if not h.startswith("127."):
            p.error("--attach must be a loopback address")
        attach = (h, int(pt))
    ncpu = os.cpu_count() or 1
    pin = not a.no_pin and ncpu >= 2
    cfg = Cfg(
        sizes=sizes,
        quick=a.quick,
        host="127.0.0.1",
        server_cmd=a.server_cmd,
        broker=a.broker,
        attach=attach,
        server_pid=a.server_pid,
        api_key=a.api_key,
        server_cpu=a.server_cpu if pin else None,
        client_cpu=a.client_cpu if pin else None,
        scenario_timeout=a.scenario_timeout,
        ready_timeout=a.ready_timeout,
        out=Path(a.out) if a.out else None,
        no_wrk=a.no_wrk,
        busy_poll=a.busy_poll,
        steer_rx=a.steer_rx,
    )
    names = [n.strip() for n in a.only.split(",") if n.strip()] or list(SCENARIOS)
    for n in names:
        if n not in SCENARIOS:
            p.error(f"unknown scenario {n!r}")
    return cfg, names


RPS_LO = Path("/sys/class/net/lo/queues/rx-0/rps_cpus")


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg, names = parse_args(argv)
    build_loadgen()
    if cfg.client_cpu is not None:
        os.sched_setaffinity(0, {cfg.client_cpu})  # inherited by loadgens and the publisher
    with steered_rx(cfg.client_cpu, cfg.steer_rx), asyncio.Runner() as runner:
        out = runner.run(main_async(cfg, names, ["bench/run.py", *argv]))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
