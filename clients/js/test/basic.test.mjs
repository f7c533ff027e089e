// Connect, subscribe, publish and receive with the ES-module build and `ws`; a permanent refusal is
// told to the app; the builds load as documented (ESM sets no globals, CJS and the classic script
// work under require).
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createRequire } from "node:module";
import { after, before, test } from "node:test";
import WebSocket from "ws";
import { Tidings, TidingsError, VERSION } from "../dist/index.mjs";
import { Inbox, ServerProcess, nextEvent, randomName, within } from "./helpers.mjs";

const require = createRequire(import.meta.url);
const pkg = require("../package.json");
let server;

before(async () => {
  server = await new ServerProcess().start();
});
after(async () => {
  await server?.dispose();
});

test("connect, subscribe, publish, receive", { timeout: 30000 }, async () => {
  const a = new Tidings({ url: server.url, WebSocket });
  const b = new Tidings({ url: server.url, WebSocket });
  try {
    const channel = randomName("pub:basic-");
    const inbox = new Inbox();
    a.connect();
    b.connect();
    const connected = await nextEvent(a, "connected");
    assert.match(connected.client, /.+/);
    assert.equal(connected.version, 1);
    const res = await a.subscribe(channel, inbox.handler);
    assert.equal(res.channel, channel);
    assert.equal(res.offset, 0);
    const sent = [];
    for (let i = 0; i < 5; i++) sent.push(await b.publish(channel, { n: i }));
    assert.deepEqual(sent.map((r) => r.offset), [1, 2, 3, 4, 5]);
    await inbox.until(5);
    assert.deepEqual(inbox.pubs.map((p) => p.data), [0, 1, 2, 3, 4].map((n) => ({ n })));
    assert.deepEqual(inbox.offsets, [1, 2, 3, 4, 5]);
    assert.deepEqual(a.position(channel), { offset: 5, epoch: sent[0].epoch });
    // Over the HTTP API too, and history.
    await server.publish(channel, { n: 5 });
    await inbox.until(6);
    const hist = await b.history(channel, { limit: 3 });
    assert.deepEqual(hist.publications.map((p) => p.offset), [4, 5, 6]);
    assert.equal((await a.presence(channel)).count, 1);
  } finally {
    a.close();
    b.close();
  }
});

test("a permanent refusal emits error and unsubscribed with the channel, and rejects", { timeout: 20000 }, async () => {
  const c = new Tidings({ url: server.url, WebSocket });
  try {
    const errors = [];
    const ended = [];
    c.on("error", (e) => errors.push(e));
    c.on("unsubscribed", (e) => ended.push(e));
    c.connect();
    const channel = randomName("priv:nope-"); // needs a subscription token
    await assert.rejects(c.subscribe(channel, () => {}), (err) => err instanceof TidingsError && err.code === "permission_denied");
    assert.deepEqual(errors.map((e) => [e.code, e.channel]), [["permission_denied", channel]]);
    assert.equal(ended.length, 1);
    assert.equal(ended[0].channel, channel);
    assert.equal(ended[0].code, "permission_denied");
    assert.deepEqual(c.subscriptions(), []);
  } finally {
    c.close();
  }
});

test("ESM import sets no globals; the package version is the library's", { timeout: 10000 }, () => {
  assert.equal(VERSION, pkg.version);
  assert.equal(Tidings.VERSION, pkg.version);
  const out = execFileSync(
    process.execPath,
    ["--input-type=module", "-e", `
      const before = new Set(Object.getOwnPropertyNames(globalThis));
      const m = await import(${JSON.stringify(new URL("../dist/index.mjs", import.meta.url).href)});
      const added = Object.getOwnPropertyNames(globalThis).filter((k) => !before.has(k));
      console.log(JSON.stringify({ added, names: Object.keys(m).sort(), same: m.default === m.Tidings && m.TidingsClient === m.Tidings }));
    `],
    { encoding: "utf8", timeout: 10000 }
  );
  const r = JSON.parse(out);
  assert.deepEqual(r.added, []);
  assert.deepEqual(r.names, ["PROTOCOL_VERSION", "Tidings", "TidingsClient", "TidingsError", "VERSION", "default"]);
  assert.equal(r.same, true);
});

test("require() of the CommonJS build and of the classic script", { timeout: 10000 }, () => {
  const out = execFileSync(
    process.execPath,
    ["-e", `
      const cjs = require(${JSON.stringify(require.resolve("../dist/index.cjs"))});
      const afterCjs = typeof globalThis.Tidings;
      const classic = require(${JSON.stringify(require.resolve("../dist/tidings.js"))});
      console.log(JSON.stringify({
        cjs: typeof cjs.Tidings, cjsDefault: cjs.default === cjs.Tidings, cjsError: typeof cjs.TidingsError,
        cjsVersion: cjs.VERSION, afterCjs,
        classic: classic === globalThis.Tidings && classic.Tidings === classic && classic.TidingsClient === classic,
        classicGlobals: globalThis.TidingsClient === classic && globalThis.TidingsError === classic.Error,
        url: new cjs.Tidings("http://h/ws").url,
      }));
    `],
    { encoding: "utf8", timeout: 10000 }
  );
  assert.deepEqual(JSON.parse(out), {
    cjs: "function", cjsDefault: true, cjsError: "function", cjsVersion: pkg.version, afterCjs: "undefined",
    classic: true, classicGlobals: true, url: "ws://h/ws",
  });
});
