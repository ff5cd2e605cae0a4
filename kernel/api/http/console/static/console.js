// The Kernos operator console. Plain JavaScript, no build step, no third-party code: it fetches a page's
// JSON from /console/api/page/PAGE, then follows /console/api/stream/PAGE (server-sent events, one snapshot a
// second) for the live pages. Everything the kernel sends is put in the page as text, never as HTML.
"use strict";

const meta = (n) => document.querySelector(`meta[name="${n}"]`).content;
const CSRF = meta("csrf");
const WHO = meta("who");
const OPERATOR = meta("operator") === "1";
// Live pages follow a stream; the others (whose data changes only when their agent calls, or costs more to
// compute) load on demand.
const LIVE_PAGES = new Set(["overview", "agents", "requests", "tools", "tuning"]);
const KEEP_POINTS = 600;

const view = document.getElementById("view");
const controls = document.getElementById("controls");
const message = document.getElementById("message");
const liveDot = document.getElementById("live");
let source = null;
let route = { page: "overview", params: {} };
let series = {};          // overview: model -> chart points

// -- small DOM helpers ---------------------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "text") e.textContent = v;
    else if (k === "style") e.style.cssText = v;        // through the CSSOM: the CSP forbids style attributes
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}
const svgEl = (tag, attrs) => {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
};
const badge = (s) => el("span", { class: `badge ${s}` }, s);
const num = (x, digits = 0) => (x === null || x === undefined ? "–" : Number(x).toLocaleString(undefined,
  { maximumFractionDigits: digits, minimumFractionDigits: 0 }));
const sig = (x) => (x === null || x === undefined ? "–" : x !== 0 && Math.abs(x) < 0.01 ? x.toExponential(2)
  : num(x, 3));
const shortId = (id) => el("code", { title: id }, id.length > 12 ? id.slice(0, 12) + "…" : id);
const ms = (x) => (x === null || x === undefined ? "–" : x >= 1000 ? `${num(x / 1000, 2)} s` : `${num(x, 0)} ms`);
function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${num(n, i ? 1 : 0)} ${units[i]}`;
}
function when(t) {
  if (!t) return "–";
  const d = new Date(t * 1000);
  return d.toDateString() === new Date().toDateString() ? d.toLocaleTimeString() : d.toLocaleString();
}
function table(headers, rows, attrs) {
  return el("table", attrs || {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { class: h.num ? "num" : null }, h.label || h)))),
    el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: headers.length, class: "muted" }, "none"))));
}
const td = (x, cls) => el("td", { class: cls }, x);
const tdn = (x) => el("td", { class: "num" }, x);
function usageBar(used, total) {
  const f = total ? Math.min(1, used / total) : 0;
  return el("div", { class: `bar${f >= 0.95 ? " full" : ""}`, title: `${Math.round(f * 100)}%` },
    el("div", { style: `width:${(f * 100).toFixed(1)}%` }));
}
function showError(text) { message.textContent = text || ""; }

// -- talking to the kernel -------------------------------------------------------------------------------------
async function getPage(page, params) {
  const r = await fetch(`/console/api/page/${page}?${new URLSearchParams(params)}`, { credentials: "same-origin" });
  if (r.status === 401) { location.href = "/console/login"; throw new Error("logged out"); }
  const body = await r.json();
  if (!r.ok) throw new Error(body.error ? body.error.message : `HTTP ${r.status}`);
  return body;
}
async function act(action, body) {
  const r = await fetch(`/console/api/action/${action}`, {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-Kernos-CSRF": CSRF }, body: JSON.stringify(body),
  });
  const out = await r.json();
  if (!r.ok) { showError(out.error ? out.error.message : `HTTP ${r.status}`); return null; }
  showError("");
  return out;
}
function follow(page, params, onData) {
  if (source) source.close();
  source = new EventSource(`/console/api/stream/${page}?${new URLSearchParams(params)}`);
  source.onopen = () => liveDot.classList.add("on");
  source.onerror = () => liveDot.classList.remove("on");
  source.onmessage = (e) => { liveDot.classList.add("on"); onData(JSON.parse(e.data)); };
  source.addEventListener("logout", () => { location.href = "/console/login"; });
  source.addEventListener("failure", (e) => showError(JSON.parse(e.data).message));
}

// -- routing: #page?key=value ----------------------------------------------------------------------------------
function parseHash() {
  const [page, query] = (location.hash.slice(1) || "overview").split("?");
  return { page, params: Object.fromEntries(new URLSearchParams(query || "")) };
}
function go(page, params) {
  const q = new URLSearchParams(Object.entries(params || {}).filter(([, v]) => v !== "" && v !== undefined));
  location.hash = `${page}${q.toString() ? "?" + q : ""}`;
}
async function open() {
  route = parseHash();
  const { page, params } = route;
  if (source) { source.close(); source = null; liveDot.classList.remove("on"); }
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === page);
  showError("");
  controls.replaceChildren();
  view.replaceChildren(el("p", { class: "muted" }, "loading…"));
  const page_ = PAGES[page];
  if (!page_) { view.replaceChildren(el("p", {}, `no page ${page}`)); return; }
  if (page_.controls) controls.append(...await page_.controls(params));
  if (page_.needsAgent && OPERATOR && !params.agent) {
    view.replaceChildren(el("p", { class: "muted", id: "pick-agent" }, "Pick an agent above."));
    return;
  }
  let data;
  try { data = await getPage(page, params); } catch (e) { view.replaceChildren(); showError(e.message); return; }
  page_.render(data, params, true);
  if (LIVE_PAGES.has(page)) {
    const p = { ...params };
    if (page === "overview") p.since = lastPoint();
    follow(page, p, (d) => { if (parseHash().page === page) page_.render(d, params, false); });
  }
}
window.addEventListener("hashchange", open);

// An operator picks whose contexts, memory and files to see.
let agentNames = null;
async function agentPicker(params, page) {
  if (!OPERATOR) return [el("span", { class: "muted" }, `agent: ${WHO}`)];
  if (agentNames === null) {
    try { agentNames = (await getPage("agents", { exited: "1" })).agents.map((a) => a.agent_id); } catch (e) { agentNames = []; }
  }
  const select = el("select", { id: "agent-picker",
    onchange: (e) => go(page, { ...params, agent: e.target.value, path: "", a: "", b: "" }) },
  el("option", { value: "" }, "pick an agent…"),
  agentNames.map((n) => el("option", { value: n, selected: n === params.agent }, n)));
  return [el("label", { for: "agent-picker" }, "agent "), select];
}

// -- charts: small SVG line charts -----------------------------------------------------------------------------
const COLORS = ["#1f4e79", "#d9822b", "#2d7d46", "#b31d28"];
function chart(title, points, lines, format, extra) {
  const w = 300, h = 110, pad = 4;
  const svg = svgEl("svg", { viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none" });
  const xs = points.map((p) => p.t);
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  let ymax = 0;
  for (const p of points) for (const l of lines) if (p[l.key] !== null && p[l.key] !== undefined) ymax = Math.max(ymax, p[l.key]);
  if (extra && extra.ceiling) ymax = Math.max(ymax, extra.ceiling);
  ymax = ymax || 1;
  const X = (t) => (x1 > x0 ? pad + ((t - x0) / (x1 - x0)) * (w - 2 * pad) : w / 2);
  const Y = (v) => h - pad - (v / ymax) * (h - 2 * pad);
  if (extra && extra.ceiling) {
    svg.append(svgEl("line", { x1: 0, x2: w, y1: Y(extra.ceiling), y2: Y(extra.ceiling), stroke: "#b31d28",
      "stroke-dasharray": "4 3", "stroke-width": 1 }));
  }
  lines.forEach((l, i) => {
    const pts = points.filter((p) => p[l.key] !== null && p[l.key] !== undefined)
      .map((p) => `${X(p.t).toFixed(1)},${Y(p[l.key]).toFixed(1)}`);
    if (pts.length) svg.append(svgEl("polyline", { points: pts.join(" "), fill: "none", stroke: COLORS[i % 4],
      "stroke-width": 1.6, "vector-effect": "non-scaling-stroke" }));
  });
  const last = points.length ? points[points.length - 1] : {};
  return el("div", { class: "chart", "data-chart": title, "data-points": String(points.length) },
    el("div", { class: "title" }, el("span", {}, title), el("span", {}, `max ${format(ymax)}`)),
    svg,
    el("div", { class: "legend" }, lines.map((l, i) => el("span", { style: `color:${COLORS[i % 4]}` },
      `${l.label} ${format(last[l.key])}`))));
}
function lastPoint() {
  let t = 0;
  for (const pts of Object.values(series)) if (pts.length) t = Math.max(t, pts[pts.length - 1].t);
  return t;
}

// -- the pages -------------------------------------------------------------------------------------------------
const PAGES = {};

PAGES.overview = {
  render(d, params, first) {
    if (first) series = {};
    for (const [m, pts] of Object.entries(d.series)) {
      const have = series[m] || (series[m] = []);
      const t = have.length ? have[have.length - 1].t : 0;
      for (const p of pts) if (p.t > t) have.push(p);
      if (have.length > KEEP_POINTS) have.splice(0, have.length - KEEP_POINTS);
    }
    const cards = el("div", { class: "cards" },
      [["kernel", `v${d.version}`], ["uptime", `${num(d.uptime_s / 60, 1)} min`], ["active agents", num(d.active_agents)],
        ["syscalls", num(d.syscalls)], ["in flight", num(d.in_flight)], ["default model", d.default_model]]
        .map(([k, v]) => el("div", { class: "card" }, el("div", { class: "k" }, k), el("div", { class: "v" }, v))));
    const models = d.models.map((m) => {
      const pts = series[m.name] || [];
      return el("section", { class: "model", "data-model": m.name },
        el("h2", {}, `${m.name} `, el("span", { class: "muted small" },
          `${m.architecture} · ${m.device} · ${m.dtype} · policy ${m.policy}` +
          (m.adapters.length ? ` · adapters ${m.adapters.join(", ")}` : ""))),
        el("div", { class: "cards" },
          [["tokens/s", num(m.tokens_per_s, 1)], ["running (batch)", num(m.running)],
            ["waiting (preempted, suspended)", `${num(m.waiting)} (${m.preempted}, ${m.suspended})`],
            ["cache", `${bytes(m.cache_bytes)} of ${m.cache_budget_bytes ? bytes(m.cache_budget_bytes) : "no limit"}`],
            ["context switches", `${num(m.context_switches)} (${ms(m.switch_ms)})`],
            ["finished", `${num(m.completed)} requests, ${num(m.generated_tokens)} tokens`]]
            .map(([k, v]) => el("div", { class: "card" }, el("div", { class: "k" }, k), el("div", { class: "v" }, v)))),
        el("div", { class: "charts" },
          chart("tokens/s", pts, [{ key: "tokens_per_s", label: "tokens/s" }], (x) => num(x, 1)),
          chart("batch and queue", pts, [{ key: "batch", label: "running" }, { key: "waiting", label: "waiting" },
            { key: "preempted", label: "preempted" }], (x) => num(x)),
          chart("cache", pts, [{ key: "cache_bytes", label: "cache" }], bytes,
            { ceiling: m.cache_budget_bytes || 0 }),
          chart("context switches", pts, [{ key: "context_switches", label: "total" }], (x) => num(x)),
          chart("time to first token (last minute)", pts, [{ key: "ttft_p50_ms", label: "p50" },
            { key: "ttft_p95_ms", label: "p95" }], ms),
          chart("queue wait (last minute)", pts, [{ key: "queue_p50_ms", label: "p50" },
            { key: "queue_p95_ms", label: "p95" }], ms)));
    });
    const c = d.cluster;
    const cluster = !c ? [] : [el("section", { class: "cluster" },
      el("h2", {}, "Cluster ", el("span", { class: "muted small" },
        `this node ${c.node_id} · ${num(c.forwarded)} calls forwarded to home nodes · ` +
        `${num(c.served_for_unreachable)} served for an unreachable home`)),
      c.nodes.length ? table(["node", "state", "lease", { label: "heartbeat s", num: 1 }, { label: "up min", num: 1 },
        "gRPC", "models"], c.nodes.map((n) => el("tr", { "data-node": n.node_id, "data-state": n.state },
        td(n.node_id === c.node_id ? el("strong", {}, n.node_id) : n.node_id), td(badge(n.state)),
        td(n.alive ? "current" : "expired"), tdn(num(n.heartbeat_age_s, 1)), tdn(num(n.uptime_s / 60, 1)),
        td(n.grpc_address), td(n.models.join(", ")))), { id: "cluster-table" })
        : el("p", { class: "muted" }, "the nodes are shown to operators"))];
    view.replaceChildren(cards, ...cluster, ...models);
  },
};

PAGES.agents = {
  controls: async (params) => [el("label", { class: "controls" }, el("input", { type: "checkbox", id: "agents-exited",
    checked: params.exited === "1", onchange: (e) => go("agents", { exited: e.target.checked ? "1" : "" }) }),
  " include exited agents")],
  render(d) {
    const rows = d.agents.map((a) => el("tr", { "data-agent": a.agent_id },
      td(el("div", {}, el("strong", {}, a.agent_id), el("div", { class: "muted small" }, a.description))),
      td(badge(a.state)),
      tdn(num(a.prompt_tokens)), tdn(num(a.completion_tokens)), tdn(num(a.syscalls)),
      td(a.groups.join(", ") || "–"), td(el("span", { class: "small" }, a.capabilities.join(" "))),
      td(a.quotas.map((q) => !(q.concurrent_generations || q.tokens_per_minute || q.requests_per_second)
        ? el("div", { class: "small muted" }, `${q.subject}: no limits (${q.running} running)`)
        : el("div", { class: "small" }, `${q.subject}: `,
        `${q.running}${q.concurrent_generations ? "/" + q.concurrent_generations : ""} running, `,
        `${num(q.tokens_last_minute)}${q.tokens_per_minute ? "/" + num(q.tokens_per_minute) : ""} tok/min, `,
        `${q.requests_last_second}${q.requests_per_second ? "/" + q.requests_per_second : ""} req/s`))),
      td(a.grants.map((g) => el("div", { class: "small" },
        `${g.grantee} ${g.permission} ${g.kind} ${g.owner}${g.resource ? "/" + g.resource : ""}` +
        (g.expires ? ` until ${when(g.expires)}` : "")))),
      td(Object.entries(a.default_adapters).map(([m, ad]) => el("div", { class: "small" }, `${m}: ${ad}`))),
      td(when(a.last_seen))));
    view.replaceChildren(el("h2", {}, `Agents (${d.total}${d.total > d.agents.length ? ", the first 500" : ""})`),
      table(["agent", "state", { label: "prompt tok", num: 1 }, { label: "completion tok", num: 1 },
        { label: "syscalls", num: 1 }, "groups", "capabilities", "quotas (used/limit)", "grants",
        "default adapter", "last seen"], rows, { id: "agents-table" }));
  },
};

PAGES.requests = {
  render(d) {
    const live = d.live.map((r) => el("tr", { "data-request-id": r.request_id, "data-state": r.state },
      td(shortId(r.request_id)), td(r.agent_id), td(r.model), td(badge(r.state)), tdn(r.priority),
      tdn(num(r.prompt_tokens)), tdn(`${num(r.generated_tokens)} / ${num(r.max_tokens)}`), tdn(r.preemptions),
      tdn(ms(r.waiting_ms)), tdn(ms(r.ttft_ms)), tdn(ms(r.age_ms)), tdn(bytes(r.cache_bytes)),
      td(el("button", { class: "danger", "data-action": "cancel", onclick: async (e) => {
        e.target.disabled = true;
        await act("cancel-request", { request_id: r.request_id });
      } }, "Cancel"))));
    const recent = d.recent.map((r) => el("tr", { "data-request-id": r.request_id, "data-finish": r.finish },
      td(shortId(r.request_id)), td(r.agent_id), td(r.model), td(badge(r.finish)),
      tdn(num(r.prompt_tokens)), tdn(num(r.generated_tokens)), tdn(r.preemptions), tdn(ms(r.queue_wait_ms)),
      tdn(ms(r.ttft_ms)), tdn(ms(r.total_ms)), td(when(r.at))));
    view.replaceChildren(
      el("h2", {}, `Live (${d.live.length})`),
      table(["request", "agent", "model", "state", { label: "priority", num: 1 }, { label: "prompt", num: 1 },
        { label: "generated", num: 1 }, { label: "preemptions", num: 1 }, { label: "waiting", num: 1 },
        { label: "TTFT", num: 1 }, { label: "age", num: 1 }, { label: "cache", num: 1 }, ""], live, { id: "live-requests" }),
      el("h2", {}, "Recently finished"),
      table(["request", "agent", "model", "finish", { label: "prompt", num: 1 }, { label: "generated", num: 1 },
        { label: "preemptions", num: 1 }, { label: "queue wait", num: 1 }, { label: "TTFT", num: 1 },
        { label: "total", num: 1 }, "at"], recent, { id: "recent-requests" }));
  },
};

PAGES.contexts = {
  needsAgent: true,
  controls: async (params) => [el("div", { class: "controls" }, ...await agentPicker(params, "contexts"),
    el("button", { onclick: () => open() }, "Refresh"))],
  render(d) {
    const out = d.contexts.map((c) => el("section", { class: "context", "data-context": c.context_id },
      el("h2", {}, `${c.context_id} `, el("span", { class: "muted small" },
        `${c.model} · ${num(c.prompt_tokens)} of ${num(c.budget_tokens)} tokens · ${c.evicted} evicted` +
        (c.summarize ? " · summarizes" : ""))),
      usageBar(c.prompt_tokens, c.budget_tokens),
      el("p", { class: "muted small" }, c.resident ? `resident KV on ${c.model} (all contexts): ` +
        `${bytes(c.resident.bytes)} in ${num(c.resident.entries)} prefixes · ${num(c.resident.tokens_reused)} ` +
        "prompt tokens reused" : "resident KV: none on this model"),
      c.blocks.map((b) => el("div", { class: `block ${b.kind}${b.pinned ? " pinned" : ""}`, "data-block": b.block_id,
        "data-tokens": String(b.tokens) },
        el("div", { class: "meta" }, `${b.kind}${b.pinned ? " · pinned" : ""} · ${b.role}` +
          (b.label ? ` · ${b.label}` : "") + ` · ${num(b.tokens)} tokens`), b.content))));
    // (each block's count is what it adds to the assembled prompt: they sum to the context's size)
    view.replaceChildren(...(out.length ? out : [el("p", { class: "muted" }, d.note || "no contexts")]));
  },
};

PAGES.memory = {
  needsAgent: true,
  async controls(params) {
    const q = el("input", { type: "search", id: "memory-query", placeholder: "search memory…", value: params.q || "",
      size: 40 });
    const k = el("input", { type: "number", id: "memory-k", min: 1, max: 50, value: params.k || 5 });
    const form = el("form", { class: "controls", onsubmit: (e) => {
      e.preventDefault(); go("memory", { ...params, q: q.value, k: k.value });
    } }, ...await agentPicker(params, "memory"), q, el("label", {}, "k ", k),
    el("button", { type: "submit", class: "primary", id: "memory-search" }, "Search"));
    return [form];
  },
  render(d) {
    if (!d.query) { view.replaceChildren(el("p", { class: "muted" }, "Type a query.")); return; }
    view.replaceChildren(table(["text", "metadata", { label: "distance", num: 1 }, "id"],
      d.results.map((h) => el("tr", {}, td(h.text), td(el("code", {}, JSON.stringify(h.metadata))),
        tdn(num(h.distance, 3)), td(el("code", {}, h.id)))), { id: "memory-results" }));
  },
};

PAGES.files = {
  needsAgent: true,
  controls: async (params) => [el("div", { class: "controls" }, ...await agentPicker(params, "files"),
    el("button", { onclick: () => open() }, "Refresh"))],
  render(d, params) {
    const files = d.files.map((f) => el("tr", { "data-path": f.path },
      td(el("a", { href: "#", onclick: (e) => { e.preventDefault(); go("files", { agent: params.agent, path: f.path }); } },
        f.path)), tdn(`v${f.version}`), tdn(bytes(f.size)), td(when(f.created))));
    const parts = [el("h2", {}, "Files"), table(["path", { label: "version", num: 1 }, { label: "size", num: 1 },
      "written"], files, { id: "files-table" })];
    if (d.path) {
      const versions = d.history.map((f) => f.version);
      const a = el("select", { id: "diff-a" }, versions.map((v) => el("option", { value: v,
        selected: String(v) === (params.a || String(versions[Math.max(0, versions.length - 2)])) }, `v${v}`)));
      const b = el("select", { id: "diff-b" }, versions.map((v) => el("option", { value: v,
        selected: String(v) === (params.b || String(versions[versions.length - 1])) }, `v${v}`)));
      parts.push(el("h2", {}, `History of ${d.path}`),
        table(["version", { label: "size", num: 1 }, "sha256", "written", ""], d.history.slice().reverse().map((f) =>
          el("tr", { "data-version": f.version }, td(`v${f.version}${f.deleted ? " (deleted)" : ""}`), tdn(bytes(f.size)),
            td(el("code", {}, f.sha256.slice(0, 12))), td(when(f.created)),
            td(el("button", { "data-action": "rollback", onclick: async () => {
              const r = await act("rollback", { agent: params.agent || "", path: d.path, version: f.version });
              if (r) open();
            } }, `Roll back to v${f.version}`)))), { id: "history-table" }),
        el("div", { class: "controls" }, "diff ", a, " → ", b,
          el("button", { class: "primary", id: "diff-button",
            onclick: () => go("files", { ...params, a: a.value, b: b.value }) }, "Diff")));
      if (d.diff) {
        const pre = el("pre", { class: "diff", id: "diff" });
        if (d.diff.binary) pre.append(d.diff.same ? "identical" : "binary files differ");
        else if (!d.diff.lines.length) pre.append("identical");
        for (const line of d.diff.lines) {
          const cls = line.startsWith("@@") ? "hunk" : line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : "";
          pre.append(el("span", { class: cls }, line), "\n");
        }
        parts.push(pre);
      }
    }
    view.replaceChildren(...parts);
  },
};

PAGES.tools = {
  render(d) {
    const pending = d.pending.map((c) => el("tr", { "data-call": c.call_id },
      td(el("code", {}, c.call_id)), td(c.tool), td(c.agent_id), td(el("code", {}, c.args)), tdn(`${num(c.age_s, 0)} s`),
      td(d.can_confirm ? [
        el("button", { class: "primary", "data-action": "confirm", onclick: async (e) => {
          e.target.disabled = true; await act("confirm", { call_id: c.call_id });
        } }, "Confirm"), " ",
        el("button", { class: "danger", "data-action": "deny", onclick: async (e) => {
          e.target.disabled = true; await act("deny", { call_id: c.call_id });
        } }, "Deny")] : el("span", { class: "muted" }, "waiting for an operator"))));
    const log = d.log.map((c) => el("tr", { "data-call": c.call_id, "data-state": c.state },
      td(el("code", {}, c.call_id)), td(c.tool), td(c.agent_id), td(badge(c.state)), td(el("code", {}, c.args)),
      td(el("code", {}, c.error || c.result || "")), tdn(ms(c.duration_ms)), tdn(`${num(c.age_s, 0)} s ago`)));
    view.replaceChildren(
      el("h2", {}, `Waiting for confirmation (${d.pending.length})`),
      el("p", { class: "muted small" }, `Irreversible tools wait for an operator; no answer within ` +
        `${num(d.confirm_timeout_s)} s denies the call.`),
      table(["call", "tool", "agent", "arguments", { label: "waiting", num: 1 }, ""], pending, { id: "pending-calls" }),
      el("h2", {}, "Call log"),
      table(["call", "tool", "agent", "state", "arguments", "result or error", { label: "took", num: 1 },
        { label: "when", num: 1 }], log, { id: "call-log" }));
  },
};

function evaluation(m) {
  if (!m || !m.base || !m.tuned) return el("code", {}, JSON.stringify(m || {}));
  return `loss ${sig(m.base.loss)} → ${sig(m.tuned.loss)}, accuracy ${num(m.base.accuracy, 2)} → ` +
    `${num(m.tuned.accuracy, 2)} (${m.tuned.examples} held-out examples)`;
}

PAGES.tuning = {
  render(d) {
    const jobs = d.jobs.map((j) => {
      const pts = j.loss_history.map(([step, loss]) => ({ t: step, loss }));
      const evals = [["base", j.base], ["tuned", j.tuned]].filter(([, e]) => e && Object.keys(e).length)
        .map(([k, e]) => `${k}: loss ${sig(e.loss)}, accuracy ${num(e.accuracy, 2)} (${e.examples} examples)`);
      return el("div", { class: "job", "data-job": j.job_id, "data-state": j.state },
        el("div", { class: "job-head" }, el("strong", {}, `${j.owner}:${j.name}`), badge(j.state),
          el("span", { class: "muted small" }, `${j.job_id} · ${j.model} · ${j.method} · data set ${j.dataset}`),
          ["queued", "running"].includes(j.state) ? el("button", { class: "danger", "data-action": "cancel-job",
            onclick: async (e) => { e.target.disabled = true; await act("cancel-job", { job_id: j.job_id }); } },
          "Cancel") : null),
        el("div", { class: "small" }, `step ${num(j.step)} of ${num(j.total_steps)} · loss ${sig(j.loss)} · ` +
          `${num(j.steps_per_s, 2)} steps/s` + (j.eta_s !== null ? ` · ${num(j.eta_s, 0)} s left` : "") +
          (j.adapter ? ` · published as ${j.adapter} v${j.version}` : "")),
        el("div", { class: "small muted" }, j.message),
        evals.map((e) => el("div", { class: "small" }, e)),
        el("div", { class: "charts" }, chart("training loss", pts, [{ key: "loss", label: "loss" }], sig)));
    });
    const adapters = d.adapters.map((a) => el("tr", {}, td(`${a.owner}:${a.name}`), tdn(`v${a.version}`), td(a.model),
      td(evaluation(a.metrics)), td(a.loaded ? "loaded" : "–"), td(a.is_default ? "default" : "–"),
      td(when(a.created))));
    const rounds = d.continual.map((c) => el("tr", { "data-agent": c.agent_id, "data-phase": c.phase },
      td(c.agent_id), td(c.spec.enabled ? c.spec.kind : "off"), td(c.phase), tdn(num(c.round)), td(c.candidate || "–"),
      td(c.history.length ? c.history[c.history.length - 1].outcome : "–"), td(c.message)));
    view.replaceChildren(el("h2", {}, `Jobs (${d.jobs.length})`),
      ...(jobs.length ? jobs : [el("p", { class: "muted" }, "no fine-tuning jobs")]),
      el("h2", {}, "Adapters"),
      table(["adapter", { label: "version", num: 1 }, "model", "evaluation", "served", "default", "published"], adapters,
        { id: "adapters-table" }),
      el("h2", {}, "Continual tuning"),
      table(["agent", "kind", "phase", { label: "round", num: 1 }, "candidate", "last round", "state"], rounds,
        { id: "continual-table" }));
  },
};

PAGES.audit = {
  async controls(params) {
    const who = el("input", { type: "text", id: "audit-who", placeholder: "principal", value: params.who || "" });
    const text = el("input", { type: "search", id: "audit-text", placeholder: "method or reason contains…",
      value: params.text || "", size: 30 });
    const denied = el("input", { type: "checkbox", id: "audit-denied", checked: params.denied === "1" });
    return [el("form", { class: "controls", onsubmit: (e) => {
      e.preventDefault(); go("audit", { who: who.value, text: text.value, denied: denied.checked ? "1" : "" });
    } }, who, text, el("label", {}, denied, " denied only"),
    el("button", { type: "submit", class: "primary", id: "audit-apply" }, "Filter"))];
  },
  render(d) {
    view.replaceChildren(table(["when", "principal", "what", "decision", "capability", "reason"],
      d.records.map((r) => el("tr", { "data-decision": r.decision }, td(when(r.ts)), td(r.agent_id),
        td(el("code", {}, r.what)), td(badge(r.decision)), td(r.capability), td(r.reason))), { id: "audit-table" }));
  },
};

if (!OPERATOR) for (const a of document.querySelectorAll("#nav a[data-operator]")) a.remove();
open();
