// REST client of the WAT: bearer token from sessionStorage, error envelope → ApiError.
export const TOKEN_KEY = "deckard.admin.token"; // shared with the spy page
export const BASE = "/api/v1";

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

export const token = () => sessionStorage.getItem(TOKEN_KEY);
export const setToken = (t) => (t ? sessionStorage.setItem(TOKEN_KEY, t) : sessionStorage.removeItem(TOKEN_KEY));

let onUnauthenticated = () => {};
// the 401s that mean "this session is over"; a wrong password or code (a login, a second-factor step) is not one
const SESSION_ENDED = new Set(["bad_token", "session_expired", "unauthenticated"]);
export const whenUnauthenticated = (fn) => (onUnauthenticated = fn);

export async function api(method, path, body, { headers = {}, raw = false } = {}) {
  const h = { ...headers };
  const t = token();
  if (t) h.Authorization = `Bearer ${t}`;
  let payload = body;
  if (body !== undefined && !(body instanceof Blob) && !(body instanceof ArrayBuffer)) {
    h["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const r = await fetch(BASE + path, { method, headers: h, body: payload });
  if (raw) return r;
  const text = await r.text();
  const data = text ? JSON.parse(text) : null;
  if (!r.ok) {
    const e = (data && data.error) || { code: `http_${r.status}`, message: r.statusText };
    if (r.status === 401 && SESSION_ENDED.has(e.code)) onUnauthenticated();
    throw new ApiError(r.status, e.code, e.message, e.details);
  }
  return data;
}

export const get = (p) => api("GET", p);
export const post = (p, b) => api("POST", p, b ?? {});
export const patch = (p, b) => api("PATCH", p, b);
export const put = (p, b) => api("PUT", p, b);
export const del = (p) => api("DELETE", p);

export function qs(params) {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") u.append(k, v);
  const s = u.toString();
  return s ? `?${s}` : "";
}
