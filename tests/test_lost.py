"""``Subscriptions.lost``: what a broker calls when this node cannot keep a channel gapless (a gap in its
live stream that history cannot fill, or the channel's stream lost). Every local subscription of the
channel ends with an ``insufficient_state`` push (``/ws``) or a 1012 close (``/chatsocket``), never in
silence; other channels and other clients are untouched; the client can subscribe again at once."""

from __future__ import annotations

import asyncio

import aiohttp

from .conftest import API_KEY, ProbeFactory, Server


async def publish(server: Server, channel: str, data: object) -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{server.http}/api/publish",
            json={"channel": channel, "data": data},
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as r,
    ):
        assert r.status == 200, await r.text()
        body: dict[str, object] = await r.json()
        return body


async def test_lost_ends_every_subscription_of_the_channel_with_a_push(
    server: Server, probe: ProbeFactory
) -> None:
    a, b = await probe(server), await probe(server)
    for p in (a, b):
        await p.ok("subscribe", channel="chat:x")
        await p.ok("subscribe", channel="chat:y")
    while not a.pushes.empty():
        a.pushes.get_nowait()
    server.node.subscriptions.lost("chat:x")
    for p in (a, b):
        async with asyncio.timeout(5):
            while True:
                push = await p.push()
                if push["type"] == "unsubscribe":
                    break
        assert push == {
            "type": "unsubscribe",
            "channel": "chat:x",
            "code": "insufficient_state",
            "reason": push["reason"],
            "resubscribe": True,
        }
    assert "chat:x" not in server.node.hub.channels()
    assert server.node.hub.channels()["chat:y"] == 2
    # presence was left: nobody is listed on the lost channel any more
    assert await server.node.presence.clients("chat:x") == []
    # chat:y still flows; chat:x can be subscribed again from the last position, gapless
    await publish(server, "chat:y", "still here")
    assert (await a.messages(1))[0]["data"] == "still here"
    r = await a.ok("subscribe", channel="chat:x", since={"offset": 0, "epoch": ""})
    assert r["recovered"] is True


async def test_a_subscription_still_catching_up_gets_its_reply_first(
    server: Server, probe: ProbeFactory
) -> None:
    p = await probe(server)
    await publish(server, "chat:z", "one")
    node = server.node
    read = node.broker.history
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow_history(*args: object, **kw: object) -> object:
        entered.set()
        await release.wait()
        return await read(*args, **kw)  # type: ignore[arg-type]

    node.broker.history = slow_history  # type: ignore[method-assign]
    try:
        rid = 77
        await p.send_raw(f'{{"id": {rid}, "op": "subscribe", "channel": "chat:z", "since": {{"offset": 0}}}}')
        await asyncio.wait_for(entered.wait(), 5)
        node.subscriptions.lost("chat:z")  # while the subscription reads history
        release.set()
        reply = await p.reply(rid)
        assert reply["ok"] is True
        pushes = [await p.push() for _ in range(2)]
    finally:
        node.broker.history = read  # type: ignore[method-assign]
    assert [x["type"] for x in pushes] == ["message", "unsubscribe"]
    assert pushes[1]["code"] == "insufficient_state"
    assert "chat:z" not in node.hub.channels()
    assert not node.subscriptions._lost


async def test_chatsocket_is_closed_with_1012_to_reconnect(server: Server) -> None:
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{server.http}/chatsocket") as ws:
        async with asyncio.timeout(5):
            while "chat:lobby" not in server.node.hub.channels():
                await asyncio.sleep(0.01)
        server.node.subscriptions.lost("chat:lobby")
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 1012
