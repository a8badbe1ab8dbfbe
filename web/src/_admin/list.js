// A generic list page: column filters, sort by header, chosen columns, paging, multi-select + bulk actions,
// live row updates from the event stream.
import { api, get, post, del, qs } from "./api.js";
import { h, clear, fmt, toast, errText, uid } from "./dom.js";
import { can, onEvent } from "./session.js";
import { actionAcl } from "./resources.js";

const colsKey = (name) => `deckard.admin.columns.${name}`;

export function listPage(root, name, res, params) {
  const chosen = JSON.parse(localStorage.getItem(colsKey(name)) || "null") || res.defaultColumns;
  const state = {
    sort: params.get("sort") || res.defaultSort || "id",
    page: Number(params.get("page") || 1),
    perPage: Number(localStorage.getItem("deckard.admin.per_page") || 50),
    filters: {},
    cols: chosen.filter((c) => res.columns.includes(c)),
    selected: new Set(),
    rows: [],
    total: 0,
  };
  for (const [k, v] of params) if (!["sort", "page"].includes(k)) state.filters[k] = v;

  const canSee = can(actionAcl(res, "see"));
  const caption = (row) => (res.caption ? res.caption(row) : row[res.label] ?? row.id);
  const title = (c) => res.headers?.[c] ?? c.replaceAll("_", " ");
  const bulkActions = (res.bulk || []).filter((a) => can(actionAcl(res, a)));
  const table = h("table.list", { "aria-label": res.title });
  const info = h("span.total", { "aria-live": "polite" });
  const results = h("div.bulk-results", { "aria-live": "polite" });
  const bulkBar = h("div.bulkbar", { role: "toolbar", "aria-label": "Bulk actions" });
  const pager = h("nav.pager", { "aria-label": "Pages" });

  function query() {
    const q = { sort: state.sort, page: state.page, per_page: state.perPage };
    for (const [k, v] of Object.entries(state.filters)) {
      if (v === "") continue;
      if (k.includes("__") || k === "user" || res.filters?.[k] || res.numeric?.includes(k)) q[k] = v;
      else q[`${k}__contains`] = v;
    }
    return q;
  }

  async function load() {
    try {
      const data = await get(res.path + qs(query()));
      state.rows = data.items;
      state.total = data.total;
      render();
    } catch (e) {
      toast(errText(e), "error");
    }
  }

  function header() {
    const tr = h("tr");
    if (bulkActions.length) {
      const all = h("input", { type: "checkbox", "aria-label": "Select all rows on this page" });
      all.checked = state.rows.length > 0 && state.rows.every((r) => state.selected.has(r.id));
      all.addEventListener("change", () => {
        for (const r of state.rows) all.checked ? state.selected.add(r.id) : state.selected.delete(r.id);
        render();
      });
      tr.append(h("th.sel", all));
    }
    for (const c of state.cols) {
      if (res.computed?.includes(c)) {
        tr.append(h("th", { scope: "col" }, h("span.sort", title(c))));
        continue;
      }
      const dir = state.sort === c ? "ascending" : state.sort === `-${c}` ? "descending" : "none";
      const b = h("button.sort", { type: "button", onclick: () => sortBy(c) }, title(c), h("span.arrow", { "aria-hidden": "true" }, dir === "ascending" ? " ▲" : dir === "descending" ? " ▼" : ""));
      tr.append(h("th", { scope: "col", "aria-sort": dir }, b));
    }
    tr.append(h("th", { scope: "col" }, h("span.sr-only", "Actions")));
    const fr = h("tr.filters");
    if (bulkActions.length) fr.append(h("td"));
    for (const c of state.cols) {
      let input;
      const label = `Filter ${title(c)}`;
      if (res.filters?.[c]) {
        input = h("select", { "aria-label": label, name: `filter-${c}` }, h("option", { value: "" }, "any"), res.filters[c].map((v) => h("option", { value: v }, v)));
      } else if (/_at$|^arguments$|^tags$|^roles$|^inherits$/.test(c) || res.computed?.includes(c)) {
        fr.append(h("td"));
        continue;
      } else {
        input = h("input", { type: "search", "aria-label": label, name: `filter-${c}`, placeholder: "filter" });
      }
      input.value = state.filters[c] ?? "";
      input.addEventListener("change", () => {
        state.filters[c] = input.value.trim();
        state.page = 1;
        load();
      });
      fr.append(h("td", input));
    }
    fr.append(h("td"));
    return h("thead", tr, fr);
  }

  function cell(row, c) {
    const own = res.cell?.(row, c);
    if (own !== undefined) return own;
    const v = row[c];
    if (c === res.label && !res.readOnly) return h("a", { href: `#/${name}/${row.id}` }, fmt(v) || `#${row.id}`);
    if (c === "id" && !res.readOnly) return h("a", { href: `#/${name}/${row.id}` }, String(v));
    if (c === "network") return row.network_id != null ? h("a", { href: `#/networks/${row.network_id}` }, fmt(v)) : h("span.muted", "farm default");
    if (c === "state" || c === "user_state" || c === "result") return h(`span.badge.s-${v}`, fmt(v));
    if (c === "blocked" && v) return h("span.badge.s-blocked", "blocked");
    // a fence that failed leaves the node's desktops unavailable: say so where the operator looks
    if (c === "lost_reason" && v && v.startsWith("fencing failed")) return h("span.badge.s-fence-failed", { title: v }, v);
    if (c === "id" && name === "audit") return h("span", { id: `audit-${v}` }, String(v));
    return fmt(v);
  }

  function rowEl(row) {
    const tr = h("tr", { dataset: { id: row.id } });
    if (bulkActions.length) {
      const cb = h("input", { type: "checkbox", "aria-label": `Select ${caption(row)}` });
      cb.checked = state.selected.has(row.id);
      cb.addEventListener("change", () => {
        cb.checked ? state.selected.add(row.id) : state.selected.delete(row.id);
        renderBulk();
      });
      tr.append(h("td.sel", cb));
    }
    for (const c of state.cols) tr.append(h("td", { dataset: { col: c, label: title(c) } }, cell(row, c)));
    const acts = h("td.row-actions");
    if (name === "desktops" && can("desktop.spy") && row.state === "running")
      acts.append(h("a.spy", { href: `/admin/spy?desktop=${row.id}` }, "Spy"));
    else if (name === "desktops" && can("desktop.spy")) acts.append(h("a.spy", { href: `/admin/spy?desktop=${row.id}`, title: "The desktop is not running" }, "Spy"));
    tr.append(acts);
    return tr;
  }

  function renderBulk() {
    clear(bulkBar);
    if (!bulkActions.length) return;
    const n = state.selected.size;
    bulkBar.append(h("span", `${n} selected`));
    for (const a of bulkActions) {
      bulkBar.append(
        h(`button.bulk${a === "delete" ? ".danger" : ""}`, { type: "button", disabled: n === 0, dataset: { action: a }, onclick: () => bulk(a) }, a[0].toUpperCase() + a.slice(1)),
      );
    }
  }

  function render() {
    const body = h("tbody", state.rows.map(rowEl));
    if (!state.rows.length) body.append(h("tr", h("td.empty", { colspan: state.cols.length + 2 }, "Nothing matches.")));
    clear(table, header(), body);
    const pages = Math.max(1, Math.ceil(state.total / state.perPage));
    info.textContent = `${state.total} in total`;
    clear(
      pager,
      h("button", { type: "button", disabled: state.page <= 1, onclick: () => go(state.page - 1) }, "‹ Previous"),
      h("span", ` page ${state.page} of ${pages} `),
      h("button", { type: "button", disabled: state.page >= pages, onclick: () => go(state.page + 1) }, "Next ›"),
    );
    renderBulk();
  }

  const go = (p) => ((state.page = p), load());
  function sortBy(c) {
    state.sort = state.sort === c ? `-${c}` : c;
    load();
  }

  async function bulk(action) {
    const ids = [...state.selected];
    if (action === "delete" && !confirm(`Delete ${ids.length} ${res.title.toLowerCase()}?`)) return;
    let out;
    if (res.serverBulk) {
      try {
        out = await post(`${res.path}/bulk/${action}`, { ids });
      } catch (e) {
        out = { ok: [], failed: Object.fromEntries(ids.map((i) => [i, { code: e.code, message: e.message }])) };
      }
    } else {
      out = { ok: [], failed: {} };
      await Promise.all(
        ids.map(async (id) => {
          try {
            await (action === "delete" ? del(`${res.path}/${id}`) : post(`${res.path}/${id}/${action}`));
            out.ok.push(id);
          } catch (e) {
            out.failed[id] = { code: e.code, message: e.message };
          }
        }),
      );
    }
    showResults(action, ids, out);
    state.selected.clear();
    load();
  }

  function showResults(action, ids, out) {
    const names = Object.fromEntries(state.rows.map((r) => [r.id, caption(r)]));
    const failed = Object.keys(out.failed || {}).length;
    clear(
      results,
      h("h3", `${action}: ${out.ok.length} ok, ${failed} failed`),
      h(
        "ul",
        ids.map((id) => {
          const f = out.failed[id] || out.failed[String(id)];
          return f
            ? h("li.failed", { dataset: { id } }, `#${id} ${names[id] ?? ""} — failed `, h("code", f.code), `: ${f.message}`)
            : h("li.ok", { dataset: { id } }, `#${id} ${names[id] ?? ""} — ok`);
        }),
      ),
      h("button", { type: "button", onclick: () => clear(results) }, "Dismiss"),
    );
  }

  function columnChooser() {
    const boxes = res.columns.map((c) => {
      const cb = h("input", { type: "checkbox", id: uid("col"), value: c });
      cb.checked = state.cols.includes(c);
      cb.addEventListener("change", () => {
        state.cols = res.columns.filter((x) => x === c ? cb.checked : state.cols.includes(x));
        localStorage.setItem(colsKey(name), JSON.stringify(state.cols));
        render();
      });
      return h("label.check", cb, title(c));
    });
    return h("details.columns", h("summary", "Columns"), h("div", boxes));
  }

  const perPage = h("select", { "aria-label": "Rows per page" }, [20, 50, 100, 200].map((n) => h("option", { value: n, selected: n === state.perPage }, n)));
  perPage.addEventListener("change", () => {
    state.perPage = Number(perPage.value);
    localStorage.setItem("deckard.admin.per_page", perPage.value);
    state.page = 1;
    load();
  });

  const tools = h("div.tools", info, columnChooser(), h("label.inline", "Rows ", perPage));
  if (res.create && can(actionAcl(res, "create"))) tools.prepend(h("a.button.primary.create", { href: `#/${name}/new` }, "Create"));
  if (name === "audit" && can("audit.verify")) tools.prepend(verifyButton());
  clear(root, h("h1", res.title), tools, results, bulkBar, h("div.table-wrap", table), pager);
  if (!canSee) root.append(h("p", "You may not see these objects."));
  else load();

  // live updates: patch rows in place on state events, re-read the page (debounced) on other changes
  let timer = null;
  const reload = () => {
    clearTimeout(timer);
    timer = setTimeout(load, 300);
  };
  const stop = onEvent((ev) => {
    if (ev.object !== res.object) return;
    const i = state.rows.findIndex((r) => r.id === ev.id);
    if (ev.type === "state" && i >= 0) {
      const row = { ...state.rows[i] };
      for (const k of ["state", "cmd", "user_state", "blocked", "node_id"]) if (k in ev) row[k] = ev[k];
      state.rows[i] = row;
      const old = table.querySelector(`tbody tr[data-id="${ev.id}"]`);
      if (old) old.replaceWith(rowEl(row));
      reload(); // refresh derived columns (node name…) too
    } else reload();
  });
  // what changes without an event (a warm pool's guests): re-read every res.poll ms, unless the tab is hidden or
  // the user is in the table (typing a filter: a redraw would drop it)
  const poll = res.poll && canSee ? setInterval(() => document.hidden || table.contains(document.activeElement) || load(), res.poll) : null;
  return () => {
    stop();
    clearInterval(poll);
    clearTimeout(timer);
  };
}

function verifyButton() {
  const out = h("span.verify-result", { role: "status" });
  const b = h("button.verify", { type: "button" }, "Verify chain");
  b.addEventListener("click", async () => {
    out.textContent = "checking…";
    try {
      const v = await get("/audit/verify");
      out.className = `verify-result ${v.ok ? "ok" : "bad"}`;
      out.textContent = v.ok ? `Chain ok: ${v.checked} records checked` : `Chain broken at record #${v.first_broken_id}: ${v.reason} (${v.checked} checked)`;
    } catch (e) {
      out.textContent = errText(e);
    }
  });
  return h("span.verify-box", b, out);
}
export { api };
