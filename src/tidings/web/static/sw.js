/* The tidings service worker: Web Push notifications for the chat page (served at /sw.js, scope /).
 *
 * A push's payload is the JSON of the /ws "message" push:
 *   {"type": "message", "channel", "offset", "epoch", "id", "time", "data"}
 * or, when that is over the 4 KiB push limit, its truncated form (the page fetches the rest by recovery):
 *   {"type": "message", "channel", "offset", "epoch", "id", "truncated": true}
 * For a chat room (channel "chat:<room>") data is {"nick", "body"}: the notification's title is the
 * nick (at most 32 characters, as the page shows it), its body the text, its tag the room. Other channels: data.title / data.body (or data.text) when data is an object
 * with those strings, else the channel name and a generic line.
 *
 * Text only: a notification's title and body are plain text (never parsed as HTML), and this worker puts
 * nothing but strings there, control characters removed and lengths capped. No icon or image URL is
 * ever taken from a payload.
 *
 * Not shown when a window of that room is visible (the page shows the message itself). A payload that is
 * not such JSON (not JSON, not an object, no channel) still gets a generic notification: browsers expect
 * every push to show one (Chromium shows its own "site updated in the background" otherwise) and the user
 * asked for them; it never throws.
 *
 * Pushes are handled one at a time, in the order they arrive (one promise chain), so notifications of
 * one room replace each other in order (tag = the room). After each, the windows of the origin get a
 * message {"type": "tidings:push", "channel", "offset", "shown"} (channel and offset null for a
 * malformed payload): what became of it.
 */
"use strict";

var MAX_TITLE = 64;
var MAX_BODY = 300;
var CONTROL = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

/** A string for a notification: no control or bidi-override characters, at most max characters. */
function clean(value, max) {
  var s = String(value == null ? "" : value).replace(CONTROL, "").trim();
  return s.length > max ? s.slice(0, max - 1) + "…" : s;
}

/** "chat:<room>" -> the room's page ("/" for the lobby); other channels -> the scope's root. */
function roomOf(channel) {
  var m = /^chat:([A-Za-z0-9_\-.]{1,64})$/.exec(channel);
  if (!m) return { room: null, path: "/" };
  return { room: m[1], path: m[1] === "lobby" ? "/" : "/chat/" + encodeURIComponent(m[1]) };
}

/** The notification for a payload (a string, maybe JSON), or a generic one when it is not usable. */
function describe(text) {
  var msg = null;
  try { msg = JSON.parse(text); } catch (e) { msg = null; }
  if (!msg || typeof msg !== "object" || typeof msg.channel !== "string" || !msg.channel) {
    return { title: "tidings", body: "New notification", tag: "tidings", path: "/", channel: null, offset: null };
  }
  var where = roomOf(msg.channel);
  var place = where.room ? "#" + where.room : msg.channel;
  var title = place;
  var body = "New message in " + place;
  var d = msg.data;
  if (!msg.truncated && d !== undefined) {
    if (typeof d === "string") {
      body = d;
    } else if (d && typeof d === "object" && !Array.isArray(d)) {
      var sender = typeof d.nick === "string" ? d.nick : typeof d.title === "string" ? d.title : "";
      var line = typeof d.body === "string" ? d.body : typeof d.text === "string" ? d.text : "";
      if (sender.trim()) title = where.room ? sender.trim().slice(0, 32) : sender;
      if (line) body = line;
    }
  }
  return {
    title: clean(title, MAX_TITLE) || place,
    body: clean(body, MAX_BODY),
    tag: "tidings:" + msg.channel,
    path: where.path,
    channel: msg.channel,
    offset: typeof msg.offset === "number" ? msg.offset : null,
  };
}

/** The windows of this origin (controlled by this worker or not; matchAll sees no other origin). */
function windows() {
  return self.clients.matchAll({ type: "window", includeUncontrolled: true });
}

function handlePush(event) {
  var text = "";
  try { text = event.data ? event.data.text() : ""; } catch (e) { text = ""; }
  var n = describe(text);
  return windows().then(function (list) {
    var visible = !!n.channel && list.some(function (c) {
      return new URL(c.url).pathname === n.path && c.visibilityState === "visible";
    });
    var shown = visible ? Promise.resolve() : self.registration.showNotification(n.title, {
      body: n.body,
      tag: n.tag,
      renotify: true,
      data: { url: new URL(n.path, self.location.origin).href, channel: n.channel },
    });
    return shown.then(function () {
      // Tell the windows what became of it (a page may count or log it; the tests wait on it).
      var report = { type: "tidings:push", channel: n.channel, offset: n.offset, shown: !visible };
      list.forEach(function (c) { c.postMessage(report); });
    });
  });
}

var queue = Promise.resolve();

self.addEventListener("push", function (event) {
  queue = queue.then(function () { return handlePush(event); }).catch(function (err) {
    console.warn("tidings sw: push not shown:", err && err.message);
    var report = { type: "tidings:push", channel: null, offset: null, shown: false, error: String(err && err.message) };
    return windows().then(function (list) { list.forEach(function (c) { c.postMessage(report); }); });
  }).catch(function () { /* nothing more to do */ });
  event.waitUntil(queue);
});

self.addEventListener("notificationclick", function (event) {
  event.notification.close();
  var url = event.notification.data && event.notification.data.url;
  var target;
  try { target = new URL(url); } catch (e) { target = new URL("/", self.location.origin); }
  if (target.origin !== self.location.origin) target = new URL("/", self.location.origin);
  event.waitUntil(
    self.clients.matchAll({ type: "window", includeUncontrolled: true }).then(function (list) {
      for (var i = 0; i < list.length; i++) {
        var c = list[i];
        var u;
        try { u = new URL(c.url); } catch (e) { continue; }
        if (u.origin === target.origin && u.pathname === target.pathname && "focus" in c) return c.focus();
      }
      return self.clients.openWindow(target.href);
    })
  );
});

// A new version takes over at once: the worker keeps no state worth waiting for.
self.addEventListener("install", function () { self.skipWaiting(); });
self.addEventListener("activate", function (event) { event.waitUntil(self.clients.claim()); });
