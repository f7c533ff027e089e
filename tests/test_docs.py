"""The protocol and HTTP API docs stay in step with the code.

(a) every ErrorCode and CloseCode appears in docs/protocol.md (and the HTTP errors in docs/http-api.md);
(b) src/tidings/openapi.json is a valid OpenAPI 3.1 document whose paths are exactly the app's /api and
    /healthz routes; (c) real responses of a running server validate against its response schemas.
"""

from __future__ import annotations

import asyncio
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from openapi_spec_validator import validate as validate_spec
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tidings.app import create_app
from tidings.config import ApiKey, Namespace
from tidings.protocol import HTTP_STATUS, CloseCode, ErrorCode

from .conftest import ProbeFactory, Server, ServerFactory, api_headers, make_settings

DOCS = Path(__file__).resolve().parent.parent / "docs"
SPEC_URI = "urn:tidings:openapi"
READ_KEY = "reader-key-0123456789"
PUB_KEY = "pusher-key-0123456789"
SUBSCRIBE_PATHS = {"/sse", "/stream", "/poll"}
HTTP_ROUTES = {
    "/healthz",
    "/readyz",
    "/metrics",
    *SUBSCRIBE_PATHS,
}  # the routes outside /api/ that openapi.json lists
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    text = resources.files("tidings").joinpath("openapi.json").read_text(encoding="utf-8")
    doc: dict[str, Any] = json.loads(text)
    return doc


def _section(text: str, heading: str) -> str:
    """The text under a markdown heading, up to the next heading of the same or a higher level."""
    m = re.search(rf"^(#+) {re.escape(heading)}\s*$", text, re.M)
    assert m, f"no heading {heading!r}"
    level = len(m.group(1))
    rest = text[m.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


# ---------------------------------------------------------------------------------------------- (a) codes


def test_every_error_code_is_in_protocol_md() -> None:
    text = (DOCS / "protocol.md").read_text()
    section = _section(text, "Error codes")
    for code in ErrorCode:
        row = re.search(rf"^\|\s*`{code.value}`\s*\|(.*)$", section, re.M)
        assert row, f"error code {code.value!r} has no row in the 'Error codes' table of docs/protocol.md"
        # The row gives the HTTP status the API uses for the same code.
        assert str(HTTP_STATUS[code]) in row.group(1), (
            f"{code.value}: HTTP {HTTP_STATUS[code]} not in its row"
        )


def test_every_close_code_is_in_protocol_md() -> None:
    text = (DOCS / "protocol.md").read_text()
    section = _section(text, "Close codes")
    for code in CloseCode:
        row = re.search(rf"^\|\s*`?{code.value}`?\s*\|(.*)$", section, re.M)
        assert row, f"close code {code.value} has no row in the 'Close codes' table of docs/protocol.md"
        cells = [c.strip().lower() for c in row.group(1).split("|")]
        want = "yes" if code.reconnect else "no"
        assert want in cells, f"close code {code.value}: the reconnect column must say {want!r}: {cells}"


def test_http_api_md_lists_every_route_and_error(spec: dict[str, Any]) -> None:
    text = (DOCS / "http-api.md").read_text()
    for path, item in spec["paths"].items():
        for method in item.keys() & HTTP_METHODS:
            assert f"{method.upper()} {path}" in text, (
                f"{method.upper()} {path} missing from docs/http-api.md"
            )
    for code in ErrorCode:
        assert f"`{code.value}`" in text, f"error code {code.value!r} missing from docs/http-api.md"


# ---------------------------------------------------------------------------------------------- (b) OpenAPI


def test_openapi_is_valid(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1")
    validate_spec(spec)


def test_openapi_error_codes_match(spec: dict[str, Any]) -> None:
    assert spec["components"]["schemas"]["ErrorCode"]["enum"] == [c.value for c in ErrorCode]


def _app_routes(tmp_path: Path) -> set[tuple[str, str]]:
    app = create_app(make_settings(tmp_path))
    out: set[tuple[str, str]] = set()
    for route in app.router.routes():
        if route.resource is None or route.method == "HEAD":  # aiohttp adds HEAD to every GET
            continue
        path = route.resource.canonical
        if path.startswith(("/api/", "/push/")) or path in HTTP_ROUTES:
            out.add((route.method.lower(), path))
    return out


def test_openapi_paths_match_app_routes(spec: dict[str, Any], tmp_path: Path) -> None:
    documented = {(m, p) for p, item in spec["paths"].items() for m in item.keys() & HTTP_METHODS}
    routes = _app_routes(tmp_path)
    assert routes, "no /api routes found"
    assert routes - documented == set(), "routes missing from openapi.json"
    assert documented - routes == set(), "openapi.json documents routes the app does not have"


# ---------------------------------------------------------------------------------------------- (c) responses


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


class ResponseChecker:
    """Validates (method, path template, status, body) against openapi.json's response schemas."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.registry: Registry = Registry().with_resource(
            SPEC_URI, Resource.from_contents(spec, default_specification=DRAFT202012)
        )
        self.seen: set[tuple[str, str, str]] = set()

    def _response(self, method: str, path: str, status: int) -> tuple[str, dict[str, Any]]:
        item = self.spec["paths"][path]
        if method not in item:
            # A method the route does not have: 405, described once in components.responses.
            assert status == 405, f"{method.upper()} {path} answered {status}"
            return "/components/responses/MethodNotAllowed", self.spec["components"]["responses"][
                "MethodNotAllowed"
            ]
        responses = item[method]["responses"]
        key = str(status)
        assert key in responses, (
            f"{method.upper()} {path} answered {status}, which openapi.json does not document"
        )
        pointer = f"/paths/{_escape(path)}/{method}/responses/{key}"
        resp = responses[key]
        while "$ref" in resp:
            ref = resp["$ref"]
            assert ref.startswith("#/")
            pointer = ref[1:]
            resp = self.spec
            for part in ref[2:].split("/"):
                resp = resp[part.replace("~1", "/").replace("~0", "~")]
        return pointer, resp

    def check(self, method: str, path: str, status: int, content_type: str, body: Any) -> None:
        pointer, resp = self._response(method, path, status)
        assert content_type in resp["content"], (method, path, status, content_type)
        schema_ptr = f"{pointer}/content/{_escape(content_type)}/schema"
        validator = jsonschema.Draft202012Validator(
            {"$ref": f"{SPEC_URI}#{schema_ptr}"}, registry=self.registry, format_checker=None
        )
        errors = sorted(validator.iter_errors(body), key=str)
        assert not errors, f"{method.upper()} {path} {status}: {errors[0].message}\n{body}"
        self.seen.add((method, path, str(status)))


async def _call(
    session: aiohttp.ClientSession,
    srv: Server,
    checker: ResponseChecker,
    method: str,
    template: str,
    url: str,
    *,
    json_body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    expect: int,
) -> Any:
    hdrs = api_headers() if headers is None else headers
    async with asyncio.timeout(10):
        async with session.request(
            method.upper(),
            srv.http + url,
            json=json_body if raw is None else None,
            data=raw,
            headers=hdrs,
        ) as r:
            body = await r.json(content_type=None)
            assert r.status == expect, (method, url, r.status, body)
            checker.check(method, template, r.status, r.content_type, body)
            if r.status == 429:
                assert int(r.headers["Retry-After"]) >= 1
            return body


async def test_real_responses_match_openapi(
    spec: dict[str, Any],
    start_server: ServerFactory,
    probe: ProbeFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    settings = make_settings(
        tmp_path,
        default_namespace=None,
        max_http_body=8192,
        max_message_size=2048,
        api_failures_per_minute=8,
        namespaces={"quiet": Namespace("quiet", presence=False)},
    )
    settings.api_keys = [
        *settings.api_keys,
        ApiKey("reader", READ_KEY, "read"),
        ApiKey("pusher", PUB_KEY, "publish"),
    ]
    srv = await start_server(settings=settings)
    chk = ResponseChecker(spec)
    pub, bc, batch, hist, pres, chans, health = (
        "/api/publish",
        "/api/broadcast",
        "/api/batch",
        "/api/channels/{channel}/history",
        "/api/channels/{channel}/presence",
        "/api/channels",
        "/healthz",
    )

    async def call(method: str, template: str, url: str, expect: int, **kw: Any) -> Any:
        return await _call(session, srv, chk, method, template, url, expect=expect, **kw)

    sub = await probe(srv)
    await sub.ok("subscribe", channel="chat:lobby")

    # Successes, including a publication with info and a channel with a "/".
    await call("post", pub, pub, 200, json_body={"channel": "chat:lobby", "data": {"text": "hi"}})
    await call("post", pub, pub, 200, json_body={"channel": "pub:a/b", "data": None, "info": {"user": "bot"}})
    await call("post", bc, bc, 200, json_body={"channels": ["chat:lobby", "pub:x"], "data": [1, 2]})
    await call("post", bc, bc, 200, json_body={"channels": ["pub:x", "bad name", 5, "nowhere:x"], "data": 1})
    h = await call("get", hist, "/api/channels/chat:lobby/history", 200)
    assert [p["offset"] for p in h["publications"]] == [1, 2]
    body = await call(
        "post",
        batch,
        batch,
        200,
        json_body={"publications": [{"channel": "pub:b", "data": 1}, {"channel": "bad name", "data": 2}]},
    )
    assert body["results"][0]["offset"] == 1 and body["results"][1]["error"]["code"] == "invalid_channel"
    h = await call("get", hist, "/api/channels/pub:a/b/history?limit=1", 200)
    assert h["publications"][0]["info"] == {"user": "bot"}
    h = await call("get", hist, f"/api/channels/chat:lobby/history?since=1&epoch={h['epoch']}", 200)
    h = await call("get", hist, "/api/channels/chat:lobby/history?since=1", 200)
    assert h["recovered"] is True and len(h["publications"]) == 1
    await call("get", hist, "/api/channels/chat:lobby/history?since=0&epoch=stale", 200)
    await call("get", hist, "/api/channels/pub:empty/history", 200)
    body = await call("get", pres, "/api/channels/chat:lobby/presence", 200)
    assert body["count"] == 1 and body["clients"][0]["user"] == ""
    await call("get", pres, "/api/channels/pub:nobody/presence", 200)
    body = await call("get", chans, chans, 200, headers=api_headers(READ_KEY))
    assert body["channels"] == [{"channel": "chat:lobby", "subscribers": 1}]
    await call("post", pub, pub, 200, json_body={"channel": "pub:x", "data": 1}, headers=api_headers(PUB_KEY))
    body = await call("get", health, health, 200, headers={})
    assert await call("get", "/readyz", "/readyz", 200, headers={}) == {"status": "ready"}
    await call("get", "/metrics", "/metrics", 403, headers=api_headers(PUB_KEY))
    assert body["connections"] == 1

    # Errors.
    await call("post", pub, pub, 400, raw=b"{nope")
    await call("post", pub, pub, 400, json_body={"channel": "pub:x"})
    await call("post", pub, pub, 400, json_body={"channel": "bad name", "data": 1})
    await call("post", pub, pub, 401, json_body={"channel": "pub:x", "data": 1}, headers={})
    await call("post", pub, pub, 401, json_body={"channel": "pub:x", "data": 1}, headers=api_headers("nope"))
    await call("post", pub, pub, 404, json_body={"channel": "nowhere:x", "data": 1})
    await call("get", pub, pub, 405)
    await call("post", pub, pub, 413, json_body={"channel": "pub:x", "data": "a" * 4000})
    await call("post", pub, pub, 413, raw=b'{"data": "' + b"a" * 9000 + b'"}')
    await call("post", bc, bc, 400, json_body={"channels": [], "data": 1})
    await call("post", bc, bc, 400, raw=b"[]")
    await call("post", bc, bc, 401, json_body={"channels": ["pub:x"], "data": 1}, headers={})
    await call("get", bc, bc, 405)
    await call("post", batch, batch, 400, json_body={"publications": [{"channel": "pub:x"}]})
    await call("post", batch, batch, 401, json_body={"publications": []}, headers={})
    await call(
        "post",
        batch,
        batch,
        413,
        raw=b'{"publications": [{"channel": "pub:x", "data": "' + b"a" * 9000 + b'"}]}',
    )
    await call("post", bc, bc, 413, raw=b'{"channels": ["pub:x"], "data": "' + b"a" * 9000 + b'"}')
    await call("get", hist, "/api/channels/pub:x/history?limit=0", 400)
    await call("get", hist, "/api/channels/pub:x/history?epoch=e", 400)
    await call("get", hist, "/api/channels/two%20words/history", 400)
    await call("get", hist, "/api/channels/pub:x/history", 401, headers={"Authorization": "Basic x"})
    await call("get", hist, "/api/channels/nowhere:x/history", 404)
    await call("post", hist, "/api/channels/pub:x/history", 405)
    await call("get", pres, "/api/channels/bad%20name/presence", 400)
    await call("get", pres, "/api/channels/pub:x/presence", 401, headers={})
    await call("get", pres, "/api/channels/nowhere:x/presence", 404)
    await call("get", pres, "/api/channels/quiet:x/presence", 404)
    await call("get", chans, chans, 401, headers={})
    await call("delete", chans, chans, 405)
    # Roles: a read key may not publish, a publish key may not read.
    await call(
        "post", pub, pub, 403, json_body={"channel": "pub:x", "data": 1}, headers=api_headers(READ_KEY)
    )
    await call(
        "post", bc, bc, 403, json_body={"channels": ["pub:x"], "data": 1}, headers=api_headers(READ_KEY)
    )
    await call(
        "post",
        batch,
        batch,
        403,
        json_body={"publications": [{"channel": "pub:x", "data": 1}]},
        headers=api_headers(READ_KEY),
    )
    await call("get", hist, "/api/channels/pub:x/history", 403, headers=api_headers(PUB_KEY))
    await call("get", pres, "/api/channels/pub:x/presence", 403, headers=api_headers(PUB_KEY))
    await call("get", chans, chans, 403, headers=api_headers(PUB_KEY))
    # Last: after api_failures_per_minute bad keys the address gets 429 everywhere, even with a good key.
    for _ in range(8):
        async with session.get(srv.http + chans, headers=api_headers("wrong-key-0000000000")) as r:
            assert r.status in (401, 429)
    for method, template, url in [
        ("post", pub, pub),
        ("post", bc, bc),
        ("post", batch, batch),
        ("get", hist, "/api/channels/pub:x/history"),
        ("get", pres, "/api/channels/pub:x/presence"),
        ("get", chans, chans),
    ]:
        await call(
            method,
            template,
            url,
            429,
            json_body={"channels": ["pub:x"], "channel": "pub:x", "data": 1, "publications": []},
        )
    await call("get", health, health, 200, headers={})

    # Every documented response except 503 (needs a failing backend) was produced and validated.
    documented: set[tuple[str, str, str]] = set()
    for path, item in spec["paths"].items():
        for method in item.keys() & HTTP_METHODS:
            documented |= {(method, path, status) for status in item[method]["responses"]}
    # (/sse, /stream, /poll: tests/test_sse.py::test_responses_match_openapi; the push routes:
    # tests/test_push.py::test_push_responses_match_openapi; /api/stats:
    # tests/test_stats.py::test_stats_responses_match_openapi; /metrics: tests/test_metrics.py, which
    # validates its 200, 401, 403 and 429 with this ResponseChecker)
    untested = {
        d
        for d in documented - chk.seen
        if d[2] != "503"
        and d[1] not in SUBSCRIBE_PATHS
        and "/push" not in d[1]
        and d[1] not in ("/metrics", "/api/stats")
    }
    assert not untested, f"documented responses never exercised: {sorted(untested)}"
