// Token lifecycle with 3-second tokens, 20 s of publishing at 10/s, all at once (one test, so the
// suite pays the 20 s once):
//   A: connection tokens from getToken, renewed in-band: zero disconnects, every publication once
//      (A publishes them itself, so its publishes cross the renewals too).
//   B: a subscription with a per-subscription getToken, its grant renewed with `refresh`: every
//      publication once, no `unsubscribed`.
//   C: a subscription with a fixed 3-second token: when the grant ends the app gets `unsubscribed`
//      (code token_expired), never silence.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import WebSocket from "ws";
import { Tidings } from "../dist/index.mjs";
import { Inbox, ServerProcess, consecutive, mintToken, nextEvent, randomName } from "./helpers.mjs";

const TTL = 3; // seconds, every token
const SECONDS = 20;
const RATE = 10; // publications per second, per channel

let server;
before(async () => {
  server = await new ServerProcess().start();
});
after(async () => {
  await server?.dispose();
});

function paced(n, perSecond, fn) {
  // Fire fn(i) at perSecond; resolves with every result once all have settled.
  const start = Date.now();
  const results = [];
  return (async () => {
    for (let i = 0; i < n; i++) {
      results.push(fn(i));
      const next = start + ((i + 1) * 1000) / perSecond;
      await new Promise((r) => setTimeout(r, Math.max(0, next - Date.now())));
    }
    return Promise.all(results);
  })();
}

test("3-second connection and subscription tokens for 20 s at 10/s", { timeout: 90000 }, async () => {
  const N = SECONDS * RATE;
  const connChannel = randomName("pub:conn-");
  const subChannel = randomName("priv:sub-");
  const fixedChannel = randomName("priv:fixed-");
  const counts = { connTokens: 0, subTokens: 0 };
  const events = { A: [], B: [], C: [] };
  const track = (name, c) => {
    for (const ev of ["disconnect", "connected", "unsubscribed", "gap", "error"]) c.on(ev, (e) => events[name].push([ev, e && (e.code ?? e.client)]));
  };

  const a = new Tidings({
    url: server.url,
    WebSocket,
    getToken: async () => {
      counts.connTokens++;
      return mintToken({ sub: "alice", ttl: TTL });
    },
  });
  const b = new Tidings({ url: server.url, WebSocket });
  const c = new Tidings({ url: server.url, WebSocket });
  track("A", a);
  track("B", b);
  track("C", c);
  const inA = new Inbox();
  const inB = new Inbox();
  try {
    a.connect();
    b.connect();
    c.connect();
    const first = await a.subscribe(connChannel, inA.handler);
    assert.equal(first.offset, 0);
    const subRes = await b.subscribe(subChannel, inB.handler, {
      getToken: (channel) => {
        counts.subTokens++;
        return mintToken({ sub: null, channel, ttl: TTL });
      },
    });
    assert.equal(typeof subRes.ttl, "number");
    const fixedRes = await c.subscribe(fixedChannel, () => {}, { token: mintToken({ sub: null, channel: fixedChannel, ttl: TTL }) });
    assert.equal(typeof fixedRes.ttl, "number");
    const ended = nextEvent(c, "unsubscribed", (TTL + 10) * 1000, (e) => e.channel === fixedChannel);

    ended.catch(() => {}); // awaited below
    // A publishes over its own (token-renewing) connection; the backend (HTTP API) on B's channel,
    // which only subscription-token holders may read or write over /ws.
    const [onConn, onSub] = await Promise.all([
      paced(N, RATE, (i) => a.publish(connChannel, { i })),
      paced(N, RATE, (i) => server.publish(subChannel, { i })),
    ]);
    assert.deepEqual(onConn.map((r) => r.offset), [...Array(N).keys()].map((i) => i + 1));
    assert.deepEqual(onSub.map((r) => r.offset), [...Array(N).keys()].map((i) => i + 1));
    await inA.until(N);
    await inB.until(N);

    const end = await ended;
    assert.equal(end.code, "token_expired");
    assert.equal(end.resubscribe, true);
    assert.deepEqual(c.subscriptions(), []);

    console.log(`# A: ${inA.pubs.length} delivered, ${counts.connTokens} connection tokens; B: ${inB.pubs.length} delivered, ${counts.subTokens} subscription tokens; events ${JSON.stringify(events)}`);
    // Every publication once, in order; no disconnect, no gap, no ended subscription.
    assert.equal(inA.pubs.length, N);
    assert.ok(consecutive(inA.offsets), `A offsets ${inA.offsets}`);
    assert.deepEqual(inA.pubs.map((p) => p.data.i), [...Array(N).keys()]);
    assert.equal(inB.pubs.length, N);
    assert.deepEqual(inB.pubs.map((p) => p.data.i), [...Array(N).keys()]);
    assert.ok(consecutive(inB.offsets), `B offsets ${inB.offsets}`);
    assert.deepEqual(events.A.filter(([ev]) => ev !== "connected"), []);
    assert.deepEqual(events.A.filter(([ev]) => ev === "connected").length, 1);
    assert.deepEqual(events.B.filter(([ev]) => ev !== "connected"), []);
    // The tokens were renewed in-band (one connection), many times over the 20 s.
    assert.ok(counts.connTokens >= SECONDS / TTL, `connection tokens: ${counts.connTokens}`);
    assert.ok(counts.subTokens >= SECONDS / TTL, `subscription tokens: ${counts.subTokens}`);
    assert.deepEqual(events.C.map(([ev]) => ev), ["connected", "unsubscribed"]);
  } finally {
    a.close();
    b.close();
    c.close();
  }
});
