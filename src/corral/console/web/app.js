// corral's web console: one page, no build step.  Views by URL hash:
//   #/              live alert feed and the sandboxes
//   #/sandbox/NAME  a sandbox: steps as a timeline with their alerts, process tree, evidence, release/stop
//   #/report/ID     the incident report of an episode or a sandbox
// Everything live arrives on one server-sent-event stream (/api/stream); pages fetch /api/* for the rest.
"use strict";

const SEVERITIES = ["info", "low", "medium", "high", "critical"];
const FEED_MAX = 200;
const state = { alerts: [], sandboxes: [], view: null };

// -- small helpers ---------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function time(text) {
  if (!text) return "";
  const d = new Date(text);
  return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function nsTime(ns) { return ns ? time(new Date(Number(BigInt(ns) / 1000000n)).toISOString()) : ""; }

function bytes(n) {
  if (n === undefined || n === null) return "";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function severity(s) { return h("span", { class: `sev sev-${s || "none"}` }, s || "—"); }

function limits(l) {
  const parts = [];
  if (l && l.cpus) parts.push(`${l.cpus} cpu`);
  if (l && l.memory_bytes) parts.push(bytes(l.memory_bytes));
  if (l && l.pids) parts.push(`${l.pids} pids`);
  return parts.join(", ") || "none";
}

function flash(text) {
  const el = document.getElementById("flash") || document.body.appendChild(h("div", { id: "flash" }));
  el.textContent = text;
  el.className = "flash show";
  setTimeout(() => { el.className = "flash"; }, 4000);
}

// -- the live stream --------------------------------------------------------------

function connect() {
  const conn = document.getElementById("conn");
  const stream = new EventSource("/api/stream");
  stream.onopen = () => { conn.textContent = "live"; conn.className = "conn up"; };
  stream.onerror = () => { conn.textContent = "reconnecting…"; conn.className = "conn down"; };
  stream.addEventListener("alert", (m) => {
    const alert = JSON.parse(m.data).alert;
    state.alerts.unshift(alert);
    state.alerts.length = Math.min(state.alerts.length, FEED_MAX);
    if (state.view && state.view.onAlert) state.view.onAlert(alert);
  });
  for (const kind of ["sandbox", "step"]) {
    stream.addEventListener(kind, (m) => {
      const message = JSON.parse(m.data);
      if (state.view && state.view.onChange) state.view.onChange(message);
    });
  }
}

// -- #/ : the live view -------------------------------------------------------------

function alertRow(a) {
  return h("li", { class: `alert sev-border-${a.severity}`, "data-rule": a.rule, "data-sandbox": a.sandbox || "",
                   "data-id": a.id },
    h("div", { class: "alert-head" }, severity(a.severity), h("span", { class: "cat" }, a.category),
      h("strong", {}, a.rule), h("span", { class: "when" }, time(a.time))),
    h("div", { class: "alert-out" }, a.output),
    h("div", { class: "alert-meta" },
      a.sandbox ? h("a", { href: `#/sandbox/${a.sandbox}` }, a.sandbox) : "host",
      ` · step ${a.step}`, a.step_cmdline ? h("code", {}, a.step_cmdline) : null,
      ` · pid ${a.pid} `, h("code", {}, a.exe || ""),
      a.action_taken !== "alert" ? h("span", { class: "action" }, `${a.action_taken}${a.action_result ? ": " + a.action_result : ""}`) : null,
      a.folded ? ` (+${a.folded} folded)` : null));
}

function sandboxRow(s) {
  return h("tr", { "data-sandbox": s.name, class: `state-${s.state}` },
    h("td", {}, h("a", { href: `#/sandbox/${s.name}` }, s.name)),
    h("td", {}, h("span", { class: `state ${s.state}` }, s.state)),
    h("td", {}, s.mode), h("td", {}, s.episode || ""), h("td", {}, limits(s.limits)),
    h("td", { class: "num" }, s.cpu_percent !== undefined ? `${s.cpu_percent}%` : ""),
    h("td", { class: "num" }, bytes(s.memory_bytes)),
    h("td", { class: "num" }, s.alerts), h("td", {}, severity(s.worst_severity)));
}

function liveView() {
  const feed = h("ul", { id: "feed", class: "feed" });
  const table = h("tbody", { id: "sandboxes" });
  const view = h("div", { class: "live" },
    h("section", {}, h("h2", {}, "Alerts ", h("small", {}, "live, newest first")), feed),
    h("section", {}, h("h2", {}, "Sandboxes"),
      h("table", { class: "grid" },
        h("thead", {}, h("tr", {}, ...["sandbox", "state", "mode", "episode", "limits", "cpu", "memory", "alerts",
                                       "worst"].map((t) => h("th", {}, t)))),
        table)));
  const drawFeed = () => {
    feed.replaceChildren(...state.alerts.map(alertRow));
    if (!state.alerts.length) feed.append(h("li", { class: "empty" }, "no alerts yet"));
  };
  const drawSandboxes = async () => {
    state.sandboxes = await api("/api/sandboxes?all=1");
    const rows = state.sandboxes.slice().reverse().slice(0, 100).map(sandboxRow);
    table.replaceChildren(...rows);
    if (!rows.length) table.append(h("tr", {}, h("td", { colspan: 9, class: "empty" }, "no sandboxes yet")));
  };
  drawFeed();
  drawSandboxes().catch((e) => flash(e.message));
  const timer = setInterval(() => drawSandboxes().catch(() => {}), 3000);
  return {
    node: view,
    onAlert: () => { drawFeed(); drawSandboxes().catch(() => {}); },
    onChange: () => drawSandboxes().catch(() => {}),
    close: () => clearInterval(timer),
  };
}

// -- #/sandbox/NAME -----------------------------------------------------------------

function procNode(p) {
  const offending = p.alerts.length > 0;
  const worst = p.alerts.reduce((w, a) => Math.max(w, SEVERITIES.indexOf(a.severity)), -1);
  const exit = p.exit ? (p.exit.signal ? ` killed by signal ${p.exit.signal}` : ` exit ${p.exit.code}`) : " running";
  return h("li", {},
    h("div", { class: `proc${offending ? " offending sev-border-" + SEVERITIES[worst] : ""}`, "data-pid": p.pid,
               title: p.exe },
      h("span", { class: "pid" }, p.pid), " ", h("code", {}, p.cmdline || p.exe),
      h("span", { class: "step" }, ` step ${p.step}`), h("span", { class: "exit" }, exit),
      ...p.alerts.map((a) => h("span", { class: `tag sev-${a.severity}` }, a.rule))),
    p.children.length ? h("ul", {}, ...p.children.map(procNode)) : null);
}

function evidenceBlock(ev) {
  const b = ev.bundle || {};
  return h("details", { class: "evidence", open: true },
    h("summary", {}, `evidence for alert ${ev.alert_id} — ${ev.path}`),
    h("h4", {}, "processes when frozen"),
    h("ul", {}, ...(b.processes || []).map((p) =>
      h("li", {}, h("span", { class: "pid" }, p.pid), " ", h("code", {}, (p.argv || []).join(" ") || p.comm || ""),
        p.step !== null && p.step !== undefined ? ` (step ${p.step})` : ""))),
    h("h4", {}, "sockets"),
    h("ul", {}, ...(b.sockets || []).map((s) => h("li", {}, h("code", {}, JSON.stringify(s))))),
    b.binaries && b.binaries.length ? h("h4", {}, "binaries kept") : null,
    h("ul", {}, ...(b.binaries || []).map((x) => h("li", {}, h("code", {}, typeof x === "string" ? x : JSON.stringify(x))))));
}

function sandboxView(name) {
  const node = h("div", { class: "sandbox" }, h("p", {}, "loading…"));
  let closed = false;
  const act = async (what) => {
    try {
      await api(`/api/sandboxes/${encodeURIComponent(name)}/${what}`, { method: "POST" });
      flash(`${what}: done`);
    } catch (e) { flash(`${what}: ${e.message}`); }
    draw();
  };
  const draw = async () => {
    let d;
    try { d = await api(`/api/sandboxes/${encodeURIComponent(name)}`); } catch (e) {
      node.replaceChildren(h("p", { class: "error" }, e.message)); return;
    }
    if (closed) return;
    const s = d.sandbox;
    const byStep = {};
    for (const a of d.alerts) (byStep[a.step] = byStep[a.step] || []).push(a);
    node.replaceChildren(...[
      h("h2", {}, s.name, " ", h("span", { id: "state", class: `state ${s.state}` }, s.state)),
      h("p", { class: "meta" }, `mode ${s.mode} · policy ${s.policy} · episode ${s.episode || "—"} · limits `,
        limits(s.limits), s.memory_bytes !== undefined ? ` · memory ${bytes(s.memory_bytes)}` : "",
        s.cpu_percent !== undefined ? ` · cpu ${s.cpu_percent}%` : "", ` · ${s.alerts} alerts`),
      h("div", { class: "buttons" },
        h("button", { id: "release", disabled: s.state !== "frozen" || !s.live, onclick: () => act("release") },
          "release"),
        h("button", { id: "stop", class: "danger", disabled: !s.live, onclick: () => act("stop") }, "stop"),
        h("a", { href: `#/report/${s.episode || s.name}` }, "incident report")),
      h("section", {}, h("h3", {}, "Steps"),
        h("ol", { class: "timeline" }, ...d.steps.map((st) =>
          h("li", { class: (byStep[st.step] || []).length ? "step flagged" : "step", "data-step": st.step },
            h("div", {}, h("strong", {}, `step ${st.step}`), " ", nsTime(st.started_ns), " ",
              h("code", {}, st.command),
              st.exit_code !== null && st.exit_code !== undefined ? h("span", { class: "exit" }, ` exit ${st.exit_code}`)
                : h("span", { class: "exit" }, " running")),
            h("ul", { class: "feed" }, ...(byStep[st.step] || []).map(alertRow)))))),
      h("section", {}, h("h3", {}, "Process tree"),
        d.tree.length ? h("ul", { id: "tree", class: "tree" }, ...d.tree.map(procNode)) : h("p", {}, "no processes yet")),
      d.evidence.length ? h("section", {}, h("h3", {}, "Evidence"), ...d.evidence.map(evidenceBlock)) : null,
    ].filter(Boolean));
  };
  draw();
  return {
    node,
    onAlert: (a) => { if (a.sandbox === name) draw(); },
    onChange: (m) => { if ((m.sandbox && (m.sandbox.name || m.sandbox)) === name) draw(); },
    close: () => { closed = true; },
  };
}

// -- #/report/ID ----------------------------------------------------------------------

function reportView(id) {
  const frame = h("iframe", { class: "report", src: `/api/report/${encodeURIComponent(id)}?format=html`,
                              title: `incident report ${id}` });
  return { node: h("div", {}, h("p", {}, h("a", { href: `/api/report/${encodeURIComponent(id)}?format=md` }, "markdown"),
    " · ", h("a", { href: `/api/report/${encodeURIComponent(id)}?format=json` }, "json")), frame) };
}

// -- routing --------------------------------------------------------------------------

function route() {
  if (state.view && state.view.close) state.view.close();
  const [, page, id] = (location.hash || "#/").split("/").map(decodeURIComponent);
  state.view = page === "sandbox" && id ? sandboxView(id) : page === "report" && id ? reportView(id) : liveView();
  document.getElementById("view").replaceChildren(state.view.node);
}

async function start() {
  try {
    state.alerts = (await api("/api/alerts?limit=" + FEED_MAX)).reverse();
  } catch (e) { flash(e.message); }
  window.addEventListener("hashchange", route);
  route();
  connect();
}

start();
