// The user portal at "/": log in (with a second factor when one is due), see my desktops, connect to one in the
// page (noVNC through the broker), move files into and out of it, and look after my account (authenticator app,
// personal tokens, SSH keys).
import "./portal.css";
import QRCode from "qrcode";
import { $, api, el, openDesktop } from "./_viewer.js";

const TOKEN_KEY = "deckard.portal.token";
const POLL_MS = 3000;
let token = sessionStorage.getItem(TOKEN_KEY);
let pollTimer = null;
let session = null; // the open viewer
let viewerGen = 0; // bumped by every connect and close: callbacks of an older connection are ignored
const timing = (window.deckardTiming = {});

const STATE_TEXT = { stopped: "Stopped", starting: "Starting", running: "Running", stopping: "Stopping",
  failed: "Failed", zombie: "Cleaning up" };

const LOGIN_STEPS = ["#login-form", "#code-form", "#enrol-form", "#codes-view"];
const SESSION_GONE = new Set(["bad_token", "session_expired", "no_credentials"]);
let challenge = null; // the second step of a login: details.challenge of its first answer
let enrolled = null; // a login completed by enrolling: its session, kept until the recovery codes are saved

// the portal's own calls: the session's token unless ``auth`` is false (the steps of a login)
function call(path, { method = "GET", body, auth = true } = {}) {
  return api(path, { method, body, token: auth ? token : undefined });
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString([], { dateStyle: "medium", timeStyle: "short" }) : "";
}

// what went wrong, in the server's words (they say what to do), with a lock's end in the reader's own time
function plain(err) {
  if (!err) return "";
  let text = String(err.message || err);
  text = text.charAt(0).toUpperCase() + text.slice(1);
  if (err.code === "account_locked" && err.details && err.details.locked_until) {
    text = `This account is locked until ${when(err.details.locked_until)} after too many failed logins: ` +
      "wait, or ask your administrator to clear it.";
  }
  return text;
}

function showError(where, err) {
  $(where).textContent = plain(err);
}

function showStep(which) {
  for (const sel of LOGIN_STEPS) $(sel).classList.toggle("hidden", sel !== which);
  const first = $(which).querySelector("input, button.primary");
  if (first) first.focus();
}

async function busy(form, work) {
  const buttons = [...form.querySelectorAll("button")];
  buttons.forEach((b) => { b.disabled = true; });
  try {
    await work();
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
}

async function loggedIn(res) {
  token = res.token;
  sessionStorage.setItem(TOKEN_KEY, token);
  sessionStorage.setItem(TOKEN_KEY + ".login", res.login);
  $("#who").textContent = res.login;
  challenge = null;
  enrolled = null;
  $("#login-form").password.value = "";
  $("#login-codes").replaceChildren();
  for (const sel of LOGIN_STEPS) $(sel).classList.add("hidden");
  await showDesktops();
}

async function login(ev) {
  ev.preventDefault();
  showError("#login-error", "");
  const form = ev.currentTarget;
  await busy(form, async () => {
    try {
      const body = { login: form.login.value.trim(), password: form.password.value };
      await loggedIn(await call("/portal/login", { method: "POST", body, auth: false }));
    } catch (err) {
      if (err.code === "totp_required") return secondStep(err.details.challenge);
      if (err.code === "totp_enrolment_required" && err.details.challenge) return enrolStep(err.details.challenge);
      showError("#login-error", err);
      form.password.focus();
    }
  });
}

function backToLogin(err) {
  challenge = null;
  showStep("#login-form");
  showError("#login-error", err);
}

function secondStep(ch) {
  challenge = ch;
  $("#code").value = "";
  showError("#code-error", "");
  showStep("#code-form");
}

async function sendCode(ev) {
  ev.preventDefault();
  const form = ev.currentTarget;
  showError("#code-error", "");
  await busy(form, async () => {
    try {
      const body = { challenge, code: $("#code").value.trim() };
      await loggedIn(await call("/portal/login/second-factor", { method: "POST", body, auth: false }));
    } catch (err) {
      if (err.code === "challenge_expired") return backToLogin(err);
      showError("#code-error", err);
      $("#code").select();
      $("#code").focus();
    }
  });
}

// the secret in groups of four, as apps that take it by hand show it
function grouped(secret) {
  return secret.replace(/(.{4})(?=.)/g, "$1 ");
}

async function drawEnrolment(canvas, secretEl, enrolment) {
  secretEl.textContent = grouped(enrolment.secret);
  // drawn here from the otpauth:// URI: the secret never leaves the page for a QR service
  await QRCode.toCanvas(canvas, enrolment.uri, { width: 220, margin: 2, errorCorrectionLevel: "M" });
  canvas.dataset.drawn = "1";
}

async function enrolStep(ch) {
  challenge = ch;
  $("#enrol-code").value = "";
  showError("#enrol-error", "");
  try {
    const enrolment = await call("/portal/login/enrol", { method: "POST", body: { challenge }, auth: false });
    await drawEnrolment($("#enrol-qr"), $("#enrol-secret"), enrolment);
    showStep("#enrol-form");
  } catch (err) {
    backToLogin(err);
  }
}

async function confirmEnrolment(ev) {
  ev.preventDefault();
  const form = ev.currentTarget;
  showError("#enrol-error", "");
  await busy(form, async () => {
    try {
      const body = { challenge, code: $("#enrol-code").value.trim() };
      enrolled = await call("/portal/login/enrol/confirm", { method: "POST", body, auth: false });
      listCodes($("#login-codes"), enrolled.recovery_codes);
      showStep("#codes-view");
    } catch (err) {
      if (err.code === "challenge_expired") return backToLogin(err);
      showError("#enrol-error", err);
      $("#enrol-code").select();
      $("#enrol-code").focus();
    }
  });
}

function listCodes(list, codes) {
  list.replaceChildren(...codes.map((c) => el("li", {}, el("code", {}, c))));
}

async function copyText(button) {
  const source = $(`#${button.dataset.copy}`);
  const text = source.tagName === "OL" ? [...source.querySelectorAll("li")].map((li) => li.textContent).join("\n")
    : source.textContent;
  const label = button.textContent;
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    // no clipboard permission: select it, for Ctrl+C
    getSelection().selectAllChildren(source);
    button.textContent = "Selected: press Ctrl+C";
  }
  setTimeout(() => { button.textContent = label; }, 2000);
}

async function logout() {
  if (session) session.disconnect();
  resetFiles(null);
  try {
    await api("/portal/logout", { method: "POST", token });
  } catch { /* already gone */ }
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  clearInterval(pollTimer);
  $("#desktops-view").classList.add("hidden");
  closeAccount(false);
  $("#logout").classList.add("hidden");
  $("#account").classList.add("hidden");
  $("#who").textContent = "";
  showStep("#login-form");
  $("#login-form").login.focus();
}

function desktopItem(d) {
  const state = d.blocked ? "blocked" : d.state;
  const busy = d.cmd !== null;
  const stopped = (d.state === "stopped" || d.state === "failed") && !busy;
  return el(
    "li",
    { "data-desktop": d.id, "aria-label": `Desktop ${d.name}` },
    el("div", { class: "name" }, d.name),
    el("div", {}, el("span", { class: `badge ${state}`, "data-state": state }, d.blocked ? "Blocked" : STATE_TEXT[d.state] || d.state),
      d.user_state === "connected" ? " · connected" : ""),
    d.failure_reason && d.state === "failed" ? el("div", { class: "error" }, d.failure_reason) : "",
    el("div", { class: "actions" },
      el("button", { class: "primary", onclick: () => connect(d), disabled: d.blocked, "aria-label": `Connect to ${d.name}` }, "Connect"),
      el("button", { onclick: () => act(d, "stop"), disabled: stopped || d.blocked, "aria-label": `Stop ${d.name}` }, "Stop"),
      el("button", { class: "danger", onclick: () => reset(d), disabled: !stopped || d.blocked, "aria-label": `Reset ${d.name} to a clean image` }, "Reset my desktop"),
    ),
  );
}

async function refresh() {
  if (!token) return;
  try {
    const desktops = await api("/portal/desktops", { token });
    const list = $("#desktops");
    const focused = document.activeElement && document.activeElement.getAttribute("aria-label");
    list.replaceChildren(...desktops.map(desktopItem));
    $("#empty").classList.toggle("hidden", desktops.length > 0);
    if (focused) {
      const again = [...list.querySelectorAll("button")].find((b) => b.getAttribute("aria-label") === focused);
      if (again) again.focus();
    }
    showError("#list-error", "");
  } catch (err) {
    if (err.status === 401) return logout();
    showError("#list-error", err);
  }
}

async function showDesktops() {
  $("#login-form").classList.add("hidden");
  $("#desktops-view").classList.remove("hidden");
  $("#logout").classList.remove("hidden");
  $("#account").classList.remove("hidden");
  await refresh();
  clearInterval(pollTimer);
  pollTimer = setInterval(refresh, POLL_MS);
}

async function act(d, action) {
  try {
    await api(`/portal/desktops/${d.id}/${action}`, { method: "POST", token });
  } catch (err) {
    showError("#list-error", err);
  }
  await refresh();
}

async function reset(d) {
  if (!confirm(`Reset ${d.name}? Programs installed outside your home directory are discarded.`)) return;
  await act(d, "reset");
}

// ---- my account: second factor and personal tokens ----------------------------------------------------------

async function accountCall(path, opts, where) {
  try {
    return await call(path, opts);
  } catch (err) {
    if (err.status === 401 && SESSION_GONE.has(err.code)) {
      await logout();
    } else {
      showError(where, err);
    }
    return undefined;
  }
}

function openAccount() {
  $("#desktops-view").classList.add("hidden");
  $("#account-view").classList.remove("hidden");
  $("#account").setAttribute("aria-expanded", "true");
  showError("#sf-error", "");
  showError("#tokens-error", "");
  showError("#keys-error", "");
  $("#keys-status").textContent = "";
  $("#account-title").focus();
  loadSecondFactor();
  loadTokens();
  loadKeys();
}

function closeAccount(back = true) {
  $("#account-view").classList.add("hidden");
  $("#account").setAttribute("aria-expanded", "false");
  for (const sel of ["#sf-enrol", "#sf-codes", "#token-new"]) $(sel).classList.add("hidden");
  $("#account-codes").replaceChildren();
  $("#token-secret").textContent = "";
  $("#token-qvd").textContent = "";
  if (back) {
    $("#desktops-view").classList.remove("hidden");
    const first = $("#desktops button");
    if (first) first.focus();
  }
}

async function loadSecondFactor() {
  const st = await accountCall("/portal/me/second-factor", {}, "#sf-error");
  if (!st) return;
  const left = st.recovery_codes_left;
  $("#sf-status").textContent = st.enrolled
    ? `On: every login asks for a code from your authenticator app. ${left} recovery code${left === 1 ? "" : "s"} left.`
    : "Off: your password alone logs you in. Set up an authenticator app to protect your account.";
  const enrolling = !$("#sf-enrol").classList.contains("hidden");
  $("#sf-start").classList.toggle("hidden", st.enrolled || enrolling);
  $("#sf-regen").classList.toggle("hidden", !st.enrolled);
}

async function startSecondFactor() {
  showError("#sf-error", "");
  const enrolment = await accountCall("/portal/me/second-factor/enrol", { method: "POST" }, "#sf-error");
  if (!enrolment) return;
  await drawEnrolment($("#sf-qr"), $("#sf-secret"), enrolment);
  $("#sf-code").value = "";
  $("#sf-start").classList.add("hidden");
  $("#sf-enrol").classList.remove("hidden");
  $("#sf-code").focus();
}

async function confirmSecondFactor(ev) {
  ev.preventDefault();
  showError("#sf-error", "");
  await busy(ev.currentTarget, async () => {
    const body = { code: $("#sf-code").value.trim() };
    const res = await accountCall("/portal/me/second-factor/confirm", { method: "POST", body }, "#sf-error");
    if (!res) return $("#sf-code").focus();
    $("#sf-enrol").classList.add("hidden");
    showAccountCodes(res.recovery_codes);
    await loadSecondFactor();
  });
}

function cancelSecondFactor() {
  // the unconfirmed secret stays pending and guards nothing; setting up again replaces it
  $("#sf-enrol").classList.add("hidden");
  showError("#sf-error", "");
  loadSecondFactor();
}

async function regenerateCodes() {
  if (!confirm("Make new recovery codes? The old ones stop working.")) return;
  showError("#sf-error", "");
  const res = await accountCall("/portal/me/second-factor/recovery-codes", { method: "POST" }, "#sf-error");
  if (!res) return;
  showAccountCodes(res.recovery_codes);
  await loadSecondFactor();
}

function showAccountCodes(codes) {
  listCodes($("#account-codes"), codes);
  $("#sf-codes").classList.remove("hidden");
  $("#sf-codes-saved").focus();
}

function tokenRow(tk) {
  const expired = new Date(tk.expires_at) <= new Date();
  const state = tk.revoked ? "Revoked" : expired ? "Expired" : "Active";
  return el("tr", { "data-token": tk.id },
    el("th", { scope: "row" }, tk.name),
    el("td", {}, when(tk.created_at)),
    el("td", {}, when(tk.expires_at)),
    el("td", {}, tk.last_used_at ? when(tk.last_used_at) : "Never"),
    el("td", {}, el("span", { class: `badge ${state.toLowerCase()}` }, state)),
    el("td", {}, state === "Active"
      ? el("button", { class: "danger", type: "button", onclick: () => revokeToken(tk), "aria-label": `Revoke token ${tk.name}` }, "Revoke")
      : ""),
  );
}

async function loadTokens() {
  const rows = await accountCall("/portal/me/tokens", {}, "#tokens-error");
  if (!rows) return;
  $("#tokens tbody").replaceChildren(...rows.map(tokenRow));
  $("#tokens").classList.toggle("hidden", rows.length === 0);
  $("#tokens-empty").classList.toggle("hidden", rows.length > 0);
}

async function createToken(ev) {
  ev.preventDefault();
  const form = ev.currentTarget;
  showError("#tokens-error", "");
  await busy(form, async () => {
    const body = { name: form.name.value.trim(), days: Number(form.days.value) };
    const made = await accountCall("/portal/me/tokens", { method: "POST", body }, "#tokens-error");
    if (!made) return form.name.focus();
    $("#token-secret").textContent = made.token;
    $("#token-qvd").textContent = `--token ${made.token}`;
    $("#token-new").classList.remove("hidden");
    form.name.value = "";
    await loadTokens();
    $("#token-new button.copy").focus();
  });
}

function forgetNewToken() {
  $("#token-new").classList.add("hidden");
  $("#token-secret").textContent = "";
  $("#token-qvd").textContent = "";
  $("#token-name").focus();
}

async function revokeToken(tk) {
  if (!confirm(`Revoke the token ${tk.name}? Whatever uses it stops working.`)) return;
  showError("#tokens-error", "");
  const res = await accountCall(`/portal/me/tokens/${tk.id}`, { method: "DELETE" }, "#tokens-error");
  if (res !== undefined) await loadTokens();
}

// one key per line in the text box; the server checks each and answers what it stored (blank lines, repeats gone)
function showKeys(keys) {
  $("#keys-text").value = keys.join("\n");
  $("#keys-status").textContent = keys.length
    ? `${keys.length} key${keys.length === 1 ? "" : "s"}: your desktops get ${keys.length === 1 ? "it" : "them"} when they next start.`
    : "No SSH key.";
}

async function loadKeys() {
  const res = await accountCall("/portal/me/ssh-keys", {}, "#keys-error");
  if (res) showKeys(res.keys);
}

async function saveKeys(ev) {
  ev.preventDefault();
  showError("#keys-error", "");
  await busy(ev.currentTarget, async () => {
    const keys = $("#keys-text").value.split("\n").map((k) => k.trim()).filter(Boolean);
    const res = await accountCall("/portal/me/ssh-keys", { method: "PUT", body: { keys } }, "#keys-error");
    if (!res) return $("#keys-text").focus();
    showKeys(res.keys);
  });
}

function geometry() {
  const box = $("#screen");
  const w = Math.max(640, Math.min(3840, box.clientWidth || window.innerWidth));
  const h = Math.max(480, Math.min(2160, box.clientHeight || window.innerHeight - 48));
  return `${w - (w % 2)}x${h - (h % 2)}`;
}

async function connect(d) {
  const gen = ++viewerGen;
  const current = (fn) => (...args) => gen === viewerGen && fn(...args);
  timing.click = performance.now();
  timing.firstFrame = undefined;
  document.body.dataset.firstFrame = "";
  const viewer = $("#viewer");
  resetFiles(d);
  viewer.classList.remove("hidden");
  $("#viewer-title").textContent = d.name;
  setProgress("Asking for access…");
  $("#disconnect").focus();
  let ticket;
  try {
    ticket = await api(`/portal/desktops/${d.id}/ticket`, { method: "POST", token });
  } catch (err) {
    if (gen === viewerGen) setProgress(`Cannot connect: ${err.message}`, true);
    return;
  }
  if (gen !== viewerGen) return; // closed (or connected again) while the ticket was on its way
  const screen = $("#screen-canvas");
  screen.replaceChildren();
  const url = `${ticket.broker_ws_url}&geometry=${geometry()}`;
  session = openDesktop({
    target: screen,
    url,
    onProgress: current((text) => setProgress(text)),
    onConnect: current(() => {
      timing.connected = performance.now();
      setProgress("Drawing your desktop…");
    }),
    onFirstFrame: current(() => {
      timing.firstFrame = performance.now();
      document.body.dataset.firstFrame = String(timing.firstFrame - timing.click);
      $("#progress").classList.add("hidden");
      session.rfb.focus();
    }),
    // a late close of a connection the user already left must not touch the one open now
    onDisconnect: current((reason, clean) => {
      session = null;
      if (!viewer.classList.contains("hidden")) {
        setProgress(reason ? `Disconnected: ${reason}` : clean ? "Disconnected." : "The connection was lost.", true);
      }
      refresh();
    }),
    onClipboard: current((text) => {
      $("#clip-text").value = text;
    }),
  });
}

function setProgress(text, done = false) {
  const p = $("#progress");
  p.classList.remove("hidden");
  $("#progress-text").textContent = text;
  $(".spinner", p).classList.toggle("hidden", done);
}

function closeViewer() {
  viewerGen++;
  if (session) session.disconnect();
  session = null;
  resetFiles(null);
  $("#viewer").classList.add("hidden");
  if (document.fullscreenElement) document.exitFullscreen();
  refresh();
  const first = $("#desktops button");
  if (first) first.focus();
}

// a toolbar button shows and hides the panel its aria-controls names; returns whether the panel is now open
function togglePanel(button) {
  const open = $(`#${button.getAttribute("aria-controls")}`).classList.contains("hidden");
  showPanel(button, open);
  return open;
}

// opens a button's panel without moving the focus; returns whether it was open already
function openPanel(button) {
  const wasOpen = button.getAttribute("aria-expanded") === "true";
  showPanel(button, true);
  return wasOpen;
}

function showPanel(button, open) {
  $(`#${button.getAttribute("aria-controls")}`).classList.toggle("hidden", !open);
  button.setAttribute("aria-expanded", String(open));
}

// ---- files: upload into the desktop's ~/Uploads, download from its home ------------------------------------------

const FILES_SLICE = 256 * 1024; // bytes per binary frame of an upload
const FILES_HIGH_WATER = 4 * 1024 * 1024; // stop reading the file while the socket holds this much unsent
const FILES_READY_MS = 15000;
const FILES_DEFAULT_DIR = "Downloads";
let files = null; // the Files panel of the open desktop: {desktopId, socket, queue, maxUpload, dir, closed}
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
      sock.maxUpload = (await sock.expect(null, (msg) => msg.ready)).max_upload_bytes;
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

// a new desktop in the viewer (or none): the old socket closes, queued work is dropped, the panel starts empty
function resetFiles(d) {
  if (files) {
    files.closed = true;
    if (files.socket) files.socket.close();
  }
  files = d && filesEnabled(d)
    ? { desktopId: d.id, socket: null, queue: Promise.resolve(), maxUpload: null, dir: null, closed: false }
    : null;
  $("#files-toggle").classList.toggle("hidden", !files);
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

async function socketOf(st) {
  if (st.socket && st.socket.open) return st.socket;
  st.socket = null;
  let sock;
  try {
    sock = await FilesSocket.open(st.desktopId, (err) => st === files && showError("#files-error", err));
  } catch (err) {
    if (st === files) showError("#files-error", err);
    throw err;
  }
  if (st.closed) {
    sock.close();
    throw new Error("closed"); // the viewer moved on: nobody shows this
  }
  st.socket = sock;
  st.maxUpload = sock.maxUpload;
  showError("#files-error", "");
  return sock;
}

// the server takes one operation at a time per socket: each waits for the one before; fail(err) reports a failure
// while its desktop is still the one in the viewer
function enqueue(st, work, fail) {
  st.queue = st.queue
    .then(() => (st.closed ? undefined : work()))
    .catch((err) => { if (st === files) fail(err); });
  return st.queue;
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
    const sock = await socketOf(st);
    const res = await sock.request({ op: "list", dir }, (msg) => (msg.op === "list" && msg.entries ? msg : undefined));
    if (st === files) showListing(st, res);
  }, (err) => {
    $("#files-status").textContent = "";
    showError("#files-error", err);
  }).then(() => $("#files-list").removeAttribute("aria-busy"));
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
    const parts = [];
    let file = null;
    let got = 0;
    const done = await sock.request({ op: "download", path }, (msg) => {
      if (msg instanceof ArrayBuffer) {
        if (file) { // frames before the header are a cancelled download's tail
          parts.push(msg);
          got += msg.byteLength;
          showProgress(t, got, file.size);
        }
        return undefined;
      }
      if (msg.op !== "download") return undefined;
      if (msg.file) file = msg.file;
      return msg.done;
    });
    if (got !== done.size) throw new Error("The download was cut short: try again.");
    saveBlob(new Blob(parts), file.name);
    return "Downloaded: see your browser's downloads.";
  });
}

function saveBlob(blob, name) {
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
  e.dataTransfer.dropEffect = files ? "copy" : "none";
  showDrop(Boolean(files));
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
  if (!files) return;
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

function init() {
  $("#login-form").addEventListener("submit", login);
  $("#code-form").addEventListener("submit", sendCode);
  $("#enrol-form").addEventListener("submit", confirmEnrolment);
  for (const b of document.querySelectorAll("button.back")) b.addEventListener("click", () => backToLogin(""));
  $("#codes-saved").addEventListener("click", () => loggedIn(enrolled));
  for (const b of document.querySelectorAll("button.copy")) b.addEventListener("click", () => copyText(b));
  $("#logout").addEventListener("click", logout);
  $("#account").addEventListener("click", () => ($("#account-view").classList.contains("hidden") ? openAccount() : closeAccount()));
  $("#account-back").addEventListener("click", () => closeAccount());
  $("#sf-start").addEventListener("click", startSecondFactor);
  $("#sf-enrol").addEventListener("submit", confirmSecondFactor);
  $("#sf-cancel").addEventListener("click", cancelSecondFactor);
  $("#sf-regen").addEventListener("click", regenerateCodes);
  $("#sf-codes-saved").addEventListener("click", () => {
    $("#sf-codes").classList.add("hidden");
    $("#account-codes").replaceChildren();
    $("#sf-title").focus();
  });
  $("#token-form").addEventListener("submit", createToken);
  $("#token-done").addEventListener("click", forgetNewToken);
  $("#keys-form").addEventListener("submit", saveKeys);
  $("#disconnect").addEventListener("click", closeViewer);
  $("#fullscreen").addEventListener("click", () => {
    if (document.fullscreenElement) document.exitFullscreen();
    else $("#viewer").requestFullscreen().catch(() => {});
  });
  $("#clip-toggle").addEventListener("click", (e) => {
    if (togglePanel(e.currentTarget)) $("#clip-text").focus();
  });
  $("#clip-send").addEventListener("click", () => session && session.sendClipboard($("#clip-text").value));
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
  document.addEventListener("keydown", (e) => {
    // Ctrl+Alt+Shift leaves the desktop's keyboard grab for the page's buttons
    if (e.ctrlKey && e.altKey && e.shiftKey && session) $("#disconnect").focus();
  });
  $("#who").textContent = sessionStorage.getItem(TOKEN_KEY + ".login") || "";
  if (token) showDesktops();
  else $("#login-form").login.focus();
}

init();
