// Deckard WAT (web admin tool): a small hash-routed SPA over the REST API.  #/dashboard, #/desktops, #/users/7 …
import "uplot/dist/uPlot.min.css";
import "./admin.css";
import QRCode from "qrcode";
import { get, post, setToken, token, whenUnauthenticated, ApiError } from "./_admin/api.js";
import { h, clear, field, errText, toast } from "./_admin/dom.js";
import { session, can, startEvents, stopEvents } from "./_admin/session.js";
import { RESOURCES } from "./_admin/resources.js";
import { listPage } from "./_admin/list.js";
import { detailPage, createPage } from "./_admin/detail.js";
import { rolePage, configPage } from "./_admin/editors.js";
import { dashboard } from "./_admin/dashboard.js";
import { bansPage } from "./_admin/identity.js";
import { networkCreatePage } from "./_admin/networks.js";
import { poolCreatePage } from "./_admin/pools.js";

performance.mark("wat:start");
const app = document.getElementById("app");
let cleanup = null;

const MENU = [
  ["dashboard", "Dashboard", "stats.see"],
  ["desktops", "Desktops", "desktop.see"],
  ["users", "Users", "user.see"],
  ["bans", "Login bans", "user.see"],
  ["nodes", "Nodes", "node.see"],
  ["images", "Images", "image.see"],
  ["osfs", "OSFs", "osf.see"],
  ["pools", "Warm pools", "osf.see"],
  ["volumes", "Volumes", "volume.see"],
  ["networks", "Networks", "network.see"],
  ["connections", "Connections", "connection.see"],
  ["admins", "Administrators", "admin.see"],
  ["roles", "Roles", "role.see"],
  ["tenants", "Tenants", "tenant.see"],
  ["audit", "Audit log", "audit.see"],
  ["config", "Configuration", "config.see"],
];

function loginView(message) {
  stopEvents();
  // the page's timers (the dashboard's refresh) end with the session: a refresh in flight at logout came back
  // 401 and drew this form again, wiping what the user had started typing
  if (cleanup) cleanup();
  cleanup = null;
  session.me = null;
  const name = h("input", { name: "name", autocomplete: "username", required: true });
  const password = h("input", { name: "password", type: "password", autocomplete: "current-password", required: true });
  const tenant = h("input", { name: "tenant", autocomplete: "organization", placeholder: "optional" });
  const err = h("p.error", { role: "alert" }, message || "");
  const form = h(
    "form.login.card",
    { "aria-label": "Log in" },
    h("h1", "Deckard admin"),
    field("Name", name),
    field("Password", password),
    field("Tenant (multi-tenant farms)", tenant),
    err,
    h("button.primary", { type: "submit" }, "Log in"),
    h("p", {}, h("a", { href: "/admin/sso/start" }, "Sign in with single sign-on")),
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    err.textContent = "";
    try {
      const body = { name: name.value.trim(), password: password.value };
      if (tenant.value.trim()) body.tenant = tenant.value.trim();
      const out = await post("/auth/login", body);
      setToken(out.token);
      await boot();
    } catch (ex) {
      if (ex instanceof ApiError && ex.code === "totp_required" && ex.details?.challenge) return codeView(ex.details.challenge);
      err.textContent = ex instanceof ApiError && ex.code === "bad_credentials" ? "Wrong name or password." : errText(ex);
    }
  });
  document.body.classList.add("logged-out");
  clear(app, h("main#main.login-wrap", form));
  name.focus();
}

// The second step of a login (401 totp_required): the app's code against the challenge, not the password again.
function codeView(challenge) {
  const code = h("input", { name: "code", autocomplete: "one-time-code", inputmode: "numeric", required: true, maxlength: 32 });
  const err = h("p.error", { role: "alert" });
  const form = h(
    "form.login.card",
    { "aria-label": "Second factor" },
    h("h1", "Deckard admin"),
    h("p", "Type the current 6-digit code of your authenticator app, or one of your recovery codes."),
    field("Code", code),
    err,
    h("button.primary", { type: "submit" }, "Continue"),
    h("p", {}, h("a", { href: "#", onclick: (e) => (e.preventDefault(), loginView()) }, "Back to the password")),
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    err.textContent = "";
    try {
      const out = await post("/auth/login/second-factor", { challenge, code: code.value.trim() });
      setToken(out.token);
      await boot();
    } catch (ex) {
      if (ex instanceof ApiError && ex.code === "challenge_expired") return loginView("The login took too long: log in again.");
      err.textContent = ex instanceof ApiError && ex.code === "bad_second_factor" ? "Wrong code: type the current one." : errText(ex);
      code.select();
      code.focus();
    }
  });
  clear(app, h("main#main.login-wrap", form));
  code.focus();
}

// the secret in groups of four, as apps that take it by hand show it
const grouped = (secret) => secret.replace(/(.{4})(?=.)/g, "$1 ");

// #/account: the administrator's own second factor — set up an authenticator app, see how many recovery codes are left.
function accountPage(root) {
  const box = h("section.card", { "aria-label": "Second factor" });
  clear(root, h("h1", "My account"), box);
  async function load() {
    try {
      const st = await get("/auth/second-factor");
      const left = st.recovery_codes_left;
      const state = st.enrolled
        ? `On: every login asks for a code from your authenticator app. ${left} recovery code${left === 1 ? "" : "s"} left.`
        : "Off: your password alone logs you in. Set up an authenticator app to protect your account.";
      const parts = [h("h2", "Second factor"), h("p", { dataset: { field: "second_factor" } }, state)];
      if (st.enrolled) parts.push(h("p", "Lost your phone? Log in with a recovery code, or ask another administrator to reset it."));
      else parts.push(h("div.buttons", h("button.primary", { type: "button", onclick: start }, "Set up authenticator app")));
      clear(box, ...parts);
    } catch (e) {
      clear(box, h("p.error", errText(e)));
    }
  }
  async function start() {
    let enrolment;
    try {
      enrolment = await post("/auth/second-factor/enrol");
    } catch (e) {
      return toast(errText(e), "error");
    }
    const canvas = h("canvas", { "aria-label": "QR code for your authenticator app" });
    const code = h("input", { name: "code", autocomplete: "one-time-code", inputmode: "numeric", required: true, maxlength: 32 });
    const err = h("p.error", { role: "alert" });
    const form = h(
      "form",
      { "aria-label": "Confirm the authenticator app" },
      h("p", "Scan the QR code with your authenticator app (or type the secret into it), then type the code it shows."),
      canvas,
      h("p", "Secret: ", h("code", { dataset: { field: "secret" } }, grouped(enrolment.secret))),
      field("Code", code),
      err,
      h("div.buttons", h("button.primary", { type: "submit" }, "Confirm"), h("button", { type: "button", onclick: load }, "Cancel")),
    );
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      err.textContent = "";
      try {
        showCodes((await post("/auth/second-factor/confirm", { code: code.value.trim() })).recovery_codes);
      } catch (ex) {
        err.textContent = errText(ex);
        code.select();
        code.focus();
      }
    });
    clear(box, h("h2", "Set up an authenticator app"), form);
    // drawn here from the otpauth:// URI: the secret never leaves the page for a QR service
    await QRCode.toCanvas(canvas, enrolment.uri, { width: 220, margin: 2, errorCorrectionLevel: "M" });
    canvas.dataset.drawn = "1";
    code.focus();
  }
  function showCodes(codes) {
    const done = h("button.primary", { type: "button", onclick: load }, "I have saved them");
    clear(
      box,
      h("h2", "Recovery codes"),
      h("p", "Each works once in place of a code if you lose your phone. Keep them somewhere safe: they are shown only now."),
      h("ul.recovery-codes", { "aria-label": "Recovery codes" }, codes.map((c) => h("li", h("code", c)))),
      h("div.buttons", done),
    );
    done.focus();
  }
  load();
}

async function logout() {
  try {
    await post("/auth/logout");
  } catch {
    /* the token may be gone already */
  }
  setToken(null);
  location.hash = "";
  loginView("Logged out.");
}

function shell() {
  const nav = h(
    "nav#menu",
    { "aria-label": "Main" },
    h("ul", MENU.filter(([, , acl]) => can(acl)).map(([id, label]) => h("li", h("a", { href: `#/${id}`, dataset: { route: id } }, label)))),
  );
  const toggle = h("button.menu-toggle", { type: "button", "aria-expanded": "false", "aria-controls": "menu" }, "Menu");
  toggle.addEventListener("click", () => {
    const open = document.body.classList.toggle("menu-open");
    toggle.setAttribute("aria-expanded", String(open));
  });
  const header = h(
    "header.top",
    h("a.skip", { href: "#main", onclick: (e) => (e.preventDefault(), document.getElementById("main").focus()) }, "Skip to content"),
    toggle,
    h("a.brand", { href: "#/dashboard" }, "Deckard"),
    h("span.live-dot", { title: "Live updates", "aria-hidden": "true" }),
    h("span.who", `${session.me.name}${session.me.tenant_id ? ` @ tenant ${session.me.tenant_id}` : ""}`),
    h("a.account", { href: "#/account" }, "My account"),
    h("button.logout", { type: "button", onclick: logout }, "Log out"),
  );
  document.body.classList.remove("logged-out");
  clear(app, header, h("div.layout", nav, h("main#main", { tabindex: "-1" })));
}

function route() {
  if (!session.me) return;
  if (cleanup) cleanup();
  cleanup = null;
  document.body.classList.remove("menu-open");
  const main = document.getElementById("main");
  const [path, query] = (location.hash.slice(2) || "").split("?");
  const params = new URLSearchParams(query || "");
  const [page, id] = path.split("/");
  const first = MENU.find(([, , acl]) => can(acl));
  const name = page || (first ? first[0] : "");
  for (const a of document.querySelectorAll("#menu a")) a.toggleAttribute("aria-current", a.dataset.route === name);
  const res = RESOURCES[name];
  if (name === "account") accountPage(main);
  else if (name === "dashboard") cleanup = dashboard(main);
  else if (name === "config") configPage(main);
  else if (name === "bans") bansPage(main);
  else if (name === "networks" && id === "new") networkCreatePage(main);
  else if (name === "pools" && id === "new") poolCreatePage(main);
  else if (res && id === "new") createPage(main, name, res);
  else if (name === "roles" && id) rolePage(main, id);
  else if (res && id) cleanup = detailPage(main, name, res, id);
  else if (res) cleanup = listPage(main, name, res, params);
  else clear(main, h("h1", "Nothing here"), h("p", "You may not see any page: ask for a role with ACLs."));
  const title = name === "account" ? "My account" : MENU.find(([m]) => m === name)?.[1] || name;
  document.title = `${res ? res.title : title} · Deckard admin`;
  if (!(name === "dashboard" && !id)) main.focus({ preventScroll: true });
}

async function boot() {
  if (!token()) return loginView();
  try {
    session.me = await get("/auth/whoami");
  } catch (e) {
    setToken(null);
    return loginView(e instanceof ApiError && e.status === 401 ? "" : errText(e));
  }
  session.acls = new Set(session.me.acls || []);
  shell();
  startEvents();
  route();
}

whenUnauthenticated(() => {
  if (!session.me) return; // logged out already: the login form stays as the user left it
  setToken(null);
  loginView("Your session ended: log in again.");
});
window.addEventListener("hashchange", route);
boot();
document.documentElement.dataset.ready = "1"; // the module ran (tests wait for it: deckard.testing.goto)
