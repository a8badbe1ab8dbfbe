"""Single sign-on for the portal and the WAT (``services/sso.py``, ``api/routes/sso.py``), end to end.

Real: node-oidc-provider (``tests/oidc``) on 127.0.0.1 with its password form and Cancel button; the API served by
``ApiServer`` (uvicorn, TLS) on a real port, because the provider sends the browser back to it; SQLite.  httpx
plays the browser (it follows the provider's redirects and fills its form),
and one test drives headless Chromium through the whole redirect flow for the portal.

The provider is started once per module with Deckard's callback URLs registered, so the API listens on one port
chosen for the module (each test starts and stops its own server on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from deckard.api.app import create_app
from deckard.api.server import ApiServer
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.errors import Conflict, Unauthenticated
from deckard.runtime.settings import Settings
from deckard.runtime.tls import client_context, ensure_tls
from deckard.services import admins, config, sso, users
from deckard.services.context import SYSTEM
from deckard.services.tenancy import bootstrap_farm
from deckard.testing import agoto, free_port
from oidc_provider import OidcProvider

# HTTP, flows and rules, not SQL: SQLite only (the queries underneath run on PostgreSQL in test_identity.py,
# test_second_factor.py and test_admin_identity.py), to keep make test under its time budget
DATABASES = ["sqlite"]  # read by tests/conftest.py

SECRET = "sso-test-secret-" + "x" * 24
PASSWORD = "correct horse battery staple"


def person(login: str, *groups: str) -> dict[str, Any]:
    return {"login": login, "password": PASSWORD, "name": login.title(), "email": f"{login}@example.org",
            "groups": list(groups)}  # fmt: skip


USERS = [
    person("alice", "staff"),
    person("newbie", "staff"),
    person("dave", "staff"),
    person("carol", "vdi-admins"),
    person("admin", "vdi-admins"),  # the same name as the farm's password administrator
]
MAPPING = "vdi-admins = Operator; vdi-root = Root;"
TIMEOUT_S = 40.0  # what a request may take here: generous, for a loaded machine (nothing here is timed)


@dataclass
class Api:
    url: str
    ssl: ssl.SSLContext
    db: Database
    provider: OidcProvider

    def http(self, token: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(
            base_url=self.url, verify=self.ssl, trust_env=False, headers=headers, timeout=TIMEOUT_S
        )


@dataclass
class Browser:
    """httpx as a browser: one cookie jar, redirects followed by hand so every Location is seen."""

    api: Api
    http: httpx.AsyncClient
    locations: list[str] = field(default_factory=list)

    async def follow(self, response: httpx.Response, *, stop_at_deckard: bool = False) -> httpx.Response:
        while response.is_redirect:
            location = str(response.url.join(response.headers["location"]))
            self.locations.append(location)
            if stop_at_deckard and location.startswith(self.api.url):
                return response
            response = await self.http.get(location)
        return response

    async def to_callback(self, start: str, login: str = "", *, button: str = "login") -> str:
        """Open Deckard's start URL, sign in at the provider (or press Cancel): the callback URL the provider
        sends the browser to, not opened yet."""
        started = await self.http.get(self.api.url + start)
        assert started.status_code == 302, started.text
        assert started.headers["location"].startswith(self.api.provider.issuer + "/auth?")
        assert started.headers["cache-control"] == "no-store"
        form_page = await self.follow(started)
        action = re.search(rf'<form method="post" action="([^"]+/{button})"', form_page.text)
        assert action, form_page.text
        data = {"login": login, "password": PASSWORD} if button == "login" else {}
        answer = await self.follow(await self.http.post(form_page.url.join(action[1]), data=data), stop_at_deckard=True)
        assert answer.is_redirect, answer.text
        return self.locations[-1]

    async def sign_in(self, start: str, login: str = "", *, button: str = "login") -> httpx.Response:
        """The whole flow: the page Deckard's callback answers."""
        return await self.http.get(await self.to_callback(start, login, button=button))


@contextlib.asynccontextmanager
async def browser(api: Api) -> AsyncIterator[Browser]:
    async with httpx.AsyncClient(verify=api.ssl, trust_env=False, timeout=TIMEOUT_S) as http:
        yield Browser(api, http)


def page_data(page: httpx.Response) -> dict[str, str]:
    """The data attributes of the SSO page (what web/src/sso.js reads)."""
    main = re.search(r'<main id="sso"[^>]*>', page.text)
    assert main, page.text
    return {k: v for k, v in re.findall(r'data-([a-z]+)="([^"]*)"', main[0])}


# ---- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def provider(port: int) -> Iterator[OidcProvider]:
    base = f"https://127.0.0.1:{port}"
    client = {
        "client_id": "deckard",
        "client_secret": SECRET,
        "redirect_uris": [f"{base}/portal/sso/callback", f"{base}/admin/sso/callback"],
        "post_logout_redirect_uris": [f"{base}/"],
    }
    with OidcProvider(USERS, [client]) as op:
        yield op


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return ensure_tls(tmp_path_factory.mktemp("tls"))


@contextlib.asynccontextmanager
async def serve(
    db: Database, home: Path, port: int, tls: tuple[Path, Path, Path], provider: OidcProvider
) -> AsyncIterator[Api]:
    await bootstrap_farm(db)
    for name, value in {
        "auth.oidc.issuer": provider.issuer,
        "auth.oidc.client_id": "deckard",
        "auth.oidc.client_secret": SECRET,
        "auth.oidc.admin_groups": MAPPING,
        "auth.oidc.timeout_s": TIMEOUT_S / 2,  # a loaded CI machine once took 13 s to start a sign-in
    }.items():
        await config.set_config(db, SYSTEM, name, value)
    ca, cert, key = tls
    server = ApiServer(create_app(db, Settings(home=home)), "127.0.0.1", port, cert, key)
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop))
    await asyncio.wait_for(server.started.wait(), 10)
    try:
        yield Api(f"https://127.0.0.1:{port}", client_context(ca), db, provider)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await sso.close_clients(db)


@pytest.fixture
async def api(
    db: Database, tmp_path: Path, port: int, tls: tuple[Path, Path, Path], provider: OidcProvider
) -> AsyncIterator[Api]:
    async with serve(db, tmp_path, port, tls, provider) as a:
        yield a


async def audit(db: Database, action: str) -> list[Any]:
    log = t.audit_log
    async with db.connect() as conn:
        return list((await conn.execute(sa.select(log).where(log.c.action == action).order_by(log.c.id))).all())


async def admin_row(db: Database, name: str) -> Any:
    async with db.connect() as conn:
        return (await conn.execute(sa.select(t.administrators).where(t.administrators.c.name == name))).first()


async def admin_roles(db: Database, admin_id: int) -> list[str]:
    q = (
        sa.select(t.roles.c.name)
        .join(t.admin_roles, t.admin_roles.c.role_id == t.roles.c.id)
        .where(t.admin_roles.c.admin_id == admin_id)
    )
    async with db.connect() as conn:
        return sorted(str(r.name) for r in await conn.execute(q))


# ---- the mapping's syntax -----------------------------------------------------------------------------------


def test_admin_groups_map_groups_to_roles_and_a_malformed_mapping_is_refused() -> None:
    pairs = sso.parse_admin_groups(" vdi-admins = Tenant admin ;cn=ops,dc=example = Operator; vdi-admins = Read-only;")
    assert pairs == [("vdi-admins", "Tenant admin"), ("cn=ops,dc=example", "Operator"), ("vdi-admins", "Read-only")]
    assert sso.mapped_roles(pairs, ("staff", "vdi-admins")) == ["Tenant admin", "Read-only"]
    assert sso.mapped_roles(pairs, ("VDI-ADMINS",)) == []  # group names are compared exactly
    assert sso.parse_admin_groups("") == []
    for broken in ("vdi-admins", "vdi-admins = ", " = Operator", "a = Operator;; b = Root", "a = Operator, b = Root;x"):
        with pytest.raises(Conflict) as caught:
            sso.parse_admin_groups(broken)
        assert caught.value.code == "sso_bad_admin_groups", broken


# ---- the portal ---------------------------------------------------------------------------------------------


async def test_an_existing_user_signs_in_to_the_portal_and_the_answer_works_only_once(api: Api) -> None:
    await users.create_user(api.db, SYSTEM, "alice", "local-password")
    async with browser(api) as b:
        callback = await b.to_callback("/portal/sso/start?tenant=default", "alice")
        assert callback.startswith(f"{api.url}/portal/sso/callback?") and "code=" in callback
        page = await b.http.get(callback)
        assert page.status_code == 200
        assert page.headers["cache-control"] == "no-store" and page.headers["referrer-policy"] == "no-referrer"
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert '<script type="module" src="/static/dist/sso.js"></script>' in page.text
        data = page_data(page)
        assert (data["audience"], data["login"], data["code"]) == ("portal", "alice", "")
        token = data["token"]
        assert token and all(token not in location for location in b.locations), "a token never travels in a URL"
        async with api.http(token) as http:
            assert (await http.get("/portal/desktops")).status_code == 200

        replayed = await b.http.get(callback)  # the same answer again: its flow is gone
        assert (replayed.status_code, page_data(replayed)["code"]) == (401, "sso_bad_state")
        assert page_data(replayed)["token"] == ""
    ok, failed = await audit(api.db, "user.login")
    assert (ok.result, ok.admin_name, ok.source) == ("ok", "user:alice", "127.0.0.1")
    assert json.loads(ok.arguments) == {"via": "portal", "method": "sso", "plugin": "oidc"}
    assert (failed.result, failed.error_code) == ("failed", "sso_bad_state")
    async with api.db.connect() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(t.sso_flows))).scalar_one() == 0


async def test_a_first_sso_login_provisions_the_user_and_a_desktop_when_the_tenant_auto_provisions(api: Api) -> None:
    for key, value in {"auth.auto.enabled": True, "auth.auto.osf": "default"}.items():
        await config.set_config(api.db, SYSTEM, key, value)
    async with browser(api) as b:
        page = await b.sign_in("/portal/sso/start", "newbie")  # no tenant: the default one
    assert (page.status_code, page_data(page)["login"]) == (200, "newbie")
    async with api.db.connect() as conn:
        user = (await conn.execute(sa.select(t.users).where(t.users.c.login == "newbie"))).one()
        desktops = (await conn.execute(sa.select(t.desktops).where(t.desktops.c.user_id == user.id))).all()
    assert (user.origin, user.mail, user.display_name) == ("oidc", "newbie@example.org", "Newbie")
    assert user.external_id == f"{api.provider.issuer}|newbie" and user.password_hash is None
    assert len(desktops) == 1


async def test_a_person_with_no_account_is_refused_when_the_tenant_does_not_auto_provision(api: Api) -> None:
    async with browser(api) as b:
        page = await b.sign_in("/portal/sso/start?tenant=default", "dave")
    assert (page.status_code, page_data(page)["code"]) == (403, "user_not_provisioned")
    assert "no desktop account here" in page.text and page_data(page)["token"] == ""
    async with api.db.connect() as conn:
        assert (await conn.execute(sa.select(t.users).where(t.users.c.login == "dave"))).first() is None
    (record,) = await audit(api.db, "user.login")
    assert (record.admin_name, record.error_code) == ("user:dave", "user_not_provisioned")


async def test_an_answer_with_another_state_or_none_or_twice_is_refused_and_the_real_one_still_works(
    api: Api,
) -> None:
    await users.create_user(api.db, SYSTEM, "alice", "local-password")
    async with browser(api) as b:
        callback = httpx.URL(await b.to_callback("/portal/sso/start", "alice"))
        params = dict(callback.params)
        for forged in ({**params, "state": params["state"][:-2] + "xx"}, {"code": params["code"]}):
            page = await b.http.get(callback.copy_with(params=forged))
            assert (page.status_code, page_data(page)["code"]) == (401, "sso_bad_state")
        doubled = callback.copy_with(query=callback.query + b"&state=" + params["state"].encode())
        page = await b.http.get(doubled)
        assert (page.status_code, page_data(page)["code"]) == (401, "sso_bad_request")
        page = await b.http.get(callback)
        assert (page.status_code, page_data(page)["login"]) == (200, "alice")


async def test_cancelling_at_the_provider_comes_back_as_sso_denied(api: Api) -> None:
    async with browser(api) as b:
        page = await b.sign_in("/portal/sso/start", button="abort")
    assert (page.status_code, page_data(page)["code"]) == (401, "sso_denied")
    assert "cancelled the sign-in" in page.text and '<a href="/">' in page.text  # the way back to the portal
    (record,) = await audit(api.db, "user.login")
    assert (record.result, record.error_code) == ("failed", "sso_denied")


async def test_a_tenant_without_a_provider_or_an_unknown_tenant_says_sso_is_not_configured(api: Api) -> None:
    async with api.http() as http:
        for path in ("/portal/sso/start?tenant=nowhere", "/portal/sso/start?tenant=*", "/admin/sso/start?tenant=x"):
            page = await http.get(path)
            assert (page.status_code, page_data(page)["code"]) == (409, "sso_not_configured"), path
        await config.set_config(api.db, SYSTEM, "auth.oidc.issuer", "")
        page = await http.get("/portal/sso/start")
        assert (page.status_code, page_data(page)["code"]) == (409, "sso_not_configured")
        assert "auth.oidc.issuer" in page.text
        assert (await http.get("/portal/sso/logout")).headers["location"] == "/"


async def test_portal_logout_goes_to_the_providers_end_session_and_back(api: Api) -> None:
    async with api.http() as http:
        answer = await http.get("/portal/sso/logout?tenant=default")
    assert answer.status_code == 302
    location = httpx.URL(answer.headers["location"])
    assert str(location).startswith(api.provider.issuer)
    assert dict(location.params) == {"client_id": "deckard", "post_logout_redirect_uri": f"{api.url}/"}


# ---- the WAT ------------------------------------------------------------------------------------------------


async def test_a_mapped_group_makes_an_administrator_whose_roles_follow_the_mapping_at_each_login(api: Api) -> None:
    async with browser(api) as b:
        page = await b.sign_in("/admin/sso/start", "carol")  # no tenant: the supertenant
    data = page_data(page)
    assert (page.status_code, data["audience"], data["code"]) == (200, "wat", "")
    assert page.headers["cache-control"] == "no-store"
    async with api.http(data["token"]) as http:
        me = (await http.get("/api/v1/auth/whoami")).json()
    assert (me["name"], me["tenant_id"]) == ("carol", None)
    assert "desktop.start" in me["acls"] and "admin.create" not in me["acls"]  # Operator
    carol = await admin_row(api.db, "carol")
    assert (carol.origin, carol.password_hash, carol.tenant_id) == ("oidc", None, 0)
    assert await admin_roles(api.db, carol.id) == ["Operator"]
    with pytest.raises(Unauthenticated):  # no password to log in with
        await admins.login_admin(api.db, "carol", "", source="10.0.0.1")

    await config.set_config(api.db, SYSTEM, "auth.oidc.admin_groups", "vdi-admins = Read-only")
    async with browser(api) as b:
        page = await b.sign_in("/admin/sso/start", "carol")
    assert page.status_code == 200 and await admin_roles(api.db, carol.id) == ["Read-only"]

    async with browser(api) as b:  # a tenant's WAT: an administrator of that tenant
        page = await b.sign_in("/admin/sso/start?tenant=default", "carol")
    async with api.http(page_data(page)["token"]) as http:
        me = (await http.get("/api/v1/auth/whoami")).json()
    assert me["name"] == "carol" and me["tenant_id"] not in (None, 0)

    records = await audit(api.db, "admin.login")
    assert [(r.result, r.admin_name, r.source) for r in records] == [("ok", "carol", "127.0.0.1")] * 3
    assert json.loads(records[0].arguments) == {"via": "wat", "method": "sso", "plugin": "oidc", "roles": ["Operator"]}


async def test_a_person_in_no_mapped_group_is_refused_and_an_administrator_who_left_loses_roles_and_sessions(
    api: Api,
) -> None:
    async with browser(api) as b:
        page = await b.sign_in("/admin/sso/start", "dave")
    assert (page.status_code, page_data(page)["code"]) == (403, "sso_no_admin_role")
    assert page_data(page)["token"] == "" and await admin_row(api.db, "dave") is None

    async with browser(api) as b:
        token = page_data(await b.sign_in("/admin/sso/start", "carol"))["token"]
    await config.set_config(api.db, SYSTEM, "auth.oidc.admin_groups", "vdi-root = Root")
    async with browser(api) as b:
        page = await b.sign_in("/admin/sso/start", "carol")
    assert (page.status_code, page_data(page)["code"]) == (403, "sso_no_admin_role")
    carol = await admin_row(api.db, "carol")
    assert await admin_roles(api.db, carol.id) == []
    async with api.http(token) as http:
        assert (await http.get("/api/v1/auth/whoami")).status_code == 401

    records = await audit(api.db, "admin.login")
    assert [(r.admin_name, r.result, r.error_code) for r in records] == [
        ("dave", "failed", "sso_no_admin_role"),
        ("carol", "ok", ""),
        ("carol", "failed", "sso_no_admin_role"),
    ]


async def test_sso_never_signs_in_as_a_password_administrator_and_a_broken_mapping_is_told_before_sign_in(
    api: Api,
) -> None:
    async with browser(api) as b:
        page = await b.sign_in("/admin/sso/start", "admin")
    assert (page.status_code, page_data(page)["code"]) == (409, "sso_admin_name_taken")
    assert (await admin_row(api.db, "admin")).origin == "local"

    await config.set_config(api.db, SYSTEM, "auth.oidc.admin_groups", "vdi-admins = Operator; vdi-root")
    async with api.http() as http:
        page = await http.get("/admin/sso/start")
    assert (page.status_code, page_data(page)["code"]) == (409, "sso_bad_admin_groups")
    await config.set_config(api.db, SYSTEM, "auth.oidc.admin_groups", "vdi-admins = No such role")
    async with browser(api) as b:
        page = await b.sign_in("/admin/sso/start", "carol")
    assert (page.status_code, page_data(page)["code"]) == (409, "sso_bad_admin_groups")
    assert "No such role" in page.text and await admin_row(api.db, "carol") is None


async def test_a_portal_answer_is_no_good_to_the_wat(api: Api) -> None:
    async with browser(api) as b:
        portal_answer = httpx.URL(await b.to_callback("/portal/sso/start", "carol"))
        page = await b.http.get(f"{api.url}/admin/sso/callback?{portal_answer.query.decode()}")
    assert (page.status_code, page_data(page)["code"]) == (401, "sso_bad_state")
    assert await admin_row(api.db, "carol") is None


# ---- in a real browser ----------------------------------------------------------------------------------------


async def test_chromium_signs_in_to_the_portal_and_the_wat_through_the_provider(
    tmp_path: Path, port: int, tls: tuple[Path, Path, Path], provider: OidcProvider
) -> None:
    """The real redirects in headless Chromium: start → provider's form → callback page → ``/``, where the
    portal finds its session in sessionStorage and lists the desktops; no token in any URL, no CSP violation."""
    from deckard.testing import CHROMIUM, CHROMIUM_ARGS, browser_unavailable_reason
    from deckard.web import DIST

    reason = browser_unavailable_reason() or (None if (DIST / "sso.js").exists() else "sso.js is not built")
    if reason:
        pytest.skip(reason)
    from playwright.async_api import async_playwright

    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'deckard.db'}")
    await db.start()
    try:
        async with serve(db, tmp_path, port, tls, provider) as api, async_playwright() as p:
            await users.create_user(db, SYSTEM, "alice", "local-password")
            chromium = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                context = await chromium.new_context(ignore_https_errors=True)
                page = await context.new_page()
                urls: list[str] = []
                messages: list[str] = []
                page.on("framenavigated", lambda frame: urls.append(frame.url))
                page.on("console", lambda m: messages.append(m.text))
                await agoto(page, f"{api.url}/portal/sso/start?tenant=default")
                await page.get_by_label("Login").fill("alice")
                await page.get_by_label("Password").fill(PASSWORD)
                async with page.expect_response(lambda r: r.url.endswith("/portal/desktops")) as listed:
                    await page.get_by_role("button", name="Sign in").click()
                assert (await listed.value).status == 200
                assert page.url == f"{api.url}/"
                token = await page.evaluate("sessionStorage.getItem('deckard.portal.token')")
                login = await page.evaluate("sessionStorage.getItem('deckard.portal.token.login')")
                assert token and login == "alice"
                assert any(u.startswith(f"{api.url}/portal/sso/callback?") for u in urls)
                assert all(token not in u for u in urls)

                # the WAT: its login form's single sign-on link, a fresh browser (the provider's session is not
                # shared), carol is in vdi-admins (→ Operator): the WAT opens on its dashboard with her session
                admin = await (await chromium.new_context(ignore_https_errors=True)).new_page()
                admin.on("console", lambda m: messages.append(m.text))
                await agoto(admin, f"{api.url}/admin")
                await admin.get_by_role("link", name="Sign in with single sign-on").click()
                await admin.get_by_label("Login").fill("carol")
                await admin.get_by_label("Password").fill(PASSWORD)
                async with admin.expect_response(lambda r: r.url.endswith("/api/v1/auth/whoami")) as whoami:
                    await admin.get_by_role("button", name="Sign in").click()
                assert (await whoami.value).status == 200
                assert (await (await whoami.value).json())["name"] == "carol"
                assert admin.url.startswith(f"{api.url}/admin")
                assert [m for m in messages if "Content Security Policy" in m or "Refused to" in m] == []
            finally:
                await chromium.close()
    finally:
        await db.close()
