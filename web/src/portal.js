// The user portal at "/": log in, see my desktops, connect to one in the page (noVNC through the broker).
import "./portal.css";
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

function showError(where, err) {
  $(where).textContent = err ? String(err.message || err) : "";
}

async function login(ev) {
  ev.preventDefault();
  showError("#login-error", "");
  const form = ev.currentTarget;
  const button = $("button", form);
  button.disabled = true;
  try {
    const res = await api("/portal/login", { method: "POST", body: { login: form.login.value.trim(), password: form.password.value } });
    token = res.token;
    sessionStorage.setItem(TOKEN_KEY, token);
    sessionStorage.setItem(TOKEN_KEY + ".login", res.login);
    $("#who").textContent = res.login;
    form.password.value = "";
    await showDesktops();
  } catch (err) {
    showError("#login-error", err);
    form.password.focus();
  } finally {
    button.disabled = false;
  }
}

async function logout() {
  if (session) session.disconnect();
  try {
    await api("/portal/logout", { method: "POST", token });
  } catch { /* already gone */ }
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  clearInterval(pollTimer);
  $("#desktops-view").classList.add("hidden");
  $("#logout").classList.add("hidden");
  $("#login-form").classList.remove("hidden");
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
  $("#viewer").classList.add("hidden");
  if (document.fullscreenElement) document.exitFullscreen();
  refresh();
  const first = $("#desktops button");
  if (first) first.focus();
}

function init() {
  $("#login-form").addEventListener("submit", login);
  $("#logout").addEventListener("click", logout);
  $("#disconnect").addEventListener("click", closeViewer);
  $("#fullscreen").addEventListener("click", () => {
    if (document.fullscreenElement) document.exitFullscreen();
    else $("#viewer").requestFullscreen().catch(() => {});
  });
  $("#clip-toggle").addEventListener("click", (e) => {
    const box = $("#clipboard");
    box.classList.toggle("hidden");
    e.currentTarget.setAttribute("aria-expanded", String(!box.classList.contains("hidden")));
    if (!box.classList.contains("hidden")) $("#clip-text").focus();
  });
  $("#clip-send").addEventListener("click", () => session && session.sendClipboard($("#clip-text").value));
  document.addEventListener("keydown", (e) => {
    // Ctrl+Alt+Shift leaves the desktop's keyboard grab for the page's buttons
    if (e.ctrlKey && e.altKey && e.shiftKey && session) $("#disconnect").focus();
  });
  $("#who").textContent = sessionStorage.getItem(TOKEN_KEY + ".login") || "";
  if (token) showDesktops();
  else $("#login-form").login.focus();
}

init();
