// Time to desktop per phase, per image and per node (GET /stats/time-to-desktop): two tables of p50 / p95 in ms,
// one row per image or node, most connections first.  The dashboard refreshes them with /stats.
import { h, clear, errText } from "./dom.js";

export const TTD_PHASE_WINDOW = "24h";
const PHASE_TITLES = {
  auth: "authentication",
  claim: "taking the desktop and placing its start",
  start: "waiting until it runs",
  agent: "guest to agent answering (cold starts only)",
  display: "the display coming up",
  total: "request to desktop",
};

const ms = (v) => (v == null ? "—" : String(Math.round(v)));

function phaseCell(phase, f) {
  if (!f || f.count === 0) return h("td.num.muted", { "data-phase": phase }, "—");
  return h(
    "td.num",
    { "data-phase": phase, title: `${phase}: p50 ${ms(f.p50)} ms, p95 ${ms(f.p95)} ms over ${f.count} connections` },
    h("span.p50", ms(f.p50)),
    h("span.sep", " / "),
    h("span.p95", ms(f.p95)),
  );
}

function table(label, what, groups, phases, name) {
  return h(
    "div.scroll-x",
    h(
      "table.mini.phases",
      { "aria-label": label },
      h("thead", h("tr", h("th", what), h("th.num", "connections"), phases.map((p) => h("th.num", { title: PHASE_TITLES[p] || p }, p)))),
      h("tbody", groups.map((g) => h("tr", { "data-id": g[`${what}_id`] ?? "" }, h("td", name(g)), h("td.num", String(g.count)), phases.map((p) => phaseCell(p, g.phases[p]))))),
    ),
  );
}

const imageName = (g) => (g.image_id == null ? h("span.muted", "unknown (recorded before images were)") : h("a", { href: `#/images/${g.image_id}` }, `${g.osf} ${g.version}`));
const nodeName = (g) => (g.node_id == null ? h("span.muted", "unknown (recorded before nodes were)") : h("a", { href: `#/nodes/${g.node_id}` }, g.node));

// Fill the two boxes from an answer of /stats/time-to-desktop, or say why there is nothing (no data, an error).
export function renderPhases(byImage, byNode, answer) {
  if (answer instanceof Error) {
    for (const box of [byImage, byNode]) clear(box, h("p.error", errText(answer)));
    return;
  }
  if (!answer.count) {
    const text = `No connection reached a desktop in the last ${answer.window}.`;
    for (const box of [byImage, byNode]) clear(box, h("p.muted.phases-empty", text));
    return;
  }
  clear(byImage, table("Time to desktop by image", "image", answer.by_image, answer.phases, imageName));
  clear(byNode, table("Time to desktop by node", "node", answer.by_node, answer.phases, nodeName));
}
