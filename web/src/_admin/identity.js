// Identity, as administrators see it: the login bans page, and on a user's page their second factor and tokens.
import { get, del } from "./api.js";
import { h, clear, fmt, toast, errText } from "./dom.js";
import { can } from "./session.js";

function table(label, columns, rows, actions) {
  const head = h("tr", columns.map(([, title]) => h("th", { scope: "col" }, title)), h("th", { scope: "col" }, h("span.sr-only", "Actions")));
  const body = h(
    "tbody",
    rows.map((r) => h("tr", columns.map(([k, title]) => h("td", { dataset: { col: k, label: title } }, fmt(r[k]))), h("td.row-actions", actions(r)))),
  );
  if (!rows.length) body.append(h("tr", h("td.empty", { colspan: columns.length + 1 }, "None.")));
  return h("div.table-wrap", h("table.list", { "aria-label": label }, h("thead", head), body));
}

// #/bans: the counters that make an account or an address wait now; "Clear" lets them log in at once.
export function bansPage(root) {
  const box = h("div");
  clear(root, h("h1", "Login bans"), h("p", "Accounts and addresses that must wait after failed logins."), box);
  async function load() {
    try {
      const { items } = await get("/auth/bans");
      const columns = [["key", "Key"], ["kind", "Kind"], ["failures", "Failures"], ["locked_until", "Locked until"]];
      clear(box, table("Login bans", columns, items, (ban) => (can("user.update") ? h("button", { type: "button", onclick: () => clearBan(ban.key) }, "Clear") : null)));
    } catch (e) {
      clear(box, h("p.error", errText(e)));
    }
  }
  async function clearBan(key) {
    try {
      await del(`/auth/bans/${encodeURIComponent(key)}`);
      toast(`${key}: cleared`);
    } catch (e) {
      toast(errText(e), "error");
    }
    load();
  }
  load();
}

// On a user's page: whether a second factor is enrolled (with a reset), and their personal tokens (with revoke).
export function userIdentityBox(user) {
  const box = h("section.card.identity", { "aria-label": "Second factor and tokens" });
  const base = `/users/${user.id}`;
  async function load() {
    const [factor, tokens] = await Promise.all([get(`${base}/second-factor`), get(`${base}/tokens`)]);
    const state = factor.enrolled ? "enrolled" : factor.pending ? "not enrolled (enrolment started)" : "not enrolled";
    const parts = [h("h2", "Second factor"), h("p", "Second factor: ", h("strong", { dataset: { field: "second_factor" } }, state))];
    if (can("user.update.password") && (factor.enrolled || factor.pending))
      parts.push(h("div.buttons", h("button.danger", { type: "button", onclick: reset }, "Reset second factor")));
    const columns = [["name", "Name"], ["created_at", "Created"], ["expires_at", "Expires"], ["last_used_at", "Last used"], ["revoked", "Revoked"]];
    const revoke = (tok) => (can("user.update") && !tok.revoked ? h("button", { type: "button", onclick: () => revokeToken(tok) }, "Revoke") : null);
    parts.push(h("h2", "Personal tokens"), table("Personal tokens", columns, tokens.items, revoke));
    clear(box, ...parts);
  }
  async function run(what, call) {
    try {
      await call();
      toast(what);
    } catch (e) {
      toast(errText(e), "error");
    }
    load().catch((e) => clear(box, h("p.error", errText(e))));
  }
  function reset() {
    if (!confirm(`Reset the second factor of ${user.login}? They log in with their password alone until they enrol again.`)) return;
    run("Second factor reset", () => del(`${base}/second-factor`));
  }
  function revokeToken(tok) {
    if (!confirm(`Revoke the token ${tok.name} of ${user.login}?`)) return;
    run(`Token ${tok.name} revoked`, () => del(`${base}/tokens/${tok.id}`));
  }
  load().catch((e) => clear(box, h("p.error", errText(e))));
  return box;
}
