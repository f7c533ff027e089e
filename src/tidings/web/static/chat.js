/* The tidings chat page. Needs tidings.js loaded first. No inline code: the page runs under a strict CSP.
 *
 * Messages are keyed by offset: each is shown once, in offset order, whether it came from the
 * server-rendered HTML, a live push, a publish reply, or a history reload after a gap.
 * User data is only ever put in the page with textContent / DOM APIs, never innerHTML.
 */
(function () {
  "use strict";
  document.documentElement.classList.remove("no-js");

  var NICK_KEY = "tidings.nick";
  var MAX_MESSAGES = 1000;
  var GROUP_MS = 5 * 60 * 1000;
  var PRESENCE_EVERY_MS = 10000;
  var URL_RE = /\bhttps?:\/\/[^\s<>"'`]+/gi;
  var TRAILING = /[.,;:!?*'"`\]}>]+$/;

  function $(id) { return document.getElementById(id); }

  function init() {
    var configEl = $("tidings-config");
    var config = configEl ? JSON.parse(configEl.textContent || "{}") : {};
    var channel = String(config.channel || "chat:" + (config.room || "lobby"));
    var room = String(config.room || channel.replace(/^[^:]*:/, ""));

    var list = $("messages");
    var emptyEl = $("empty");
    var jumpBtn = $("jump");
    var statusEl = $("status");
    var statusLabel = statusEl.querySelector(".status-label") || statusEl;
    var countEl = $("online-count");
    var form = $("composer");
    var textEl = $("text");
    var nickEl = $("nick");
    var sendBtn = $("send");
    var noticeEl = $("notice");

    var baseTitle = "#" + room + " · tidings";
    var byOffset = new Map(); // offset -> element
    var epoch = config.position && config.position.epoch != null ? String(config.position.epoch) : null;
    var unread = 0;
    var unseenBelow = 0;
    var everConnected = false;

    var timeFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", hour12: false });
    var fullFmt = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

    // ------------------------------------------------------------------------------------ nickname

    function storageGet(key) {
      try { return window.localStorage.getItem(key); } catch (e) { return null; }
    }
    function storageSet(key, value) {
      try { window.localStorage.setItem(key, value); } catch (e) { /* private mode */ }
    }
    function randomGuest() {
      var n = Math.floor(Math.random() * 10000);
      return "guest-" + String(n).padStart(4, "0");
    }
    var storedNick = (storageGet(NICK_KEY) || "").trim();
    if (!storedNick) {
      storedNick = randomGuest();
      storageSet(NICK_KEY, storedNick);
    }
    nickEl.value = storedNick;
    function myNick() {
      var v = nickEl.value.trim().slice(0, 32);
      return v || storedNick;
    }
    nickEl.addEventListener("input", function () {
      var v = nickEl.value.trim();
      if (v) {
        storedNick = v.slice(0, 32);
        storageSet(NICK_KEY, storedNick);
        refreshOwn();
      }
    });
    nickEl.addEventListener("blur", function () {
      if (!nickEl.value.trim()) nickEl.value = storedNick;
    });
    nickEl.addEventListener("keydown", function (e) {
      if (e.key === "Enter") {
        e.preventDefault();
        textEl.focus();
      }
    });

    // ---------------------------------------------------------------------------------- rendering

    function hueClass(nick) {
      var h = 0;
      for (var i = 0; i < nick.length; i++) h = (h * 31 + nick.charCodeAt(i)) >>> 0;
      return "hue-" + (h % 8);
    }

    /** Text to a fragment of text nodes and safe <a> elements (http and https only). */
    function linkify(text) {
      var frag = document.createDocumentFragment();
      var last = 0;
      URL_RE.lastIndex = 0;
      var m;
      while ((m = URL_RE.exec(text)) !== null) {
        var raw = m[0];
        var trail = raw.match(TRAILING);
        if (trail) raw = raw.slice(0, raw.length - trail[0].length);
        // Keep a closing parenthesis only when the URL opened one: "(see https://x.y/a)".
        while (raw.endsWith(")") && (raw.split("(").length - 1) < (raw.split(")").length - 1)) raw = raw.slice(0, -1);
        var url = null;
        try { url = new URL(raw); } catch (e) { url = null; }
        if (!url || (url.protocol !== "http:" && url.protocol !== "https:") || raw.length < 9) {
          continue;
        }
        if (m.index > last) frag.appendChild(document.createTextNode(text.slice(last, m.index)));
        var a = document.createElement("a");
        a.href = url.href;
        a.rel = "noopener noreferrer nofollow";
        a.target = "_blank";
        a.textContent = raw;
        frag.appendChild(a);
        last = m.index + raw.length;
        URL_RE.lastIndex = last;
      }
      if (last < text.length) frag.appendChild(document.createTextNode(text.slice(last)));
      return frag;
    }

    function setTime(timeEl, ms) {
      ms = Number(ms);
      if (!Number.isFinite(ms) || ms <= 0) return;
      var d = new Date(ms);
      timeEl.textContent = timeFmt.format(d);
      timeEl.dateTime = d.toISOString();
      timeEl.title = fullFmt.format(d);
    }

    function el(tag, cls, text) {
      var e = document.createElement(tag);
      if (cls) e.className = cls;
      if (text != null) e.textContent = text;
      return e;
    }

    function buildMessage(msg) {
      var art = el("article", "message");
      art.id = "m" + msg.offset;
      art.dataset.offset = String(msg.offset);
      if (msg.id) art.dataset.id = String(msg.id);
      art.dataset.time = String(msg.time || 0);
      art.dataset.nick = msg.nick;
      var avatar = el("div", "avatar", (msg.nick || "?").slice(0, 1).toUpperCase());
      avatar.setAttribute("aria-hidden", "true");
      var bubble = el("div", "bubble");
      var meta = el("div", "meta");
      meta.appendChild(el("span", "nick", msg.nick));
      var time = el("time", "time");
      time.dataset.time = String(msg.time || 0);
      setTime(time, msg.time);
      meta.appendChild(time);
      var body = el("div", "body");
      body.appendChild(linkify(msg.body));
      bubble.appendChild(meta);
      bubble.appendChild(body);
      art.appendChild(avatar);
      art.appendChild(bubble);
      decorate(art);
      return art;
    }

    /** Classes that depend on the reader (own messages) and on the nick (avatar colour). */
    function decorate(art) {
      var nick = art.dataset.nick || "";
      var avatar = art.querySelector(".avatar");
      if (avatar) {
        avatar.className = "avatar " + hueClass(nick);
      }
      var nickSpan = art.querySelector(".nick");
      if (nickSpan) nickSpan.className = "nick " + hueClass(nick);
      art.classList.toggle("own", nick === myNick());
    }

    /** A message continues a group when the previous one has the same nick and is recent. */
    function regroup(art) {
      if (!art) return;
      var prev = art.previousElementSibling;
      var cont = !!prev &&
        prev.dataset.nick === art.dataset.nick &&
        Math.abs(Number(art.dataset.time) - Number(prev.dataset.time)) < GROUP_MS;
      art.classList.toggle("cont", cont);
    }

    function refreshOwn() {
      byOffset.forEach(function (art) { decorate(art); });
    }

    function toMessage(pub) {
      var d = pub.data;
      var body;
      var nick = "";
      if (d && typeof d === "object" && !Array.isArray(d)) {
        body = typeof d.body === "string" ? d.body : JSON.stringify(d);
        if (typeof d.nick === "string") nick = d.nick.trim();
      } else if (typeof d === "string") {
        body = d;
      } else {
        body = JSON.stringify(d);
      }
      return {
        offset: Number(pub.offset),
        id: pub.id,
        time: Number(pub.time) || Date.now(),
        nick: (nick || "anonymous").slice(0, 32),
        body: body == null ? "" : String(body),
      };
    }

    function nearBottom() {
      return list.scrollHeight - list.scrollTop - list.clientHeight < 80;
    }

    function scrollToBottom() {
      list.scrollTop = list.scrollHeight;
      unseenBelow = 0;
      jumpBtn.hidden = true;
    }

    /**
     * Insert a message at its offset. Returns false if that offset is already shown.
     * opts.fresh: new to this reader (counts as unread); opts.mine: sent from this page (scroll to it).
     */
    function insert(msg, opts) {
      opts = opts || {};
      if (!Number.isFinite(msg.offset) || byOffset.has(msg.offset)) return false;
      var stick = nearBottom();
      var art = buildMessage(msg);
      // Find the first shown message with a higher offset (usually none: append).
      var after = null;
      var node = list.lastElementChild;
      while (node && Number(node.dataset.offset) > msg.offset) {
        after = node;
        node = node.previousElementSibling;
      }
      list.insertBefore(art, after);
      byOffset.set(msg.offset, art);
      regroup(art);
      regroup(art.nextElementSibling);
      trim();
      emptyEl.hidden = true;
      if (opts.fresh && !opts.mine && art.dataset.nick !== myNick()) {
        if (document.hidden) {
          unread++;
          updateTitle();
        }
        if (!stick && !after) {
          unseenBelow++;
          jumpBtn.textContent = unseenBelow === 1 ? "1 new message ↓" : unseenBelow + " new messages ↓";
          jumpBtn.hidden = false;
        }
      }
      if (opts.mine || (stick && !after)) scrollToBottom();
      return true;
    }

    function trim() {
      while (byOffset.size > MAX_MESSAGES) {
        var first = list.firstElementChild;
        if (!first) break;
        byOffset.delete(Number(first.dataset.offset));
        first.remove();
        regroup(list.firstElementChild);
      }
    }

    function clearAll() {
      byOffset.clear();
      list.replaceChildren();
      emptyEl.hidden = false;
    }

    // Enhance the server-rendered messages: local time, links, colours, grouping.
    Array.prototype.forEach.call(list.querySelectorAll(".message"), function (art) {
      var off = Number(art.dataset.offset);
      if (!Number.isFinite(off) || byOffset.has(off)) {
        art.remove();
        return;
      }
      byOffset.set(off, art);
      var body = art.querySelector(".body");
      if (body) body.replaceChildren(linkify(body.textContent));
      var time = art.querySelector(".time");
      if (time) setTime(time, art.dataset.time);
      if (!art.dataset.nick) art.dataset.nick = "anonymous";
      var nick = art.querySelector(".nick");
      if (nick && !nick.textContent) nick.textContent = "anonymous";
      decorate(art);
      regroup(art);
    });
    emptyEl.hidden = byOffset.size > 0;
    scrollToBottom();

    list.addEventListener("scroll", function () {
      if (nearBottom()) {
        unseenBelow = 0;
        jumpBtn.hidden = true;
      }
    }, { passive: true });
    jumpBtn.addEventListener("click", function () {
      scrollToBottom();
      textEl.focus();
    });

    // ------------------------------------------------------------------------------ title / unread

    function updateTitle() {
      document.title = unread > 0 ? "(" + unread + ") " + baseTitle : baseTitle;
    }
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden) {
        unread = 0;
        updateTitle();
      }
    });
    updateTitle();

    // ---------------------------------------------------------------------------------- notices

    var noticeTimer = null;
    function notice(text) {
      noticeEl.textContent = text;
      noticeEl.hidden = false;
      clearTimeout(noticeTimer);
      noticeTimer = setTimeout(function () { noticeEl.hidden = true; }, 6000);
    }

    // ------------------------------------------------------------------------ web push (opt-in)
    //
    // "Notify me": a Web Push subscription of this browser for this room's channel, so that the service
    // worker (/sw.js) shows a notification while no page of the room is visible, even with the tab closed.
    // The rooms this browser gets pushes for are kept in localStorage: the server's registration is
    // replaced by the whole list on every change. Servers without Web Push answer 404: said in words.

    var PUSH_KEY = "tidings.push.channels";
    // A browser that cannot reach its push service may never answer subscribe() (Chromium without
    // network: minutes); give up after this and say so.
    var SUBSCRIBE_TIMEOUT_MS = 15000;
    var notifyBtn = $("notify");
    var notifyLabel = notifyBtn ? notifyBtn.querySelector(".notify-label") || notifyBtn : null;
    var pushBusy = false;

    function pushSupported() {
      return "serviceWorker" in navigator && "PushManager" in window && "Notification" in window &&
        window.isSecureContext !== false;
    }
    function pushChannels() {
      try {
        var list = JSON.parse(storageGet(PUSH_KEY) || "[]");
        return Array.isArray(list) ? list.filter(function (c) { return typeof c === "string"; }) : [];
      } catch (e) { return []; }
    }
    function setPushChannels(list) { storageSet(PUSH_KEY, JSON.stringify(list)); }
    function showPush(on) {
      notifyLabel.textContent = on ? "Stop notifications" : "Notify me";
      notifyBtn.setAttribute("aria-pressed", on ? "true" : "false");
      notifyBtn.title = on ? "Stop notifications for #" + room : "Get a notification for new messages in #" + room + " while this page is not open";
    }
    function pushError(message) {
      var err = new Error(message);
      err.shown = true;
      return err;
    }
    /** The applicationServerKey: base64url (no padding) to bytes. */
    function keyBytes(b64) {
      var s = String(b64).replace(/-/g, "+").replace(/_/g, "/");
      while (s.length % 4) s += "=";
      var raw = window.atob(s);
      var out = new Uint8Array(raw.length);
      for (var i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
      return out;
    }
    function sameKey(sub, key) {
      var k = sub && sub.options && sub.options.applicationServerKey;
      if (!k) return false;
      var a = new Uint8Array(k);
      return a.length === key.length && a.every(function (b, i) { return b === key[i]; });
    }
    /** A JSON call to the push endpoints, with the page's own credentials (same-origin cookies). */
    function pushCall(method, path, body) {
      return fetch(path, {
        method: method,
        credentials: "same-origin",
        headers: body === undefined ? { Accept: "application/json" } : { "Content-Type": "application/json", Accept: "application/json" },
        body: body === undefined ? undefined : JSON.stringify(body),
      }).then(function (resp) {
        if (resp.ok) return resp.status === 204 ? null : resp.json().catch(function () { return null; });
        if (resp.status === 404 || resp.status === 405 || resp.status === 501) {
          throw pushError("notifications are not set up on this server");
        }
        return resp.json().catch(function () { return null; }).then(function (obj) {
          var why = obj && obj.error && obj.error.message ? obj.error.message : "HTTP " + resp.status;
          throw pushError("the server refused (" + why + ")");
        });
      }, function () {
        throw pushError("no connection to the server");
      });
    }
    function pushFailure(err) {
      if (err && err.shown) return err.message;
      var name = err && err.name;
      var msg = (err && err.message) || String(err);
      if (name === "NotAllowedError") return "notifications are blocked for this site";
      // Chromium's private (incognito) windows have no Push API and say "Registration failed - permission
      // denied" although notifications are allowed.
      if (name === "AbortError" && /permission denied/i.test(msg)) {
        return "this browser window cannot receive push messages (a private window has none)";
      }
      // "Registration failed - push service not available" / "push service error", or no answer at all.
      if (name === "AbortError" || /push service/i.test(msg)) return "push service unavailable";
      return msg;
    }

    /** subscribe() within SUBSCRIBE_TIMEOUT_MS; a subscription that comes after that is dropped again. */
    function withTimeout(subscribing) {
      return new Promise(function (resolve, reject) {
        var late = false;
        var timer = setTimeout(function () {
          late = true;
          reject(pushError("push service unavailable (no answer from the browser's push service)"));
        }, SUBSCRIBE_TIMEOUT_MS);
        subscribing.then(function (sub) {
          clearTimeout(timer);
          if (late) sub.unsubscribe().catch(function () { /* gone anyway */ });
          else resolve(sub);
        }, function (err) {
          clearTimeout(timer);
          if (!late) reject(err);
        });
      });
    }

    function subscribePush() {
      var reg;
      var key;
      // The promise form; older Safari only calls back.
      var asking = new Promise(function (resolve) {
        var p = Notification.requestPermission(resolve);
        if (p && typeof p.then === "function") p.then(resolve, function () { resolve("denied"); });
      });
      return asking.then(function (perm) {
        if (perm !== "granted") {
          throw pushError(perm === "denied" ? "notifications are blocked for this site (allow them in the site settings)" : "notifications were not allowed");
        }
        return navigator.serviceWorker.register("/sw.js", { scope: "/" });
      }).then(function () {
        return navigator.serviceWorker.ready;
      }).then(function (r) {
        reg = r;
        return pushCall("GET", "/push/vapid-public-key");
      }).then(function (obj) {
        if (!obj || typeof obj.publicKey !== "string") throw pushError("the server sent no push key");
        try { key = keyBytes(obj.publicKey); } catch (e) { throw pushError("the server's push key is not base64url"); }
        return reg.pushManager.getSubscription();
      }).then(function (old) {
        if (old && sameKey(old, key)) return old;
        // Made with another server key (the server's key changed): a new subscription replaces it.
        return (old ? old.unsubscribe() : Promise.resolve()).then(function () {
          return withTimeout(reg.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: key }));
        });
      }).then(function (sub) {
        var channels = pushChannels().filter(function (c) { return c !== channel; }).concat([channel]);
        return pushCall("POST", "/push/subscriptions", { subscription: sub.toJSON(), channels: channels }).then(function () {
          setPushChannels(channels);
        });
      });
    }

    function unsubscribePush() {
      var rest = pushChannels().filter(function (c) { return c !== channel; });
      var sub = null;
      return navigator.serviceWorker.getRegistration("/").then(function (reg) {
        return reg ? reg.pushManager.getSubscription() : null;
      }).then(function (s) {
        sub = s;
        if (!sub) return null;
        return pushCall("DELETE", "/push/subscriptions", { endpoint: sub.endpoint });
      }).then(function () {
        if (!sub) return null;
        if (rest.length) return pushCall("POST", "/push/subscriptions", { subscription: sub.toJSON(), channels: rest });
        return sub.unsubscribe();
      }).then(function () {
        setPushChannels(sub ? rest : []);
      });
    }

    if (notifyBtn && pushSupported()) {
      notifyBtn.hidden = false;
      showPush(false);
      navigator.serviceWorker.getRegistration("/").then(function (reg) {
        return reg ? reg.pushManager.getSubscription() : null;
      }).then(function (sub) {
        if (!pushBusy) showPush(!!sub && pushChannels().indexOf(channel) >= 0);
      }, function () { /* no registration: stays "Notify me" */ });
      notifyBtn.addEventListener("click", function () {
        if (pushBusy) return;
        pushBusy = true;
        notifyBtn.disabled = true;
        var on = notifyBtn.getAttribute("aria-pressed") === "true";
        (on ? unsubscribePush() : subscribePush()).then(function () {
          showPush(!on);
          notifyBtn.dataset.error = "";
          notice(on ? "Notifications for #" + room + " stopped." : "You will be notified of new messages in #" + room + ".");
        }, function (err) {
          var why = pushFailure(err);
          notifyBtn.dataset.error = why;
          notice((on ? "Could not stop notifications: " : "Notifications not enabled: ") + why);
        }).then(function () {
          pushBusy = false;
          notifyBtn.disabled = false;
        });
      });
    }

    // --------------------------------------------------------------------------------- the client

    if (typeof window.Tidings !== "function") {
      statusEl.dataset.state = "closed";
      statusLabel.textContent = "offline";
      notice("tidings.js did not load");
      return;
    }

    var client = new window.Tidings({ url: config.url || undefined });
    window.tidingsChat = { client: client, channel: channel }; // handy for debugging and tests

    function showState(state) {
      statusEl.dataset.state = state;
      var label;
      if (state === "connected") label = "connected";
      else if (state === "connecting") label = everConnected ? "reconnecting…" : "connecting…";
      else if (state === "disconnected") label = navigator.onLine === false ? "offline" : "reconnecting…";
      else label = "offline";
      statusLabel.textContent = label;
      document.body.dataset.connection = state;
    }

    client.on("state", function (state) {
      if (state === "connected") everConnected = true;
      showState(state);
      if (state === "connected") refreshPresence();
    });
    client.on("reconnecting", function (info) {
      statusEl.title = "retrying in " + Math.max(1, Math.round(info.delay / 1000)) + " s";
    });
    client.on("connected", function () { statusEl.title = ""; });
    client.on("disconnect", function (info) {
      if (!info.reconnect) notice("Disconnected: " + (info.reason || "code " + info.code));
    });
    client.on("error", function (err) {
      if (err && err.channel === channel && err.op === "subscribe") notice("Cannot join #" + room + ": " + err.message);
    });

    function onPublication(pub) {
      insert(toMessage(pub), { fresh: true });
    }

    client.on("subscribed", function (ev) {
      if (ev.channel !== channel) return;
      if (epoch !== ev.epoch) {
        // First subscribe without a server-rendered position, or after a gap already handled.
        epoch = ev.epoch;
      }
    });

    var historyLoading = false;
    var historyAgain = false;
    function loadHistory() {
      if (historyLoading) {
        historyAgain = true;
        return;
      }
      historyLoading = true;
      client.history(channel, { limit: 100 }).then(function (res) {
        var resEpoch = res.epoch == null ? "" : String(res.epoch);
        if (epoch !== null && resEpoch !== epoch) clearAll();
        epoch = resEpoch;
        (res.publications || []).forEach(function (pub) {
          insert(toMessage(pub), { fresh: true });
        });
      }, function (err) {
        notice("Could not load history: " + err.message);
        setTimeout(loadHistory, 3000);
      }).then(function () {
        historyLoading = false;
        if (historyAgain) {
          historyAgain = false;
          loadHistory();
        }
      });
    }

    client.on("gap", function (ev) {
      if (ev.channel !== channel) return;
      if (ev.epochChanged) {
        clearAll();
        epoch = ev.position.epoch;
        notice("The room's history was reset on the server; showing what it has now.");
      } else {
        // Never a silent gap: say that older messages may be missing, then show the newest ones.
        notice("You were away longer than the room keeps messages; some may be missing.");
      }
      loadHistory();
    });

    // ----------------------------------------------------------------------------------- presence

    var presenceTimer = null;
    function refreshPresence() {
      clearTimeout(presenceTimer);
      presenceTimer = setTimeout(refreshPresence, PRESENCE_EVERY_MS);
      if (client.state !== "connected") return;
      client.presence(channel).then(function (res) {
        var n = Number(res && res.count);
        if (Number.isFinite(n)) {
          countEl.textContent = n + " online";
          countEl.hidden = false;
        }
      }, function () {
        countEl.textContent = "";
        countEl.hidden = true;
      });
    }
    var presenceSoon = null;
    function presenceChanged(ev) {
      if (ev.channel !== channel) return;
      clearTimeout(presenceSoon);
      presenceSoon = setTimeout(refreshPresence, 250);
    }
    client.on("join", presenceChanged);
    client.on("leave", presenceChanged);
    countEl.hidden = true;

    // ----------------------------------------------------------------------------------- composer

    function autosize() {
      textEl.style.height = "auto";
      textEl.style.height = Math.min(textEl.scrollHeight + 2, 168) + "px";
    }
    textEl.addEventListener("input", autosize);
    textEl.addEventListener("keydown", function (e) {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
        e.preventDefault();
        send();
      }
    });
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      send();
    });

    function send() {
      var body = textEl.value.trim();
      if (!body) {
        textEl.focus();
        return;
      }
      var nick = myNick();
      nickEl.value = nick;
      textEl.value = "";
      autosize();
      textEl.focus();
      // Retried with its idempotency key (stored once) for up to 15 s, e.g. across a reconnect.
      client.publish(channel, { body: body, nick: nick }, { timeout: 15000, deadline: 15000 }).then(function (res) {
        // Show it right away; the push for the same offset is then ignored.
        if (res && Number.isFinite(Number(res.offset)) && (epoch === null || String(res.epoch) === epoch)) {
          insert({ offset: Number(res.offset), id: res.id, time: Date.now(), nick: nick, body: body }, { mine: true });
        }
      }, function (err) {
        if (!textEl.value) {
          textEl.value = body;
          autosize();
        }
        var why = err && err.code === "timeout" ? "no connection" : (err && err.message) || "error";
        notice("Not sent (" + why + ")");
      });
    }
    sendBtn.disabled = false;

    // ------------------------------------------------------------------------------------- start

    var since = config.position && config.position.epoch != null ? config.position : null;
    client.subscribe(channel, onPublication, since ? { since: since } : {}).then(function () {
      if (!since) loadHistory();
    }, function () { /* reported by the error listener */ });
    client.connect();
    showState(client.state);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
