"""Prometheus metrics: ``GET /metrics`` (behind a ``read`` or ``admin`` API key), or the same without a key
on ``metrics_host``/``metrics_port`` when configured. docs/operations.md lists every metric.

Counting costs the fan-out nothing it would notice: the hot paths bump plain ints on one
:class:`Counters` object (``Node.counters``), and on the connection objects themselves (bytes and
messages in and out), and :class:`NodeCollector` reads them, and the node's state (connections by
transport, subscriptions, channels), only when Prometheus scrapes. No ``prometheus_client`` object is
touched per delivery, per publish or per message. The histograms are plain-int buckets too
(:class:`Buckets`).

With ``--workers N`` every worker has its own counters; each sample carries a ``worker`` label
(``1``..``N``), and whichever worker a scrape lands on answers for all of them: it asks its siblings
over a local socket of each (abstract Unix sockets named after the supervisor's pid; only processes of
the same user may ask, checked with ``SO_PEERCRED``) and merges their families into its answer.
``tidings_worker_up{worker}`` says which workers answered. Why not ``prometheus_client``'s multiprocess
mode: it needs every value in a shared mmap file, updated through its own objects on every increment
(the cost this module avoids), cannot collect process metrics, and leaves files of dead workers behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import sys
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .node import Node

__all__ = [
    "CONTENT_TYPE",
    "DURATION_BUCKETS",
    "Buckets",
    "Counters",
    "NodeCollector",
    "metrics_listeners",
    "metrics_text",
]

log = logging.getLogger("tidings.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: publish (request to acknowledgement) and broker operations, 0.1 ms to 10 s.
DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
SIBLING_TIMEOUT = 2.0  # seconds a worker waits for a sibling's metrics before it reports it down
MAX_SIBLING_BYTES = 8 << 20  # a sibling's answer larger than this is refused (it is ~20 KiB)


class Buckets:
    """A histogram in plain ints: ``observe`` is one bisect and two adds."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, float(total)))
        return out


_TCP_INFO_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in Linux's struct tcp_info (since 4.1)
_UNPACK_U64 = struct.Struct("=Q").unpack_from


class _TcpInfo:
    """``getsockopt(fd, IPPROTO_TCP, TCP_INFO)`` into one reused buffer through libc: 1.3 µs a call,
    where the event loop's socket wrapper (uvloop's ``PseudoSocket.getsockopt`` builds and detaches a
    ``socket.socket`` each time) takes 2.3 µs and a new bytes object. A scrape makes one call per open
    connection, so this is most of what a scrape costs with many connections. Event-loop thread only
    (the buffer is shared)."""

    def __init__(self) -> None:
        self.call: Callable[..., int] | None = None
        if sys.platform != "linux" or not hasattr(socket, "TCP_INFO"):
            return
        try:
            import ctypes

            self.call = ctypes.CDLL(None, use_errno=True).getsockopt
        except (OSError, AttributeError, ImportError):
            return
        self.buf = ctypes.create_string_buffer(_TCP_INFO_BYTES_ACKED + 8)
        self.len = ctypes.c_uint32(0)
        self.args = (socket.IPPROTO_TCP, socket.TCP_INFO, ctypes.byref(self.buf), ctypes.byref(self.len))

    def bytes_acked(self, fd: int) -> int:
        if self.call is None or fd < 0:
            return 0
        self.len.value = _TCP_INFO_BYTES_ACKED + 8
        if self.call(fd, *self.args) != 0 or self.len.value < _TCP_INFO_BYTES_ACKED + 8:
            return 0  # not a TCP socket (a Unix socket behind a proxy), or already closed
        acked: int = _UNPACK_U64(self.buf, _TCP_INFO_BYTES_ACKED)[0]
        return acked


_TCP_INFO = _TcpInfo()


def tcp_bytes_sent(transport: object) -> int:
    """Bytes the peer acknowledged on a TCP connection, from the kernel (``TCP_INFO``
    ``tcpi_bytes_acked``: what a WebSocket or stream connection was sent, the handshake answer included,
    plus 1 for the SYN), counted without a Python operation per delivery (fan-out must not pay for
    metrics). 0 where it cannot be read (not Linux, not TCP, socket already gone)."""
    get = getattr(transport, "get_extra_info", None)
    sock = get("socket") if get is not None else None
    if sock is None:
        return 0
    try:
        fd = sock.fileno()
    except (OSError, ValueError):
        return 0
    return _TCP_INFO.bytes_acked(fd)


class Counters:
    """Everything the node counts, in plain ints, in one place (``Node.counters``): what
    :class:`NodeCollector` exposes, and what other readers (``/api/stats``) may read the same way.

    Nothing here is touched per delivery: ``deliveries`` is added once per publication (``Hub.deliver``).
    The bytes an open connection received stay on it (``BufferedConnection.bytes_in``) and the bytes it
    was sent are the kernel's (:func:`tcp_bytes_sent`); both are added in at scrape time and move here
    when it ends (:meth:`connection_ended`)."""

    __slots__ = (
        "broker_seconds",
        "bytes_received",
        "bytes_sent",
        "deliveries",
        "disconnects",
        "errors",
        "live_bytes_received",
        "live_bytes_sent",
        "publications",
        "publish_seconds",
        "rate_limited",
        "received_reported",
        "retained",
        "sent_reported",
        "slow_consumer_closes",
    )

    def __init__(self) -> None:
        self.publications: dict[tuple[str, str], int] = {}  # (namespace, source) -> acknowledged
        self.deliveries = 0  # publications handed to live local subscribers (Hub.deliver)
        self.publish_seconds = Buckets()  # from the request to its acknowledgement (commit included)
        self.broker_seconds: dict[str, Buckets] = {}  # operation (publish, history, ping) -> durations
        self.slow_consumer_closes = 0
        self.disconnects: dict[str, int] = {}  # close code ("none": an HTTP stream the client left)
        self.errors: dict[str, int] = {}  # error code of error replies and JSON error responses
        self.rate_limited = 0  # commands and requests refused by a rate limit
        self.bytes_sent = 0  # of ended connections, and HTTP response bodies
        self.bytes_received = 0  # of ended connections, and HTTP request bodies
        # Of open connections, read before each scrape (read_live_bytes), and the last totals answered.
        self.live_bytes_sent = self.live_bytes_received = 0
        self.sent_reported = self.received_reported = 0
        self.retained: int | None = None  # history publications retained, read before each scrape

    def reported_bytes(self) -> tuple[int, int]:
        """``tidings_bytes_sent_total`` and ``_received_total``: ended connections, HTTP bodies and the
        open connections as last read. A connection that ends after its read is briefly counted twice
        (its read and its final figure); each answer holds at the highest value given so far, so a
        scrape never sees a counter go down (which Prometheus would take for a restart)."""
        self.sent_reported = max(self.sent_reported, self.bytes_sent + self.live_bytes_sent)
        self.received_reported = max(self.received_reported, self.bytes_received + self.live_bytes_received)
        return self.sent_reported, self.received_reported

    def published(self, namespace: str, source: str, n: int = 1) -> None:
        key = (namespace, source)
        self.publications[key] = self.publications.get(key, 0) + n

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def broker_op(self, op: str, seconds: float) -> None:
        b = self.broker_seconds.get(op)
        if b is None:
            b = self.broker_seconds[op] = Buckets()
        b.observe(seconds)

    def connection_ended(self, code: int | None, bytes_in: int, bytes_out: int) -> None:
        label = "none" if code is None else str(code)
        self.disconnects[label] = self.disconnects.get(label, 0) + 1
        self.bytes_received += bytes_in
        self.bytes_sent += bytes_out


class NodeCollector(Collector):
    """Reads a node's :class:`Counters` and state at scrape time. ``labels`` go on every sample
    (``worker`` with ``--workers``)."""

    def __init__(self, node: Node, labels: dict[str, str] | None = None) -> None:
        self.node = node
        self.labels = labels or {}

    def collect(self) -> Iterator[Metric]:
        node, c = self.node, self.node.counters
        extra = list(self.labels)
        vals = list(self.labels.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=extra)
            g.add_metric(vals, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            m = CounterMetricFamily(name, doc, labels=extra)
            m.add_metric(vals, value)
            return m

        by_transport = node.connections.by_kind  # kept as they come and go: nothing to walk here
        g = GaugeMetricFamily(
            "tidings_connections", "Open client connections by transport", labels=["transport", *extra]
        )
        for kind in sorted({"ws", "chatsocket", "echo", "sse", "stream", "poll", *by_transport}):
            g.add_metric([kind, *vals], by_transport.get(kind, 0))
        yield g
        channels = node.hub.channels()
        yield gauge(
            "tidings_subscriptions",
            "Subscriptions on this node (live and catching up)",
            sum(channels.values()),
        )
        yield gauge("tidings_channels", "Channels with at least one subscriber on this node", len(channels))
        if c.retained is not None:
            yield gauge(
                "tidings_history_publications", "Publications retained in history (the broker's)", c.retained
            )

        m = CounterMetricFamily(
            "tidings_publications",
            "Publications acknowledged, by namespace and source (http, ws, chatsocket, page)",
            labels=["namespace", "source", *extra],
        )
        for (ns, source), n in sorted(c.publications.items()):
            m.add_metric([ns, source, *vals], n)
        yield m
        yield counter("tidings_deliveries", "Publications handed to live local subscribers", c.deliveries)
        yield self._histogram(
            "tidings_publish_duration_seconds",
            "From a publish request to its acknowledgement (the broker's commit included)",
            c.publish_seconds,
        )
        h = HistogramMetricFamily(
            "tidings_broker_operation_duration_seconds",
            "Broker operations (publish: a group commit; history; ping) by operation",
            labels=["operation", *extra],
        )
        for op, b in sorted(c.broker_seconds.items()):
            h.add_metric([op, *vals], b.cumulative(), b.sum)
        yield h
        yield counter(
            "tidings_slow_consumer_closes",
            "Connections cut off because they did not read (4008)",
            c.slow_consumer_closes,
        )
        m = CounterMetricFamily(
            "tidings_disconnects",
            "Connections ended, by close code (none: the client left a stream)",
            labels=["code", *extra],
        )
        for code, n in sorted(c.disconnects.items()):
            m.add_metric([code, *vals], n)
        yield m
        m = CounterMetricFamily(
            "tidings_errors",
            "Error replies (/ws) and JSON error responses (HTTP), by error code",
            labels=["code", *extra],
        )
        for code, n in sorted(c.errors.items()):
            m.add_metric([code, *vals], n)
        yield m
        yield counter("tidings_rate_limited", "Commands and requests refused by a rate limit", c.rate_limited)
        sent, received = c.reported_bytes()
        yield counter(
            "tidings_bytes_sent",
            "Bytes written to client connections and HTTP response bodies",
            sent,
        )
        yield counter(
            "tidings_bytes_received",
            "Bytes read from client connections and HTTP request bodies",
            received,
        )

    def _histogram(self, name: str, doc: str, b: Buckets) -> HistogramMetricFamily:
        h = HistogramMetricFamily(name, doc, labels=list(self.labels))
        h.add_metric(list(self.labels.values()), b.cumulative(), b.sum)
        return h


class _Labelled(Collector):
    """Another collector's families with ``labels`` added to every sample (process metrics per worker)."""

    def __init__(self, inner: Collector, labels: dict[str, str]) -> None:
        self.inner = inner
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        for fam in self.inner.collect():
            fam.samples = [s._replace(labels={**s.labels, **self.labels}) for s in fam.samples]
            yield fam


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def registry_for(node: Node, labels: dict[str, str] | None = None) -> CollectorRegistry:
    """The node's registry: its own collector and the process, platform and GC collectors."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(NodeCollector(node, labels))
    for std in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        reg.register(_Labelled(std, labels) if labels else std)
    return reg


LIVE_BYTES_SLICE = 500  # connections whose TCP_INFO is read between two turns of the event loop


async def read_live_bytes(node: Node) -> None:
    """What the open connections were sent (from the kernel: one ``TCP_INFO`` per connection, about
    3 µs in the kernel, 30 ms for 10,000 connections: docs/performance.md#metrics) and received, into
    the node's counters. The walk lets the event loop run between slices of ``LIVE_BYTES_SLICE``
    connections instead of holding every client up for the whole of it."""
    total = total_in = 0
    live = node.connections
    conns = list(live)
    for start in range(0, len(conns), LIVE_BYTES_SLICE):
        if start:
            await asyncio.sleep(0)
        for conn in conns[start : start + LIVE_BYTES_SLICE]:
            if conn in live:  # not one that ended while the loop ran
                total_in += getattr(conn, "bytes_in", 0)
                total += tcp_bytes_sent(getattr(conn, "transport", None))
    node.counters.live_bytes_sent, node.counters.live_bytes_received = total, total_in


async def _refresh(node: Node) -> None:
    """The figures read once per scrape that take time: what the open connections were sent (in
    slices), and those that need the broker (retained history)."""
    await read_live_bytes(node)
    count = getattr(node.broker, "retained", None)
    if count is None:
        return
    try:
        async with asyncio.timeout(SIBLING_TIMEOUT):
            node.counters.retained = await count()
    except Exception as exc:  # a broker that cannot count now: the metric keeps its last value
        log.debug("retained history count failed: %s", exc)


def _worker_labels(node: Node) -> dict[str, str]:
    w = node.worker
    return {"worker": str(w.index)} if w is not None and w.count > 1 else {}


async def own_text(node: Node) -> bytes:
    await _refresh(node)
    return generate_latest(registry_for(node, _worker_labels(node)))


async def metrics_text(node: Node) -> bytes:
    """The exposition a scrape gets: this process's metrics, and with ``--workers`` every sibling's."""
    w = node.worker
    if w is None or w.count <= 1:
        return await own_text(node)
    own = (await own_text(node)).decode()
    others = [i for i in range(1, w.count + 1) if i != w.index]
    texts = await asyncio.gather(*(_sibling(w.supervisor, i) for i in others))
    merged: dict[str, Metric] = {}
    up = GaugeMetricFamily(
        "tidings_worker_up", "1 when this worker's metrics are in this answer", labels=["worker"]
    )
    up.add_metric([str(w.index)], 1)
    for i, text in [(w.index, own), *zip(others, texts, strict=True)]:
        if i != w.index:
            up.add_metric([str(i)], 0 if text is None else 1)
        if text is None:
            continue
        for fam in text_string_to_metric_families(text):
            have = merged.get(fam.name)
            if have is None:
                merged[fam.name] = fam
            else:
                have.samples.extend(fam.samples)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Families([*merged.values(), up]))
    return generate_latest(reg)


# ---------------------------------------------------------------------------------------------- workers


def _sibling_address(supervisor: int, index: int) -> str:
    return f"\0tidings-metrics-{supervisor}-{index}"  # abstract: no file, no stale socket


async def _sibling(supervisor: int, index: int) -> str | None:
    """A sibling worker's own metrics (``GET /metrics/self`` on its socket), or None (logged)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(SIBLING_TIMEOUT):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, _sibling_address(supervisor, index))
            except BaseException:
                sock.close()
                raise
            reader, writer = await asyncio.open_unix_connection(sock=sock)
            writer.write(b"GET /metrics/self HTTP/1.0\r\nHost: worker\r\n\r\n")
            raw = await reader.read(MAX_SIBLING_BYTES + 1)
            while len(raw) <= MAX_SIBLING_BYTES:
                more = await reader.read(MAX_SIBLING_BYTES + 1 - len(raw))
                if not more:
                    break
                raw += more
        head, _, body = raw.partition(b"\r\n\r\n")
        if len(raw) > MAX_SIBLING_BYTES or not head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
            log.info("worker %d: no metrics: %r", index, head[:40])
            return None
        return body.decode()
    except (OSError, TimeoutError, UnicodeDecodeError) as exc:
        log.info("worker %d: no metrics: %s", index, exc or type(exc).__name__)
        return None
    finally:
        if writer is not None:
            writer.close()


def _same_user(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return False
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.getuid())


# ---------------------------------------------------------------------------------------------- serving


async def metrics_response(node: Node) -> web.Response:
    return web.Response(body=await metrics_text(node), headers={"Content-Type": CONTENT_TYPE})


async def metrics_listeners(app: web.Application) -> AsyncIterator[None]:
    """The app's extra listeners (an ``aiohttp`` cleanup context): ``metrics_host:metrics_port`` (no key)
    when configured, and with ``--workers`` this worker's socket for its siblings."""
    from .node import NODE

    node = app[NODE]
    settings = node.settings
    runners: list[web.AppRunner] = []

    async def public(request: web.Request) -> web.Response:
        return await metrics_response(node)

    async def self_only(request: web.Request) -> web.Response:
        if not _same_user(request):
            raise web.HTTPForbidden(text="another user\n")
        return web.Response(body=await own_text(node), headers={"Content-Type": CONTENT_TYPE})

    try:
        if settings.metrics and settings.metrics_port:
            mapp = web.Application()
            mapp.router.add_get("/metrics", public)
            runner = web.AppRunner(mapp, access_log=None)
            await runner.setup()
            runners.append(runner)
            multi = node.worker is not None and node.worker.count > 1
            await web.TCPSite(runner, settings.metrics_host, settings.metrics_port, reuse_port=multi).start()
            log.info("metrics on http://%s:%d/metrics (no key)", settings.metrics_host, settings.metrics_port)
        w = node.worker
        if settings.metrics and w is not None and w.count > 1 and sys.platform == "linux":
            sapp = web.Application()
            sapp.router.add_get("/metrics/self", self_only)
            runner = web.AppRunner(sapp, access_log=None)
            await runner.setup()
            runners.append(runner)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(_sibling_address(w.supervisor, w.index))
            await web.SockSite(runner, sock).start()
        yield
    finally:
        for runner in reversed(runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
