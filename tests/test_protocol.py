"""Sans-I/O protocol pieces that need no server."""

from __future__ import annotations

import uuid

from tidings.protocol import new_publication_id


def test_publication_ids_are_canonical_uuid4() -> None:
    ids = {new_publication_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    for i in list(ids)[:1000]:
        u = uuid.UUID(i)
        assert str(u) == i and u.version == 4 and u.variant == uuid.RFC_4122
