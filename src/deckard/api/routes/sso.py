"""Single sign-on (OpenID Connect) for the portal and the WAT: the browser's side of ``services/sso.py``.

These are navigations, not API calls, so they answer with redirects and pages, never the JSON envelope:

* ``GET /portal/sso/start?tenant=NAME`` (default: ``default``) and ``GET /admin/sso/start?tenant=NAME`` (default:
  the supertenant) send the browser to the tenant's provider (302);
* the provider sends it back to ``GET /portal/sso/callback`` or ``GET /admin/sso/callback``, which answer a small
  page (``web/pages/sso.html`` + ``web/src/sso.js``) holding the new session in data attributes: the script
  puts it where the portal (``deckard.portal.token``) or the WAT (``deckard.admin.token``) keeps its session, in
  sessionStorage, and replaces the page with ``/`` or ``/admin``.  A refusal is the same page with the reason,
  its stable code (``data-code``) and a link back, with the error's HTTP status;
* ``GET /portal/sso/logout?tenant=NAME`` sends the browser to the provider's end-session endpoint (or to ``/``).

A session token never travels in a URL (no query, no fragment) and the pages are ``Cache-Control: no-store``
and ``Referrer-Policy: no-referrer``.  The callback URL given to the provider is built from this request's
scheme and host; the provider only accepts the ones registered with it.
"""

from __future__ import annotations

from functools import lru_cache
from html import escape
from string import Template
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from deckard.api.deps import DbDep, SettingsDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.routes.portal import client_host
from deckard.model.errors import DeckardError, Unauthenticated
from deckard.services import sso, tickets
from deckard.services.roles import SUPERTENANT
from deckard.services.tenancy import DEFAULT_TENANT
from deckard.web import PAGES

router = APIRouter(tags=["sso"], include_in_schema=False, responses=ERROR_RESPONSES)

HOME = {sso.PORTAL: "/", sso.WAT: "/admin"}
NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
TenantQuery = Query(min_length=1, max_length=64, description="The tenant whose provider signs the person in.")


@lru_cache(maxsize=1)
def _template() -> Template:
    return Template((PAGES / "sso.html").read_text(encoding="utf-8"))


def _page(audience: str, *, token: str = "", login: str = "", error: DeckardError | None = None) -> HTMLResponse:
    values = {
        "audience": audience,
        "token": token,
        "login": login,
        "code": error.code if error else "",
        "status": "Single sign-on did not sign you in." if error else "Signing you in…",
        "message": error.message if error else "",
        "back": HOME[audience],
        "back_class": "" if error else "hidden",
    }
    html = _template().substitute({k: escape(v, quote=True) for k, v in values.items()})
    return HTMLResponse(html, status_code=error.status if error else 200, headers=NO_STORE)


def _callback_params(request: Request) -> dict[str, str]:
    pairs = request.query_params.multi_items()
    params = dict(pairs)
    if len(params) != len(pairs):  # two states or two codes: which one was meant is anyone's guess
        raise Unauthenticated("the sign-in answer repeats a parameter; start again", code="sso_bad_request")
    return params


async def _start(request: Request, db: DbDep, tenant: str, audience: str, callback: str) -> Response:
    try:
        url = await sso.begin(db, tenant, audience, str(request.url_for(callback)))
    except DeckardError as e:
        return _page(audience, error=e)
    return RedirectResponse(url, status_code=302, headers=NO_STORE)


@router.get("/portal/sso/start", summary="Sign in to the portal with the tenant's single sign-on")
async def portal_sso_start(
    request: Request, db: DbDep, tenant: Annotated[str, TenantQuery] = DEFAULT_TENANT
) -> Response:
    return await _start(request, db, tenant, sso.PORTAL, "portal_sso_callback")


@router.get("/portal/sso/callback", name="portal_sso_callback", summary="The provider's answer for the portal")
async def portal_sso_callback(request: Request, db: DbDep, settings: SettingsDep) -> Response:
    try:
        user, _id_token = await sso.finish_portal(
            db, _callback_params(request), source=client_host(request), network=settings.network.range
        )
        token, _expires = await tickets.open_portal_session(db, user)
    except DeckardError as e:
        return _page(sso.PORTAL, error=e)
    return _page(sso.PORTAL, token=token, login=user.login)


@router.get("/portal/sso/logout", summary="Sign out at the tenant's single sign-on provider too")
async def portal_sso_logout(
    request: Request, db: DbDep, tenant: Annotated[str, TenantQuery] = DEFAULT_TENANT
) -> Response:
    """Where the portal goes after ``POST /portal/logout`` for a person who signed in with single sign-on."""
    try:
        url = await sso.logout_url(db, tenant, "", str(request.base_url))
    except DeckardError:  # the provider is down or the tenant unknown: the portal's own logout already happened
        url = None
    return RedirectResponse(url or HOME[sso.PORTAL], status_code=302, headers=NO_STORE)


@router.get("/admin/sso/start", summary="Sign in to the WAT with single sign-on")
async def admin_sso_start(request: Request, db: DbDep, tenant: Annotated[str, TenantQuery] = SUPERTENANT) -> Response:
    return await _start(request, db, tenant, sso.WAT, "admin_sso_callback")


@router.get("/admin/sso/callback", name="admin_sso_callback", summary="The provider's answer for the WAT")
async def admin_sso_callback(request: Request, db: DbDep, settings: SettingsDep) -> Response:
    try:
        token, _expires, _id_token = await sso.finish_wat(
            db, _callback_params(request), source=client_host(request), hours=settings.api.session_hours
        )
    except DeckardError as e:
        return _page(sso.WAT, error=e)
    return _page(sso.WAT, token=token)
