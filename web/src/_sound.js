// The desktop's sound in the viewer: Opus packets from the broker's /ws/sound, decoded by the browser's own WebCodecs
// AudioDecoder and played through Web Audio behind a small jitter buffer, with a speaker button (mute) and a volume
// slider in the toolbar, both remembered in localStorage.
//
// Why WebCodecs and not the npm opus-decoder (WASM): the page's Content-Security-Policy allows no WebAssembly
// ('wasm-unsafe-eval' would open it to every script), the browser's decoder is maintained with the browser and costs
// the bundle nothing.  A browser without AudioDecoder (Safari before 26) shows "No sound" and the picture goes on.
//
// Jitter buffer: each decoded 20 ms frame is scheduled right after the one before; when the queue runs dry (a late
// packet) play-out restarts TARGET_MS ahead of now; while more than MAX_AHEAD_MS are queued (the tab was hidden,
// the network stalled, the output's clock runs slow) frames are dropped until it catches up, and a queue that stays
// above the target after a burst loses one frame a second until it is back: the delay never grows.
import { $ } from "./_viewer.js";

const STORE_KEY = "deckard.portal.sound";
const TARGET_MS = 60; // play-out delay after an underrun: three frames
const MAX_AHEAD_MS = 120; // more queued than this is dropped: bursts and a slow output clock must not add delay
const SLACK_MS = 30; // more than TARGET_MS + SLACK_MS queued for SETTLE_FRAMES frames in a row: one frame is dropped
const SETTLE_FRAMES = 50; // (a second): after a burst the delay creeps back to the target, one 20 ms frame a second
const RETRY_MS = [1000, 2000, 5000, 10000, 30000];
const FFT_SIZE = 8192; // 5.9 Hz bins at 48 kHz: the analyser the tests (and a level meter) read

let call; // portal.js's API call with the session's token
let current = null; // {desktopId, ws, decoder, closed, retries, timer}
let audio = null; // {ctx, gain, analyser}: one per page, reused by every desktop
const ONSET_LEVEL = 0.2; // a frame whose samples reach this after a quiet one is an onset (a click, a note)
const stats = { state: "off", packets: 0, bytes: 0, decoded: 0, dropped: 0, latencyMs: null, bufferMs: 0,
  ageMs: null, outputMs: null, onsets: [], analyser: null, context: null };
window.deckardSound = stats;

function prefs() {
  try {
    const p = JSON.parse(localStorage.getItem(STORE_KEY) || "{}");
    return { muted: Boolean(p.muted), volume: Number.isFinite(p.volume) ? Math.min(1, Math.max(0, p.volume)) : 0.8 };
  } catch {
    return { muted: false, volume: 0.8 };
  }
}

function savePrefs(p) {
  try {
    localStorage.setItem(STORE_KEY, JSON.stringify(p));
  } catch { /* private mode: not remembered */ }
}

export function initSound(helpers) {
  ({ call } = helpers);
  const p = prefs();
  $("#sound-volume").value = String(Math.round(p.volume * 100));
  $("#sound-toggle").addEventListener("click", () => {
    const q = prefs();
    q.muted = !q.muted;
    savePrefs(q);
    applyPrefs();
  });
  $("#sound-volume").addEventListener("input", (e) => {
    const q = prefs();
    q.volume = Number(e.currentTarget.value) / 100;
    if (q.volume > 0) q.muted = false;
    savePrefs(q);
    applyPrefs();
  });
  // browsers start an AudioContext suspended until the user interacts with the page
  const resume = () => audio && audio.ctx.state === "suspended" && audio.ctx.resume().catch(() => {});
  document.addEventListener("pointerdown", resume, true);
  document.addEventListener("keydown", resume, true);
  show("off");
}

function applyPrefs() {
  const p = prefs();
  if (audio) audio.gain.gain.value = p.muted ? 0 : p.volume;
  if (stats.state === "playing" || stats.state === "connecting") show(stats.state);
}

// the toolbar's button: what the sound is doing, in the user's words
function show(state, why = "") {
  stats.state = state;
  const button = $("#sound-toggle");
  const slider = $("#sound-volume");
  $("#sound").classList.toggle("hidden", state === "off");
  const none = state === "none";
  const muted = prefs().muted;
  button.disabled = none;
  slider.disabled = none;
  button.setAttribute("aria-pressed", String(!none && muted));
  button.dataset.state = none ? "none" : muted ? "muted" : state;
  button.textContent = none ? "No sound" : muted ? "Muted" : "Sound";
  button.title = none ? why || "This desktop has no sound." : muted ? "Unmute the desktop's sound" : "Mute the desktop's sound";
}

function ensureAudio() {
  if (audio) return audio;
  const ctx = new AudioContext({ sampleRate: 48000, latencyHint: "interactive" });
  const gain = ctx.createGain();
  const analyser = ctx.createAnalyser();
  analyser.fftSize = FFT_SIZE;
  analyser.smoothingTimeConstant = 0;
  gain.connect(analyser);
  analyser.connect(ctx.destination);
  audio = { ctx, gain, analyser, nextTime: 0 };
  Object.assign(stats, { analyser, context: ctx });
  applyPrefs();
  return audio;
}

async function supported() {
  if (typeof AudioDecoder === "undefined" || typeof AudioContext === "undefined") return false;
  try {
    const r = await AudioDecoder.isConfigSupported({ codec: "opus", sampleRate: 48000, numberOfChannels: 2 });
    return Boolean(r.supported);
  } catch {
    return false;
  }
}

// d: the desktop in the viewer (its features say whether sound is offered); called once its display is connected
export async function startSound(d) {
  stopSound();
  if (!d.features || !d.features.sound) {
    show("none", "Sound is turned off for this desktop.");
    return;
  }
  const s = { desktopId: d.id, ws: null, decoder: null, closed: false, retries: 0, timer: null };
  current = s;
  if (!(await supported())) {
    if (current === s) show("none", "This browser cannot play the desktop's sound (no WebCodecs Opus decoder).");
    return;
  }
  open(s);
}

export function stopSound() {
  const s = current;
  current = null;
  if (s) {
    s.closed = true;
    clearTimeout(s.timer);
    closeSocket(s);
  }
  if (audio) audio.nextTime = 0;
  Object.assign(stats, { packets: 0, bytes: 0, decoded: 0, dropped: 0, latencyMs: null, bufferMs: 0, onsets: [],
    loud: false });
  show("off");
}

function closeSocket(s) {
  if (s.ws) {
    s.ws.onclose = null;
    s.ws.onmessage = null;
    s.ws.close(1000);
    s.ws = null;
  }
  if (s.decoder && s.decoder.state !== "closed") s.decoder.close();
  s.decoder = null;
}

async function open(s) {
  show("connecting");
  let ticket;
  try {
    ticket = await call(`/portal/desktops/${s.desktopId}/ticket`, { method: "POST", body: { purpose: "sound" } });
  } catch (err) {
    if (s.closed) return;
    if (err.code === "sound_disabled") return show("none", "Sound is turned off for this desktop.");
    return retry(s);
  }
  if (s.closed) return;
  const a = ensureAudio();
  if (a.ctx.state === "suspended") a.ctx.resume().catch(() => {});
  const ws = new WebSocket(ticket.broker_ws_url);
  ws.binaryType = "arraybuffer";
  s.ws = ws;
  let ready = false;
  ws.onmessage = (e) => {
    if (typeof e.data === "string") {
      let msg = null;
      try {
        msg = JSON.parse(e.data);
      } catch { /* not ours */ }
      if (msg && msg.ready) {
        ready = true;
        s.decoder = makeDecoder(s, msg.ready);
        s.retries = 0;
        show("playing");
      } else if (msg && msg.error) {
        s.noSound = msg.error.code === "no_sound";
        s.why = msg.error.message;
      }
      return;
    }
    if (ready && s.decoder) receive(s, e.data);
  };
  ws.onclose = () => {
    s.ws = null;
    if (s.closed || current !== s) return;
    if (s.noSound) return show("none", `No sound: ${s.why || "this desktop has no audio server"}.`);
    retry(s);
  };
}

function retry(s) {
  if (s.closed) return;
  closeSocket(s);
  const wait = RETRY_MS[Math.min(s.retries, RETRY_MS.length - 1)];
  s.retries++;
  show("connecting");
  s.timer = setTimeout(() => open(s), wait);
}

function makeDecoder(s, header) {
  const decoder = new AudioDecoder({
    output: (data) => play(data),
    error: () => retry(s),
  });
  decoder.configure({ codec: "opus", sampleRate: header.rate || 48000, numberOfChannels: header.channels || 2 });
  return decoder;
}

// one binary message: ts_us (u64, big-endian), then an Opus packet
function receive(s, buf) {
  if (buf.byteLength <= 8) return;
  const ts = Number(new DataView(buf).getBigUint64(0));
  stats.packets++;
  stats.bytes += buf.byteLength;
  stats.ageMs = Math.round(Date.now() - ts / 1000); // capture → arrived in the page (the host's clock is shared)
  if (s.decoder.decodeQueueSize > 10) {
    stats.dropped++; // the decoder falls behind: late sound is worse than a gap
    return;
  }
  s.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: ts, data: new Uint8Array(buf, 8) }));
}

// when (wall clock, ms) a sound starting after a quiet frame will be heard: what bench/peripherals.py times clicks by
function noteOnset(samples, heardAt, rate) {
  const first = samples.findIndex((v) => Math.abs(v) >= ONSET_LEVEL);
  if (first >= 0 && !stats.loud) {
    stats.onsets.push(Math.round(heardAt + (first / rate) * 1000));
    if (stats.onsets.length > 100) stats.onsets.shift();
  }
  stats.loud = first >= 0;
}

function play(data) {
  const a = audio;
  try {
    if (!a || !current || a.ctx.state !== "running") {
      stats.dropped++;
      return;
    }
    const { ctx } = a;
    const frames = data.numberOfFrames;
    const buffer = ctx.createBuffer(data.numberOfChannels, frames, data.sampleRate);
    for (let c = 0; c < data.numberOfChannels; c++) {
      data.copyTo(buffer.getChannelData(c), { planeIndex: c, format: "f32-planar" });
    }
    const now = ctx.currentTime;
    if (a.nextTime < now + 0.005) a.nextTime = now + TARGET_MS / 1000; // ran dry: start again a little ahead
    const queued = a.nextTime - now;
    a.high = queued > (TARGET_MS + SLACK_MS) / 1000 ? (a.high || 0) + 1 : 0;
    if (queued > MAX_AHEAD_MS / 1000 || a.high >= SETTLE_FRAMES) {
      a.high = 0;
      stats.dropped++; // too much queued: skip this frame so the delay shrinks back
      return;
    }
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(a.gain);
    source.start(a.nextTime);
    const ahead = a.nextTime - now;
    a.nextTime += frames / data.sampleRate;
    stats.decoded++;
    stats.bufferMs = Math.round(ahead * 1000);
    // capture → heard: the packet's age now, plus what is queued before it, plus the output's own delay
    const out = (ctx.outputLatency || 0) + (ctx.baseLatency || 0);
    stats.outputMs = Math.round(out * 1000);
    stats.latencyMs = Math.round(stats.ageMs + (ahead + out) * 1000);
    noteOnset(buffer.getChannelData(0), Date.now() + (ahead + out) * 1000, data.sampleRate);
  } finally {
    data.close();
  }
}
