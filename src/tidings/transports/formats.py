"""Wire formats: how a publication or event becomes the bytes one kind of sink sends.

Each is a :data:`~tidings.protocol.Format` function, called at most once per item through the item's
per-format cache (:func:`~tidings.protocol.encoded`): the first sink of a format that needs the bytes builds
them, every other sink of that format reuses them. A new transport adds its format here (or next to its
transport) and calls ``encoded(item, its_format)`` in its sink's ``push``.
"""

from __future__ import annotations

from ..protocol import Event, Publication, deflate_payload, encoded, text_frame

__all__ = ["COMPRESS_MIN", "ws_frame", "ws_zframe"]

COMPRESS_MIN = 256  # payloads smaller than this are sent uncompressed even to deflate peers


def ws_frame(item: Publication | Event) -> bytes:
    """The /ws push (``message``, ``join``, ``leave``) as one WebSocket text frame."""
    return text_frame(item.push_bytes())


def ws_zframe(item: Publication | Event) -> bytes | None:
    """The /ws push for permessage-deflate peers: compressed once (no context takeover), so the same
    frame is valid for every such peer; small pushes go uncompressed (the plain frame, shared)."""
    payload = item.push_bytes()
    if len(payload) < COMPRESS_MIN:
        return encoded(item, ws_frame)
    return text_frame(deflate_payload(payload), compressed=True)
