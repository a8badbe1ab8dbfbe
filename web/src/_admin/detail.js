// Detail + edit (PATCH) pages, create forms, image upload with progress (chunked, resumable).
import { api, get, post, patch, del, put } from "./api.js";
import { h, clear, fmt, toast, errText, field } from "./dom.js";
import { can, isSuper, onEvent } from "./session.js";
import { actionAcl } from "./resources.js";
import { userIdentityBox } from "./identity.js";
import { volumeBoxes } from "./volumes.js";
import { networkBoxes, networkSelect, networkValue, readNetwork } from "./networks.js";
import { poolBoxes } from "./pools.js";

function inputFor(name, type, value) {
  if (type === "checkbox") {
    const i = h("input", { type: "checkbox", name });
    i.checked = !!value;
    return i;
  }
  const i = h("input", { type: type || "text", name, autocomplete: type === "password" ? "new-password" : "off" });
  if (type === "number") i.step = "any";
  if (value !== undefined && value !== null) i.value = Array.isArray(value) ? value.join(", ") : value;
  return i;
}

function readInput(i, list) {
  if (i.dataset.kind === "network") return readNetwork(i);
  if (i.type === "checkbox") return i.checked;
  if (i.type === "number") return i.value === "" ? undefined : Number(i.value);
  if (list) return i.value.split(",").map((s) => s.trim()).filter(Boolean);
  return i.value === "" ? undefined : i.value;
}

export function createPage(root, name, res) {
  const inputs = {};
  const form = h("form.card", { "aria-label": `Create ${res.object}` });
  for (const f of res.create) {
    if (f.superOnly && !isSuper()) continue;
    const i = f.type === "network" ? networkSelect(f.name, { inherited: f.inherited }) : inputFor(f.name, f.type);
    if (f.required) i.required = true;
    inputs[f.name] = [i, f];
    form.append(field(f.label || f.name.replaceAll("_", " "), i));
  }
  const err = h("p.error", { role: "alert" });
  form.append(err, h("div.buttons", h("button.primary", { type: "submit" }, "Create"), h("a.button", { href: `#/${name}` }, "Cancel")));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = {};
    for (const [k, [i, f]] of Object.entries(inputs)) {
      const v = readInput(i, f.list);
      if (v !== undefined) body[k] = v;
    }
    try {
      const obj = await post(res.path, body);
      toast(`${res.object} ${obj[res.label] ?? obj.id} created`);
      location.hash = `#/${name}/${obj.id}`;
    } catch (ex) {
      err.textContent = errText(ex);
    }
  });
  clear(root, h("h1", `New ${res.object}`), form);
  form.querySelector("input")?.focus();
}

export function detailPage(root, name, res, id) {
  let obj = null;
  const body = h("div");
  // why an action or the delete was refused (a 409 network_in_use names what to move first): it stays until the next try
  const refused = h("p.error.refused", { role: "alert" });
  clear(root, h("p", h("a", { href: `#/${name}` }, `← ${res.title}`)), body);
  const caption = () => (res.caption ? res.caption(obj) : obj[res.label] ?? obj.id);

  async function load() {
    try {
      obj = await get(`${res.path}/${id}`);
      render();
    } catch (e) {
      clear(body, h("p.error", errText(e)));
    }
  }

  function render() {
    const title = `${res.object} ${caption()}`;
    const dl = h("dl.props", Object.entries(obj).flatMap(([k, v]) => [h("dt", k.replaceAll("_", " ")), h("dd", { dataset: { field: k } }, fmt(v))]));
    const acts = h("div.buttons", { role: "toolbar", "aria-label": "Actions" });
    for (const a of res.actions || []) {
      if (!can(actionAcl(res, a))) continue;
      acts.append(h("button", { type: "button", dataset: { action: a }, onclick: () => act(a) }, a[0].toUpperCase() + a.slice(1)));
    }
    if (name === "desktops" && can("desktop.spy")) acts.append(h("a.button", { href: `/admin/spy?desktop=${obj.id}` }, "Spy"));
    if (res.related) {
      const [href, text] = res.related(obj);
      acts.append(h("a.button", { href }, text));
    }
    // a tenant administrator sees the farm's shared networks but may not change them (403 supertenant_only)
    const mayChange = !res.readOnly && !(res.farmOwned?.(obj) && !isSuper());
    if (mayChange && can(actionAcl(res, "delete"))) acts.append(h("button.danger", { type: "button", onclick: remove }, "Delete"));
    const parts = [h("h1", title), acts, refused, dl];
    const editable = mayChange ? (res.editable || []).filter((k) => can(res.editAcl?.[k] || (k === "blocked" ? `${res.object}.block` : actionAcl(res, "update")))) : [];
    if (editable.length) parts.push(editForm(editable));
    if (res.upload && can("image.upload")) parts.push(uploadBox(obj, load));
    if (res.properties && can("property.see")) parts.push(propertiesBox(res.properties, obj.id));
    if (name === "users") parts.push(userIdentityBox(obj));
    if (name === "volumes") parts.push(...volumeBoxes(obj, load));
    if (name === "networks") parts.push(...networkBoxes(obj, load));
    if (name === "pools") parts.push(...poolBoxes(obj, load));
    clear(body, ...parts);
  }

  function editForm(keys) {
    const inputs = {};
    const form = h("form.card", { "aria-label": "Edit" }, h("h2", "Edit"));
    // what only a desktop at rest may change (the API's DESKTOP_AT_REST, no command pending)
    const running = obj.state !== undefined && !(["stopped", "failed"].includes(obj.state) && !obj.cmd);
    for (const k of keys) {
      const type = k === "password" ? "password" : res.types?.[k];
      const on = obj.network_id == null ? null : { id: obj.network_id, name: obj.network };
      const i = type === "network" ? networkSelect(k, { current: on, tenantId: obj.tenant_id }) : inputFor(k, type, k === "password" ? "" : obj[k]);
      inputs[k] = i;
      const frozen = running && res.whileStopped?.includes(k);
      if (frozen) i.disabled = true; // the API refuses it (desktop_running): say so before the user tries
      form.append(field(`${k.replaceAll("_", " ")}${frozen ? " (stop the desktop to change it)" : ""}`, i));
    }
    const err = h("p.error", { role: "alert" });
    form.append(err, h("div.buttons", h("button.primary", { type: "submit" }, "Save")));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const change = {};
      for (const [k, i] of Object.entries(inputs)) {
        if (i.disabled) continue;
        const v = readInput(i, res.lists?.includes(k));
        if (k === "password" && !v) continue;
        const was = i.dataset.kind === "network" ? networkValue(obj) : obj[k];
        if (JSON.stringify(v ?? "") !== JSON.stringify(was ?? "")) change[k] = v ?? "";
      }
      if (!Object.keys(change).length) return toast("Nothing changed");
      try {
        obj = await patch(`${res.path}/${obj.id}`, change);
        toast("Saved");
        render();
      } catch (ex) {
        err.textContent = errText(ex);
      }
    });
    return form;
  }

  async function act(a) {
    refused.textContent = "";
    try {
      await post(`${res.path}/${obj.id}/${a}`);
      toast(`${a}: ok`);
      load();
    } catch (e) {
      refused.textContent = errText(e);
    }
  }

  async function remove() {
    if (!confirm(`Delete ${res.object} ${caption()}?`)) return;
    refused.textContent = "";
    try {
      await del(`${res.path}/${obj.id}`);
      toast("Deleted");
      location.hash = `#/${name}`;
    } catch (e) {
      refused.textContent = errText(e);
    }
  }

  load();
  let t = null;
  return onEvent((ev) => {
    if (ev.object === res.object && String(ev.id) === String(id) && ev.type !== "deleted") {
      clearTimeout(t);
      t = setTimeout(load, 200);
    }
  });
}

function propertiesBox(type, id) {
  const box = h("section.card", h("h2", "Custom properties"));
  const list = h("dl.props");
  box.append(list);
  const show = (props) => clear(list, Object.entries(props || {}).flatMap(([k, v]) => [h("dt", k), h("dd", String(v))]));
  get(`/properties/${type}/${id}`).then(show, () => show({}));
  if (can("property.update")) {
    const k = h("input", { name: "prop-key" });
    const v = h("input", { name: "prop-value" });
    const form = h("form.inline-form", field("key", k), field("value", v), h("button", { type: "submit" }, "Set"));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      try {
        show(await put(`/properties/${type}/${id}`, { [k.value]: v.value }));
        k.value = v.value = "";
      } catch (ex) {
        toast(errText(ex), "error");
      }
    });
    box.append(form);
  }
  return box;
}

const CHUNK = 4 * 1024 * 1024;

// Chunked upload with Content-Range; resumes at the server's byte count (image.uploaded_bytes or bad_offset).
function uploadBox(image, reload) {
  const file = h("input", { type: "file", name: "tarball", accept: ".tar,.tar.gz,.tgz,.tar.zst,application/x-tar" });
  const bar = h("progress", { max: 100, value: 0, "aria-label": "Upload progress" });
  const label = h("span.progress-label", { "aria-live": "polite" }, image.uploaded_bytes ? `${image.uploaded_bytes} bytes already on the server` : "");
  const go = h("button.primary", { type: "submit" }, image.uploaded_bytes ? "Resume upload" : "Upload");
  const form = h("form.card", { "aria-label": "Upload the image" }, h("h2", "Upload"), field("Image tarball", file), h("div.progress", bar, label), h("div.buttons", go));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const f = file.files[0];
    if (!f) return toast("Choose a file first", "error");
    go.disabled = true;
    let offset = image.uploaded_bytes && image.uploaded_bytes < f.size ? image.uploaded_bytes : 0;
    try {
      while (offset < f.size) {
        const end = Math.min(offset + CHUNK, f.size);
        const r = await api("PUT", `/images/${image.id}/content`, f.slice(offset, end), {
          raw: true,
          headers: { "Content-Type": "application/octet-stream", "Content-Range": `bytes ${offset}-${end - 1}/${f.size}` },
        });
        if (r.status === 409) {
          const err = (await r.json()).error;
          if (err.code === "bad_offset" && err.details) {
            offset = err.details.expected;
            continue;
          }
          throw new Error(`${err.code}: ${err.message}`);
        }
        if (!r.ok) {
          const err = (await r.json()).error;
          throw new Error(`${err.code}: ${err.message}`);
        }
        offset = end;
        bar.value = Math.round((offset * 100) / f.size);
        label.textContent = `${bar.value}% (${offset} of ${f.size} bytes)`;
      }
      toast("Upload complete");
      reload();
    } catch (ex) {
      label.textContent = `Stopped at byte ${offset}: ${ex.message}. Press the button again to resume.`;
      go.textContent = "Resume upload";
      go.disabled = false;
    }
  });
  return form;
}
