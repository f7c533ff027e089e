"""Identities, tokens, API keys and channel permissions.

* Connection tokens: JWT (HS256 with ``token_secret``; RS256/ES256 with ``token_public_key`` or a JWKS file)
  carrying ``sub`` (the user id), ``exp``, optional ``info`` and optional ``channels`` (glob patterns).
* Subscription tokens: a JWT whose ``channel`` claim names one channel (and whose ``sub`` is the
  connection's user), so a backend can grant one private channel without granting all.
* API keys: named, each with a role (``publish``, ``read``, ``admin``), compared in constant time.

Nothing here logs a token or a key.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

import jwt

from .config import ApiKey, Namespace, Settings
from .protocol import ErrorCode, ProtocolError

__all__ = [
    "ANONYMOUS",
    "API_KEY_FILE",
    "Action",
    "Identity",
    "StorageError",
    "TokenError",
    "TokenVerifier",
    "check_permission",
    "ensure_api_key",
    "ensure_secret",
    "find_api_key",
    "read_api_key",
    "read_secret",
    "write_secret_file",
]

API_KEY_FILE = "api-key"
Action = Literal["subscribe", "publish", "history", "presence"]
API_ROLE_FOR: dict[str, str] = {
    "subscribe": "read",
    "publish": "publish",
    "history": "read",
    "presence": "read",
}
HMAC_ALGS = ("HS256", "HS384", "HS512")
PUBLIC_ALGS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "EdDSA")
MAX_EXP = 253402300799  # 9999-12-31T23:59:59Z: the latest `exp` a token may carry
_KTY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


def _fits(k: jwt.PyJWK, alg: str) -> bool:
    """Whether JWK ``k`` can verify ``alg``: its own ``alg`` if it names one, else its key type."""
    named = k._jwk_data.get("alg")
    if isinstance(named, str):
        return named == alg
    if k.public_key_use not in (None, "sig"):
        return False
    return k.key_type == _KTY.get(alg[:2])


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is asking: a user (from a connection token), an anonymous client, or a backend holding an
    API key (``api_key``; the HTTP API)."""

    user: str = ""  # "" is anonymous
    info: dict[str, Any] | None = None
    channels: tuple[str, ...] | None = None  # patterns the token limits the connection to
    expires: float | None = None  # Unix time the connection token expires
    api_key: ApiKey | None = None

    @property
    def anonymous(self) -> bool:
        return not self.user and self.api_key is None

    def allows(self, channel: str) -> bool:
        return self.channels is not None and any(fnmatchcase(channel, p) for p in self.channels)


ANONYMOUS = Identity()


class TokenError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TokenVerifier:
    """Checks JWTs against the configured keys. Only algorithms with a configured key are accepted
    (so ``alg: none`` and HS/RS confusion are refused)."""

    def __init__(self, settings: Settings) -> None:
        self.audience = settings.token_audience or None
        self.issuer = settings.token_issuer or None
        self._secret = settings.token_secret or None
        self._public: Any = None
        self._jwks: jwt.PyJWKSet | None = None
        if settings.token_public_key:
            self._public = Path(settings.token_public_key).read_bytes()  # PEM; PyJWT loads it per algorithm
        if settings.token_jwks:
            self._jwks = jwt.PyJWKSet.from_dict(json.loads(Path(settings.token_jwks).read_text()))

    @property
    def enabled(self) -> bool:
        return bool(self._secret or self._public or self._jwks)

    def _keys_for(self, header: dict[str, Any]) -> tuple[list[Any], str]:
        """The keys to try for a token with this header, and its algorithm."""
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise TokenError(ErrorCode.UNAUTHORIZED, "token has no algorithm")
        if alg in HMAC_ALGS and self._secret:
            return [self._secret], alg
        if alg in PUBLIC_ALGS:
            if self._jwks is not None:
                kid = header.get("kid")
                if kid is not None:
                    keys = [k.key for k in self._jwks.keys if k.key_id == kid and _fits(k, alg)]
                    if not keys:
                        raise TokenError(ErrorCode.UNAUTHORIZED, "token key id not found in the JWKS")
                    return keys, alg
                # No kid: every key of the JWKS that can verify this algorithm is a candidate.
                keys = [k.key for k in self._jwks.keys if _fits(k, alg)]
                if not keys:
                    raise TokenError(ErrorCode.UNAUTHORIZED, f"no key in the JWKS verifies {alg[:16]!r}")
                return keys, alg
            if self._public is not None:
                return [self._public], alg
        raise TokenError(ErrorCode.UNAUTHORIZED, f"token algorithm {alg[:16]!r} is not accepted here")

    def decode(self, token: str, require: list[str]) -> dict[str, Any]:
        if not self.enabled:
            raise TokenError(
                ErrorCode.UNAUTHORIZED, "this server accepts no tokens (no token key configured)"
            )
        if not isinstance(token, str) or len(token) > 8192:
            raise TokenError(ErrorCode.UNAUTHORIZED, "malformed token")
        try:
            header = jwt.get_unverified_header(token)
            keys, alg = self._keys_for(header)
            for i, key in enumerate(keys):
                try:
                    claims: dict[str, Any] = jwt.decode(
                        token,
                        key,
                        algorithms=[alg],
                        audience=self.audience,
                        issuer=self.issuer,
                        options={"require": require, "verify_aud": self.audience is not None},
                        leeway=5,
                    )
                    break
                except jwt.InvalidSignatureError:
                    if i == len(keys) - 1:
                        raise
        except jwt.ExpiredSignatureError:
            raise TokenError(ErrorCode.TOKEN_EXPIRED, "token expired") from None
        except (jwt.PyJWTError, ValueError, TypeError, OverflowError) as exc:
            raise TokenError(ErrorCode.UNAUTHORIZED, f"invalid token: {type(exc).__name__}") from None
        exp = claims.get("exp")
        if exp is not None and not (isinstance(exp, int | float) and 0 <= exp <= MAX_EXP):
            # A far-future exp (10**20) would overflow the connection's timer and the reply's encoder.
            raise TokenError(ErrorCode.UNAUTHORIZED, "token exp must be a Unix time before the year 10000")
        return claims

    def connection(self, token: str) -> Identity:
        claims = self.decode(token, ["sub", "exp"])
        if "channel" in claims:
            # A subscription token (one channel, for one user) must not pass as a connection token: it
            # would carry no `channels` limit and could outlive the user's real connection token.
            raise TokenError(ErrorCode.UNAUTHORIZED, "a subscription token is not a connection token")
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub or len(sub) > 255:
            raise TokenError(ErrorCode.UNAUTHORIZED, "token sub must be a non-empty string")
        if "/" in sub:  # user:<id>/... is the user's subtree of personal channels: ids cannot contain "/"
            raise TokenError(ErrorCode.UNAUTHORIZED, "token sub must not contain '/'")
        info = claims.get("info")
        if info is not None and not isinstance(info, dict):
            raise TokenError(ErrorCode.UNAUTHORIZED, "token info must be an object")
        chans = claims.get("channels")
        if chans is not None and (not isinstance(chans, list) or not all(isinstance(c, str) for c in chans)):
            raise TokenError(ErrorCode.UNAUTHORIZED, "token channels must be a list of strings")
        return Identity(sub, info, tuple(chans) if chans is not None else None, float(claims["exp"]))

    def subscription(self, token: str, channel: str, identity: Identity) -> float:
        """Check a subscription token for ``channel``; returns its expiry."""
        claims = self.decode(token, ["channel", "exp"])
        if claims.get("channel") != channel:
            raise TokenError(ErrorCode.PERMISSION_DENIED, "the subscription token is for another channel")
        if str(claims.get("sub", "")) != identity.user:
            raise TokenError(ErrorCode.PERMISSION_DENIED, "the subscription token is for another user")
        return float(claims["exp"])


def _deny(rid: int | str | None, message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.PERMISSION_DENIED, message, rid)


def check_permission(
    ns: Namespace,
    identity: Identity,
    channel: str,
    action: Action,
    *,
    granted: bool = False,
    rid: int | str | None = None,
) -> None:
    """Raise ``permission_denied`` unless ``identity`` may do ``action`` on ``channel``.

    ``granted``: the connection holds a valid subscription token for this channel.
    """
    if granted:
        if action == "publish" and not ns.publish:
            raise _deny(rid, f"clients may not publish to namespace {ns.name!r}")
        return
    if identity.anonymous and not ns.anonymous:
        raise _deny(rid, f"namespace {ns.name!r} needs an authenticated connection")
    if ns.personal:
        rest = channel[len(ns.name) + 1 :]
        if identity.anonymous or (rest != identity.user and not rest.startswith(identity.user + "/")):
            raise _deny(rid, "personal channels are readable only by their user")
    if identity.channels is not None and not identity.allows(channel):
        raise _deny(rid, "the connection token does not allow this channel")
    if ns.subscribe == "authenticated" and identity.anonymous:
        raise _deny(rid, f"namespace {ns.name!r} needs an authenticated connection")
    if ns.subscribe == "token" and not identity.allows(channel):
        raise _deny(rid, f"namespace {ns.name!r} needs a subscription token")
    if action == "publish" and not ns.publish:
        raise _deny(rid, f"clients may not publish to namespace {ns.name!r}")


# ---------------------------------------------------------------------------------------------- API keys


def find_api_key(keys: list[ApiKey], given: str) -> ApiKey | None:
    """The key matching ``given``, compared in constant time against every configured key."""
    found: ApiKey | None = None
    # Header bytes that are not UTF-8 arrive as surrogate escapes: compare them as the bytes they were.
    raw = given.encode("utf-8", "surrogateescape")
    for k in keys:
        if hmac.compare_digest(raw, k.key.encode()):
            found = k
    return found


def read_api_key(data_dir: Path) -> str | None:
    """The key in ``data_dir``, or None when there is none (an empty file, left by a failed first start
    on a full disk, counts as none)."""
    return read_secret(data_dir / API_KEY_FILE)


def read_secret(path: Path) -> str | None:
    try:
        value = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return value or None


class StorageError(OSError):
    """A file the server keeps in its data dir could not be written; the message names the file."""


def write_secret_file(path: Path, value: str) -> None:
    """Write ``value`` to ``path`` atomically with mode 0600: a temporary file, fsync, rename, fsync of the
    directory. A crash or a full disk leaves either no file or the whole file, never a partial one."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            data = (value + "\n").encode()
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None


def ensure_secret(path: Path, make: Callable[[], str]) -> tuple[str, bool]:
    """The secret stored at ``path``, created with ``make()`` on first use. Returns (value, created)."""
    value = read_secret(path)
    if value is not None:
        return value, False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(
            exc.errno, f"cannot create the data dir {path.parent}: {exc.strerror or exc}"
        ) from None
    value = make()
    write_secret_file(path, value)
    return value, True


def ensure_api_key(data_dir: Path) -> tuple[str, Path, bool]:
    """The API key stored in ``data_dir``, created (mode 0600) on first use. Returns (key, path, created)."""
    path = data_dir / API_KEY_FILE
    key, created = ensure_secret(path, lambda: "tk_" + secrets.token_urlsafe(32))
    return key, path, created
