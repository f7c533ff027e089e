// Helpers for the package's Node tests: a real tidings server (`python -m tidings serve` in a
// subprocess, restartable on the same data dir and port), HS256 tokens made with node:crypto, and
// bounded waits on events (no sleeps).
import { spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const REPO = resolve(here, "..", "..", "..");
export const PYTHON = process.env.TIDINGS_PYTHON || "python3";
export const SECRET = "js-test-secret-0123456789abcdefghijklmnopqrstuv";
export const API_KEY = "js-test-api-key-0123456789";

/** The config every test server gets: tokens signed with SECRET, an API key, test namespaces. */
export const CONFIG = `
token_secret = "${SECRET}"
api_keys = [{ name = "test", key = "${API_KEY}", role = "admin" }]

[namespaces.pub]
publish = true

[namespaces.priv]
publish = true
subscribe = "token"
`;

function b64url(buf) {
  return Buffer.from(buf).toString("base64url");
}

/** An HS256 JWT (claims: sub unless null, exp = now + ttl seconds, and extra). */
export function mintToken({ sub = "alice", ttl = 300, ...extra } = {}, secret = SECRET) {
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const claims = { exp: Math.floor(Date.now() / 1000 + ttl), ...extra };
  if (sub !== null) claims.sub = sub;
  const body = b64url(JSON.stringify(claims));
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

/** Resolve with `promise`, or reject after `ms` naming `what`. */
export function within(ms, promise, what = "condition") {
  let timer;
  const limit = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, limit]).finally(() => clearTimeout(timer));
}

/** A promise of the next `event` of `client` whose arguments pass `pred`, within `ms`. */
export function nextEvent(client, event, ms = 10000, pred = () => true) {
  let off;
  const p = new Promise((resolve) => {
    off = client.on(event, (...args) => {
      if (pred(...args)) resolve(args[0]);
    });
  });
  return within(ms, p, `event ${event}`).finally(() => off());
}

/** Collects a channel's publications; `until(n)` waits (bounded) until n have arrived. */
export class Inbox {
  constructor() {
    this.pubs = [];
    this._waiters = [];
    this.handler = (pub) => {
      this.pubs.push(pub);
      this._waiters = this._waiters.filter((w) => !w());
    };
  }
  until(n, ms = 15000) {
    if (this.pubs.length >= n) return Promise.resolve(this.pubs);
    return within(
      ms,
      new Promise((resolve) => this._waiters.push(() => (this.pubs.length >= n ? (resolve(this.pubs), true) : false))),
      `${n} publications (have ${this.pubs.length})`
    );
  }
  get offsets() {
    return this.pubs.map((p) => p.offset);
  }
}

async function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** `tidings serve` in a subprocess; `restart()` keeps the data dir and the port. `script`: a Python
 * file to run instead (given `--port`, `--config` and the rest), e.g. test/lossy_server.py. */
export class ServerProcess {
  constructor({ config = CONFIG, port = 0, script = null } = {}) {
    this.script = script;
    this.dir = mkdtempSync(join(tmpdir(), "tidings-js-"));
    this.dataDir = join(this.dir, "data");
    mkdirSync(this.dataDir);
    this.configPath = join(this.dir, "tidings.toml");
    writeFileSync(this.configPath, config);
    this.port = port;
    this.proc = null;
    this.log = "";
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  get http() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Start and wait until it listens (bounded). */
  async start(ms = 20000) {
    if (!this.port) this.port = await freePort();
    const env = { ...process.env, PYTHONUNBUFFERED: "1" };
    const src = join(REPO, "src");
    env.PYTHONPATH = env.PYTHONPATH ? `${src}:${env.PYTHONPATH}` : src;
    const serve = this.script ? [this.script] : ["-m", "tidings", "serve", "--host", "127.0.0.1"];
    const args = [...serve, "--port", String(this.port), "--data-dir", this.dataDir, "--config", this.configPath];
    const proc = spawn(PYTHON, args, { env, stdio: ["ignore", "pipe", "pipe"] });
    this.proc = proc;
    const exited = new Promise((resolve) => proc.once("exit", (code, signal) => resolve({ code, signal })));
    this.exited = exited;
    const ready = new Promise((resolve, reject) => {
      const onData = (chunk) => {
        this.log += chunk.toString();
        if (this.log.includes("listening on")) resolve();
      };
      proc.stdout.on("data", onData);
      proc.stderr.on("data", onData);
      exited.then(({ code, signal }) => reject(new Error(`server exited (${code ?? signal}):\n${this.log}`)));
    });
    await within(ms, ready, "the server to listen");
    return this;
  }

  /** kill -9: no shutdown at all. */
  async kill9() {
    if (!this.proc || this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    this.proc.kill("SIGKILL");
    await within(10000, this.exited, "the server to die");
  }

  /** Graceful stop (SIGTERM: the server sends 1001 going away to its clients). */
  async stop() {
    if (!this.proc || this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    this.proc.kill("SIGTERM");
    try {
      await within(10000, this.exited, "the server to stop");
    } catch (e) {
      this.proc.kill("SIGKILL");
      await within(5000, this.exited, "the server to die");
    }
  }

  signal(sig) {
    this.proc.kill(sig);
  }

  async restart() {
    await this.stop();
    return this.start();
  }

  /** Stop and remove the data dir. */
  async dispose() {
    if (this.proc && this.proc.signalCode === null && this.proc.exitCode === null) {
      try {
        this.proc.kill("SIGCONT");
      } catch (e) {
        /* gone */
      }
    }
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** An HTTP API call (admin key). */
  async api(method, path, body) {
    const res = await fetch(this.http + path, {
      method,
      headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(10000),
    });
    const obj = await res.json();
    if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${JSON.stringify(obj)}`);
    return obj;
  }

  publish(channel, data) {
    return this.api("POST", "/api/publish", { channel, data });
  }

  async history(channel) {
    const res = await this.api("GET", `/api/channels/${channel}/history?limit=1000`);
    return res.publications;
  }
}

export function randomName(prefix) {
  return prefix + randomBytes(4).toString("hex");
}

/** Strictly increasing by one, starting after `from`. */
export function consecutive(offsets, from = 0) {
  return offsets.every((o, i) => o === from + i + 1);
}
