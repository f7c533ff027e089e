"""The HTTP edge: tokens and keys, start-up storage errors, API key names, namespace case.

Real servers on free loopback ports (in process or ``tidings serve`` subprocesses); every wait bounded.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tidings.auth import API_KEY_FILE, ensure_api_key, read_api_key
from tidings.config import Namespace, load_settings
from tidings.protocol import CloseCode, ErrorCode

from .conftest import ProbeFactory, Proc, ServerFactory, bound_socket

SECRET = "edge-test-secret-0123456789abcdefghijklmnop"
KEY = "edge-api-key-0123456789abcdef"


def _claims(sub: str = "alice", **extra: Any) -> dict[str, Any]:
    return {"sub": sub, "exp": int(time.time() + 300), **extra}


def _run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidings", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------------------------------------- tokens


@pytest.mark.parametrize("exp", [10**20, 10**400, 253402300800])
async def test_far_future_exp_is_refused_not_a_crash(
    start_server: ServerFactory, probe: ProbeFactory, exp: int
) -> None:
    srv = await start_server(token_secret=SECRET, api_failures_per_minute=0)
    p = await probe(srv)
    reply = await p.request("connect", token=jwt.encode({"sub": "alice", "exp": exp}, SECRET))
    assert reply["ok"] is False and reply["error"]["code"] == ErrorCode.UNAUTHORIZED.value, reply
    assert "exp" in reply["error"]["message"]
    assert await p.wait_closed() == CloseCode.UNAUTHORIZED
    # The latest accepted exp still works, and its reply carries it.
    q = await probe(srv)
    ok = await q.ok("connect", token=jwt.encode({"sub": "bob", "exp": 253402300799}, SECRET))
    assert ok["expires"] == 253402300799


async def test_jwks_without_kid_tries_every_key_of_the_algorithm(
    start_server: ServerFactory, probe: ProbeFactory, tmp_path: Path
) -> None:
    ek = ec.generate_private_key(ec.SECP256R1())
    old, new = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    jwks = {
        "keys": [
            {**ECAlgorithm.to_jwk(ek.public_key(), as_dict=True), "kid": "ec"},
            {**RSAAlgorithm.to_jwk(old.public_key(), as_dict=True), "kid": "old"},
            {**RSAAlgorithm.to_jwk(new.public_key(), as_dict=True), "kid": "new", "use": "sig"},
        ]
    }
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    srv = await start_server(token_jwks=str(path), api_failures_per_minute=0)
    for key, alg, user in ((old, "RS256", "a"), (new, "RS256", "b"), (ek, "ES256", "c")):
        p = await probe(srv)
        assert (await p.ok("connect", token=jwt.encode(_claims(user), key, algorithm=alg)))["user"] == user
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    p = await probe(srv)
    reply = await p.request("connect", token=jwt.encode(_claims(), stranger, algorithm="RS256"))
    assert reply["error"]["code"] == ErrorCode.UNAUTHORIZED.value
    assert await p.wait_closed() == CloseCode.UNAUTHORIZED


# ---------------------------------------------------------------------------------------------- namespaces


async def test_namespace_differing_only_by_case_is_unknown(
    start_server: ServerFactory, probe: ProbeFactory, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(
        namespaces={"user": Namespace("user", anonymous=False, personal=True, presence=False)}
    )
    p = await probe(srv)
    for channel in ("USER:43", "User:43", "CHAT:lobby"):
        reply = await p.request("subscribe", channel=channel)
        assert reply["error"]["code"] == ErrorCode.UNKNOWN_NAMESPACE.value, (channel, reply)
    # A namespace that is configured under no spelling still falls to the default namespace.
    assert (await p.request("subscribe", channel="other:43"))["ok"] is True
    async with session.post(
        f"{srv.http}/api/publish",
        json={"channel": "USER:43", "data": 1},
        headers={"Authorization": f"Bearer {srv.settings.api_keys[0].key}"},
    ) as r:
        assert (await r.json())["error"]["code"] == "unknown_namespace", r.status


# ---------------------------------------------------------------------------------------------- keys on disk


def _start_once(data_dir: Path, preexec: Any = None, timeout: float = 20) -> tuple[int | None, str]:
    """``tidings serve`` on a pre-bound socket; returns (exit code or None if it started, its output)."""
    sock = bound_socket()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidings", "serve", "--fd", str(sock.fileno()), "--data-dir", str(data_dir)],
        pass_fds=[sock.fileno()],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=preexec,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    sock.close()
    assert proc.stdout is not None
    out = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
            if "listening on" in line:
                proc.send_signal(signal.SIGTERM)
                rest, _ = proc.communicate(timeout=15)
                return None, "".join(out) + rest
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        return proc.returncode, "".join(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _no_file_growth() -> None:
    """In the child: every write that grows a file fails with EFBIG, as on a full disk (ENOSPC)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def test_first_start_on_a_full_disk_leaves_no_broken_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    code, out = _start_once(data, preexec=_no_file_growth)
    assert code == 1, out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    assert out.startswith("tidings: cannot start: cannot write") and API_KEY_FILE in out, out
    assert not (data / API_KEY_FILE).exists()
    assert not [p for p in data.iterdir() if p.name.endswith(".tmp")]
    # The next start, with room on the disk, works and creates the key.
    code, out = _start_once(data)
    assert code is None, out
    assert (data / API_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert read_api_key(data)


def test_an_empty_key_file_counts_as_absent(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / API_KEY_FILE).write_bytes(b"")  # what the old code left after a failed first start
    key, path, created = ensure_api_key(data)
    assert created and key.startswith("tk_") and path.read_text() == key + "\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert ensure_api_key(data) == (key, path, False)


@pytest.mark.parametrize("where", ["file-as-dir", "db-is-a-dir"])
def test_start_up_storage_errors_are_one_line(tmp_path: Path, where: str) -> None:
    if where == "file-as-dir":
        blocker = tmp_path / "blocker"
        blocker.write_text("a file where the data dir's parent should be")
        data = blocker / "data"
    else:
        data = tmp_path / "data"
        (data / "tidings.db").mkdir(parents=True)
        (data / API_KEY_FILE).write_text("tk_" + "x" * 40 + "\n")
    code, out = _start_once(data)
    assert code == 1, out
    assert "Traceback" not in out, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tidings: cannot start:"), out
    assert str(data.name) in lines[0] and "data_dir" in lines[0], out


# ---------------------------------------------------------------------------------------------- env names


def test_api_key_env_names_work_on_both_sides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert [k.key for k in load_settings({}, env={"TIDINGS_API_KEY": KEY}).api_keys] == [KEY]
    both = load_settings({}, env={"TIDINGS_API_KEY": "other-key-0123456789", "TIDINGS_API_KEYS": KEY})
    assert [k.key for k in both.api_keys] == [KEY]  # the list wins when both are set
    for name, value in (("TIDINGS_API_KEY", KEY), ("TIDINGS_API_KEYS", f"{KEY},second-key-0123456789")):
        # One name exported for both the server and the CLI, as a new user does.
        monkeypatch.delenv("TIDINGS_API_KEY", raising=False)
        monkeypatch.delenv("TIDINGS_API_KEYS", raising=False)
        monkeypatch.setenv(name, value)
        proc = Proc(tmp_path / f"data-{name}", 0, [])
        proc.start()
        try:
            assert "API keys from configuration" in (proc.log.read_text() if proc.log else "")
            r = _run_cli(
                "publish", "chat:lobby", "hi", "--url", proc.http, "--data-dir", str(tmp_path / "none")
            )
            assert r.returncode == 0, (name, r.stderr)
            assert json.loads(r.stdout)["offset"] == 1
        finally:
            proc.stop()
