"""``tidings serve --workers N``: the refusals, ``auto``, the supervisor's mechanics (with a stand-in worker,
tests/fake_worker.py) and real workers on one port sharing a real Redis.

Everything runs as real processes; every wait polls against a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tidings.backends import display_url, is_shared_url
from tidings.client import Client, HTTPClient
from tidings.config import ConfigError, cpu_count, load_settings, parse_workers
from tidings.protocol import Publication
from tidings.workers import Supervisor, reserve_port, restart_delay

from .serve_process import Deployment, wait_for

PY = sys.executable
FAKE = str(Path(__file__).with_name("fake_worker.py"))
REFUSAL = (
    "tidings: --workers {n} needs a shared broker (redis://...); "
    "memory:// and sqlite:// are one process only\n"
)


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by whoever inherited it counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def serve(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "tidings", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("broker", ["memory://", "sqlite:///{tmp}/x.db", ""])
def test_more_than_one_worker_needs_a_shared_broker(tmp_path: Path, broker: str) -> None:
    data = tmp_path / "data"
    args = ["--workers", "2", "--port", "0", "--data-dir", str(data)]
    if broker:
        args += ["--broker", broker.format(tmp=tmp_path)]
    r = serve(*args)
    assert (r.returncode, r.stderr, r.stdout) == (2, REFUSAL.format(n=2), "")
    assert not data.exists()  # refused before anything was created
    assert not (tmp_path / "x.db").exists()


def test_workers_from_env_and_config_file_are_refused_alike(tmp_path: Path) -> None:
    r = serve("--broker", "memory://", "--port", "0", env={"TIDINGS_WORKERS": "3"})
    assert (r.returncode, r.stderr) == (2, REFUSAL.format(n=3))
    cfg = tmp_path / "t.toml"
    cfg.write_text('workers = 4\nbroker = "memory://"\n')
    r = serve("--config", str(cfg), "--port", "0")
    assert (r.returncode, r.stderr) == (2, REFUSAL.format(n=4))


def test_workers_refusals_are_one_line(tmp_path: Path) -> None:
    r = serve("--workers", "0", "--broker", "memory://")
    assert (r.returncode, r.stderr) == (
        2,
        "tidings: configuration error: workers must be at least 1 (or 'auto')\n",
    )
    r = serve("--workers", "two", "--broker", "memory://")
    assert r.returncode == 2 and r.stderr.startswith("tidings: configuration error: workers: 'two'")
    r = serve("--workers", "2", "--broker", "nope://x")
    assert r.returncode == 2 and r.stderr.startswith("tidings: configuration error: unknown broker scheme")
    # A malformed shared URL is found by the supervisor itself: one line, before any worker starts.
    r = serve("--workers", "2", "--broker", "redis://127.0.0.1:port/0", "--data-dir", str(tmp_path / "d"))
    assert (r.returncode, r.stderr) == (
        2,
        "tidings: configuration error: a redis URL's port must be a number: redis://host:6379/0\n",
    )
    assert not (tmp_path / "d").exists()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    r = serve("--workers", "2", "--fd", str(sock.fileno()), "--broker", "redis://127.0.0.1:1")
    sock.close()
    assert (r.returncode, r.stderr) == (2, "tidings: --fd is one process only; leave out --workers\n")


def test_workers_auto_and_numbers(tmp_path: Path) -> None:
    n = len(os.sched_getaffinity(0))
    assert cpu_count() == n
    assert load_settings({"workers": "auto"}, env={}).workers == n
    assert load_settings({}, env={"TIDINGS_WORKERS": "AUTO"}).workers == n
    assert load_settings({}, env={"TIDINGS_WORKERS": "3"}).workers == 3
    assert load_settings({"workers": "2"}, env={"TIDINGS_WORKERS": "auto"}).workers == 2  # CLI over env
    assert load_settings({}, env={}).workers == 1
    cfg = tmp_path / "t.toml"
    cfg.write_text('workers = "auto"\n')
    assert load_settings({}, env={}, config_file=cfg).workers == n
    cfg.write_text("workers = 6\n")
    assert load_settings({}, env={}, config_file=cfg).workers == 6
    for bad in (0, -1, "x", 1.5, True, "", None):
        with pytest.raises(ConfigError):
            parse_workers(bad)
    assert parse_workers(2.0) == 2 and parse_workers(" auto ") == n


def test_auto_on_the_cli_is_the_cpu_count(tmp_path: Path) -> None:
    n = cpu_count()
    if n == 1:
        pytest.skip("one CPU: --workers auto is one process, nothing to refuse")
    r = serve("--workers", "auto", "--broker", "memory://", "--port", "0")
    assert (r.returncode, r.stderr) == (2, REFUSAL.format(n=n))


def test_is_shared_url() -> None:
    for url in (
        "redis://h:6379/0",
        "REDIS://h",
        "rediss://u:p@h:6380",
        "redis+cluster://a:1,b:2",
        "redis+sentinel://a:1/m",
    ):
        assert is_shared_url(url), url
    for url in ("memory://", "sqlite:///x.db", "sqlite:////abs/x.db", "", "redis", "http://h", "nope://"):
        assert not is_shared_url(url), url


def test_display_url_hides_passwords() -> None:
    assert display_url("redis://user:s3cret@h:6379/0") == "redis://user:***@h:6379/0"
    assert display_url("rediss://:s3cret@h") == "rediss://:***@h"
    assert (
        display_url("redis+sentinel://a:1,b:2/m?password=s3cret&db=1")
        == "redis+sentinel://a:1,b:2/m?password=***&db=1"
    )
    assert display_url("redis://h:6379/0") == "redis://h:6379/0"
    assert display_url("sqlite:////var/lib/x.db") == "sqlite:////var/lib/x.db"


def test_restart_delays_grow_and_are_capped() -> None:
    assert [restart_delay(k) for k in range(1, 8)] == [0, 1, 2, 4, 8, 10, 10]


def test_reserved_port_is_exclusive_but_shared_with_reuseport_listeners() -> None:
    held, port = reserve_port("127.0.0.1", 0)
    try:
        assert port > 0
        # Nothing listens yet: a connection is refused (the reservation never accepts).
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        # A worker's socket (SO_REUSEADDR + SO_REUSEPORT, as asyncio binds with reuse_port) joins it...
        worker = socket.socket()
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        worker.bind(("127.0.0.1", port))
        worker.listen()
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        worker.close()
        # ...but another deployment's exclusive check fails.
        with pytest.raises(OSError, match="address already in use"):
            reserve_port("127.0.0.1", port)
    finally:
        for s in held:
            s.close()
    held, _ = reserve_port("127.0.0.1", port)  # free again once released
    for s in held:
        s.close()


def test_busy_port_is_one_line(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        r = serve(
            "--workers",
            "2",
            "--port",
            str(port),
            "--broker",
            "redis://127.0.0.1:1",
            "--data-dir",
            str(tmp_path),
        )
    finally:
        busy.close()
    assert (r.returncode, r.stderr) == (
        1,
        f"tidings: cannot start: cannot listen on 127.0.0.1:{port}: address already in use\n",
    )


# ---------------------------------------------------------------------------------------------- supervisor


@dataclass
class Fake:
    """A Supervisor running tests/fake_worker.py workers in this process (its loop in this thread)."""

    tmp: Path
    modes: str
    count: int = 2
    kw: dict[str, float] = field(default_factory=dict)
    sup: Supervisor = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.tmp / "starts"
        env = {
            **os.environ,
            "FAKE_WORKERS": self.modes,
            "FAKE_LOG": str(self.log),
            "FAKE_MARK": str(self.tmp / "mark"),
            "FAKE_CRASH_AFTER": "1.0",
            "FAKE_BROKER_DOWN": str(self.tmp / "broker-down"),
        }
        self.sup = Supervisor(self.count, command=[PY, FAKE], env=env, **self.kw)  # type: ignore[arg-type]

    def starts(self) -> list[tuple[int, int]]:
        if not self.log.exists():
            return []
        return [(int(a), int(b)) for a, b in (line.split() for line in self.log.read_text().splitlines())]

    def stop_when(self, cond: Callable[[], object], timeout: float = 30) -> None:
        """Ask the supervisor to stop (from a thread) once ``cond()`` holds."""

        def watch() -> None:
            with contextlib.suppress(TimeoutError):
                wait_for(cond, timeout, "condition")
            self.sup.stop()

        threading.Thread(target=watch, daemon=True).start()


def test_supervisor_start_failure_is_reported_once(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    fake = Fake(tmp_path, "1=fail", count=3)
    assert fake.sup.run() == 2  # the worker's own exit code
    assert [i for i, _ in fake.starts()] == [1]  # workers 2 and 3 never started
    assert capfd.readouterr().err.count("tidings: fake start-up error in worker 1") == 1


def test_supervisor_start_failure_of_a_later_worker_stops_the_others(tmp_path: Path) -> None:
    fake = Fake(tmp_path, "3=fail-after-peers", count=3)
    assert fake.sup.run() == 2
    assert sorted(i for i, _ in fake.starts()) == [1, 2, 3]
    assert all(gone(pid) for _, pid in fake.starts())


def test_supervisor_without_a_worker_binary_fails_cleanly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sup = Supervisor(2, command=[str(tmp_path / "no-such-python")])
    assert sup.run() == 1
    assert "cannot start worker 1" in caplog.text and not sup.workers


def test_supervisor_restarts_a_worker_that_died(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "tidings.supervisor")
    fake = Fake(tmp_path, "2=crash-once")
    back = lambda: "worker 2 is back" in caplog.text  # noqa: E731
    fake.stop_when(back)
    ready: list[list[int]] = []
    assert fake.sup.run(ready.append) == 0
    assert back()
    starts = fake.starts()
    assert [i for i, _ in starts] == [1, 2, 2]
    assert ready == [[starts[0][1], starts[1][1]]]
    assert f"worker 2 (pid {starts[1][1]}) exited with code 3; starting it again" in caplog.text
    assert f"worker 2 is back (pid {starts[2][1]})" in caplog.text
    assert all(gone(pid) for _, pid in starts)
    assert "all workers stopped" in caplog.text


def test_supervisor_gives_up_on_a_crash_loop(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fake = Fake(tmp_path, "2=crash", kw={"restart_limit": 3})
    t0 = time.monotonic()
    assert fake.sup.run() == 1
    assert time.monotonic() - t0 < 30
    starts = fake.starts()
    assert [i for i, _ in starts] == [1, 2, 2, 2]  # started, then again at once, then after 1 s: 3 exits
    assert "3 exits within 60 s, giving up" in caplog.text
    assert "starting it again in 1 s" in caplog.text
    assert all(gone(pid) for _, pid in starts)  # worker 1 was stopped too


@pytest.mark.timeout(60)
def test_supervisor_waits_for_the_broker_instead_of_giving_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that dies while Redis is down cannot start again (exit EXIT_BROKER_UNAVAILABLE): that is
    not a crash loop — the supervisor keeps starting it with backoff, past restart_limit, until it is back."""
    caplog.set_level(logging.INFO, "tidings.supervisor")
    down = tmp_path / "broker-down"
    down.touch()
    fake = Fake(tmp_path, "2=broker-down", kw={"restart_limit": 2})
    waits = lambda: caplog.text.count("worker 2 (pid")  # noqa: E731

    def broker_back() -> None:
        wait_for(lambda: caplog.text.count("cannot reach its broker") >= 3, 30, "3 starts without a broker")
        down.unlink()

    threading.Thread(target=broker_back, daemon=True).start()
    fake.stop_when(lambda: "worker 2 is back" in caplog.text, timeout=45)
    assert fake.sup.run() == 0
    assert "giving up" not in caplog.text and "worker 2 is back" in caplog.text
    assert "starting it again in 1 s (attempt 1)" in caplog.text and "in 4 s (attempt 3)" in caplog.text
    assert waits() >= 4
    assert all(gone(pid) for _, pid in fake.starts())


def test_supervisor_kills_a_worker_that_does_not_drain(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = Fake(tmp_path, "2=stubborn", kw={"drain_timeout": 1.0})
    fake.stop_when(lambda: len(fake.starts()) == 2 and all(w.ready for w in list(fake.sup.workers.values())))
    assert fake.sup.run() == 1
    stubborn = fake.starts()[1][1]
    assert f"worker 2 (pid {stubborn}) still running after 1 s: killing it" in caplog.text
    assert all(gone(pid) for _, pid in fake.starts())


_DRIVER = """
import logging, sys
from tidings.workers import Supervisor
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
sup = Supervisor(2, command=[sys.executable, sys.argv[1]])
sys.exit(sup.run(lambda pids: print("ready", *pids, flush=True)))
"""


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Callable[[], tuple[subprocess.Popen[str], list[int]]]]:
    """A supervisor of two fake workers in its own process (to be signalled or killed)."""
    made: list[subprocess.Popen[str]] = []

    def start() -> tuple[subprocess.Popen[str], list[int]]:
        env = {**os.environ, "FAKE_LOG": str(tmp_path / "starts")}
        proc = subprocess.Popen([PY, "-c", _DRIVER, FAKE], stdout=subprocess.PIPE, text=True, env=env)
        made.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the ready line (or "" if it died)
        assert line.startswith("ready "), line
        return proc, [int(p) for p in line.split()[1:]]

    yield start
    for proc in made:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_supervisor_forwards_the_stop_signal(
    driver: Callable[..., tuple[subprocess.Popen[str], list[int]]], sig: int
) -> None:
    proc, pids = driver()
    proc.send_signal(sig)
    assert proc.wait(30) == 0
    assert all(gone(p) for p in pids)


def test_workers_exit_when_the_supervisor_is_killed(
    driver: Callable[..., tuple[subprocess.Popen[str], list[int]]],
) -> None:
    proc, pids = driver()
    proc.kill()
    proc.wait(10)
    wait_for(lambda: all(gone(p) for p in pids), 15, "orphaned workers still running")


# ---------------------------------------------------------------------------------------------- with Redis


@pytest.fixture
def deployment(tmp_path: Path, redis_url: str) -> Iterator[Deployment]:
    d = Deployment(tmp_path, redis_url)
    yield d
    d.stop()


async def health(url: str) -> dict[str, int]:
    """/healthz on a fresh connection: which worker took it, and its WebSocket count."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s, s.get(f"{url}/healthz") as r:
        body = await r.json()
    return {"pid": int(body["pid"]), "connections": int(body["connections"])}


async def per_worker(url: str, pids: set[int], timeout: float = 10.0) -> dict[int, int]:
    """WebSocket connections per worker pid: ask /healthz on new connections until every pid answered."""
    seen: dict[int, int] = {}
    async with asyncio.timeout(timeout):
        while set(seen) != pids:
            h = await health(url)
            seen[h["pid"]] = h["connections"]
    return seen


async def collect(sub: object, into: list[Publication]) -> None:
    async for pub in sub:  # type: ignore[attr-defined]
        into.append(pub)


async def test_two_workers_share_a_port_restart_and_drain(deployment: Deployment) -> None:
    d = deployment
    await asyncio.to_thread(d.start)
    assert len(d.pids) == 2 and d.text().count("listening on") == 3  # two workers and the supervisor
    for i, pid in enumerate(d.pids, 1):
        assert f"worker {i}/2 (pid {pid}) listening on http://127.0.0.1:{d.port}" in d.text()

    # Plain HTTP connections land on both workers.
    assert set(await per_worker(d.http, set(d.pids))) == set(d.pids)

    # WebSocket clients land on both: connect until each worker has some (the kernel hashes each one).
    channel = "chat:workers"
    clients: list[Client] = []
    got: dict[int, list[Publication]] = {}
    tasks: list[asyncio.Task[None]] = []
    drops: list[object] = []
    try:
        async with asyncio.timeout(30):
            while True:
                # A backoff of at least 0.5 s: a client cut off stays away long enough to miss publications.
                c = Client(d.ws_url, min_backoff=0.5, max_backoff=1.0)
                c.on("disconnect", lambda event: drops.append(event))
                await c.connect(timeout=10)
                sub = await c.subscribe(channel)
                got[len(clients)] = []
                tasks.append(asyncio.create_task(collect(sub, got[len(clients)])))
                clients.append(c)
                counts = await per_worker(d.http, set(d.pids))
                if len(clients) >= 6 and all(counts.values()):
                    break
        assert sum(counts.values()) == len(clients)

        async with HTTPClient(d.http, d.api_key()) as api:
            # A publish through either worker reaches the subscribers of both.
            for i in range(5):
                await api.publish(channel, {"n": i})

            async def everyone_has(n: int) -> None:
                async with asyncio.timeout(20):
                    while any(len(g) < n for g in got.values()):
                        await asyncio.sleep(0.02)

            await everyone_has(5)

            # kill -9 one worker: the supervisor starts it again; its clients reconnect (to either worker)
            # and recover what was published meanwhile, in order, without duplicates.
            victim = d.pids[0]
            on_victim = counts[victim]
            os.kill(victim, signal.SIGKILL)
            async with asyncio.timeout(10):
                while len(drops) < on_victim:
                    await asyncio.sleep(0.01)
            for i in range(5, 15):
                await api.publish(channel, {"n": i})  # only the surviving worker listens now
            away = [c for c in clients if not c.connected]
            assert away, "the victim's clients were back before the publications: nothing was missed"
            await asyncio.to_thread(
                wait_for, lambda: "worker 1 is back" in d.text(), 30, "worker 1 was not restarted"
            )
            for i in range(15, 25):
                await api.publish(channel, {"n": i})
            await everyone_has(25)
            assert all(c.connected for c in clients)
        assert f"worker 1 (pid {victim}) was killed by SIGKILL; starting it again" in d.text()
        m = re.search(r"worker 1 is back \(pid (\d+)\)", d.text())
        assert m is not None
        new_pid = int(m[1])
        assert new_pid != victim and gone(victim)
        assert set(await per_worker(d.http, {d.pids[1], new_pid})) == {d.pids[1], new_pid}
        for g in got.values():
            assert [p.data["n"] for p in g] == list(range(25))
            assert [p.offset for p in g] == list(range(1, 26))
        assert len(drops) == on_victim  # exactly the victim's clients were cut off, and each came back once
        assert sum(c.connects - 1 for c in clients) == on_victim
        assert all(c.subscriptions[channel].gaps == 0 for c in clients)
    finally:
        for c in clients:
            await c.close()
        for t in tasks:
            t.cancel()

    # SIGTERM drains every worker, and the supervisor exits 0.
    assert await asyncio.to_thread(d.stop) == 0
    assert gone(d.pids[1]) and gone(new_pid)
    assert "all workers stopped" in d.text() and "Traceback" not in d.text()


def test_a_worker_that_cannot_start_stops_the_deployment(tmp_path: Path) -> None:
    """Redis unreachable at start-up: worker 1 says so once, and the supervisor exits with its code."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = serve(
        "--workers", "2", "--port", "0", "--broker", f"redis://127.0.0.1:{port}", "--data-dir", str(tmp_path)
    )
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("tidings: ")]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "worker 2" not in r.stderr


async def test_workers_exit_when_a_real_supervisor_is_killed(deployment: Deployment) -> None:
    await asyncio.to_thread(deployment.start)
    assert deployment.proc is not None
    deployment.proc.kill()
    deployment.proc.wait(10)
    await asyncio.to_thread(wait_for, lambda: all(gone(p) for p in deployment.pids), 20, "orphaned workers")


async def test_a_form_from_one_worker_posts_to_another(deployment: Deployment) -> None:
    """What the page signs (its XSRF token) is derived from the API key the supervisor created once, so
    a page served by one worker can be posted to another."""
    d = deployment
    await asyncio.to_thread(d.start)
    assert d.text().count("API key created in") == 1  # by the supervisor, before any worker started
    pinned: dict[int, aiohttp.ClientSession] = {}  # one kept-alive connection per session: one worker
    try:
        async with asyncio.timeout(20):
            while len(pinned) < 2:
                s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
                async with s.get(f"{d.http}/healthz") as r:
                    pid = int((await r.json())["pid"])
                if pid in pinned:
                    await s.close()
                else:
                    pinned[pid] = s
        page, post = (pinned[p] for p in d.pids)
        async with page.get(f"{d.http}/chat/lobby") as r:
            assert r.status == 200
            text = await r.text()
            cookie = r.cookies["_xsrf"].value
        m = re.search(r'name="_xsrf" value="([^"]+)"', text)
        assert m is not None and m[1] == cookie
        async with post.post(
            f"{d.http}/chat/lobby/messages",
            data={"_xsrf": m[1], "body": "across workers", "nick": "w"},
            headers={"Cookie": f"_xsrf={cookie}"},
            allow_redirects=False,
        ) as r:
            assert r.status in (302, 303), await r.text()
        for pid, s in pinned.items():  # each request stayed on its worker
            async with s.get(f"{d.http}/healthz") as r:
                assert int((await r.json())["pid"]) == pid
    finally:
        for s in pinned.values():
            await s.close()
    async with HTTPClient(d.http, d.api_key()) as api:
        pubs, _, _ = await api.history("chat:lobby")
    assert [p.data["body"] for p in pubs] == ["across workers"]


@pytest.mark.timeout(90)
async def test_a_worker_killed_while_redis_is_down_comes_back_with_redis(
    tmp_path: Path, make_redis_server: Callable[..., Any]
) -> None:
    """kill -9 of a worker while Redis is down: its restart cannot reach Redis (exit 75), which the
    supervisor does not count as a crash loop; once Redis is back the worker is too, and both serve."""
    rs = make_redis_server()
    d = Deployment(tmp_path, rs.url)
    try:
        await asyncio.to_thread(d.start)
        rs.stop()
        os.kill(d.pids[1], signal.SIGKILL)
        await asyncio.to_thread(
            wait_for,
            # 4 failed starts + the kill = 5 exits, restart_limit: counted as crashes, this would give up
            lambda: "cannot reach its broker; starting it again in 8 s (attempt 4)" in d.text(),
            30,
            "the restarted worker did not fail 4 times with its broker unreachable",
        )
        assert "tidings: cannot start: storage: cannot reach Redis" in d.text()
        rs.start()
        await asyncio.to_thread(wait_for, lambda: "worker 2 is back" in d.text(), 40, "worker 2 not back")
        assert d.running and "giving up" not in d.text()
        back = {int(m) for m in re.findall(r"worker 2 is back \(pid (\d+)\)", d.text())}
        assert len(await per_worker(d.http, {d.pids[0], *back})) == 2
    finally:
        d.stop()
