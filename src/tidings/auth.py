"""API keys (and, later, tokens and channel permissions)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["API_KEY_FILE", "ensure_api_key", "read_api_key"]

API_KEY_FILE = "api-key"


def read_api_key(data_dir: Path) -> str | None:
    try:
        key = (data_dir / API_KEY_FILE).read_text().strip()
    except OSError:
        return None
    return key or None


def ensure_api_key(data_dir: Path) -> tuple[str, Path, bool]:
    """The API key stored in ``data_dir``, created (mode 0600) on first use. Returns (key, path, created)."""
    path = data_dir / API_KEY_FILE
    key = read_api_key(data_dir)
    if key is not None:
        return key, path, False
    data_dir.mkdir(parents=True, exist_ok=True)
    key = "tk_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, path, True
