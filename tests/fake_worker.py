"""A stand-in for a ``tidings serve`` worker, for the supervisor's own tests (tests/test_workers.py).

It speaks the supervisor's protocol (ready pipe, PR_SET_PDEATHSIG) and nothing else. What worker i does
comes from ``FAKE_WORKERS="1=ok,2=crash"``:

* ``ok``: ready, then waits for SIGTERM/SIGINT and exits 0.
* ``fail``: exits 2 before it is ready, with a one-line error (a start-up error).
* ``fail-after-peers``: the same, once every worker of the run has logged its start.
* ``crash``: ready, exits 3 after ``FAKE_CRASH_AFTER`` seconds (every time it is started).
* ``crash-once``: like ``crash`` the first time (marked by the file ``FAKE_MARK``), then ``ok``.
* ``stubborn``: ready, ignores SIGTERM and SIGINT (only SIGKILL ends it).
* ``broker-down``: ready the first time; after ``FAKE_CRASH_AFTER`` s it exits 3, and every later start
  exits with EXIT_BROKER_UNAVAILABLE before it is ready while the file ``FAKE_BROKER_DOWN`` exists
  (then ``ok``).

Each start appends ``<index> <pid>`` to ``FAKE_LOG``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from tidings.workers import EXIT_BROKER_UNAVAILABLE, notify_ready, tie_to_supervisor, worker_info


def main() -> int:
    info = worker_info(os.environ)
    assert info is not None, "run by a Supervisor"
    tie_to_supervisor(info)
    modes = dict(item.split("=", 1) for item in os.environ.get("FAKE_WORKERS", "").split(",") if item)
    mode = modes.get(str(info.index), "ok")
    with open(os.environ["FAKE_LOG"], "a") as log:
        log.write(f"{info.index} {os.getpid()}\n")
    if mode == "crash-once":
        mark = Path(os.environ["FAKE_MARK"])
        mode = "ok" if mark.exists() else "crash"
        mark.touch()
    if mode == "broker-down":
        mark = Path(os.environ["FAKE_MARK"])
        if not mark.exists():
            mark.touch()
            mode = "crash"
        elif Path(os.environ["FAKE_BROKER_DOWN"]).exists():
            print(f"tidings: cannot start: storage: fake broker down (worker {info.index})", file=sys.stderr)
            return EXIT_BROKER_UNAVAILABLE
        else:
            mode = "ok"
    if mode == "fail-after-peers":  # fails once every worker started (logged): none is stopped unstarted
        deadline = time.monotonic() + 10
        log_path = Path(os.environ["FAKE_LOG"])
        while len(log_path.read_text().splitlines()) < info.count and time.monotonic() < deadline:
            time.sleep(0.01)
        mode = "fail"
    if mode == "fail":
        print(f"tidings: fake start-up error in worker {info.index}", file=sys.stderr)
        return 2
    stopping = []
    handler = signal.SIG_IGN if mode == "stubborn" else (lambda s, f: stopping.append(s))
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    notify_ready(info)
    if mode == "crash":
        time.sleep(float(os.environ.get("FAKE_CRASH_AFTER", "1.0")))
        return 3
    while not stopping:
        signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
