// picosnitch dash: charts of sent/received bytes over time from the JSON API (dash_api.py).
// Every value from the API is inserted with textContent (never as HTML); filters name values by
// their `key`, which the server maps back to the exact stored value.
"use strict";
(function () {
  const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#9333ea", "#0891b2", "#db2777",
    "#65a30d", "#ea580c", "#4f46e5", "#0d9488", "#a16207"];
  const OTHER_COLOR = "#9ca3af";
  const state = {
    meta: null, dim: "exe", range: "hour", offset: 0, custom: null, top: 10,
    filter: null, // {column, op, key, text}
    refresh: 30, timer: null, charts: {}, drawn: {send: [], recv: []}, loads: 0, lastSeries: null,
    view: "history", liveTimer: null, liveSince: 0, liveFrames: [], liveChart: null,
  };
  window.picosnitchDash = state; // for the browser tests and the curious

  const $ = (id) => document.getElementById(id);

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function option(value, text, selected) {
    const o = el("option", text);
    o.value = value;
    if (selected) o.selected = true;
    return o;
  }

  function bytes(n) {
    if (n === null || n === undefined) return "";
    const units = ["B", "KB", "MB", "GB", "TB", "PB"];
    let i = 0;
    let v = Math.abs(n);
    while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
    return (n < 0 ? "-" : "") + (i === 0 ? String(v) : v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)) + " " + units[i];
  }

  function when(ts) {
    if (ts === null || ts === undefined) return "…";
    const d = new Date(ts * 1000);
    const p = (x) => String(x).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  }

  function setStatus(text, error) {
    const s = $("status");
    s.textContent = text;
    s.className = error ? "error" : "";
  }

  function windowParams(params) {
    if (state.range === "custom" && state.custom) {
      params.set("start", String(state.custom[0]));
      params.set("end", String(state.custom[1]));
    } else {
      params.set("range", state.range);
      params.set("offset", String(state.offset));
    }
    if (state.filter) params.append("f", `${state.filter.column}:${state.filter.op}:${state.filter.key}`);
    return params;
  }

  async function api(name, params) {
    const response = await fetch(`/api/${name}?${params.toString()}`, {credentials: "same-origin"});
    const body = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    return body;
  }

  // ---- charts ----

  function wheelZoom() {
    // Zoom the x axis around the pointer with the mouse wheel ("Dash scroll zoom").
    return {
      hooks: {
        ready: (u) => {
          u.over.addEventListener("wheel", (e) => {
            e.preventDefault();
            const {left, width} = u.over.getBoundingClientRect();
            const x = u.posToVal(e.clientX - left, "x");
            const min = u.scales.x.min, max = u.scales.x.max;
            const factor = e.deltaY < 0 ? 0.75 : 1 / 0.75;
            const nmin = x - (x - min) * factor, nmax = x + (max - x) * factor;
            u.setScale("x", {min: nmin, max: nmax});
          }, {passive: false});
        },
      },
    };
  }

  function chartOptions(title, labels, colors) {
    const css = getComputedStyle(document.documentElement);
    const fg = css.getPropertyValue("--fg").trim() || "#000";
    const grid = css.getPropertyValue("--grid").trim() || "rgba(0,0,0,0.1)";
    const width = Math.max($("history-view").clientWidth - 24, 300);
    const axis = {stroke: fg, grid: {stroke: grid}, ticks: {stroke: grid}};
    return {
      title: "", width: width, height: 280,
      cursor: {sync: {key: "picosnitch"}, drag: {x: true, y: false}},
      // One point alone (a first live second, a history one bucket long) would get an axis
      // spanning years: give it a minute either side.
      scales: {x: {time: true,
        range: (u, min, max) => (min === max ? [min - 60, max + 60] : [min, max])}},
      axes: [axis, Object.assign({values: (u, ticks) => ticks.map(bytes), size: 80}, axis)],
      series: [{label: "time", value: (u, v) => when(v)}].concat(labels.map((label, i) => ({
        label: label, stroke: colors[i], width: 1.5, points: {show: false},
        value: (u, v) => bytes(v),
      }))),
      plugins: state.meta && state.meta.scroll_zoom ? [wheelZoom()] : [],
    };
  }

  function drawChart(which, times, series, other) {
    const labels = series.map((s) => s.text);
    const colors = series.map((s, i) => PALETTE[i % PALETTE.length]);
    const data = [times].concat(series.map((s) => s[which]));
    if (other) {
      labels.push("(other)");
      colors.push(OTHER_COLOR);
      data.push(other[which]);
    }
    const target = $(`chart-${which}`);
    if (state.charts[which]) state.charts[which].destroy();
    target.textContent = "";
    state.charts[which] = new uPlot(chartOptions(which, labels, colors), data, target);
    state.drawn[which] = labels;
  }

  // ---- the history view ----

  function card(label, big, extra) {
    const c = el("div", null, "card");
    c.appendChild(el("div", label, "label"));
    if (big !== null) c.appendChild(el("div", big, "big"));
    if (extra) c.appendChild(extra);
    return c;
  }

  function dimTitle(column) {
    const d = state.meta.dimensions.find((x) => x.column === column);
    return d ? d.title : column;
  }

  function renderCards(result) {
    const cards = $("cards");
    cards.textContent = "";
    cards.appendChild(card("sent", bytes(result.send)));
    cards.appendChild(card("received", bytes(result.recv)));
    cards.appendChild(card(`${dimTitle(result.dim)} values`, String(result.values)));
    const list = el("ol");
    for (const s of result.series.slice(0, 5)) {
      const total = s.send.reduce((a, b) => a + b, 0) + s.recv.reduce((a, b) => a + b, 0);
      const item = el("li", `${s.text} — ${bytes(total)}`);
      item.title = s.text;
      list.appendChild(item);
    }
    cards.appendChild(card(`top talkers (${dimTitle(result.dim)})`, null, list));
  }

  function renderTable(result) {
    const country = result.dim === "raddr" && state.meta.geoip;
    $("table-title").textContent = `${dimTitle(result.dim)} (${result.count} values)`;
    const head = $("table").tHead;
    head.textContent = "";
    const hr = el("tr");
    for (const h of [dimTitle(result.dim)].concat(country ? ["country"] : [], ["sent", "received", "conns"])) {
      hr.appendChild(el("th", h, ["sent", "received", "conns"].includes(h) ? "num" : ""));
    }
    head.appendChild(hr);
    const body = $("table").tBodies[0];
    body.textContent = "";
    for (const v of result.values.slice(0, 200)) {
      const tr = el("tr", null, "clickable");
      tr.appendChild(el("td", v.text));
      if (country) tr.appendChild(el("td", v.country || ""));
      tr.appendChild(el("td", bytes(v.send), "num"));
      tr.appendChild(el("td", bytes(v.recv), "num"));
      tr.appendChild(el("td", v.conns, "num"));
      tr.addEventListener("click", () => {
        if (result.dim === "exe") openDrill(v.key);
        else setFilter({column: result.dim, op: "is", key: v.key, text: v.text});
      });
      body.appendChild(tr);
    }
  }

  function renderWindow(result) {
    let text = `${when(result.start)} – ${when(result.end)}`;
    text += `, ${result.bucket >= 3600 ? result.bucket / 3600 + " h" : result.bucket + " s"} per point`;
    $("window").textContent = text;
    $("filters").textContent = state.filter
      ? `where ${dimTitle(state.filter.column)} ${state.filter.op === "is" ? "is" : "is not"} ${state.filter.text}` : "";
    const named = state.range !== "custom" && state.range !== "all";
    $("back").disabled = !(named || state.range === "custom");
    $("forward").disabled = !((named && state.offset > 0) || state.range === "custom");
  }

  async function load() {
    const token = ++state.loads;
    setStatus("loading…");
    saveHash();
    try {
      const params = windowParams(new URLSearchParams({dim: state.dim, top: String(state.top)}));
      const result = await api("series", params);
      if (token !== state.loads) return; // a newer load started meanwhile
      state.lastSeries = result;
      drawChart("send", result.times, result.series, result.other);
      drawChart("recv", result.times, result.series, result.other);
      renderCards(result);
      renderWindow(result);
      state.chartedAt = performance.now();
      document.body.dataset.charted = String(token);
      // The table (with connection counts) is the slower query: asked once the charts show.
      const table = await api("values", params);
      if (token !== state.loads) return;
      renderTable(table);
      setStatus(`updated ${when(Date.now() / 1000)}`);
      document.body.dataset.loaded = String(token);
    } catch (e) {
      if (token === state.loads) setStatus(`error: ${e.message}`, true);
    }
  }

  // The view is kept in the address (#dim=exe&range=week&offset=0), so it can be bookmarked.
  function saveHash() {
    const h = new URLSearchParams({dim: state.dim, range: state.range, offset: String(state.offset)});
    if (state.top !== 10) h.set("top", String(state.top));
    if (state.range === "custom" && state.custom) {
      h.set("start", String(state.custom[0]));
      h.set("end", String(state.custom[1]));
    }
    history.replaceState(null, "", "#" + h.toString());
  }

  function readHash() {
    const h = new URLSearchParams(location.hash.slice(1));
    if (state.meta.dimensions.some((d) => d.column === h.get("dim"))) state.dim = h.get("dim");
    if (state.meta.ranges.some((r) => r.name === h.get("range"))) state.range = h.get("range");
    const top = Number(h.get("top"));
    if (Number.isInteger(top) && top >= 1 && top <= 50) state.top = top;  // series drawn
    const offset = Number(h.get("offset"));
    if (Number.isInteger(offset) && offset > 0) state.offset = offset;
    const start = Number(h.get("start")), end = Number(h.get("end"));
    if (h.get("range") === "custom" && Number.isInteger(start) && Number.isInteger(end) && start < end) {
      state.range = "custom";
      state.custom = [start, end];
    }
  }

  async function loadWhereValues() {
    const column = $("where").value;
    const is = $("is");
    is.textContent = "";
    if (!column) {
      is.appendChild(option("", "…"));
      is.disabled = true;
      return;
    }
    is.appendChild(option("", "loading…"));
    const params = new URLSearchParams({dim: column});
    if (state.range === "custom" && state.custom) {
      params.set("start", String(state.custom[0]));
      params.set("end", String(state.custom[1]));
    } else {
      params.set("range", state.range);
      params.set("offset", String(state.offset));
    }
    try {
      const result = await api("values", params);
      is.textContent = "";
      is.appendChild(option("", `(choose one of ${result.count})`));
      for (const v of result.values) is.appendChild(option(v.key, v.text));
      is.disabled = false;
    } catch (e) {
      setStatus(`error: ${e.message}`, true);
    }
  }

  function setFilter(filter) {
    state.filter = filter;
    if (filter) {
      $("where").value = filter.column;
      $("is-op").value = filter.op;
    }
    load();
  }

  // ---- drill-down for one executable ----

  async function openDrill(key) {
    const params = windowParams(new URLSearchParams({key: key}));
    try {
      const d = await api("executable", params);
      $("drill").hidden = false;
      $("drill-name").textContent = d.text;
      $("drill-summary").textContent =
        `first seen ${when(d.first_seen)}, last seen ${when(d.last_seen)}; in this window sent ${bytes(d.send)}, received ${bytes(d.recv)}`;
      const box = $("drill-sections");
      box.textContent = "";
      for (const section of d.sections) {
        const div = el("div");
        div.appendChild(el("h3", `${section.title} (${section.values.length})`));
        const table = el("table");
        for (const v of section.values.slice(0, 20)) {
          const tr = el("tr");
          tr.appendChild(el("td", v.country ? `${v.text} [${v.country}]` : v.text));
          tr.appendChild(el("td", bytes(v.send), "num"));
          tr.appendChild(el("td", bytes(v.recv), "num"));
          table.appendChild(tr);
        }
        div.appendChild(table);
        box.appendChild(div);
      }
      $("drill").scrollIntoView({block: "nearest"});
    } catch (e) {
      setStatus(`error: ${e.message}`, true);
    }
  }

  // ---- the live view ----

  function drawLive() {
    const frames = state.liveFrames;
    $("live-data").hidden = !frames.length; // nothing to chart before the first second arrives
    if (!frames.length) return;
    const times = frames.map((f) => f.time);
    const send = frames.map((f) => f.rates.reduce((a, r) => a + r.send, 0));
    const recv = frames.map((f) => f.rates.reduce((a, r) => a + r.recv, 0));
    const opts = chartOptions("live", ["sent/s", "received/s"], [PALETTE[0], PALETTE[1]]);
    opts.width = Math.max($("live-view").clientWidth - 24, 300);
    if (!state.liveChart) state.liveChart = new uPlot(opts, [times, send, recv], $("chart-live"));
    else state.liveChart.setData([times, send, recv]);
    const body = $("live-table").tBodies[0];
    body.textContent = "";
    const last = frames[frames.length - 1];
    for (const r of last ? last.rates.slice(0, 50) : []) {
      const tr = el("tr");
      for (const text of [r.exe, r.name, r.pexe, r.uid]) tr.appendChild(el("td", text));
      tr.appendChild(el("td", bytes(Math.round(r.send)), "num"));
      tr.appendChild(el("td", bytes(Math.round(r.recv)), "num"));
      body.appendChild(tr);
    }
  }

  // Above the live chart, in words: why nothing moves (no daemon, no traffic) or what is shown.
  function liveNote(text, error) {
    const note = $("live-note");
    note.textContent = text;
    note.className = error ? "error" : "";
  }

  async function pollLive() {
    try {
      const result = await api("live", new URLSearchParams({since: String(state.liveSince)}));
      // The sentence goes above the chart (liveNote); the corner only flags it.
      if (result.error) setStatus("live feed unavailable", true);
      else setStatus(`live ${when(Date.now() / 1000)}`);
      for (const f of result.frames) state.liveFrames.push(f);
      state.liveFrames = state.liveFrames.slice(-300);
      if (state.liveFrames.length) state.liveSince = state.liveFrames[state.liveFrames.length - 1].time;
      drawLive();
      const last = state.liveFrames[state.liveFrames.length - 1];
      if (result.error) liveNote(result.error, true);
      else if (!last) liveNote("connecting to the live feed…");
      else if (!last.rates.length) liveNote("no traffic in the last second");
      else {
        const n = last.rates.length;
        liveNote(`${n} executable${n === 1 ? "" : "s"} sent or received in the last second`);
      }
    } catch (e) {
      setStatus(`error: ${e.message}`, true);
      liveNote(`error: ${e.message}`, true);
    }
  }

  // ---- the alerts view: this machine's latest alerts (record.json), newest first ----

  async function loadAlerts() {
    try {
      const result = await api("alerts", new URLSearchParams());
      const body = $("alerts-table").tBodies[0];
      body.textContent = "";
      for (const a of result.alerts) {
        const tr = el("tr");
        for (const text of [a.time, a.kind, a.name, a.program, a.values]) tr.appendChild(el("td", text));
        body.appendChild(tr);
      }
      const n = result.alerts.length;
      $("alerts-note").textContent = n ? `${n} alert${n === 1 ? "" : "s"}, newest first`
        : "no alerts: programs are learning, or nothing new happened (picosnitch baseline)";
      setStatus(`alerts ${when(Date.now() / 1000)}`);
    } catch (e) {
      setStatus(`error: ${e.message}`, true);
    }
  }

  // ---- guard mode: prompts waiting for an answer, latest verdicts (picosnitch/guard/dash_guard.py) ----

  const PROTOCOLS = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"};

  async function answerPrompt(id, action, duration) {
    const response = await fetch("/api/guard/answer", {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-Picosnitch-Answer": "1"},
      body: JSON.stringify({id: id, action: action, duration: duration}),
    });
    const body = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
    $("guard-note").textContent = response.ok ? "answered" : `not answered: ${body.error}`;
    pollGuard();
  }

  async function pollGuard() {
    let result;
    try {
      result = await api("guard", new URLSearchParams());
    } catch (e) {
      $("guard-note").textContent = `error: ${e.message}`;
      return;
    }
    const pending = $("guard-pending").tBodies[0];
    pending.textContent = "";
    $("guard-note").textContent = result.pending_problem ||
      (result.pending.length ? "" : "no connection is waiting for an answer");
    for (const p of result.pending) {
      const tr = el("tr");
      tr.dataset.prompt = String(p.id);
      const port = p.direction === "out" ? p.rport : p.lport;
      for (const text of [`${p.exe} (pid ${p.pid})`, `${p.sha256.slice(0, 16)}… (${p.sha256_state})`,
        p.parent, p.cmdline, p.user, p.direction, `${p.domain || "(none)"} (${p.domain_source})`, p.raddr,
        port, p.protocol, p.country]) tr.appendChild(el("td", text));
      const td = el("td");
      for (const [label, action, duration] of [["Allow once", "allow", "once"],
        ["Allow always", "allow", "forever"], ["Deny", "deny", "once"]]) {
        const b = el("button", label);
        b.type = "button";
        b.addEventListener("click", () => answerPrompt(p.id, action, duration));
        td.appendChild(b);
      }
      tr.appendChild(td);
      pending.appendChild(tr);
    }
    const verdicts = $("guard-verdicts").tBodies[0];
    verdicts.textContent = "";
    $("guard-verdicts-note").textContent = result.verdicts_problem || "";
    for (const v of result.verdicts) {
      const tr = el("tr");
      for (const text of [when(v.ts), v.verdict, v.reason, v.exe || "(not looked up)", v.direction,
        v.domain, v.raddr, v.direction === "out" ? v.rport : v.lport, PROTOCOLS[v.protocol] || v.protocol,
        v.rule]) tr.appendChild(el("td", text));
      verdicts.appendChild(tr);
    }
  }

  function showView(view) {
    state.view = view;
    $("history-view").hidden = view !== "history";
    $("live-view").hidden = view !== "live";
    $("alerts-view").hidden = view !== "alerts";
    $("guard-view").hidden = view !== "guard";
    $("tab-history").classList.toggle("active", view === "history");
    $("tab-live").classList.toggle("active", view === "live");
    $("tab-alerts").classList.toggle("active", view === "alerts");
    $("tab-guard").classList.toggle("active", view === "guard");
    clearInterval(state.liveTimer);
    if (view === "guard") {
      pollGuard();
      state.liveTimer = setInterval(pollGuard, 2000);
    } else if (view === "live") {
      pollLive();
      state.liveTimer = setInterval(pollLive, 1000);
    } else if (view === "alerts") {
      loadAlerts();
      state.liveTimer = setInterval(loadAlerts, 10000);
    } else {
      load();
    }
  }

  // ---- controls ----

  function setRefresh(seconds) {
    state.refresh = seconds;
    clearInterval(state.timer);
    if (seconds > 0) state.timer = setInterval(() => { if (state.view === "history") load(); }, seconds * 1000);
  }

  function localInput(ts) {
    const d = new Date(ts * 1000 - new Date(ts * 1000).getTimezoneOffset() * 60000);
    return d.toISOString().slice(0, 19);
  }

  function wire() {
    $("dim").addEventListener("change", () => { state.dim = $("dim").value; $("drill").hidden = true; load(); });
    $("where").addEventListener("change", () => { state.filter = null; loadWhereValues(); load(); });
    $("is").addEventListener("change", () => {
      const is = $("is");
      if (!is.value) return;
      setFilter({column: $("where").value, op: $("is-op").value, key: is.value,
        text: is.options[is.selectedIndex].textContent});
    });
    $("is-op").addEventListener("change", () => {
      if (state.filter) setFilter(Object.assign({}, state.filter, {op: $("is-op").value}));
    });
    $("clear-filter").addEventListener("click", () => {
      $("where").value = "";
      loadWhereValues();
      setFilter(null);
    });
    $("range").addEventListener("change", () => {
      state.range = $("range").value;
      state.offset = 0;
      $("custom").hidden = state.range !== "custom";
      if (state.range === "custom") {
        const now = Math.floor(Date.now() / 1000);
        state.custom = state.custom || [now - 86400, now];
        $("custom-start").value = localInput(state.custom[0]);
        $("custom-end").value = localInput(state.custom[1]);
      }
      load();
    });
    $("custom-apply").addEventListener("click", () => {
      const start = Math.floor(new Date($("custom-start").value).getTime() / 1000);
      const end = Math.floor(new Date($("custom-end").value).getTime() / 1000);
      if (!(start < end)) { setStatus("the custom range must end after it starts", true); return; }
      state.custom = [start, end];
      load();
    });
    $("back").addEventListener("click", () => {
      if (state.range === "custom" && state.custom) {
        const len = state.custom[1] - state.custom[0];
        state.custom = [state.custom[0] - len, state.custom[1] - len];
      } else state.offset += 1;
      load();
    });
    $("forward").addEventListener("click", () => {
      if (state.range === "custom" && state.custom) {
        const len = state.custom[1] - state.custom[0];
        state.custom = [state.custom[0] + len, state.custom[1] + len];
      } else state.offset = Math.max(0, state.offset - 1);
      load();
    });
    $("refresh").addEventListener("change", () => setRefresh(Number($("refresh").value)));
    $("drill-close").addEventListener("click", () => { $("drill").hidden = true; });
    $("tab-history").addEventListener("click", () => showView("history"));
    $("tab-live").addEventListener("click", () => showView("live"));
    $("tab-alerts").addEventListener("click", () => showView("alerts"));
    $("tab-guard").addEventListener("click", () => showView("guard"));
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => {
        for (const which of ["send", "recv"]) {
          const chart = state.charts[which];
          if (chart) chart.setSize({width: Math.max($("history-view").clientWidth - 24, 300), height: 280});
        }
      }, 200);
    });
  }

  async function start() {
    try {
      state.meta = await api("meta", new URLSearchParams());
    } catch (e) {
      setStatus(`error: ${e.message}`, true);
      return;
    }
    if (state.meta.source) {  // the central server: say which, and that "live" is this machine
      $("source").textContent = `server: ${state.meta.source}`;
      $("source").hidden = false;
      $("tab-live").textContent = "Live (this machine)";
      $("tab-alerts").textContent = "Alerts (this machine)";
    }
    if (state.meta.geoip_problem) {
      $("notice").textContent = state.meta.geoip_problem;
      $("notice").hidden = false;
    }
    const theme = state.meta.theme;
    if (theme === "dark" || theme === "light") document.documentElement.dataset.theme = theme;
    state.range = state.meta.default_range;
    readHash();
    for (const d of state.meta.dimensions) {
      $("dim").appendChild(option(d.column, d.title, d.column === state.dim));
      $("where").appendChild(option(d.column, d.title));
    }
    for (const r of state.meta.ranges) $("range").appendChild(option(r.name, r.name, r.name === state.range));
    $("range").appendChild(option("custom", "custom…", state.range === "custom"));
    if (state.range === "custom") {
      $("custom").hidden = false;
      $("custom-start").value = localInput(state.custom[0]);
      $("custom-end").value = localInput(state.custom[1]);
    }
    $("tab-live").disabled = !state.meta.live;
    wire();
    setRefresh(Number($("refresh").value));
    await load();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
