// Recovery across server restarts (kill -9, then graceful), with the SQLite default: the subscriber
// gets every publication once, in order, and no gap; a publish made while the server is down is
// held, sent after the reconnect, and stored once.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import WebSocket from "ws";
import { Tidings } from "../dist/index.mjs";
import { Inbox, ServerProcess, consecutive, nextEvent, randomName } from "./helpers.mjs";

let server;
before(async () => {
  server = await new ServerProcess().start();
});
after(async () => {
  await server?.dispose();
});

test("kill -9 and graceful restarts lose nothing and duplicate nothing", { timeout: 60000 }, async () => {
  const channel = randomName("pub:recovery-");
  const client = new Tidings({ url: server.url, WebSocket, minReconnectDelay: 100, maxReconnectDelay: 1000 });
  const inbox = new Inbox();
  const gaps = [];
  const disconnects = [];
  client.on("gap", (g) => gaps.push(g));
  client.on("disconnect", (d) => disconnects.push(d));
  try {
    client.connect();
    await client.subscribe(channel, inbox.handler);
    let n = 0;
    const burst = async (k) => {
      for (let i = 0; i < k; i++) await server.publish(channel, { n: n++ });
    };
    await burst(10);
    await inbox.until(10);

    for (const how of ["kill9", "graceful"]) {
      const down = nextEvent(client, "disconnect", 15000);
      if (how === "kill9") await server.kill9();
      else await server.stop();
      const d = await down;
      assert.equal(d.reconnect, true, `${how}: ${JSON.stringify(d)}`);
      // Published by the client while the server is down: held until the reconnect.
      const held = client.publish(channel, { n: "held-" + how });
      const back = nextEvent(client, "subscribed", 20000, (e) => e.channel === channel);
      await server.start();
      await burst(10); // published before the client is back: recovered from history
      const sub = await back;
      assert.equal(sub.recovered, true, `${how}: ${JSON.stringify(sub)}`);
      const stored = await held;
      await burst(5); // live
      const total = n + (how === "kill9" ? 1 : 2);
      await inbox.until(total);
      assert.ok(stored.offset > 0);
    }
    const hist = await server.history(channel);
    assert.equal(inbox.pubs.length, hist.length);
    assert.ok(consecutive(inbox.offsets), `offsets: ${inbox.offsets}`);
    assert.deepEqual(inbox.pubs.map((p) => p.data), hist.map((p) => p.data));
    assert.equal(hist.filter((p) => typeof p.data.n === "string").length, 2, "each held publish stored once");
    assert.deepEqual(gaps, []);
    assert.deepEqual(disconnects.map((d) => d.reconnect), disconnects.map(() => true));
  } finally {
    client.close();
  }
});
