// A volume's detail page boxes (docs/volumes.md): its attachments with Detach, an Attach form, its snapshots
// with Clone and Delete, and Take snapshot.  Everything goes through the API, which checks the ACLs again.
import { get, post, del } from "./api.js";
import { h, clear, fmt, toast, errText, field } from "./dom.js";
import { can } from "./session.js";

async function run(what, call, reload) {
  try {
    await call();
    toast(`${what}: ok`);
    reload();
  } catch (e) {
    toast(errText(e), "error");
  }
}

export function volumeBoxes(vol, reload) {
  const base = `/volumes/${vol.id}`;
  const attach = can("volume.attach");
  const rows = vol.attachments.map((a) =>
    h(
      "tr",
      h("td", h("a", { href: `#/desktops/${a.desktop_id}` }, a.desktop)),
      h("td", a.read_only ? "read-only" : "read-write"),
      h("td", a.in_guest ? "in the guest" : a.pending ? `${a.pending}${a.error_code ? ` (${a.error_code})` : ""}` : "at next start"),
      h("td", attach && h("button", { type: "button", onclick: () => run("detach", () => post(`${base}/detach`, { desktop: String(a.desktop_id) }), reload) }, "Detach")),
    ),
  );
  const attachments = h(
    "section.card",
    { "aria-label": "Attachments" },
    h("h2", "Attachments"),
    rows.length
      ? h("table", h("thead", h("tr", ["Desktop", "Mode", "State", ""].map((t) => h("th", t)))), h("tbody", rows))
      : h("p", "Not attached."),
  );
  if (attach) {
    const desktop = h("input", { name: "desktop", required: true });
    const ro = h("input", { type: "checkbox", name: "read_only" });
    const form = h("form", { "aria-label": "Attach" }, field("Desktop (name or id)", desktop), field("Read-only", ro), h("div.buttons", h("button.primary", { type: "submit" }, "Attach")));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      run("attach", () => post(`${base}/attach`, { desktop: desktop.value.trim(), read_only: ro.checked }), reload);
    });
    attachments.append(form);
  }
  const snapshots = h("section.card", { "aria-label": "Snapshots" }, h("h2", "Snapshots"));
  const list = h("div", h("p", "Loading…"));
  snapshots.append(list);
  get(`${base}/snapshots`)
    .then((page) => {
      const snap = can("volume.snapshot");
      const clone = can("volume.create");
      clear(
        list,
        page.items.length
          ? h(
              "table",
              h("thead", h("tr", ["Name", "Size (GiB)", "Taken", ""].map((t) => h("th", t)))),
              h(
                "tbody",
                page.items.map((s) =>
                  h(
                    "tr",
                    h("td", s.name),
                    h("td", String(s.size_gib)),
                    h("td", fmt(s.created_at)),
                    h(
                      "td.buttons",
                      clone && h("button", { type: "button", onclick: () => cloneFrom(vol, s.name) }, "Clone"),
                      snap && h("button.danger", { type: "button", onclick: () => confirm(`Delete snapshot ${s.name}?`) && run("delete snapshot", () => del(`${base}/snapshots/${encodeURIComponent(s.name)}`), reload) }, "Delete"),
                    ),
                  ),
                ),
              ),
            )
          : h("p", "No snapshots."),
      );
    })
    .catch((e) => clear(list, h("p.error", errText(e))));
  if (can("volume.snapshot")) {
    const name = h("input", { name: "snapshot", required: true });
    const form = h("form", { "aria-label": "Take snapshot" }, field("Snapshot name", name), h("div.buttons", h("button.primary", { type: "submit" }, "Take snapshot")));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      run("snapshot", () => post(`${base}/snapshots`, { name: name.value.trim() }), reload);
    });
    snapshots.append(form);
  }
  return [attachments, snapshots];
}

async function cloneFrom(vol, snapshot) {
  const name = prompt(`Name of the new volume (a copy of ${vol.name} at ${snapshot}):`);
  if (!name) return;
  try {
    const made = await post("/volumes", { name: name.trim(), from_snapshot: { volume: String(vol.id), snapshot } });
    toast(`volume ${made.name} made`);
    location.hash = `#/volumes/${made.id}`;
  } catch (e) {
    toast(errText(e), "error");
  }
}
