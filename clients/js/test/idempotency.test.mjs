// Idempotent publish retries: the server is frozen (SIGSTOP) while publishes are in flight; each one
// times out and is sent again with the same idempotency key; after SIGCONT the server reads every
// copy, and history holds each publication once, with each publish answered with its one offset.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import WebSocket from "ws";
import { Tidings } from "../dist/index.mjs";
import { ServerProcess, nextEvent, randomName, within } from "./helpers.mjs";

let server;
before(async () => {
  server = await new ServerProcess().start();
});
after(async () => {
  await server?.dispose();
});

/** The real `ws` WebSocket, recording the publish frames it sends (and calling onSend after each). */
function recordingWebSocket(sent, onSend) {
  return class extends WebSocket {
    send(data) {
      const cmd = JSON.parse(data);
      if (cmd.op === "publish") sent.push(cmd);
      super.send(data);
      onSend.fn();
    }
  };
}

test("a frozen server: publishes time out, are retried with their key, and are stored once", { timeout: 60000 }, async () => {
  const channel = randomName("pub:idem-");
  const sent = [];
  const onSend = { fn: () => {} };
  const client = new Tidings({ url: server.url, WebSocket: recordingWebSocket(sent, onSend), pingInterval: 0 });
  const K = 5;
  let frozen = false;
  try {
    client.connect();
    await nextEvent(client, "connected");
    await client.publish(channel, { warm: true });
    sent.length = 0;

    server.signal("SIGSTOP");
    frozen = true;
    // Each publish: 700 ms per attempt, retried for up to 30 s.
    const pending = [];
    for (let i = 0; i < K; i++) pending.push(client.publish(channel, { i }, { timeout: 700, deadline: 30000 }));
    const done = Promise.all(pending);
    // Wait (bounded) until every publish was sent at least twice with one key.
    await within(15000, new Promise((resolve) => {
      onSend.fn = () => {
        const copies = new Map();
        for (const cmd of sent) copies.set(cmd.data.i, (copies.get(cmd.data.i) || 0) + 1);
        if (copies.size === K && [...copies.values()].every((n) => n >= 2)) resolve();
      };
    }), "every publish to be retried");
    server.signal("SIGCONT");
    frozen = false;
    const results = await within(20000, done, "the publishes to be answered");

    const hist = await server.history(channel);
    assert.deepEqual(hist.map((p) => p.data), [{ warm: true }, ...[...Array(K).keys()].map((i) => ({ i }))], "each stored once");
    assert.deepEqual(results.map((r) => r.offset), [2, 3, 4, 5, 6]);
    for (let i = 0; i < K; i++) {
      const keys = new Set(sent.filter((c) => c.data.i === i).map((c) => c.idempotency_key));
      assert.equal(keys.size, 1, `publish ${i}: one key on every copy`);
      assert.match([...keys][0], /^.{1,64}$/);
    }
    assert.equal(new Set(sent.map((c) => c.idempotency_key)).size, K, "a key per publish");
    console.log(`# ${sent.length} publish frames for ${K} publications; history holds ${hist.length - 1}`);
  } finally {
    if (frozen) server.signal("SIGCONT");
    client.close();
  }
});

test("a caller's idempotency key is sent as given, and a repeat is stored once", { timeout: 20000 }, async () => {
  const channel = randomName("pub:idem-key-");
  const client = new Tidings({ url: server.url, WebSocket });
  try {
    client.connect();
    const first = await client.publish(channel, "x", { idempotencyKey: "order-42" });
    const again = await client.publish(channel, "x", { idempotencyKey: "order-42" });
    assert.deepEqual(again, first);
    assert.equal((await server.history(channel)).length, 1);
  } finally {
    client.close();
  }
});
