// Desktop spy (/admin/spy?desktop=ID): an administrator watches a user's desktop, view-only unless asked.
// The WAT stores its admin token in sessionStorage ("deckard.admin.token") and links here.
import "./portal.css";
import { $, api, openDesktop } from "./_viewer.js";

const params = new URLSearchParams(location.search);
const desktopId = params.get("desktop");
const interactive = params.get("interactive") === "1";
const token = sessionStorage.getItem("deckard.admin.token");
let session = null;

function status(text, done = false) {
  $("#progress").classList.remove("hidden");
  $("#progress-text").textContent = text;
  $(".spinner").classList.toggle("hidden", done);
}

async function start() {
  if (!token) return status("Log in to the admin tool first (/admin), then open the spy from a desktop.", true);
  if (!desktopId || !/^\d+$/.test(desktopId)) return status("No desktop given: open this page as /admin/spy?desktop=ID.", true);
  let desk = null;
  try {
    desk = await api(`/api/v1/desktops/${desktopId}`, { token });
    $("#viewer-title").textContent = `${desk.name} (${desk.user})`;
  } catch { /* the title is a nicety */ }
  $("#banner").textContent = interactive
    ? "You are controlling this user's desktop. The user has been told."
    : "View only: you are watching this user's desktop. The user has been told.";
  status("Asking for a spy ticket…");
  let ticket;
  try {
    ticket = await api(`/api/v1/desktops/${desktopId}/spy-ticket`, { method: "POST", token, body: { interactive } });
  } catch (err) {
    return status(`Cannot watch this desktop: ${err.message}`, true);
  }
  session = openDesktop({
    target: $("#screen-canvas"),
    url: ticket.broker_ws_url,
    viewOnly: !interactive,
    onProgress: (text) => status(text),
    onConnect: () => status("Drawing the desktop…"),
    onFirstFrame: () => {
      $("#progress").classList.add("hidden");
      document.body.dataset.firstFrame = "1";
    },
    onDisconnect: (reason) => status(reason ? `Disconnected: ${reason}` : "Disconnected.", true),
  });
}

$("#disconnect").addEventListener("click", () => {
  if (session) session.disconnect();
  session = null;
});
$("#fullscreen").addEventListener("click", () => {
  if (document.fullscreenElement) document.exitFullscreen();
  else $("#viewer").requestFullscreen().catch(() => {});
});
start();
document.documentElement.dataset.ready = "1"; // the module ran (tests wait for it: deckard.testing.goto)
