// The portal's Files panel: upload into the open desktop's ~/Uploads (picker or a drop on the screen), browse its
// home and download from it, over one WebSocket per desktop to its files service through the broker.  Split out of
// portal.js, which owns the session and the toolbar: it hands this module the helpers it needs once, in initFiles.
// The same socket carries the desktop's print jobs (_prints.js), even where the panel itself is turned off.
import { $, el } from "./_viewer.js";
import { initPrints, watchPrints } from "./_prints.js";

// portal.js's helpers, given once by initFiles before anything here runs
let call; // call(path, opts): the portal's API call with the session's token
let showError; // showError(selector, err): err in the user's words in that element ("" clears it)
let plain; // plain(err): err's message as the user reads it
let when; // when(timestamp): a date and time in the user's locale
let togglePanel; // togglePanel(button): shows or hides the button's toolbar panel; returns whether it is now open
let openPanel; // openPanel(button): opens it without moving the focus; returns whether it was open already
let showPanel; // showPanel(button, open)

const FILES_SLICE = 256 * 1024; // bytes per binary frame of an upload
const FILES_HIGH_WATER = 4 * 1024 * 1024; // stop reading the file while the socket holds this much unsent
const FILES_READY_MS = 15000;
const FILES_DEFAULT_DIR = "Downloads";
const PRINT_DIR = "PDF"; // where the desktop's PDF printer leaves each job, if the server's ready message does not say
// the file channel of the open desktop: {desktopId, panel, socket, queue, maxUpload, dir, closed, prints}; panel says
// whether the Files panel is on (off, the channel may still carry print jobs)
let files = null;
let dragDepth = 0; // dragenter minus dragleave over the screen: the drop overlay shows while it is above 0

// One WebSocket to the desktop's files service, through the broker.  The server runs one operation at a time: a
// request installs the one waiter that hears its answers (text frames as JSON, binary frames as ArrayBuffers)
// until its handler returns something other than undefined, or an error answer or a close rejects it.
class FilesSocket {
  static async open(desktopId, onClose) {
    // a ticket is single-use and short-lived: every socket asks for its own
    const ticket = await call(`/portal/desktops/${desktopId}/ticket`, { method: "POST", body: { purpose: "files" } });
    const sock = new FilesSocket(ticket.broker_ws_url, onClose);
    const late = setTimeout(() => sock.close(new Error("The desktop's files service did not answer: try again in a moment.")),
      FILES_READY_MS);
    try {
      sock.ready = await sock.expect(null, (msg) => msg.ready); // {max_upload_bytes, files, printing, print_dir}
      sock.maxUpload = sock.ready.max_upload_bytes;
    } finally {
      clearTimeout(late);
    }
    return sock;
  }

  constructor(url, onClose) {
    this.error = null; // why it is closed, once it is
    this.waiter = null;
    this.ws = new WebSocket(url);
    this.ws.binaryType = "arraybuffer";
    this.ws.onmessage = (e) => this.receive(e.data);
    this.ws.onclose = (e) => {
      const quiet = e.code === 1000 && !this.waiter; // an idle socket the server let go: the next action reopens it
      this.fail(closedError(e));
      if (!quiet) onClose(this.error);
    };
  }

  get open() {
    return !this.error;
  }

  receive(data) {
    const w = this.waiter;
    let msg = data;
    if (typeof data === "string") {
      try {
        msg = JSON.parse(data);
      } catch {
        return;
      }
    }
    if (!w || !msg) return;
    if (msg.error) {
      const err = Object.assign(new Error(msg.error.message || msg.error.code), { code: msg.error.code });
      if (!w.op || msg.op === w.op) this.settle(w.reject, err);
      return;
    }
    const value = w.onMessage(msg);
    if (value !== undefined) this.settle(w.resolve, value);
  }

  settle(how, value) {
    this.waiter = null;
    how(value);
  }

  expect(op, onMessage) {
    if (this.error) return Promise.reject(this.error);
    return new Promise((resolve, reject) => {
      this.waiter = { op, onMessage, resolve, reject };
    });
  }

  request(msg, onMessage) {
    const answer = this.expect(msg.op, onMessage);
    this.send(msg);
    return answer;
  }

  send(msg) {
    if (!this.error) this.ws.send(msg instanceof ArrayBuffer ? msg : JSON.stringify(msg));
  }

  fail(err) {
    this.error = this.error || err;
    if (this.waiter) this.settle(this.waiter.reject, err);
  }

  close(err = new Error("The files connection is closed.")) {
    this.ws.onclose = null;
    this.ws.onmessage = null;
    this.ws.close(1000);
    this.fail(err);
  }
}

function closedError(e) {
  const why = e.reason || (e.code === 1008 ? "the desktop refused it" : "the connection was lost");
  return new Error(`The files connection closed: ${why}. Try again: your next action reconnects.`);
}

function filesEnabled(d) {
  return !(d.features && d.features.files === false); // an older server sends no features: files are on
}

function printingEnabled(d) {
  return Boolean(d.features && d.features.printing); // an older server has no print jobs to show
}

function panelOn() {
  return Boolean(files && files.panel);
}

// a new desktop in the viewer (or none): the old socket closes, queued work is dropped, the panel starts empty and
// the print jobs of the old desktop go away
export function resetFiles(d) {
  if (files) {
    files.closed = true;
    if (files.socket) files.socket.close();
    files.prints.stop();
  }
  files = d && (filesEnabled(d) || printingEnabled(d))
    ? { desktopId: d.id, panel: filesEnabled(d), socket: null, queue: Promise.resolve(), maxUpload: null, dir: null,
      closed: false, prints: null }
    : null;
  if (files) files.prints = watchPrints(printingEnabled(d) ? printChannel(files) : null);
  $("#files-toggle").classList.toggle("hidden", !panelOn());
  showPanel($("#files-toggle"), false);
  $("#files-dir").value = FILES_DEFAULT_DIR;
  $("#files-up").disabled = false;
  $("#files-list").replaceChildren();
  $("#files-transfers").replaceChildren();
  $("#files-status").textContent = "";
  showError("#files-error", "");
  dragDepth = 0;
  showDrop(false);
}

// quiet: the print watcher's work, which leaves the panel's error line alone
async function socketOf(st, quiet = false) {
  if (st.socket && st.socket.open) return st.socket;
  st.socket = null;
  let sock;
  try {
    sock = await FilesSocket.open(st.desktopId, (err) => st === files && showError("#files-error", err));
  } catch (err) {
    if (st === files && !quiet) showError("#files-error", err);
    throw err;
  }
  if (st.closed) {
    sock.close();
    throw new Error("closed"); // the viewer moved on: nobody shows this
  }
  st.socket = sock;
  st.maxUpload = sock.maxUpload;
  if (!quiet) showError("#files-error", "");
  return sock;
}

// the server takes one operation at a time per socket: each waits for the one before; the promise is work's result
function queued(st, work) {
  const result = st.queue.then(() => {
    if (st.closed) throw new Error("closed"); // the viewer moved on: nobody shows this
    return work();
  });
  st.queue = result.catch(() => {});
  return result;
}

// fail(err) reports a failure while its desktop is still the one in the viewer
function enqueue(st, work, fail) {
  return queued(st, work).catch((err) => { if (st === files) fail(err); });
}

// what the print watcher may do on the channel: list the print folder (null: the server has printing off) and fetch
// a job; both quietly, and in the queue with the panel's own operations
function printChannel(st) {
  return {
    listJobs: () => queued(st, async () => {
      const sock = await socketOf(st, true);
      if (sock.ready.printing === false) return null;
      const dir = sock.ready.print_dir || PRINT_DIR;
      try {
        return await listOn(sock, dir);
      } catch (err) {
        if (err.code === "not_found") return { dir, entries: [] }; // no job printed yet
        throw err;
      }
    }),
    fetchJob: (path, onProgress) => queued(st, async () =>
      receiveFile(await socketOf(st, true), path, onProgress, "application/pdf")),
  };
}

// a folder as the server takes it: relative to the home ("" is the home itself), without "~/" or a trailing "/"
function cleanDir(text) {
  return text.trim().replace(/^~(\/|$)/, "").replace(/(.)\/+$/, "$1");
}

function parentDir(dir) {
  return dir.includes("/") ? dir.slice(0, dir.lastIndexOf("/")) : "";
}

function homePath(dir) {
  return dir ? `~/${dir}` : "your home folder";
}

function byteSize(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
}

function tooLarge(limit) {
  const mb = limit / (1024 * 1024);
  return new Error(`File too large: the limit is ${mb >= 10 ? Math.round(mb) : Number(mb.toPrecision(2))} MB.`);
}

function listDir(text) {
  const st = files;
  if (!st) return;
  const dir = cleanDir(text);
  $("#files-dir").value = dir;
  showError("#files-error", "");
  $("#files-status").textContent = `Opening ${homePath(dir)}…`;
  $("#files-list").setAttribute("aria-busy", "true");
  enqueue(st, async () => {
    const res = await listOn(await socketOf(st), dir);
    if (st === files) showListing(st, res);
  }, (err) => {
    $("#files-status").textContent = "";
    showError("#files-error", err);
  }).then(() => $("#files-list").removeAttribute("aria-busy"));
}

function listOn(sock, dir) {
  return sock.request({ op: "list", dir }, (msg) => (msg.op === "list" && msg.entries ? msg : undefined));
}

function showListing(st, { dir, entries, truncated }) {
  st.dir = dir;
  const sorted = [...entries].sort((a, b) => (a.type === "dir") !== (b.type === "dir")
    ? (a.type === "dir" ? -1 : 1) : a.name.localeCompare(b.name));
  const list = $("#files-list");
  list.setAttribute("aria-label", `Contents of ${homePath(dir)}`);
  list.replaceChildren(...sorted.map((e) => entryItem(dir, e)));
  $("#files-up").disabled = dir === "";
  const n = entries.length;
  $("#files-status").textContent = n === 0 ? `${homePath(dir)} is empty.`
    : `${homePath(dir)}: ${n} item${n === 1 ? "" : "s"}${truncated ? " (only the first ones: open a subfolder to see the rest)" : ""}.`;
}

function modified(mtime) {
  if (!mtime) return "";
  return ` · ${when(typeof mtime === "number" ? mtime * 1000 : mtime)}`; // seconds since the epoch, or ISO
}

function entryItem(dir, e) {
  const path = dir ? `${dir}/${e.name}` : e.name;
  const li = el("li", { class: "files-entry", "data-name": e.name, "data-type": e.type });
  if (e.type === "dir") {
    // the whole row opens the folder; its button is how a keyboard gets there (its click bubbles here)
    li.append(el("button", { type: "button", class: "files-folder", "aria-label": `Open folder ${e.name}` }, `${e.name}/`));
    li.addEventListener("click", () => listDir(path));
  } else {
    li.append(el("span", { class: "files-name" }, e.name),
      el("span", { class: "files-size" }, `${byteSize(e.size)}${modified(e.mtime)}`));
    if (e.type === "file") {
      li.append(el("button", { type: "button", class: "files-download", "aria-label": `Download ${e.name}`,
        onclick: () => downloadFile(path, e.name) }, "Download"));
    }
  }
  return li;
}

// ---- transfers: one line each, queued until the socket is free ----------------------------------------------------

function addTransfer(name, verb) {
  const t = { name, verb, cancelled: false, stop: null };
  t.bar = el("progress", { max: "1", value: "0", "aria-label": `${verb} of ${name}` });
  t.status = el("span", { class: "files-status", role: "status" }, "Waiting for the transfers before it…");
  t.cancelButton = el("button", { type: "button", class: "files-cancel", "aria-label": `Cancel ${verb.toLowerCase()} of ${name}`,
    onclick: () => cancelTransfer(t) }, "Cancel");
  t.li = el("li", { class: "files-transfer", "data-state": "queued", tabindex: "-1" },
    el("span", { class: "files-name" }, name), t.bar, t.status, t.cancelButton);
  $("#files-transfers").append(t.li);
  return t;
}

function setTransfer(t, state, text) {
  t.li.dataset.state = state;
  t.status.textContent = text;
  if (state === "done" || state === "error") {
    if (document.activeElement === t.cancelButton) t.li.focus();
    t.cancelButton.remove();
  }
}

function showProgress(t, done, total) {
  t.bar.max = Math.max(total, 1);
  t.bar.value = total ? done : 1;
}

function cancelTransfer(t) {
  t.cancelled = true;
  if (t.li.dataset.state === "queued") return setTransfer(t, "error", "Cancelled.");
  t.cancelButton.disabled = true;
  t.status.textContent = "Cancelling…";
  if (t.stop) t.stop(); // the server answers the running operation with its error "cancelled"
}

// work(sock) does the transfer and returns what the line says at its end
function runTransfer(st, t, work) {
  enqueue(st, async () => {
    if (t.cancelled) return;
    const sock = await socketOf(st);
    if (t.cancelled) return;
    setTransfer(t, "running", t.verb === "Upload" ? "Uploading…" : "Downloading…");
    t.stop = () => sock.send({ op: "cancel" });
    const text = await work(sock);
    t.bar.value = t.bar.max;
    setTransfer(t, "done", text);
  }, (err) => setTransfer(t, "error", plain(err)));
}

function uploadFiles(list, folders = []) {
  const st = files;
  if (!st) return;
  for (const name of folders) {
    setTransfer(addTransfer(name, "Upload"), "error", "Folders cannot be uploaded: drop the files in it, or a zip of it.");
  }
  for (const file of list) {
    const t = addTransfer(file.name, "Upload");
    if (st.maxUpload !== null && file.size > st.maxUpload) setTransfer(t, "error", tooLarge(st.maxUpload).message);
    else runTransfer(st, t, (sock) => upload(st, sock, file, t));
  }
}

async function upload(st, sock, file, t) {
  if (file.size > sock.maxUpload) throw tooLarge(sock.maxUpload);
  await sock.request({ op: "upload", name: file.name, size: file.size }, (msg) => (msg.accepted ? true : undefined));
  let over = false; // the server answered done or an error: stop sending
  const done = sock.expect("upload", (msg) => {
    if (msg.progress !== undefined) showProgress(t, msg.progress, file.size);
    return msg.done;
  });
  done.then(() => { over = true; }, () => { over = true; });
  try {
    await sendBytes(sock, file, () => over || t.cancelled);
  } catch (err) {
    sock.send({ op: "cancel" }); // the file could not be read: end the half-sent upload
    await done.catch(() => {});
    throw new Error(`Cannot read ${file.name} (${err.message}): choose it again.`);
  }
  const saved = await done;
  if (st === files && st.dir === "Uploads" && !$("#files-panel").classList.contains("hidden")) listDir("Uploads");
  return `Saved as ${saved.path}`;
}

async function sendBytes(sock, file, stop) {
  for (let at = 0; at < file.size; at += FILES_SLICE) {
    while (sock.ws.bufferedAmount > FILES_HIGH_WATER && !stop()) await new Promise((r) => setTimeout(r, 20));
    const bytes = await file.slice(at, at + FILES_SLICE).arrayBuffer();
    if (stop()) return; // a byte after a cancel would be read as part of the next operation
    sock.send(bytes);
  }
}

function downloadFile(path, name) {
  const st = files;
  if (!st) return;
  const t = addTransfer(name, "Download");
  runTransfer(st, t, async (sock) => {
    saveBlob(await receiveFile(sock, path, (got, size) => showProgress(t, got, size)));
    return "Downloaded: see your browser's downloads.";
  });
}

// a file of the desktop as a File in memory; onProgress(bytes so far, size)
async function receiveFile(sock, path, onProgress, type = "") {
  const parts = [];
  let file = null;
  let got = 0;
  const done = await sock.request({ op: "download", path }, (msg) => {
    if (msg instanceof ArrayBuffer) {
      if (file) { // frames before the header are a cancelled download's tail
        parts.push(msg);
        got += msg.byteLength;
        onProgress(got, file.size);
      }
      return undefined;
    }
    if (msg.op !== "download") return undefined;
    if (msg.file) file = msg.file;
    return msg.done;
  });
  if (got !== done.size) throw new Error("The download was cut short: try again.");
  return new File(parts, file.name, { type });
}

function saveBlob(blob, name = blob.name) {
  const url = URL.createObjectURL(blob);
  const a = el("a", { href: url, download: name, class: "hidden" });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 30000); // a browser may still be reading it after the click
}

// ---- drop files on the desktop ------------------------------------------------------------------------------------

function carriesFiles(e) {
  return Boolean(e.dataTransfer) && [...e.dataTransfer.types].includes("Files");
}

function showDrop(on) {
  $("#files-drop").classList.toggle("hidden", !on);
}

function dragEnter(e) {
  if (!carriesFiles(e)) return;
  dragDepth++;
  dragOver(e);
}

function dragOver(e) {
  if (!carriesFiles(e)) return;
  e.preventDefault(); // even with files off: a file dropped on an unhandled page replaces the portal
  e.dataTransfer.dropEffect = panelOn() ? "copy" : "none";
  showDrop(panelOn());
}

function dragLeave(e) {
  if (!carriesFiles(e)) return;
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) showDrop(false);
}

function dropFiles(e) {
  if (!carriesFiles(e)) return;
  e.preventDefault();
  dragDepth = 0;
  showDrop(false);
  if (!panelOn()) return;
  const { list, folders } = droppedFiles(e.dataTransfer);
  if (!openPanel($("#files-toggle"))) listDir($("#files-dir").value); // the transfers show in the panel
  uploadFiles(list, folders);
}

// a dropped folder arrives as a File that cannot be read: it is named and refused (read while the event lasts)
function droppedFiles(dt) {
  const items = [...(dt.items || [])].filter((item) => item.kind === "file");
  if (items.length === 0) return { list: [...dt.files], folders: [] };
  const list = [];
  const folders = [];
  for (const item of items) {
    const entry = item.webkitGetAsEntry ? item.webkitGetAsEntry() : null;
    const file = item.getAsFile();
    if (entry && entry.isDirectory) folders.push(entry.name);
    else if (file) list.push(file);
  }
  return { list, folders };
}

// wires the panel's controls and the drop on the screen; portal.js calls it once, before any resetFiles
export function initFiles(helpers) {
  ({ call, showError, plain, when, togglePanel, openPanel, showPanel } = helpers);
  initPrints({ plain, saveBlob });
  $("#files-toggle").addEventListener("click", (e) => {
    if (togglePanel(e.currentTarget)) {
      $("#files-dir").focus();
      listDir($("#files-dir").value);
    }
  });
  $("#files-nav").addEventListener("submit", (e) => {
    e.preventDefault();
    listDir($("#files-dir").value);
  });
  $("#files-up").addEventListener("click", () => listDir(parentDir(cleanDir($("#files-dir").value))));
  $("#files-input").addEventListener("change", (e) => {
    uploadFiles([...e.currentTarget.files]);
    e.currentTarget.value = ""; // the same file again is a new upload
  });
  const screenBox = $("#screen");
  screenBox.addEventListener("dragenter", dragEnter);
  screenBox.addEventListener("dragover", dragOver);
  screenBox.addEventListener("dragleave", dragLeave);
  screenBox.addEventListener("drop", dropFiles);
}
