"""``tidings subscribe --state/--exec/--notify`` (docs/devices.md "Command line"): the real CLI as a
subprocess against a real server on a free loopback port with the SQLite broker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tidings.client import HTTPClient

from .conftest import API_KEY, Server, ServerFactory

pytestmark = pytest.mark.timeout(90)

SRC = str(Path(__file__).resolve().parent.parent / "src")


class Cli:
    """One ``tidings subscribe`` process: stdout lines collected, stderr text collected."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self.err = ""
        self._changed = asyncio.Event()
        self._readers = [
            asyncio.ensure_future(self._read_out()),
            asyncio.ensure_future(self._read_err()),
        ]

    async def _read_out(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.lines.append(orjson.loads(line))
            self._changed.set()

    async def _read_err(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.err += line.decode()
            self._changed.set()

    async def until(self, cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            while not cond():
                if self.proc.returncode is not None:
                    raise AssertionError(
                        f"CLI exited ({self.proc.returncode}) waiting for {what}: {self.err}"
                    )
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.5)

    async def stop(self, sig: int | None = signal.SIGTERM) -> int:
        """Send ``sig`` (None: wait for it to exit by itself); the exit code."""
        if sig is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), 15)
        for r in self._readers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(r, 5)
        return code


@pytest.fixture
async def cli(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[Cli] = []

    async def start(srv: Server, *args: str, env: dict[str, str] | None = None, ready: bool = True) -> Cli:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tidings",
            "subscribe",
            "--url",
            srv.http,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": SRC, **(env or {})},
            cwd=tmp_path,
        )
        c = Cli(proc)
        started.append(c)
        if ready:
            await c.until(lambda: "tidings: subscribed to" in c.err, "subscribed")
        return c

    yield start
    for c in started:  # SIGTERM first: the CLI kills the process groups of the commands still running
        if c.proc.returncode is None:
            c.proc.terminate()
            try:
                await asyncio.wait_for(c.proc.wait(), 10)
            except TimeoutError:
                c.proc.kill()
                await c.proc.wait()
        for r in c._readers:
            r.cancel()


async def sqlite_server(start_server: ServerFactory, tmp_path: Path) -> Server:
    return await start_server(broker=f"sqlite:///{tmp_path / 'history.db'}")


async def publish(srv: Server, channel: str, *texts: str) -> None:
    async with HTTPClient(srv.http, API_KEY) as api:
        for t in texts:
            await api.publish(channel, {"text": t})


def texts(cli: Cli) -> list[str]:
    return [line["data"]["text"] for line in cli.lines]


async def test_restart_prints_exactly_what_it_missed(
    start_server: ServerFactory, cli: Callable[..., Any], tmp_path: Path
) -> None:
    srv = await sqlite_server(start_server, tmp_path)
    state = tmp_path / "state.json"
    c = await cli(srv, "pub:news", "--state", str(state))
    assert stat.S_IMODE(state.stat().st_mode) == 0o600  # saved at subscribe: a restart recovers from there
    await publish(srv, "pub:news", "a1", "a2", "a3")
    await c.until(lambda: len(c.lines) == 3, "3 lines")
    assert texts(c) == ["a1", "a2", "a3"]
    await c.until(lambda: orjson.loads(state.read_bytes())["channels"]["pub:news"]["offset"] == 3, "saved")
    assert await c.stop() == 143
    await publish(srv, "pub:news", "b1", "b2", "b3", "b4")
    c2 = await cli(srv, "pub:news", "--state", str(state))
    await c2.until(lambda: len(c2.lines) >= 4, "4 lines")
    await publish(srv, "pub:news", "c1")  # a live one after the replay: nothing repeated in between
    await c2.until(lambda: len(c2.lines) >= 5, "5 lines")
    assert texts(c2) == ["b1", "b2", "b3", "b4", "c1"]
    assert [line["offset"] for line in c2.lines] == [4, 5, 6, 7, 8]
    assert "may have been missed" not in c2.err
    await c2.until(lambda: orjson.loads(state.read_bytes())["channels"]["pub:news"]["offset"] == 8, "saved")
    assert orjson.loads(state.read_bytes())["version"] == 1
    assert stat.S_IMODE(state.stat().st_mode) == 0o600


async def test_exec_runs_once_per_message_with_its_environment(
    start_server: ServerFactory, cli: Callable[..., Any], tmp_path: Path
) -> None:
    srv = await sqlite_server(start_server, tmp_path)
    out = tmp_path / "exec.log"
    cmd = (
        f'{{ printf "%s|%s|%s|%s|%s|" "$TIDINGS_CHANNEL" "$TIDINGS_OFFSET" "$TIDINGS_EPOCH" '
        f'"$TIDINGS_ID" "$TIDINGS_DATA"; cat; }} >> {out}'
    )
    c = await cli(srv, "pub:jobs", "--exec", cmd, "--state", str(tmp_path / "s.json"))
    await publish(srv, "pub:jobs", "x", "y", "z")
    await c.until(lambda: out.exists() and out.read_text().count("\n") == 3, "3 commands")
    await c.stop()
    rows = out.read_text().splitlines()
    assert len(rows) == 3  # once each, not again at stop
    for n, (row, line) in enumerate(zip(rows, c.lines, strict=True), start=1):
        ch, off, epoch, pid, data, stdin = row.split("|", 5)
        assert (ch, off, epoch, pid) == ("pub:jobs", str(n), line["epoch"], line["id"])
        assert orjson.loads(data) == line["data"] == {"text": "xyz"[n - 1]}
        assert orjson.loads(stdin) == line  # the message JSON on stdin, as printed


async def test_failing_exec_is_logged_and_not_fatal(
    start_server: ServerFactory, cli: Callable[..., Any], tmp_path: Path
) -> None:
    srv = await sqlite_server(start_server, tmp_path)
    state = tmp_path / "s.json"
    c = await cli(
        srv,
        "pub:f",
        "--exec",
        'case "$TIDINGS_OFFSET" in 1) exit 3;; 2) sleep 30;; esac',
        "--exec-timeout",
        "0.5",
        "--state",
        str(state),
    )
    await publish(srv, "pub:f", "1", "2", "3")
    await c.until(lambda: len(c.lines) == 3, "3 lines")
    await c.until(lambda: orjson.loads(state.read_bytes())["channels"]["pub:f"]["offset"] == 3, "saved")
    assert "pub:f offset 1: exited with 3" in c.err
    assert "pub:f offset 2: killed after 0.5s" in c.err
    assert c.proc.returncode is None


async def test_notify_without_notify_send(
    start_server: ServerFactory, cli: Callable[..., Any], tmp_path: Path
) -> None:
    srv = await sqlite_server(start_server, tmp_path)
    c = await cli(srv, "pub:g", "--notify", env={"PATH": str(tmp_path / "nothing")}, ready=False)
    assert await c.stop(None) == 2
    assert "--notify needs notify-send, which is not on PATH" in c.err


async def test_notify_send(start_server: ServerFactory, cli: Callable[..., Any], tmp_path: Path) -> None:
    srv = await sqlite_server(start_server, tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "notify.log"
    fake = bin_dir / "notify-send"
    # the real notify-send is a desktop program that cannot run here: this one records its arguments
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\t" "$a"; done >> {record}; echo >> {record}\n')
    fake.chmod(0o755)
    c = await cli(srv, "pub:n", "--notify", env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    await publish(srv, "pub:n", "hello <b>")
    async with HTTPClient(srv.http, API_KEY) as api:
        await api.publish("pub:n", [1, 2])
    await c.until(lambda: record.exists() and record.read_text().count("\n") == 2, "2 notifications")
    rows = [r.split("\t")[:-1] for r in record.read_text().splitlines()]
    assert rows == [
        ["--app-name=tidings", "--", "pub:n", "hello <b>"],
        ["--app-name=tidings", "--", "pub:n", "[1,2]"],
    ]


async def test_unrecoverable_position_says_so(
    start_server: ServerFactory, cli: Callable[..., Any], tmp_path: Path
) -> None:
    srv = await sqlite_server(start_server, tmp_path)
    state = tmp_path / "s.json"
    c = await cli(srv, "small:x", "--state", str(state))  # namespace "small" keeps 5 publications
    await publish(srv, "small:x", "old")
    await c.until(lambda: len(c.lines) == 1, "1 line")
    await c.stop()
    await publish(srv, "small:x", *[f"m{i}" for i in range(8)])
    c2 = await cli(srv, "small:x", "--state", str(state))
    await c2.until(lambda: "may have been missed" in c2.err, "the stderr line")
    assert "small:x: messages after offset 1 may have been missed" in c2.err
    assert c2.lines == []
    await c2.until(lambda: orjson.loads(state.read_bytes())["channels"]["small:x"]["offset"] == 9, "moved on")
    await publish(srv, "small:x", "new")
    await c2.until(lambda: len(c2.lines) == 1, "the next one")
    assert texts(c2) == ["new"]
    await c2.stop()
    # a stream that restarted (another epoch): also said, then from the current position
    saved = orjson.loads(state.read_bytes())
    saved["channels"]["small:x"]["epoch"] = "someotherepoch"
    state.write_bytes(orjson.dumps(saved))
    c3 = await cli(srv, "small:x", "--state", str(state))
    await c3.until(lambda: "may have been missed" in c3.err, "the epoch line")
    assert "new epoch" in c3.err


@pytest.mark.parametrize(
    "content", [b"{not json", b'{"version": 1, "channels": {"a": {"offset": "x", "epoch": "e"}}}', b"[]"]
)
async def test_corrupt_state_file_is_one_line(
    start_server: ServerFactory, cli: Callable[..., Any], tmp_path: Path, content: bytes
) -> None:
    srv = await sqlite_server(start_server, tmp_path)
    state = tmp_path / "s.json"
    state.write_bytes(content)
    c = await cli(srv, "pub:c", "--state", str(state), ready=False)
    assert await c.stop(None) == 2
    assert c.err.startswith("tidings: state file") and "corrupt" in c.err
    assert c.err.count("\n") == 1 and "Traceback" not in c.err


async def test_state_file_atomic_under_kill9(
    start_server: ServerFactory, cli: Callable[..., Any], tmp_path: Path
) -> None:
    """kill -9 mid-stream (with a slow --exec): the file is always valid JSON, never ahead of what was
    handled (the --exec log), and a restart carries on from it: every message handled, in order."""
    srv = await sqlite_server(start_server, tmp_path)
    state = tmp_path / "s.json"
    out = tmp_path / "handled.log"
    cmd = f'sleep 0.02; echo "$TIDINGS_OFFSET" >> {out}'
    total = 40
    seen_states: list[int] = []

    async def watch(stop: asyncio.Event) -> None:
        while not stop.is_set():
            if state.exists():
                saved = orjson.loads(state.read_bytes())  # never a torn file
                off = saved["channels"]["pub:k"]["offset"]
                done = out.read_text().split() if out.exists() else []
                assert off <= len(done), (off, done)  # never ahead of what was handled
                seen_states.append(off)
            await asyncio.sleep(0.005)

    c = await cli(srv, "pub:k", "--exec", cmd, "--state", str(state))
    stop = asyncio.Event()
    watcher = asyncio.ensure_future(watch(stop))
    await publish(srv, "pub:k", *[str(i) for i in range(total)])
    await c.until(lambda: len(c.lines) >= 10, "10 lines")
    await c.stop(signal.SIGKILL)
    handled_before = len(out.read_text().split())
    assert orjson.loads(state.read_bytes())["channels"]["pub:k"]["offset"] <= handled_before
    c2 = await cli(srv, "pub:k", "--exec", cmd, "--state", str(state))
    await c2.until(
        lambda: out.exists() and out.read_text().split()[-1:] == [str(total)], "all handled", timeout=30
    )
    stop.set()
    await watcher
    done = [int(x) for x in out.read_text().split()]
    # at-least-once: what was running at the kill may run again, nothing is skipped, order kept
    assert sorted(set(done)) == list(range(1, total + 1))
    assert done == sorted(done) or len(done) - len(set(done)) <= 1
    assert len(done) - len(set(done)) <= 1
    assert len(set(seen_states)) > 3  # the watcher saw the file move


async def test_exec_concurrency_saves_in_order(
    start_server: ServerFactory, cli: Callable[..., Any], tmp_path: Path
) -> None:
    """N > 1: commands overlap, but the saved position never passes an unfinished one."""
    srv = await sqlite_server(start_server, tmp_path)
    state = tmp_path / "s.json"
    gate = tmp_path / "gate"
    # offset 1 waits for the gate; 2..4 finish at once
    cmd = (
        f'if [ "$TIDINGS_OFFSET" = 1 ]; then while [ ! -e {gate} ]; do sleep 0.02; done; '
        f"else touch {tmp_path}/done.$TIDINGS_OFFSET; fi"
    )
    c = await cli(srv, "pub:p", "--exec", cmd, "--exec-concurrency", "4", "--state", str(state))
    try:
        await publish(srv, "pub:p", "1", "2", "3", "4")
        await c.until(lambda: all((tmp_path / f"done.{n}").exists() for n in (2, 3, 4)), "2..4 ran")
        await asyncio.sleep(0.3)  # 2..4 exit and are seen; the position must still wait for 1
        assert orjson.loads(state.read_bytes())["channels"]["pub:p"]["offset"] == 0
    finally:
        gate.touch()
    await c.until(lambda: orjson.loads(state.read_bytes())["channels"]["pub:p"]["offset"] == 4, "saved 4")


async def test_unwritable_state_file_is_one_line(
    start_server: ServerFactory, cli: Callable[..., Any], tmp_path: Path
) -> None:
    srv = await sqlite_server(start_server, tmp_path)
    c = await cli(srv, "pub:w", "--state", str(tmp_path / "no-such-dir" / "s.json"), ready=False)
    assert await c.stop(None) == 2
    assert c.err.startswith("tidings: state file") and "cannot write" in c.err and "Traceback" not in c.err
