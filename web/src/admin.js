// Deckard WAT (web admin tool): a small hash-routed SPA over the REST API.  #/dashboard, #/desktops, #/users/7 …
import "uplot/dist/uPlot.min.css";
import "./admin.css";
import { get, post, setToken, token, whenUnauthenticated, ApiError } from "./_admin/api.js";
import { h, clear, field, errText } from "./_admin/dom.js";
import { session, can, startEvents, stopEvents } from "./_admin/session.js";
import { RESOURCES } from "./_admin/resources.js";
import { listPage } from "./_admin/list.js";
import { detailPage, createPage } from "./_admin/detail.js";
import { rolePage, configPage } from "./_admin/editors.js";
import { dashboard } from "./_admin/dashboard.js";
import { bansPage } from "./_admin/identity.js";

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
  ["connections", "Connections", "connection.see"],
  ["admins", "Administrators", "admin.see"],
  ["roles", "Roles", "role.see"],
  ["tenants", "Tenants", "tenant.see"],
  ["audit", "Audit log", "audit.see"],
  ["config", "Configuration", "config.see"],
];

function loginView(message) {
  stopEvents();
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
      err.textContent = ex instanceof ApiError && ex.code === "bad_credentials" ? "Wrong name or password." : errText(ex);
    }
  });
  document.body.classList.add("logged-out");
  clear(app, h("main#main.login-wrap", form));
  name.focus();
}

async function logout() {
  try {
    await post("/auth/logout");
  } catch {
    /* the token may be gone already */
  }
  setToken(null);
  sessionStorage.removeItem("deckard.admin.series");
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
  if (name === "dashboard") cleanup = dashboard(main);
  else if (name === "config") configPage(main);
  else if (name === "bans") bansPage(main);
  else if (res && id === "new") createPage(main, name, res);
  else if (name === "roles" && id) rolePage(main, id);
  else if (res && id) cleanup = detailPage(main, name, res, id);
  else if (res) cleanup = listPage(main, name, res, params);
  else clear(main, h("h1", "Nothing here"), h("p", "You may not see any page: ask for a role with ACLs."));
  document.title = `${res ? res.title : MENU.find(([m]) => m === name)?.[1] || name} · Deckard admin`;
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
  session.me = null;
  setToken(null);
  loginView("Your session ended: log in again.");
});
window.addEventListener("hashchange", route);
boot();
