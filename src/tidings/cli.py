"""``tidings serve | publish | subscribe | history | presence | channels``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from . import __version__
from .auth import StorageError, ensure_api_key, read_api_key
from .backends import BROKERS, BrokerError, BrokerURLError, broker_from_url, display_url, is_shared_url
from .config import ApiKey, ConfigError, Settings, load_settings
from .protocol import StreamPosition
from .workers import EXIT_BROKER_UNAVAILABLE, WorkerInfo

if TYPE_CHECKING:
    from .client import HTTPClient
    from .node import Node

__all__ = ["main"]

log = logging.getLogger("tidings")


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# ---------------------------------------------------------------------------------------------- serve


async def serve(
    settings: Settings,
    sock: socket.socket | None = None,
    worker: WorkerInfo | None = None,
    load: Callable[[], Settings] | None = None,
    source: str = "",
) -> int:
    """Run one server process until SIGTERM/SIGINT: the whole server, or worker ``worker`` of a
    ``--workers`` supervisor (which binds ``settings.port`` with SO_REUSEPORT next to its siblings).
    ``load``: how the settings were loaded, run again on SIGHUP to reload them (from file ``source``)."""
    from dataclasses import replace

    from aiohttp import web

    from .app import create_app
    from .logs import redact
    from .node import NODE
    from .reload import Reloader, remove_pid_file, write_pid_file
    from .transports.server import fit_open_files, log_accept_errors, make_runner
    from .workers import notify_ready, watch_supervisor

    loaded = replace(settings)  # as loaded: what a reload compares the file with
    key_note = "API keys from configuration"
    if not settings.api_keys:
        key, path, created = ensure_api_key(settings.data_dir)
        settings.api_keys = [ApiKey("generated", key, "admin")]
        redact.add([key])  # never in a log line
        key_note = f"API key {'created in' if created else 'in'} {path.resolve()}"
    open_files = fit_open_files(settings)  # logged once the server started (a failed start says one line)
    log_accept_errors(asyncio.get_running_loop())
    app = create_app(settings)
    runner = make_runner(app, settings.header_timeout, access_log=None, shutdown_timeout=5)
    await runner.setup()
    if sock is not None:
        site: web.BaseSite = web.SockSite(runner, sock)
        host, port = sock.getsockname()[:2]
    else:
        site = web.TCPSite(
            runner,
            settings.host,
            settings.port,
            backlog=4096,
            reuse_address=True,
            reuse_port=worker is not None,  # one process alone binds the port exclusively
        )
        host, port = settings.host, settings.port
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if load is not None:
        loop.add_signal_handler(signal.SIGHUP, Reloader(app[NODE], load, loaded, source).reload)
    await site.start()
    pid_file = write_pid_file(settings.data_dir) if worker is None else None
    log.info("%s", open_files)
    if port == 0 and runner.addresses:
        host, port = runner.addresses[0][:2]
    watcher: asyncio.Task[None] | None = None
    if worker is not None:
        log.info(
            "worker %d/%d (pid %d) listening on http://%s:%s",
            worker.index,
            worker.count,
            os.getpid(),
            _url_host(host),
            port,
        )
        notify_ready(worker)
        # PR_SET_PDEATHSIG signals us when the supervisor dies; the poll covers where there is none.
        watcher = loop.create_task(watch_supervisor(worker, stop.set))
    else:
        log.info(
            "tidings %s listening on http://%s:%s (WebSocket /ws); history: %s; %s",
            __version__,
            _url_host(host),
            port,
            _history_note(settings),
            key_note,
        )
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    await _drain_delay(app[NODE], stop)
    log.info("shutting down")
    try:
        await runner.cleanup()
    finally:
        remove_pid_file(pid_file)
    return 0


async def _drain_delay(node: Node, stop: asyncio.Event) -> None:
    """After SIGTERM: ``/readyz`` answers 503 at once; with ``drain_delay`` the node keeps serving that
    long (so a load balancer takes it out of rotation first) unless a second signal comes."""
    node.draining = True
    delay = node.settings.drain_delay
    if delay > 0:
        log.info("draining: /readyz answers 503; connections close in %g s", delay)
        stop.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _history_note(settings: Settings) -> str:
    if settings.broker:
        return display_url(settings.broker_url)
    return f"{settings.broker_url} (data dir {settings.data_dir.resolve()})"


def _supervise(args: argparse.Namespace, settings: Settings) -> int:
    """``--workers N`` (N > 1): what happens once per deployment, then the supervisor."""
    from .workers import Supervisor, reserve_port

    n = settings.workers
    if args.fd is not None:
        print("tidings: --fd is one process only; leave out --workers", file=sys.stderr)
        return 2
    url = settings.broker_url
    if not is_shared_url(url):
        if urlsplit(url).scheme.lower() not in BROKERS:  # an unknown scheme: say which ones there are
            try:
                broker_from_url(url)
            except BrokerURLError as exc:
                print(f"tidings: configuration error: {exc}", file=sys.stderr)
                return 2
        print(
            f"tidings: --workers {n} needs a shared broker (redis://...); "
            "memory:// and sqlite:// are one process only",
            file=sys.stderr,
        )
        return 2
    from .app import broker_options

    try:  # the URL checked once, here (a broker object connects only when started)
        broker_from_url(url, broker_options(settings))
    except BrokerURLError as exc:
        print(f"tidings: configuration error: {exc}", file=sys.stderr)
        return 2
    except BrokerError as exc:
        print(f"tidings: cannot start: storage: {exc} (check data_dir and broker)", file=sys.stderr)
        return 1
    if not hasattr(socket, "SO_REUSEPORT"):  # pragma: no cover - Windows
        print("tidings: --workers needs SO_REUSEPORT, which this platform does not have", file=sys.stderr)
        return 2
    key_note = "API keys from configuration"
    if not settings.api_keys:  # created here, once, before any worker reads it
        try:
            _, path, created = ensure_api_key(settings.data_dir)
        except StorageError as exc:
            print(f"tidings: cannot start: {exc.strerror} (check data_dir)", file=sys.stderr)
            return 1
        key_note = f"API key {'created in' if created else 'in'} {path.resolve()}"
    if any(ns.push for ns in (*settings.namespaces.values(), settings.default_namespace) if ns):
        from .push import ensure_vapid_key

        try:  # created here, once, so that every worker signs with the same VAPID key
            ensure_vapid_key(settings)
        except (StorageError, ConfigError) as exc:
            print(f"tidings: cannot start: {exc}", file=sys.stderr)
            return 1
    try:
        held, port = reserve_port(settings.host, settings.port)
    except OSError as exc:
        print(f"tidings: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return 1

    def ready(pids: list[int]) -> None:
        log.info(
            "tidings %s: %d workers (pids %s) listening on http://%s:%s (WebSocket /ws); history: %s; %s",
            __version__,
            n,
            " ".join(map(str, pids)),
            _url_host(settings.host),
            port,
            _history_note(settings),
            key_note,
        )

    from .reload import remove_pid_file, write_pid_file

    log.info("supervisor (pid %d) starting %d workers", os.getpid(), n)
    pid_file = write_pid_file(settings.data_dir)  # tidings reload: SIGHUP here, forwarded to every worker
    try:
        return Supervisor(n, args.argv, port).run(ready)
    finally:
        remove_pid_file(pid_file)
        for sock in held:
            sock.close()


def _cmd_serve(args: argparse.Namespace) -> int:
    from .workers import tie_to_supervisor, worker_info

    worker = worker_info(os.environ)  # set by a --workers supervisor for its workers, else None
    if worker is not None:
        tie_to_supervisor(worker)  # first of all: a worker never outlives its supervisor
    if hasattr(signal, "SIGHUP"):  # a reload that comes while starting is not a reason to die
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    cli = {
        "host": args.host,
        "port": args.port,
        "data_dir": args.data_dir,
        "broker": args.broker,
        "allowed_origins": args.allowed_origin,
        "max_message_size": args.max_message_size,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "workers": args.workers,
    }

    def load() -> Settings:
        loaded = load_settings(cli, config_file=args.config)
        if worker is not None:
            loaded.port = worker.port  # the port the supervisor reserved (chosen by it when 0)
        return loaded

    try:
        settings = load()
    except ConfigError as exc:
        print(f"tidings: configuration error: {exc}", file=sys.stderr)
        return 2
    from .logs import setup_logging

    setup_logging(
        settings.log_level,
        settings.log_format,
        worker=worker.index if worker is not None else None,
        secrets=[k.key for k in settings.api_keys] + [settings.token_secret],
    )
    if worker is None and settings.workers > 1:
        return _supervise(args, settings)
    sock = socket.socket(fileno=args.fd) if args.fd is not None else None
    try:
        source = str(args.config or os.environ.get("TIDINGS_CONFIG") or "")
        return _run(serve(settings, sock, worker, load, source))
    except (BrokerURLError, ConfigError) as exc:  # ConfigError: push_vapid_private_key, read at start
        print(f"tidings: configuration error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:  # the data dir: the API key file
        print(f"tidings: cannot start: {exc.strerror} (check data_dir)", file=sys.stderr)
        return 1
    except BrokerError as exc:  # the history store (SQLite in the data dir, or the broker URL)
        print(f"tidings: cannot start: storage: {exc} (check data_dir and broker)", file=sys.stderr)
        # A worker's supervisor starts it again later instead of counting this as a crash.
        return EXIT_BROKER_UNAVAILABLE if worker is not None else 1
    except OSError as exc:  # the listening socket, mostly
        print(f"tidings: cannot start: {exc}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------------------------ reload, config


def _cmd_reload(args: argparse.Namespace) -> int:
    from .reload import signal_reload

    try:
        print(f"tidings: {signal_reload(Path(args.data_dir))}", file=sys.stderr)
    except (LookupError, PermissionError) as exc:
        print(f"tidings: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_config_check(args: argparse.Namespace) -> int:
    from .config import check_file

    problems = check_file(args.file)
    for line in problems:
        print(line)
    if problems:
        return 1
    print(f"{args.file}: ok")
    return 0


def _cmd_config_example(args: argparse.Namespace) -> int:
    from .config import example_config

    sys.stdout.write(example_config())
    return 0


# ---------------------------------------------------------------------------------------------- clients


def _env_api_key(env: Mapping[str, str]) -> str | None:
    """TIDINGS_API_KEY, else the first key of TIDINGS_API_KEYS (the server's name for its key list)."""
    key = env.get("TIDINGS_API_KEY", "").strip()
    if key:
        return key
    first = next((k.strip() for k in env.get("TIDINGS_API_KEYS", "").split(",") if k.strip()), "")
    return first or None


def _api_key(args: argparse.Namespace) -> str:
    key = args.api_key or _env_api_key(os.environ) or read_api_key(Path(args.data_dir))
    if not key:
        raise SystemExit(
            "tidings: no API key: pass --api-key, set TIDINGS_API_KEY (or TIDINGS_API_KEYS), "
            "or run where the server's data dir is"
        )
    return key


def _parse_data(raw: str) -> Any:
    """JSON if it parses, else the text as a JSON string (so `tidings publish ch hello` works)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw


def _http_url(args: argparse.Namespace) -> str:
    return str(args.url or os.environ.get("TIDINGS_URL") or "http://127.0.0.1:8888")


def _ws_url(args: argparse.Namespace) -> str:
    base = _http_url(args)
    if base.startswith(("ws://", "wss://")):
        return base
    return base.replace("https://", "wss://", 1).replace("http://", "ws://", 1).rstrip("/") + "/ws"


def _api_command(args: argparse.Namespace, call: Callable[[HTTPClient], Awaitable[list[Any]]]) -> int:
    """Run one HTTP API call; print its rows as JSON lines, or the error on stderr (exit 1)."""
    from .client import ApiError, HTTPClient

    async def go() -> int:
        async with HTTPClient(_http_url(args), _api_key(args)) as api:
            try:
                rows = await call(api)
            except ApiError as exc:
                print(f"tidings: {exc}", file=sys.stderr)
                return 1
        for row in rows:
            sys.stdout.write(orjson.dumps(row).decode() + "\n")
        return 0

    return _run(go())


def _cmd_publish(args: argparse.Namespace) -> int:
    async def call(api: HTTPClient) -> list[Any]:
        return [await api.publish(args.channel, _parse_data(args.data))]

    return _api_command(args, call)


def _cmd_history(args: argparse.Namespace) -> int:
    async def call(api: HTTPClient) -> list[Any]:
        pubs, _, _ = await api.history(args.channel, limit=args.limit)
        return [p.to_json() for p in pubs]

    return _api_command(args, call)


def _cmd_presence(args: argparse.Namespace) -> int:
    async def call(api: HTTPClient) -> list[Any]:
        return await api.presence(args.channel)

    return _api_command(args, call)


def _cmd_channels(args: argparse.Namespace) -> int:
    async def call(api: HTTPClient) -> list[Any]:
        return [{"channel": ch, "subscribers": n} for ch, n in (await api.channels()).items()]

    return _api_command(args, call)


def _cmd_subscribe(args: argparse.Namespace) -> int:
    from .client import Client, ClientClosed, RequestError, Subscription
    from .notifier import ExecSpec, Notifier, StateError, StateFile, find_notify_send

    if args.exec_concurrency < 1 or args.exec_timeout <= 0:
        print("tidings: --exec-concurrency must be >= 1 and --exec-timeout > 0", file=sys.stderr)
        return 2
    notify_send = None
    if args.notify:
        notify_send = find_notify_send()
        if notify_send is None:
            print(
                "tidings: --notify needs notify-send, which is not on PATH "
                "(Debian/Ubuntu: apt install libnotify-bin)",
                file=sys.stderr,
            )
            return 2
    state = StateFile(Path(args.state)) if args.state else None
    if state is not None:
        try:
            state.load()
        except StateError as exc:
            print(f"tidings: {exc}", file=sys.stderr)
            return 2
    spec = ExecSpec(args.exec, notify_send, args.exec_timeout, args.exec_concurrency)

    async def drain(sub: Subscription) -> None:
        async for _ in sub:  # the notifier hears each message through the client's "message" event
            pass

    async def go() -> int:
        notifier = Notifier(spec, state)
        client = Client(_ws_url(args))
        client.on("message", notifier.on_message)
        client.on("gap", notifier.on_gap)
        worker = asyncio.get_running_loop().create_task(notifier.run())
        try:
            await client.connect(timeout=args.connect_timeout)
            subs = []
            for ch in args.channels:
                since = state.positions.get(ch) if state is not None else None
                if since is None and args.since is not None:
                    epoch = args.epoch or (await client.history(ch, limit=1)).position.epoch
                    since = StreamPosition(args.since, epoch)
                sub = await client.subscribe(ch, since=since)
                if state is not None and ch not in state.positions and sub.position is not None:
                    state.set(ch, sub.position)  # a restart recovers from here even if nothing came
                subs.append(sub)
            print(f"tidings: subscribed to {', '.join(args.channels)}", file=sys.stderr)
            drains: asyncio.Future[Any] = asyncio.gather(*(drain(s) for s in subs))
            waits: list[asyncio.Future[Any]] = [worker, drains, notifier.broken]
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                fut.result()  # a StateError
            flushed: asyncio.Future[Any] = asyncio.ensure_future(notifier.flush())
            await asyncio.wait([flushed, notifier.broken], return_when=asyncio.FIRST_COMPLETED)
            if notifier.broken.done():
                notifier.broken.result()
            for s in subs:  # the subscriptions ended (the server refused, or said not to reconnect)
                if s.end_reason:
                    print(f"tidings: {s.channel}: {s.end_reason}", file=sys.stderr)
        except (RequestError, ClientClosed, ConnectionError) as exc:
            print(f"tidings: {exc}", file=sys.stderr)
            return 1
        except StateError as exc:
            print(f"tidings: {exc}", file=sys.stderr)
            return 2
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker
            await client.close()
        return 0

    async def main() -> int:
        task = asyncio.current_task()
        assert task is not None
        # SIGTERM stops like Ctrl-C: running commands are killed, the state holds what was handled.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await go()
        except asyncio.CancelledError:
            return 143

    try:
        return _run(main())
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tidings", description="Real-time push and chat server.")
    p.add_argument("--version", action="version", version=f"tidings {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the server")
    s.add_argument("--host", help="address to listen on (default 127.0.0.1; env TIDINGS_HOST)")
    s.add_argument("--port", type=int, help="port (default 8888; env TIDINGS_PORT)")
    s.add_argument("--data-dir", help="where history and the API key live (default ./tidings-data)")
    s.add_argument("--broker", help="memory:// | sqlite:///path | redis://host:port/db (default: SQLite)")
    s.add_argument("--config", help="TOML configuration file (env TIDINGS_CONFIG)")
    s.add_argument("--allowed-origin", action="append", help="origin allowed to open WebSockets (repeat)")
    s.add_argument("--max-message-size", type=int, help="largest incoming message in bytes (default 65536)")
    s.add_argument("--log-level", help="debug | info | warning | error (default info)")
    s.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="text, or json: one object per line with access and session lines (default text; env "
        "TIDINGS_LOG_FORMAT)",
    )
    s.add_argument(
        "--workers",
        help="processes accepting on the port, N or auto (one per CPU); above 1 needs a redis:// broker "
        "(default 1; env TIDINGS_WORKERS)",
    )
    s.add_argument("--fd", type=int, help=argparse.SUPPRESS)  # an already-bound listening socket (tests)
    s.set_defaults(func=_cmd_serve)

    c = sub.add_parser(
        "reload",
        help="make the running server read its configuration again (SIGHUP to the pid in the data dir)",
    )
    c.add_argument(
        "--data-dir",
        default=os.environ.get("TIDINGS_DATA_DIR", "tidings-data"),
        help="the server's data dir, where its tidings.pid is (default ./tidings-data; env TIDINGS_DATA_DIR)",
    )
    c.set_defaults(func=_cmd_reload)

    c = sub.add_parser("config", help="check a configuration file, or print an example of one")
    config_sub = c.add_subparsers(dest="config_command", required=True)
    cc = config_sub.add_parser("check", help="print every problem of FILE as FILE:LINE: message (exit 1)")
    cc.add_argument("file", metavar="FILE")
    cc.set_defaults(func=_cmd_config_check)
    cc = config_sub.add_parser("example", help="print a commented file with every option and its default")
    cc.set_defaults(func=_cmd_config_example)

    def client_opts(c: argparse.ArgumentParser) -> None:
        c.add_argument("--url", help="server URL (default http://127.0.0.1:8888; env TIDINGS_URL)")
        c.add_argument(
            "--api-key",
            help="API key (env TIDINGS_API_KEY, or the first of TIDINGS_API_KEYS; default: from --data-dir)",
        )
        c.add_argument("--data-dir", default=os.environ.get("TIDINGS_DATA_DIR", "tidings-data"))

    c = sub.add_parser("publish", help="publish DATA (JSON, or plain text) to CHANNEL via the HTTP API")
    c.add_argument("channel")
    c.add_argument("data")
    client_opts(c)
    c.set_defaults(func=_cmd_publish)

    c = sub.add_parser("history", help="print CHANNEL's history as JSON lines")
    c.add_argument("channel")
    c.add_argument("--limit", type=int)
    client_opts(c)
    c.set_defaults(func=_cmd_history)

    c = sub.add_parser("presence", help="print the clients subscribed to CHANNEL as JSON lines")
    c.add_argument("channel")
    client_opts(c)
    c.set_defaults(func=_cmd_presence)

    c = sub.add_parser("channels", help="print the active channels and their subscriber counts")
    client_opts(c)
    c.set_defaults(func=_cmd_channels)

    c = sub.add_parser("subscribe", help="print publications as JSON lines; reconnects and recovers")
    c.add_argument("channels", nargs="+", metavar="CHANNEL")
    c.add_argument("--since", type=int, help="start after this offset (recover what came since)")
    c.add_argument("--epoch", help="the epoch of --since (default: the channel's current epoch)")
    c.add_argument("--url", help="server URL (default http://127.0.0.1:8888; env TIDINGS_URL)")
    c.add_argument("--connect-timeout", type=float, default=30.0)
    c.add_argument(
        "--state",
        metavar="FILE",
        help="remember each channel's last handled position in FILE; a restart prints what it missed",
    )
    c.add_argument("--exec", metavar="CMD", help="run the shell command CMD per message (JSON on stdin)")
    c.add_argument("--exec-concurrency", type=int, default=1, metavar="N", help="commands at once (1)")
    c.add_argument("--exec-timeout", type=float, default=60.0, metavar="S", help="kill a command after S s")
    c.add_argument("--notify", action="store_true", help="show a desktop notification (notify-send)")
    c.set_defaults(func=_cmd_subscribe)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --workers starts each worker with
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
