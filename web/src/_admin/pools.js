// Warm pools in the WAT (docs/pools.md): desktops of an OSF and image tag the farm keeps started for users to take
// over.  A pool is a setting of its OSF: seen with osf.see, changed with osf.update.  Here: the list's cells (the
// fill bar, the hours, the last error), the create form and the detail page's edit box; the API's refusals are shown
// next to the field they are about.
import { get, post, patch } from "./api.js";
import { h, clear, toast, errText, field, fieldError, showFieldError } from "./dom.js";
import { can, isSuper } from "./session.js";

const HOURS_EXAMPLE = "Mon-Fri 07:00-19:00, Sat 09:00-13:00";
const HOURS_HINT = `Empty: always. Else the windows it is kept in, as in login rules (${HOURS_EXAMPLE}); outside them it keeps no guest.`;

// which field an error code is about; 422 bad_input (the request's own checks) names its field in details.errors
const FIELD_OF = {
  osf_not_found: "osf",
  pool_unsupported: "osf",
  duplicate: "tag",
  bad_tag: "tag",
  bad_pool: "size",
  pool_limit: "size",
};
function fieldOf(ex) {
  if (ex.code === "bad_login_rule") return /time zone/i.test(ex.message || "") ? "timezone" : "hours";
  if (ex.code === "bad_input") return /^body\.(\w+)/.exec(ex.details?.errors?.[0]?.where || "")?.[1];
  return FIELD_OF[ex.code];
}

// "default:default" — a pool has no name: its OSF and tag say which it is
export const poolCaption = (pool) => `${pool.osf}:${pool.tag}`;

// Why desktops of an OSF cannot come from a warm guest (the API's services/pools.unsupported); null when they can.
function unsupported(osf) {
  if (osf.driver && osf.driver !== "container") return `${osf.driver} desktops`;
  if (osf.keep_overlay) return "keeps its desktops' layers";
  if (osf.network_id != null) return "on a tenant network";
  return null;
}

// The fill of a pool: ready (green) and starting (amber) guests out of those it wants now, and "ready / wanted".
export function poolFill(pool) {
  const ready = pool.ready ?? 0;
  const starting = pool.starting ?? 0;
  const wanted = pool.wanted ?? 0;
  const of = Math.max(wanted, ready + starting, 1);
  const part = (cls, n) => {
    const s = h(`span.${cls}`);
    s.style.width = `${(100 * n) / of}%`; // through the CSSOM: the page's CSP refuses style attributes
    return s;
  };
  const words = [`${ready} ready`, starting ? `${starting} starting` : "", `${wanted} wanted`];
  if (wanted < (pool.size ?? 0)) words.push("outside its hours");
  return h(
    "span.pool-fill",
    { title: words.filter(Boolean).join(", ") },
    h("span.fill-bar", { "aria-hidden": "true" }, part("fill-ready", ready), part("fill-starting", starting)),
    h("span.fill-text", `${ready} / ${wanted}`),
    starting ? h("span.fill-more.muted", ` +${starting} starting`) : "",
    wanted < (pool.size ?? 0) ? h("span.fill-more.muted", " (outside its hours)") : "",
  );
}

export const poolHours = (pool) =>
  pool.hours ? h("span", h("span.pool-hours", pool.hours), h("span.muted", ` (${pool.timezone})`)) : h("span.muted", "always");

// The list's cells that are not the plain value (undefined: the generic cell).
export function poolCell(row, c) {
  if (c === "osf") return h("a", { href: `#/osfs/${row.osf_id}` }, row.osf);
  if (c === "fill") return poolFill(row);
  if (c === "hours") return poolHours(row);
  if (c === "last_error" && row.last_error) return h("span.error.pool-error", { title: row.last_error_at ? `at ${new Date(row.last_error_at).toLocaleString()}` : "" }, row.last_error);
  return undefined;
}

// A time zone input offering the browser's IANA names.
function timezoneInput(value) {
  const input = h("input", { name: "timezone", required: true, autocomplete: "off", spellcheck: false, list: "pool-timezones", value });
  const zones = typeof Intl.supportedValuesOf === "function" ? Intl.supportedValuesOf("timeZone") : [];
  const list = h("datalist#pool-timezones", ["UTC", ...zones].map((z) => h("option", { value: z })));
  return [input, list];
}

const hoursInput = (value) => h("input", { name: "hours", autocomplete: "off", spellcheck: false, placeholder: `always, or e.g. ${HOURS_EXAMPLE}`, value });
const sizeInput = (value) => h("input", { name: "size", type: "number", min: 0, max: 100, step: 1, required: true, value });

// Inputs with their error lines; on submit `send(body)` runs and a refusal lands under its field (else under the form).
function poolForm(label, inputs, extra, send) {
  const errors = {};
  const form = h("form.card.pool-form", { "aria-label": label });
  for (const [name, [text, input, hint]] of Object.entries(inputs)) {
    errors[name] = fieldError(input);
    form.append(field(text, input), hint ? h("small.muted.hint", hint) : "", errors[name]);
  }
  form.append(...extra);
  const err = h("p.error", { role: "alert" });
  form.append(err);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    for (const [name, p] of Object.entries(errors)) showFieldError(inputs[name][1], p, "");
    err.textContent = "";
    try {
      await send();
    } catch (ex) {
      const at = fieldOf(ex);
      if (at && errors[at]) showFieldError(inputs[at][1], errors[at], errText(ex));
      else err.textContent = errText(ex);
    }
  });
  return [form, err];
}

export function poolCreatePage(root) {
  const osf = h("select", { name: "osf", required: true, dataset: { loaded: "no" } }, h("option", { value: "" }, "Loading…"));
  const tag = h("input", { name: "tag", required: true, autocomplete: "off", spellcheck: false, value: "default", list: "pool-tags" });
  const tags = h("datalist#pool-tags");
  const size = sizeInput("");
  const hours = hoursInput("");
  const [timezone, zones] = timezoneInput("UTC");
  const named = new Map(); // OSF name → how many OSFs listed have it
  const inputs = {
    osf: ["OSF", osf],
    tag: ["image tag", tag, "The tag of the image its guests boot: desktops of that OSF and tag take them over."],
    size: ["size", size, "How many warm guests it keeps ready (0 to 100). Each one takes a desktop's memory on a node."],
    hours: ["hours", hours, HOURS_HINT],
    timezone: ["time zone", timezone],
  };
  const [form] = poolForm("Create warm pool", inputs, [tags, zones], async () => {
    // by name when it says which (the API's messages then name it), else by id (OSFs of several tenants)
    const chosen = osf.selectedOptions[0];
    const byName = chosen?.dataset.name && named.get(chosen.dataset.name) === 1;
    const body = { osf: byName ? chosen.dataset.name : osf.value, tag: tag.value.trim(), size: Number(size.value), hours: hours.value.trim(), timezone: timezone.value.trim() };
    const pool = await post("/pools", body);
    toast(`warm pool ${poolCaption(pool)} created`);
    location.hash = "#/pools";
  });
  form.append(h("div.buttons", h("button.primary", { type: "submit" }, "Create"), h("a.button", { href: "#/pools" }, "Cancel")));
  clear(root, h("p", h("a", { href: "#/pools" }, "← Warm pools")), h("h1", "New warm pool"), form);

  // the OSF's image tags, offered in the tag field (without image.see: none, any tag may be typed)
  async function offerTags() {
    clear(tags);
    if (!osf.value) return;
    try {
      const images = (await get(`/images?osf_id=${encodeURIComponent(osf.value)}&per_page=1000`)).items;
      const seen = [...new Set(images.flatMap((i) => i.tags || []))].sort();
      clear(tags, seen.map((t) => h("option", { value: t })));
    } catch {
      /* no tags to offer */
    }
  }
  osf.addEventListener("change", offerTags);
  get("/osfs?per_page=1000&sort=name")
    .then((page) => {
      const tenants = new Set(page.items.map((o) => o.tenant_id));
      for (const o of page.items) named.set(o.name, (named.get(o.name) || 0) + 1);
      const options = page.items.map((o) => {
        const why = unsupported(o);
        const whose = isSuper() && tenants.size > 1 ? ` (tenant ${o.tenant_id})` : "";
        return h("option", { value: String(o.id), dataset: { name: o.name } }, `${o.name}${whose}${why ? ` — cannot be warm: ${why}` : ""}`);
      });
      clear(osf, options.length ? options : h("option", { value: "" }, "No OSF: create one first"));
      const first = page.items.find((o) => !unsupported(o));
      if (first) osf.value = String(first.id);
      osf.dataset.loaded = "yes";
      offerTags();
    })
    .catch((e) => {
      clear(osf, h("option", { value: "" }, "Cannot read the OSFs"));
      osf.title = errText(e);
    });
  osf.focus();
}

// A pool's detail page boxes: its fill, and (osf.update) the edit form of its size, hours and time zone.
export function poolBoxes(pool, reload) {
  const fill = h(
    "section.card",
    { "aria-label": "Fill" },
    h("h2", "Warm guests"),
    poolFill(pool),
    pool.last_error ? h("p.error.pool-error", `Last failure${pool.last_error_at ? ` (${new Date(pool.last_error_at).toLocaleString()})` : ""}: ${pool.last_error}`) : "",
  );
  if (!can("osf.update")) return [fill];
  const size = sizeInput(String(pool.size));
  const hours = hoursInput(pool.hours || "");
  const [timezone, zones] = timezoneInput(pool.timezone || "UTC");
  const inputs = { size: ["size", size], hours: ["hours", hours, HOURS_HINT], timezone: ["time zone", timezone] };
  const [form] = poolForm("Edit", inputs, [zones], async () => {
    const now = { size: Number(size.value), hours: hours.value.trim(), timezone: timezone.value.trim() };
    const change = Object.fromEntries(Object.entries(now).filter(([k, v]) => v !== (pool[k] ?? "")));
    if (!Object.keys(change).length) return toast("Nothing changed");
    await patch(`/pools/${pool.id}`, change);
    toast("Saved");
    reload();
  });
  form.prepend(h("h2", "Edit"));
  form.append(h("div.buttons", h("button.primary", { type: "submit" }, "Save")));
  return [fill, form];
}
