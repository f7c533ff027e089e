"""Live reload: SIGHUP (or ``tidings reload``) reads the configuration again and applies what can change
while the server runs (docs/configuration.md, "Reloading the configuration").

:class:`Reloader` is what a ``tidings serve`` process runs on SIGHUP: it loads the settings the way the
process started (the same file, environment and command line, so command-line and environment values stay
on top of the file), refuses a file with any problem whole (the running configuration stays, the problems
are logged), keeps the options that need a restart at their running values (and logs which ones changed),
and hands the rest to :meth:`tidings.node.Node.reload`, the one place a running node's settings change.

The pid file (``<data_dir>/tidings.pid``) is how ``tidings reload`` finds the server: written by the
process that owns the port (the single process, or the ``--workers`` supervisor, which forwards SIGHUP to
every worker), removed when it exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from .auth import StorageError, ensure_api_key
from .config import ApiKey, ConfigError, Settings, reloaded, start_problems
from .node import Node

__all__ = ["PID_FILE", "Reloader", "read_pid", "remove_pid_file", "write_pid_file"]

log = logging.getLogger("tidings")
PID_FILE = "tidings.pid"


class Reloader:
    """Re-read the configuration with ``load`` and apply it to ``node``. ``loaded``: the settings as
    ``load`` gave them at start (before start-up adjustments), to tell what the file changed since."""

    def __init__(self, node: Node, load: Callable[[], Settings], loaded: Settings, source: str) -> None:
        self.node = node
        self._load = load
        self._loaded = loaded
        self._source = source  # the file, for the log ("" when there is none)

    def reload(self) -> bool:
        """One reload; True when the new configuration was applied (even if nothing changed)."""
        where = self._source or "no configuration file (--config, TIDINGS_CONFIG): environment"
        try:
            after = self._load()
            problems = start_problems(after)
            if problems:
                raise ConfigError("\n".join(p.message for p in problems))
            new, live, kept = reloaded(self.node.settings, self._loaded, after)
            if not new.api_keys:  # as at start: the key in the data dir (created then, read now)
                key, _, _ = ensure_api_key(new.data_dir)
                new.api_keys = [ApiKey("generated", key, "admin")]
            if "max_connections" in live:
                from .transports.server import fit_open_files

                log.info("reload: %s", fit_open_files(new))
            level = logging.getLevelName(new.log_level.upper())
            self.node.reload(new)  # may still refuse: a token key file PyJWT cannot use
        except (ConfigError, StorageError, OSError, ValueError) as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            return False
        self._loaded = after
        if isinstance(level, int):
            logging.getLogger().setLevel(level)
        if not self.node.push.enabled and any(
            ns.push for ns in (*new.namespaces.values(), new.default_namespace) if ns is not None
        ):
            log.warning(
                "reload: Web Push was off at start (no push namespace): it starts at the next restart"
            )
        if kept:
            log.warning(
                "reload: %s changed but cannot change while running: kept as they are until a restart",
                ", ".join(kept),
            )
        log.info(
            "configuration reloaded (%s): %s",
            where,
            f"applied {', '.join(live)}" if live else "no live option changed",
        )
        return True


# ---------------------------------------------------------------------------------------------- pid file


def write_pid_file(data_dir: Path) -> Path | None:
    """Record this process's pid in ``<data_dir>/tidings.pid`` (written atomically); None (and a
    warning) when the data dir cannot take it: the server runs, ``tidings reload`` will not find it."""
    path = data_dir / PID_FILE
    tmp = path.with_name(f".{PID_FILE}.{os.getpid()}")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(path)
    except OSError as exc:
        log.warning("cannot write the pid file %s (tidings reload needs it): %s", path, exc.strerror or exc)
        with contextlib.suppress(OSError):
            tmp.unlink()
        return None
    return path


def remove_pid_file(path: Path | None) -> None:
    """Remove the pid file if it is still this process's (a newer server may have replaced it)."""
    if path is not None and read_pid(path.parent) == os.getpid():
        with contextlib.suppress(OSError):
            path.unlink()


def read_pid(data_dir: Path) -> int | None:
    """The pid in ``<data_dir>/tidings.pid``, or None when there is no (valid) pid file."""
    try:
        text = (data_dir / PID_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def signal_reload(data_dir: Path) -> str:
    """``tidings reload``: SIGHUP to the server whose pid file is in ``data_dir``; the line to print.
    Raises LookupError (no running server there) or PermissionError."""
    pid = read_pid(data_dir)
    if pid is None:
        raise LookupError(
            f"no pid file in {data_dir.resolve()} (is tidings serve running with this data dir?)"
        )
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise LookupError(f"no process {pid} (a stale pid file in {data_dir.resolve()})") from None
    return f"sent SIGHUP to tidings (pid {pid}); its log says what was applied"
