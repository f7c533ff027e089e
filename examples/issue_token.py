"""Issue tidings tokens from your application backend (Python, PyJWT).

Your backend already knows who the user is (session cookie, OAuth, ...). It signs a short-lived
*connection token* for the browser, which connects with it::

    ws://HOST:PORT/ws?token=<connection token>      or      {"op": "connect", "token": "<connection token>"}

For a private channel (a namespace with ``subscribe = "token"``) it also signs a *subscription token*
that grants that one channel to that one user::

    {"op": "subscribe", "channel": "secret:room-7", "token": "<subscription token>"}

The server must be configured with the same HMAC secret (``token_secret`` / ``TIDINGS_TOKEN_SECRET``).
For RS256/ES256 sign with your private key instead and give the server the public key
(``token_public_key``) or a JWKS file (``token_jwks``); see docs/security.md.

Run it to print a connection token::

    python examples/issue_token.py --secret "$TIDINGS_TOKEN_SECRET" --user 42 --ttl 3600
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import jwt

__all__ = ["connection_token", "subscription_token"]


def connection_token(
    user_id: str,
    secret: str,
    ttl: float,
    channels: list[str] | None = None,
    info: dict[str, Any] | None = None,
) -> str:
    """A connection token for ``user_id``, valid for ``ttl`` seconds.

    ``channels``: optional glob patterns (``"chat:*"``) the connection is limited to; they also grant
    namespaces with ``subscribe = "token"``. ``info``: optional public details about the user (name,
    avatar), attached to the user's publications and visible to other clients.
    """
    now = int(time.time())
    claims: dict[str, Any] = {"sub": str(user_id), "iat": now, "exp": now + int(ttl)}
    if channels is not None:
        claims["channels"] = list(channels)
    if info is not None:
        claims["info"] = dict(info)
    return jwt.encode(claims, secret, algorithm="HS256")


def subscription_token(user_id: str, channel: str, secret: str, ttl: float) -> str:
    """A subscription token granting ``user_id`` the one ``channel`` for ``ttl`` seconds.

    Pass ``user_id=""`` for an anonymous connection (the token then carries no ``sub``).
    """
    now = int(time.time())
    claims: dict[str, Any] = {"channel": channel, "iat": now, "exp": now + int(ttl)}
    if user_id:
        claims["sub"] = str(user_id)
    return jwt.encode(claims, secret, algorithm="HS256")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print a tidings token.")
    parser.add_argument("--secret", default=os.environ.get("TIDINGS_TOKEN_SECRET"), help="HMAC secret")
    parser.add_argument("--user", required=True, help="the user id (sub)")
    parser.add_argument("--ttl", type=float, default=3600, help="seconds the token is valid")
    parser.add_argument("--channel", help="print a subscription token for this channel instead")
    args = parser.parse_args(argv)
    if not args.secret:
        parser.error("pass --secret or set TIDINGS_TOKEN_SECRET")
    if args.channel:
        print(subscription_token(args.user, args.channel, args.secret, args.ttl))
    else:
        print(connection_token(args.user, args.secret, args.ttl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
