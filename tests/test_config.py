"""Settings precedence and validation, and docs/configuration.md listing every option."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from tidings.config import (
    LIVE_OPTIONS,
    ConfigError,
    Namespace,
    Settings,
    check_file,
    example_config,
    find_line,
    load_settings,
    reloaded,
)

DOC = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()


def test_every_option_is_documented() -> None:
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", DOC, re.M))
    assert {f.name for f in fields(Settings)} <= documented
    assert {f.name for f in fields(Namespace)} - {"name"} <= documented


def test_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text('port = 1000\nhost = "0.0.0.0"\nmax_buffer = 5\n[namespaces.news]\nhistory_size = 7\n')
    s = load_settings(
        {"port": 3000}, env={"TIDINGS_PORT": "2000", "TIDINGS_MAX_BUFFER": "9"}, config_file=cfg
    )
    assert (s.port, s.host, s.max_buffer) == (3000, "0.0.0.0", 9)
    assert s.namespaces["news"].history_size == 7
    assert s.namespace_for("news:x") == s.namespaces["news"]
    s2 = load_settings({}, env={"TIDINGS_PORT": "2000"}, config_file=cfg)
    assert s2.port == 2000


def test_example_file_in_docs_loads(tmp_path: Path) -> None:
    example = DOC.split("```toml", 1)[1].split("```", 1)[0]
    cfg = tmp_path / "example.toml"
    cfg.write_text(example)
    s = load_settings({}, env={}, config_file=cfg)
    assert s.namespaces["news"].history_ttl == 604800 and s.sqlite_synchronous == "full"


@pytest.mark.parametrize(
    "text",
    [
        "nope = 1\n",
        "port = 'x'\n",
        "port = -1\n",
        "[namespaces.a]\nbogus = 1\n",
        "[namespaces.a]\nhistory_size = 'big'\n",
        "port = [\n",
    ],
)
def test_bad_config_is_an_error(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError):
        load_settings({}, env={}, config_file=cfg)


def test_default_namespace_can_be_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text("default_namespace = false\n")
    s = load_settings({}, env={}, config_file=cfg)
    assert s.namespace_for("other:x") is None and s.namespace_for("chat:x") is not None


# ---------------------------------------------------------------------------------------------- check


def test_check_reports_every_problem_with_its_line(tmp_path: Path) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text(
        "port = 'x'\n"  # 1
        "hots = 'a'\n"  # 2
        "# a comment\n"  # 3
        "[namespaces.chat]\n"  # 4
        "publsh = true\n"  # 5
        "history_size = 'big'\n"  # 6
        "[[api_keys]]\n"  # 7
        "key = 'short'\n"  # 8
        "[[api_keys]]\n"  # 9
        "key = '0123456789abcdefXX'\n"  # 10
        "role = 'boss'\n"  # 11
        "[default_namespace]\n"  # 12
        "subscribe = 'who'\n"  # 13
        "log_level = 'loud'\n"  # 14: in default_namespace, so an unknown namespace option
    )
    assert check_file(cfg) == [
        f"{cfg}:1: port: 'x' is not a valid int",
        f"{cfg}:2: unknown option 'hots' (did you mean 'host'?)",
        f"{cfg}:5: namespaces.chat: unknown option 'publsh' (did you mean 'publish'?)",
        f"{cfg}:6: namespaces.chat.history_size must be int",
        f"{cfg}:8: api key 'key1' is shorter than 16 characters",
        f"{cfg}:11: api_keys[2].role must be one of publish, read, admin",
        f"{cfg}:14: default_namespace: unknown option 'log_level' (a server option: put it above the first"
        " [table])",
        f"{cfg}:13: default_namespace.subscribe must be one of anyone, authenticated, token",
    ]
    # load_settings refuses the same file whole, with the same lines.
    with pytest.raises(ConfigError) as exc:
        load_settings({}, env={}, config_file=cfg)
    assert str(exc.value).splitlines() == check_file(cfg)


def test_check_syntax_errors_and_start_time_checks(tmp_path: Path) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text("port = 1\n[namespaces.a\nx = 1\n")
    [line] = check_file(cfg)
    assert line.startswith(f"{cfg}:2: ")
    cfg.write_text("port = [\n")
    assert check_file(cfg) == [f"{cfg}:1: Invalid value (at end of document)"]
    cfg.write_text('\n\ntoken_public_key = "/nonexistent/key.pem"\ntrusted_proxies = ["10.0.0.0/33"]\n')
    problems = check_file(cfg)
    assert problems[0] == f"{cfg}:4: trusted_proxies: '10.0.0.0/33' is not an address or CIDR"
    assert problems[1].startswith(f"{cfg}:3: token_public_key: cannot load '/nonexistent/key.pem'")
    assert check_file(tmp_path / "missing.toml")[0].startswith("cannot read config file")


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        # dotted keys, a key in an inline table (the table's line), quoted keys
        ("a = 1\nnamespaces.chat.publish = 1\n", ("namespaces", "chat", "publish"), 2),
        ("[namespaces]\nchat = { publish = 1 }\n", ("namespaces", "chat", "publish"), 2),
        ('[namespaces."my-ns"]\n\n "history_size" = 1\n', ("namespaces", "my-ns", "history_size"), 3),
        # array tables are counted; a line inside a multi-line string is not a key
        ('[[api_keys]]\nkey = """\nrole = x\n"""\n[[api_keys]]\nrole = 1\n', ("api_keys", 1, "role"), 6),
        # an unknown table's key: the nearest header; a path found nowhere: line 1
        ("x = 1\n[namespaces.a]\n", ("namespaces", "a", "bogus"), 2),
        ("x = 1\n", ("nothing",), 1),
    ],
)
def test_find_line(text: str, key: tuple[str | int, ...], line: int) -> None:
    assert find_line(text, key) == line


# ---------------------------------------------------------------------------------------------- example


def test_example_lists_every_option_with_its_default(tmp_path: Path) -> None:
    text = example_config()
    cfg = tmp_path / "example.toml"
    cfg.write_text(text)
    assert check_file(cfg) == []
    # As it is, the example changes nothing: every value in it is the default.
    assert load_settings({}, env={}, config_file=cfg) == Settings()
    tables = re.split(r"^\[", text, flags=re.M)
    top = {m for m in re.findall(r"^#? ?([a-z_]+) = ", tables[0], re.M)}
    missing = {f.name for f in fields(Settings)} - {"namespaces", "default_namespace"} - top
    assert not missing, f"{missing} not in src/tidings/example.toml: run scripts/gen_config_example.py"
    ns_options = {f.name for f in fields(Namespace)} - {"name"}
    headers = re.findall(r"^\[([a-z_.]+)\]$", text, re.M)
    assert headers == ["namespaces.chat", "namespaces.user", "default_namespace"]
    for table in tables[1:]:
        assert ns_options <= set(re.findall(r"^#? ?([a-z_]+) = ", table, re.M)), table[:40]
    # Each option says whether a reload applies it.
    for name in top:
        assert re.search(rf"^# {name} \((live|restart)[;)]", text, re.M), name
        assert (f"# {name} (live" in text) == (name in LIVE_OPTIONS), name


def test_reload_docs_list_the_live_options() -> None:
    section = DOC.split("## Reloading the configuration", 1)[1].split("\n## ", 1)[0]
    live = set(re.findall(r"`([a-z_]+)`", section.split("**Live**", 1)[1].split("**Restart**", 1)[0]))
    assert live == set(LIVE_OPTIONS)
    restart = set(re.findall(r"`([a-z_]+)`", section.split("**Restart**", 1)[1].split("\n\n", 1)[0]))
    assert restart == {f.name for f in fields(Settings)} - LIVE_OPTIONS


def test_reloaded_keeps_restart_options_and_running_adjustments() -> None:
    before = Settings(port=0)
    running = Settings(port=4321, max_connections=500)  # as adjusted at start (a worker's port, fit)
    after = Settings(port=0, host="0.0.0.0", client_rate=5.0, namespaces={})
    new, live, kept = reloaded(running, before, after)
    assert (new.port, new.host, new.client_rate, new.max_connections) == (4321, "127.0.0.1", 5.0, 500)
    assert new.namespaces == {} and live == ["client_rate", "namespaces"] and kept == ["host"]
