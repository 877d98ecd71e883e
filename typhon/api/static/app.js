// Typhon Command: the page's script. No build step and no dependencies; it talks only to the
// server that served it, sending the API token as `Authorization: Bearer`. Run events are read
// with fetch() streaming (EventSource cannot send that header).
"use strict";

(() => {
  const TOKEN_KEY = "typhon.token";
  const POLL_MS = 2500;
  const HARDWARE_MS = 15000;
  const RUNS_SHOWN = 50;
  const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
  const STATUSES = new Set(["queued", "running", "waiting", ...FINISHED]);
  const GIB = 1024 ** 3;

  const $ = (id) => document.getElementById(id);
  const state = {
    token: null,
    crews: [],
    tab: "", // "" shows every crew
    rows: new Map(), // run id -> its latest /activity row
    votes: new Map(), // run id -> the vote given from this page
    following: null, // {runId, controller, lastId, done}
    timers: [],
  };

  // -- the API ----------------------------------------------------------------------------------

  class ApiFailure extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function failure(response) {
    let code = `http_${response.status}`;
    let message = response.statusText || `HTTP ${response.status}`;
    try {
      const body = await response.json();
      if (body && body.error) ({code, message} = body.error);
    } catch (_) {
      // not the API's error shape: keep the status line
    }
    return new ApiFailure(response.status, code, message);
  }

  async function api(path, {method = "GET", body, token = state.token, signal} = {}) {
    const headers = {Accept: "application/json"};
    if (token) headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method, headers, signal, cache: "no-store",
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiFailure(0, "unreachable", "the server does not answer");
    }
    if (!response.ok) throw await failure(response);
    return response.json();
  }

  // -- small helpers ----------------------------------------------------------------------------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }

  function show(id, text) {
    const node = $(id);
    node.textContent = text || "";
    node.hidden = !text;
  }

  const pad = (n) => String(n).padStart(2, "0");

  function clock(iso) {
    if (!iso) return "";
    const t = new Date(iso);
    const time = `${pad(t.getHours())}:${pad(t.getMinutes())}:${pad(t.getSeconds())}`;
    const today = new Date().toDateString() === t.toDateString();
    return today ? time : `${t.getFullYear()}-${pad(t.getMonth() + 1)}-${pad(t.getDate())} ${time}`;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "";
    if (seconds < 60) return `${seconds.toFixed(1)} s`;
    const m = Math.floor(seconds / 60);
    if (m < 60) return `${m} min ${pad(Math.round(seconds % 60))} s`;
    return `${Math.floor(m / 60)} h ${pad(m % 60)} min`;
  }

  function runSeconds(run) {
    if (run.duration_s !== undefined && run.duration_s !== null) return run.duration_s;
    if (!run.started_at) return null;
    const end = run.finished_at ? new Date(run.finished_at) : new Date();
    return (end - new Date(run.started_at)) / 1000;
  }

  const gib = (bytes) => (bytes === null || bytes === undefined ? "?" : (bytes / GIB).toFixed(1));
  const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

  function sleep(ms, signal) {
    return new Promise((resolve) => {
      const id = setTimeout(resolve, ms);
      signal?.addEventListener("abort", () => { clearTimeout(id); resolve(); }, {once: true});
    });
  }

  // -- token ------------------------------------------------------------------------------------

  function refusal(err) {
    if (err.status === 401) return `That token was refused: ${err.message}`;
    if (err.status === 403) return `That token may not read the cluster: ${err.message}`;
    return `Could not connect: ${err.message}`;
  }

  function showLogin(message) {
    stopPolling();
    stopFollowing();
    state.token = null;
    $("console").hidden = true;
    $("token-change").hidden = true;
    $("login").hidden = false;
    show("token-error", message);
    $("token-input").focus();
  }

  async function connect(token) {
    await api("/v1/cluster", {token}); // a token is kept only once the server accepts it
    state.token = token;
    localStorage.setItem(TOKEN_KEY, token);
    await loadCrews();
    $("login").hidden = true;
    $("console").hidden = false;
    $("token-change").hidden = false;
    startPolling();
  }

  function dropToken(err) {
    if (!(err instanceof ApiFailure) || err.status !== 401) return false;
    localStorage.removeItem(TOKEN_KEY);
    showLogin(refusal(err));
    return true;
  }

  $("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = $("token-input").value.trim();
    $("token-submit").disabled = true;
    try {
      await connect(token);
      $("token-input").value = "";
    } catch (err) {
      showLogin(refusal(err));
    } finally {
      $("token-submit").disabled = false;
    }
  });

  $("token-change").addEventListener("click", () => {
    localStorage.removeItem(TOKEN_KEY);
    showLogin();
  });

  // -- polling ----------------------------------------------------------------------------------

  function every(ms, fn) {
    const timer = {stopped: false, id: 0};
    const tick = async () => {
      if (timer.stopped) return;
      try {
        await fn();
      } catch (err) {
        if (dropToken(err)) return;
      }
      if (!timer.stopped) timer.id = setTimeout(tick, ms);
    };
    state.timers.push(timer);
    tick();
  }

  function startPolling() {
    stopPolling();
    every(POLL_MS, refreshStatus);
    every(POLL_MS, refreshRuns);
    every(HARDWARE_MS, refreshHardware);
  }

  function stopPolling() {
    for (const timer of state.timers) {
      timer.stopped = true;
      clearTimeout(timer.id);
    }
    state.timers = [];
  }

  // -- status bar -------------------------------------------------------------------------------

  async function refreshHealth() {
    const chip = $("health");
    try {
      const response = await fetch("/healthz", {cache: "no-store"});
      const body = await response.json();
      if (response.ok) {
        chip.dataset.state = "ok";
        chip.textContent = `healthy · ${body.mode} · ${body.store}`;
        chip.title = "GET /healthz: the run store answers";
      } else {
        chip.dataset.state = "down";
        chip.textContent = "unhealthy";
        chip.title = body.error ? body.error.message : `HTTP ${response.status}`;
      }
    } catch (_) {
      chip.dataset.state = "down";
      chip.textContent = "unreachable";
      chip.title = "the server does not answer";
    }
  }

  async function refreshStatus() {
    await refreshHealth();
    const cluster = await api("/v1/cluster");
    renderPools(cluster);
    const depth = $("queue-depth");
    depth.dataset.depth = cluster.queued;
    depth.replaceChildren("queue ", el("b", {text: cluster.queued}), ` · running ${cluster.running}`);
    renderAlerts(cluster.alerts);
    renderBadges(cluster.crews || {});
  }

  function renderPools(cluster) {
    const chips = cluster.pools.map((pool) => {
      let workers;
      if (cluster.mode === "embedded") workers = "embedded";
      else if (pool.workers === null) workers = "workers ?";
      else workers = plural(pool.workers, "worker", "workers");
      const title = pool.worker_names.length
        ? `workers: ${pool.worker_names.join(", ")}`
        : cluster.workers.note || "";
      return el("span", {
        class: "chip pool", title: `${title}\ncap ${pool.cap}, burst ${pool.burst_cap}`.trim(),
        dataset: {pool: pool.name, workers: pool.workers === null ? "" : pool.workers,
                  queued: pool.queued, running: pool.running},
      }, el("span", {class: "name", text: pool.name}),
      `${workers} · q ${pool.queued} · r ${pool.running}`);
    });
    $("pools").replaceChildren(...chips);
  }

  function renderAlerts(alerts) {
    const chip = $("alerts-count");
    chip.dataset.open = alerts.open;
    chip.dataset.state = alerts.open ? "firing" : "quiet";
    chip.textContent = alerts.open ? plural(alerts.open, "open alert", "open alerts") : "no alerts";
    const items = alerts.items.map((a) => el("li", {dataset: {alert: a.id}},
      el("span", {class: "kind", text: a.kind}),
      el("span", {class: "subject", text: a.subject}),
      el("div", {class: "message", text: a.message}),
      el("span", {class: "action", text: `${a.action} · since ${clock(a.opened_at)}`})));
    $("alerts-list").replaceChildren(...items);
    $("alerts-none").hidden = alerts.open > 0;
  }

  function renderBadges(live) {
    for (const tab of document.querySelectorAll("#domain-tabs .tab")) {
      const crew = tab.dataset.crew;
      const count = (c) => (live[c] ? live[c].queued + live[c].running + live[c].waiting : 0);
      const n = crew ? count(crew) : Object.keys(live).reduce((sum, c) => sum + count(c), 0);
      tab.querySelector(".badge").textContent = n ? String(n) : "";
    }
  }

  // -- crews and tabs ---------------------------------------------------------------------------

  async function loadCrews() {
    const {crews} = await api("/v1/crews");
    state.crews = crews;
    const tabs = [{name: "", label: "All crews"}, ...crews.map((c) => ({name: c.name, label: c.name}))];
    $("domain-tabs").replaceChildren(...tabs.map((t) => el("button", {
      class: "tab", type: "button", role: "tab", id: `tab-${t.name || "all"}`,
      "aria-selected": t.name === state.tab ? "true" : "false",
      title: crews.find((c) => c.name === t.name)?.description || "every crew",
      dataset: {crew: t.name}, onclick: () => selectTab(t.name),
    }, t.label, el("span", {class: "badge"}))));
    const select = $("run-crew");
    const chosen = select.value;
    select.replaceChildren(...crews.map((c) => el("option", {
      value: c.name, text: c.available ? c.name : `${c.name} (unavailable)`, disabled: !c.available,
    })));
    select.value = state.tab || chosen || (crews.find((c) => c.available) || {}).name || "";
    describeCrew();
  }

  function describeCrew() {
    const crew = state.crews.find((c) => c.name === $("run-crew").value);
    $("run-crew-about").textContent = crew
      ? [crew.description, `pool ${crew.pool}`].filter(Boolean).join(" · ")
      : "";
  }

  $("run-crew").addEventListener("change", describeCrew);

  function selectTab(crew) {
    state.tab = crew;
    for (const tab of document.querySelectorAll("#domain-tabs .tab")) {
      tab.setAttribute("aria-selected", tab.dataset.crew === crew ? "true" : "false");
    }
    $("overview-scope").textContent = crew ? `crew ${crew}` : "all crews";
    if (crew && state.crews.some((c) => c.name === crew && c.available)) {
      $("run-crew").value = crew;
      describeCrew();
    }
    $("runs-body").replaceChildren();
    state.rows.clear();
    refreshRuns().catch(dropToken);
  }

  // -- command overview -------------------------------------------------------------------------

  async function refreshRuns() {
    const tab = state.tab;
    const query = new URLSearchParams({limit: String(RUNS_SHOWN)});
    if (tab) query.set("crew", tab);
    let rows;
    try {
      ({activity: rows} = await api(`/activity?${query}`));
    } catch (err) {
      if (!dropToken(err)) show("overview-error", `Runs could not be read: ${err.message}`);
      throw err;
    }
    if (tab !== state.tab) return; // the tab changed while asking
    show("overview-error", "");
    renderRuns(rows);
  }

  function renderRuns(rows) {
    const body = $("runs-body");
    const existing = new Map([...body.children].map((tr) => [tr.dataset.runId, tr]));
    state.rows = new Map(rows.map((r) => [r.run_id, r]));
    for (const run of rows) {
      const tr = existing.get(run.run_id) || runRow(run.run_id);
      existing.delete(run.run_id);
      fillRow(tr, run);
      body.append(tr); // appending moves a row into its place, newest first
    }
    for (const tr of existing.values()) tr.remove();
    $("runs-empty").hidden = rows.length > 0;
  }

  function runRow(runId) {
    const cells = ["status", "crew", "input", "model", "duration", "created", "feedback"];
    const tr = el("tr", {dataset: {runId}, onclick: () => follow(runId)},
      ...cells.map((name) => el("td", {class: name})));
    return tr;
  }

  function fillRow(tr, run) {
    const cell = (name) => tr.querySelector(`td.${name}`);
    const status = cell("status");
    if (status.dataset.status !== run.status) {
      status.dataset.status = run.status;
      status.replaceChildren(el("span", {class: "state", dataset: {status: run.status}, text: run.status}));
    }
    tr.dataset.status = run.status;
    cell("crew").textContent = run.crew;
    cell("input").textContent = run.input;
    cell("input").title = run.input;
    cell("model").textContent = run.model || "";
    cell("duration").textContent = duration(runSeconds(run));
    cell("created").textContent = clock(run.created_at);
    const vote = state.votes.get(run.run_id) || run.human_vote || null;
    const feedback = cell("feedback");
    if (!FINISHED.has(run.status)) feedback.replaceChildren();
    else if (!feedback.firstChild || feedback.firstChild.dataset.vote !== (vote || "")) {
      feedback.replaceChildren(votes(run.run_id, vote));
    }
    tr.classList.toggle("selected", state.following?.runId === run.run_id);
  }

  // -- feedback ---------------------------------------------------------------------------------

  const THUMB = "M2 10h4v11H2zM8 10l4-7c1.6 0 2.6 1.1 2.2 3L13.4 10H20c1.1 0 2 .9 1.8 2l-1.3 7.5"
    + "c-.2.9-1 1.5-1.9 1.5H8z";

  function thumb(down) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("aria-hidden", "true");
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", THUMB);
    if (down) path.setAttribute("transform", "rotate(180 12 12)");
    svg.append(path);
    return svg;
  }

  function votes(runId, current) {
    const button = (vote) => el("button", {
      class: `vote ${vote}`, type: "button", "aria-pressed": current === vote ? "true" : "false",
      "aria-label": `Thumbs ${vote}`, title: `Thumbs ${vote}`, dataset: {vote},
      onclick: (event) => { event.stopPropagation(); sendVote(runId, vote); },
    }, thumb(vote === "down"));
    return el("span", {class: "votes", dataset: {votesFor: runId, vote: current || ""}},
      button("up"), button("down"));
  }

  function markVotes(runId, vote) {
    for (const group of document.querySelectorAll(`[data-votes-for="${runId}"]`)) {
      group.dataset.vote = vote;
      for (const b of group.querySelectorAll(".vote")) {
        b.setAttribute("aria-pressed", b.dataset.vote === vote ? "true" : "false");
      }
    }
  }

  async function sendVote(runId, vote) {
    const here = state.following?.runId === runId;
    try {
      await api(`/v1/runs/${runId}/feedback`, {method: "POST", body: {vote}});
    } catch (err) {
      if (dropToken(err)) return;
      const message = `The vote was not recorded: ${err.message}`;
      if (here) show("stream-feedback-note", message);
      else show("feedback-error", message);
      return;
    }
    show("feedback-error", "");
    state.votes.set(runId, vote);
    markVotes(runId, vote);
    if (here) show("stream-feedback-note", `Recorded: thumbs ${vote}. Thank you.`);
    refreshRuns().catch(dropToken);
  }

  // -- starting a run ---------------------------------------------------------------------------

  function parseOptions(raw) {
    if (!raw.trim()) return {};
    let options;
    try {
      options = JSON.parse(raw);
    } catch (_) {
      options = null;
    }
    if (options === null || typeof options !== "object" || Array.isArray(options)) {
      throw new Error('Options must be a JSON object, such as {"no_memory": true}.');
    }
    return options;
  }

  $("run-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    show("run-error", "");
    const crew = $("run-crew").value;
    const input = $("run-input").value;
    let options;
    try {
      options = parseOptions($("run-options").value);
    } catch (err) {
      show("run-error", err.message);
      return;
    }
    if (!input.trim()) {
      show("run-error", "Give the crew an input.");
      return;
    }
    $("run-submit").disabled = true;
    try {
      const accepted = await api("/v1/runs", {method: "POST", body: {crew, input, options}});
      follow(accepted.run_id, crew);
      refreshRuns().catch(dropToken);
    } catch (err) {
      if (!dropToken(err)) show("run-error", `The run was not started: ${err.message}`);
    } finally {
      $("run-submit").disabled = false;
    }
  });

  // -- following a run's events -----------------------------------------------------------------

  function stopFollowing() {
    if (state.following) state.following.controller.abort();
    state.following = null;
  }

  function setStatus(status) {
    const badge = $("stream-status");
    badge.textContent = status;
    badge.dataset.status = status;
    $("stream-cancel").hidden = FINISHED.has(status);
  }

  async function follow(runId, crew) {
    stopFollowing();
    const f = {runId, controller: new AbortController(), lastId: null, done: false};
    state.following = f;
    $("stream").hidden = false;
    $("stream").dataset.runId = runId;
    $("stream-run").textContent = runId;
    $("stream-crew").textContent = crew || state.rows.get(runId)?.crew || "";
    setStatus("…");
    $("stream-events").replaceChildren();
    for (const id of ["stream-output", "stream-error", "stream-feedback-note"]) show(id, "");
    show("stream-meta", "");
    $("stream-feedback").hidden = true;
    for (const tr of $("runs-body").children) tr.classList.toggle("selected", tr.dataset.runId === runId);
    let failures = 0;
    while (!f.done && !f.controller.signal.aborted) {
      try {
        await readEvents(f);
      } catch (err) {
        if (f.controller.signal.aborted || dropToken(err)) return;
        if (err instanceof ApiFailure && err.status >= 400 && err.status < 500 && err.status !== 429) {
          show("stream-error", `The run's events cannot be read: ${err.message}`);
          return;
        }
        failures += 1;
        if (failures > 5) {
          show("stream-error", `Lost the run's event stream: ${err.message}`);
          return;
        }
      }
      if (!f.done) await sleep(1000 * Math.max(1, failures), f.controller.signal);
    }
  }

  async function readEvents(f) {
    const headers = {Authorization: `Bearer ${state.token}`, Accept: "text/event-stream"};
    if (f.lastId !== null) headers["Last-Event-ID"] = String(f.lastId);
    const response = await fetch(`/v1/runs/${f.runId}/events`, {
      headers, signal: f.controller.signal, cache: "no-store",
    });
    if (!response.ok) throw await failure(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let blank;
      while ((blank = /\r?\n\r?\n/.exec(buffer)) !== null) {
        const block = buffer.slice(0, blank.index);
        buffer = buffer.slice(blank.index + blank[0].length);
        onMessage(f, block);
      }
    }
  }

  function onMessage(f, block) {
    let event = "message";
    let id = null;
    const data = [];
    for (const line of block.split(/\r?\n/)) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const key = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (key === "event") event = value;
      else if (key === "data") data.push(value);
      else if (key === "id") id = value;
    }
    if (!data.length || state.following !== f) return;
    const payload = JSON.parse(data.join("\n"));
    if (event === "end") {
      f.done = true;
      showResult(payload);
      return;
    }
    if (id !== null) f.lastId = Number(id);
    addEvent(payload);
  }

  function detail(data) {
    const parts = [];
    for (const [key, value] of Object.entries(data || {})) {
      if (key === "name") continue;
      let text = typeof value === "string" ? value : JSON.stringify(value);
      if (text.length > 400) text = `${text.slice(0, 400)}…`;
      parts.push(`${key}=${text}`);
    }
    return parts.join(" ");
  }

  function addEvent(event) {
    const list = $("stream-events");
    const name = event.kind === "step" && event.data ? event.data.name : "";
    const dataset = {kind: event.kind, seq: event.seq};
    if (name) dataset.step = name;
    list.append(el("li", {dataset},
      el("span", {class: "at", text: clock(event.at)}),
      el("span", {class: "kind", dataset: {kind: event.kind}, text: event.kind}),
      name ? el("b", {class: "step", text: `${name} `}) : null,
      detail(event.data)));
    list.scrollTop = list.scrollHeight;
    if (STATUSES.has(event.kind)) setStatus(event.kind);
  }

  function showResult(run) {
    setStatus(run.status);
    $("stream-crew").textContent = run.crew;
    show("stream-output", run.output || "");
    show("stream-error", run.error || "");
    const meta = [
      run.model && `model ${run.model}`,
      run.backend && `on ${run.backend}`,
      duration(runSeconds(run)) && `took ${duration(runSeconds(run))}`,
      run.usage && run.usage.total_tokens ? `${run.usage.total_tokens} tokens` : null,
    ].filter(Boolean).join(" · ");
    show("stream-meta", meta);
    if (FINISHED.has(run.status)) {
      const vote = state.votes.get(run.run_id) || state.rows.get(run.run_id)?.human_vote || null;
      $("stream-votes").replaceChildren(votes(run.run_id, vote));
      $("stream-feedback").hidden = false;
    }
    refreshRuns().catch(dropToken);
  }

  $("stream-cancel").addEventListener("click", async () => {
    const f = state.following;
    if (!f) return;
    try {
      await api(`/v1/runs/${f.runId}/cancel`, {method: "POST"});
    } catch (err) {
      if (!dropToken(err)) show("stream-error", `Not cancelled: ${err.message}`);
    }
  });

  // -- hardware ---------------------------------------------------------------------------------

  function level(percent) {
    if (percent === null || percent === undefined) return "";
    return percent >= 95 ? "bad" : percent >= 85 ? "warn" : "ok";
  }

  function bar(percent, levelName) {
    const fill = el("i");
    fill.style.width = `${percent.toFixed(1)}%`; // through the CSSOM: the CSP allows no inline style
    return el("div", {class: "bar", dataset: {level: levelName}}, fill);
  }

  function meter(label, value, percent, attrs = {}) {
    const shown = percent === null || percent === undefined ? 0 : Math.min(100, Math.max(0, percent));
    return el("div", {class: "row", ...attrs},
      el("div", {class: "label"}, el("span", {text: label}), el("b", {text: value})),
      bar(shown, level(percent)));
  }

  function gpuRow(gpu) {
    const total = gpu.vram_total_bytes;
    const used = gpu.vram_used_bytes;
    const percent = total ? (100 * used) / total : null;
    const temp = gpu.temperature_c;
    const extra = el("div", {class: "label"},
      el("span", {class: "temp", dataset: {level: temp >= 80 ? "bad" : ""},
                  text: temp === null || temp === undefined ? "temperature ?" : `${temp} °C`}),
      el("span", {text: gpu.utilization_percent === null || gpu.utilization_percent === undefined
        ? "" : `util ${gpu.utilization_percent}%`}));
    const row = meter(`GPU ${gpu.index} · ${gpu.name}`,
      `${gib(used)} / ${gib(total)} GiB VRAM`, percent,
      {dataset: {gpu: gpu.index, vramUsedBytes: used ?? "", temperature: temp ?? ""}});
    row.append(extra);
    return row;
  }

  function hostCard(summary, where) {
    const cpu = summary.cpu || {};
    const memory = summary.memory || {};
    const used = memory.total_bytes - memory.available_bytes;
    const card = el("div", {class: "host", dataset: {host: summary.host}},
      el("h3", {}, summary.host, el("span", {class: "muted", text: where})),
      el("div", {class: "row cpu"}, el("div", {class: "label"}, el("span", {text: "CPU"}),
        el("b", {text: `${cpu.model || "?"} · ${cpu.cores ?? "?"} cores / ${cpu.threads ?? "?"} threads`}))),
      meter("Memory", `${gib(used)} / ${gib(memory.total_bytes)} GiB`,
        memory.total_bytes ? (100 * used) / memory.total_bytes : null, {class: "row memory"}));
    const gpus = summary.gpus || [];
    if (gpus.length) for (const gpu of gpus) card.append(gpuRow(gpu));
    else {
      const why = summary.gpu_note || "none found";
      card.append(el("p", {class: "muted small no-gpus", text: `No GPUs: ${why}`}));
    }
    for (const disk of summary.disks || []) {
      const usage = `${gib(disk.used_bytes)} / ${gib(disk.total_bytes)} GiB · ${disk.percent ?? "?"}%`;
      card.append(meter(`Disk ${disk.mount}`, usage, disk.percent,
        {class: "row disk", dataset: {mount: disk.mount}}));
    }
    return card;
  }

  function nodeCard(node) {
    if (node.reachable && node.summary) return hostCard(node.summary, `node ${node.name}`);
    const configured = (node.gpus_configured || []).map((g) => g.name || g.model || JSON.stringify(g));
    return el("div", {class: "host", dataset: {host: node.name, reachable: "false"}},
      el("h3", {}, node.name, el("span", {class: "muted", text: "node"})),
      el("p", {class: "unreachable", text: `unreachable: ${node.error || "no URL configured"}`}),
      configured.length
        ? el("p", {class: "muted small", text: `GPUs configured: ${configured.join(", ")}`})
        : null);
  }

  async function refreshHardware() {
    let summary;
    try {
      summary = await api("/hardware/summary");
    } catch (err) {
      if (!dropToken(err)) show("hardware-error", `The hardware summary could not be read: ${err.message}`);
      throw err;
    }
    show("hardware-error", "");
    $("hardware-hosts").replaceChildren(hostCard(summary.local, "this server"),
      ...(summary.nodes || []).map(nodeCard));
  }

  // -- start ------------------------------------------------------------------------------------

  async function start() {
    refreshHealth();
    const saved = localStorage.getItem(TOKEN_KEY);
    if (!saved) {
      showLogin();
      return;
    }
    try {
      await connect(saved);
    } catch (err) {
      if (err.status === 401) localStorage.removeItem(TOKEN_KEY);
      showLogin(refusal(err));
    }
  }

  start();
})();
