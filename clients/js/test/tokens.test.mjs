// Token lifecycle with 3-second tokens, 20 s of publishing at 10/s, all at once (one test, so the
// suite pays the 20 s once):
//   A: connection tokens from getToken, renewed in-band: zero disconnects, every publication once
//      (A publishes them itself, so its publishes cross the renewals too).
//   B: a subscription with a per-subscription getToken, its grant renewed with `refresh`: every
//      publication once, no `unsubscribed`.
//   C: a subscription with a fixed 3-second token: when the grant ends the app gets `unsubscribed`
//      (code token_expired), never silence.
//   D: a subscription whose getToken keeps handing out the same expiry for a while, so the refreshes
//      cannot extend the first grant: the server ends it (`unsubscribe` push, resubscribe: true) and
//      the client subscribes again (retrying token_expired) with a fresh token and `since`: every
//      publication once, no `unsubscribed` for the app.
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
  const resubChannel = randomName("priv:resub-");
  const counts = { connTokens: 0, subTokens: 0 };
  const events = { A: [], B: [], C: [], D: [] };
  const track = (name, c) => {
    for (const ev of ["disconnect", "connected", "unsubscribed", "gap", "error"]) c.on(ev, (e) => events[name].push([ev, e && (e.code ?? e.client)]));
    c.on("subscribed", (e) => events[name].push(["subscribed", e.recovered ?? null]));
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
  const d = new Tidings({ url: server.url, WebSocket });
  track("A", a);
  track("B", b);
  track("C", c);
  track("D", d);
  const inA = new Inbox();
  const inB = new Inbox();
  const inD = new Inbox();
  try {
    a.connect();
    b.connect();
    c.connect();
    d.connect();
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
    const firstExp = Math.floor(Date.now() / 1000) + TTL; // D's first grant: refreshed to the same end
    const resubscribed = nextEvent(d, "subscribed", (TTL + 15) * 1000, (e) => e.recovered === true);
    resubscribed.catch(() => {}); // awaited below
    await d.subscribe(resubChannel, inD.handler, {
      getToken: (channel) => {
        // Fresh tokens only from a second after the first grant ended, so no refresh can extend it;
        // a re-subscribe before then gets token_expired, which the client retries with backoff.
        if (Date.now() / 1000 < firstExp + 1) return mintToken({ sub: null, channel, exp: firstExp });
        return mintToken({ sub: null, channel, ttl: 3600 });
      },
    });

    ended.catch(() => {}); // awaited below
    // A publishes over its own (token-renewing) connection; the backend (HTTP API) on B's channel,
    // which only subscription-token holders may read or write over /ws.
    const [onConn, onSub] = await Promise.all([
      paced(N, RATE, (i) => a.publish(connChannel, { i })),
      paced(N, RATE, (i) => Promise.all([server.publish(subChannel, { i }), server.publish(resubChannel, { i })])),
    ]);
    assert.deepEqual(onConn.map((r) => r.offset), [...Array(N).keys()].map((i) => i + 1));
    assert.deepEqual(onSub.map(([r]) => r.offset), [...Array(N).keys()].map((i) => i + 1));
    await inA.until(N);
    await inB.until(N);
    await inD.until(N);
    await resubscribed;

    const end = await ended;
    assert.equal(end.code, "token_expired");
    assert.equal(end.resubscribe, true);
    assert.equal(end.position.offset, 0); // the last position, to subscribe again from
    assert.deepEqual(c.subscriptions(), []);

    console.log(`# A: ${inA.pubs.length} delivered, ${counts.connTokens} connection tokens; B: ${inB.pubs.length} delivered, ${counts.subTokens} subscription tokens; events ${JSON.stringify(events)}`);
    // Every publication once, in order; no disconnect, no gap, no ended subscription.
    assert.equal(inA.pubs.length, N);
    assert.ok(consecutive(inA.offsets), `A offsets ${inA.offsets}`);
    assert.deepEqual(inA.pubs.map((p) => p.data.i), [...Array(N).keys()]);
    assert.equal(inB.pubs.length, N);
    assert.deepEqual(inB.pubs.map((p) => p.data.i), [...Array(N).keys()]);
    assert.ok(consecutive(inB.offsets), `B offsets ${inB.offsets}`);
    assert.deepEqual(events.A.map(([ev]) => ev), ["connected", "subscribed"]);
    // B's grant was renewed with `refresh`: one subscription all along, never ended and redone.
    assert.deepEqual(events.B.map(([ev]) => ev), ["connected", "subscribed"]);
    // D: ended by the server at its first grant's end, subscribed again from its position, silently
    // for the app (no `unsubscribed`), nothing lost.
    const dEvents = events.D.filter(([ev, code]) => !(ev === "error" && code === "token_expired"));
    assert.deepEqual(dEvents, [["connected", events.D[0][1]], ["subscribed", null], ["subscribed", true]]);
    assert.ok(consecutive(inD.offsets), `D offsets ${inD.offsets}`);
    assert.deepEqual(inD.pubs.map((p) => p.data.i), [...Array(N).keys()]);
    // The tokens were renewed in-band (one connection), many times over the 20 s.
    assert.ok(counts.connTokens >= SECONDS / TTL, `connection tokens: ${counts.connTokens}`);
    assert.ok(counts.subTokens >= SECONDS / TTL, `subscription tokens: ${counts.subTokens}`);
    assert.deepEqual(events.C.map(([ev]) => ev), ["connected", "subscribed", "unsubscribed"]);
  } finally {
    a.close();
    b.close();
    c.close();
    d.close();
  }
});

test("a fixed connection token that expires stops the client instead of reconnecting", { timeout: 20000 }, async () => {
  const c = new Tidings({ url: server.url, WebSocket, token: mintToken({ sub: "alice", ttl: 2 }), minReconnectDelay: 50 });
  const seen = [];
  c.on("reconnecting", () => seen.push("reconnecting"));
  const gone = nextEvent(c, "disconnect", 10000);
  c.connect();
  const d = await gone;
  assert.equal(d.code, 4002);
  assert.equal(d.reconnect, false);
  assert.equal(c.state, "closed");
  assert.deepEqual(seen, []);
  c.close();
});
