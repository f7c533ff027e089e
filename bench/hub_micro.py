"""The fan-out's own CPU per delivery, without the kernel: Hub.deliver to N real /ws connection objects
whose transport only counts bytes, then the flush. Deterministic enough to compare two checkouts of the
code side by side, which the socket benchmarks (run.py), with ±15 % between runs, cannot do at 5 %.

    python bench/hub_micro.py [--subs 10000] [--pubs 200] [--repeat 7] [--src DIR ...]
    python bench/hub_micro.py --callgrind [--subs 2000] [--src DIR ...]

With several ``--src`` (a checkout's ``src`` folder each), every one runs in its own subprocess, in
turns, ``--repeat`` times; the table gives the best and the median ns per delivery of each. CPU time
on this machine varies by ±30 % between identical runs; ``--callgrind`` counts instructions instead
(valgrind; the same count every run): the difference between 30 and 10 publications, per delivery.
Works against the code before and after the core reshape (both have ``Hub.add/go_live/deliver``,
``WsConnection``, ``Flusher`` and ``Node``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


class _Transport:
    """What a connection needs of its transport: writes go nowhere, the buffer is always empty."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _measure(subs: int, pubs: int) -> float:
    from tidings.backends.memory import MemoryBroker
    from tidings.config import Namespace, Settings
    from tidings.node import Node
    from tidings.protocol import Publication
    from tidings.transports.flush import Flusher
    from tidings.transports.websocket import WsConnection

    settings = Settings(broker="memory://")
    settings.namespaces = {"bench": Namespace("bench", publish=True)}
    node = Node(settings, MemoryBroker())
    flusher = Flusher()
    conns = [WsConnection(node, _Transport(), "127.0.0.1", flusher, False) for _ in range(subs)]  # type: ignore[arg-type]
    for c in conns:
        node.hub.add("bench:c0", c)
        node.hub.go_live("bench:c0", c, 0)
    data = {"text": "x" * 100, "n": 1}
    batch = [Publication("bench:c0", i, "e", f"id-{i}", 0, data, None) for i in range(1, pubs + 1)]
    loop = asyncio.get_running_loop()
    start = time.process_time_ns()
    for pub in batch:
        node.hub.deliver(pub)
        flusher._run()  # the flush the loop would run next
    elapsed = time.process_time_ns() - start
    await asyncio.sleep(0)
    assert loop.is_running()
    # Every connection got every publication's frame: the same bytes in both checkouts.
    written = {c.transport.written for c in conns}  # type: ignore[attr-defined]
    assert len(written) == 1 and written.pop() > pubs * len(orjson_dumps(data)), written
    return elapsed / (subs * pubs)


def orjson_dumps(value: Any) -> bytes:
    import orjson

    return orjson.dumps(value)


def _child(subs: int, pubs: int) -> None:
    import gc

    gc.collect()
    gc.freeze()
    print(json.dumps({"ns": asyncio.run(_measure(subs, pubs))}))


def _instructions(src: str, subs: int, pubs: int) -> int:
    """Instructions of one child run under callgrind (its summary line ``Collected : N``)."""
    env = {**os.environ, "PYTHONPATH": src}
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__]
    out = subprocess.run(
        [*cmd, "--child", "--subs", str(subs), "--pubs", str(pubs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    )
    for line in out.stderr.splitlines():
        if "Collected :" in line:
            return int(line.split(":")[-1].strip())
    raise RuntimeError(out.stderr[-2000:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subs", type=int, default=10_000)
    p.add_argument("--pubs", type=int, default=200)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--src", action="append", default=[], help="a checkout's src folder (repeat)")
    p.add_argument("--callgrind", action="store_true", help="count instructions under valgrind instead")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child(a.subs, a.pubs)
        return
    srcs = a.src or [str(REPO / "src")]
    if a.callgrind:
        print(f"| src | instructions per delivery ({a.subs} subscribers, 30 - 10 publications) |")
        print("| --- | --- |")
        for src in srcs:
            counts = [_instructions(src, a.subs, n) for n in (10, 30)]
            print(f"| {src} | {(counts[1] - counts[0]) / (a.subs * 20):.0f} |")
        return
    runs: dict[str, list[float]] = {s: [] for s in srcs}
    for _ in range(a.repeat):
        for src in srcs:
            env = {**os.environ, "PYTHONPATH": src}
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--subs", str(a.subs), "--pubs", str(a.pubs)],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=True,
            )
            runs[src].append(json.loads(out.stdout.strip().splitlines()[-1])["ns"])
    print(f"| src | best ns/delivery | median | runs ({a.subs} subscribers x {a.pubs} publications) |")
    print("| --- | --- | --- | --- |")
    for src, ns in runs.items():
        print(
            f"| {src} | {min(ns):.0f} | {statistics.median(ns):.0f} | {', '.join(f'{x:.0f}' for x in ns)} |"
        )


if __name__ == "__main__":
    main()
