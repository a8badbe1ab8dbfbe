// Dashboard: /stats counts + uPlot charts, read every 10 s and, debounced, after events.  The activity chart is the
// farm's own history (/stats activity: a sample a minute, kept by the nodes) and the counts of this moment;
// time-to-desktop percentiles come from /stats hourly buckets, their phases per image and per node from
// /stats/time-to-desktop (phases.js), read with /stats.
import uPlot from "uplot";
import { get } from "./api.js";
import { h, clear, fmt, errText } from "./dom.js";
import { onEvent } from "./session.js";
import { renderPhases, TTD_PHASE_WINDOW } from "./phases.js";

const LIVE_WINDOW_S = 600; // the activity axis spans at least the last 10 minutes, up to now
const COUNT_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000]; // whole desktops
const TTD_WINDOW_S = 86400; // time-to-desktop buckets cover the last 24 h (services/stats.py)

// The x range of a time chart: its data, widened to at least [now - window, now].  uPlot's own range for a single
// point is that point + 86,400,000 "ms" in seconds (1,000 days): one refresh drew an axis from 2027 to 2029.
export function timeRange(xs, windowS, nowS = Date.now() / 1000) {
  const first = xs.length ? xs[0] : nowS;
  const last = xs.length ? xs[xs.length - 1] : nowS;
  return [Math.min(first, nowS - windowS), Math.max(last, nowS)];
}

function chartSize(el) {
  const w = Math.max(260, Math.min(el.clientWidth || 600, 900) - 8);
  return { width: w, height: 200 };
}

function expiryClass(d) {
  const at = Math.min(...[d.expire_soft_at, d.expire_hard_at].filter(Boolean).map((x) => Date.parse(x)));
  const left = at - Date.now();
  return left < 3600e3 ? "exp-red" : left < 6 * 3600e3 ? "exp-amber" : "exp-green";
}

export function dashboard(root) {
  performance.mark("wat:dashboard:start");
  const counts = h("div.counts");
  const live = h("div.chart", { id: "chart-live", role: "img", "aria-label": "Running desktops, connected users and running nodes over time" });
  const ttd = h("div.chart", { id: "chart-ttd", role: "img", "aria-label": "Time to desktop percentiles per hour" });
  // what an empty farm honestly shows instead of a chart of nothing
  const liveEmpty = h("p.muted.chart-empty", { id: "chart-live-empty", hidden: true }, "This farm has no nodes and no desktops yet: nothing to chart. Start a node (deckard node) and create desktops.");
  const ttdEmpty = h("p.muted.chart-empty", { id: "chart-ttd-empty", hidden: true }, "No connections in the last 24 h.");
  const byImage = h("div", { id: "ttd-by-image" });
  const byNode = h("div", { id: "ttd-by-node" });
  const busiest = h("div");
  const expiry = h("div");
  const blocked = h("div");
  clear(
    root,
    h("h1", "Dashboard"),
    counts,
    h("div.grid", h("section.card", h("h2", "Activity"), live, liveEmpty), h("section.card", h("h2", "Time to desktop (ms)"), ttd, ttdEmpty)),
    h("section.card", h("h2", `Time to desktop by image, p50 / p95 ms per phase (${TTD_PHASE_WINDOW})`), byImage),
    h("section.card", h("h2", `Time to desktop by node, p50 / p95 ms per phase (${TTD_PHASE_WINDOW})`), byNode),
    h("div.grid", h("section.card", h("h2", "Busiest nodes"), busiest), h("section.card", h("h2", "Desktops near expiry"), expiry), h("section.card", h("h2", "Blocked"), blocked)),
  );

  let plotLive = null, plotTtd = null;
  const drawn = new Set(); // "live", "ttd": drawn as a chart or as an empty state
  const markDrawn = (which) => {
    if (drawn.size === 2 || drawn.has(which)) return;
    drawn.add(which);
    if (drawn.size === 2) {
      performance.mark("wat:dashboard:drawn");
      document.body.dataset.dashboard = "drawn";
    }
  };

  // the time axis drawn (seconds), for the browser test: an empty or one-point chart must be around now
  const drew = (u, box, which) => {
    box.dataset.xRange = `${u.scales.x.min},${u.scales.x.max}`;
    markDrawn(which);
  };

  // the farm's samples (null in a step nothing was sampled: a gap) and, last, the counts of this moment
  function liveData(s, now) {
    const pts = [...s.activity.points.map((p) => ({ ...p, t: Date.parse(p.at) / 1000 })), { t: Date.parse(s.at) / 1000, ...now }];
    return [pts.map((p) => p.t), pts.map((p) => p.running), pts.map((p) => p.connected), pts.map((p) => p.nodes)];
  }

  function render(s) {
    const st = s.desktops.by_state || {};
    const nodesRunning = (s.nodes.by_state || {}).running || 0;
    const card = (label, value, sub) => h("div.count", h("span.value", String(value)), h("span.label", label), sub ? h("span.sub", sub) : "");
    clear(
      counts,
      card("desktops", s.desktops.total, Object.entries(st).map(([k, v]) => `${v} ${k}`).join(" · ")),
      card("running desktops", st.running || 0),
      card("users", s.users.total, `${s.users.connected} connected`),
      card("nodes", s.nodes.total, `${nodesRunning} running`),
      card("time to desktop p50 (24 h)", s.time_to_desktop_ms.last_24h.p50 == null ? "—" : `${s.time_to_desktop_ms.last_24h.p50} ms`, `${s.time_to_desktop_ms.last_24h.count} connections`),
    );
    const activity = liveData(s, { running: st.running || 0, connected: s.users.connected || 0, nodes: nodesRunning });

    const hourly = s.time_to_desktop_ms.hourly || [];
    const ttdData = [hourly.map((b) => Date.parse(b.hour) / 1000), hourly.map((b) => b.p50), hourly.map((b) => b.p90), hourly.map((b) => b.p99)];
    const emptyFarm = s.desktops.total === 0 && s.nodes.total === 0;
    // points drawn where there is room for them (uPlot's default): a young farm's few samples, not a day's
    plotLive = showChart(live, liveEmpty, emptyFarm, plotLive, activity, () => new uPlot(
      { ...chartSize(live), series: [{}, { label: "running desktops", stroke: "#2a7ae2", width: 2 }, { label: "connected users", stroke: "#1b9e4b", width: 2 }, { label: "running nodes", stroke: "#b35c00", dash: [6, 4] }], axes: [{}, { label: "count", incrs: COUNT_STEPS }], scales: { x: { time: true, range: (u) => timeRange(u.data[0], LIVE_WINDOW_S) }, y: { range: (u, mn, mx) => [0, Math.max(1, mx)] } }, hooks: { draw: [(u) => drew(u, live, "live")] } },
      activity,
      live,
    ), "live");
    plotTtd = showChart(ttd, ttdEmpty, hourly.length === 0, plotTtd, ttdData, () => new uPlot(
      { ...chartSize(ttd), series: [{}, { label: "p50", stroke: "#2a7ae2", points: { show: true } }, { label: "p90", stroke: "#d08700", points: { show: true } }, { label: "p99", stroke: "#c62828", points: { show: true } }], axes: [{}, { label: "ms" }], scales: { x: { time: true, range: (u) => timeRange(u.data[0], TTD_WINDOW_S) }, y: { range: (u, mn, mx) => [0, Math.max(100, (mx ?? 0) * 1.15)] } }, hooks: { draw: [(u) => drew(u, ttd, "ttd")] } },
      ttdData,
      ttd,
    ), "ttd");

    clear(
      busiest,
      s.busiest_nodes.length
        ? h("table.mini", h("thead", h("tr", h("th", "node"), h("th", "desktops"), h("th", "load"), h("th", "state"))), h("tbody", s.busiest_nodes.map((n) => h("tr", h("td", h("a", { href: `#/nodes/${n.id}` }, n.name)), h("td", n.desktops), h("td", fmt(n.load)), h("td", h(`span.badge.s-${n.state}`, n.state))))))
        : h("p.muted", "No nodes."),
    );
    clear(
      expiry,
      s.near_expiry.length
        ? h("ul.expiry", s.near_expiry.map((d) => h(`li.${expiryClass(d)}`, h("a", { href: `#/desktops/${d.id}` }, d.name), ` ${d.state} — soft ${fmt(d.expire_soft_at) || "—"}, hard ${fmt(d.expire_hard_at) || "—"}`)))
        : h("p.muted", "No desktop expires within 24 h."),
    );
    clear(
      blocked,
      h(
        "ul.blocked",
        h("li", h("a", { href: "#/desktops?blocked=true" }, `${s.desktops.blocked} desktops`)),
        h("li", h("a", { href: "#/users?blocked=true" }, `${s.users.blocked} users`)),
        h("li", h("a", { href: "#/nodes?blocked=true" }, `${s.nodes.blocked} nodes`)),
      ),
    );
  }

  // the chart, or its empty state when there is nothing to draw; the plot is made when first needed
  function showChart(box, empty, isEmpty, plot, data, make, which) {
    box.hidden = isEmpty;
    empty.hidden = !isEmpty;
    if (isEmpty) {
      markDrawn(which);
      return plot;
    }
    if (!plot) return make();
    plot.setData(data);
    plot.setSize(chartSize(box)); // it may have been hidden when the window was resized
    return plot;
  }

  let busy = false;
  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const [s, phases] = await Promise.all([get("/stats"), get(`/stats/time-to-desktop?window=${TTD_PHASE_WINDOW}`).catch((e) => e)]);
      render(s);
      renderPhases(byImage, byNode, phases);
    } catch (e) {
      clear(counts, h("p.error", errText(e)));
    } finally {
      busy = false;
    }
  }
  refresh();
  const timer = setInterval(refresh, 10000);
  let debounce = null;
  const off = onEvent((ev) => {
    if (ev.type === "state" || ev.object === "desktop" || ev.object === "node" || ev.object === "user") {
      clearTimeout(debounce);
      debounce = setTimeout(refresh, 2000);
    }
  });
  const onResize = () => {
    if (plotLive) plotLive.setSize(chartSize(live));
    if (plotTtd) plotTtd.setSize(chartSize(ttd));
  };
  window.addEventListener("resize", onResize);
  return () => {
    clearInterval(timer);
    clearTimeout(debounce);
    off();
    window.removeEventListener("resize", onResize);
  };
}
