"""Counting for the fault tests: a steady HTTP publisher that records every acknowledged publication, and
a :class:`Ledger` that says what each acknowledged one became for a subscriber: delivered, flagged (a
``gap`` event covering it: ``recovered: false`` or a new epoch), or lost (neither) — lost must be 0."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tidings.client import GapEvent

from .conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}

Delivered = dict[str, list[tuple[int, str, int]]]  # channel -> [(offset, epoch, n)] in delivery order
Flagged = list[tuple[str, str, int, int | None]]  # (channel, epoch, after offset, up to offset | None)


@dataclass
class Ledger:
    """What was acknowledged (per channel: offset, epoch, the publication's ``n``) and when publishing
    failed; :meth:`report` counts what a subscriber got of it."""

    acked: dict[str, list[tuple[int, str, int]]] = field(default_factory=dict)
    away: int = 0  # acknowledged while the watched client(s) were not connected
    # every publish attempt: (time answered, HTTP status or 0 for no answer, seconds it took)
    attempts: list[tuple[float, int, float]] = field(default_factory=list)

    def ack(self, channel: str, offset: int, epoch: str, n: int) -> None:
        self.acked.setdefault(channel, []).append((offset, epoch, n))

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.acked.values())

    def report(self, delivered: Delivered, flagged: Flagged) -> dict[str, int]:
        counts = {"acknowledged": 0, "delivered": 0, "flagged": 0, "lost": 0, "duplicates": 0}
        for channel, acked in self.acked.items():
            got = delivered.get(channel, [])
            keys = [(o, e) for o, e, _ in got]
            counts["duplicates"] += len(keys) - len(set(keys))
            by_epoch: dict[str, list[int]] = {}
            for o, e, _ in got:
                by_epoch.setdefault(e, []).append(o)
            for e, offsets in by_epoch.items():
                assert offsets == sorted(offsets), f"{channel} epoch {e}: out of order: {offsets}"
            have = {(o, e): n for o, e, n in got}
            for offset, epoch, n in acked:
                counts["acknowledged"] += 1
                if (offset, epoch) in have:
                    # the same position with another publication: Redis reused an offset, unflagged
                    assert have[(offset, epoch)] == n, f"{channel} {epoch}/{offset}: got another publication"
                    counts["delivered"] += 1
                elif any(
                    ch == channel and e == epoch and offset > lo and (hi is None or offset <= hi)
                    for ch, e, lo, hi in flagged
                ):
                    counts["flagged"] += 1
                else:
                    counts["lost"] += 1
        return counts


def gap_recorder(flagged: Flagged) -> Callable[[GapEvent], None]:
    """A Python client ``gap`` handler that notes the range it flags."""

    def note(g: GapEvent) -> None:
        if g.previous is not None:
            hi = None if g.epoch_changed else g.position.offset
            flagged.append((g.channel, g.previous.epoch, g.previous.offset, hi))
        if g.epoch_changed:  # and the new epoch up to where the client resumes in it
            flagged.append((g.channel, g.position.epoch, 0, g.position.offset))

    return note


async def collect(sub: Any, into: Delivered) -> None:
    """Append each publication of a Python client ``Subscription`` to ``into``."""
    async for p in sub:
        into.setdefault(p.channel, []).append((p.offset, p.epoch, p.data["n"]))


async def publisher(
    session: aiohttp.ClientSession,
    url: str,
    ledger: Ledger,
    stop: asyncio.Event,
    channels: Sequence[str],
    rate: float,
    away: Callable[[], bool] = lambda: False,
) -> int:
    """POST /api/publish at ``rate``/s, round-robin over ``channels``, until ``stop``. Every 200 goes into
    the ledger; every attempt into ``ledger.attempts``. Returns the number of failed attempts."""
    n, failed = 0, 0
    start = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=10)
    while not stop.is_set():
        channel = channels[n % len(channels)]
        status, body = 0, None
        t0 = time.monotonic()
        try:
            async with session.post(
                f"{url}/api/publish",
                json={"channel": channel, "data": {"n": n}},
                headers=AUTH,
                timeout=timeout,
            ) as r:
                status, body = r.status, await r.json()
        except (aiohttp.ClientError, TimeoutError):
            pass
        ledger.attempts.append((time.monotonic(), status, time.monotonic() - t0))
        if status == 200 and body is not None:
            ledger.ack(channel, int(body["offset"]), str(body["epoch"]), n)
            ledger.away += away()
        else:
            failed += 1
        n += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, start + n / rate - time.monotonic()))
    return failed


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``cond`` every 20 ms; AssertionError(what) after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s: {what}") from None
