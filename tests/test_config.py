"""Settings precedence and validation, and docs/configuration.md listing every option."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from tidings.config import ConfigError, Namespace, Settings, load_settings

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
