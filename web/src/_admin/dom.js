// Tiny DOM helpers: h("tag.class", {attrs, on*: handlers}, ...children).
export function h(sel, attrs, ...children) {
  const [head, ...classes] = sel.split(".");
  const [tag, id] = head.split("#");
  const el = document.createElement(tag || "div");
  if (id) el.id = id;
  if (classes.length) el.className = classes.join(" ");
  if (attrs && (typeof attrs !== "object" || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2).toLowerCase(), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k in el && typeof v !== "string") el[k] = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export const clear = (el, ...children) => {
  el.replaceChildren();
  append(el, children);
  return el;
};

let seq = 0;
export const uid = (p = "f") => `${p}${++seq}`;

// A labelled form field; returns [wrapper, input].
export function field(label, input) {
  if (!input.id) input.id = uid();
  return h("div.field", h("label", { for: input.id }, label), input);
}

// The error line under a form field (`<name>-error`, the field's aria-describedby), for the API's refusals of it.
export function fieldError(input) {
  const p = h("p.error.field-error", { id: `${input.id || input.name}-error`, role: "alert" });
  input.setAttribute("aria-describedby", p.id);
  return p;
}

// Show (or with "" clear) a field's error; a field in error is marked aria-invalid and takes the focus.
export function showFieldError(input, p, text) {
  p.textContent = text;
  if (text) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
  } else input.removeAttribute("aria-invalid");
}

export function fmt(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (Array.isArray(v)) return v.map((x) => (typeof x === "object" ? JSON.stringify(x) : x)).join(", ");
  if (typeof v === "object") return JSON.stringify(v);
  if (typeof v === "string" && /^\d{4}-\d\d-\d\dT\d\d:\d\d/.test(v)) return new Date(v).toLocaleString();
  return String(v);
}

export function toast(message, kind = "info") {
  const box = document.getElementById("toasts");
  const t = h(`div.toast.${kind}`, { role: kind === "error" ? "alert" : "status" }, message);
  box.append(t);
  setTimeout(() => t.remove(), kind === "error" ? 8000 : 4000);
}

export const errText = (e) => (e && e.code ? `${e.code}: ${e.message}` : String(e));
