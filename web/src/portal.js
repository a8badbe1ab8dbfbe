// The user portal at "/": log in (with a second factor when one is due), see my desktops, connect to one in the
// page (noVNC through the broker) with its sound, move files into and out of it, and look after my account (authenticator app,
// personal tokens, SSH keys).
import "./portal.css";
import QRCode from "qrcode";
import { $, api, el, openDesktop } from "./_viewer.js";
import { initFiles, resetFiles } from "./_files.js";
import { initSound, startSound, stopSound } from "./_sound.js";

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
  stopSound();
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
      startSound(d);
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
      stopSound();
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
  stopSound();
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
  initFiles({ call, showError, plain, when, togglePanel, openPanel, showPanel });
  initSound({ call });
  document.addEventListener("keydown", (e) => {
    // Ctrl+Alt+Shift leaves the desktop's keyboard grab for the page's buttons
    if (e.ctrlKey && e.altKey && e.shiftKey && session) $("#disconnect").focus();
  });
  $("#who").textContent = sessionStorage.getItem(TOKEN_KEY + ".login") || "";
  if (token) showDesktops();
  else $("#login-form").login.focus();
}

init();
document.documentElement.dataset.ready = "1"; // the module ran (tests wait for it: deckard.testing.goto)
