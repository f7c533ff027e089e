"""Sans-I/O protocol pieces that need no server."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest

from tidings.backends.base import HistoryResult
from tidings.protocol import (
    MAX_DEPTH,
    ErrorCode,
    Event,
    ProtocolError,
    Publication,
    StreamPosition,
    encode_value,
    encoded,
    new_publication_id,
    unsubscribe_push,
)
from tidings.subscriptions import can_recover


def test_publication_ids_are_canonical_uuid4() -> None:
    ids = {new_publication_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    for i in list(ids)[:1000]:
        u = uuid.UUID(i)
        assert str(u) == i and u.version == 4 and u.variant == uuid.RFC_4122


def test_publication_ids_are_unpredictable_per_publication() -> None:
    """Ids are what clients de-duplicate on: no two publications share one, even in one process."""
    a, b = new_publication_id(), new_publication_id()
    assert a != b and a[:8] != b[:8]


def test_publication_keeps_data_as_bytes_and_decodes_on_access() -> None:
    raw = b'{"text":"hi","n":[1,2]}'
    pub = Publication("pub:x", 3, "e1", "id-1", 1000, raw=raw, raw_info=b'{"user":"u"}')
    assert pub.data == {"text": "hi", "n": [1, 2]} and pub.info == {"user": "u"}
    assert pub.data is not pub.data  # decoded on every access: nothing parsed is kept
    pushed = orjson.loads(pub.push_bytes())
    assert pushed == {"type": "message", **pub.to_json()}
    assert pub.push_bytes().count(raw) == 1  # the stored bytes are embedded as they are
    client = Publication("pub:x", 3, "e1", "id-1", 1000, {"text": "hi", "n": [1, 2]}, {"user": "u"})
    assert client == pub and client.raw == raw


def test_encoded_builds_each_format_once_per_item() -> None:
    calls: list[str] = []

    def fmt_a(item: Publication | Event) -> bytes:
        calls.append("a")
        return b"A"

    def fmt_b(item: Publication | Event) -> bytes | None:
        calls.append("b")
        return None

    pub = Publication("pub:x", 1, "e", "i", 0, raw=b"1")
    for _ in range(1000):
        assert encoded(pub, fmt_a) == b"A" and encoded(pub, fmt_b) is None
    assert calls == ["a", "b"]
    ev = Event("join", "pub:x", "c1", "u")
    assert encoded(ev, fmt_a) == b"A" and calls == ["a", "b", "a"]


def test_encode_value_refuses_what_orjson_could_not_write_back() -> None:
    def nest(n: int) -> Any:
        v: Any = 0
        for _ in range(n):
            v = [v]
        return v

    assert orjson.loads(encode_value(nest(MAX_DEPTH), "data")) == nest(MAX_DEPTH)
    for depth in (MAX_DEPTH + 1, 254, 255, 1000):
        with pytest.raises(ProtocolError) as err:
            encode_value(orjson.loads("[" * depth + "]" * depth), "data", rid=7)
        assert err.value.code is ErrorCode.BAD_REQUEST and err.value.id == 7
    wide = [[[]] for _ in range(10_000)]  # many brackets, shallow: accepted
    assert orjson.loads(encode_value(wide, "data")) == wide


def test_recovery_verdict() -> None:
    def res(first: int, top: int, epoch: str = "e") -> HistoryResult:
        return HistoryResult([], StreamPosition(top, epoch), first)

    assert can_recover(res(1, 10), StreamPosition(0, "e"))
    assert can_recover(res(1, 10), StreamPosition(0, "other"))  # nothing seen yet: any epoch completes
    assert not can_recover(res(1, 10), StreamPosition(3, "other"))
    assert can_recover(res(5, 10), StreamPosition(4, "e")) and not can_recover(
        res(5, 10), StreamPosition(3, "e")
    )
    assert can_recover(res(11, 10), StreamPosition(10, "e"))  # at the top, nothing retained: complete
    assert not can_recover(res(1, 10), StreamPosition(11, "e"))  # beyond the top
    assert not can_recover(res(2, 10), StreamPosition(0, "other"))  # offset 1 is gone


def test_unsubscribe_push_shape() -> None:
    assert orjson.loads(unsubscribe_push("priv:x", ErrorCode.TOKEN_EXPIRED, "expired", True)) == {
        "type": "unsubscribe",
        "channel": "priv:x",
        "code": "token_expired",
        "reason": "expired",
        "resubscribe": True,
    }
