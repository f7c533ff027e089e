"""The tidings-client npm package (clients/js): its versions, its build, its types, and its own Node test
suite against real servers (clients/js/test/*.test.mjs, run with ``node --test``).

Needs Node and npm; ``scripts/test`` installs them and runs ``npm ci``. When they are missing the tests
fail under CI (env ``CI`` set) and skip locally, with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "clients" / "js"
STATIC = ROOT / "src" / "tidings" / "web" / "static"


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the JS package tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def run(cmd: list[str], cwd: Path, timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, **kw)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    out, err = proc.stdout[-6000:], proc.stderr[-6000:]
    assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}):\n{out}\n{err}"
    return proc.stdout


@pytest.fixture(scope="module")
def node() -> Iterator[str]:
    """Node with the package's devDependencies installed (npm ci once) and dist/ built."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        _missing("node and npm are needed (apt-get install nodejs npm)")
    assert node and npm
    version = run([node, "--version"], JS, 30).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 20:
        _missing(f"Node >= 20 is needed (node --version: {version})")
    stamp = JS / "node_modules" / ".package-lock.json"
    lock = JS / "package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        ok(run([npm, "ci", "--no-audit", "--no-fund"], JS, 300))
    ok(run([node, "build.mjs", "--no-copy"], JS, 60))
    yield node


def test_package_version_is_the_servers() -> None:
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    pkg = json.loads((JS / "package.json").read_text())
    lock = json.loads((JS / "package-lock.json").read_text())
    assert pkg["version"] == server
    assert lock["version"] == server and lock["packages"][""]["version"] == server
    assert not pkg.get("dependencies"), "the package has no runtime dependencies"
    # esbuild is pinned to an exact version (the static files are its byte-exact output).
    assert re.fullmatch(r"\d+\.\d+\.\d+", pkg["devDependencies"]["esbuild"])


def test_built_library_reports_the_version(node: str) -> None:
    expr = "require('./dist/index.cjs').VERSION + ' ' + require('./dist/tidings.js').VERSION"
    out = ok(run([node, "-p", expr], JS, 30))
    version = json.loads((JS / "package.json").read_text())["version"]
    assert out.split() == [version, version]


def test_static_files_are_the_package_build(node: str, tmp_path: Path) -> None:
    """/static/tidings.js and /static/tidings.mjs are byte for byte what the package's build makes now."""
    ok(run([node, "build.mjs", "--outdir", str(tmp_path)], JS, 60))
    for built, served in (("tidings.js", "tidings.js"), ("index.mjs", "tidings.mjs")):
        assert (tmp_path / built).read_bytes() == (STATIC / served).read_bytes(), (
            f"static/{served} is not the build of clients/js/src: run `npm run build` in clients/js"
        )


@pytest.mark.timeout(300)
def test_node_suite(node: str) -> None:
    """clients/js/test/*.test.mjs: connect, subscribe, recovery across kill -9 and graceful restarts,
    token renewal, subscription tokens, idempotent retries against a frozen server, Node's built-in
    WebSocket. Each test has its own time limit; the files run three at a time."""
    files = sorted(str(p.relative_to(JS)) for p in (JS / "test").glob("*.test.mjs"))
    assert len(files) >= 5, files
    # Node 20 has its built-in WebSocket behind a flag (on by default from Node 22).
    has_flag = run([node, "--experimental-websocket", "-e", "0"], JS, 30).returncode == 0
    flags = ["--experimental-websocket"] if has_flag else []
    env = {**os.environ, "TIDINGS_PYTHON": sys.executable}
    cmd = [node, *flags, "--test", "--test-concurrency=3", "--test-timeout=120000", *files]
    proc = run(cmd, JS, 280, env=env)
    lines = proc.stdout.splitlines()
    summary = [line for line in lines if re.match(r"^(not )?ok \d+|^# (tests|pass|fail) ", line)]
    assert proc.returncode == 0, "\n".join(summary) + "\n\n" + proc.stdout[-12000:] + proc.stderr[-4000:]
    assert any(line.startswith("# fail 0") for line in summary), summary
    print("\n".join(line for line in lines if line.startswith("# \\#")))


def test_packed_tarball_installs_and_type_checks(node: str, tmp_path: Path) -> None:
    """npm pack -> install into an empty project -> tsc --strict passes on correct usage (ESM and CJS)
    and reports every wrong call; the installed package's ESM entry sets no globals, require() works."""
    npm = shutil.which("npm")
    assert npm
    ok(run([npm, "pack", "--pack-destination", str(tmp_path), "--silent"], JS, 120))
    (tarball,) = tmp_path.glob("tidings-client-*.tgz")
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "package.json").write_text('{"name": "typed-check", "private": true, "type": "module"}')
    ok(run([npm, "install", "--no-audit", "--no-fund", "--offline", str(tarball)], proj, 120))
    for f in (JS / "test" / "types").iterdir():
        shutil.copy(f, proj / f.name)
    tsc = [node, str(JS / "node_modules" / "typescript" / "bin" / "tsc"), "--strict", "--noEmit"]
    tsc += ["--module", "nodenext", "--moduleResolution", "nodenext", "--target", "es2022"]
    ok(run([*tsc, "ok.mts", "ok.cts"], proj, 120))

    bad = run([*tsc, "bad.mts"], proj, 120)
    assert bad.returncode != 0, bad.stdout
    wrong = (proj / "bad.mts").read_text().splitlines()
    expected = [i for i, line in enumerate(wrong, 1) if "// error" in line]
    reported = {int(m) for m in re.findall(r"^bad\.mts\((\d+),\d+\): error TS", bad.stdout, re.M)}
    assert reported == set(expected), bad.stdout

    out = ok(run([node, "--input-type=module", "-e", _IMPORT_CHECK], proj, 30))
    assert json.loads(out) == {"added": [], "esm": "function", "cjs": "function", "same": False}


_IMPORT_CHECK = """
const before = new Set(Object.getOwnPropertyNames(globalThis));
const m = await import("tidings-client");
const added = Object.getOwnPropertyNames(globalThis).filter((k) => !before.has(k));
const { createRequire } = await import("node:module");
const c = createRequire(process.cwd() + "/x.js")("tidings-client");
console.log(JSON.stringify({added, esm: typeof m.Tidings, cjs: typeof c.Tidings,
                            same: c.Tidings === m.Tidings}));
"""
