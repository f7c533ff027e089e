"""The kernel's floor: CPU time of one small write() to a loopback TCP socket, with no server at all.

    taskset -c 0 python bench/write_floor.py            # the Linux default for lo
    python bench/write_floor.py --steer-rx 1            # receive path on CPU 1 (RPS on lo; root)

A server that sends each message to each subscriber in its own write() cannot spend less CPU per delivery
than this; only putting several messages into one write (coalescing) gets below it.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # make the `bench` package importable
from bench.harness import steered_rx
from bench.stats import us_per_op


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sockets", type=int, default=5000)
    ap.add_argument("--size", type=int, default=120, help="bytes per write (a ~100-byte publication frame)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cpu", type=int, default=0, help="CPU to run the writes on")
    ap.add_argument("--steer-rx", type=int, default=None, metavar="CPU", help="RPS on lo to this CPU")
    a = ap.parse_args()
    os.sched_setaffinity(0, {a.cpu})
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(a.sockets)
    readers, writers = [], []
    for _ in range(a.sockets):
        c = socket.create_connection(srv.getsockname())
        s, _ = srv.accept()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        readers.append(c)
        writers.append(s)
    data = b"x" * a.size
    fds = [w.fileno() for w in writers]
    best = float("inf")
    with steered_rx(a.steer_rx, a.steer_rx is not None):
        for _ in range(a.rounds):
            c0 = time.process_time()
            for fd in fds:
                os.write(fd, data)
            cpu = us_per_op(time.process_time() - c0, len(fds))
            best = min(best, cpu or 0.0)
            for r in readers:
                r.recv(65536)
    where = f"steered to CPU {a.steer_rx}" if a.steer_rx is not None else "on the writing CPU"
    print(f"{best:.2f} µs CPU per {a.size}-byte write to a loopback TCP socket (receive path {where})")
    for sock in (*readers, *writers, srv):
        sock.close()


if __name__ == "__main__":
    main()
