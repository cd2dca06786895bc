// Ferry's web interface: plain DOM, no framework, no build step. Every value from the relay is
// put on the page as text (never as HTML). Tokens live in sessionStorage, so closing the tab
// signs out; the refresh token renews the access token before it runs out.
"use strict";

const STORE = "ferry.session";
let session = JSON.parse(sessionStorage.getItem(STORE) || "null");
let events = null; // the live event stream's AbortController
let refreshTimer = null;
let renderTimer = null;
const changedRecords = new Set();

// ---- small DOM helpers -------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function time(ms) {
  if (!ms) return "—";
  return new Date(ms).toLocaleString();
}

function short(id) {
  return id && id.length > 12 ? id.slice(0, 12) + "…" : id || "";
}

function show(value) {
  if (value === undefined) return h("span", { class: "muted" }, "(absent)");
  if (value === null) return h("span", { class: "muted" }, "null");
  if (typeof value === "string") return value;
  return h("code", {}, JSON.stringify(value));
}

function setPage(...children) {
  const page = document.getElementById("page");
  page.replaceChildren(...children.filter((c) => c !== null && c !== undefined));
}

function status(text, isError) {
  const line = document.getElementById("status-line");
  line.textContent = text;
  line.className = isError ? "error" : "";
}

// ---- the API -----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function request(path, options = {}) {
  const headers = Object.assign({ Accept: "application/json" }, options.headers || {});
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  if (session) headers.Authorization = "Bearer " + session.access_token;
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    data = null;
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(response.status, error.code || "http_" + response.status,
      error.message || response.statusText);
  }
  return data;
}

// Calls the API, renewing the access token once if it was refused as expired.
async function api(path, options) {
  try {
    return await request(path, options);
  } catch (e) {
    if (e.status === 401 && session && (await renew())) return request(path, options);
    if (e.status === 401 || (e.status === 403 && e.code === "forbidden")) signedOut(e.message);
    throw e;
  }
}

function keep(tokens) {
  session = tokens;
  sessionStorage.setItem(STORE, JSON.stringify(tokens));
  clearTimeout(refreshTimer);
  // Renew at three quarters of the access token's life.
  const left = tokens.access_expires_ms - Date.now();
  refreshTimer = setTimeout(renew, Math.max(5000, left * 0.75));
}

async function renew() {
  if (!session) return false;
  try {
    const tokens = await fetch("/api/auth/refresh", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ refresh_token: session.refresh_token }),
    }).then((r) => (r.ok ? r.json() : null));
    if (!tokens) return false;
    keep(tokens);
    return true;
  } catch (_) {
    return false;
  }
}

// ---- signing in and out --------------------------------------------------------------------

function signedOut(message) {
  session = null;
  sessionStorage.removeItem(STORE);
  clearTimeout(refreshTimer);
  if (events) events.abort();
  events = null;
  document.getElementById("nav").hidden = true;
  document.getElementById("who").hidden = true;
  document.getElementById("sign-in").hidden = false;
  document.getElementById("sign-in-error").textContent = message || "";
  document.getElementById("alerts").replaceChildren();
  setPage();
}

async function signIn(event) {
  event.preventDefault();
  const form = event.target;
  const error = document.getElementById("sign-in-error");
  error.textContent = "";
  try {
    const tokens = await request("/api/auth/login", {
      method: "POST",
      body: { account: form.account.value, password: form.password.value, label: "web browser" },
    });
    form.password.value = "";
    keep(tokens);
    signedIn();
  } catch (e) {
    error.textContent = e.message;
  }
}

function signedIn() {
  document.getElementById("sign-in").hidden = true;
  document.getElementById("nav").hidden = false;
  document.getElementById("who").hidden = false;
  document.getElementById("account").textContent = session.account;
  keep(session);
  listen();
  loadAlerts();
  route();
}

// ---- live updates ----------------------------------------------------------------------------

// Server-sent events read with fetch, so the token goes in a header and never in a URL.
async function listen() {
  if (events) events.abort();
  const controller = new AbortController();
  events = controller;
  const live = document.getElementById("live");
  let wait = 1000;
  while (session && events === controller) {
    try {
      const response = await fetch("/api/events", {
        headers: { Authorization: "Bearer " + session.access_token, Accept: "text/event-stream" },
        signal: controller.signal,
      });
      if (response.status === 401) {
        if (!(await renew())) return signedOut("Your session ended: sign in again.");
        continue;
      }
      if (!response.ok) throw new Error("HTTP " + response.status);
      live.textContent = "live";
      live.classList.add("on");
      wait = 1000;
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          dispatch(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (e) {
      if (controller.signal.aborted) return;
    }
    live.textContent = "offline";
    live.classList.remove("on");
    await new Promise((resolve) => setTimeout(resolve, wait));
    wait = Math.min(wait * 2, 30000);
  }
}

function dispatch(block) {
  let name = "message";
  let data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  if (name === "expired") {
    renew();
    return;
  }
  if (name !== "change") return;
  let payload;
  try {
    payload = JSON.parse(data);
  } catch (_) {
    return;
  }
  for (const r of payload.records || []) changedRecords.add(r.collection + "/" + r.id);
  status("Log at " + payload.head + " · updated " + new Date().toLocaleTimeString());
  // Several changes in a burst re-render once.
  clearTimeout(renderTimer);
  renderTimer = setTimeout(() => {
    route(true);
    loadAlerts();
  }, 150);
}

// ---- alerts ------------------------------------------------------------------------------------

async function loadAlerts() {
  const box = document.getElementById("alerts");
  let data;
  try {
    data = await api("/api/alerts");
  } catch (_) {
    return;
  }
  const alerts = (data && data.alerts) || [];
  box.replaceChildren(
    ...alerts.map((a) =>
      h("div", { class: "alert fired", "data-alert": a.kind },
        h("strong", {}, a.kind.replace(/_/g, " ")), ": ", a.message,
        a.since_ms ? h("span", { class: "muted" }, " (since " + time(a.since_ms) + ")") : null)),
  );
}

// ---- pages -------------------------------------------------------------------------------------

const pages = { records, conflicts, devices, log, activity };

function route(quiet) {
  if (!session) return;
  const parts = (location.hash || "#/records").slice(2).split("/").map(decodeURIComponent);
  const name = pages[parts[0]] ? parts[0] : "records";
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.page === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  pages[name](parts.slice(1), quiet).catch((e) => {
    if (e.status !== 401) status(e.message, true);
  });
  loadConflictCount();
}

async function loadConflictCount() {
  const badge = document.getElementById("conflict-count");
  try {
    const data = await api("/api/conflicts?status=open");
    const n = (data.conflicts || []).filter((c) => !c.resolving).length;
    badge.textContent = String(n);
    badge.hidden = n === 0;
  } catch (_) {
    badge.hidden = true;
  }
}

async function records([collection, id], quiet) {
  const list = await api("/api/collections");
  const names = list.collections.map((c) => c.name);
  const current = collection || names[0];
  const nav = h("ul", { "aria-label": "Collections" },
    list.collections.map((c) =>
      h("li", {}, h("a", {
        href: "#/records/" + encodeURIComponent(c.name),
        "aria-current": c.name === current ? "true" : null,
      }, c.name + " ", h("span", { class: "muted" }, "(" + c.records + ", " + c.strategy + ")")))));
  let body;
  if (!current) body = h("p", { class: "muted" }, "No records yet: write some from a device.");
  else if (id) body = await recordPage(current, id);
  else body = await recordList(current);
  setPage(h("h2", {}, "Records"), h("div", { class: "cols" }, h("div", {}, nav), h("div", {}, body)));
  if (!quiet) document.getElementById("main").focus();
  changedRecords.clear();
}

async function recordList(collection, after) {
  const query = "/api/records?collection=" + encodeURIComponent(collection) +
    (after ? "&after=" + encodeURIComponent(after) : "");
  const page = await api(query);
  const fieldNames = [];
  for (const r of page.records) {
    for (const k of Object.keys(r.fields)) if (!fieldNames.includes(k) && fieldNames.length < 6) fieldNames.push(k);
  }
  const rows = page.records.map((r) =>
    h("tr", {
      class: changedRecords.has(collection + "/" + r.id) ? "flash" : null,
      "data-record": r.id,
    },
    h("td", {}, h("a", { href: "#/records/" + encodeURIComponent(collection) + "/" + encodeURIComponent(r.id) }, r.id)),
    fieldNames.map((k) => h("td", {}, show(r.fields[k]))),
    h("td", {}, r.deleted ? h("span", { class: "error" }, "deleted") : "")));
  const table = h("table", { "aria-label": collection + " records" },
    h("thead", {}, h("tr", {}, h("th", {}, "id"), fieldNames.map((k) => h("th", {}, k)), h("th", {}, ""))),
    h("tbody", {}, rows));
  const more = page.next
    ? h("button", {
      type: "button",
      onclick: async (e) => e.target.replaceWith(await recordList(collection, page.next)),
    }, "More")
    : null;
  return h("div", {}, h("h3", {}, collection), table, more);
}

async function recordPage(collection, id) {
  const data = await api("/api/records/" + encodeURIComponent(collection) + "/" + encodeURIComponent(id));
  const record = data.record;
  const fields = h("table", { "aria-label": "Fields" },
    h("thead", {}, h("tr", {}, h("th", {}, "field"), h("th", {}, "value"))),
    h("tbody", {}, Object.entries(record.fields).map(([k, v]) =>
      h("tr", { "data-field": k }, h("td", {}, k), h("td", { class: "value" }, show(v))))));
  const history = h("table", { "aria-label": "History" },
    h("thead", {}, h("tr", {}, ["time", "operation", "device", "fields", "change"].map((t) => h("th", {}, t)))),
    h("tbody", {}, data.history.slice().reverse().map((c) =>
      h("tr", {}, h("td", {}, time(c.time)), h("td", {}, c.operation),
        h("td", { class: "mono", title: c.device }, short(c.device)),
        h("td", {}, c.fields.join(", ")), h("td", { class: "mono", title: c.hash }, short(c.hash))))));
  return h("div", {},
    h("p", {}, h("a", { href: "#/records/" + encodeURIComponent(collection) }, "← " + collection)),
    h("h3", {}, collection + " / " + id, record.deleted ? h("span", { class: "error" }, " (deleted)") : null),
    fields,
    h("p", { class: "muted mono" }, "heads: " + record.heads.map(short).join(", ")),
    h("h3", {}, "History"), history);
}

async function conflicts() {
  const data = await api("/api/conflicts?status=open");
  // A conflict resolved here stays open until the relay's log holds the resolution.
  const all = data.conflicts || [];
  const open = all.filter((c) => !c.resolving);
  const waiting = all.length - open.length;
  setPage(h("h2", {}, "Conflict queue"),
    open.length ? h("div", {}, open.map(conflictCard)) : h("p", { class: "muted", id: "no-conflicts" }, "No open conflicts."),
    waiting ? h("p", { class: "muted" }, waiting + " resolved, waiting to be logged.") : null);
}

function conflictCard(c) {
  const names = new Set([...Object.keys(c.server.fields || {}), ...Object.keys(c.client.fields || {})]);
  const differing = new Set((c.fields || []).map((f) => String(f.path[0])));
  const rows = [...names].sort().map((k) =>
    h("tr", { class: differing.has(k) ? "differs" : null, "data-field": k },
      h("td", {}, k), h("td", {}, show(c.server.fields[k])), h("td", {}, show(c.client.fields[k]))));
  if (c.server.deleted || c.client.deleted) {
    rows.push(h("tr", { class: "differs" }, h("td", {}, "(record)"),
      h("td", {}, c.server.deleted ? "deleted" : "kept"), h("td", {}, c.client.deleted ? "deleted" : "kept")));
  }
  const merged = Object.assign({}, c.server.fields, c.client.fields);
  const editor = h("textarea", { "aria-label": "Merged fields (JSON)", hidden: true }, JSON.stringify(merged, null, 2));
  const message = h("span", { role: "status" });
  const resolve = async (resolution, resolvedData) => {
    message.textContent = "Resolving…";
    try {
      const body = { conflict_id: c.id, resolution };
      if (resolvedData !== undefined) body.resolved_data = resolvedData;
      await api("/api/sync/resolve-conflict", { method: "POST", body });
      message.textContent = "Resolved.";
      message.className = "ok";
      setTimeout(() => route(true), 300);
    } catch (e) {
      message.textContent = e.message;
      message.className = "error";
    }
  };
  const mergeButton = h("button", {
    type: "button",
    onclick: () => {
      if (editor.hidden) {
        editor.hidden = false;
        editor.focus();
        return;
      }
      let value;
      try {
        value = JSON.parse(editor.value);
      } catch (e) {
        message.textContent = "The merged fields are not valid JSON: " + e.message;
        message.className = "error";
        return;
      }
      resolve("merge", value);
    },
  }, "Merge…");
  return h("article", { class: "conflict", "data-conflict": c.id, "aria-label": "Conflict " + c.id },
    h("h3", {}, c.kind.replace(/_/g, " ") + " in ",
      h("a", { href: "#/records/" + encodeURIComponent(c.collection) + "/" + encodeURIComponent(c.record) }, c.collection + "/" + c.record)),
    h("p", { class: "muted" }, "strategy " + c.strategy + " · conflict " + c.id),
    h("table", { class: "diff" },
      h("thead", {}, h("tr", {}, h("th", {}, "field"),
        h("th", {}, "server (" + short(c.server.device) + ", " + time(c.server.time) + ")"),
        h("th", {}, "client (" + short(c.client.device) + ", " + time(c.client.time) + ")"))),
      h("tbody", {}, rows)),
    editor,
    h("div", { class: "actions" },
      h("button", { type: "button", class: "primary", onclick: () => resolve("server") }, "Keep server"),
      h("button", { type: "button", class: "primary", onclick: () => resolve("client") }, "Keep client"),
      mergeButton, message));
}

async function devices() {
  const data = await api("/api/devices");
  const rows = data.devices.map((d) =>
    h("tr", { "data-device": d.id },
      h("td", {}, d.label || d.kind, d.current ? h("span", { class: "muted" }, " (this browser)") : null),
      h("td", {}, d.kind), h("td", { class: "mono", title: d.id }, short(d.id)),
      h("td", {}, time(d.registered_ms)), h("td", {}, time(d.last_sign_in_ms)), h("td", {}, time(d.last_sync_ms)),
      h("td", { class: "num" }, d.pending === null || d.pending === undefined ? "—" : String(d.pending)),
      h("td", {}, d.revoked_ms ? h("span", { class: "error" }, "revoked " + time(d.revoked_ms)) : h("span", { class: "ok" }, "active")),
      h("td", {}, d.revoked_ms ? "" : h("button", {
        type: "button",
        class: "danger",
        onclick: async () => {
          if (!confirm("Revoke " + (d.label || d.id) + "? It will be cut off at once and cannot sign in again.")) return;
          try {
            await api("/api/devices/" + encodeURIComponent(d.id) + "/revoke", { method: "POST", body: {} });
            devices();
          } catch (e) {
            status(e.message, true);
          }
        },
      }, "Revoke"))));
  setPage(h("h2", {}, "Devices"),
    h("p", { class: "muted" }, "Pending: log entries the device has not been sent yet (known once it synced since the relay started)."),
    h("table", { "aria-label": "Devices" },
      h("thead", {}, h("tr", {}, ["name", "kind", "id", "registered", "last sign-in", "last sync", "pending", "status", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows)));
}

async function log() {
  const data = await api("/api/sync-log?limit=200");
  const rows = data.entries.map((e) =>
    h("tr", { class: e.outcome === "ok" ? null : "error" },
      h("td", {}, time(e.time_ms)), h("td", { class: "mono", title: e.device }, short(e.device)), h("td", {}, e.kind),
      h("td", { class: "num" }, String(e.changes)), h("td", { class: "num" }, String(e.conflicts)),
      h("td", { class: "num" }, e.duration_ms.toFixed(1)), h("td", {}, e.outcome, e.error ? ": " + e.error : "")));
  setPage(h("h2", {}, "Sync log"),
    rows.length ? h("table", { "aria-label": "Sync log" },
      h("thead", {}, h("tr", {}, ["time", "device", "kind", "changes", "conflicts", "ms", "outcome"].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows)) : h("p", { class: "muted" }, "No syncs since the relay started."));
}

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const child of children) el.append(child);
  return el;
}

// A bar chart of one or two series per minute, with an optional line (right axis, 0..1).
function chart(title, minutes, series, line) {
  const width = 720, height = 180, pad = 28;
  const max = Math.max(1, ...minutes.map((m) => series.reduce((s, f) => s + f.value(m), 0)));
  const step = (width - pad * 2) / Math.max(1, minutes.length);
  const root = svg("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title });
  root.append(svg("title", {}, title));
  root.append(svg("text", { x: pad, y: 14 }, title + " (max " + Math.round(max) + ")"));
  minutes.forEach((m, i) => {
    let y = height - pad;
    for (const s of series) {
      const v = s.value(m);
      const bar = (v / max) * (height - pad * 2);
      y -= bar;
      root.append(svg("rect", { class: s.class, x: pad + i * step, y, width: Math.max(1, step - 1), height: bar },
        svg("title", {}, time(m.start_ms) + ": " + s.name + " " + v.toFixed(s.digits || 0))));
    }
  });
  if (line) {
    const points = minutes.map((m, i) => {
      const v = line.value(m);
      return `${pad + i * step + step / 2},${height - pad - v * (height - pad * 2)}`;
    });
    if (points.length) root.append(svg("polyline", { class: "line", points: points.join(" ") }));
  }
  const legend = [...series.map((s) => s.name), line ? line.name + " (line, 0–100%)" : null].filter(Boolean).join(" · ");
  root.append(svg("text", { x: pad, y: height - 8 }, legend));
  return root;
}

async function activity() {
  const data = await api("/api/stats?minutes=60");
  // One slot per minute of the hour, empty where there was no traffic.
  const byStart = new Map(data.minutes.map((x) => [x.start_ms, x]));
  const first = Math.floor(data.since_ms / 60000) * 60000 + 60000;
  const m = Array.from({ length: 60 }, (_, i) => byStart.get(first + i * 60000) || {
    start_ms: first + i * 60000, uploads: 0, downloads: 0, changes_up: 0, changes_down: 0,
    succeeded: 0, failed: 0, conflicts: 0, duration_ms: 0,
  });
  const traffic = data.minutes.length > 0;
  const requests = (x) => x.uploads + x.downloads;
  const totals = m.reduce((t, x) => ({
    up: t.up + x.changes_up, down: t.down + x.changes_down, ok: t.ok + x.succeeded,
    failed: t.failed + x.failed, conflicts: t.conflicts + x.conflicts,
  }), { up: 0, down: 0, ok: 0, failed: 0, conflicts: 0 });
  const summary = h("table", { "aria-label": "Last hour" },
    h("tbody", {},
      h("tr", {}, h("th", {}, "changes up / down"), h("td", { class: "num" }, totals.up + " / " + totals.down)),
      h("tr", {}, h("th", {}, "success rate"), h("td", { class: "num" },
        totals.ok + totals.failed ? (100 * totals.ok / (totals.ok + totals.failed)).toFixed(1) + "%" : "—")),
      h("tr", {}, h("th", {}, "conflicts per 100 changes up"), h("td", { class: "num" },
        totals.up ? (100 * totals.conflicts / totals.up).toFixed(2) : "—"))));
  setPage(h("h2", {}, "Activity (last hour, per minute)"), summary,
    traffic ? h("div", {},
      chart("Sync volume (changes)", m, [
        { name: "up", class: "bar-up", value: (x) => x.changes_up },
        { name: "down", class: "bar-down", value: (x) => x.changes_down },
      ]),
      chart("Mean request duration (ms)", m, [
        { name: "mean ms", class: "bar-up", value: (x) => (requests(x) ? x.duration_ms / requests(x) : 0), digits: 1 },
      ]),
      chart("Requests and failures", m, [
        { name: "succeeded", class: "bar-down", value: (x) => x.succeeded },
        { name: "failed", class: "bar-bad", value: (x) => x.failed },
      ], { name: "conflict rate", value: (x) => (x.changes_up ? Math.min(1, x.conflicts / x.changes_up) : 0) }),
    ) : h("p", { class: "muted" }, "No syncs in the last hour."));
}

// ---- start -------------------------------------------------------------------------------------

document.getElementById("sign-in-form").addEventListener("submit", signIn);
document.getElementById("sign-out").addEventListener("click", () => signedOut(""));
window.addEventListener("hashchange", () => route());
if (session) signedIn();
else signedOut("");
setInterval(() => session && loadAlerts(), 30000);
