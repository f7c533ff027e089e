// Node's built-in WebSocket (Node 20: --experimental-websocket; Node >= 22: always there), which on
// a refused connection fires `error` and never `close`: the client treats that error as a failed
// attempt, so it keeps trying on its backoff schedule and connects soon after the server is back,
// instead of waiting out the 10 s connect timeout per attempt.
import assert from "node:assert/strict";
import { after, test } from "node:test";
import { Tidings } from "../dist/index.mjs";
import { Inbox, ServerProcess, nextEvent, randomName } from "./helpers.mjs";

let server;
after(async () => {
  await server?.dispose();
});

test("built-in WebSocket: reconnects within 2 s of the server coming back", { timeout: 60000 }, async () => {
  assert.equal(typeof globalThis.WebSocket, "function", "run with --experimental-websocket on Node 20");
  server = new ServerProcess();
  await server.start();
  const channel = randomName("pub:builtin-");
  const client = new Tidings({ url: server.url, minReconnectDelay: 200, maxReconnectDelay: 1000, timeout: 10000 });
  const inbox = new Inbox();
  try {
    client.connect();
    await client.subscribe(channel, inbox.handler);
    await server.publish(channel, 1);
    await inbox.until(1);

    await server.kill9();
    // Refused attempts while the server is down: each one ends at once (`error`), not after 10 s.
    const failed = [];
    client.on("disconnect", (d) => failed.push(d));
    for (let i = 0; i < 3; i++) await nextEvent(client, "disconnect", 5000);
    assert.ok(failed.every((d) => d.code === 1006 && d.reconnect), JSON.stringify(failed));

    const back = nextEvent(client, "connected", 20000);
    await server.start();
    const up = Date.now();
    await back;
    const took = Date.now() - up;
    console.log(`# reconnected ${took} ms after the server was back (${failed.length} refused attempts)`);
    assert.ok(took < 2000, `reconnected ${took} ms after the server was back`);
    await server.publish(channel, 2);
    await inbox.until(2);
    assert.deepEqual(inbox.pubs.map((p) => p.data), [1, 2]);
  } finally {
    client.close();
  }
});
