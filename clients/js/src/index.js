/*! tidings-client — dependency-free client for the tidings server (WebSocket protocol v1). MIT. */
// One source for every build (see build.mjs): dist/index.mjs (ES module), dist/index.cjs (CommonJS),
// dist/tidings.js (classic script, sets globalThis.Tidings; served at /static/tidings.js) and
// dist/tidings.min.js. This module sets no globals. API: docs/js-client.md; types: index.d.ts.

/* global __TIDINGS_VERSION__ */
const root = typeof globalThis !== "undefined" ? globalThis : typeof self !== "undefined" ? self : {};

export const PROTOCOL_VERSION = 1;
// Replaced at build time with package.json's version (which a test keeps equal to the server's).
export const VERSION = typeof __TIDINGS_VERSION__ === "string" ? __TIDINGS_VERSION__ : "0.0.0-dev";

// Close codes after which reconnecting cannot help (docs/protocol.md). Everything else — including
// 1006 (connection dropped, server killed) — reconnects. A `disconnect` push overrides this.
const NO_RECONNECT = new Set([1000, 1002, 1003, 1007, 1008, 1009, 1010, 4001, 4003, 4004, 4400]);
// Refusals of a subscribe (or refresh) that are worth retrying on the same connection, with backoff.
// `token_expired` is transient only when the subscription has a getToken (a fixed token stays expired).
const TRANSIENT = new Set(["unavailable", "internal", "rate_limited", "timeout"]);
// Failures after which a publish is sent again, with the same idempotency key.
const PUBLISH_RETRY = new Set(["disconnected", "timeout", "unavailable", "rate_limited"]);

const DEFAULTS = {
  url: null, // ws(s)://host/ws; default: same host as the page, path /ws
  token: null, // connection token (JWT), sent in a `connect` command
  getToken: null, // () => token | Promise<token>; called before every connect and before expiry
  minReconnectDelay: 500, // ms
  maxReconnectDelay: 20000, // ms
  timeout: 10000, // ms: per request, and for the socket to open
  publishDeadline: 30000, // ms: a publish is retried (same idempotency key) until this much time passed
  pingInterval: 25000, // ms of silence after which a ping checks the connection; 0 disables
  reconnect: true, // false: never reconnect automatically
  WebSocket: null, // WebSocket constructor; default: globalThis.WebSocket
  debug: false, // log frames with console.debug
};

/** An error with a stable `code` (a server error code, or timeout / disconnected / closed / ...). */
export class TidingsError extends Error {
  constructor(code, message, extra) {
    super(message || code);
    this.name = "TidingsError";
    this.code = code;
    if (extra) {
      for (const k in extra) if (Object.prototype.hasOwnProperty.call(extra, k)) this[k] = extra[k];
    }
  }
}

function defaultUrl() {
  const loc = root.location;
  if (!loc || !loc.host) throw new TypeError("tidings: the url option is required outside a browser page");
  return (loc.protocol === "https:" ? "wss:" : "ws:") + "//" + loc.host + "/ws";
}

function resolveUrl(url) {
  if (!url) return defaultUrl();
  if (/^wss?:\/\//i.test(url)) return url;
  if (/^https?:\/\//i.test(url)) return url.replace(/^http/i, "ws");
  // Relative URL ("/ws", "ws"): resolve against the page.
  const loc = root.location;
  if (!loc) throw new TypeError("tidings: a relative url needs a browser page");
  const abs = new URL(url, loc.href);
  abs.protocol = abs.protocol === "https:" ? "wss:" : "ws:";
  return abs.href;
}

function normPosition(pos) {
  if (!pos || typeof pos !== "object") return null;
  const off = Number(pos.offset);
  if (!Number.isFinite(off) || off < 0) return null;
  return { offset: Math.floor(off), epoch: pos.epoch == null ? "" : String(pos.epoch) };
}

function reportLater(err) {
  // An exception thrown by application code must not break the client; surface it asynchronously.
  setTimeout(() => {
    throw err;
  }, 0);
}

/** When to renew a token or grant that the server says lasts `ttl` more seconds (ms from now). */
function renewDelay(ttl) {
  const t = Math.max(0, Number(ttl) || 0);
  return (t < 120 ? t * 0.5 : t - 60) * 1000;
}

/** A random idempotency key (≤ 64 characters). */
function randomKey() {
  const c = root.crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID();
  const bytes = new Uint8Array(16);
  if (c && typeof c.getRandomValues === "function") c.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  let out = "";
  for (let i = 0; i < bytes.length; i++) out += (bytes[i] < 16 ? "0" : "") + bytes[i].toString(16);
  return out;
}

/** Call a token getter (sync or async) and always get a Promise. */
function callGetter(fn, arg) {
  try {
    return Promise.resolve(arg === undefined ? fn() : fn(arg));
  } catch (e) {
    return Promise.reject(e);
  }
}

function delay(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export class Tidings {
  /**
   * @param {object|string} [options] options object, or just the URL.
   */
  constructor(options) {
    if (typeof options === "string") options = { url: options };
    this.options = Object.assign({}, DEFAULTS, options || {});
    this.url = resolveUrl(this.options.url);
    /** "connecting" | "connected" | "disconnected" | "closed" */
    this.state = "disconnected";
    /** Client id assigned by the server (from the `connect` reply). */
    this.clientId = null;
    this._token = this.options.token;
    this._ws = null;
    this._listeners = new Map();
    this._subs = new Map(); // channel -> subscription record
    this._pending = new Map(); // request id -> entry (sent, waiting for the reply)
    this._queue = []; // entries waiting for a connection
    this._nextId = 1;
    this._attempt = 0;
    this._reconnectTimer = null;
    this._openTimer = null;
    this._pingTimer = null;
    this._renewTimer = null;
    this._tokenEnds = 0; // Date.now() at which the connection token expires (from the server's ttl)
    this._lastRecv = 0;
    this._connectedAt = 0;
    this._closedByUser = false;
    this._lastDisconnect = null;
    this._windowHooked = false;
    this._onOnline = () => this._wake();
    this._onOffline = () => {
      if (this._ws) this._drop(1006, "browser went offline");
    };
    this._onVisible = () => {
      if (root.document && root.document.visibilityState === "visible") this._wake();
    };
  }

  // ------------------------------------------------------------------------------------- events

  /** Listen to an event. Returns a function that removes the listener. */
  on(event, fn) {
    if (typeof fn !== "function") throw new TypeError("tidings: listener must be a function");
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(fn);
    return () => {
      this.off(event, fn);
    };
  }

  off(event, fn) {
    const set = this._listeners.get(event);
    if (set) {
      if (fn) set.delete(fn);
      else set.clear();
    }
    return this;
  }

  once(event, fn) {
    const off = this.on(event, function () {
      off();
      return fn.apply(this, arguments);
    });
    return off;
  }

  _emit(event, ...args) {
    const set = this._listeners.get(event);
    if (this.options.debug && root.console) root.console.debug("[tidings]", event, args);
    if (!set || set.size === 0) {
      if (event === "error" && this.options.debug && root.console) root.console.warn("[tidings] error", args[0]);
      return;
    }
    Array.from(set).forEach((fn) => {
      try {
        fn.apply(null, args);
      } catch (e) {
        reportLater(e);
      }
    });
  }

  _setState(state) {
    if (this.state === state) return;
    const prev = this.state;
    this.state = state;
    this._emit("state", state, prev);
  }

  /** Backoff with full jitter: uniform in [min, min(max, min * 2^(attempt+1))] ms. */
  _backoff(attempt) {
    const o = this.options;
    const min = Math.max(0, o.minReconnectDelay);
    const max = Math.max(min, o.maxReconnectDelay);
    const cap = Math.min(max, min * Math.pow(2, attempt + 1));
    return min + Math.random() * (cap - min);
  }

  // -------------------------------------------------------------------------------- connection

  /** Open the connection (and keep it open). Returns this. */
  connect() {
    this._closedByUser = false;
    this._hookWindow();
    if (this._ws) return this; // connecting or connected
    this._open();
    return this;
  }

  /** Close for good: no reconnect. Pending requests fail with code "closed". */
  close() {
    this._closedByUser = true;
    this._clearTimers();
    this._unhookWindow();
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      this._detach(ws);
      try {
        ws.close(1000, "client closed");
      } catch (e) {
        /* ignore */
      }
    }
    this._failRequests(new TidingsError("closed", "the client was closed"), true);
    this._resetSubs();
    this._setState("closed");
    return this;
  }

  /** Replace the connection token; used on the next (re)connect. */
  setToken(token) {
    this._token = token;
    return this;
  }

  _hookWindow() {
    if (this._windowHooked || typeof root.addEventListener !== "function") return;
    this._windowHooked = true;
    root.addEventListener("online", this._onOnline);
    root.addEventListener("offline", this._onOffline);
    if (root.document) root.document.addEventListener("visibilitychange", this._onVisible);
  }

  _unhookWindow() {
    if (!this._windowHooked) return;
    this._windowHooked = false;
    root.removeEventListener("online", this._onOnline);
    root.removeEventListener("offline", this._onOffline);
    if (root.document) root.document.removeEventListener("visibilitychange", this._onVisible);
  }

  _isOffline() {
    return !!(root.navigator && root.navigator.onLine === false);
  }

  /** Network came back or the tab became visible: retry now instead of waiting for the backoff. */
  _wake() {
    if (this._closedByUser || this.state !== "disconnected" || this._ws) return;
    this._attempt = 0;
    this._open();
  }

  _clearTimers() {
    clearTimeout(this._reconnectTimer);
    clearTimeout(this._openTimer);
    clearInterval(this._pingTimer);
    clearTimeout(this._renewTimer);
    this._reconnectTimer = this._openTimer = this._pingTimer = this._renewTimer = null;
  }

  _detach(ws) {
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
  }

  _open() {
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    if (this._isOffline()) {
      // No network: wait for the `online` event (with a slow retry in case it never fires).
      this._setState("disconnected");
      this._scheduleReconnect(this.options.maxReconnectDelay);
      return;
    }
    this._setState("connecting");
    const getToken = this.options.getToken;
    const seq = (this._openSeq = (this._openSeq || 0) + 1);
    const start = (tok) => {
      if (seq !== this._openSeq || this._closedByUser || this._ws) return;
      this._openSocket(tok);
    };
    if (typeof getToken === "function") {
      callGetter(getToken).then(
        (tok) => {
          this._token = tok;
          start(tok);
        },
        (err) => {
          if (seq !== this._openSeq || this._closedByUser) return;
          this._emit("error", new TidingsError("token", "getToken failed: " + (err && err.message), { cause: err }));
          this._setState("disconnected");
          this._scheduleReconnect();
        }
      );
    } else {
      start(this._token);
    }
  }

  _openSocket(token) {
    const WS = this.options.WebSocket || root.WebSocket;
    let ws;
    try {
      if (typeof WS !== "function") throw new TypeError("no WebSocket implementation: pass the WebSocket option");
      ws = new WS(this.url);
    } catch (e) {
      this._emit("error", new TidingsError("connect_failed", String(e && e.message), { cause: e }));
      this._setState("disconnected");
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    this._lastDisconnect = null;
    this._openTimer = setTimeout(() => {
      if (this._ws === ws && this.state === "connecting") this._drop(1006, "connect timeout");
    }, this.options.timeout);
    ws.onopen = () => {
      if (this._ws === ws) this._onOpen(ws, token);
    };
    ws.onmessage = (ev) => {
      if (this._ws === ws) this._onFrame(ev.data);
    };
    ws.onclose = (ev) => {
      if (this._ws === ws) this._onClose(ev.code, ev.reason);
    };
    ws.onerror = () => {
      // While connecting, an error is a failed attempt: some implementations (Node's built-in
      // WebSocket on a refused connection) fire `error` and never `close`. Once connected, the
      // `close` event that follows an error does the work.
      if (this._ws === ws && this.state === "connecting") this._drop(1006, "connection failed");
    };
  }

  _onOpen(ws, token) {
    this._lastRecv = Date.now();
    const cmd = { op: "connect" };
    if (token) cmd.token = token;
    this._request(cmd, { internal: true, timeout: this.options.timeout }).then(
      (res) => {
        if (this._ws !== ws) return;
        clearTimeout(this._openTimer);
        this.clientId = (res && res.client) || null;
        this._connectedAt = Date.now();
        this._scheduleRenew(ws, res);
        // Resubscribe and flush waiting requests before announcing "connected", so that anything a
        // state listener sends goes out after them (e.g. presence then counts this client).
        this._subs.forEach((sub) => this._sendSubscribe(sub));
        const queued = this._queue;
        this._queue = [];
        queued.forEach((entry) => this._transmit(entry));
        this._startPing(ws);
        this._setState("connected");
        if (this._ws === ws) this._emit("connected", { client: this.clientId, version: res && res.version });
      },
      (err) => {
        if (this._ws !== ws) return;
        this._emit("error", err);
        if (err.code === "token_expired" || TRANSIENT.has(err.code) || err.code === "disconnected") {
          this._drop(4002, err.message);
        } else {
          // unauthorized, permission_denied, ...: retrying with the same credentials cannot help.
          this._lastDisconnect = { code: 4001, reason: err.message, reconnect: false };
          this._drop(4001, err.message);
        }
      }
    );
  }

  // ---------------------------------------------------------------------- connection token renewal

  /** After a `connect` reply with `ttl`: renew the token in-band (a new `connect`) before it expires. */
  _scheduleRenew(ws, res) {
    clearTimeout(this._renewTimer);
    this._renewTimer = null;
    if (!res || typeof res.ttl !== "number" || typeof this.options.getToken !== "function") return;
    this._tokenEnds = Date.now() + res.ttl * 1000;
    this._renewTimer = setTimeout(() => this._renew(ws, 0), renewDelay(res.ttl));
  }

  _renew(ws, attempt) {
    this._renewTimer = null;
    if (this._ws !== ws || this.state !== "connected") return;
    callGetter(this.options.getToken)
      .then(
        (tok) => {
          if (this._ws !== ws) return null;
          this._token = tok;
          return this._request({ op: "connect", token: tok }, { internal: true }).then((res) => {
            if (this._ws === ws) this._scheduleRenew(ws, res);
          });
        },
        (err) => {
          throw new TidingsError("token", "getToken failed: " + (err && err.message), { cause: err });
        }
      )
      .catch((err) => {
        if (this._ws !== ws) return;
        this._emit("error", err);
        // Retry until the token expires; after that the server closes with 4002 and the client
        // reconnects with a fresh token (the normal path).
        const left = this._tokenEnds - Date.now();
        if (left > 0 && this.state === "connected") {
          const wait = Math.max(50, Math.min(this._backoff(attempt), left / 2));
          this._renewTimer = setTimeout(() => this._renew(ws, attempt + 1), wait);
        }
      });
  }

  _startPing(ws) {
    const interval = this.options.pingInterval;
    if (!interval) return;
    clearInterval(this._pingTimer);
    this._pingTimer = setInterval(() => {
      if (this._ws !== ws || this.state !== "connected") return;
      if (Date.now() - this._lastRecv < interval) return;
      this._request({ op: "ping" }, { internal: true }).catch((err) => {
        if (this._ws === ws && err.code === "timeout") this._drop(1006, "ping timeout");
      });
    }, Math.max(1000, Math.floor(interval / 2)));
  }

  /** Forget the current socket as if it closed with `code` (used for timeouts and `offline`). */
  _drop(code, reason) {
    const ws = this._ws;
    if (!ws) return;
    this._detach(ws);
    try {
      ws.close();
    } catch (e) {
      /* ignore */
    }
    this._onClose(code, reason);
  }

  _onClose(code, reason) {
    const ws = this._ws;
    if (ws) this._detach(ws);
    this._ws = null;
    this._clearTimers();
    const info = this._lastDisconnect || {
      code: code,
      reason: reason || "",
      reconnect: !NO_RECONNECT.has(code),
    };
    // 4002 (token expired) with a fixed token: reconnecting with the same token is refused again.
    if (info.code === 4002 && typeof this.options.getToken !== "function") info.reconnect = false;
    this._lastDisconnect = null;
    if (this._connectedAt && Date.now() - this._connectedAt > 5000) this._attempt = 0;
    this._connectedAt = 0;
    this._failRequests(new TidingsError("disconnected", "connection lost before the reply"), false);
    this._resetSubs();
    if (this._closedByUser) {
      this._setState("closed");
      return;
    }
    const reconnect = !!info.reconnect && !!this.options.reconnect;
    this._emit("disconnect", { code: info.code, reason: info.reason || "", reconnect: reconnect });
    if (!reconnect) {
      this._closedByUser = true; // stays closed until connect() is called again
      this._unhookWindow();
      this._failRequests(new TidingsError("closed", "disconnected: " + (info.reason || info.code)), true);
      this._setState("closed");
      return;
    }
    this._setState("disconnected");
    this._scheduleReconnect();
  }

  _scheduleReconnect(fixedDelay) {
    const wait = fixedDelay != null ? fixedDelay : this._backoff(this._attempt);
    this._attempt = Math.min(this._attempt + 1, 30);
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      if (!this._closedByUser && !this._ws) this._open();
    }, wait);
    this._emit("reconnecting", { attempt: this._attempt, delay: Math.round(wait) });
  }

  // ---------------------------------------------------------------------------------- requests

  /**
   * Send any command and resolve with its `result` (reject with a TidingsError).
   * While not connected, the command waits (up to `timeout`) for the connection.
   */
  request(op, fields, opts) {
    const cmd = Object.assign({}, fields || {}, { op: op });
    return this._request(cmd, opts || {});
  }

  _request(cmd, opts) {
    const timeout = opts.timeout != null ? opts.timeout : this.options.timeout;
    return new Promise((resolve, reject) => {
      if (this.state === "closed" && !opts.internal) {
        reject(new TidingsError("closed", "the client is closed; call connect()"));
        return;
      }
      const id = this._nextId++;
      cmd.id = id;
      const entry = { id: id, cmd: cmd, resolve: resolve, reject: reject, timer: null, internal: !!opts.internal };
      entry.timer = setTimeout(() => {
        this._pending.delete(id);
        const i = this._queue.indexOf(entry);
        if (i >= 0) this._queue.splice(i, 1);
        reject(new TidingsError("timeout", cmd.op + " timed out after " + timeout + " ms", { op: cmd.op, channel: cmd.channel }));
      }, timeout);
      if (opts.internal || this.state === "connected") this._transmit(entry);
      else this._queue.push(entry);
    });
  }

  _transmit(entry) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) {
      if (entry.internal) this._settle(entry, new TidingsError("disconnected", "not connected"));
      else this._queue.push(entry);
      return;
    }
    this._pending.set(entry.id, entry);
    const text = JSON.stringify(entry.cmd);
    if (this.options.debug && root.console) root.console.debug("[tidings] >", text);
    try {
      ws.send(text);
    } catch (e) {
      this._pending.delete(entry.id);
      this._settle(entry, new TidingsError("disconnected", String(e && e.message)));
    }
  }

  _settle(entry, err, result) {
    clearTimeout(entry.timer);
    if (err) entry.reject(err);
    else entry.resolve(result);
  }

  /** Fail the requests already sent (their replies are lost); with `all`, also the queued ones. */
  _failRequests(err, all) {
    const sent = Array.from(this._pending.values());
    this._pending.clear();
    sent.forEach((entry) => this._settle(entry, err));
    if (all) {
      const queued = this._queue;
      this._queue = [];
      queued.forEach((entry) => this._settle(entry, err));
    }
  }

  // ------------------------------------------------------------------------------------- frames

  _onFrame(data) {
    this._lastRecv = Date.now();
    if (typeof data !== "string") return; // the protocol is JSON text only
    if (this.options.debug && root.console) root.console.debug("[tidings] <", data);
    let msg;
    try {
      msg = JSON.parse(data);
    } catch (e) {
      this._emit("error", new TidingsError("bad_frame", "invalid JSON from server"));
      return;
    }
    if (!msg || typeof msg !== "object") return;
    if (msg.type) {
      this._onPush(msg);
      return;
    }
    if (msg.id == null) {
      // An error about a frame the server could not read an id from.
      if (msg.ok === false && msg.error) this._emit("error", new TidingsError(msg.error.code, msg.error.message));
      return;
    }
    const entry = this._pending.get(msg.id);
    if (!entry) return; // timed out already
    this._pending.delete(msg.id);
    if (msg.ok) {
      this._settle(entry, null, msg.result || {});
    } else {
      const e = msg.error || {};
      this._settle(entry, new TidingsError(e.code || "internal", e.message || "request failed", { op: entry.cmd.op, channel: entry.cmd.channel }));
    }
  }

  _onPush(msg) {
    switch (msg.type) {
      case "message": {
        const sub = this._subs.get(msg.channel);
        if (!sub) return;
        if (!sub.subscribed) {
          // Subscribe reply not seen yet: hold until we know the position.
          if (sub.buffer) sub.buffer.push(msg);
          return;
        }
        this._deliver(sub, msg);
        return;
      }
      case "join":
      case "leave":
        this._emit(msg.type, { channel: msg.channel, client: msg.client, user: msg.user });
        return;
      case "disconnect":
        this._lastDisconnect = { code: msg.code, reason: msg.reason || "", reconnect: !!msg.reconnect };
        return;
      case "unsubscribe": {
        // The server ended one subscription: its grant expired (code token_expired, resubscribe:
        // true), its rights were withdrawn, or the node could not keep it gapless (code
        // insufficient_state, resubscribe: true). insufficient_state: subscribe again at once from the
        // last position, as after a reconnect (the reply says recovered; a gap event if not), and the
        // app sees no unsubscribed. token_expired: the same with a getToken; otherwise tell the app.
        // Never silence.
        const sub = this._subs.get(msg.channel);
        if (!sub) return;
        clearTimeout(sub.refreshTimer);
        clearTimeout(sub.retry);
        const lost = msg.resubscribe && msg.code === "insufficient_state";
        if (lost || (msg.resubscribe && typeof sub.getToken === "function" && this.state === "connected")) {
          sub.subscribed = false;
          sub.buffer = null;
          if (this.state === "connected") this._sendSubscribe(sub); // else the reconnect resubscribes
          return;
        }
        this._endSub(sub, msg.code || "unsubscribed", msg.reason || "", !!msg.resubscribe, null);
        return;
      }
      default:
        this._emit("push", msg);
    }
  }

  // ------------------------------------------------------------------------------ subscriptions

  /**
   * Subscribe to a channel. `handler(publication)` gets every publication once, in offset order.
   * opts.since = {offset, epoch}: resume after that position (missed publications are replayed).
   * opts.token: subscription token; opts.getToken(channel): a fresh one before each (re)subscribe
   * and before the grant expires.
   * Resolves with the first subscribe result {channel, offset, epoch, recovered?, expires?, ttl?}.
   */
  subscribe(channel, handler, opts) {
    if (typeof channel !== "string" || !channel) throw new TypeError("tidings: channel must be a non-empty string");
    if (handler != null && typeof handler !== "function") {
      opts = handler;
      handler = null;
    }
    opts = opts || {};
    let sub = this._subs.get(channel);
    if (sub) {
      if (handler) sub.handlers.add(handler);
      return sub.ready;
    }
    sub = {
      channel: channel,
      handlers: new Set(handler ? [handler] : []),
      position: normPosition(opts.since),
      token: opts.token || null,
      getToken: typeof opts.getToken === "function" ? opts.getToken : null,
      subscribed: false,
      buffer: null,
      settled: false,
      retry: null, // timer of a transient-failure retry
      attempt: 0, // transient failures in a row
      refreshTimer: null,
      grantEnds: 0, // Date.now() at which the subscription's grant expires
      seq: 0, // bumped on every (re)subscribe; stale replies are ignored
    };
    sub.ready = new Promise((resolve, reject) => {
      sub.resolve = resolve;
      sub.reject = reject;
    });
    sub.ready.catch(() => {
      /* reported through the returned promise and the error / unsubscribed events */
    });
    this._subs.set(channel, sub);
    if (this.state === "connected") this._sendSubscribe(sub);
    return sub.ready;
  }

  _subToken(sub) {
    if (!sub.getToken) return Promise.resolve(sub.token);
    return callGetter(sub.getToken, sub.channel).then(
      (tok) => {
        sub.token = tok;
        return tok;
      },
      (err) => {
        throw new TidingsError("token", "getToken failed for " + sub.channel + ": " + (err && err.message), {
          cause: err,
          channel: sub.channel,
          op: "subscribe",
        });
      }
    );
  }

  _sendSubscribe(sub) {
    const ws = this._ws;
    clearTimeout(sub.retry);
    clearTimeout(sub.refreshTimer);
    sub.retry = sub.refreshTimer = null;
    sub.subscribed = false;
    sub.buffer = [];
    const seq = ++sub.seq;
    const current = () => this._ws === ws && this._subs.get(sub.channel) === sub && sub.seq === seq;
    const since = sub.position;
    this._subToken(sub)
      .then((token) => {
        if (!current()) return null;
        const cmd = { op: "subscribe", channel: sub.channel };
        if (since) cmd.since = { offset: since.offset, epoch: since.epoch };
        if (token) cmd.token = token;
        return this._request(cmd, { internal: true }).then((res) => {
          if (current()) this._onSubscribed(sub, res || {}, since);
        });
      })
      .catch((err) => {
        if (!current()) return; // the connection changed meanwhile: reconnect resubscribes
        this._subscribeFailed(sub, err);
      });
  }

  _subscribeFailed(sub, err) {
    sub.buffer = null;
    err.channel = sub.channel;
    if (err.code === "timeout") {
      // The server may have acted on it (a late reply is ignored): start over on a new connection,
      // which re-subscribes from the last position.
      this._emit("error", err);
      this._drop(1006, "subscribe timeout");
      return;
    }
    const transient = TRANSIENT.has(err.code) || err.code === "token" || (err.code === "token_expired" && sub.getToken);
    if (transient) {
      this._emit("error", err);
      this._retrySubscribe(sub);
      return;
    }
    // Permanent: the subscription ends, and the app is told (error + unsubscribed), never silence.
    this._endSub(sub, err.code, err.message, false, err);
  }

  _retrySubscribe(sub) {
    const ws = this._ws;
    const wait = this._backoff(sub.attempt);
    sub.attempt = Math.min(sub.attempt + 1, 30);
    clearTimeout(sub.retry);
    sub.retry = setTimeout(() => {
      sub.retry = null;
      if (this._ws === ws && this.state === "connected" && this._subs.get(sub.channel) === sub) this._sendSubscribe(sub);
    }, wait);
  }

  /** The subscription is over: forget it, tell the app (`error` if err, then `unsubscribed`). */
  _endSub(sub, code, reason, resubscribe, err) {
    if (this._subs.get(sub.channel) === sub) this._subs.delete(sub.channel);
    clearTimeout(sub.retry);
    clearTimeout(sub.refreshTimer);
    sub.subscribed = false;
    sub.buffer = null;
    if (err) this._emit("error", err);
    const position = sub.position ? { offset: sub.position.offset, epoch: sub.position.epoch } : null;
    this._emit("unsubscribed", { channel: sub.channel, code: code, reason: reason || "", resubscribe: !!resubscribe, position: position });
    if (!sub.settled) {
      sub.settled = true;
      sub.reject(err || new TidingsError(code, reason || code, { channel: sub.channel, op: "subscribe" }));
    }
  }

  _onSubscribed(sub, res, since) {
    const top = { offset: Number(res.offset) || 0, epoch: res.epoch == null ? "" : String(res.epoch) };
    sub.attempt = 0;
    if (!since) {
      sub.position = top;
    } else if (res.recovered !== true) {
      // The server could not replay what we missed: tell the app to reload history.
      sub.position = top;
      this._emit("gap", {
        channel: sub.channel,
        reason: since.epoch !== top.epoch ? "epoch" : "not_recovered",
        epochChanged: since.epoch !== top.epoch,
        previous: since,
        position: { offset: top.offset, epoch: top.epoch },
      });
    }
    sub.subscribed = true;
    this._scheduleRefresh(sub, res);
    const buffered = sub.buffer || [];
    sub.buffer = null;
    this._emit("subscribed", { channel: sub.channel, offset: top.offset, epoch: top.epoch, recovered: res.recovered });
    if (!sub.settled) {
      sub.settled = true;
      sub.resolve(res);
    }
    for (let i = 0; i < buffered.length; i++) {
      if (this._subs.get(sub.channel) !== sub || !sub.subscribed) break;
      this._deliver(sub, buffered[i]);
    }
  }

  // ------------------------------------------------------------------------- subscription grants

  /** After a subscribe/refresh reply with `ttl`: renew the grant in-band (`refresh`) before it ends. */
  _scheduleRefresh(sub, res) {
    clearTimeout(sub.refreshTimer);
    sub.refreshTimer = null;
    if (!res || typeof res.ttl !== "number" || !sub.getToken) return;
    sub.grantEnds = Date.now() + res.ttl * 1000;
    const ws = this._ws;
    const seq = sub.seq;
    sub.refreshTimer = setTimeout(() => this._refresh(sub, ws, seq, 0), renewDelay(res.ttl));
  }

  _refresh(sub, ws, seq, attempt) {
    sub.refreshTimer = null;
    const current = () => this._ws === ws && this._subs.get(sub.channel) === sub && sub.seq === seq && sub.subscribed;
    if (!current()) return;
    this._subToken(sub)
      .then((token) => {
        if (!current()) return null;
        return this._request({ op: "refresh", channel: sub.channel, token: token }, { internal: true }).then((res) => {
          if (current()) this._scheduleRefresh(sub, res);
        });
      })
      .catch((err) => {
        if (!current()) return;
        err.channel = sub.channel;
        this._emit("error", err);
        if (err.code === "not_subscribed") return;
        // Keep trying until the grant ends; then the server's `unsubscribe` push (resubscribe: true)
        // makes the client subscribe again with a fresh token and `since`.
        const left = sub.grantEnds - Date.now();
        if (left > 0) {
          const wait = Math.max(50, Math.min(this._backoff(attempt), left / 2));
          sub.refreshTimer = setTimeout(() => this._refresh(sub, ws, seq, attempt + 1), wait);
        }
      });
  }

  /** Deliver one publication: exactly once, in offset order (older or repeated offsets are dropped). */
  _deliver(sub, msg) {
    const off = Number(msg.offset);
    const epoch = msg.epoch == null ? "" : String(msg.epoch);
    const pos = sub.position;
    if (Number.isFinite(off)) {
      if (pos && epoch !== pos.epoch) {
        this._emit("gap", {
          channel: sub.channel,
          reason: "epoch",
          epochChanged: true,
          previous: pos,
          position: { offset: off - 1, epoch: epoch },
        });
      } else if (pos && off <= pos.offset) {
        return; // duplicate or out of order: already delivered
      } else if (pos && off > pos.offset + 1) {
        this._emit("gap", {
          channel: sub.channel,
          reason: "missing",
          epochChanged: false,
          previous: pos,
          position: { offset: off - 1, epoch: epoch },
          missing: { from: pos.offset + 1, to: off - 1 },
        });
      }
      sub.position = { offset: off, epoch: epoch };
    }
    const pub = {
      channel: msg.channel,
      offset: off,
      epoch: epoch,
      id: msg.id,
      time: msg.time,
      data: msg.data,
    };
    if (msg.info !== undefined) pub.info = msg.info;
    sub.handlers.forEach((fn) => {
      try {
        fn(pub);
      } catch (e) {
        reportLater(e);
      }
    });
    this._emit("message", pub);
  }

  _resetSubs() {
    this._subs.forEach((sub) => {
      clearTimeout(sub.retry);
      clearTimeout(sub.refreshTimer);
      sub.retry = sub.refreshTimer = null;
      sub.subscribed = false;
      sub.buffer = null;
    });
  }

  /**
   * Remove `handler` from a channel; without a handler (or when the last one goes), unsubscribe.
   * Resolves with the server's result ({} when nothing had to be sent).
   */
  unsubscribe(channel, handler) {
    const sub = this._subs.get(channel);
    if (!sub) return Promise.resolve({});
    if (handler) {
      sub.handlers.delete(handler);
      if (sub.handlers.size) return Promise.resolve({});
    }
    this._subs.delete(channel);
    clearTimeout(sub.retry);
    clearTimeout(sub.refreshTimer);
    const wasActive = sub.subscribed || sub.buffer !== null;
    sub.subscribed = false;
    sub.buffer = null;
    if (!sub.settled) {
      sub.settled = true;
      sub.reject(new TidingsError("unsubscribed", "unsubscribed before the subscription completed", { channel: channel }));
    }
    if (this.state !== "connected" || !wasActive) return Promise.resolve({});
    return this._request({ op: "unsubscribe", channel: channel }, { internal: true }).catch((err) => {
      if (err.code === "not_subscribed" || err.code === "disconnected") return {};
      throw err;
    });
  }

  /** The last position seen on a channel ({offset, epoch}), or null. */
  position(channel) {
    const sub = this._subs.get(channel);
    return sub && sub.position ? { offset: sub.position.offset, epoch: sub.position.epoch } : null;
  }

  /** Channels this client is subscribed to (or will resubscribe to on reconnect). */
  subscriptions() {
    return Array.from(this._subs.keys());
  }

  // ------------------------------------------------------------------------------------- ops

  /**
   * Publish `data` (any JSON) to a channel. Resolves with {offset, epoch, id}.
   * opts: {idempotencyKey, timeout (per attempt), deadline (overall ms)}. The publish carries an
   * idempotency key (random unless given) and is sent again with the same key after `disconnected`
   * (once reconnected) or a timeout, until `deadline`: the server stores it once.
   */
  publish(channel, data, opts) {
    opts = opts || {};
    const key = opts.idempotencyKey != null ? String(opts.idempotencyKey) : randomKey();
    const fields = { channel: channel, data: data === undefined ? null : data, idempotency_key: key };
    const perTry = opts.timeout != null ? opts.timeout : this.options.timeout;
    const total = opts.deadline != null ? opts.deadline : this.options.publishDeadline;
    const deadline = Date.now() + Math.max(0, total);
    const attempt = (n) =>
      this._request(Object.assign({ op: "publish" }, fields), {
        timeout: total > 0 ? Math.max(1, Math.min(perTry, deadline - Date.now())) : perTry,
      }).catch((err) => {
        err.idempotencyKey = key;
        err.attempts = n + 1;
        if (!PUBLISH_RETRY.has(err.code) || this.state === "closed" || Date.now() >= deadline - 1) throw err;
        // Sent again with the same key: if the first one was stored, the server answers its offset.
        const wait = Math.min(Math.max(0, deadline - Date.now() - 1), Math.min(2000, 100 * Math.pow(2, n)));
        return delay(wait).then(() => {
          if (this.state === "closed") throw err;
          return attempt(n + 1);
        });
      });
    return attempt(0);
  }

  /**
   * Read a channel's history. opts: {limit, since: {offset, epoch}, timeout}.
   * Resolves with {publications: [...] (oldest first), offset, epoch}.
   */
  history(channel, opts) {
    opts = opts || {};
    const fields = { channel: channel };
    if (opts.limit != null) fields.limit = opts.limit;
    const since = normPosition(opts.since);
    if (since) fields.since = since;
    return this.request("history", fields, { timeout: opts.timeout });
  }

  /** Who is in a channel. Resolves with {clients: [{client, user}], count}. */
  presence(channel, opts) {
    return this.request("presence", { channel: channel }, opts);
  }

  /** Round trip to the server. Resolves with {}. */
  ping(opts) {
    return this.request("ping", {}, opts);
  }
}

Tidings.PROTOCOL_VERSION = PROTOCOL_VERSION;
Tidings.VERSION = VERSION;
Tidings.Error = TidingsError;
Tidings.Tidings = Tidings;
Tidings.TidingsClient = Tidings;
Tidings.TidingsError = TidingsError;
Tidings.default = Tidings;

export { Tidings as TidingsClient };
export default Tidings;
