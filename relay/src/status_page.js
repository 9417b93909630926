"use strict";
// Polls /status.json and redraws: every number goes into the element whose
// id is its key there; the chart is drawn as inline SVG. No other resource.
(function () {
  const POLL_MS = 1500;
  const SVG = "http" + "://www.w3.org/2000/svg"; // a namespace name, never fetched
  const W = 600, H = 160, LEFT = 36, BOTTOM = 16, TOP = 8;
  const WINDOW_SECS = 600; // the relay keeps ten minutes

  function uptime(secs) {
    const d = Math.floor(secs / 86400), h = Math.floor(secs / 3600) % 24;
    const m = Math.floor(secs / 60) % 60, s = secs % 60;
    const two = (n) => String(n).padStart(2, "0");
    return d > 0 ? d + "d " + two(h) + "h " + two(m) + "m" : two(h) + ":" + two(m) + ":" + two(s);
  }

  function el(name, attrs, text) {
    const node = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // The newest point at the right edge; a short history starts part-way.
  function line(values, max, cls, span) {
    const n = values.length;
    const step = (W - LEFT) / Math.max(span - 1, 1);
    const points = values.map((v, i) => {
      const x = LEFT + (span - n + i) * step;
      const y = TOP + (H - TOP - BOTTOM) * (1 - v / max);
      return x.toFixed(1) + "," + y.toFixed(1);
    });
    return el("polyline", { class: cls, points: points.join(" ") });
  }

  function drawChart(chart) {
    const box = document.getElementById("chart");
    if (!box || !chart) return;
    const every = chart.interval_secs || 1;
    const perSec = (xs) => (xs || []).map((v) => v / every);
    const accepted = perSec(chart.accepted), delivered = perSec(chart.delivered);
    const peak = Math.max(0, ...accepted, ...delivered);
    // A round top for the scale, at least 1 message per second.
    let max = 1;
    while (max < peak) max *= String(max)[0] === "2" ? 2.5 : 2; // 1, 2, 5, 10, 20, 50 ...
    const svg = el("svg", { viewBox: "0 0 " + W + " " + H, preserveAspectRatio: "none" });
    for (const f of [0, 0.5, 1]) {
      const y = TOP + (H - TOP - BOTTOM) * (1 - f);
      svg.appendChild(el("line", { class: "grid", x1: LEFT, x2: W, y1: y, y2: y }));
      const label = (max * f).toFixed(max * f < 10 && f > 0 ? 1 : 0);
      svg.appendChild(el("text", { class: "axis", x: 2, y: y + 4 }, label));
    }
    const span = Math.max(Math.round(WINDOW_SECS / every), accepted.length);
    const minutes = Math.round((span * every) / 60);
    svg.appendChild(el("text", { class: "axis", x: LEFT, y: H - 2 }, "-" + minutes + " min"));
    svg.appendChild(el("text", { class: "axis", x: W - 26, y: H - 2 }, "now"));
    if (accepted.length > 0) {
      svg.appendChild(line(accepted, max, "accepted", span));
      svg.appendChild(line(delivered, max, "delivered", span));
    }
    box.replaceChildren(svg);
    const peakText = document.getElementById("chart_peak");
    if (peakText) peakText.textContent = "peak " + peak.toFixed(1) + " msg/s";
  }

  function show(status) {
    for (const [key, value] of Object.entries(status)) {
      if (typeof value !== "number") continue;
      const cell = document.getElementById(key);
      if (!cell) continue;
      cell.textContent = key === "uptime_secs" ? uptime(value) : String(value);
      const row = cell.parentElement;
      if (row && row.closest("section:last-child")) row.classList.toggle("nonzero", value > 0);
    }
    drawChart(status.chart);
  }

  function setState(text, stale) {
    const state = document.getElementById("state");
    if (!state) return;
    state.textContent = text;
    state.classList.toggle("stale", stale);
  }

  async function poll() {
    try {
      const answer = await fetch("/status.json", { cache: "no-store" });
      if (!answer.ok) throw new Error("HTTP " + answer.status);
      show(await answer.json());
      setState("Live: updated " + new Date().toLocaleTimeString() + ", every 1.5 s.", false);
    } catch (e) {
      setState("Not updating: the relay did not answer (" + e.message + "); retrying.", true);
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();
