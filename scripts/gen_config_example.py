#!/usr/bin/env python3
"""Write src/tidings/example.toml (``tidings config example``) from the Settings defaults and the option
tables of docs/configuration.md. Run it after adding or changing an option; tests/test_config.py checks
that the file lists every option, marks it live or restart, and loads as the defaults."""

from __future__ import annotations

import re
import sys
import textwrap
from dataclasses import fields
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from tidings.config import LIVE_OPTIONS, Namespace, Settings  # noqa: E402

doc = (ROOT / "docs" / "configuration.md").read_text()
server = doc.split("## Server options", 1)[1].split("\n## ", 1)[0]
nsdoc = doc.split("## Namespaces", 1)[1].split("\n## ", 1)[0]


def rows(text: str) -> dict[str, list[str]]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^\| `([a-z_]+)` \|(.*)\|\s*$", line)
        if m:
            cells = [c.strip() for c in m[2].split(" | ")]
            out[m[1]] = cells
    return out


def link(m: re.Match[str]) -> str:
    text, url = m[1], m[2]
    url = ("docs/configuration.md" + url) if url.startswith("#") else "docs/" + url
    return (
        url if text.endswith(".md") or (text.startswith("`") and text.endswith(".md`")) else f"{text} ({url})"
    )


def clean(t: str) -> str:
    t = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", link, t)
    t = t.replace("docs/docs/", "docs/").replace("(docs/#", "(docs/configuration.md#")
    t = t.replace("`", "")
    return t


def toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int,)):
        return str(v)
    if isinstance(v, float):
        return repr(v) if not v.is_integer() else f"{v:.1f}"
    if isinstance(v, Path):
        return f'"{v}"'
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(toml(x) for x in v) + "]"
    raise TypeError(v)


def comment(text: str, width: int = 100) -> str:
    return "\n".join("# " + w for w in textwrap.wrap(text, width - 2))


srv = rows(server)
nsr = rows(nsdoc)
d = Settings()
out = [
    """# tidings configuration: every option with its default (`tidings config example`).
#
# Run with: tidings serve --config tidings.toml   (or TIDINGS_CONFIG=tidings.toml)
# Check with: tidings config check tidings.toml
# Precedence: command-line flag > environment variable TIDINGS_<NAME> > this file > default.
# Reload (SIGHUP, `tidings reload`, systemctl reload) applies the options marked "live" to the running
# server, existing connections included; the others need a restart. See docs/configuration.md.
#
# Every value below is the default: this file as it is changes nothing. Edit what you need; delete the rest.
"""
]
for f in fields(Settings):
    if f.name in ("namespaces", "default_namespace"):
        continue
    cells = srv[f.name]
    meaning = clean(cells[-1])
    env = clean(cells[1])
    flag = clean(cells[0])
    extra = []
    if flag and flag != "—":
        extra.append(f"flag {flag}")
    if env and env != "—":
        extra.append(f"env {env}")
    live = "live" if f.name in LIVE_OPTIONS else "restart"
    out.append(comment(f"{f.name} ({live}; {', '.join(extra)}): {meaning}"))
    v = getattr(d, f.name)
    if f.name == "api_keys":
        out.append(
            '# api_keys = ["a-key-of-at-least-16-characters", { name = "backend", key = "…", role = "publish" }]'  # noqa: E501
        )
        out.append("api_keys = []")
    else:
        out.append(f"{f.name} = {toml(v)}")
    out.append("")

out.append(
    comment(
        "Namespaces: the rules for channels <namespace>:<rest>. A namespace listed here starts from the shipped one of the same name (chat, user) and overrides what it lists; any other name starts from the defaults below. Namespaces are live: a reload applies their rules to existing subscriptions too (a subscription the new rules refuse ends with an unsubscribe push, code permission_denied)."  # noqa: E501
    )
)
out.append("")


def ns_block(header: str, ns: Namespace | None, intro: str) -> None:
    assert ns is not None
    out.append(comment(intro))
    out.append(header)
    for f in fields(Namespace):
        if f.name == "name":
            continue
        meaning = clean(nsr[f.name][-1])
        out.append(comment(f"{f.name}: {meaning}"))
        v = getattr(ns, f.name)
        if v is None:
            out.append(f"# {f.name} = {d.max_message_size}  (unset: the global max_message_size)")
        else:
            out.append(f"{f.name} = {toml(v)}")
    out.append("")


ns_block(
    "[namespaces.chat]",
    d.namespaces["chat"],
    "The shipped chat namespace: the chat page, /chatsocket and anonymous clients.",
)
out.append(
    comment(
        "The shipped user namespace: personal channels user:<id>, read by that user only; the backend publishes."  # noqa: E501
    )
)
out.append("[namespaces.user]")
for f in fields(Namespace):
    if f.name == "name":
        continue
    v = getattr(d.namespaces["user"], f.name)
    if v is None:
        out.append(f"# {f.name} = {d.max_message_size}")
    else:
        out.append(f"{f.name} = {toml(v)}")
out.append("")
ns_block(
    "[default_namespace]",
    d.default_namespace,
    "Rules for channels whose namespace is not listed (and names without a namespace). To refuse them (unknown_namespace), replace this table with: default_namespace = false",  # noqa: E501
)
(ROOT / "src" / "tidings" / "example.toml").write_text("\n".join(out).rstrip() + "\n")
