"""Error codes (in replies) and close codes (on the WebSocket), with their meaning.

Every refusal the server makes is one of these. ``docs/protocol.md`` lists them; a test checks that
the two stay in step.
"""

from __future__ import annotations

import enum

__all__ = ["CLOSE_REASONS", "HTTP_STATUS", "CloseCode", "ErrorCode"]


class ErrorCode(enum.StrEnum):
    """Codes carried in ``{"error": {"code": ..., "message": ...}}`` replies. The connection stays open."""

    BAD_REQUEST = "bad_request"  # frame is not a JSON object
    UNKNOWN_OP = "unknown_op"
    INVALID_FIELD = "invalid_field"  # a field is missing or has the wrong type/value
    INVALID_CHANNEL = "invalid_channel"
    UNKNOWN_NAMESPACE = "unknown_namespace"
    PERMISSION_DENIED = "permission_denied"
    UNAUTHORIZED = "unauthorized"  # token missing or invalid
    TOKEN_EXPIRED = "token_expired"
    ALREADY_SUBSCRIBED = "already_subscribed"
    NOT_SUBSCRIBED = "not_subscribed"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    MESSAGE_TOO_LARGE = "message_too_large"
    RATE_LIMITED = "rate_limited"
    NOT_AVAILABLE = "not_available"  # feature off for this namespace (presence, history)
    NOT_FOUND = "not_found"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"  # backend down; retry later
    INSUFFICIENT_STATE = "insufficient_state"  # a node could not keep a subscription gapless: resubscribe


# HTTP status used when the same code is returned by the HTTP API.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNKNOWN_OP: 400,
    ErrorCode.INVALID_FIELD: 400,
    ErrorCode.INVALID_CHANNEL: 400,
    ErrorCode.UNKNOWN_NAMESPACE: 404,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.TOKEN_EXPIRED: 401,
    ErrorCode.ALREADY_SUBSCRIBED: 409,
    ErrorCode.NOT_SUBSCRIBED: 409,
    ErrorCode.TOO_MANY_SUBSCRIPTIONS: 429,
    ErrorCode.MESSAGE_TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.NOT_AVAILABLE: 404,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INSUFFICIENT_STATE: 409,
}


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server uses. ``reconnect`` tells clients whether to try again."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down or restarting
    PROTOCOL_ERROR = 1002  # malformed WebSocket frame (sent by the WebSocket layer)
    UNSUPPORTED_DATA = 1003  # binary frame on a text protocol
    INVALID_TEXT = 1007  # a text frame that is not valid UTF-8 (sent by the WebSocket layer)
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009  # frame or decompressed message above the limit
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # the server cannot go on with this connection's state: reconnect
    SLOW_CONSUMER = 4008  # outgoing buffer full: the client did not read fast enough
    UNAUTHORIZED = 4001  # bad or missing token where one is required
    TOKEN_EXPIRED = 4002
    FORBIDDEN = 4003
    AUTH_TIMEOUT = 4004  # no connect frame in time
    TOO_MANY_CONNECTIONS = 4029
    RATE_LIMITED = 4030
    BAD_PROTOCOL = 4400  # repeated malformed frames

    @property
    def reconnect(self) -> bool:
        return self in _RECONNECT


_RECONNECT = frozenset(
    {
        CloseCode.GOING_AWAY,
        CloseCode.INTERNAL_ERROR,
        CloseCode.SERVICE_RESTART,
        CloseCode.SLOW_CONSUMER,
        CloseCode.TOKEN_EXPIRED,
        CloseCode.TOO_MANY_CONNECTIONS,
        CloseCode.RATE_LIMITED,
    }
)

CLOSE_REASONS: dict[CloseCode, str] = {
    CloseCode.NORMAL: "normal closure",
    CloseCode.GOING_AWAY: "server going away",
    CloseCode.PROTOCOL_ERROR: "protocol error",
    CloseCode.INVALID_TEXT: "invalid UTF-8 text",
    CloseCode.UNSUPPORTED_DATA: "binary frames are not supported",
    CloseCode.POLICY_VIOLATION: "policy violation",
    CloseCode.MESSAGE_TOO_BIG: "message too big",
    CloseCode.INTERNAL_ERROR: "internal error",
    CloseCode.SERVICE_RESTART: "service restart",
    CloseCode.SLOW_CONSUMER: "slow consumer",
    CloseCode.UNAUTHORIZED: "unauthorized",
    CloseCode.TOKEN_EXPIRED: "token expired",
    CloseCode.FORBIDDEN: "forbidden",
    CloseCode.AUTH_TIMEOUT: "authentication timeout",
    CloseCode.TOO_MANY_CONNECTIONS: "too many connections",
    CloseCode.RATE_LIMITED: "rate limited",
    CloseCode.BAD_PROTOCOL: "bad protocol",
}
