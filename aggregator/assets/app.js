// Millrace fleet dashboard: reads /api/v1/* and follows /api/v1/events (SSE).
// No build step; uPlot (assets/uPlot.iife.min.js) draws the chart.
"use strict";

(() => {
  // Opened as /?access_token=…: the token is traded for an HttpOnly session
  // cookie and taken out of the address bar; every later request (the event
  // stream included) carries only the cookie.
  const params = new URLSearchParams(location.search);
  const token = params.get("access_token");
  const session = token
    ? fetch("api/v1/session", { method: "POST", headers: { Authorization: "Bearer " + token }, credentials: "same-origin" })
        .then((r) => { if (!r.ok) throw new Error("session: HTTP " + r.status); })
    : Promise.resolve();
  if (token) {
    params.delete("access_token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  }
  const $ = (id) => document.getElementById(id);
  const RANGES = { "5m": 5 * 60e3, "15m": 15 * 60e3, "1h": 3600e3, "6h": 6 * 3600e3 };
  const MAX_ALERT_ITEMS = 200;
  const PAGE = 50;

  const state = {
    chart: null, // { agent, series: "device/sensor" }
    range: "15m",
    windows: [],
    marks: [],
    unit: "",
    plot: null,
    stream: null,
    streamBroken: false,
    alertIds: new Set(),
    alertCount: 0,
    seriesOffset: 0,
    fleetTicks: 0,
    agents: [],
  };

  async function getJson(path) {
    await session;
    const response = await fetch(path, { credentials: "same-origin" });
    if (!response.ok) throw new Error(path + ": HTTP " + response.status);
    return response.json();
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else if (k === "title") node.title = v;
      else if (k === "href") node.href = v;
      else node[k] = v;
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : String(c));
    }
    return node;
  }

  function fmtNum(v) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e6 || a < 1e-3)) return v.toExponential(3);
    return v.toFixed(a >= 100 ? 1 : a >= 1 ? 2 : 4);
  }

  function fmtAgo(ms) {
    if (ms === null || ms === undefined) return "never";
    if (ms < 1000) return "just now";
    const s = Math.round(ms / 1000);
    if (s < 120) return s + " s ago";
    const m = Math.round(s / 60);
    if (m < 120) return m + " min ago";
    return Math.round(m / 60) + " h ago";
  }

  function fmtAge(ms) {
    if (ms === null || ms === undefined) return "–";
    if (ms < 1000) return ms + " ms";
    const s = ms / 1000;
    if (s < 120) return s.toFixed(s < 10 ? 1 : 0) + " s";
    const m = s / 60;
    if (m < 120) return Math.round(m) + " min";
    return (m / 60).toFixed(1) + " h";
  }

  function fmtBytes(b) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
    return (i === 0 ? b : b.toFixed(1)) + " " + units[i];
  }

  // Outbox, oldest, retries and dropped cells of one fleet row.
  function statusCells(a) {
    const s = a.status;
    if (!s) {
      const span = a.last_seen_ms ? "≤ " + a.seq_span_records : "–";
      const why = a.last_seen_ms
        ? "This agent does not report its outbox; at most this many records (floor " + a.outbox_floor + " to newest seq " + (a.highest_seq ?? "–") + ") are still held by it."
        : "No batch received yet.";
      return [
        el("td", { class: "num", title: why }, span),
        el("td", { class: "num" }, "–"),
        el("td", { class: "num" }, "–"),
        el("td", { class: "num" }, "–"),
      ];
    }
    const asOf = "as reported " + fmtAgo(s.reported_ms_ago) + " by " + a.id + " " + s.agent_version + " (up " + fmtAge(s.uptime_s * 1000) + ")";
    const oldest = s.outbox_oldest_age_ms;
    const behind = oldest !== null && oldest >= 30000 ? (oldest >= 300000 ? "crit" : "warn") : "";
    return [
      el("td", { class: "num", "data-field": "outbox-records",
        title: fmtBytes(s.outbox_bytes) + " of " + fmtBytes(s.outbox_max_bytes) + " (" + (s.outbox_fill * 100).toFixed(1) + " % full), " + asOf },
        String(s.outbox_records)),
      el("td", { class: "num " + behind, "data-field": "outbox-oldest", title: "Age of the oldest record waiting in the outbox, " + asOf }, fmtAge(oldest)),
      el("td", { class: "num" + (s.uplink_failures > 0 ? " warn" : ""), "data-field": "uplink-retries",
        title: s.uplink_failures + " failed in a row before the last batch; " + asOf }, String(s.uplink_retries_total)),
      el("td", { class: "num" + (s.outbox_dropped_total > 0 ? " crit" : ""), "data-field": "outbox-dropped",
        title: "Records the outbox dropped (full or expired) since the agent started" }, String(s.outbox_dropped_total)),
    ];
  }

  function fmtTime(ms) {
    return new Date(ms).toLocaleTimeString([], { hour12: false }) + "." + String(ms % 1000).padStart(3, "0");
  }

  // ---------------------------------------------------------------- fleet

  function renderFleet(body) {
    state.agents = body.agents;
    const rows = body.agents.map((a) =>
      el("tr", { "data-agent": a.id, "data-online": String(a.online) },
        el("td", {}, a.id),
        el("td", {}, el("span", { class: "status " + (a.online ? "online" : "offline") }, a.online ? "online" : "offline")),
        el("td", { title: a.last_seen_ms ? new Date(a.last_seen_ms).toISOString() : "" }, fmtAgo(a.since_last_seen_ms)),
        el("td", { class: "num" }, a.readings_per_s.toFixed(1)),
        el("td", { class: "num" }, a.series),
        el("td", { class: "num" }, a.windows),
        el("td", { class: "num" }, a.alerts),
        el("td", { class: "num" }, a.dead_letters),
        ...statusCells(a),
      ));
    if (rows.length === 0) rows.push(el("tr", {}, el("td", { colSpan: 12, class: "empty" }, "No agents configured.")));
    $("fleet").tBodies[0].replaceChildren(...rows);
    const online = body.agents.filter((a) => a.online).length;
    $("fleet-summary").textContent = `${online} of ${body.agents.length} online · ${body.totals.series} series`;

    const select = $("series-agent");
    const chosen = select.value;
    const ids = body.agents.map((a) => a.id);
    const current = Array.from(select.options).slice(1).map((o) => o.value);
    if (ids.join("\n") !== current.join("\n")) {
      select.replaceChildren(el("option", { value: "" }, "all agents"), ...ids.map((id) => el("option", { value: id }, id)));
      select.value = ids.includes(chosen) ? chosen : "";
    }
  }

  // ---------------------------------------------------------------- series list

  async function loadSeries() {
    const query = new URLSearchParams({
      q: $("series-q").value,
      agent: $("series-agent").value,
      alerting: $("series-alerting").value,
      offset: String(state.seriesOffset),
      limit: String(PAGE),
    });
    const body = await getJson("api/v1/series?" + query);
    const selected = state.chart ? state.chart.agent + "/" + state.chart.series : null;
    const items = body.series.map((s) => {
      const last = s.last;
      const sev = s.last_alert ? s.last_alert.severity : null;
      return el("li", { "data-id": s.id, class: s.id === selected ? "selected" : "", onclick: () => selectSeries(s.agent, s.device + "/" + s.sensor) },
        el("span", { class: "name" }, el("span", { class: "agent" }, s.agent), s.device + "/" + s.sensor),
        el("span", { class: "value" },
          sev && sev !== "normal" ? el("span", { class: "sev " + sev, title: "last alert " + fmtTime(s.last_alert.time_ms) }, sev[0]) : null,
          " ", last ? fmtNum(last.mean) + " " + s.unit : "–"));
    });
    if (items.length === 0) items.push(el("li", { class: "empty" }, "No series match."));
    $("series-list").replaceChildren(...items);
    $("series-total").textContent = body.total + " live";
    const from = body.total === 0 ? 0 : body.offset + 1;
    $("series-page").textContent = `${from}–${body.offset + body.series.length} of ${body.total}`;
    $("series-prev").disabled = body.offset === 0;
    $("series-next").disabled = body.offset + body.series.length >= body.total;
    if (!state.chart && body.series.length > 0 && !location.hash) {
      const first = body.series[0];
      selectSeries(first.agent, first.device + "/" + first.sensor);
    }
  }

  let searchTimer = null;
  function scheduleSeriesLoad() {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => { state.seriesOffset = 0; loadSeries().catch(report); }, 200);
  }

  // ---------------------------------------------------------------- chart

  function selectSeries(agent, series) {
    state.chart = { agent, series };
    // A new series may have another unit: rebuild the chart and its axis.
    if (state.plot) {
      state.plot.destroy();
      state.plot = null;
    }
    state.windows = [];
    state.marks = [];
    history.replaceState(null, "", "#series=" + encodeURIComponent(agent + "/" + series));
    $("chart-title").textContent = agent + " · " + series;
    for (const li of $("series-list").children) {
      li.classList.toggle("selected", li.dataset.id === agent + "/" + series);
    }
    loadChart().catch(report);
    openStream();
  }

  async function loadChart() {
    if (!state.chart) return;
    const { agent, series } = state.chart;
    const body = await getJson("api/v1/series/windows?" + new URLSearchParams({ agent, series, range: state.range }));
    state.windows = body.windows;
    state.marks = body.alerts;
    state.unit = body.unit;
    drawChart();
  }

  function chartData() {
    const cutoff = Date.now() - RANGES[state.range];
    const ws = state.windows.filter((w) => w.start_ms >= cutoff);
    const x = ws.map((w) => w.start_ms / 1000);
    const band = (w, sign) => (w.score ? w.score.baseline_mean + sign * 3 * w.score.baseline_stddev : null);
    const marks = ws.map(() => null);
    for (const m of state.marks) {
      // An alert sits on the window it belongs to.
      const i = ws.findIndex((w) => m.time_ms >= w.start_ms && m.time_ms < w.end_ms);
      if (i >= 0) marks[i] = marks[i] === null ? m.value : (Math.abs(m.value - ws[i].mean) > Math.abs(marks[i] - ws[i].mean) ? m.value : marks[i]);
    }
    ws.forEach((w, i) => {
      if (marks[i] === null && w.score && w.score.severity !== "normal") marks[i] = w.mean;
    });
    return [x, ws.map((w) => w.mean), ws.map((w) => band(w, -1)), ws.map((w) => band(w, 1)),
      ws.map((w) => w.min), ws.map((w) => w.max), marks];
  }

  // Min–max whiskers: one vertical line per window.
  function whiskers(u) {
    const ctx = u.ctx;
    const [xs, , , , mins, maxs] = u.data;
    ctx.save();
    ctx.strokeStyle = "rgba(107, 114, 128, 0.7)";
    ctx.lineWidth = Math.max(1, devicePixelRatio);
    ctx.beginPath();
    for (let i = 0; i < xs.length; i++) {
      if (mins[i] === null || maxs[i] === null) continue;
      const x = Math.round(u.valToPos(xs[i], "x", true));
      ctx.moveTo(x, u.valToPos(mins[i], "y", true));
      ctx.lineTo(x, u.valToPos(maxs[i], "y", true));
    }
    ctx.stroke();
    ctx.restore();
  }

  function chartSize() {
    const box = $("chart");
    return { width: Math.max(300, box.clientWidth), height: 360 };
  }

  function drawChart() {
    const data = chartData();
    $("chart").dataset.points = String(data[0].length);
    if (state.plot) {
      state.plot.setData(data);
      return;
    }
    const unit = () => state.unit;
    const opts = {
      ...chartSize(),
      scales: { x: { time: true } },
      axes: [{}, { label: state.unit, values: (u, vals) => vals.map((v) => fmtNum(v)) }],
      series: [
        {},
        { label: "mean", stroke: "#2563eb", width: 2, value: (u, v) => fmtNum(v) + " " + unit() },
        { label: "−3σ", stroke: "rgba(5, 150, 105, 0.7)", dash: [4, 4], width: 1, value: (u, v) => fmtNum(v) },
        { label: "+3σ", stroke: "rgba(5, 150, 105, 0.7)", dash: [4, 4], width: 1, value: (u, v) => fmtNum(v) },
        { label: "min", stroke: "rgba(107, 114, 128, 0.7)", paths: () => null, points: { show: false }, value: (u, v) => fmtNum(v) },
        { label: "max", stroke: "rgba(107, 114, 128, 0.7)", paths: () => null, points: { show: false }, value: (u, v) => fmtNum(v) },
        { label: "alert", stroke: "#dc2626", fill: "#dc2626", paths: () => null, points: { show: true, size: 10, fill: "#dc2626", stroke: "#7f1d1d" }, value: (u, v) => fmtNum(v) },
      ],
      bands: [{ series: [3, 2], fill: "rgba(5, 150, 105, 0.12)" }],
      hooks: { draw: [whiskers] },
    };
    state.plot = new uPlot(opts, data, $("chart"));
  }

  function onWindowEvent(w) {
    if (!state.chart || w.agent !== state.chart.agent || w.device + "/" + w.sensor !== state.chart.series) return;
    const ws = state.windows;
    const at = ws.findIndex((x) => x.start_ms >= w.start_ms);
    if (at === -1) ws.push(w);
    else if (ws[at].start_ms === w.start_ms) ws[at] = w;
    else ws.splice(at, 0, w);
    const cutoff = Date.now() - RANGES[state.range];
    while (ws.length > 0 && ws[0].start_ms < cutoff) ws.shift();
    drawChart();
  }

  // ---------------------------------------------------------------- alerts

  function alertItem(a, fresh) {
    const series = a.series.device + "/" + a.series.sensor;
    const id = a.agent + "/" + series;
    return el("li", {
      class: fresh ? "fresh" : "",
      "data-id": String(a.id),
      "data-series": id,
      "data-time-ms": String(a.time_ms),
      "data-shown-ms": String(Date.now()),
    },
      el("div", {},
        el("span", { class: "sev " + a.score.severity }, a.score.severity), " ",
        el("a", { href: "#series=" + encodeURIComponent(id), onclick: (e) => { e.preventDefault(); selectSeries(a.agent, series); } }, id)),
      el("div", { class: "detail" },
        el("span", { class: "when" }, fmtTime(a.time_ms)), " · ", a.kind,
        " · value ", fmtNum(a.value), a.unit ? " " + a.unit : "",
        " · z ", fmtNum(a.score.z),
        " · baseline ", fmtNum(a.score.baseline_mean), " ± ", fmtNum(a.score.baseline_stddev)));
  }

  function addAlerts(alerts, fresh) {
    const list = $("alerts");
    const empty = list.querySelector(".empty");
    if (empty && alerts.length) empty.remove();
    // `alerts` is newest first; insert oldest first so the newest ends on top.
    for (const a of alerts.slice().reverse()) {
      if (state.alertIds.has(a.id)) continue;
      state.alertIds.add(a.id);
      list.prepend(alertItem(a, fresh));
      if (state.chart && a.agent === state.chart.agent && a.series.device + "/" + a.series.sensor === state.chart.series && fresh) {
        state.marks.push({ id: a.id, time_ms: a.time_ms, value: a.value, kind: a.kind, severity: a.score.severity, z: a.score.z });
        drawChart();
      }
    }
    while (list.children.length > MAX_ALERT_ITEMS) {
      const last = list.lastElementChild;
      state.alertIds.delete(Number(last.dataset.id));
      last.remove();
    }
    $("alerts-count").textContent = list.querySelectorAll("li[data-id]").length + " shown";
  }

  async function loadAlerts() {
    const body = await getJson("api/v1/alerts?limit=100");
    addAlerts(body.alerts, false);
    if (body.alerts.length === 0 && $("alerts").children.length === 0) {
      $("alerts").append(el("li", { class: "empty" }, "No alerts yet."));
    }
  }

  // ---------------------------------------------------------------- live stream

  function setConn(s, text) {
    const c = $("conn");
    c.dataset.state = s;
    c.textContent = text;
  }

  function openStream() {
    if (state.stream) state.stream.close();
    const query = state.chart ? "?" + new URLSearchParams({ agent: state.chart.agent, series: state.chart.series }) : "";
    const stream = new EventSource("api/v1/events" + query, { withCredentials: true });
    state.stream = stream;
    stream.onopen = () => {
      setConn("live", "live");
      if (state.streamBroken) {
        state.streamBroken = false;
        resync();
      }
    };
    stream.onerror = () => {
      state.streamBroken = true;
      setConn("reconnecting", "reconnecting…");
    };
    stream.addEventListener("alert", (e) => addAlerts([JSON.parse(e.data)], true));
    stream.addEventListener("window", (e) => onWindowEvent(JSON.parse(e.data)));
    stream.addEventListener("fleet", (e) => {
      renderFleet(JSON.parse(e.data));
      // The list's latest values: refreshed every third fleet event (6 s).
      if (++state.fleetTicks % 3 === 0 && document.visibilityState === "visible") loadSeries().catch(report);
    });
    stream.addEventListener("resync", () => resync());
  }

  function resync() {
    getJson("api/v1/fleet").then(renderFleet).catch(report);
    loadAlerts().catch(report);
    loadChart().catch(report);
    loadSeries().catch(report);
  }

  function report(err) {
    console.error(err);
  }

  // ---------------------------------------------------------------- start

  function start() {
    $("series-q").addEventListener("input", scheduleSeriesLoad);
    $("series-agent").addEventListener("change", scheduleSeriesLoad);
    $("series-alerting").addEventListener("change", scheduleSeriesLoad);
    $("series-prev").addEventListener("click", () => { state.seriesOffset = Math.max(0, state.seriesOffset - PAGE); loadSeries().catch(report); });
    $("series-next").addEventListener("click", () => { state.seriesOffset += PAGE; loadSeries().catch(report); });
    for (const b of $("ranges").querySelectorAll("button")) {
      b.addEventListener("click", () => {
        state.range = b.dataset.range;
        for (const o of $("ranges").querySelectorAll("button")) o.classList.toggle("active", o === b);
        loadChart().catch(report);
      });
    }
    window.addEventListener("resize", () => { if (state.plot) state.plot.setSize(chartSize()); });
    setInterval(() => { $("clock").textContent = new Date().toLocaleTimeString([], { hour12: false }); }, 1000);

    const hash = new URLSearchParams(location.hash.slice(1)).get("series");
    if (hash) {
      const [agent, ...rest] = hash.split("/");
      if (agent && rest.length >= 2) selectSeries(agent, rest.join("/"));
    }
    if (!state.stream) openStream();
    getJson("api/v1/fleet").then(renderFleet).catch(report);
    loadSeries().catch(report);
    loadAlerts().catch(report);
  }

  session.then(start, (e) => { report(e); start(); });
})();
