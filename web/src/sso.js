// The end of a single sign-on (/portal/sso/callback, /admin/sso/callback): the API rendered this page with the new
// session in data attributes (never in the URL); keep it where the portal or the WAT looks for it, then go there.
// On a refusal the page already shows the reason and a way back, and this script does nothing.
import "./portal.css";

const box = document.getElementById("sso");
const { audience, token, login } = box.dataset;
box.removeAttribute("data-token");
if (token) {
  if (audience === "wat") {
    sessionStorage.setItem("deckard.admin.token", token); // web/src/_admin/api.js TOKEN_KEY
    location.replace("/admin");
  } else {
    sessionStorage.setItem("deckard.portal.token", token); // web/src/portal.js TOKEN_KEY
    sessionStorage.setItem("deckard.portal.token.login", login || "");
    location.replace("/");
  }
}
