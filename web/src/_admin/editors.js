// Role editor (ACL tree with positive/negative grants and inheritance) and config editor.
import { get, patch, put, del, qs } from "./api.js";
import { h, clear, toast, errText, field, fmt } from "./dom.js";
import { can, isSuper } from "./session.js";

export async function rolePage(root, id) {
  clear(root, h("p", h("a", { href: "#/roles" }, "← Roles")), h("p", "Loading…"));
  let role, catalogue, roles;
  try {
    [role, catalogue, roles] = await Promise.all([get(`/roles/${id}`), get("/acls"), get("/roles?per_page=1000")]);
  } catch (e) {
    return clear(root, h("p.error", errText(e)));
  }
  const editable = can("role.update") && !role.fixed;
  const grants = new Map(role.grants.map((g) => [g.acl, g.positive]));
  const inherits = new Set(role.inherits);
  const byName = Object.fromEntries(roles.items.map((r) => [r.name, r]));
  const fromParents = () => {
    const s = new Map();
    for (const p of inherits) for (const a of byName[p]?.acls || []) if (!s.has(a)) s.set(a, p);
    return s;
  };

  const tree = h("div.acl-tree");
  const patterns = h("ul.patterns");
  const save = h("button.primary", { type: "button", hidden: !editable }, "Save role");
  const err = h("p.error", { role: "alert" });

  function effective(acl, parents) {
    // what the role would hold: explicit grant, else a matching pattern grant, else inherited; a negative wins
    let pos = false, neg = false, why = "";
    for (const [g, positive] of grants) {
      if (g === acl || (g.includes("*") && new RegExp(`^${g.replace(/[.+?^${}()|[\]\\]/g, "\\$&").replaceAll("*", ".*")}$`).test(acl))) {
        if (positive) (pos = true), (why ||= g === acl ? "granted" : `pattern ${g}`);
        else (neg = true), (why = g === acl ? "denied" : `denied by ${g}`);
      }
    }
    if (!pos && parents.has(acl)) (pos = true), (why = `inherited from ${parents.get(acl)}`);
    return { on: pos && !neg, why: why || "not granted" };
  }

  function render() {
    const parents = fromParents();
    const groups = {};
    for (const a of catalogue.items) (groups[a.object] ||= []).push(a);
    clear(
      tree,
      Object.entries(groups).map(([obj, acls]) => {
        const on = acls.filter((a) => effective(a.name, parents).on).length;
        return h(
          "details.acl-group",
          { open: obj === "desktop" },
          h("summary", `${obj} `, h("span.acl-count", `${on}/${acls.length}`)),
          h(
            "ul",
            acls.map((a) => {
              const eff = effective(a.name, parents);
              const cur = grants.has(a.name) ? (grants.get(a.name) ? "+" : "-") : "";
              const sel = h(
                "select",
                { "aria-label": `Grant for ${a.name}`, disabled: !editable, name: a.name },
                h("option", { value: "", selected: cur === "" }, "—"),
                h("option", { value: "+", selected: cur === "+" }, "allow"),
                h("option", { value: "-", selected: cur === "-" }, "deny"),
              );
              sel.addEventListener("change", () => {
                if (sel.value === "") grants.delete(a.name);
                else grants.set(a.name, sel.value === "+");
                render();
              });
              return h(`li.acl.${eff.on ? "on" : "off"}`, h("span.acl-name", a.name, a.gated_field ? h("small", " (field)") : ""), sel, h("span.why", eff.on ? `✔ ${eff.why}` : `✘ ${eff.why}`));
            }),
          ),
        );
      }),
    );
    clear(
      patterns,
      [...grants].filter(([g]) => g.includes("*")).map(([g, p]) =>
        h("li", h("code", `${p ? "+" : "−"} ${g}`), editable ? h("button", { type: "button", "aria-label": `Remove ${g}`, onclick: () => (grants.delete(g), render()) }, "Remove") : ""),
      ),
    );
  }

  const pat = h("input", { name: "pattern", placeholder: "desktop.* or *.see" });
  const neg = h("input", { type: "checkbox", name: "negative" });
  const addPat = h(
    "form.inline-form",
    { hidden: !editable },
    field("Pattern", pat),
    h("label.check", neg, "deny"),
    h("button", { type: "submit" }, "Add grant"),
  );
  addPat.addEventListener("submit", (e) => {
    e.preventDefault();
    if (pat.value.trim()) grants.set(pat.value.trim(), !neg.checked);
    pat.value = "";
    render();
  });

  const inh = h(
    "fieldset.inherits",
    h("legend", "Inherits"),
    roles.items
      .filter((r) => r.name !== role.name)
      .map((r) => {
        const cb = h("input", { type: "checkbox", value: r.name, disabled: !editable });
        cb.checked = inherits.has(r.name);
        cb.addEventListener("change", () => (cb.checked ? inherits.add(r.name) : inherits.delete(r.name), render()));
        return h("label.check", cb, r.name);
      }),
  );

  save.addEventListener("click", async () => {
    try {
      role = await patch(`/roles/${role.id}`, { grants: [...grants].map(([acl, positive]) => ({ acl, positive })), inherits: [...inherits] });
      err.textContent = "";
      toast("Role saved");
    } catch (e) {
      err.textContent = errText(e);
    }
  });

  clear(
    root,
    h("p", h("a", { href: "#/roles" }, "← Roles")),
    h("h1", `Role ${role.name}`),
    h("p", role.description || "", role.fixed ? h("strong", " (predefined: read-only)") : ""),
    h("div.role-editor", inh, h("section", h("h2", "Pattern grants"), patterns, addPat), h("section", h("h2", "ACLs"), tree)),
    err,
    h("div.buttons", save),
  );
  render();
}

export async function configPage(root) {
  const tenant = h("input", { name: "tenant", placeholder: "(global)" });
  // an OSF's layer: the keys that may differ per OSF (egress and session policies) for that OSF's desktops
  const osf = h("input", { name: "osf", placeholder: "(none)" });
  const table = h("table.list.config", { "aria-label": "Configuration" });
  const writable = can("config.update");
  const layer = () => ({ tenant: tenant.value.trim(), osf: osf.value.trim() });
  async function load() {
    try {
      const data = await get(`/config${qs(layer())}`);
      const items = layer().osf ? data.items.filter((c) => c.per_osf) : data.items;
      clear(
        table,
        h("thead", h("tr", ["key", "value", "default", "source", "description", ""].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", items.map(row)),
      );
    } catch (e) {
      toast(errText(e), "error");
    }
  }
  function row(c) {
    let input;
    if (c.type === "bool") {
      input = h("select", { "aria-label": `Value of ${c.key}`, disabled: !writable }, h("option", { value: "true", selected: c.value === true }, "true"), h("option", { value: "false", selected: c.value === false }, "false"));
    } else if (c.secret) {
      // a password: never shown, never sent back; type a new one to change it
      input = h("input", { "aria-label": `Value of ${c.key}`, type: "password", autocomplete: "new-password", placeholder: c.value ? "(set: type a new one)" : "", disabled: !writable });
    } else if (c.key === "network.egress") {
      // an ordered rule list reads best one rule per line
      input = h("textarea", { "aria-label": `Value of ${c.key}`, rows: 4, spellcheck: false, disabled: !writable });
      input.value = String(c.value ?? "").split(/;\s*/).filter(Boolean).join("\n");
    } else input = h("input", { "aria-label": `Value of ${c.key}`, value: fmt(c.value), type: c.type === "int" || c.type === "float" ? "number" : "text", disabled: !writable });
    const parse = () => (c.type === "bool" ? input.value === "true" : c.type === "int" ? parseInt(input.value, 10) : c.type === "float" ? Number(input.value) : input.value);
    const body = () => Object.fromEntries(Object.entries(layer()).filter(([, v]) => v));
    const acts = h("td.row-actions");
    if (writable) {
      acts.append(
        h("button", { type: "button", onclick: async () => { try { await put(`/config/${c.key}`, { value: parse(), ...body() }); toast(`${c.key} set`); load(); } catch (e) { toast(errText(e), "error"); } } }, "Set"),
        h("button", { type: "button", disabled: c.source === "default", onclick: async () => { try { await del(`/config/${c.key}${qs(layer())}`); toast(`${c.key} reset`); load(); } catch (e) { toast(errText(e), "error"); } } }, "Reset"),
      );
    }
    return h("tr", { dataset: { key: c.key } }, h("th", { scope: "row" }, h("code", c.key), c.per_osf ? h("small", " per tenant and OSF") : c.per_tenant ? h("small", " per tenant") : ""), h("td", input), h("td", fmt(c.default)), h("td", h(`span.badge.src-${c.source}`, c.source)), h("td.desc", c.description), acts);
  }
  tenant.addEventListener("change", load);
  osf.addEventListener("change", load);
  const tools = h("div.tools", isSuper() ? field("Tenant layer", tenant) : "", field("OSF layer", osf));
  clear(root, h("h1", "Configuration"), tools, h("div.table-wrap", table));
  load();
}
