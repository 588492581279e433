// The gve portal: one page over the site's own HTTP API (/v1), the same calls the
// CLI makes. The token lives in sessionStorage only (gone with the tab), is sent
// in the Authorization header only, and never appears in a URL.
import { html, render, useState, useEffect, useCallback, useRef } from "/portal/vendor/htm-preact.js";

const TOKEN_KEY = "gve-token";
const REFRESH_MS = 2000;
/// Rows per page of each listing (the API's `limit`).
const PAGE = { vms: 25, jobs: 20, users: 50, agents: 50 };

/// Calls the API; resolves to the parsed JSON, rejects with the API's message.
async function api(token, method, path, body) {
  return (await call(token, method, path, body)).data;
}

/// One page of a listing: its items and the path of the next page, if any.
async function apiPage(token, path) {
  const { data, resp } = await call(token, "GET", path);
  return { items: data || [], next: nextLink(resp.headers.get("Link")) };
}

/// The target of a `Link` header's `rel="next"` (RFC 8288), if it is a path on
/// this site's API: the page never follows a link elsewhere.
function nextLink(header) {
  for (const part of (header || "").split(",")) {
    const m = part.trim().match(/^<([^>]*)>\s*;(.*)$/);
    const rel = m && m[2].match(/(?:^|;)\s*rel\s*=\s*(?:"([^"]*)"|([^\s;]+))/i);
    if (!rel || !(rel[1] ?? rel[2]).toLowerCase().split(/\s+/).includes("next")) continue;
    return m[1].startsWith("/v1/") && !m[1].startsWith("//") ? m[1] : null;
  }
  return null;
}

/// Calls the API; resolves to the parsed JSON and the response, rejects with the
/// API's message (and its status).
async function call(token, method, path, body) {
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
    credentials: "omit",
  });
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!resp.ok) {
    const e = new Error(data?.error?.message || `${method} ${path}: HTTP ${resp.status}`);
    e.status = resp.status;
    throw e;
  }
  return { data, resp };
}

/// One listing, a page at a time: the page shown is read again every REFRESH_MS and
/// whenever `tick` changes; `next` walks on along the API's cursor, `back` returns
/// to the page before (the pages walked are kept, so back is where one came from).
function usePages(token, first, tick, onFail) {
  const [trail, setTrail] = useState([first]);
  const [page, setPage] = useState({ path: null, items: [], next: null });
  const path = trail[trail.length - 1];
  useEffect(() => { setTrail([first]); }, [first]);
  useEffect(() => {
    // One read at a time: the next starts REFRESH_MS after the last answered, so a
    // slow site is not sent a pile of them and an older answer never lands last.
    let live = true, timer = null;
    const load = () => apiPage(token, path)
      .then((p) => { if (live) setPage({ path, ...p }); })
      .catch((e) => { if (live && onFail) onFail(e); })
      .finally(() => { if (live) timer = setTimeout(load, REFRESH_MS); });
    load();
    return () => { live = false; clearTimeout(timer); };
  }, [token, path, tick]);
  const shown = page.path === path;
  return {
    loaded: shown,
    items: shown ? page.items : [],
    number: trail.length,
    next: shown && page.next ? () => setTrail((t) => [...t, page.next]) : null,
    back: trail.length > 1 ? () => setTrail((t) => t.slice(0, -1)) : null,
  };
}

/// Previous / next buttons under a paged table (nothing when all fits on one page).
function Pager({ id, pages }) {
  if (!pages.next && !pages.back) return "";
  return html`<div class="pager" id=${id}>
    <button class="page-back" disabled=${!pages.back} onClick=${pages.back}>← Previous</button>
    <span class="muted page-number">page ${pages.number}</span>
    <button class="page-next" disabled=${!pages.next} onClick=${pages.next}>Next →</button></div>`;
}

/// Follows a job's server-sent events through fetch (EventSource cannot send the
/// Authorization header); calls onEvent for each, returns when the stream ends.
async function followJob(token, id, onEvent, signal) {
  const resp = await fetch(`/v1/jobs/${encodeURIComponent(id)}/events`, {
    headers: { Authorization: `Bearer ${token}`, Accept: "text/event-stream" },
    cache: "no-store",
    credentials: "omit",
    signal,
  });
  if (!resp.ok || !resp.body) return;
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const frame = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      try {
        const ev = JSON.parse(data);
        onEvent(ev);
        if (["succeeded", "failed", "cancelled"].includes(ev.state)) return;
      } catch (_) { /* a comment or keep-alive */ }
    }
  }
}

const terminal = (s) => ["succeeded", "failed", "cancelled"].includes(s);

function span(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d${Math.floor((s % 86400) / 3600)}h`;
}

function leaseLeft(vm) {
  if (!vm.lease) return "-";
  if (vm.lease.expired) return "expired";
  return span(vm.lease["until-ms"] - Date.now());
}

function decode64(s) {
  try {
    const bytes = Uint8Array.from(atob(s || ""), (c) => c.charCodeAt(0));
    return new TextDecoder().decode(bytes);
  } catch (_) { return "(not text)"; }
}

function Bar({ label, used, total, unit }) {
  const pct = total > 0 ? Math.min(100, (100 * used) / total) : 100;
  return html`<div>${label}</div>
    <div class="bar" role="meter" aria-label=${label} aria-valuenow=${used} aria-valuemin="0" aria-valuemax=${total}>
      <span style=${{ width: `${pct}%` }}></span></div>
    <div class="muted">${used} of ${total}${unit ? " " + unit : ""}</div>`;
}

function SignIn({ onToken }) {
  const [token, setToken] = useState("");
  const [error, setError] = useState("");
  const submit = async (e) => {
    e.preventDefault();
    setError("");
    try {
      const me = await api(token.trim(), "GET", "/v1/me");
      sessionStorage.setItem(TOKEN_KEY, token.trim());
      onToken(token.trim(), me);
    } catch (err) {
      setError(err.status === 401 ? "That token is not valid at this site." : err.message);
    }
  };
  return html`<section class="signin">
    <h2>Sign in to gve</h2>
    <p class="muted">Paste your bearer token (from your site admin, or <code>gve user add</code>). It stays in this tab only.</p>
    <form class="inline" onSubmit=${submit}>
      <label>Token<input id="token" type="password" autocomplete="off" value=${token}
        onInput=${(e) => setToken(e.target.value)} size="40" /></label>
      <button class="primary" id="sign-in" type="submit">Sign in</button>
    </form>
    ${error && html`<p class="error" id="sign-in-error">${error}</p>`}
  </section>`;
}

function Quota({ me }) {
  const q = me.quota, u = me.usage;
  return html`<section id="quota"><h2>Quota of ${me.name}${me.role === "admin" ? " (admin)" : ""}</h2>
    <div class="quota">
      <${Bar} label="VMs" used=${u.vms} total=${q.vms} />
      <${Bar} label="vCPUs" used=${u["logical-cpus"]} total=${q["logical-cpus"]} />
      <${Bar} label="Memory" used=${u["main-memory-mib"]} total=${q["main-memory-mib"]} unit="MiB" />
    </div></section>`;
}

function RequestForm({ token, templates, onJob }) {
  const [template, setTemplate] = useState("");
  const [cpus, setCpus] = useState(1);
  const [mem, setMem] = useState(512);
  const [lease, setLease] = useState("");
  const [error, setError] = useState("");
  const submit = async (e) => {
    e.preventDefault();
    setError("");
    const body = { "logical-cpus": Number(cpus), "main-memory-mib": Number(mem) };
    if (template) body.template = template;
    if (lease) body["lease-seconds"] = Number(lease);
    try { onJob(await api(token, "POST", "/v1/vms", body)); } catch (err) { setError(err.message); }
  };
  return html`<section id="request"><h2>Request a VM</h2>
    <form class="inline" onSubmit=${submit}>
      <label>Template<select id="request-template" value=${template} onChange=${(e) => setTemplate(e.target.value)}>
        <option value="">any</option>
        ${templates.map((t) => html`<option value=${t}>${t}</option>`)}
      </select></label>
      <label>vCPUs<input id="request-cpus" type="number" min="1" value=${cpus} onInput=${(e) => setCpus(e.target.value)} size="4" /></label>
      <label>Memory (MiB)<input id="request-memory" type="number" min="16" value=${mem} onInput=${(e) => setMem(e.target.value)} size="7" /></label>
      <label>Lease (s)<input id="request-lease" type="number" min="1" placeholder="site default" value=${lease} onInput=${(e) => setLease(e.target.value)} size="9" /></label>
      <button class="primary" id="request-submit" type="submit">Request</button>
    </form>
    ${error && html`<p class="error">${error}</p>`}
  </section>`;
}

function Vms({ token, tick, onJob, onError, onFail }) {
  const pages = usePages(token, `/v1/vms?limit=${PAGE.vms}`, tick, onFail);
  const vms = pages.items;
  const act = async (vm, action, body = {}) => {
    try { onJob(await api(token, "POST", `/v1/vms/${encodeURIComponent(vm.id)}/${action}`, body)); } catch (e) { onError(e.message); }
  };
  const renew = async (vm) => {
    try { await api(token, "POST", `/v1/vms/${encodeURIComponent(vm.id)}/renew`, { seconds: 3600 }); } catch (e) { onError(e.message); }
  };
  const [execVm, setExecVm] = useState(null);
  const [argv, setArgv] = useState("uname -a");
  const exec = async (e) => {
    e.preventDefault();
    if (!execVm || !argv.trim()) return;
    await act(execVm, "exec", { argv: argv.trim().split(/\s+/) });
  };
  return html`<section id="vms"><h2>Your VMs</h2>
    ${vms.length === 0 ? html`<p class="muted">${!pages.loaded ? "Loading…" : pages.back ? "No VMs on this page." : "No VMs yet."}</p>` : html`<table>
      <thead><tr><th>Name</th><th>State</th><th>Agent</th><th>vCPUs</th><th>MiB</th><th>Lease left</th><th>Actions</th></tr></thead>
      <tbody>${vms.map((vm) => html`<tr data-vm=${vm.id}>
        <td>${vm.name}<div class="muted">${vm.id}</div></td>
        <td class=${"state-" + vm.state}>${vm.state}${vm.state === "running" && !vm.ready ? " (booting)" : ""}</td>
        <td>${vm.agent}</td><td>${vm["logical-cpus"]}</td><td>${vm["main-memory-mib"]}</td><td>${leaseLeft(vm)}</td>
        <td class="actions">
          <button data-action="start" onClick=${() => act(vm, "start")}>Start</button>
          <button data-action="shutdown" onClick=${() => act(vm, "shutdown")}>Stop</button>
          <button data-action="suspend" onClick=${() => act(vm, "suspend")}>Suspend</button>
          <button data-action="resume" onClick=${() => act(vm, "resume")}>Resume</button>
          <button data-action="renew" onClick=${() => renew(vm)}>Renew 1h</button>
          <button data-action="exec" onClick=${() => setExecVm(vm)}>Run…</button>
          <button data-action="release" onClick=${() => act(vm, "release")}>Release</button>
        </td></tr>`)}</tbody></table>`}
    <${Pager} id="vms-pager" pages=${pages} />
    ${execVm && html`<form class="inline" id="exec-form" onSubmit=${exec}>
      <label>Command in ${execVm.name} (split on spaces)<input id="exec-argv" value=${argv}
        onInput=${(e) => setArgv(e.target.value)} size="50" /></label>
      <button class="primary" id="exec-run" type="submit">Run</button>
      <button type="button" onClick=${() => setExecVm(null)}>Close</button></form>`}
  </section>`;
}

// Follows one job to its end; `onEnd` runs once it has ended (the lists then show its outcome).
function JobView({ token, job, onEnd }) {
  const [events, setEvents] = useState([]);
  const [final, setFinal] = useState(terminal(job.state) ? job : null);
  useEffect(() => {
    if (final) return undefined;
    const ctl = new AbortController();
    followJob(token, job.id, (ev) => setEvents((l) => [...l, ev]), ctl.signal)
      .catch(() => {})
      .then(() => api(token, "GET", `/v1/jobs/${encodeURIComponent(job.id)}`))
      .then((j) => { setFinal(j); if (onEnd) onEnd(); })
      .catch(() => {});
    return () => ctl.abort();
  }, [job.id]);
  const exec = final?.result?.exec;
  return html`<section id="followed"><h2>Job ${job.id} (${job.kind})</h2>
    <ol>${events.map((e) => html`<li class=${"state-" + e.state}>${e.message || e.state}</li>`)}</ol>
    ${final ? html`<p id="job-state" class=${"state-" + final.state}>${final.state}${final.error ? ": " + final.error.message : ""}</p>`
            : html`<p class="muted">running…</p>`}
    ${exec && html`<div id="exec-output"><div class="muted">exit ${exec["exit-code"] ?? "-"}</div>
      <pre>${decode64(exec["stdout-b64"])}</pre>${exec["stderr-b64"] ? html`<pre>${decode64(exec["stderr-b64"])}</pre>` : ""}</div>`}
  </section>`;
}

function Jobs({ token, tick, onFollow, onFail }) {
  const pages = usePages(token, `/v1/jobs?limit=${PAGE.jobs}`, tick, onFail);
  const jobs = pages.items;
  return html`<section id="jobs"><h2>Jobs <span class="muted">(newest first)</span></h2>
    ${jobs.length === 0 ? html`<p class="muted">${!pages.loaded ? "Loading…" : pages.back ? "No jobs on this page." : "No jobs yet."}</p>` : html`<table>
      <thead><tr><th>Job</th><th>Kind</th><th>State</th><th>VM</th><th>Age</th><th></th></tr></thead>
      <tbody>${jobs.map((j) => html`<tr data-job=${j.id}>
        <td>${j.id}</td><td>${j.kind}</td><td class=${"state-" + j.state}>${j.state}</td>
        <td>${j.vm || "-"}</td><td>${span(Date.now() - j["created-ms"])}</td>
        <td><button onClick=${() => onFollow(j)}>Follow</button></td></tr>`)}</tbody></table>`}
    <${Pager} id="jobs-pager" pages=${pages} />
  </section>`;
}

function Admin({ token, tick, onFail }) {
  const agents = usePages(token, `/v1/agents?limit=${PAGE.agents}`, tick, onFail);
  const users = usePages(token, `/v1/users?limit=${PAGE.users}`, tick, onFail);
  const vms = usePages(token, `/v1/vms?all=true&limit=${PAGE.vms}`, tick, onFail);
  return html`<section id="agents"><h2>Agents</h2><table>
      <thead><tr><th>Agent</th><th>Status</th><th>Host</th><th>Memory free / total (MiB)</th><th>vCPUs</th><th>Templates</th></tr></thead>
      <tbody>${agents.items.map((a) => html`<tr data-agent=${a.id}><td>${a.id}<div class="muted">${a.url}</div></td>
        <td class=${"state-" + a.status}>${a.status}${a.error ? html`<div class="muted">${a.error}</div>` : ""}</td>
        <td>${a.host ? `${a.host.hostname} (${a.host["hypervisor-kind"]} ${a.host["hypervisor-version"]})` : "-"}</td>
        <td>${a.host ? `${a.host["free-memory-mib"]} / ${a.host["main-memory-mib"]}` : "-"}</td>
        <td>${a.host ? a.host["logical-cpus"] : "-"}</td><td>${(a.templates || []).join(", ")}</td></tr>`)}</tbody></table>
      <${Pager} id="agents-pager" pages=${agents} /></section>
    <section id="users"><h2>Users</h2><table>
      <thead><tr><th>User</th><th>Role</th><th>VMs</th><th>vCPUs</th><th>MiB</th></tr></thead>
      <tbody>${users.items.map((u) => html`<tr data-user=${u.name}><td>${u.name}</td><td>${u.role}</td>
        <td>${u.usage.vms} / ${u.quota.vms}</td><td>${u.usage["logical-cpus"]} / ${u.quota["logical-cpus"]}</td>
        <td>${u.usage["main-memory-mib"]} / ${u.quota["main-memory-mib"]}</td></tr>`)}</tbody></table>
      <${Pager} id="users-pager" pages=${users} /></section>
    <section id="all-vms"><h2>Every VM</h2>${vms.items.length === 0 ? html`<p class="muted">${vms.loaded ? "No VMs." : "Loading…"}</p>` : html`<table>
      <thead><tr><th>Name</th><th>Owner</th><th>State</th><th>Agent</th><th>vCPUs</th><th>MiB</th><th>Lease left</th></tr></thead>
      <tbody>${vms.items.map((vm) => html`<tr data-any-vm=${vm.id}><td>${vm.name}<div class="muted">${vm.id}</div></td>
        <td>${vm.owner || html`<span class="muted">free</span>`}</td><td class=${"state-" + vm.state}>${vm.state}</td>
        <td>${vm.agent}</td><td>${vm["logical-cpus"]}</td><td>${vm["main-memory-mib"]}</td><td>${leaseLeft(vm)}</td></tr>`)}</tbody></table>`}
      <${Pager} id="all-vms-pager" pages=${vms} /></section>`;
}

function App() {
  const [token, setToken] = useState(() => sessionStorage.getItem(TOKEN_KEY) || "");
  const [me, setMe] = useState(null);
  const [tab, setTab] = useState("vms");
  const [templates, setTemplates] = useState([]);
  const [followed, setFollowed] = useState(null);
  const [error, setError] = useState("");
  // Bumped when something changed here (a job submitted or ended): the lists read
  // their pages again at once rather than at their next poll.
  const [tick, setTick] = useState(0);
  // Signing out forgets everything of the last person: the next starts on their VMs.
  const signOut = useCallback(() => {
    sessionStorage.removeItem(TOKEN_KEY);
    setToken(""); setMe(null); setTab("vms"); setFollowed(null); setError(""); setTemplates([]);
  }, []);
  const fail = useCallback((e) => { if (e.status === 401) signOut(); else setError(e.message); }, [signOut]);
  const busy = useRef(false);
  const refresh = useCallback(async () => {
    if (!token || busy.current) return;
    busy.current = true;
    try {
      const m = await api(token, "GET", "/v1/me");
      setMe(m);
      if (m.role !== "monitor") setTemplates(await api(token, "GET", "/v1/templates"));
    } catch (e) { fail(e); } finally { busy.current = false; }
  }, [token]);
  const changed = useCallback(() => { setTick((t) => t + 1); refresh(); }, [refresh]);
  const timer = useRef(null);
  useEffect(() => {
    refresh();
    timer.current = setInterval(refresh, REFRESH_MS);
    return () => clearInterval(timer.current);
  }, [refresh]);
  if (!token) return html`<${SignIn} onToken=${(t, m) => { setToken(t); setMe(m); }} />`;
  if (!me) return html`<p class="muted">Signing in…</p>`;
  const header = (tabs) => html`<header><h1>gve</h1><nav>${tabs.map(([id, name]) => html`<button id=${"tab-" + id}
      class=${tab === id ? "active" : ""} onClick=${() => setTab(id)}>${name}</button>`)}</nav>
    <span class="muted" id="signed-in-as">${me.name}</span><button id="sign-out" onClick=${signOut}>Sign out</button></header>`;
  if (me.role === "monitor") {
    return html`${header([])}<main><section id="monitor"><h2>A monitor's token</h2>
      <p>This token reads the site's metrics (<code>/metrics</code>) and GLUE 2 document
      (<code>/v1/glue2</code>) only: it holds no VMs and runs no jobs.</p></section></main>`;
  }
  const onJob = (job) => { setError(""); setFollowed(job); changed(); };
  const tabs = [["vms", "VMs"], ["jobs", "Jobs"], ...(me.role === "admin" ? [["admin", "Agents, users & VMs"]] : [])];
  return html`${header(tabs)}
    <main>
      ${error && html`<p class="error" id="error">${error}</p>`}
      ${tab === "vms" && html`<${Quota} me=${me} /><${RequestForm} token=${token} templates=${templates} onJob=${onJob} />
        <${Vms} token=${token} tick=${tick} onJob=${onJob} onError=${setError} onFail=${fail} />`}
      ${tab === "jobs" && html`<${Jobs} token=${token} tick=${tick} onFollow=${setFollowed} onFail=${fail} />`}
      ${tab === "admin" && html`<${Admin} token=${token} tick=${tick} onFail=${fail} />`}
      ${followed && html`<${JobView} key=${followed.id} token=${token} job=${followed} onEnd=${changed} />`}
    </main>`;
}

// Preact diffs against what the container holds: the loading line goes first.
const root = document.getElementById("app");
root.replaceChildren();
render(html`<${App} />`, root);
