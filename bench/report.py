"""The results: one :class:`Result` row per scenario, its table cells, and the Markdown file
(``bench/results/<date>.md``) with the raw JSON next to it (``bench/results/raw/``, git-ignored)."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import resource
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench import procstat
from bench.harness import BENCH, Cfg, redact


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


# --------------------------------------------------------------------------------------------- cells
def fmt_int(n: float) -> str:
    return f"{n:,.0f}"


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


def rss_str(after: procstat.Sample | None) -> str:
    return f"{after.rss_kib / 1024:.0f} MiB" if after else "-"


def committed_str(committed: int, acknowledged: int, where: str = "committed") -> str:
    """The Loss column of the publish scenarios: every acknowledged publication must be committed
    (``where`` = "in Redis" for the Redis broker: the top offsets Redis holds)."""
    if committed == acknowledged:
        return f"{where} = acknowledged ({fmt_int(committed)})"
    return f"MISMATCH: {where} {fmt_int(committed)}, acknowledged {fmt_int(acknowledged)}"


def cpu_per(
    before: procstat.Sample | None, after: procstat.Sample | None, n: int
) -> tuple[str, dict[str, Any]]:
    """Server CPU per operation between two samples: the cell ("… µs/op (…% core)") and the raw figures."""
    if before is None or after is None:
        return "-", {}
    d = after - before
    per = d.per(n)
    txt = f"{per:.2f} µs/op ({d.cpu_util * 100:.0f}% core)" if per is not None else "-"
    return txt, d.as_dict() | {"us_per_op": per}


# --------------------------------------------------------------------------------------------- file
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
        "nofile": " / ".join(str(x) for x in resource.getrlimit(resource.RLIMIT_NOFILE)),
    }


def render(
    cfg: Cfg, results: list[Result], started: dt.datetime, argv: list[str], mach: dict[str, str]
) -> str:
    """The Markdown report: machine and placement, one table row per scenario, then commands and notes."""
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
    if cfg.broker != "auto":  # the scenarios' own broker words below are overridden (not Redis ones)
        L.append(f"| Broker | `--broker {cfg.broker}`: every scenario not on Redis ran on {cfg.broker} |")
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
    return "\n".join(L) + "\n"


def write_report(cfg: Cfg, results: list[Result], started: dt.datetime, argv: list[str]) -> Path:
    """Write ``bench/results/<date>[-quick].md`` (or ``--out``) and the raw JSON; returns the former."""
    mach = machine()
    stamp = started.strftime("%Y-%m-%d")
    out = cfg.out or BENCH / "results" / (f"{stamp}-quick.md" if cfg.quick else f"{stamp}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(cfg, results, started, argv, mach))
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
