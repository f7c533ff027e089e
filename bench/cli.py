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
import datetime as dt
import os
import sys
import time
from pathlib import Path

from bench.harness import DEFAULT_SERVER_CMD, Cfg, build_loadgen, steered_rx
from bench.report import Result, write_report
from bench.scenarios import BY_NAME, FULL, QUICK, Sizes


async def main_async(cfg: Cfg, sizes: Sizes, names: list[str], argv: list[str]) -> Path:
    started = dt.datetime.now(dt.UTC)
    results: list[Result] = []
    for name in names:
        t0 = time.monotonic()
        load, cpu0 = uptime(), cpu_times()
        print(f"== {name} ... (load average {load})", file=sys.stderr, flush=True)
        try:
            cap = max(cfg.scenario_timeout, BY_NAME[name].min_timeout)
            res = await asyncio.wait_for(BY_NAME[name](cfg, sizes), cap)
        except TimeoutError:
            res = Result(name, "", errors=f"scenario timed out after {cap:g} s")
        except Exception as e:  # a failed scenario must not stop the set
            res = Result(name, "", errors=f"failed: {type(e).__name__}: {e}"[:300])
        split = cpu_split(cpu0, cpu_times())
        res.notes.append(
            f"load average (1, 5, 15 min) before: {load}; after: {uptime()} (the benchmark itself keeps "
            f"about 2 runnable: server and clients); all CPUs over the scenario: {split}"
        )
        print(f"   {res.result or res.errors}  [{time.monotonic() - t0:.0f} s]", file=sys.stderr, flush=True)
        results.append(res)
        await asyncio.sleep(1.0)  # let sockets drain between scenarios
    return write_report(cfg, results, started, argv)


def uptime() -> str:
    """The load averages (/proc/loadavg: 1, 5 and 15 minutes), as `uptime` prints them."""
    try:
        return ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_times() -> list[int]:
    """The machine's CPU time so far (/proc/stat "cpu" line: user nice system idle iowait irq softirq
    steal ..., in clock ticks)."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return []


def cpu_split(a: list[int], b: list[int]) -> str:
    """Busy / idle / steal shares of all CPUs between two :func:`cpu_times` readings."""
    if len(a) < 8 or len(b) < 8:
        return "?"
    d = [y - x for x, y in zip(a, b, strict=True)]
    total = sum(d) or 1
    busy = d[0] + d[1] + d[2] + d[5] + d[6]
    return f"busy {busy / total:.0%}, idle {(d[3] + d[4]) / total:.0%}, steal {d[7] / total:.0%}"


def parse_args(argv: list[str]) -> tuple[Cfg, Sizes, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small N and short runs (smoke test)")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BY_NAME)}")
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
    p.add_argument("--idle-big", type=int, default=0, help="override idle-100k-w6's connections (smoke runs)")
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
        sizes = sizes.replace(subs=a.subs)
    if a.idle_big:
        sizes = sizes.replace(idle_big=a.idle_big)
    if a.run_seconds:
        sizes = sizes.replace(run_s=min(a.run_seconds, 30.0))
    attach = None
    if a.attach:
        h, _, pt = a.attach.rpartition(":")
        if not h.startswith("127."):
            p.error("--attach must be a loopback address")
        attach = (h, int(pt))
    ncpu = os.cpu_count() or 1
    pin = not a.no_pin and ncpu >= 2
    cfg = Cfg(
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
    names = [n.strip() for n in a.only.split(",") if n.strip()] or list(BY_NAME)
    for n in names:
        if n not in BY_NAME:
            p.error(f"unknown scenario {n!r}")
    return cfg, sizes, names


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg, sizes, names = parse_args(argv)
    build_loadgen()
    if cfg.client_cpu is not None:
        os.sched_setaffinity(0, {cfg.client_cpu})  # inherited by loadgens and the publisher
    with steered_rx(cfg.client_cpu, cfg.steer_rx), asyncio.Runner() as runner:
        out = runner.run(main_async(cfg, sizes, names, ["bench/run.py", *argv]))
    print(out)
    return 0
