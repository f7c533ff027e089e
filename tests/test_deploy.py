"""docs/deploy.md, tried for real: the wheel, the Dockerfile's commands, the systemd unit, the nginx config.

- The wheel: ``python -m build`` (sdist, then the wheel from the sdist) in a copy of the checkout; the
  wheel installed with its declared dependencies into a fresh ``python -m venv``; ``tidings --version``;
  the Dockerfile's CMD with its ENV serving the page, static files and ``/healthz``; its HEALTHCHECK.
- The systemd unit in docs/deploy.md passes ``systemd-analyze verify``.
- The nginx config in docs/deploy.md (the block after ``<!-- deploy: nginx``), only ports, certificate
  and log paths replaced, runs Debian's nginx in front of ``tidings serve`` started as the unit's
  ExecStart with the doc's ``tidings.toml``: WebSocket, /chatsocket, SSE, /stream, long-poll, the HTTP
  API, the chat page in Chromium over HTTPS, X-Forwarded-For through ``trusted_proxies``.

nginx, systemd-analyze or Chromium missing: the tests fail under CI (env CI) and skip locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tidings.config import Settings

from .browser_helpers import Watch, chromium, open_page, send, unavailable, wait_body
from .conftest import API_KEY, api_headers
from .redis_servers import free_port
from .serve_process import ServeProcess, wait_for

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_MD = ROOT / "docs" / "deploy.md"
DOCKERFILE = ROOT / "Dockerfile"
PKG = ROOT / "src" / "tidings"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
PROMPT = 2.0  # seconds within which an SSE event must come through nginx


# ------------------------------------------------------------------------------------------- doc blocks


def doc_block(name: str) -> str:
    """The fenced block right after ``<!-- deploy: NAME`` in docs/deploy.md."""
    text = DEPLOY_MD.read_text()
    m = re.search(rf"<!-- deploy: {re.escape(name)}\b[^>]*-->\s*```[a-z]*\n(.*?)^```", text, re.S | re.M)
    assert m, f"docs/deploy.md has no block marked '<!-- deploy: {name}'"
    return m.group(1)


def subst(text: str, old: str, new: str) -> str:
    """Replace ``old`` (which must occur exactly once: the doc changed otherwise) by ``new``."""
    n = text.count(old)
    assert n == 1, f"{old!r} occurs {n} times in the docs/deploy.md block; the test replaces it once"
    return text.replace(old, new)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without PYTHONPATH (a fresh venv must run its own install) and
    without TIDINGS_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("TIDINGS_")}
    return {**env, **extra}


def get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def wait_healthz(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}:\n{log.read_text(errors='replace')}")
        with contextlib.suppress(OSError):
            return get(f"{url}/healthz", 2)[0] == 200
        return False

    wait_for(up, timeout, f"{url}/healthz did not answer 200")


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM by PID, SIGKILL after ``timeout``; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


# ------------------------------------------------------------------------------------------ the Dockerfile


@dataclass
class Dockerfile:
    env: dict[str, str]
    cmd: list[str]
    healthcheck: list[str]
    user: str
    volume: list[str]
    expose: list[str]
    stages: list[str]


def parse_dockerfile(text: str) -> Dockerfile:
    """The final stage's ENV, CMD, HEALTHCHECK CMD, USER, VOLUME, EXPOSE (continuation lines joined)."""
    lines = re.sub(r"\\\n", " ", text).splitlines()
    env: dict[str, str] = {}
    cmd: list[str] = []
    health: list[str] = []
    user = ""
    volume: list[str] = []
    expose: list[str] = []
    stages: list[str] = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            stages.append(rest.split()[0])
            env, cmd, health, user, volume, expose = {}, [], [], "", [], []  # the last stage is the image
        elif word == "ENV":
            for item in shlex.split(rest):
                k, sep, v = item.partition("=")
                assert sep, f"ENV {item!r}: use KEY=VALUE"
                env[k] = v
        elif word == "CMD":
            cmd = orjson.loads(rest)
        elif word == "HEALTHCHECK":
            m = re.search(r"\bCMD\s+(\[.*\])\s*$", rest)
            assert m, "HEALTHCHECK must use CMD in exec form ([...])"
            health = orjson.loads(m.group(1))
        elif word == "USER":
            user = rest.strip()
        elif word == "VOLUME":
            volume = orjson.loads(rest) if rest.startswith("[") else rest.split()
        elif word == "EXPOSE":
            expose = rest.split()
    return Dockerfile(env, cmd, health, user, volume, expose, stages)


def test_dockerfile_shape() -> None:
    """The image runs as a non-root user, on a slim Python, with the data directory as a volume, its port
    exposed, and a health check on /healthz; what the wheel test runs is taken from here."""
    df = parse_dockerfile(DOCKERFILE.read_text())
    assert len(df.stages) == 2 and all("slim" in s for s in df.stages), df.stages
    assert df.user and df.user not in ("root", "0"), f"USER {df.user!r}"
    assert df.volume == [df.env["TIDINGS_DATA_DIR"]], (df.volume, df.env)
    assert df.expose == [df.env["TIDINGS_PORT"]], (df.expose, df.env)
    assert df.cmd[:2] == ["tidings", "serve"], df.cmd
    assert "/healthz" in " ".join(df.healthcheck), df.healthcheck
    # Every ENV name is a real setting (a typo would be silently ignored by the server).
    names = {f"TIDINGS_{n.upper()}" for n in Settings.__dataclass_fields__}
    assert {k for k in df.env if k.startswith("TIDINGS_")} <= names, df.env


# ----------------------------------------------------------------------------------------------- the wheel

_COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "node_modules", "artifacts", "__pycache__", "*.pyc", "*.egg-info", "build", "dist",
    ".pytest_cache", ".mypy_cache", ".ruff_cache", "tidings-data", "raw",
)  # fmt: skip


def package_files() -> list[str]:
    """Every file of the package in the checkout, relative to src/ (tidings/...)."""
    return sorted(
        str(p.relative_to(PKG.parent))
        for p in PKG.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


@pytest.mark.timeout(900)  # build ~6 s, pip install from PyPI ~10-60 s; every step has its own timeout
def test_wheel_installs_and_runs(tmp_path: Path) -> None:
    if not _has_module("build"):
        unavailable("the build package is missing: pip install -e '.[test]'")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_COPY_IGNORE)
    dist = tmp_path / "dist"
    env = clean_env()
    # python -m build: the sdist first, then the wheel built from the unpacked sdist.
    r = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(src)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, f"python -m build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    (sdist,) = dist.glob(f"tidings-{VERSION}.tar.gz")
    (wheel,) = dist.glob(f"tidings-{VERSION}-py3-none-any.whl")

    want = package_files()
    assert any(f.startswith("tidings/web/static/") for f in want) and "tidings/openapi.json" in want
    with zipfile.ZipFile(wheel) as z:
        in_wheel = set(z.namelist())
    missing = [f for f in want if f not in in_wheel]
    assert not missing, f"not in the wheel (add them to [tool.setuptools.package-data]): {missing}"
    with tarfile.open(sdist) as t:
        in_sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for f in (*(f"src/{p}" for p in want), "pyproject.toml", "README.md", "CHANGELOG.md", "docs/deploy.md",
              "Dockerfile"):  # fmt: skip
        assert f in in_sdist, f"{f} is not in the sdist (MANIFEST.in)"

    # A fresh virtualenv: the wheel and its declared dependencies (from PyPI), nothing else.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=env)
    bin_dir = venv / "bin"
    r = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    assert r.returncode == 0, f"pip install of the wheel failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    r = subprocess.run(
        [str(bin_dir / "python"), "-c", "import tidings, sys; print(tidings.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_relative_to(venv), f"imported from {r.stdout.strip()}, not the venv"
    r = subprocess.run(
        [str(bin_dir / "tidings"), "--version"], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 0 and r.stdout.strip() == f"tidings {VERSION}", (r.stdout, r.stderr)

    # The Dockerfile's CMD with its ENV (on loopback and a free port, data in tmp), from WORKDIR.
    df = parse_dockerfile(DOCKERFILE.read_text())
    port = free_port()
    data = tmp_path / "data"
    data.mkdir()
    run_env = clean_env(
        **{
            **df.env,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "TIDINGS_HOST": "127.0.0.1",
            "TIDINGS_PORT": str(port),
            "TIDINGS_DATA_DIR": str(data),
        }
    )
    exe = shutil.which(df.cmd[0], path=str(bin_dir))
    assert exe is not None, f"{df.cmd[0]} is not installed by the wheel"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [exe, *df.cmd[1:]], stdout=out, stderr=subprocess.STDOUT, env=run_env, cwd=data
        )
    url = f"http://127.0.0.1:{port}"
    health = [shutil.which(df.healthcheck[0], path=str(bin_dir)) or df.healthcheck[0], *df.healthcheck[1:]]
    try:
        wait_healthz(url, proc, log)
        status, headers, body = get(f"{url}/")
        assert status == 200 and headers["Content-Type"].startswith("text/html"), (status, headers)
        assert b"/static/tidings.js" in body and b"/static/chat.js" in body, body[:500]
        for name in ("tidings.js", "chat.js", "chat.css"):
            status, _, content = get(f"{url}/static/{name}")
            assert status == 200 and content == (PKG / "web" / "static" / name).read_bytes(), name
        status, headers, _ = get(f"{url}/sw.js")
        assert status == 200 and "javascript" in headers["Content-Type"], (status, headers)
        assert (data / "api-key").stat().st_mode & 0o077 == 0, "the generated API key is readable by others"
        r = subprocess.run(health, env=run_env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"HEALTHCHECK failed while serving: {r.stderr}"
        assert f"tidings {VERSION} listening" in log.read_text(), log.read_text()
    finally:
        code = stop(proc)
    assert code == 0, f"tidings serve exited {code} after SIGTERM:\n{log.read_text(errors='replace')}"
    r = subprocess.run(health, env=run_env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0, "HEALTHCHECK passed with the server stopped"


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------------------------------------- systemd


def test_systemd_unit(tmp_path: Path) -> None:
    unit = doc_block("systemd unit")
    for line in ("LimitNOFILE=", "Restart=on-failure", "ExecReload=/bin/kill -HUP $MAINPID", "User="):
        assert re.search(rf"^{re.escape(line)}", unit, re.M), f"the unit has no {line}"
    analyze = shutil.which("systemd-analyze") or ""
    if not analyze:
        unavailable("systemd-analyze not found (apt-get install systemd)")
    tidings = Path(sys.executable).parent / "tidings"
    if not tidings.exists():
        unavailable(f"{tidings} not found (pip install -e .)")
    path = tmp_path / "tidings.service"
    path.write_text(subst(unit, "ExecStart=/opt/tidings/bin/tidings ", f"ExecStart={tidings} "))
    r = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == 0 and not out, f"systemd-analyze verify:\n{out}"
    # A typo is caught (so the check above could fail).
    path.write_text(
        unit.replace("LimitNOFILE=", "LimitNOFILES=").replace("/opt/tidings/bin/tidings", str(tidings))
    )
    r = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert "LimitNOFILES" in r.stdout + r.stderr


# ------------------------------------------------------------------------------------------------- nginx


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 / localhost and its key (PEM), made with ``cryptography``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    crt, pem = tmp / "cert.pem", tmp / "key.pem"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pem.chmod(0o600)
    return crt, pem


@dataclass
class Nginx:
    proc: subprocess.Popen[bytes]
    https: int
    http: int
    dir: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.https}"

    @property
    def wss(self) -> str:
        return f"wss://127.0.0.1:{self.https}"

    def access_log(self) -> str:
        return (self.dir / "tidings.access.log").read_text(errors="replace")

    def error_log(self) -> str:
        return (self.dir / "error.log").read_text(errors="replace")


def site_config(upstream: int, https: int, http: int, cert: tuple[Path, Path], logs: Path) -> str:
    """The doc's nginx block with the ports, certificate and log path of this test."""
    conf = doc_block("nginx")
    conf = subst(conf, "server 127.0.0.1:8888;", f"server 127.0.0.1:{upstream};")
    conf = subst(conf, "listen 443 ssl http2;", f"listen 127.0.0.1:{https} ssl http2;")
    conf = subst(conf, "listen [::]:443 ssl http2;", "")
    conf = subst(conf, "listen 80;", f"listen 127.0.0.1:{http};")
    conf = subst(conf, "listen [::]:80;", "")
    conf = subst(conf, "/etc/letsencrypt/live/push.example.com/fullchain.pem", str(cert[0]))
    conf = subst(conf, "/etc/letsencrypt/live/push.example.com/privkey.pem", str(cert[1]))
    return subst(conf, "/var/log/nginx/tidings.access.log", str(logs / "tidings.access.log"))


@contextlib.contextmanager
def run_nginx(tmp: Path, site: str, https: int, http: int, extra_http: str = "") -> Iterator[Nginx]:
    """Debian's nginx, one process (``master_process off``: no workers switching user), in the
    foreground, everything under ``tmp``; stopped by its PID."""
    if not os.access(NGINX, os.X_OK):
        unavailable(f"nginx not found at {NGINX} (apt-get install nginx)")
    tmp.mkdir(parents=True, exist_ok=True)
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / d).mkdir(exist_ok=True)
    main = f"""
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    {extra_http}
    # ---- docs/deploy.md
{site}
}}
"""
    conf = tmp / "nginx.conf"
    conf.write_text(main)
    argv = [NGINX, "-p", f"{tmp}/", "-c", str(conf), "-e", str(tmp / "error.log")]
    r = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"nginx -t refused the config:\n{r.stderr}"
    with open(tmp / "stdout.log", "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    ng = Nginx(proc, https, http, tmp)
    try:

        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited {proc.returncode}:\n{ng.error_log()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", https), 1):
                return True
            return False

        wait_for(listening, 10, "nginx did not listen")
        yield ng
    finally:
        stop(proc, 10)


@dataclass
class Deployed:
    tidings: ServeProcess
    port: int
    nginx: Nginx
    cert: tuple[Path, Path]
    tmp: Path


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    """tidings as the unit's ExecStart with the doc's tidings.toml, and nginx with the doc's config."""
    if not os.access(NGINX, os.X_OK):
        unavailable(f"nginx not found at {NGINX} (apt-get install nginx)")
    tmp = tmp_path_factory.mktemp("deploy")
    port, https, http = free_port(), free_port(), free_port()
    toml = doc_block("tidings.toml")
    toml = subst(toml, "port = 8888", f"port = {port}")
    toml = subst(toml, 'data_dir = "/var/lib/tidings"', f'data_dir = "{tmp / "data"}"')
    toml = subst(toml, '"https://push.example.com"', f'"https://127.0.0.1:{https}"')
    (tmp / "tidings.toml").write_text(toml)
    exec_start = re.search(r"^ExecStart=(.*)$", doc_block("systemd unit"), re.M)
    assert exec_start, "the unit has no ExecStart"
    argv = shlex.split(exec_start.group(1))
    assert argv[:2] == ["/opt/tidings/bin/tidings", "serve"], argv
    args = [str(tmp / "tidings.toml") if a == "/etc/tidings/tidings.toml" else a for a in argv[2:]]
    # Only the per-address limit is lowered, to see X-Forwarded-For at work; the key is the tests' key.
    env = {"TIDINGS_MAX_CONNECTIONS_PER_IP": "2", "TIDINGS_API_KEYS": API_KEY}
    server = ServeProcess(args, tmp / "tidings.log", env)
    cert = self_signed(tmp)
    server.spawn()
    try:
        assert server.proc is not None
        wait_healthz(f"http://127.0.0.1:{port}", server.proc, server.log_path)
        with run_nginx(tmp / "nginx", site_config(port, https, http, cert, tmp / "nginx"), https, http) as ng:
            yield Deployed(server, port, ng, cert, tmp)
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def client_from(source: str) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client whose connections come from the loopback address ``source`` (127.0.0.0/8 is all
    loopback on Linux), so nginx forwards that as the client's address. The certificate is not checked
    (self-signed)."""
    conn = aiohttp.TCPConnector(ssl=False, local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


async def recv(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> dict[str, Any]:
    msg = await ws.receive(timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data, ws.close_code)
    out: dict[str, Any] = orjson.loads(msg.data)
    return out


async def reply(
    ws: aiohttp.ClientWebSocketResponse, op_id: int, pushes: list[dict[str, Any]]
) -> dict[str, Any]:
    """The reply to command ``op_id``; pushes that come first go to ``pushes``."""
    async with asyncio.timeout(5):
        while True:
            m = await recv(ws)
            if m.get("id") == op_id:
                return m
            pushes.append(m)


async def next_message(ws: aiohttp.ClientWebSocketResponse, pushes: list[dict[str, Any]]) -> dict[str, Any]:
    for i, m in enumerate(pushes):
        if m.get("type") == "message":
            return pushes.pop(i)
    async with asyncio.timeout(5):
        while True:
            m = await recv(ws)
            if m.get("type") == "message":
                return m


async def api_publish(s: aiohttp.ClientSession, base: str, channel: str, data: Any) -> dict[str, Any]:
    async with s.post(
        f"{base}/api/publish", json={"channel": channel, "data": data}, headers=api_headers()
    ) as r:
        assert r.status == 200, (r.status, await r.text())
        out: dict[str, Any] = await r.json()
        return out


async def test_nginx_websocket(deployed: Deployed) -> None:
    """/ws through nginx over TLS: subscribe, publish on the socket, publish through the HTTP API."""
    base = deployed.nginx.url
    async with client_from("127.0.0.4") as s, s.ws_connect(f"{deployed.nginx.wss}/ws") as ws:
        pushes: list[dict[str, Any]] = []
        await ws.send_str('{"id":1,"op":"subscribe","channel":"chat:deploy-ws"}')
        assert (await reply(ws, 1, pushes)).get("ok") is True
        await ws.send_str('{"id":2,"op":"publish","channel":"chat:deploy-ws","data":{"n":1}}')
        assert (await reply(ws, 2, pushes)).get("ok") is True
        assert (await next_message(ws, pushes))["data"] == {"n": 1}
        await api_publish(s, base, "chat:deploy-ws", {"n": 2})
        assert (await next_message(ws, pushes))["data"] == {"n": 2}


async def test_nginx_chatsocket(deployed: Deployed) -> None:
    """The Tornado demo's /chatsocket through nginx: once it is live in chat:lobby (its presence, asked
    through nginx with the API key), what it sends comes back to it."""
    base = deployed.nginx.url
    async with client_from("127.0.0.7") as s:

        async def lobby() -> int:
            async with s.get(f"{base}/api/channels/chat:lobby/presence", headers=api_headers()) as r:
                assert r.status == 200, await r.text()
                count: int = (await r.json())["count"]
                return count

        before = await lobby()
        async with s.ws_connect(f"{deployed.nginx.wss}/chatsocket") as ws:
            async with asyncio.timeout(5):
                while await lobby() <= before:
                    await asyncio.sleep(0.02)
            await ws.send_str('{"body": "through nginx"}')
            async with asyncio.timeout(5):
                while (m := await recv(ws)).get("body") != "through nginx":
                    pass
            assert "through nginx" in m["html"]


async def _first_lines(s: aiohttp.ClientSession, url: str, want: str, within: float) -> bool:
    """Whether the response and a line containing ``want`` arrive within ``within`` seconds."""
    try:
        async with asyncio.timeout(within), s.get(url) as r:
            assert r.status == 200, (r.status, await r.text())
            while line := await r.content.readline():
                if want.encode() in line:
                    return True
            return False
    except TimeoutError:
        return False


async def _sse_message_prompt(
    s: aiohttp.ClientSession, base: str, path: str, channel: str, upstream: int
) -> None:
    """The response with its first event, then a publication, each arrive within PROMPT seconds."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            async with asyncio.timeout(PROMPT):
                r = await stack.enter_async_context(s.get(f"{base}/{path}?channel={channel}"))
                assert r.status == 200, (r.status, await r.text())
                while b'"subscribed"' not in (line := await r.content.readline()):
                    assert line, "the stream ended"
        except TimeoutError:
            pytest.fail(f"/{path}: no subscribed event within {PROMPT} s through nginx (buffered?)")
        kind = "text/event-stream" if path == "sse" else "application/x-ndjson"
        assert r.headers["Content-Type"].startswith(kind), r.headers
        # Published straight to tidings: only the stream goes through nginx.
        async with aiohttp.ClientSession() as direct:
            await api_publish(direct, f"http://127.0.0.1:{upstream}", channel, {"sse": path})
        try:
            async with asyncio.timeout(PROMPT):
                while b'"sse":"' + path.encode() not in (line := await r.content.readline()):
                    assert line, "the stream ended"
        except TimeoutError:
            pytest.fail(f"/{path}: the publication did not come within {PROMPT} s through nginx (buffered?)")


async def test_nginx_sse_and_stream_unbuffered(deployed: Deployed) -> None:
    """SSE and the NDJSON stream through nginx: every event at once (nginx does not buffer them)."""
    async with client_from("127.0.0.5") as s:
        await _sse_message_prompt(s, deployed.nginx.url, "sse", "chat:deploy-sse", deployed.port)
        await _sse_message_prompt(s, deployed.nginx.url, "stream", "chat:deploy-stream", deployed.port)


async def test_nginx_config_alone_unbuffers_sse(deployed: Deployed) -> None:
    """The config's own ``proxy_buffering off`` keeps SSE prompt even when nginx ignores tidings'
    ``X-Accel-Buffering: no`` (another proxy may drop that header). The control: the same config without
    ``proxy_buffering off`` holds the events (so this test can tell)."""
    https, http = free_port(), free_port()
    site = site_config(deployed.port, https, http, deployed.cert, deployed.tmp / "ng2")
    ignore = "proxy_ignore_headers X-Accel-Buffering;"
    with run_nginx(deployed.tmp / "ng2", site, https, http, extra_http=ignore) as ng:
        async with client_from("127.0.0.8") as s:
            await _sse_message_prompt(s, ng.url, "sse", "chat:deploy-sse2", deployed.port)
    https, http = free_port(), free_port()
    site = site_config(deployed.port, https, http, deployed.cert, deployed.tmp / "ng3")
    buffered = site.replace("proxy_buffering off;", "")
    assert buffered != site
    with run_nginx(deployed.tmp / "ng3", buffered, https, http, extra_http=ignore) as ng:
        async with client_from("127.0.0.8") as s:
            prompt = await _first_lines(s, f"{ng.url}/sse?channel=chat:deploy-sse3", '"subscribed"', PROMPT)
    assert not prompt, "control: without proxy_buffering off the event still came at once; the test is blind"


async def test_nginx_long_poll(deployed: Deployed) -> None:
    base = deployed.nginx.url
    channel = "chat:deploy-poll"
    async with client_from("127.0.0.6") as s:
        async with s.get(f"{base}/poll?channel={channel}") as r:
            assert r.status == 200, await r.text()
            pos = await r.json()
        since = f"{pos['offset']}:{pos['epoch']}"

        async def poll() -> dict[str, Any]:
            async with s.get(f"{base}/poll?channel={channel}&since={since}&timeout=20") as r:
                assert r.status == 200, await r.text()
                out: dict[str, Any] = await r.json()
                return out

        task = asyncio.create_task(poll())
        await asyncio.sleep(0.3)  # the poll is pending (if it were not, it would still be answered)
        assert not task.done(), task
        await api_publish(s, base, channel, {"poll": 1})
        async with asyncio.timeout(5):
            answer = await task
        assert [p["data"] for p in answer["publications"]] == [{"poll": 1}], answer


async def _ws_state(
    s: aiohttp.ClientSession, url: str, **kw: Any
) -> tuple[aiohttp.ClientWebSocketResponse, str]:
    """Open a /ws and subscribe; 'ok', or the close code the server sent instead."""
    ws = await s.ws_connect(url, **kw)
    await ws.send_str('{"id":1,"op":"subscribe","channel":"chat:deploy-xff"}')
    async with asyncio.timeout(5):
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                m = orjson.loads(msg.data)
                if m.get("id") == 1:
                    return ws, "ok" if m.get("ok") else str(m)
                if m.get("type") == "disconnect":
                    return ws, str(m["code"])
            else:
                return ws, str(ws.close_code)


async def test_nginx_forwarded_for(deployed: Deployed) -> None:
    """tidings counts each client by the address nginx saw (X-Forwarded-For from a trusted proxy): with
    max_connections_per_ip = 2, a third socket from 127.0.0.2 is refused (4029) even with a forged
    X-Forwarded-For, while 127.0.0.3 still connects. Behind an untrusted proxy all would be 127.0.0.1."""
    url = f"{deployed.nginx.wss}/ws"
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(client_from("127.0.0.2"))
        b = await stack.enter_async_context(client_from("127.0.0.3"))
        held = []
        for _ in range(2):
            ws, state = await _ws_state(a, url)
            held.append(ws)
            assert state == "ok", state
        ws, state = await _ws_state(a, url, headers={"X-Forwarded-For": "10.9.8.7"})
        held.append(ws)
        assert state == "4029", f"a third socket from 127.0.0.2 through nginx: {state}"
        ws, state = await _ws_state(b, url)
        held.append(ws)
        assert state == "ok", f"127.0.0.3 was counted with 127.0.0.2 (X-Forwarded-For not used?): {state}"
        for w in held:
            await w.close()


async def test_nginx_redirect_and_access_log(deployed: Deployed) -> None:
    """Port 80 redirects to https; a ?token= never reaches nginx's access log."""
    async with client_from("127.0.0.9") as s:
        async with s.get(f"http://127.0.0.1:{deployed.nginx.http}/chat/x?a=1", allow_redirects=False) as r:
            assert r.status == 301 and r.headers["Location"].startswith("https://"), (r.status, r.headers)
        secret = "sekrit-token-3e9f1c2a"
        async with s.get(f"{deployed.nginx.url}/poll?channel=chat:deploy-log&token={secret}") as r:
            assert r.status == 401, (r.status, await r.text())
    wait_for(lambda: "/poll" in deployed.nginx.access_log(), 5, "no /poll line in nginx's access log")
    assert secret not in deployed.nginx.access_log()
    assert secret not in deployed.nginx.error_log()


_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)?$")


def _seconds(value: str) -> float:
    m = _DURATION.match(value)
    assert m, value
    return int(m[1]) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[m[2]]


def test_nginx_timeouts_fit_the_server() -> None:
    """Each location's proxy_read_timeout is above what tidings may stay silent there."""
    conf = doc_block("nginx")
    s = Settings()
    locations = dict(re.findall(r"^\s*location\s+([^{]*?)\s*\{([^}]*)\}", conf, re.M))
    need = {
        "~ ^/(ws|chatsocket|websocket)$": s.ping_interval,
        "~ ^/(sse|stream)$": s.ping_interval,
        "= /poll": s.poll_max_timeout,
    }
    for loc, silent in need.items():
        assert loc in locations, f"no location {loc} in the nginx config: {list(locations)}"
        m = re.search(r"proxy_read_timeout\s+(\S+);", locations[loc])
        read = _seconds(m[1]) if m else 60.0  # nginx's default
        assert read > silent, f"location {loc}: proxy_read_timeout {read} s <= {silent} s"


@pytest.mark.browser
async def test_nginx_chat_page_in_chromium(deployed: Deployed) -> None:
    """The chat page over HTTPS (HTTP/2) through nginx: it connects over wss, a message is sent and shown,
    no CSP violation, and the XSRF cookie is the Secure __Host- one (X-Forwarded-Proto believed)."""
    watch = Watch()
    async with chromium() as browser:
        ctx, page = await open_page(
            browser, f"{deployed.nginx.url}/", watch, "nginx", ignore_https_errors=True
        )
        try:
            await send(page, "hello through nginx")
            await wait_body(page, "hello through nginx")
            cookies = {c["name"]: c for c in await ctx.cookies()}
            assert "__Host-xsrf" in cookies and cookies["__Host-xsrf"]["secure"], cookies
            proto = await page.evaluate("() => performance.getEntriesByType('navigation')[0].nextHopProtocol")
            assert proto == "h2", proto
        finally:
            await ctx.close()
    assert not watch.problems(), watch.problems()
