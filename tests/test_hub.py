"""The hub and the subscription lifecycle, with list-backed fake sinks and a broker whose history read
blocks until the test lets it go (so the subscribe/publish race is forced, not hoped for)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest

from tidings.backends import HistoryOptions, HistoryResult, MemoryBroker
from tidings.backends.base import PublishRequest
from tidings.config import Namespace
from tidings.hub import Hub
from tidings.presence import LocalPresence
from tidings.protocol import CloseCode, Event, Publication, StreamPosition
from tidings.subscriptions import SubscribeOutcome, Subscriptions

WAIT = 5.0
_ids = itertools.count(1)


class FakeSink:
    """A subscriber that appends what it is pushed to ``items``; ``close`` only records."""

    def __init__(self, name: str = "") -> None:
        self._id = name or f"c{next(_ids)}"
        self.items: list[Publication | Event | str] = []
        self.close_code: CloseCode | None = None
        self.after_close = 0
        self.closed = False
        self.block: asyncio.Future[None] | None = None  # what writable() returns while set
        self.waited = asyncio.Event()
        self.changed = asyncio.Event()

    @property
    def client_id(self) -> str:
        return self._id

    @property
    def user(self) -> str:
        return f"user-{self._id}"

    def push(self, item: Publication | Event) -> None:
        if self.closed:  # a closed connection sends nothing more
            self.after_close += 1
            return
        self.items.append(item)
        self.changed.set()

    def close(self, code: CloseCode, reason: str | None = None) -> None:
        self.close_code = code
        self.closed = True
        self.changed.set()

    def writable(self) -> Awaitable[None] | None:
        if self.block is not None:
            self.waited.set()
        return self.block

    def ready(self, outcome: SubscribeOutcome) -> None:
        self.items.append("ready")

    # -- what the tests look at

    def pubs(self) -> list[Publication]:
        return [i for i in self.items if isinstance(i, Publication)]

    def offsets(self) -> list[int]:
        return [p.offset for p in self.pubs()]

    def kinds(self) -> list[str]:
        return [
            i if isinstance(i, str) else i.kind if isinstance(i, Event) else "message" for i in self.items
        ]

    async def until(self, pred: Callable[[], bool], timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                self.changed.clear()
                await self.changed.wait()


class GatedBroker(MemoryBroker):
    """A memory broker whose ``history`` blocks on ``gate`` while it is set (read before or after)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None
        self.read_first = False  # read the history, then wait (else: wait, then read)
        self.waiting = asyncio.Event()  # set once a history call is blocked on the gate
        self.events: list[Event] = []

    async def history(
        self, channel: str, opts: HistoryOptions, *, since: int | None = None, limit: int | None = None
    ) -> HistoryResult:
        gate = self.gate
        if gate is None:
            return await super().history(channel, opts, since=since, limit=limit)
        if self.read_first:
            res = await super().history(channel, opts, since=since, limit=limit)
        self.waiting.set()
        async with asyncio.timeout(WAIT):
            await gate.wait()
        if not self.read_first:
            res = await super().history(channel, opts, since=since, limit=limit)
        return res

    def publish_event(self, event: Event) -> None:
        self.events.append(event)
        super().publish_event(event)

    async def publish(
        self, channel: str, *data: object, opts: HistoryOptions | None = None
    ) -> list[Publication]:
        fut: asyncio.Future[list[Publication]] = asyncio.get_running_loop().create_future()

        def done(result: object) -> None:
            assert isinstance(result, list)
            fut.set_result(result)

        o = opts or HistoryOptions()
        self.publish_many([PublishRequest(channel, orjson.dumps(d), o) for d in data], done)
        async with asyncio.timeout(WAIT):
            return await fut


class Env:
    def __init__(self, hub: Hub, broker: GatedBroker) -> None:
        self.hub = hub
        self.broker = broker
        self.presence = LocalPresence()
        self.subs = Subscriptions(hub, broker, self.presence)

    def subscribe(
        self, sink: FakeSink, channel: str, ns: Namespace, since: StreamPosition | None = None
    ) -> asyncio.Task[SubscribeOutcome | None]:
        return asyncio.ensure_future(self.subs.subscribe(sink, channel, ns, since, sink.ready))

    async def live(
        self, sink: FakeSink, channel: str, ns: Namespace, since: StreamPosition | None = None
    ) -> None:
        async with asyncio.timeout(WAIT):
            outcome = await self.subscribe(sink, channel, ns, since)
        assert outcome is not None and self.hub.is_live(channel, sink)


MakeEnv = Callable[..., Awaitable[Env]]


@pytest.fixture
async def make_env() -> AsyncIterator[MakeEnv]:
    brokers: list[GatedBroker] = []

    async def make(**hub_kw: Any) -> Env:
        hub = Hub(**hub_kw)
        broker = GatedBroker()
        await broker.start(hub)
        brokers.append(broker)
        return Env(hub, broker)

    yield make
    for b in brokers:
        await b.close()


NS = Namespace("pub", publish=True)
CHAT = Namespace("chat", publish=True, join_leave=True)


@pytest.fixture
async def env(make_env: MakeEnv) -> Env:
    return await make_env()


# ---------------------------------------------------------------------------------------- the race


@pytest.mark.parametrize("read_first", [False, True], ids=["history-has-them", "pending-has-them"])
async def test_subscribe_publish_race_no_gap_no_duplicate(env: Env, read_first: bool) -> None:
    """Publications made while history is being read arrive exactly once, in order."""
    first = await env.broker.publish("pub:r", *range(1, 6))
    epoch = first[0].epoch
    env.broker.gate = asyncio.Event()
    env.broker.read_first = read_first
    sink = FakeSink()
    task = env.subscribe(sink, "pub:r", NS, StreamPosition(2, epoch))
    async with asyncio.timeout(WAIT):
        await env.broker.waiting.wait()
    assert not env.hub.is_live("pub:r", sink)
    await env.broker.publish("pub:r", *range(6, 11))  # land in the sink's pending list
    await env.broker.publish("pub:r", 11)
    assert sink.items == []  # catching up: nothing pushed yet
    env.broker.gate.set()
    async with asyncio.timeout(WAIT):
        outcome = await task
    assert outcome is not None and outcome.recovered is True
    await env.broker.publish("pub:r", 12)  # live now
    await sink.until(lambda: len(sink.pubs()) >= 10)
    assert sink.offsets() == list(range(3, 13))
    assert [p.data for p in sink.pubs()] == list(range(3, 13))
    assert sink.items[0] == "ready"


async def test_ready_comes_before_any_replayed_publication(env: Env) -> None:
    pubs = await env.broker.publish("pub:rd", *range(4))
    sink = FakeSink()
    await env.live(sink, "pub:rd", NS, StreamPosition(0, pubs[0].epoch))
    assert sink.kinds() == ["ready", "message", "message", "message", "message"]
    assert sink.offsets() == [1, 2, 3, 4]


async def test_pending_is_bounded_in_bytes_and_the_slow_subscriber_is_cut_off(make_env: MakeEnv) -> None:
    env = await make_env(max_pending_bytes=4096)
    other = FakeSink("other")
    await env.live(other, "pub:p", NS)
    env.broker.gate = asyncio.Event()
    slow = FakeSink("slow")
    task = env.subscribe(slow, "pub:p", NS, StreamPosition(0, "x"))
    async with asyncio.timeout(WAIT):
        await env.broker.waiting.wait()
    for i in range(10):
        await env.broker.publish("pub:p", "x" * 1000 + str(i))  # ~12 KB in all, over the 4 KB cap
    assert slow.close_code == CloseCode.SLOW_CONSUMER
    assert env.hub.subscribers("pub:p") == [other]
    env.broker.gate.set()
    async with asyncio.timeout(WAIT):
        assert await task is None
    assert slow.pubs() == [] and env.subs.channels_of(slow) == {}
    await other.until(lambda: len(other.pubs()) == 10)
    assert other.offsets() == list(range(1, 11)) and other.close_code is None


# ---------------------------------------------------------------------------------------- recovery


async def test_recovered_false_when_the_epoch_differs(env: Env) -> None:
    await env.broker.publish("pub:ep", *range(3))
    sink = FakeSink()
    async with asyncio.timeout(WAIT):
        outcome = await env.subscribe(sink, "pub:ep", NS, StreamPosition(1, "another-epoch"))
    assert outcome is not None and outcome.recovered is False and outcome.replay == []
    assert sink.items == ["ready"]
    await env.broker.publish("pub:ep", 3)
    await sink.until(lambda: bool(sink.pubs()))
    assert sink.offsets() == [4]  # live from the top on, nothing replayed


async def test_recovered_false_when_history_no_longer_reaches_back(env: Env) -> None:
    small = Namespace("small", publish=True, history_size=3)
    pubs = await env.broker.publish("small:x", *range(10), opts=small.history)
    sink = FakeSink()
    async with asyncio.timeout(WAIT):
        outcome = await env.subscribe(sink, "small:x", small, StreamPosition(2, pubs[0].epoch))
    assert outcome is not None and outcome.recovered is False and outcome.replay == []
    assert sink.items == ["ready"]
    # a position still covered does recover
    sink2 = FakeSink()
    async with asyncio.timeout(WAIT):
        ok = await env.subscribe(sink2, "small:x", small, StreamPosition(7, pubs[0].epoch))
    assert ok is not None and ok.recovered is True and sink2.offsets() == [8, 9, 10]


async def test_replay_is_paced_by_writable(env: Env) -> None:
    pubs = await env.broker.publish("pub:pace", *range(5))
    sink = FakeSink()
    sink.block = asyncio.get_running_loop().create_future()
    task = env.subscribe(sink, "pub:pace", NS, StreamPosition(0, pubs[0].epoch))
    async with asyncio.timeout(WAIT):
        await sink.waited.wait()
    assert sink.offsets() == [1]  # stopped after the first push until the sink drains
    await env.broker.publish("pub:pace", 5)  # live meanwhile: pending
    assert sink.offsets() == [1] and not task.done()
    fut, sink.block = sink.block, None
    fut.set_result(None)
    async with asyncio.timeout(WAIT):
        assert await task is not None
    assert sink.offsets() == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------- join/leave


async def test_join_and_leave_go_through_the_broker_to_other_live_sinks(env: Env) -> None:
    a, b = FakeSink("a"), FakeSink("b")
    await env.live(a, "chat:j", CHAT)
    await env.live(b, "chat:j", CHAT)
    await a.until(lambda: len(a.items) == 2)
    assert [(e.kind, e.client) for e in env.broker.events] == [("join", "a"), ("join", "b")]
    assert a.kinds() == ["ready", "join"] and a.items[1].client == "b"  # type: ignore[union-attr]
    assert b.kinds() == ["ready"]  # the joiner is not told about itself (and a joined before it)
    assert await env.presence.clients("chat:j") == [
        {"client": "a", "user": "user-a"},
        {"client": "b", "user": "user-b"},
    ]
    assert env.subs.unsubscribe(b, "chat:j")
    await a.until(lambda: len(a.items) == 3)
    assert a.kinds() == ["ready", "join", "leave"] and env.broker.events[-1].client == "b"
    assert b.kinds() == ["ready"]
    assert await env.presence.clients("chat:j") == [{"client": "a", "user": "user-a"}]
    assert not env.subs.unsubscribe(b, "chat:j")


async def test_unsubscribe_while_catching_up_says_nothing(env: Env) -> None:
    a = FakeSink("a")
    await env.live(a, "chat:c", CHAT)
    env.broker.gate = asyncio.Event()
    c = FakeSink("c")
    task = env.subscribe(c, "chat:c", CHAT, None)
    async with asyncio.timeout(WAIT):
        await env.broker.waiting.wait()
    assert env.subs.unsubscribe(c, "chat:c")
    env.broker.gate.set()
    async with asyncio.timeout(WAIT):
        assert await task is None
    assert [(e.kind, e.client) for e in env.broker.events] == [("join", "a")]
    assert env.hub.subscribers("chat:c") == [a] and c.items == []
    await env.broker.publish("chat:c", "after")
    await a.until(lambda: len(a.pubs()) == 1)
    assert a.kinds() == ["ready", "message"]
    assert await env.presence.clients("chat:c") == [{"client": "a", "user": "user-a"}]


class ClosingSink(FakeSink):
    """Closes itself on its first message (like a slow consumer); its clean-up runs later on the loop,
    as a transport's does."""

    def __init__(self, name: str, subs: Subscriptions) -> None:
        super().__init__(name)
        self.subs = subs

    def push(self, item: Publication | Event) -> None:
        super().push(item)
        if isinstance(item, Publication) and not self.closed:
            self.close(CloseCode.SLOW_CONSUMER)

    def close(self, code: CloseCode, reason: str | None = None) -> None:
        super().close(code, reason)
        asyncio.get_running_loop().call_soon(self.subs.drop, self)


async def test_deliver_does_not_re_enter_when_a_sink_closes_inside_push(env: Env) -> None:
    first = FakeSink("first")
    await env.live(first, "chat:n", CHAT)
    bad = ClosingSink("bad", env.subs)
    await env.live(bad, "chat:n", CHAT)
    last = FakeSink("last")
    await env.live(last, "chat:n", CHAT)
    await first.until(lambda: first.kinds() == ["ready", "join", "join"])
    await bad.until(lambda: bad.kinds() == ["ready", "join"])
    base = {s: len(s.items) for s in (first, last)}
    await env.broker.publish("chat:n", "m1", "m2")  # one group: delivered in one callback
    for s in (first, last):
        await s.until(lambda s=s: len(s.items) == base[s] + 3)  # type: ignore[misc]
        assert s.kinds()[base[s] :] == ["message", "message", "leave"], s.kinds()
        assert [p.data for p in s.pubs()] == ["m1", "m2"]
    assert env.hub.subscribers("chat:n") == [first, last]
    assert bad.close_code == CloseCode.SLOW_CONSUMER
    assert [(e.kind, e.client) for e in env.broker.events][-1] == ("leave", "bad")


# ---------------------------------------------------------------------------------------- interest


async def test_on_interest_first_and_last_subscriber(make_env: MakeEnv) -> None:
    calls: list[tuple[str, bool]] = []
    env = await make_env(on_interest=lambda ch, on: calls.append((ch, on)))
    a, b = FakeSink(), FakeSink()
    await env.live(a, "pub:i", NS)
    await env.live(b, "pub:i", NS)
    assert calls == [("pub:i", True)]
    env.subs.unsubscribe(a, "pub:i")
    assert calls == [("pub:i", True)]
    env.subs.drop(b)
    assert calls == [("pub:i", True), ("pub:i", False)]
    await env.live(a, "pub:i", NS)
    assert calls == [("pub:i", True), ("pub:i", False), ("pub:i", True)]


class CountingSink(FakeSink):
    """Counts what the hub and the replay say it was sent (``note_out``), as a connection's session does."""

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.out = 0

    def note_out(self, n: int) -> None:
        self.out += n


async def test_messages_out_are_the_tally_of_what_each_subscription_was_pushed(env: Env) -> None:
    """Nothing is counted per delivery: each sink's share of the channel's publications and events is
    told to it when its subscription ends, and equals what it was pushed (replay, live, join/leave; not
    the event about itself)."""
    first = await env.broker.publish("chat:t", 1, 2)  # history: replayed to a subscriber asking for it
    a, b = CountingSink("a"), CountingSink("b")
    await env.live(a, "chat:t", CHAT, since=StreamPosition(0, first[0].epoch))
    await env.live(b, "chat:t", CHAT)  # b's join reaches a, not b
    await env.broker.publish("chat:t", 3, 4)
    await a.until(lambda: a.kinds().count("message") == 4)
    await b.until(lambda: b.kinds().count("message") == 2)
    assert env.subs.unsubscribe(b, "chat:t")  # b's leave reaches a
    await a.until(lambda: "leave" in a.kinds())
    assert env.subs.unsubscribe(a, "chat:t")
    pushed = {s: len([i for i in s.items if i != "ready"]) for s in (a, b)}
    assert pushed == {a: 2 + 1 + 2 + 1, b: 2}
    assert (a.out, b.out) == (pushed[a], pushed[b])
