"""Logging: the server's handler (``text`` as before, or ``json``: one object per line), the access line
of each HTTP request, the line of each WebSocket session's end, and the redaction every line goes
through so that no token, API key or ``Authorization`` value is ever written.

``tidings.access`` (one line per HTTP request) and ``tidings.session`` (one per WebSocket session, for
every transport: ``wsbase.WsProtocol.connection_lost``) are emitted with ``log_format = "json"``; in text
format they are off (their loggers are set to WARNING), so the text output stays what it was: a line
per request is for machines, and costs a formatted line per publish.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from .limits import client_ip
from .node import NODE

__all__ = [
    "ACCESS",
    "LOG_FORMATS",
    "SESSION",
    "JsonFormatter",
    "Redactor",
    "access_log",
    "redact",
    "session_ended",
    "setup_logging",
]

LOG_FORMATS = ("text", "json")
ACCESS = logging.getLogger("tidings.access")
SESSION = logging.getLogger("tidings.session")
REDACTED = "[redacted]"

# Values that are secrets wherever they appear: ?token=…/&api_key=… in a URL or a form, an Authorization
# or X-Api-Key header value, a Bearer credential, and anything shaped like a JWT.
_SECRET_PARAMS = r"sub_token|token|access_token|api_key|apikey|key|secret|password|auth|authorization"
_PATTERNS = [
    (re.compile(rf"(?i)([?&;]|\b)({_SECRET_PARAMS})=([^&\s\"'<>;]+)"), rf"\1\2={REDACTED}"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), rf"\1 {REDACTED}"),
    (
        re.compile(r"(?i)(authorization|x-api-key)(['\"]?\s*[:=]\s*['\"]?)(?!(?:bearer|basic)\s)[^'\"\s,}]+"),
        rf"\1\2{REDACTED}",
    ),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), REDACTED),
]
# The attributes every LogRecord has; anything else on a record came from ``extra=`` and is a field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class Redactor:
    """Replaces the configured secrets (API keys, the token secret) and every secret-shaped value."""

    def __init__(self) -> None:
        self._literals: list[str] = []

    def add(self, values: Iterable[str]) -> None:
        for v in values:
            if v and len(v) >= 8 and v not in self._literals:
                self._literals.append(v)
        self._literals.sort(key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for lit in self._literals:
            if lit in text:
                text = text.replace(lit, REDACTED)
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        return text


redact = Redactor()  # the process's one redactor: setup_logging and serve() add the secrets they know


class _RedactingFilter(logging.Filter):
    """On the handler: the message (arguments merged in), the traceback and every string field are
    redacted before any formatter sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD and isinstance(value, str):
                setattr(record, key, redact(value))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601, ms), ``level``, ``logger``, ``msg``, the
    record's ``extra`` fields, ``worker`` (with ``--workers``) and ``exc`` (a traceback, if any)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.worker is not None:
            out["worker"] = self.worker
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        return orjson.dumps(out, default=str).decode()


def setup_logging(
    level: str, fmt: str = "text", *, worker: int | None = None, secrets: Iterable[str] = ()
) -> None:
    """The server's logging (``tidings serve``): one stderr handler in ``fmt``, with redaction."""
    redact.add(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RedactingFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker))
        quiet = logging.NOTSET
    else:
        tag = f" [worker {worker}]" if worker is not None else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s"))
        quiet = logging.WARNING  # access and session lines are for the JSON format only
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    ACCESS.setLevel(quiet)
    SESSION.setLevel(quiet)


@web.middleware
async def access_log(request: web.Request, handler: Any) -> web.StreamResponse:
    """One ``tidings.access`` line per request: method, path (never the query string: it may hold
    ``?token=``), status, duration, the client's address after trusted-proxy resolution. A WebSocket
    upgrade logs 101 when the upgrade is done; its session's end is a ``tidings.session`` line. Also
    the metrics' HTTP figures: body bytes in and out, 429 answers (``tidings_rate_limited_total``)."""
    counters = request.app[NODE].counters
    counters.bytes_received += request.content_length or 0
    t0 = time.perf_counter()
    status = 500
    try:
        resp: web.StreamResponse = await handler(request)
        status = resp.status
        if isinstance(resp, web.Response) and isinstance(resp.body, bytes):
            counters.bytes_sent += len(resp.body)
        return resp
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        if status == 429:
            counters.rate_limited += 1
        if ACCESS.isEnabledFor(logging.INFO):
            ms = round((time.perf_counter() - t0) * 1000, 3)
            client = client_ip(request, request.app[NODE].trusted_proxies)
            path = request.rel_url.path
            ACCESS.info(
                "%s %s %d %.1f ms",
                request.method,
                path,
                status,
                ms,
                extra={"method": request.method, "path": path, "status": status, "ms": ms, "client": client},
            )


def session_ended(
    transport: str,
    client_id: str,
    client: str,
    user: str,
    close_code: int | None,
    started: float,
    messages_in: int,
    messages_out: int,
    exc: BaseException | None = None,
) -> None:
    """The one ``tidings.session`` line of a session's end, for every transport (``ws``, ``chatsocket``,
    ``echo``, ``sse``, ``stream``, ``poll``). ``started`` is a ``time.monotonic()``; ``close_code`` None
    means there was no close (1006 for a WebSocket; a stream the peer dropped, a poll answered)."""
    if not SESSION.isEnabledFor(logging.INFO):
        return
    secs = round(time.monotonic() - started, 3)
    SESSION.info(
        "%s session %s (%s) ended: %s, %.1f s, %d in, %d out",
        transport,
        client_id,
        client,
        close_code,
        secs,
        messages_in,
        messages_out,
        extra={
            "transport": transport,
            "client_id": client_id,
            "client": client,
            "user": user,
            "close_code": close_code,
            "duration_s": secs,
            "messages_in": messages_in,
            "messages_out": messages_out,
            "error": str(exc) if exc is not None else None,
        },
    )
