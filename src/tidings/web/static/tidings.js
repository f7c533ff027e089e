/*! tidings.js — dependency-free browser client for the tidings server (WebSocket protocol v1).
 *
 * Works three ways, no build step:
 *   <script src="/static/tidings.js"></script>            -> globalThis.Tidings (also TidingsClient)
 *   import { Tidings } from "/static/tidings.mjs";         -> ES module (re-exports this file)
 *   const { Tidings } = require("./tidings.js");           -> CommonJS (pass a WebSocket implementation)
 *
 * This file is deliberately a classic script (no `export`), so it can also be loaded by an ES module
 * with `import "./tidings.js"`. See docs/js-client.md for the API.
 */
(function (root) {
  "use strict";

  if (root.Tidings && root.Tidings.PROTOCOL_VERSION) {
    // Loaded twice (e.g. by a <script> tag and by tidings.mjs): keep the first definition so that
    // `instanceof` and shared state keep working.
    if (typeof module === "object" && module && module.exports) module.exports = root.Tidings;
    return;
  }

  var PROTOCOL_VERSION = 1;
  var VERSION = "1.0.0";

  // Close codes after which reconnecting cannot help (docs/protocol.md). Everything else — including
  // 1006 (connection dropped, server killed) — reconnects. A `disconnect` push overrides this.
  var NO_RECONNECT = new Set([1000, 1002, 1003, 1007, 1008, 1009, 1010, 4001, 4003, 4004, 4400]);
  // Error codes of a failed subscribe that are worth retrying on the same connection.
  var TRANSIENT = new Set(["unavailable", "internal", "rate_limited", "timeout"]);

  var DEFAULTS = {
    url: null, // ws(s)://host/ws; default: same host as the page, path /ws
    token: null, // connection token (JWT), sent in a `connect` command
    getToken: null, // function returning a token or a Promise of one; called before every connect
    minReconnectDelay: 500, // ms
    maxReconnectDelay: 20000, // ms
    timeout: 10000, // ms: per request, and for the socket to open
    pingInterval: 25000, // ms of silence after which a ping checks the connection; 0 disables
    reconnect: true, // false: never reconnect automatically
    WebSocket: null, // WebSocket constructor; default: globalThis.WebSocket
    debug: false, // log frames with console.debug
  };

  /** An error with a stable `code` (a server error code, or timeout / disconnected / closed). */
  class TidingsError extends Error {
    constructor(code, message, extra) {
      super(message || code);
      this.name = "TidingsError";
      this.code = code;
      if (extra) {
        for (var k in extra) if (Object.prototype.hasOwnProperty.call(extra, k)) this[k] = extra[k];
      }
    }
  }

  function defaultUrl() {
    var loc = root.location;
    if (!loc || !loc.host) throw new TypeError("tidings: the url option is required outside a browser page");
    return (loc.protocol === "https:" ? "wss:" : "ws:") + "//" + loc.host + "/ws";
  }

  function resolveUrl(url) {
    if (!url) return defaultUrl();
    if (/^wss?:\/\//i.test(url)) return url;
    if (/^https?:\/\//i.test(url)) return url.replace(/^http/i, "ws");
    // Relative URL ("/ws", "ws"): resolve against the page.
    var loc = root.location;
    if (!loc) throw new TypeError("tidings: a relative url needs a browser page");
    var abs = new URL(url, loc.href);
    abs.protocol = abs.protocol === "https:" ? "wss:" : "ws:";
    return abs.href;
  }

  function normPosition(pos) {
    if (!pos || typeof pos !== "object") return null;
    var off = Number(pos.offset);
    if (!Number.isFinite(off) || off < 0) return null;
    return { offset: Math.floor(off), epoch: pos.epoch == null ? "" : String(pos.epoch) };
  }

  function reportLater(err) {
    // An exception thrown by application code must not break the client; surface it asynchronously.
    setTimeout(function () { throw err; }, 0);
  }

  class Tidings {
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
      this._lastRecv = 0;
      this._connectedAt = 0;
      this._closedByUser = false;
      this._lastDisconnect = null;
      this._windowHooked = false;
      var self = this;
      this._onOnline = function () { self._wake(); };
      this._onOffline = function () {
        if (self._ws) self._drop(1006, "browser went offline");
      };
      this._onVisible = function () {
        if (root.document && root.document.visibilityState === "visible") self._wake();
      };
    }

    // ------------------------------------------------------------------------------------- events

    /** Listen to an event. Returns a function that removes the listener. */
    on(event, fn) {
      if (typeof fn !== "function") throw new TypeError("tidings: listener must be a function");
      var set = this._listeners.get(event);
      if (!set) this._listeners.set(event, (set = new Set()));
      set.add(fn);
      var self = this;
      return function () { self.off(event, fn); };
    }

    off(event, fn) {
      var set = this._listeners.get(event);
      if (set) {
        if (fn) set.delete(fn);
        else set.clear();
      }
      return this;
    }

    once(event, fn) {
      var off = this.on(event, function () {
        off();
        return fn.apply(this, arguments);
      });
      return off;
    }

    _emit(event) {
      var set = this._listeners.get(event);
      var args = Array.prototype.slice.call(arguments, 1);
      if (this.options.debug && root.console) root.console.debug("[tidings]", event, args);
      if (!set || set.size === 0) {
        if (event === "error" && this.options.debug && root.console) root.console.warn("[tidings] error", args[0]);
        return;
      }
      Array.from(set).forEach(function (fn) {
        try {
          fn.apply(null, args);
        } catch (e) {
          reportLater(e);
        }
      });
    }

    _setState(state) {
      if (this.state === state) return;
      var prev = this.state;
      this.state = state;
      this._emit("state", state, prev);
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
      var ws = this._ws;
      this._ws = null;
      if (ws) {
        this._detach(ws);
        try { ws.close(1000, "client closed"); } catch (e) { /* ignore */ }
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
      this._reconnectTimer = this._openTimer = this._pingTimer = null;
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
      var self = this;
      var token = this._token;
      var getToken = this.options.getToken;
      var seq = (this._openSeq = (this._openSeq || 0) + 1);
      var start = function (tok) {
        if (seq !== self._openSeq || self._closedByUser || self._ws) return;
        self._openSocket(tok);
      };
      if (typeof getToken === "function") {
        var p;
        try {
          p = Promise.resolve(getToken());
        } catch (e) {
          p = Promise.reject(e);
        }
        p.then(
          function (tok) {
            self._token = tok;
            start(tok);
          },
          function (err) {
            if (seq !== self._openSeq || self._closedByUser) return;
            self._emit("error", new TidingsError("token", "getToken failed: " + (err && err.message), { cause: err }));
            self._setState("disconnected");
            self._scheduleReconnect();
          }
        );
      } else {
        start(token);
      }
    }

    _openSocket(token) {
      var WS = this.options.WebSocket || root.WebSocket;
      var self = this;
      var ws;
      try {
        ws = new WS(this.url);
      } catch (e) {
        this._emit("error", new TidingsError("connect_failed", String(e && e.message), { cause: e }));
        this._setState("disconnected");
        this._scheduleReconnect();
        return;
      }
      this._ws = ws;
      this._lastDisconnect = null;
      this._openTimer = setTimeout(function () {
        if (self._ws === ws && self.state === "connecting") self._drop(1006, "connect timeout");
      }, this.options.timeout);
      ws.onopen = function () {
        if (self._ws === ws) self._onOpen(ws, token);
      };
      ws.onmessage = function (ev) {
        if (self._ws === ws) self._onFrame(ev.data);
      };
      ws.onclose = function (ev) {
        if (self._ws === ws) self._onClose(ev.code, ev.reason);
      };
      ws.onerror = function () { /* a close event follows */ };
    }

    _onOpen(ws, token) {
      var self = this;
      this._lastRecv = Date.now();
      var cmd = { op: "connect" };
      if (token) cmd.token = token;
      this._request(cmd, { internal: true, timeout: this.options.timeout }).then(
        function (res) {
          if (self._ws !== ws) return;
          clearTimeout(self._openTimer);
          self.clientId = (res && res.client) || null;
          self._connectedAt = Date.now();
          // Resubscribe and flush waiting requests before announcing "connected", so that anything a
          // state listener sends goes out after them (e.g. presence then counts this client).
          self._subs.forEach(function (sub) { self._sendSubscribe(sub); });
          var queued = self._queue;
          self._queue = [];
          queued.forEach(function (entry) { self._transmit(entry); });
          self._startPing(ws);
          self._setState("connected");
          if (self._ws === ws) self._emit("connected", { client: self.clientId, version: res && res.version });
        },
        function (err) {
          if (self._ws !== ws) return;
          self._emit("error", err);
          if (err.code === "token_expired" || TRANSIENT.has(err.code) || err.code === "disconnected") {
            self._drop(4002, err.message);
          } else {
            // unauthorized, permission_denied, ...: retrying with the same credentials cannot help.
            self._lastDisconnect = { code: 4001, reason: err.message, reconnect: false };
            self._drop(4001, err.message);
          }
        }
      );
    }

    _startPing(ws) {
      var interval = this.options.pingInterval;
      if (!interval) return;
      var self = this;
      clearInterval(this._pingTimer);
      this._pingTimer = setInterval(function () {
        if (self._ws !== ws || self.state !== "connected") return;
        if (Date.now() - self._lastRecv < interval) return;
        self._request({ op: "ping" }, { internal: true }).catch(function (err) {
          if (self._ws === ws && err.code === "timeout") self._drop(1006, "ping timeout");
        });
      }, Math.max(1000, Math.floor(interval / 2)));
    }

    /** Forget the current socket as if it closed with `code` (used for timeouts and `offline`). */
    _drop(code, reason) {
      var ws = this._ws;
      if (!ws) return;
      this._detach(ws);
      try { ws.close(); } catch (e) { /* ignore */ }
      this._onClose(code, reason);
    }

    _onClose(code, reason) {
      var ws = this._ws;
      if (ws) this._detach(ws);
      this._ws = null;
      this._clearTimers();
      var info = this._lastDisconnect || {
        code: code,
        reason: reason || "",
        reconnect: !NO_RECONNECT.has(code),
      };
      this._lastDisconnect = null;
      if (this._connectedAt && Date.now() - this._connectedAt > 5000) this._attempt = 0;
      this._connectedAt = 0;
      this._failRequests(new TidingsError("disconnected", "connection lost before the reply"), false);
      this._resetSubs();
      if (this._closedByUser) {
        this._setState("closed");
        return;
      }
      var reconnect = !!info.reconnect && !!this.options.reconnect;
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

    /** Exponential backoff with full jitter: uniform in [min, min(max, min * 2^(attempt+1))]. */
    _scheduleReconnect(fixedDelay) {
      var o = this.options;
      var min = Math.max(0, o.minReconnectDelay);
      var max = Math.max(min, o.maxReconnectDelay);
      var cap = Math.min(max, min * Math.pow(2, this._attempt + 1));
      var delay = fixedDelay != null ? fixedDelay : min + Math.random() * (cap - min);
      this._attempt = Math.min(this._attempt + 1, 30);
      var self = this;
      clearTimeout(this._reconnectTimer);
      this._reconnectTimer = setTimeout(function () {
        self._reconnectTimer = null;
        if (!self._closedByUser && !self._ws) self._open();
      }, delay);
      this._emit("reconnecting", { attempt: this._attempt, delay: Math.round(delay) });
    }

    // ---------------------------------------------------------------------------------- requests

    /**
     * Send any command and resolve with its `result` (reject with a TidingsError).
     * While not connected, the command waits (up to `timeout`) for the connection.
     */
    request(op, fields, opts) {
      var cmd = Object.assign({}, fields || {}, { op: op });
      return this._request(cmd, opts || {});
    }

    _request(cmd, opts) {
      var self = this;
      var timeout = opts.timeout != null ? opts.timeout : this.options.timeout;
      return new Promise(function (resolve, reject) {
        if (self.state === "closed" && !opts.internal) {
          reject(new TidingsError("closed", "the client is closed; call connect()"));
          return;
        }
        var id = self._nextId++;
        cmd.id = id;
        var entry = { id: id, cmd: cmd, resolve: resolve, reject: reject, timer: null, internal: !!opts.internal };
        entry.timer = setTimeout(function () {
          self._pending.delete(id);
          var i = self._queue.indexOf(entry);
          if (i >= 0) self._queue.splice(i, 1);
          reject(new TidingsError("timeout", cmd.op + " timed out after " + timeout + " ms", { op: cmd.op, channel: cmd.channel }));
        }, timeout);
        if (opts.internal || self.state === "connected") self._transmit(entry);
        else self._queue.push(entry);
      });
    }

    _transmit(entry) {
      var ws = this._ws;
      if (!ws || ws.readyState !== 1) {
        if (entry.internal) this._settle(entry, new TidingsError("disconnected", "not connected"));
        else this._queue.push(entry);
        return;
      }
      this._pending.set(entry.id, entry);
      var text = JSON.stringify(entry.cmd);
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
      var self = this;
      var sent = Array.from(this._pending.values());
      this._pending.clear();
      sent.forEach(function (entry) { self._settle(entry, err); });
      if (all) {
        var queued = this._queue;
        this._queue = [];
        queued.forEach(function (entry) { self._settle(entry, err); });
      }
    }

    // ------------------------------------------------------------------------------------- frames

    _onFrame(data) {
      this._lastRecv = Date.now();
      if (typeof data !== "string") return; // the protocol is JSON text only
      if (this.options.debug && root.console) root.console.debug("[tidings] <", data);
      var msg;
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
      var entry = this._pending.get(msg.id);
      if (!entry) return; // timed out already
      this._pending.delete(msg.id);
      if (msg.ok) {
        this._settle(entry, null, msg.result || {});
      } else {
        var e = msg.error || {};
        this._settle(entry, new TidingsError(e.code || "internal", e.message || "request failed", { op: entry.cmd.op, channel: entry.cmd.channel }));
      }
    }

    _onPush(msg) {
      switch (msg.type) {
        case "message": {
          var sub = this._subs.get(msg.channel);
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
          // The server ended one subscription (its token expired or its rights were withdrawn).
          var ended = this._subs.get(msg.channel);
          if (ended) this._subs.delete(msg.channel);
          this._emit("unsubscribed", { channel: msg.channel, code: msg.code, reason: msg.reason || "", resubscribe: !!msg.resubscribe });
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
     * opts.token: subscription token for private channels.
     * Resolves with the first subscribe result {channel, offset, epoch, recovered?}.
     */
    subscribe(channel, handler, opts) {
      if (typeof channel !== "string" || !channel) throw new TypeError("tidings: channel must be a non-empty string");
      if (handler != null && typeof handler !== "function") {
        opts = handler;
        handler = null;
      }
      opts = opts || {};
      var sub = this._subs.get(channel);
      if (sub) {
        if (handler) sub.handlers.add(handler);
        return sub.ready;
      }
      sub = {
        channel: channel,
        handlers: new Set(handler ? [handler] : []),
        position: normPosition(opts.since),
        token: opts.token || null,
        subscribed: false,
        buffer: null,
        settled: false,
        retry: null,
      };
      sub.ready = new Promise(function (resolve, reject) {
        sub.resolve = resolve;
        sub.reject = reject;
      });
      sub.ready.catch(function () { /* reported through the returned promise and the error event */ });
      this._subs.set(channel, sub);
      if (this.state === "connected") this._sendSubscribe(sub);
      return sub.ready;
    }

    _sendSubscribe(sub) {
      var self = this;
      var ws = this._ws;
      clearTimeout(sub.retry);
      var cmd = { op: "subscribe", channel: sub.channel };
      var since = sub.position;
      if (since) cmd.since = { offset: since.offset, epoch: since.epoch };
      if (sub.token) cmd.token = sub.token;
      sub.subscribed = false;
      sub.buffer = [];
      this._request(cmd, { internal: true }).then(
        function (res) {
          if (self._ws !== ws || self._subs.get(sub.channel) !== sub) return;
          self._onSubscribed(sub, res || {}, since);
        },
        function (err) {
          if (self._subs.get(sub.channel) !== sub || self._ws !== ws) return; // reconnect resubscribes
          sub.buffer = null;
          err.channel = sub.channel;
          self._emit("error", err);
          if (err.code === "timeout") {
            self._drop(1006, "subscribe timeout");
          } else if (TRANSIENT.has(err.code)) {
            sub.retry = setTimeout(function () {
              if (self._ws === ws && self.state === "connected" && self._subs.get(sub.channel) === sub) self._sendSubscribe(sub);
            }, 1000 + Math.random() * 2000);
          } else {
            self._subs.delete(sub.channel);
            if (!sub.settled) {
              sub.settled = true;
              sub.reject(err);
            }
          }
        }
      );
    }

    _onSubscribed(sub, res, since) {
      var top = { offset: Number(res.offset) || 0, epoch: res.epoch == null ? "" : String(res.epoch) };
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
      var buffered = sub.buffer || [];
      sub.buffer = null;
      this._emit("subscribed", { channel: sub.channel, offset: top.offset, epoch: top.epoch, recovered: res.recovered });
      if (!sub.settled) {
        sub.settled = true;
        sub.resolve(res);
      }
      for (var i = 0; i < buffered.length; i++) {
        if (this._subs.get(sub.channel) !== sub || !sub.subscribed) break;
        this._deliver(sub, buffered[i]);
      }
    }

    /** Deliver one publication: exactly once, in offset order (older or repeated offsets are dropped). */
    _deliver(sub, msg) {
      var off = Number(msg.offset);
      var epoch = msg.epoch == null ? "" : String(msg.epoch);
      var pos = sub.position;
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
      var pub = {
        channel: msg.channel,
        offset: off,
        epoch: epoch,
        id: msg.id,
        time: msg.time,
        data: msg.data,
      };
      if (msg.info !== undefined) pub.info = msg.info;
      sub.handlers.forEach(function (fn) {
        try {
          fn(pub);
        } catch (e) {
          reportLater(e);
        }
      });
      this._emit("message", pub);
    }

    _resetSubs() {
      this._subs.forEach(function (sub) {
        clearTimeout(sub.retry);
        sub.subscribed = false;
        sub.buffer = null;
      });
    }

    /**
     * Remove `handler` from a channel; without a handler (or when the last one goes), unsubscribe.
     * Resolves with the server's result ({} when nothing had to be sent).
     */
    unsubscribe(channel, handler) {
      var sub = this._subs.get(channel);
      if (!sub) return Promise.resolve({});
      if (handler) {
        sub.handlers.delete(handler);
        if (sub.handlers.size) return Promise.resolve({});
      }
      this._subs.delete(channel);
      clearTimeout(sub.retry);
      var wasActive = sub.subscribed || sub.buffer !== null;
      sub.subscribed = false;
      sub.buffer = null;
      if (!sub.settled) {
        sub.settled = true;
        sub.reject(new TidingsError("unsubscribed", "unsubscribed before the subscription completed", { channel: channel }));
      }
      if (this.state !== "connected" || !wasActive) return Promise.resolve({});
      return this._request({ op: "unsubscribe", channel: channel }, { internal: true }).catch(function (err) {
        if (err.code === "not_subscribed" || err.code === "disconnected") return {};
        throw err;
      });
    }

    /** The last position seen on a channel ({offset, epoch}), or null. */
    position(channel) {
      var sub = this._subs.get(channel);
      return sub && sub.position ? { offset: sub.position.offset, epoch: sub.position.epoch } : null;
    }

    /** Channels this client is subscribed to (or will resubscribe to on reconnect). */
    subscriptions() {
      return Array.from(this._subs.keys());
    }

    // ------------------------------------------------------------------------------------- ops

    /** Publish `data` (any JSON) to a channel. Resolves with {offset, epoch, id}. */
    publish(channel, data, opts) {
      return this.request("publish", { channel: channel, data: data === undefined ? null : data }, opts);
    }

    /**
     * Read a channel's history. opts: {limit, since: {offset, epoch}, timeout}.
     * Resolves with {publications: [...] (oldest first), offset, epoch}.
     */
    history(channel, opts) {
      opts = opts || {};
      var fields = { channel: channel };
      if (opts.limit != null) fields.limit = opts.limit;
      var since = normPosition(opts.since);
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

  root.Tidings = Tidings;
  root.TidingsClient = Tidings;
  root.TidingsError = TidingsError;
  if (typeof module === "object" && module && module.exports) module.exports = Tidings;
})(typeof globalThis !== "undefined" ? globalThis : typeof self !== "undefined" ? self : this);
