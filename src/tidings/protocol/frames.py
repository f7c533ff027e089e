"""Building WebSocket frames once, so that one publication's bytes serve every subscriber.

Server-to-client frames are never masked (RFC 6455 §5.1), so a frame is a pure function of its payload.
"""

from __future__ import annotations

import struct
import zlib

__all__ = ["deflate_payload", "text_frame"]

_OP_TEXT = 0x1
_FIN = 0x80
_RSV1 = 0x40


def text_frame(payload: bytes, *, compressed: bool = False) -> bytes:
    """One complete, unmasked text frame carrying ``payload`` (already deflated when ``compressed``)."""
    first = _FIN | _OP_TEXT | (_RSV1 if compressed else 0)
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", first, n)
    elif n < 65536:
        header = struct.pack("!BBH", first, 126, n)
    else:
        header = struct.pack("!BBQ", first, 127, n)
    return header + payload


def deflate_payload(payload: bytes) -> bytes:
    """permessage-deflate with no context takeover: the same bytes are valid for every receiver."""
    comp = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = comp.compress(payload) + comp.flush(zlib.Z_SYNC_FLUSH)
    # RFC 7692 §7.2.1: remove the trailing 0x00 0x00 0xff 0xff of the sync flush.
    return data[:-4] if data.endswith(b"\x00\x00\xff\xff") else data
