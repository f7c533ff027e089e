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
