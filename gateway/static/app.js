// edgeflow live view: a snapshot at load, then server-sent events (no reloads).
"use strict";
(function () {
  const $ = (s) => document.querySelector(s);
  const MAXROWS = 200; // rows kept per list
  let channels = {}, points = 300, selected = null, series = {}, charts = {}, keys = new Set();
  const state = { updates: 0, alertsLive: 0 };
  window.edgeflow = state;

  const esc = (v) => String(v == null ? "" : v).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
  const hms = (ms) => (ms ? new Date(ms).toLocaleTimeString([], { hour12: false }) : "-");
  const ago = (ms, now) => (ms ? secs(now - ms) + " ago" : "never");
  function secs(ms) {
    if (ms == null) return "-";
    const s = ms / 1000;
    return s < 100 ? s.toFixed(1) + " s" : s < 7200 ? (s / 60).toFixed(1) + " min" : (s / 3600).toFixed(1) + " h";
  }
  function chan(key, ch) {
    const c = channels[key + "/" + ch] || channels["*/" + ch];
    return c ? { name: c[0], unit: c[1] } : { name: "ch" + ch, unit: "" };
  }

  function renderState(s) {
    $("#version").textContent = "v" + s.version;
    $("#broker").textContent = s.broker_connected ? "connected" : "DISCONNECTED";
    $("#broker").className = s.broker_connected ? "ok" : "bad";
    const on = s.fleet.filter((d) => d.online).length;
    $("#online").textContent = on + " / " + s.devices;
    $("#watermark").textContent = s.global_watermark ? new Date(s.global_watermark).toISOString().replace(".000Z", "Z") : "-";
    $("#lag").textContent = secs(s.global_lag_ms);
    $("#rate").textContent = s.readings_per_s == null ? "-" : Math.round(s.readings_per_s);
    $("#late-total").textContent = s.late_total;
    $("#quarantined-total").textContent = s.quarantined_total;
    $("#sinks").innerHTML = (s.sinks || []).map((k) =>  // sink outboxes (docs/sinks.md)
      `sink ${esc(k.name)} <b class="${k.failing || k.dropped ? "bad" : "ok"}">${k.items} waiting, lag ${k.lag_s} s` +
      `${k.dropped ? ", dropped " + k.dropped : ""}</b>`).join(" ");
    const rows = s.fleet.slice().sort((a, b) => (a.device < b.device ? -1 : 1)).map((d) =>
      `<tr class="${d.online ? "" : "offline"}" data-device="${esc(d.device)}"><td>${esc(d.device)}</td>` +
      `<td>${d.online ? "online" : "offline"}</td><td>${ago(d.last_seen, s.now)}</td>` +
      `<td class="num">${d.backlog == null ? "-" : d.backlog}</td><td class="num">${secs(d.lag_ms)}</td>` +
      `<td class="num">${d.dropped}</td><td class="num">${d.quarantined}</td><td class="num">${d.late}</td>` +
      `<td>${esc(d.fw)}</td><td class="num">${d.clock_offset_ms == null ? "-" : d.clock_offset_ms + " ms"}</td></tr>`);
    $("#fleet tbody").innerHTML = rows.join("");
    s.fleet.forEach((d) => addKey(d.device));
  }

  function addKey(k) {
    if (keys.has(k)) return;
    keys.add(k);
    const opt = document.createElement("option");
    opt.value = opt.textContent = k;
    const sel = $("#key-select");
    const after = Array.from(sel.options).find((o) => o.value > k);
    sel.insertBefore(opt, after || null);
    if (selected == null) select(k);
  }

  function addRows(tbody, rows, fmt, live) {
    const tb = $(tbody);
    for (const r of rows) {
      const tr = document.createElement("tr");
      tr.innerHTML = fmt(r);
      if (live) tr.className = "new";
      tb.insertBefore(tr, tb.firstChild);
    }
    while (tb.rows.length > MAXROWS) tb.deleteRow(tb.rows.length - 1);
  }
  const fmtAlert = (a) => `<td>${hms(a.t)}</td><td>${esc(a.device)}</td><td>${a.type}</td><td>${esc(a.channel == null ? a.what : chan(a.device, a.channel).name + " " + a.what)}</td><td>${esc(a.level)}</td><td>${esc(a.detail)}</td>`;
  const fmtLate = (l) => { const c = chan(l.device, l.channel); return `<td>${hms(l.t)}</td><td>${esc(l.device)}</td><td>${esc(c.name)}</td><td class="num">${l.value} ${esc(c.unit)}</td><td>${esc(l.scope + " " + l.key)} @ ${hms(l.window_start)}</td><td>${esc(l.reason)}</td>`; };
  const fmtQuar = (q) => `<td>${hms(q.t)}</td><td>${esc(q.device || "-")}</td><td>${esc(q.reason)}</td><td>${esc(q.detail)}</td>`;

  // window rows: [rowid, scope, key, channel, start, end, revision, count, mean, min, max]
  function addWindows(rows) {
    const touched = new Set();
    for (const r of rows) {
      const id = r[2] + "/" + r[3];
      const m = series[id] || (series[id] = new Map());
      m.set(r[4], r);
      if (m.size > points) m.delete(Math.min(...m.keys()));
      if (r[1] === "group") addKey(r[2]);
      if (r[2] === selected) touched.add(r[3]);
    }
    touched.forEach(draw);
  }

  function draw(ch) {
    const m = series[selected + "/" + ch];
    if (!m) return;
    const rows = Array.from(m.values()).sort((a, b) => a[4] - b[4]);
    const data = [rows.map((r) => r[4] / 1000), rows.map((r) => r[8]), rows.map((r) => r[9]), rows.map((r) => r[10])];
    let c = charts[ch];
    if (!c) {
      const info = chan(selected, ch);
      const div = document.createElement("div");
      div.className = "plot";
      div.dataset.channel = ch;
      const next = Array.from($("#plots").children).find((d) => +d.dataset.channel > ch);
      $("#plots").insertBefore(div, next || null);
      const opts = {
        title: `${selected}: ${info.name}${info.unit ? " (" + info.unit + ")" : ""}`, width: 420, height: 210,
        scales: { x: { time: true } },
        series: [{}, { label: "mean", stroke: "#1565c0", width: 2, points: { show: true, size: 5 } },
                 { label: "min", stroke: "#90a4ae" }, { label: "max", stroke: "#90a4ae" }],
        bands: [{ series: [3, 2], fill: "rgba(21,101,192,0.15)" }],
        axes: [{}, { label: info.unit }],
      };
      c = charts[ch] = { plot: new uPlot(opts, data, div), div };
    } else {
      c.plot.setData(data);
    }
    c.div.dataset.points = data[0].length;
  }

  async function select(k) {
    selected = k;
    $("#key-select").value = k;
    Object.values(charts).forEach((c) => { c.plot.destroy(); c.div.remove(); });
    charts = {};
    const h = await (await fetch("api/history?key=" + encodeURIComponent(k))).json();
    addWindows(h.windows);
  }
  $("#key-select").addEventListener("change", (e) => select(e.target.value));

  async function start() {
    const s = await (await fetch("api/snapshot")).json();
    channels = s.channels;
    points = s.history_points;
    renderState(s);
    (s.groups || []).forEach(addKey);
    addRows("#alerts tbody", s.alerts, fmtAlert, false);
    addRows("#late tbody", s.late, fmtLate, false);
    addRows("#quarantine tbody", s.quarantine, fmtQuar, false);
    const es = new EventSource("api/events");
    es.addEventListener("update", (e) => {
      const u = JSON.parse(e.data);
      state.updates++;
      renderState(u);
      addWindows(u.windows || []);
      if (u.alerts && u.alerts.length) state.alertsLive += u.alerts.length;
      addRows("#alerts tbody", u.alerts || [], fmtAlert, true);
      addRows("#late tbody", u.late || [], fmtLate, true);
      addRows("#quarantine tbody", u.quarantine || [], fmtQuar, true);
      $("#live").textContent = "live " + hms(u.now);
      $("#live").className = "fresh";
    });
    es.onerror = () => { $("#live").textContent = "reconnecting"; $("#live").className = "stale"; };
  }
  start();
})();
