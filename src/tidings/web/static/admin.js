// tidings admin page (/admin). Plain JS, no build step, no library; runs under the chat page's CSP.
//
// The API key the visitor types is kept in sessionStorage (this tab only, gone when it closes) and sent
// only as "Authorization: Bearer <key>" (never in a URL, never in a cookie: every fetch is
// credentials: "omit"). GET /api/stats is polled every second; rates are counter differences over the
// server's time differences; the sparkline is hand-drawn SVG. Everything shown is set as textContent.
"use strict";

(function () {
  const KEY_NAME = "tidings.admin.key";
  const POLL_MS = 1000;
  const PRESENCE_MS = 2000;
  const SAMPLES = 61; // 60 rates: the last minute
  const LIST_LIMIT = 100; // channels asked for (the busiest first)
  const CHART_W = 300;
  const CHART_H = 80;

  const $ = (id) => document.getElementById(id);
  const body = document.body;
  const state = {
    key: null,
    timer: null,
    samples: [], // {t, published, delivered}
    rates: [], // {in, out}
    channels: [],
    sort: { key: "subscribers", dir: -1 },
    query: "",
    selected: null,
    presenceTimer: null,
  };

  function storedKey() {
    try {
      return sessionStorage.getItem(KEY_NAME);
    } catch (e) {
      return null;
    }
  }

  function storeKey(key) {
    try {
      if (key) sessionStorage.setItem(KEY_NAME, key);
      else sessionStorage.removeItem(KEY_NAME);
    } catch (e) {
      /* storage off: the key lives in this page only */
    }
  }

  function api(path, options) {
    const opts = options || {};
    const headers = Object.assign({ Authorization: "Bearer " + state.key }, opts.headers || {});
    return fetch(path, {
      method: opts.method || "GET",
      headers: headers,
      body: opts.body,
      cache: "no-store",
      credentials: "omit",
      redirect: "error",
    });
  }

  async function errorOf(resp) {
    try {
      const obj = await resp.json();
      if (obj && obj.error) return obj.error;
    } catch (e) {
      /* not JSON */
    }
    return { code: "http_" + resp.status, message: resp.statusText || "request failed" };
  }

  function refusal(resp, err) {
    if (resp.status === 401) return "That key was refused (401 " + err.code + "). Check it and try again.";
    if (resp.status === 403) return "That key may not read stats: it needs the admin or read role.";
    if (resp.status === 429) {
      const wait = resp.headers.get("Retry-After");
      return "Too many wrong keys from this address: wait " + (wait || "a few") + " s and try again.";
    }
    return "The server answered " + resp.status + " (" + err.code + "): " + err.message;
  }

  function setStatus(kind, label) {
    const el = $("status");
    el.dataset.state = kind;
    el.querySelector(".status-label").textContent = label;
  }

  // ------------------------------------------------------------------------------------ sign in / out

  function showLogin(message) {
    stopPolling();
    body.dataset.view = "login";
    $("dashboard").hidden = true;
    $("login").hidden = false;
    $("signout").hidden = true;
    const err = $("key-error");
    err.textContent = message || "";
    err.hidden = !message;
    setStatus(message ? "error" : "idle", message ? "key refused" : "not signed in");
    const input = $("key");
    input.setAttribute("aria-invalid", message ? "true" : "false");
    input.focus();
  }

  function showDashboard() {
    body.dataset.view = "dashboard";
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("signout").hidden = false;
  }

  async function signIn(key) {
    state.key = key;
    const button = $("key-submit");
    button.disabled = true;
    setStatus("connecting", "checking key…");
    try {
      const resp = await api(statsPath());
      if (!resp.ok) {
        const err = await errorOf(resp);
        state.key = null;
        storeKey(null);
        showLogin(refusal(resp, err));
        return;
      }
      storeKey(key);
      $("key").value = "";
      resetSeries();
      showDashboard();
      render(await resp.json());
      schedule();
    } catch (e) {
      state.key = null;
      showLogin("The server could not be reached: " + e.message);
    } finally {
      button.disabled = false;
    }
  }

  function signOut() {
    storeKey(null);
    state.key = null;
    state.selected = null;
    showLogin("");
  }

  // ------------------------------------------------------------------------------------ polling

  function statsPath() {
    let path = "/api/stats?limit=" + LIST_LIMIT;
    if (state.query) path += "&q=" + encodeURIComponent(state.query);
    return path;
  }

  function schedule() {
    stopPolling();
    state.timer = setTimeout(poll, POLL_MS);
  }

  function stopPolling() {
    if (state.timer !== null) clearTimeout(state.timer);
    state.timer = null;
    if (state.presenceTimer !== null) clearTimeout(state.presenceTimer);
    state.presenceTimer = null;
  }

  async function poll() {
    state.timer = null;
    if (!state.key) return;
    try {
      const resp = await api(statsPath());
      if (resp.status === 401 || resp.status === 403) {
        const err = await errorOf(resp);
        storeKey(null);
        state.key = null;
        showLogin(refusal(resp, err));
        return;
      }
      if (!resp.ok) {
        const err = await errorOf(resp);
        setStatus("error", "error " + resp.status + ": " + err.code);
      } else {
        render(await resp.json());
      }
    } catch (e) {
      setStatus("error", "server unreachable");
    }
    if (state.key) schedule();
  }

  // ------------------------------------------------------------------------------------ rendering

  function setText(el, value) {
    const s = String(value);
    if (el.textContent !== s) el.textContent = s;
  }

  function text(id, value) {
    setText($(id), value);
  }

  function duration(seconds) {
    const s = Math.floor(seconds);
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    const pad = (n) => String(n).padStart(2, "0");
    if (d) return d + "d " + pad(h) + "h " + pad(m) + "m";
    if (h) return h + "h " + pad(m) + "m " + pad(s % 60) + "s";
    return m + "m " + pad(s % 60) + "s";
  }

  function mib(bytes) {
    return (bytes / 1048576).toFixed(1) + " MiB";
  }

  function rate(v) {
    return v >= 100 ? String(Math.round(v)) : v.toFixed(1);
  }

  function clock(t) {
    const d = new Date(t * 1000);
    const pad = (n) => String(n).padStart(2, "0");
    return pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }

  function render(s) {
    setStatus("live", "live");
    text("pid", s.process.pid);
    text("uptime", duration(s.process.uptime));
    text("rss", mib(s.process.rss_bytes));
    text("cpu", s.process.cpu_seconds.toFixed(1) + " s");
    text("conn-total", s.connections.total);
    for (const el of document.querySelectorAll("#transports [data-transport]")) {
      const n = s.connections.by_transport[el.dataset.transport];
      setText(el, n === undefined ? 0 : n);
    }
    text("subscriptions", s.subscriptions);
    text("channel-total", s.channels.total);
    text("published", s.messages.published);
    text("delivered", s.messages.delivered);
    addSample(s.time, s.messages.published, s.messages.delivered);
    state.channels = s.channels.listed;
    renderChannels(s.channels.total);
    renderEvents("errors", "err-total", "no-errors", s.errors, errorLine);
    renderEvents("slow", "slow-total", "no-slow", s.slow_consumers, slowLine);
  }

  // ------------------------------------------------------------------------------------ the chart

  function resetSeries() {
    state.samples = [];
    state.rates = [];
    drawChart();
  }

  function addSample(t, published, delivered) {
    const last = state.samples[state.samples.length - 1];
    state.samples.push({ t: t, published: published, delivered: delivered });
    if (state.samples.length > SAMPLES) state.samples.shift();
    if (last && t > last.t) {
      const dt = t - last.t;
      // A counter that went down is a restarted server: no rate for that step.
      const rin = published >= last.published ? (published - last.published) / dt : 0;
      const rout = delivered >= last.delivered ? (delivered - last.delivered) / dt : 0;
      state.rates.push({ in: rin, out: rout });
      if (state.rates.length > SAMPLES - 1) state.rates.shift();
      text("rate-in", rate(rin));
      text("rate-out", rate(rout));
    }
    drawChart();
  }

  function drawChart() {
    const rates = state.rates;
    let max = 0;
    for (const r of rates) max = Math.max(max, r.in, r.out);
    const top = max > 0 ? max : 1;
    const step = CHART_W / (SAMPLES - 2);
    const x0 = CHART_W - step * (rates.length - 1);
    const points = (pick) =>
      rates
        .map((r, i) => (x0 + i * step).toFixed(1) + "," + (CHART_H - 2 - (pick(r) / top) * (CHART_H - 6)).toFixed(1))
        .join(" ");
    $("spark-in").setAttribute("points", points((r) => r.in));
    $("spark-out").setAttribute("points", points((r) => r.out));
    $("chart").dataset.samples = String(rates.length);
    text("chart-max", rate(max));
    const last = rates[rates.length - 1];
    $("chart-label").textContent = last
      ? "Messages per second over the last minute: now " + rate(last.in) + " in, " + rate(last.out) + " out; peak " + rate(max)
      : "Messages per second over the last minute: no data yet";
  }

  // ------------------------------------------------------------------------------------ channels

  function sorted(list) {
    const { key, dir } = state.sort;
    return list.slice().sort((a, b) => {
      let c;
      if (key === "channel") c = a.channel < b.channel ? -1 : a.channel > b.channel ? 1 : 0;
      else c = (a[key] === null ? -1 : a[key]) - (b[key] === null ? -1 : b[key]);
      if (c === 0 && key !== "channel") c = a.channel < b.channel ? 1 : -1; // ties: by name, A first
      return c * dir;
    });
  }

  function renderChannels(total) {
    const tbody = document.querySelector("#channels tbody");
    const rows = sorted(state.channels);
    const frag = document.createDocumentFragment();
    for (const c of rows) {
      const tr = document.createElement("tr");
      tr.dataset.channel = c.channel;
      if (c.channel === state.selected) tr.className = "selected";
      const name = document.createElement("td");
      const pick = document.createElement("button");
      pick.type = "button";
      pick.className = "link mono";
      pick.textContent = c.channel;
      pick.title = c.channel;
      pick.dataset.pick = c.channel;
      pick.setAttribute("aria-pressed", c.channel === state.selected ? "true" : "false");
      name.appendChild(pick);
      const subs = document.createElement("td");
      subs.className = "num";
      subs.textContent = String(c.subscribers);
      const hist = document.createElement("td");
      hist.className = "num";
      hist.textContent = c.history === null ? "?" : String(c.history);
      tr.append(name, subs, hist);
      frag.appendChild(tr);
    }
    // Keep the focused pick button focused across the redraw.
    const focused = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.pick : null;
    tbody.replaceChildren(frag);
    if (focused) {
      const again = tbody.querySelector('button[data-pick="' + CSS.escape(focused) + '"]');
      if (again) again.focus();
    }
    $("no-channels").hidden = rows.length > 0;
    text("chan-shown", rows.length < total ? "showing the busiest " + rows.length + " of " + total : rows.length + " shown");
    for (const th of document.querySelectorAll("#channels th")) {
      const k = th.querySelector("button").dataset.sort;
      th.setAttribute("aria-sort", k === state.sort.key ? (state.sort.dir < 0 ? "descending" : "ascending") : "none");
    }
  }

  function onSort(ev) {
    const button = ev.target.closest("button[data-sort]");
    if (!button) return;
    const key = button.dataset.sort;
    if (state.sort.key === key) state.sort.dir = -state.sort.dir;
    else state.sort = { key: key, dir: key === "channel" ? 1 : -1 };
    renderChannels(Number($("channel-total").textContent));
  }

  let filterTimer = null;
  function onFilter() {
    if (filterTimer !== null) clearTimeout(filterTimer);
    filterTimer = setTimeout(() => {
      filterTimer = null;
      state.query = $("filter").value.trim();
      if (state.key) {
        stopPolling();
        poll();
        if (state.selected) schedulePresence(0);
      }
    }, 250);
  }

  // ------------------------------------------------------------------------------------ presence

  function channelPath(channel) {
    return channel.split("/").map(encodeURIComponent).join("/");
  }

  function onPick(ev) {
    const button = ev.target.closest("button[data-pick]");
    if (!button) return;
    state.selected = button.dataset.pick;
    $("pub-channel").value = state.selected;
    renderChannels(Number($("channel-total").textContent));
    text("pres-channel", state.selected);
    $("pres-hint").hidden = true;
    schedulePresence(0);
  }

  function schedulePresence(ms) {
    if (state.presenceTimer !== null) clearTimeout(state.presenceTimer);
    state.presenceTimer = setTimeout(loadPresence, ms);
  }

  async function loadPresence() {
    state.presenceTimer = null;
    const channel = state.selected;
    if (!channel || !state.key) return;
    const count = $("pres-count");
    const list = $("pres-list");
    try {
      const resp = await api("/api/channels/" + channelPath(channel) + "/presence");
      if (channel !== state.selected) return;
      if (!resp.ok) {
        const err = await errorOf(resp);
        count.textContent =
          err.code === "not_available" ? "Presence is off in this channel's namespace." : "Presence: " + err.message;
        count.hidden = false;
        list.replaceChildren();
      } else {
        const p = await resp.json();
        count.textContent = p.count === 1 ? "1 client" : p.count + " clients";
        if (p.clients.length < p.count) count.textContent += " (the first " + p.clients.length + " listed)";
        count.hidden = false;
        const frag = document.createDocumentFragment();
        for (const c of p.clients) {
          const li = document.createElement("li");
          li.dataset.client = c.client;
          li.textContent = c.client + (c.user ? " · " + c.user : " · anonymous");
          frag.appendChild(li);
        }
        list.replaceChildren(frag);
      }
    } catch (e) {
      count.textContent = "Presence: server unreachable";
      count.hidden = false;
    }
    if (channel === state.selected && state.key) schedulePresence(PRESENCE_MS);
  }

  // ------------------------------------------------------------------------------------ events

  function renderEvents(listId, totalId, emptyId, ring, line) {
    text(totalId, ring.total);
    const list = $(listId);
    const frag = document.createDocumentFragment();
    for (const e of ring.recent) {
      const li = document.createElement("li");
      const time = document.createElement("time");
      time.textContent = clock(e.time);
      time.dateTime = new Date(e.time * 1000).toISOString();
      const what = document.createElement("span");
      what.className = "what";
      what.textContent = line(e);
      li.append(time, what);
      frag.appendChild(li);
    }
    list.replaceChildren(frag);
    $(emptyId).hidden = ring.recent.length > 0;
  }

  function errorLine(e) {
    let s = e.source + " · " + e.code;
    if (e.status) s += " (" + e.status + ")";
    if (e.request) s += " · " + e.request;
    if (e.message) s += " · " + e.message;
    if (e.client) s += " · client " + e.client;
    return s;
  }

  function slowLine(e) {
    return (
      e.transport + " · client " + e.client + (e.user ? " (" + e.user + ")" : "") + " · " + e.ip +
      " · " + Math.round(e.buffered / 1024) + " KiB held back"
    );
  }

  // ------------------------------------------------------------------------------------ publish

  async function onPublish(ev) {
    ev.preventDefault();
    const out = $("pub-result");
    out.className = "small";
    const channel = $("pub-channel").value.trim();
    let data;
    try {
      data = JSON.parse($("pub-data").value);
    } catch (e) {
      out.className = "small bad";
      out.textContent = 'Data must be JSON (a text in quotes: "hi"; an object: {"body": "hi"}).';
      return;
    }
    const button = $("pub-submit");
    button.disabled = true;
    try {
      const resp = await api("/api/publish", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ channel: channel, data: data }),
      });
      if (resp.ok) {
        const r = await resp.json();
        out.className = "small ok";
        out.textContent = "Published to " + channel + " at offset " + r.offset + ".";
      } else {
        const err = await errorOf(resp);
        out.className = "small bad";
        out.textContent =
          resp.status === 403 && err.code === "permission_denied" && /may not publish/.test(err.message)
            ? "This key may not publish (it needs the admin or publish role)."
            : "Not published (" + err.code + "): " + err.message;
      }
    } catch (e) {
      out.className = "small bad";
      out.textContent = "Not published: the server could not be reached.";
    } finally {
      button.disabled = false;
    }
  }

  // ------------------------------------------------------------------------------------ start

  function start() {
    $("key-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const key = $("key").value.trim();
      if (key) signIn(key);
    });
    $("signout").addEventListener("click", signOut);
    document.querySelector("#channels thead").addEventListener("click", onSort);
    document.querySelector("#channels tbody").addEventListener("click", onPick);
    $("filter").addEventListener("input", onFilter);
    $("publish-form").addEventListener("submit", onPublish);
    drawChart();
    const key = storedKey();
    if (key) signIn(key);
    else showLogin("");
  }

  window.tidingsAdmin = { state: state };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
