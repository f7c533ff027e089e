/*! tidings-client 0.1.0 — client for the tidings server (WebSocket protocol v1). MIT.
 * Built from clients/js/src/index.js by clients/js/build.mjs: do not edit. API: docs/js-client.md */
(() => {
  // src/index.js
  var root = typeof globalThis !== "undefined" ? globalThis : typeof self !== "undefined" ? self : {};
  var PROTOCOL_VERSION = 1;
  var VERSION = true ? "0.1.0" : "0.0.0-dev";
  var NO_RECONNECT = /* @__PURE__ */ new Set([1e3, 1002, 1003, 1007, 1008, 1009, 1010, 4001, 4003, 4004, 4400]);
  var TRANSIENT = /* @__PURE__ */ new Set(["unavailable", "internal", "rate_limited", "timeout"]);
  var PUBLISH_RETRY = /* @__PURE__ */ new Set(["disconnected", "timeout", "unavailable", "rate_limited"]);
  var DEFAULTS = {
    url: null,
    // ws(s)://host/ws; default: same host as the page, path /ws
    token: null,
    // connection token (JWT), sent in a `connect` command
    getToken: null,
    // () => token | Promise<token>; called before every connect and before expiry
    minReconnectDelay: 500,
    // ms
    maxReconnectDelay: 2e4,
    // ms
    timeout: 1e4,
    // ms: per request, and for the socket to open
    publishDeadline: 3e4,
    // ms: a publish is retried (same idempotency key) until this much time passed
    pingInterval: 25e3,
    // ms of silence after which a ping checks the connection; 0 disables
    reconnect: true,
    // false: never reconnect automatically
    WebSocket: null,
    // WebSocket constructor; default: globalThis.WebSocket
    debug: false
    // log frames with console.debug
  };
  var TidingsError = class extends Error {
    constructor(code, message, extra) {
      super(message || code);
      this.name = "TidingsError";
      this.code = code;
      if (extra) {
        for (const k in extra) if (Object.prototype.hasOwnProperty.call(extra, k)) this[k] = extra[k];
      }
    }
  };
  function defaultUrl() {
    const loc = root.location;
    if (!loc || !loc.host) throw new TypeError("tidings: the url option is required outside a browser page");
    return (loc.protocol === "https:" ? "wss:" : "ws:") + "//" + loc.host + "/ws";
  }
  function resolveUrl(url) {
    if (!url) return defaultUrl();
    if (/^wss?:\/\//i.test(url)) return url;
    if (/^https?:\/\//i.test(url)) return url.replace(/^http/i, "ws");
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
    setTimeout(() => {
      throw err;
    }, 0);
  }
  function renewDelay(ttl) {
    const t = Math.max(0, Number(ttl) || 0);
    return (t < 120 ? t * 0.5 : t - 60) * 1e3;
  }
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
  function callGetter(fn, arg) {
    try {
      return Promise.resolve(arg === void 0 ? fn() : fn(arg));
    } catch (e) {
      return Promise.reject(e);
    }
  }
  function delay(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }
  var Tidings = class {
    /**
     * @param {object|string} [options] options object, or just the URL.
     */
    constructor(options) {
      if (typeof options === "string") options = { url: options };
      this.options = Object.assign({}, DEFAULTS, options || {});
      this.url = resolveUrl(this.options.url);
      this.state = "disconnected";
      this.clientId = null;
      this._token = this.options.token;
      this._ws = null;
      this._listeners = /* @__PURE__ */ new Map();
      this._subs = /* @__PURE__ */ new Map();
      this._pending = /* @__PURE__ */ new Map();
      this._queue = [];
      this._nextId = 1;
      this._attempt = 0;
      this._reconnectTimer = null;
      this._openTimer = null;
      this._pingTimer = null;
      this._renewTimer = null;
      this._tokenEnds = 0;
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
      if (!set) this._listeners.set(event, set = /* @__PURE__ */ new Set());
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
      const off = this.on(event, function() {
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
      if (this._ws) return this;
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
          ws.close(1e3, "client closed");
        } catch (e) {
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
        this._setState("disconnected");
        this._scheduleReconnect(this.options.maxReconnectDelay);
        return;
      }
      this._setState("connecting");
      const getToken = this.options.getToken;
      const seq = this._openSeq = (this._openSeq || 0) + 1;
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
          this.clientId = res && res.client || null;
          this._connectedAt = Date.now();
          this._scheduleRenew(ws, res);
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
      this._tokenEnds = Date.now() + res.ttl * 1e3;
      this._renewTimer = setTimeout(() => this._renew(ws, 0), renewDelay(res.ttl));
    }
    _renew(ws, attempt) {
      this._renewTimer = null;
      if (this._ws !== ws || this.state !== "connected") return;
      callGetter(this.options.getToken).then(
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
      ).catch((err) => {
        if (this._ws !== ws) return;
        this._emit("error", err);
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
      }, Math.max(1e3, Math.floor(interval / 2)));
    }
    /** Forget the current socket as if it closed with `code` (used for timeouts and `offline`). */
    _drop(code, reason) {
      const ws = this._ws;
      if (!ws) return;
      this._detach(ws);
      try {
        ws.close();
      } catch (e) {
      }
      this._onClose(code, reason);
    }
    _onClose(code, reason) {
      const ws = this._ws;
      if (ws) this._detach(ws);
      this._ws = null;
      this._clearTimers();
      const info = this._lastDisconnect || {
        code,
        reason: reason || "",
        reconnect: !NO_RECONNECT.has(code)
      };
      if (info.code === 4002 && typeof this.options.getToken !== "function") info.reconnect = false;
      this._lastDisconnect = null;
      if (this._connectedAt && Date.now() - this._connectedAt > 5e3) this._attempt = 0;
      this._connectedAt = 0;
      this._failRequests(new TidingsError("disconnected", "connection lost before the reply"), false);
      this._resetSubs();
      if (this._closedByUser) {
        this._setState("closed");
        return;
      }
      const reconnect = !!info.reconnect && !!this.options.reconnect;
      this._emit("disconnect", { code: info.code, reason: info.reason || "", reconnect });
      if (!reconnect) {
        this._closedByUser = true;
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
      const cmd = Object.assign({}, fields || {}, { op });
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
        const entry = { id, cmd, resolve, reject, timer: null, internal: !!opts.internal };
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
      if (typeof data !== "string") return;
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
        if (msg.ok === false && msg.error) this._emit("error", new TidingsError(msg.error.code, msg.error.message));
        return;
      }
      const entry = this._pending.get(msg.id);
      if (!entry) return;
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
          const sub = this._subs.get(msg.channel);
          if (!sub) return;
          clearTimeout(sub.refreshTimer);
          clearTimeout(sub.retry);
          const lost = msg.resubscribe && msg.code === "insufficient_state";
          if (lost || msg.resubscribe && typeof sub.getToken === "function" && this.state === "connected") {
            sub.subscribed = false;
            sub.buffer = null;
            if (this.state === "connected") this._sendSubscribe(sub);
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
        channel,
        handlers: new Set(handler ? [handler] : []),
        position: normPosition(opts.since),
        token: opts.token || null,
        getToken: typeof opts.getToken === "function" ? opts.getToken : null,
        subscribed: false,
        buffer: null,
        settled: false,
        retry: null,
        // timer of a transient-failure retry
        attempt: 0,
        // transient failures in a row
        refreshTimer: null,
        grantEnds: 0,
        // Date.now() at which the subscription's grant expires
        seq: 0
        // bumped on every (re)subscribe; stale replies are ignored
      };
      sub.ready = new Promise((resolve, reject) => {
        sub.resolve = resolve;
        sub.reject = reject;
      });
      sub.ready.catch(() => {
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
            op: "subscribe"
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
      this._subToken(sub).then((token) => {
        if (!current()) return null;
        const cmd = { op: "subscribe", channel: sub.channel };
        if (since) cmd.since = { offset: since.offset, epoch: since.epoch };
        if (token) cmd.token = token;
        return this._request(cmd, { internal: true }).then((res) => {
          if (current()) this._onSubscribed(sub, res || {}, since);
        });
      }).catch((err) => {
        if (!current()) return;
        this._subscribeFailed(sub, err);
      });
    }
    _subscribeFailed(sub, err) {
      sub.buffer = null;
      err.channel = sub.channel;
      if (err.code === "timeout") {
        this._emit("error", err);
        this._drop(1006, "subscribe timeout");
        return;
      }
      const transient = TRANSIENT.has(err.code) || err.code === "token" || err.code === "token_expired" && sub.getToken;
      if (transient) {
        this._emit("error", err);
        this._retrySubscribe(sub);
        return;
      }
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
      this._emit("unsubscribed", { channel: sub.channel, code, reason: reason || "", resubscribe: !!resubscribe, position });
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
        sub.position = top;
        this._emit("gap", {
          channel: sub.channel,
          reason: since.epoch !== top.epoch ? "epoch" : "not_recovered",
          epochChanged: since.epoch !== top.epoch,
          previous: since,
          position: { offset: top.offset, epoch: top.epoch }
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
      sub.grantEnds = Date.now() + res.ttl * 1e3;
      const ws = this._ws;
      const seq = sub.seq;
      sub.refreshTimer = setTimeout(() => this._refresh(sub, ws, seq, 0), renewDelay(res.ttl));
    }
    _refresh(sub, ws, seq, attempt) {
      sub.refreshTimer = null;
      const current = () => this._ws === ws && this._subs.get(sub.channel) === sub && sub.seq === seq && sub.subscribed;
      if (!current()) return;
      this._subToken(sub).then((token) => {
        if (!current()) return null;
        return this._request({ op: "refresh", channel: sub.channel, token }, { internal: true }).then((res) => {
          if (current()) this._scheduleRefresh(sub, res);
        });
      }).catch((err) => {
        if (!current()) return;
        err.channel = sub.channel;
        this._emit("error", err);
        if (err.code === "not_subscribed") return;
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
            position: { offset: off - 1, epoch }
          });
        } else if (pos && off <= pos.offset) {
          return;
        } else if (pos && off > pos.offset + 1) {
          this._emit("gap", {
            channel: sub.channel,
            reason: "missing",
            epochChanged: false,
            previous: pos,
            position: { offset: off - 1, epoch },
            missing: { from: pos.offset + 1, to: off - 1 }
          });
        }
        sub.position = { offset: off, epoch };
      }
      const pub = {
        channel: msg.channel,
        offset: off,
        epoch,
        id: msg.id,
        time: msg.time,
        data: msg.data
      };
      if (msg.info !== void 0) pub.info = msg.info;
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
        sub.reject(new TidingsError("unsubscribed", "unsubscribed before the subscription completed", { channel }));
      }
      if (this.state !== "connected" || !wasActive) return Promise.resolve({});
      return this._request({ op: "unsubscribe", channel }, { internal: true }).catch((err) => {
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
      const fields = { channel, data: data === void 0 ? null : data, idempotency_key: key };
      const perTry = opts.timeout != null ? opts.timeout : this.options.timeout;
      const total = opts.deadline != null ? opts.deadline : this.options.publishDeadline;
      const deadline = Date.now() + Math.max(0, total);
      const attempt = (n) => this._request(Object.assign({ op: "publish" }, fields), {
        timeout: total > 0 ? Math.max(1, Math.min(perTry, deadline - Date.now())) : perTry
      }).catch((err) => {
        err.idempotencyKey = key;
        err.attempts = n + 1;
        if (!PUBLISH_RETRY.has(err.code) || this.state === "closed" || Date.now() >= deadline - 1) throw err;
        const wait = Math.min(Math.max(0, deadline - Date.now() - 1), Math.min(2e3, 100 * Math.pow(2, n)));
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
      const fields = { channel };
      if (opts.limit != null) fields.limit = opts.limit;
      const since = normPosition(opts.since);
      if (since) fields.since = since;
      return this.request("history", fields, { timeout: opts.timeout });
    }
    /** Who is in a channel. Resolves with {clients: [{client, user}], count}. */
    presence(channel, opts) {
      return this.request("presence", { channel }, opts);
    }
    /** Round trip to the server. Resolves with {}. */
    ping(opts) {
      return this.request("ping", {}, opts);
    }
  };
  Tidings.PROTOCOL_VERSION = PROTOCOL_VERSION;
  Tidings.VERSION = VERSION;
  Tidings.Error = TidingsError;
  Tidings.Tidings = Tidings;
  Tidings.TidingsClient = Tidings;
  Tidings.TidingsError = TidingsError;
  Tidings.default = Tidings;

  // src/global.js
  var root2 = typeof globalThis !== "undefined" ? globalThis : typeof self !== "undefined" ? self : {};
  var T = root2.Tidings && root2.Tidings.PROTOCOL_VERSION ? root2.Tidings : Tidings;
  root2.Tidings = T;
  root2.TidingsClient = T;
  root2.TidingsError = T.Error;
})();
if (typeof module === "object" && module && module.exports) module.exports = globalThis.Tidings;
