// Print jobs reach the browser: the desktop's PDF printer leaves each job as a PDF in the user's ~/PDF, and while the
// viewer is open this module lists that folder every 2 s and shows a notice per new job, from which the user opens
// or saves it.  It polls because the files service only answers requests; the listing rides in the Files panel's
// socket and queue (_files.js hands over a channel), so it never cuts into a transfer.
import { $, el } from "./_viewer.js";

const POLL_MS = 2000;
const RETRY_MAX_MS = 16000; // a failing listing (desktop still starting, connection lost) is retried less and less often
const REVOKE_MS = 60000; // an opened tab may still be reading its PDF's Blob URL

// _files.js's helpers, given once by initPrints
let plain; // plain(err): err's message as the user reads it
let saveBlob; // saveBlob(file): hands it to the browser's downloads

export function initPrints(helpers) {
  ({ plain, saveBlob } = helpers);
}

// watches through channel ({listJobs, fetchJob}; null when printing is off) until stop(), which takes the notices away
export function watchPrints(channel) {
  if (!channel) return { stop() {} };
  const w = { channel, seen: null, jobs: new Map(), pending: false, failures: 0, retryAt: 0, stopped: false };
  w.timer = setInterval(() => poll(w), POLL_MS);
  poll(w);
  return { stop: () => stopWatching(w) };
}

async function poll(w) {
  if (w.stopped || w.pending || document.hidden || Date.now() < w.retryAt) return; // one listing queued at a time
  w.pending = true;
  try {
    const listing = await w.channel.listJobs();
    if (listing) noteJobs(w, listing);
    else clearInterval(w.timer); // the server has printing off after all
    w.failures = 0;
  } catch (err) {
    if (err.code === "files_disabled") clearInterval(w.timer);
    w.failures++;
    w.retryAt = Date.now() + Math.min(RETRY_MAX_MS, POLL_MS * 2 ** w.failures);
  } finally {
    w.pending = false;
  }
}

// the first listing is the baseline: jobs printed before the viewer opened are not announced
function noteJobs(w, { dir, entries }) {
  const seen = new Map();
  for (const e of entries) {
    if (e.type !== "file" || !/\.pdf$/i.test(e.name) || !e.size) continue; // an empty file: a job still being written
    const at = stamp(e.mtime);
    const before = w.seen && w.seen.get(e.name);
    if (w.seen && !w.stopped && (before === undefined || at > before)) announce(w, `${dir}/${e.name}`, e.name);
    seen.set(e.name, at);
  }
  w.seen = seen;
}

function stamp(mtime) {
  return typeof mtime === "number" ? mtime : Date.parse(mtime) / 1000 || 0; // seconds since the epoch, or ISO
}

function announce(w, path, name) {
  const old = w.jobs.get(name);
  if (old) return forgetFile(old); // printed again while its notice still shows: the buttons fetch the new one
  const job = { name, path, channel: w.channel, file: null, fetching: null, url: null };
  job.status = el("span", { class: "print-status" });
  job.li = el("li", { class: "print-job", "data-name": name },
    el("span", { class: "print-name" }, `Printed: ${name}`),
    el("span", { class: "print-actions" },
      el("button", { type: "button", class: "print-open", "aria-label": `Open ${name}`, onclick: () => openJob(job) },
        "Open"),
      el("button", { type: "button", class: "print-save", "aria-label": `Save ${name}`, onclick: () => saveJob(job) },
        "Save")),
    el("button", { type: "button", class: "print-dismiss", "aria-label": `Dismiss ${name}`,
      onclick: () => dismiss(w, job) }, el("span", { "aria-hidden": "true" }, "×")),
    job.status);
  w.jobs.set(name, job);
  $("#print-jobs ul").append(job.li);
}

function say(job, text, error = false) {
  job.status.textContent = text;
  job.li.dataset.state = error ? "error" : "";
}

// the job's PDF, fetched once for both buttons; a failure is tried again at the next click
function fileOf(job) {
  if (job.file) return Promise.resolve(job.file);
  if (!job.fetching) {
    say(job, "Getting the PDF…");
    const fetching = job.channel.fetchJob(job.path, () => {});
    job.fetching = fetching;
    fetching.then((file) => {
      if (job.fetching === fetching) job.file = file;
      say(job, "");
    }, () => {
      if (job.fetching === fetching) job.fetching = null;
    });
  }
  return job.fetching;
}

function forgetFile(job) {
  const { url } = job;
  if (url) setTimeout(() => URL.revokeObjectURL(url), REVOKE_MS);
  Object.assign(job, { file: null, fetching: null, url: null });
}

// the tab opens now, while the click still counts as the user's (pop-up blockers let it through); the PDF goes into
// it once its bytes are here
function openJob(job) {
  const tab = window.open("", "_blank");
  if (!tab) return say(job, "Your browser blocked the new tab: allow pop-ups for this site, or use Save.", true);
  tab.opener = null;
  tab.document.title = job.name;
  tab.document.body.textContent = `Getting ${job.name}…`;
  fileOf(job).then((file) => {
    job.url = job.url || URL.createObjectURL(file);
    if (!tab.closed) tab.location.replace(job.url);
  }, (err) => {
    tab.close();
    say(job, plain(err), true);
  });
}

function saveJob(job) {
  fileOf(job).then((file) => {
    saveBlob(file);
    say(job, "Saved: see your browser's downloads.");
  }, (err) => say(job, plain(err), true));
}

function dismiss(w, job) {
  const rest = [...w.jobs.values()].filter((j) => j !== job);
  const hadFocus = job.li.contains(document.activeElement);
  forgetFile(job);
  w.jobs.delete(job.name);
  job.li.remove();
  if (hadFocus) (rest.length ? $("button.print-dismiss", rest[rest.length - 1].li) : $("#disconnect")).focus();
}

function stopWatching(w) {
  w.stopped = true;
  clearInterval(w.timer);
  for (const job of w.jobs.values()) forgetFile(job);
  w.jobs.clear();
  $("#print-jobs ul").replaceChildren();
}
