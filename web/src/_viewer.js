// The desktop viewer shared by the portal and the spy page: noVNC's RFB over the broker's WebSocket.
//
// The broker sends TEXT frames {"progress": "..."} while it starts the desktop, then the VNC stream as BINARY
// frames.  noVNC would feed text frames into its RFB parser, so the socket is wrapped in a channel that takes
// the text frames out (to show them) and passes everything else through unchanged.
import RFB from "@novnc/novnc";

class ProgressChannel {
  constructor(url, onText) {
    this.onopen = null;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    this._ws = new WebSocket(url, ["binary"]);
    this._ws.binaryType = "arraybuffer";
    this._ws.onopen = (e) => this.onopen && this.onopen(e);
    this._ws.onclose = (e) => this.onclose && this.onclose(e);
    this._ws.onerror = (e) => this.onerror && this.onerror(e);
    this._ws.onmessage = (e) => {
      if (typeof e.data === "string") {
        try {
          onText(JSON.parse(e.data));
        } catch {
          /* not ours: ignore */
        }
        return;
      }
      if (this.onmessage) this.onmessage(e);
    };
  }
  get binaryType() { return this._ws.binaryType; }
  set binaryType(v) { this._ws.binaryType = v; }
  get protocol() { return this._ws.protocol; }
  get readyState() { return this._ws.readyState; }
  send(data) { this._ws.send(data); }
  close(code, reason) { this._ws.close(code, reason); }
}

// Opens a desktop in `target`.  Callbacks: onProgress(text), onConnect(), onFirstFrame(), onDisconnect(reason,
// clean), onClipboard(text).  Returns {rfb, disconnect, sendClipboard}.
export function openDesktop({ target, url, viewOnly = false, onProgress, onConnect, onFirstFrame, onDisconnect,
  onClipboard }) {
  let closeReason = "";
  let connected = false;
  let framed = false;
  const channel = new ProgressChannel(url, (msg) => {
    if (msg.progress && onProgress) onProgress(msg.progress);
  });
  const origClose = channel._ws.onclose;
  channel._ws.onclose = (e) => {
    closeReason = e.reason || "";
    origClose(e);
  };
  const rfb = new RFB(target, channel, { shared: true });
  rfb.viewOnly = viewOnly;
  rfb.scaleViewport = true;
  rfb.resizeSession = !viewOnly;
  rfb.focusOnClick = true;
  rfb.background = "#1b1f24";
  // the first binary message after ServerInit carries the first framebuffer update; it is painted on the next frame
  const watchFrames = () => {
    const inner = channel.onmessage;
    channel.onmessage = (e) => {
      inner(e);
      if (!framed && connected) {
        framed = true;
        requestAnimationFrame(() => requestAnimationFrame(() => onFirstFrame && onFirstFrame()));
      }
    };
  };
  rfb.addEventListener("connect", () => {
    connected = true;
    watchFrames();
    if (onConnect) onConnect();
  });
  rfb.addEventListener("disconnect", (e) => {
    if (onDisconnect) onDisconnect(closeReason, e.detail.clean);
  });
  rfb.addEventListener("clipboard", (e) => onClipboard && onClipboard(e.detail.text));
  return {
    rfb,
    disconnect: () => rfb.disconnect(),
    sendClipboard: (text) => rfb.clipboardPasteFrom(text),
  };
}

// Small helpers both pages use.
export function $(sel, root = document) {
  return root.querySelector(sel);
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== false && v !== null && v !== undefined) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c);
  return node;
}

export async function api(path, { token, method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!resp.ok) {
    const e = (data && data.error) || {};
    const err = new Error(e.message || `${resp.status} ${resp.statusText}`);
    Object.assign(err, { status: resp.status, code: e.code, details: e.details || {} });
    throw err;
  }
  return data;
}
