"""Server CPU time and memory from /proc, for "server CPU per delivery" and "RSS per connection".

    sample = procstat.sample(pid)            # before
    ...
    after = procstat.sample(pid)
    d = after - sample                       # Delta: cpu_s, utime_s, stime_s, rss_kib, wall_s
    us_per_delivery = d.cpu_us / deliveries

CPU is utime+stime of the process (all its threads) from /proc/PID/stat, in clock ticks
(SC_CLK_TCK, usually 100/s, so each sample is +-10 ms: measure over seconds, not milliseconds).
RSS is VmRSS from /proc/PID/status (KiB). ``--children`` adds the process's descendants.

CLI:  python bench/procstat.py PID [--interval S --count N]   prints one JSON line per sample.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.stats import us_per_op

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Sample:
    pid: int
    wall: float  # time.monotonic()
    utime_ticks: int
    stime_ticks: int
    rss_kib: int
    hwm_kib: int  # VmHWM, peak RSS
    threads: int

    @property
    def cpu_s(self) -> float:
        return (self.utime_ticks + self.stime_ticks) / CLK_TCK

    def __sub__(self, other: Sample) -> Delta:
        return Delta(
            wall_s=self.wall - other.wall,
            utime_s=(self.utime_ticks - other.utime_ticks) / CLK_TCK,
            stime_s=(self.stime_ticks - other.stime_ticks) / CLK_TCK,
            rss_kib=self.rss_kib - other.rss_kib,
            rss_after_kib=self.rss_kib,
            hwm_kib=self.hwm_kib,
        )

    def as_dict(self) -> dict[str, float | int]:
        return {
            "pid": self.pid,
            "cpu_s": self.cpu_s,
            "utime_s": self.utime_ticks / CLK_TCK,
            "stime_s": self.stime_ticks / CLK_TCK,
            "rss_kib": self.rss_kib,
            "hwm_kib": self.hwm_kib,
            "threads": self.threads,
        }


@dataclass(frozen=True, slots=True)
class Delta:
    wall_s: float
    utime_s: float
    stime_s: float
    rss_kib: int
    rss_after_kib: int
    hwm_kib: int

    @property
    def cpu_s(self) -> float:
        return self.utime_s + self.stime_s

    @property
    def cpu_us(self) -> float:
        return self.cpu_s * 1e6

    @property
    def cpu_util(self) -> float:
        """Fraction of one core used over the interval."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    def per(self, n: int) -> float | None:
        """Server CPU microseconds per unit of work (delivery, publish, round trip)."""
        return us_per_op(self.cpu_s, n)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "wall_s": round(self.wall_s, 3),
            "cpu_s": round(self.cpu_s, 3),
            "utime_s": self.utime_s,
            "stime_s": self.stime_s,
            "cpu_util": round(self.cpu_util, 3),
            "rss_delta_kib": self.rss_kib,
            "rss_kib": self.rss_after_kib,
            "hwm_kib": self.hwm_kib,
        }


def _read_one(pid: int) -> tuple[int, int, int, int, int]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    rss = hwm = threads = 0
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith(b"VmHWM:"):
                hwm = int(line.split()[1])
            elif line.startswith(b"Threads:"):
                threads = int(line.split()[1])
    return utime, stime, rss, hwm, threads


def descendants(pid: int) -> list[int]:
    """Child processes, recursively (via /proc/PID/task/*/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def sample(pid: int, children: bool = False) -> Sample:
    """One reading of the process (and optionally its descendants, summed)."""
    pids = [pid, *descendants(pid)] if children else [pid]
    u = s = r = h = th = 0
    for p in pids:
        try:
            a, b, c, d, e = _read_one(p)
        except (OSError, ValueError):
            if p == pid:
                raise
            continue
        u, s, r, h, th = u + a, s + b, r + c, h + d, th + e
    return Sample(pid, time.monotonic(), u, s, r, h, th)


def sample_pids(pids: list[int]) -> Sample:
    """One reading of several processes, summed (e.g. the workers of ``tidings serve --workers N``);
    raises OSError when one of them is gone. ``pid`` of the result is the first one's."""
    u = s = r = h = th = 0
    for p in pids:
        a, b, c, d, e = _read_one(p)
        u, s, r, h, th = u + a, s + b, r + c, h + d, th + e
    return Sample(pids[0], time.monotonic(), u, s, r, h, th)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Sample a process's CPU time and RSS from /proc.")
    p.add_argument("pid", type=int)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--count", type=int, default=1, help="samples to take (bounded, max 3600)")
    p.add_argument("--children", action="store_true")
    a = p.parse_args(argv)
    prev: Sample | None = None
    for i in range(max(1, min(a.count, 3600))):
        if i:
            time.sleep(a.interval)
        cur = sample(a.pid, a.children)
        rec: dict[str, object] = {"sample": cur.as_dict()}
        if prev is not None:
            rec["delta"] = (cur - prev).as_dict()
        sys.stdout.write(orjson.dumps(rec).decode() + "\n")
        sys.stdout.flush()
        prev = cur
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
