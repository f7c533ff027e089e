"""The server's VAPID identity (RFC 8292): a P-256 key pair, generated on first start into the data dir
(``vapid_private.pem``, mode 0600, written like the API key) or read from ``push_vapid_private_key``,
and the signed ``Authorization: vapid t=<JWT>, k=<public key>`` header (py-vapid signs it)."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from py_vapid import Vapid02

from ..auth import ensure_secret, read_secret
from ..config import ConfigError, Settings

__all__ = ["VAPID_KEY_FILE", "Vapid", "b64url", "default_subject", "ensure_vapid_key", "vapid_key_path"]

VAPID_KEY_FILE = "vapid_private.pem"
JWT_LIFETIME = 12 * 3600  # seconds a signed header is valid (push services refuse more than 24 h)
RESIGN_AFTER = 3600  # seconds a header is reused for one push service origin before signing anew


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def vapid_key_path(settings: Settings) -> Path:
    return (
        Path(settings.push_vapid_private_key)
        if settings.push_vapid_private_key
        else (settings.data_dir / VAPID_KEY_FILE)
    )


def _new_pem() -> str:
    v = Vapid02()
    v.generate_keys()
    return bytes(v.private_pem()).decode().strip()


def ensure_vapid_key(settings: Settings) -> tuple[str, Path, bool]:
    """The VAPID private key (PEM): the configured file (which must exist), or the data dir's, created
    (mode 0600) on first use. Returns (pem, path, created). ConfigError / StorageError."""
    path = vapid_key_path(settings)
    if settings.push_vapid_private_key:
        pem = read_secret(path)
        if pem is None:
            raise ConfigError(f"push_vapid_private_key: cannot read {path}")
        return pem, path, False
    pem, created = ensure_secret(path, _new_pem)
    return pem, path, created


def default_subject(settings: Settings) -> str:
    """``push_subject``, or one derived from the server: its first https public_url, else
    ``mailto:tidings@<host>``."""
    if settings.push_subject:
        return settings.push_subject
    for url in settings.public_url:
        if url.startswith("https://"):
            return url.rstrip("/")
    host = urlsplit(settings.public_url[0]).hostname if settings.public_url else settings.host
    if not host or host in ("0.0.0.0", "::"):
        host = "localhost"
    return f"mailto:tidings@{host}"


class Vapid:
    """Signs VAPID headers, one per push service origin, reused for an hour (a signature costs more
    than the rest of a push together)."""

    def __init__(self, pem: str, subject: str) -> None:
        try:
            self._key = Vapid02.from_pem(pem.encode())
        except Exception as exc:
            raise ConfigError(f"the VAPID private key is not a P-256 key in PEM: {exc}") from None
        self._key.conf["no-strict"] = True  # the subject's shape is checked by config.py
        self.subject = subject
        raw = self._key.public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        self.public_key = b64url(raw)  # the applicationServerKey
        self._headers: dict[str, tuple[float, str]] = {}  # origin -> (signed at, header)

    def header(self, origin: str, now: float | None = None) -> str:
        now = time.time() if now is None else now
        hit = self._headers.get(origin)
        if hit is not None and now - hit[0] < RESIGN_AFTER:
            return hit[1]
        claims = {"aud": origin, "exp": int(now) + JWT_LIFETIME, "sub": self.subject}
        value: str = self._key.sign(claims)["Authorization"]
        if len(self._headers) > 1000:
            self._headers.clear()
        self._headers[origin] = (now, value)
        return value
