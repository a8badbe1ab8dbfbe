// Tenant networks in the WAT (docs/networking.md, "Tenant networks"): the create form, a shared network's grants,
// and the network select of OSF and desktop forms.  The API checks ranges, overlaps and who may use what; these
// forms show its answers next to the field they are about.
import { get, post, del } from "./api.js";
import { h, clear, toast, errText, field, fieldError, showFieldError } from "./dom.js";
import { can, isSuper } from "./session.js";

// a select's values: a network's id, DEFAULT_NETWORK ("": the API's name for the farm's default network), or
// INHERITED (send nothing: a new desktop takes its OSF's network)
const DEFAULT_NETWORK = "";
const INHERITED = "inherited";

// which field of the form an error code is about; any other error is shown under the whole form
const FIELD_OF = {
  bad_network_range: "range",
  network_overlap: "range",
  bad_name: "name",
  duplicate: "name",
  tenant_not_found: "tenant",
};
// which of a flat network's fields its refusal (422 bad_flat_network) is about: its message names it
const flatField = (message) => (/gateway/i.test(message) ? "gateway" : /VLAN/.test(message) ? "vlan" : "interface");
// the farm's own kinds: no tenant owns them, the farm's administrators grant them to tenants
const FARM_KINDS = ["shared", "flat"];
export const farmOwned = (net) => FARM_KINDS.includes(net.kind);

export function networkCreatePage(root) {
  const name = h("input", { name: "name", required: true, autocomplete: "off" });
  const range = h("input", { name: "range", required: true, autocomplete: "off", placeholder: "10.50.0.0/24", spellcheck: false });
  const description = h("input", { name: "description", autocomplete: "off" });
  const kind = h(
    "select",
    { name: "kind" },
    h("option", { value: "private" }, "private: one tenant's"),
    h("option", { value: "shared" }, "shared: the farm's, for the tenants it is granted to"),
    h("option", { value: "flat" }, "flat: a network of the machines' own (a node interface or VLAN)"),
  );
  const tenant = h("input", { name: "tenant", autocomplete: "off", placeholder: "default" });
  // flat networks: where the desktops are plugged in, and their router
  const iface = h("input", { name: "interface", autocomplete: "off", placeholder: "eth1", spellcheck: false, maxlength: 15 });
  const vlan = h("input", { name: "vlan", type: "number", min: 1, max: 4094, placeholder: "none: untagged" });
  const gateway = h("input", { name: "gateway", autocomplete: "off", placeholder: "the range's first address", spellcheck: false });
  const inputs = { name, range, tenant, interface: iface, vlan, gateway };
  const errors = {};
  const form = h("form.card", { "aria-label": "Create network" });
  for (const [label, input, hint] of [
    ["name", name],
    ["range", range, "IPv4 CIDR from /16 to /28 in 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 or 100.64.0.0/10"],
  ]) {
    errors[input.name] = fieldError(input);
    form.append(field(label, input), hint ? h("small.muted.hint", hint) : "", errors[input.name]);
  }
  if (isSuper()) {
    errors.tenant = fieldError(tenant);
    for (const input of [iface, vlan, gateway]) errors[input.name] = fieldError(input);
    const flat = h(
      "fieldset.flat",
      { hidden: true },
      h("legend", "Flat network"),
      field("interface", iface),
      h("small.muted.hint", "The node interface the desktops are bridged to; a node without it cannot run them."),
      errors.interface,
      field("VLAN tag", vlan),
      errors.vlan,
      field("gateway", gateway),
      errors.gateway,
    );
    const tenantField = field("tenant (private networks)", tenant);
    const shown = () => {
      tenant.disabled = kind.value !== "private";
      tenantField.hidden = kind.value !== "private";
      flat.hidden = kind.value !== "flat";
      iface.required = kind.value === "flat";
    };
    kind.addEventListener("change", shown);
    form.append(field("kind", kind), tenantField, errors.tenant, flat);
  }
  form.append(field("description", description));
  const err = h("p.error", { role: "alert" });
  form.append(err, h("div.buttons", h("button.primary", { type: "submit" }, "Create"), h("a.button", { href: "#/networks" }, "Cancel")));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    for (const [k, p] of Object.entries(errors)) showFieldError(inputs[k], p, "");
    err.textContent = "";
    const body = { name: name.value.trim(), range: range.value.trim() };
    if (description.value.trim()) body.description = description.value.trim();
    if (kind.value !== "private") body.kind = kind.value;
    else if (tenant.value.trim()) body.tenant = tenant.value.trim();
    if (kind.value === "flat") {
      body.interface = iface.value.trim();
      if (vlan.value.trim()) body.vlan = Number(vlan.value);
      if (gateway.value.trim()) body.gateway = gateway.value.trim();
    }
    try {
      const net = await post("/networks", body);
      toast(`network ${net.name} created`);
      location.hash = `#/networks/${net.id}`;
    } catch (ex) {
      const at = ex.code === "bad_flat_network" ? flatField(ex.message || "") : FIELD_OF[ex.code];
      if (at && errors[at]) showFieldError(inputs[at], errors[at], errText(ex));
      else err.textContent = errText(ex);
    }
  });
  clear(root, h("p", h("a", { href: "#/networks" }, "← Networks")), h("h1", "New network"), form);
  name.focus();
}

// A shared or flat network's box: the tenants it is granted to with Revoke, and a Grant form (farm's
// administrators only; a tenant administrator sees only whether its own tenant is granted).
export function networkBoxes(net, reload) {
  if (!farmOwned(net)) return [];
  const manage = isSuper() && can("network.update");
  const err = h("p.error", { role: "alert" });
  const base = `/networks/${net.id}/grants`;
  async function run(what, call) {
    err.textContent = "";
    try {
      await call();
      toast(`${what}: ok`);
      reload();
    } catch (e) {
      err.textContent = errText(e);
    }
  }
  const granted = net.tenants || [];
  const box = h(
    "section.card",
    { "aria-label": "Grants" },
    h("h2", "Granted to"),
    granted.length
      ? h(
          "table.mini",
          { "aria-label": "Tenants granted" },
          h("thead", h("tr", h("th", "Tenant"), h("th", h("span.sr-only", "Actions")))),
          h(
            "tbody",
            granted.map((t) =>
              h(
                "tr",
                { dataset: { tenant: t } },
                h("td", t),
                h("td.row-actions", manage && h("button", { type: "button", onclick: () => run(`revoke from ${t}`, () => del(`${base}/${encodeURIComponent(t)}`)) }, "Revoke")),
              ),
            ),
          ),
        )
      : h("p", "No tenant may use it yet."),
    err,
  );
  if (manage) {
    const tenant = h("input", { name: "grant-tenant", required: true, autocomplete: "off" });
    const form = h("form.inline-form", { "aria-label": "Grant" }, field("Tenant (name or id)", tenant), h("button.primary", { type: "submit" }, "Grant"));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      run(`grant to ${tenant.value.trim()}`, () => post(base, { tenant: tenant.value.trim() }));
    });
    box.append(form);
  }
  return [box];
}

// The networks a tenant's OSFs and desktops may be on: its private ones and the shared and flat ones granted to it.  A
// tenant administrator sees only those; the farm's administrators see all, so they are picked here by tenant.
async function networksFor(tenantId) {
  const all = (await get("/networks?per_page=1000&sort=name")).items;
  if (!isSuper() || tenantId == null) return all;
  let tenant;
  try {
    tenant = (await get(`/tenants/${tenantId}`)).name;
  } catch {
    return all; // no tenant.see: offer all, the API refuses the others (network_not_found)
  }
  return all.filter((n) => n.tenant_id === tenantId || (farmOwned(n) && (n.tenants || []).includes(tenant)));
}

function optionLabel(n, whose) {
  const owner = n.kind === "flat" ? `flat on ${n.interface}${n.vlan ? `.${n.vlan}` : ""}` : n.kind === "shared" ? "shared" : whose ? `tenant ${n.tenant}` : "";
  return `${n.name} (${[n.range, owner].filter(Boolean).join(", ")})`;
}

// A select of networks for the form field `name`.  `current` ({id, name} or null: the default network) is
// selected; `tenantId` narrows the choice to that tenant's networks (unknown on create forms: the farm's
// administrators then see every network with its owner); `inherited` adds a first choice that sends nothing.
export function networkSelect(name, { current = null, tenantId = null, inherited = null } = {}) {
  const keep = current ? String(current.id) : inherited ? INHERITED : DEFAULT_NETWORK;
  const fixed = () => [inherited && h("option", { value: INHERITED }, inherited), h("option", { value: DEFAULT_NETWORK }, "the farm's default network")];
  const sel = h("select", { name, dataset: { kind: "network", loaded: "no" } }, fixed(), current && h("option", { value: String(current.id) }, current.name));
  sel.value = keep;
  networksFor(tenantId)
    .then((nets) => {
      const chosen = sel.value;
      const options = nets.map((n) => h("option", { value: String(n.id) }, optionLabel(n, isSuper() && tenantId == null)));
      // a network it is on stays offered even if it is no longer among the usable ones
      if (current && !nets.some((n) => n.id === current.id)) options.push(h("option", { value: String(current.id) }, current.name));
      clear(sel, fixed(), options);
      sel.value = chosen;
      sel.dataset.loaded = "yes";
    })
    .catch((e) => (sel.title = errText(e)));
  return sel;
}

// What a network select sends: undefined (nothing: the OSF's network), "" (the default network) or an id.
export const readNetwork = (sel) => (sel.value === INHERITED ? undefined : sel.value);
// The same for what an object is on now, to tell whether the select changed it.
export const networkValue = (obj) => (obj.network_id == null ? DEFAULT_NETWORK : String(obj.network_id));
