// The `insufficient_state` unsubscribe push (protocol.md, Pushes → unsubscribe): a node that cannot keep
// a channel gapless ends its subscriptions; the client subscribes again at once with `since` on the same
// connection and the app sees no `unsubscribed`. The server is test/lossy_server.py: a real tidings app
// whose node can be made to miss a channel's live publications (they are still stored), and whose
// `/_test/lost` route makes the call a broker makes when it cannot repair the gap.
import assert from "node:assert/strict";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";
import { Tidings } from "../dist/index.mjs";
import { CONFIG, Inbox, ServerProcess, consecutive, mintToken, nextEvent, randomName } from "./helpers.mjs";

const SMALL = `${CONFIG}
[namespaces.small]
publish = true
history_size = 5
`;

const here = dirname(fileURLToPath(import.meta.url));
let server;
before(async () => {
  server = await new ServerProcess({ config: SMALL, script: join(here, "lossy_server.py") }).start();
});
after(async () => {
  await server?.dispose();
});

function record(client) {
  const events = { subscribed: [], unsubscribed: [], gap: [], disconnect: [], error: [], connected: [] };
  for (const name of Object.keys(events)) client.on(name, (e) => events[name].push(e));
  return events;
}

const drop = (channel, on) => server.api("POST", "/_test/drop", { channel, on });
const lost = (channel) => server.api("POST", "/_test/lost", { channel });

test("insufficient_state: resubscribed from the last position, every publication once, no unsubscribed", { timeout: 30000 }, async () => {
  const channel = randomName("pub:lossy-");
  const privChannel = randomName("priv:lossy-");
  const client = new Tidings({ url: server.url, WebSocket, minReconnectDelay: 100, maxReconnectDelay: 1000 });
  const events = record(client);
  const inbox = new Inbox();
  const privInbox = new Inbox();
  const both = async (data) => {
    await server.publish(channel, data);
    await server.publish(privChannel, data);
  };
  try {
    client.connect();
    await client.subscribe(channel, inbox.handler);
    // A fixed subscription token, no getToken: it goes on too (with the same token).
    await client.subscribe(privChannel, privInbox.handler, { token: mintToken({ sub: null, channel: privChannel, ttl: 300 }) });
    for (let i = 0; i < 3; i++) await both(i);
    await inbox.until(3);
    await privInbox.until(3);
    await drop(channel, true);
    await drop(privChannel, true);
    for (let i = 3; i < 6; i++) await both(i); // stored, never delivered live by this node
    await drop(channel, false);
    await drop(privChannel, false);
    const again = nextEvent(client, "subscribed", 10000, (e) => e.channel === channel);
    const privAgain = nextEvent(client, "subscribed", 10000, (e) => e.channel === privChannel);
    await lost(channel);
    await lost(privChannel);
    for (let i = 6; i < 9; i++) await both(i); // racing the re-subscribe
    assert.equal((await again).recovered, true);
    assert.equal((await privAgain).recovered, true);
    await inbox.until(9);
    await privInbox.until(9);
    await server.publish(channel, 9); // nothing was repeated before it
    await inbox.until(10);
    assert.deepEqual(inbox.pubs.map((p) => p.data), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert.ok(consecutive(inbox.offsets), `offsets: ${inbox.offsets}`);
    assert.deepEqual(privInbox.pubs.map((p) => p.data), [0, 1, 2, 3, 4, 5, 6, 7, 8]);
    const resubscribed = events.subscribed.slice(2);
    assert.deepEqual(resubscribed.map((e) => e.recovered), [true, true]);
    assert.deepEqual(new Set(resubscribed.map((e) => e.channel)), new Set([channel, privChannel]));
    assert.deepEqual(events.unsubscribed, []);
    assert.deepEqual(events.gap, []);
    assert.deepEqual(events.disconnect, []);
    assert.deepEqual(events.error, []);
    assert.equal(events.connected.length, 1);
    assert.deepEqual(new Set(client.subscriptions()), new Set([channel, privChannel]));
  } finally {
    client.close();
  }
});

test("insufficient_state beyond history: recovered false, a gap event, the subscription goes on", { timeout: 30000 }, async () => {
  const channel = randomName("small:lossy-");
  const client = new Tidings({ url: server.url, WebSocket, minReconnectDelay: 100, maxReconnectDelay: 1000 });
  const events = record(client);
  const inbox = new Inbox();
  try {
    client.connect();
    const first = await client.subscribe(channel, inbox.handler);
    for (let i = 0; i < 2; i++) await server.publish(channel, i);
    await inbox.until(2);
    await drop(channel, true);
    for (let i = 2; i < 9; i++) await server.publish(channel, i); // offsets 3-9: history keeps 5-9
    await drop(channel, false);
    const gap = nextEvent(client, "gap", 10000, (e) => e.channel === channel);
    const again = nextEvent(client, "subscribed", 10000, (e) => e.channel === channel);
    await lost(channel);
    const g = await gap;
    assert.deepEqual(g, {
      channel,
      reason: "not_recovered",
      epochChanged: false,
      previous: { offset: 2, epoch: first.epoch },
      position: { offset: 9, epoch: first.epoch },
    });
    const s = await again;
    assert.equal(s.recovered, false);
    assert.equal(s.offset, 9);
    await server.publish(channel, 9);
    await inbox.until(3);
    assert.deepEqual(inbox.pubs.map((p) => [p.offset, p.data]), [[1, 0], [2, 1], [10, 9]]);
    assert.deepEqual(events.unsubscribed, []);
    assert.deepEqual(events.disconnect, []);
    assert.deepEqual(client.subscriptions(), [channel]);
    assert.deepEqual(client.position(channel), { offset: 10, epoch: first.epoch });
  } finally {
    client.close();
  }
});
