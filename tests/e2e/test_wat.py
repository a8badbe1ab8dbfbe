"""The web admin tool (WAT) driven in Debian's Chromium by Playwright over a real API (SQLite, TLS, in-process).

Covers: login, the dashboard (empty states, a time axis around now), creating a user and a desktop through the UI,
lists, a bulk action with per-item results, live updates from the event stream, the ACL-aware UI of a Read-only
administrator, tenant networks (the API's refusals shown, a desktop and an OSF put on one), and the screenshots of
each main page (``docs/screenshots/wat-*.png``).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from deckard.testing import goto

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "docs" / "screenshots"


@dataclass
class Api:
    url: str
    password: str
    verify: Any

    def http(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url + "/api/v1", verify=self.verify, headers=headers, trust_env=False)

    def token(self, name: str = "admin", password: str | None = None) -> str:
        with self.http() as c:
            r = c.post("/auth/login", json={"name": name, "password": password or self.password})
            r.raise_for_status()
            return str(r.json()["token"])


class ApiThread:
    """``deckard.api.server.ApiServer`` over SQLite on its own event loop in a thread."""

    def __init__(self, home: Path, prepare: Any = None) -> None:
        self.home = home
        self.prepare = prepare  # optional ``async (db) -> None`` run after bootstrap, before serving (bench)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:
            self.error = e
            self.ready.set()

    async def _main(self) -> None:
        from deckard.api.app import create_app
        from deckard.api.server import ApiServer
        from deckard.db.engine import Database
        from deckard.runtime.settings import Settings
        from deckard.runtime.tls import client_context, ensure_tls
        from deckard.services.tenancy import bootstrap_farm

        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        db = Database(f"sqlite+aiosqlite:///{self.home / 'deckard.db'}")
        await db.start()
        try:
            password = await bootstrap_farm(db)
            if self.prepare:
                await self.prepare(db)
            ca, cert, key = ensure_tls(self.home / "tls")
            server = ApiServer(create_app(db, Settings(home=self.home)), "127.0.0.1", 0, cert, key)
            task = asyncio.create_task(server.run(self.stop))
            await asyncio.wait_for(server.started.wait(), 10)
            self.api = Api(f"https://127.0.0.1:{server.port}", str(password), client_context(ca))
            self.ready.set()
            await task
        finally:
            await db.close()

    def __enter__(self) -> Api:
        self.thread.start()
        self.ready.wait(30)
        if self.error:
            raise self.error
        return self.api

    def __exit__(self, *exc: object) -> None:
        if self.loop and self.stop:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(15)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with ApiThread(tmp_path_factory.mktemp("wat")) as a:
        yield a


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 860})
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)  # the suite boots VMs beside it: a busy machine
    pg.on("console", lambda m: m.type in ("error", "warning") and print("console:", m.type, m.text))
    pg.on("pageerror", lambda e: print("pageerror:", e))
    try:
        yield pg
    finally:
        ctx.close()


def login(page: Any, api: Api, name: str = "admin", password: str | None = None) -> None:
    for attempt in range(3):
        goto(page, api.url + "/admin")
        try:  # a script lost to ERR_NETWORK_CHANGED (the other test worker's taps and veths) leaves a blank page
            page.get_by_label("Name").wait_for(timeout=15_000)
            break
        except Exception:
            if attempt == 2:
                raise
    page.get_by_label("Name").fill(name)
    page.get_by_label("Password").fill(password or api.password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_selector("header.top")
    assert page.evaluate("sessionStorage.getItem('deckard.admin.token')").startswith("dk_")


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"wat-{name}.png"), full_page=True)


def test_admin_creates_a_user_and_a_desktop_and_runs_a_bulk_action(page: Any, api: Api) -> None:
    login(page, api)
    page.wait_for_function("() => document.body.dataset.dashboard === 'drawn'")
    assert page.locator(".count").count() >= 4
    for chart in ("live", "ttd"):  # a chart, or its empty state (another test of this farm may have run first)
        assert page.locator(f"#chart-{chart}:not([hidden]) canvas, #chart-{chart}-empty:not([hidden])").count() == 1

    # a user through the create form
    goto(page, api.url + "/admin#/users/new")
    page.get_by_label("login").fill("alice")
    page.get_by_label("password").fill("Alice-secret-42")
    page.get_by_label("description").fill("made in the WAT")
    page.get_by_role("button", name="Create").click()
    page.wait_for_selector("h1:has-text('user alice')")
    goto(page, api.url + "/admin#/users")
    page.wait_for_selector("table.list tbody tr td a:has-text('alice')")
    shot(page, "users")

    # two desktops through the UI
    for name in ("web1", "web2"):
        goto(page, api.url + "/admin#/desktops/new")
        page.get_by_label("name", exact=True).fill(name)
        page.get_by_label("User (login)").fill("alice")
        page.get_by_role("button", name="Create").click()
        page.wait_for_selector(f"h1:has-text('desktop {name}')")
    goto(page, api.url + "/admin#/desktops")
    rows = page.locator("table.list tbody tr")
    page.wait_for_selector("table.list tbody tr td a:has-text('web2')")
    assert rows.count() == 2
    assert page.locator(".total").inner_text() == "2 in total"

    # filter by column, then clear it
    page.get_by_label("Filter name").fill("web2")
    page.get_by_label("Filter name").press("Enter")
    page.wait_for_function("() => document.querySelectorAll('table.list tbody tr').length === 1")
    page.get_by_label("Filter name").fill("")
    page.get_by_label("Filter name").press("Enter")
    page.wait_for_function("() => document.querySelectorAll('table.list tbody tr').length === 2")

    # bulk start of both: no node in this farm, so each one fails with no_node, shown per item
    page.get_by_label("Select all rows on this page").check()
    page.locator("button.bulk[data-action='start']").click()
    page.wait_for_selector(".bulk-results h3")
    results = page.locator(".bulk-results li")
    assert results.count() == 2
    for i in range(2):
        assert "no_node" in results.nth(i).inner_text()
    assert "0 ok, 2 failed" in page.locator(".bulk-results h3").inner_text()

    # live update: blocking web1 through the API changes its row without a reload
    token = page.evaluate("sessionStorage.getItem('deckard.admin.token')")
    with api.http(token) as c:
        c.post("/desktops/web1/block").raise_for_status()
    page.wait_for_selector("table.list tbody tr:has(a:has-text('web1')) .s-blocked")

    # role editor, audit log with the chain check, config editor
    goto(page, api.url + "/admin#/roles")
    page.locator("table.list a", has_text="Operator").click()
    page.wait_for_selector(".acl-tree li.acl", state="attached")
    assert page.locator(".acl-tree li.acl.on").count() > 0
    shot(page, "roles")

    goto(page, api.url + "/admin#/audit")
    page.wait_for_selector("table.list tbody tr td")
    page.get_by_role("button", name="Verify chain").click()
    page.wait_for_selector(".verify-result.ok")
    shot(page, "audit")

    goto(page, api.url + "/admin#/config")
    row = page.locator("tr[data-key='ui.page_size']")
    row.get_by_label("Value of ui.page_size").fill("40")
    row.get_by_role("button", name="Set", exact=True).click()
    page.wait_for_selector("tr[data-key='ui.page_size'] .src-global")
    shot(page, "config")

    # an OSF's layer: only the keys that may differ per OSF; the egress policy is a rule per line
    page.get_by_label("OSF layer").fill("default")
    page.get_by_label("OSF layer").press("Tab")  # leaving the field fires its one change event
    page.wait_for_selector("tr[data-key='ui.page_size']", state="detached")  # the table is the OSF's now
    page.wait_for_selector("tr[data-key='network.egress']")
    egress = page.locator("tr[data-key='network.egress']")
    egress.get_by_label("Value of network.egress").fill("deny tcp any port 25\ndeny 10.0.0.0/8")
    egress.get_by_role("button", name="Set", exact=True).click()
    page.wait_for_selector("tr[data-key='network.egress'] .src-osf")
    with api.http(api.token()) as c:
        assert c.get("/config/network.egress", params={"osf": "default"}).json()["value"] == (
            "deny tcp any port 25\ndeny 10.0.0.0/8"
        )
        assert c.get("/config/network.egress").json()["source"] == "default"  # the tenant's layer is untouched


def chart_range(page: Any, chart: str) -> tuple[float, float]:
    """The time axis a dashboard chart drew, in seconds (``data-x-range``, set by dashboard.js at each draw)."""
    low, high = page.locator(f"#chart-{chart}").get_attribute("data-x-range").split(",")
    return float(low), float(high)


def test_dashboard_of_an_empty_farm_says_so_and_small_data_is_drawn_around_now(
    page: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """An empty farm shows empty states, not axes; one point is drawn on a time axis of minutes (or 24 h) up to now.

    uPlot's own range for a single point ran 1,000 days from it: the activity axis went from 2027 to 2029.
    """
    with ApiThread(tmp_path_factory.mktemp("wat-empty")) as api:
        login(page, api)
        page.wait_for_function("() => document.body.dataset.dashboard === 'drawn'")
        for chart in ("live", "ttd"):
            assert page.locator(f"#chart-{chart}").is_hidden(), chart
            assert page.locator(f"#chart-{chart}-empty").is_visible(), chart
        assert "no nodes and no desktops" in page.locator("#chart-live-empty").inner_text()
        assert page.locator("#chart-ttd-empty").inner_text() == "No connections in the last 24 h."
        for group in ("image", "node"):
            assert page.locator(f"#ttd-by-{group}").inner_text() == "No connection reached a desktop in the last 24h."

        token = page.evaluate("sessionStorage.getItem('deckard.admin.token')")
        with api.http(token) as c:
            c.post("/users", json={"login": "ada", "password": "Ada-secret-42"}).raise_for_status()
            c.post("/desktops", json={"name": "web", "user": "ada"}).raise_for_status()
        page.reload()
        page.wait_for_function("() => document.body.dataset.dashboard === 'drawn'")
        assert page.locator("#chart-live canvas").is_visible() and page.locator("#chart-live-empty").is_hidden()
        now = time.time()
        low, high = chart_range(page, "live")
        assert now - 3600 < low <= now - 600 + 5 and now - 5 <= high < now + 60, (low, high, now)
        assert page.locator("#chart-ttd-empty").is_visible()  # still no connection


async def fill_busy_farm(db: Any, home: Path) -> None:
    """Three nodes, two images, twelve desktops (eight running, three users connected) and a day of connections
    with every phase timed: the dashboard of a farm at work (README's screenshot), from a fixed seed."""
    import datetime as dt
    import random

    import sqlalchemy as sa

    from deckard.db import schema as t
    from deckard.model.entities import utcnow
    from deckard.services.context import SYSTEM
    from deckard.services.desktops import create_desktop
    from deckard.services.images import register_image
    from deckard.services.users import create_user

    rnd = random.Random(16)
    now = utcnow()
    (home / "image.tar").write_bytes(b"")
    images = [int((await register_image(db, home / "image.tar", version=v))["id"]) for v in ("2026.11", "2026.12")]
    desks = []
    for login in ["ada", "ben", "cleo", "dan", "eve", "finn", "gus", "hana", "ivo", "june", "kim", "lou"]:
        await create_user(db, SYSTEM, login, None)
        desks.append(int((await create_desktop(db, SYSTEM, f"{login}-desk", login, network="10.77.0.0/24"))["id"]))
    async with db.begin() as conn:
        nodes = []
        for name, load in (("node-a", 1.4), ("node-b", 0.9), ("node-c", 0.3)):
            res = await conn.execute(
                sa.insert(t.nodes)
                .values(
                    name=name,
                    state="running",
                    heartbeat_at=now,
                    mem_total_mib=64000,
                    mem_free_mib=40000,
                    cpus=16,
                    load=load,
                    created_at=now,
                )
                .returning(t.nodes.c.id)
            )
            nodes.append(int(res.scalar_one()))
        for i, desk in enumerate(desks[:8]):
            await conn.execute(
                sa.update(t.desktops)
                .where(t.desktops.c.id == desk)
                .values(
                    state="running",
                    state_at=now,
                    node_id=nodes[i % 3],
                    image_id=images[1],
                    user_state="connected" if i < 3 else "disconnected",
                    expire_soft_at=now + dt.timedelta(hours=3) if i == 7 else None,
                )
            )
        users = dict((await conn.execute(sa.select(t.desktops.c.id, t.desktops.c.user_id))).all())
        rows = []
        for _ in range(180):
            desk, node = rnd.choice(desks), rnd.choices(nodes, weights=(5, 3, 1))[0]
            image = images[1] if rnd.random() < 0.7 else images[0]
            cold = rnd.random() < 0.3
            ms = {
                "t_auth_ms": rnd.lognormvariate(3.6, 0.3),
                "t_claim_ms": rnd.lognormvariate(2.0, 0.4),
                "t_start_ms": rnd.lognormvariate(5.2 if cold else 0.5, 0.3) * (1.4 if node == nodes[2] else 1),
                "t_agent_ms": rnd.lognormvariate(4.6, 0.3) if cold else None,
                "t_display_ms": rnd.lognormvariate(4.1, 0.25) * (1.3 if image == images[0] else 1),
            }
            ms["t_total_ms"] = sum(v for k, v in ms.items() if v is not None and k != "t_agent_ms") + 3
            started = now - dt.timedelta(minutes=rnd.uniform(2, 24 * 60 - 2))
            rows.append(
                {
                    "desktop_id": desk,
                    "user_id": users[desk],
                    "login": "u",
                    "node_id": node,
                    "image_id": image,
                    "started_at": started,
                    "connected_at": started,
                    "result": "closed",
                    **{k: round(v, 1) if v is not None else None for k, v in ms.items()},
                }
            )
        await conn.execute(sa.insert(t.connections), rows)
        # a day of the nodes' samples, a minute apart: quiet at night, then the morning's rise to this moment's 8
        minute = now.replace(second=0, microsecond=0)
        samples = []
        for m in range(1, 24 * 60):
            rise = max(0.0, math.sin(math.pi / 2 * (16 - m / 60) / 16))  # 0 until 16 h ago, 1 now
            running = round(2 + 6 * rise) + (rnd.random() < 0.005)  # now and then one more
            connected = min(running, round(running * 0.4) + (rnd.random() < 0.01))
            nodes = 2 if 300 <= m < 360 else 3  # node-c was away for an hour, five hours ago
            at = minute - dt.timedelta(minutes=m)
            samples.append({"at": at, "tenant_id": 0, "running": running, "connected": connected, "nodes": nodes})
        await conn.execute(sa.insert(t.activity), samples)


def test_dashboard_of_a_busy_farm_shows_time_to_desktop_by_image_and_by_node(
    page: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The phases' p50 / p95 per image and per node, as the API computes them, with links to each; the README's
    dashboard and desktops screenshots are this farm's."""
    home = tmp_path_factory.mktemp("wat-busy")
    with ApiThread(home, lambda db: fill_busy_farm(db, home)) as api:
        with api.http(api.token()) as c:
            want = c.get("/stats/time-to-desktop").json()
        login(page, api)
        page.wait_for_function("() => document.body.dataset.dashboard === 'drawn'")
        page.wait_for_selector("#ttd-by-node table")
        for group, names in (
            ("image", ["default 2026.12", "default 2026.11"]),
            ("node", ["node-a", "node-b", "node-c"]),
        ):
            rows = page.locator(f"#ttd-by-{group} tbody tr")
            assert rows.locator("td:first-child").all_inner_texts() == names, group
            for row, g in zip(rows.all(), want[f"by_{group}"], strict=True):
                assert row.get_attribute("data-id") == str(g[f"{group}_id"])
                assert row.locator("td").nth(1).inner_text() == str(g["count"])
                for phase, f in g["phases"].items():
                    cell = row.locator(f"td[data-phase={phase}]").inner_text()
                    js_round = lambda x: math.floor(x + 0.5)  # noqa: E731 (Math.round; Python's round is to even)
                    want_cell = f"{js_round(f['p50'])} / {js_round(f['p95'])}" if f["count"] else "—"
                    assert cell == want_cell, (group, phase)
        assert page.locator("#chart-ttd canvas").is_visible()
        low, high = chart_range(page, "live")  # the farm's day of samples, not a tab's few seconds
        now = time.time()
        assert now - 86400 - 60 < low < now - 86400 + 600 and now - 5 <= high < now + 60, (low, high, now)
        shot(page, "dashboard")
        page.locator("#ttd-by-node a", has_text="node-c").click()
        page.wait_for_selector("h1:has-text('node-c')")
        goto(page, api.url + "/admin#/desktops")
        page.wait_for_selector("table.list tbody tr td a:has-text('lou-desk')")
        assert page.locator("table.list tbody .s-running").count() == 8
        shot(page, "desktops")


async def lose_two_nodes(db: Any) -> None:
    """Two lost nodes: one fenced through its BMC, one whose fence agent failed (its desktops stay assigned)."""
    import sqlalchemy as sa

    from deckard.db import schema as t
    from deckard.model.entities import utcnow

    failed = (
        "fencing failed (fence_ipmilan action=off failed (exit 1): Failed: Unable to obtain correct plug status "
        "or plug is not available); its desktops stay assigned until it is fenced"
    )
    async with db.begin() as conn:
        for name, reason in (("rack1-n1", "fenced; 3 desktop(s) released"), ("rack1-n2", failed)):
            await conn.execute(
                sa.insert(t.nodes).values(
                    name=name,
                    state="lost",
                    heartbeat_at=utcnow(),
                    lost_at=utcnow(),
                    lost_reason=reason,
                    fence_agent="fence_ipmilan",
                    fence_options='{"ip": "10.0.9.2", "password": "hunter2"}',
                    created_at=utcnow(),
                )
            )


def test_the_nodes_view_shows_a_failed_fence_and_never_the_bmc_password(
    page: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    home = tmp_path_factory.mktemp("wat-fence")
    with ApiThread(home, lose_two_nodes) as api:
        login(page, api)
        goto(page, api.url + "/admin#/nodes")
        page.wait_for_selector("table.list tbody tr td a:has-text('rack1-n2')")
        failed = page.locator("table.list tbody tr", has_text="rack1-n2").locator("td[data-col=lost_reason]")
        assert failed.locator(".s-fence-failed").count() == 1
        assert "fencing failed (fence_ipmilan action=off failed" in failed.inner_text()
        fenced = page.locator("table.list tbody tr", has_text="rack1-n1").locator("td[data-col=lost_reason]")
        assert fenced.inner_text() == "fenced; 3 desktop(s) released" and fenced.locator(".s-fence-failed").count() == 0
        page.locator("table.list a", has_text="rack1-n2").click()
        page.wait_for_selector("dl.props dd[data-field=fence_options]")
        assert "********" in page.locator("dd[data-field=fence_options]").inner_text()
        assert "hunter2" not in page.content()
        page.context.close()  # its open connections would hold the API server's shutdown for seconds


def test_read_only_administrator_is_not_offered_forbidden_actions(page: Any, api: Api) -> None:
    with api.http(api.token()) as c:
        r = c.post("/admins", json={"name": "viewer", "password": "Viewer-secret-42", "roles": ["Read-only"]})
        assert r.status_code == 201, r.text
        c.post("/users", json={"login": "carol", "password": "Carol-secret-42"})
        c.post("/desktops", json={"name": "ro1", "user": "carol"})
    login(page, api, "viewer", "Viewer-secret-42")
    menu = page.locator("#menu").inner_text()
    assert "Desktops" in menu and "Audit log" not in menu and "Tenants" not in menu
    for what in ("desktops", "users", "roles", "admins"):
        goto(page, api.url + f"/admin#/{what}")
        page.wait_for_selector("table.list tbody tr td")
        assert page.locator("a.create").count() == 0, what
        assert page.locator("button.bulk").count() == 0, what
        assert page.locator("table.list input[type=checkbox]").count() == 0, what
    goto(page, api.url + "/admin#/desktops")
    page.locator("table.list a", has_text="ro1").click()
    page.wait_for_selector("dl.props")
    assert page.get_by_role("button", name="Delete").count() == 0
    assert page.get_by_role("button", name="Start").count() == 0
    assert page.locator("form[aria-label=Edit]").count() == 0
    assert page.locator("a:has-text('Spy')").count() == 0  # Read-only has no desktop.spy


def test_phone_width_collapses_the_menu(browser: Any, api: Api) -> None:
    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 390, "height": 800})
    try:
        page = ctx.new_page()
        login(page, api)
        assert not page.locator("#menu").is_visible()
        page.get_by_role("button", name="Menu").click()
        assert page.locator("#menu").is_visible()
        page.locator("#menu a", has_text="Desktops").click()
        page.wait_for_selector("table.list tbody tr td")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 400, width
        shot(page, "phone")
    finally:
        ctx.close()


def test_admin_clears_a_login_ban_and_resets_a_users_second_factor_and_token(page: Any, api: Api) -> None:
    """The Login bans page clears a locked account; a user's page shows the second factor and personal tokens
    (made through the portal) and resets and revokes them, each after a confirm dialog."""
    import pyotp

    lockout = {"auth.lockout.account_failures": 2, "auth.failure_floor_ms": 0, "auth.lockout.refusal_delay_ms": 0}
    with api.http(api.token()) as admin, httpx.Client(base_url=api.url, verify=api.verify, trust_env=False) as web:
        for key, value in lockout.items():
            assert admin.put(f"/config/{key}", json={"value": value}).status_code == 200
        try:
            user = admin.post("/users", json={"login": "dora", "password": "Dora-secret-42"}).json()
            r = web.post("/portal/login", json={"login": "dora", "password": "Dora-secret-42"})
            me = {"Authorization": f"Bearer {r.json()['token']}"}
            secret = web.post("/portal/me/second-factor/enrol", headers=me).json()["secret"]
            assert web.post("/portal/me/second-factor/confirm", json={"code": pyotp.TOTP(secret).now()}, headers=me)
            assert web.post("/portal/me/tokens", json={"name": "laptop", "days": 7}, headers=me).status_code == 201
            for _ in range(2):
                assert web.post("/portal/login", json={"login": "dora", "password": "wrong"}).status_code >= 400
        finally:
            for key in lockout:
                admin.delete(f"/config/{key}")
    page.on("dialog", lambda dialog: dialog.accept())
    login(page, api)
    page.locator("#menu a", has_text="Login bans").click()
    page.locator("table.list tr", has_text="account:default/dora").get_by_role("button", name="Clear").click()
    page.wait_for_function("() => !document.querySelector('main').textContent.includes('account:default/dora')")

    goto(page, api.url + f"/admin#/users/{user['id']}")
    factor = "document.querySelector('[data-field=second_factor]')?.textContent"
    page.wait_for_function(f"() => {factor} === 'enrolled'")
    page.get_by_role("button", name="Reset second factor").click()
    page.wait_for_function(f"() => {factor} === 'not enrolled'")
    page.locator("table[aria-label='Personal tokens']").get_by_role("button", name="Revoke").click()
    revoked = "document.querySelector(\"table[aria-label='Personal tokens'] td[data-col=revoked]\")?.textContent"
    page.wait_for_function(f"() => {revoked} === 'yes'")
    with api.http(api.token()) as admin:
        assert admin.get(f"/users/{user['id']}/second-factor").json()["enrolled"] is False
        assert [t["revoked"] for t in admin.get(f"/users/{user['id']}/tokens").json()["items"]] == [True]


def test_an_administrator_sets_up_an_authenticator_app_and_the_login_asks_for_its_code(page: Any, api: Api) -> None:
    """My account draws the QR code and confirms the app's first code; the next login shows the code step, which
    refuses a wrong code and takes a recovery code."""
    import pyotp

    with api.http(api.token()) as admin:
        body = {"name": "tess", "password": "Tess-secret-42", "tenant": "*", "roles": ["Read-only"]}
        assert admin.post("/admins", json=body).status_code == 201
    login(page, api, "tess", "Tess-secret-42")
    page.get_by_role("link", name="My account").click()
    page.get_by_role("button", name="Set up authenticator app").click()
    page.wait_for_selector("canvas[data-drawn='1']")
    secret = page.locator("[data-field=secret]").text_content().replace(" ", "")
    page.get_by_label("Code", exact=True).fill(pyotp.TOTP(secret).now())
    page.get_by_role("button", name="Confirm").click()
    page.get_by_role("list", name="Recovery codes").wait_for()
    codes = page.get_by_role("list", name="Recovery codes").locator("code").all_text_contents()
    assert len(codes) == 10
    page.get_by_role("button", name="I have saved them").click()
    page.wait_for_function("() => document.querySelector('[data-field=second_factor]')?.textContent.startsWith('On:')")

    page.get_by_role("button", name="Log out").click()
    page.get_by_label("Name").fill("tess")
    page.get_by_label("Password").fill("Tess-secret-42")
    page.get_by_role("button", name="Log in").click()
    page.get_by_label("Code", exact=True).fill("000000")
    page.get_by_role("button", name="Continue").click()
    page.get_by_text("Wrong code: type the current one.").wait_for()
    page.get_by_label("Code", exact=True).fill(codes[0])
    page.get_by_role("button", name="Continue").click()
    page.wait_for_selector("header.top")
    assert page.locator("span.who").text_content() == "tess"


def test_tenant_networks_in_the_wat_show_the_apis_refusals_and_put_a_desktop_on_a_network(page: Any, api: Api) -> None:
    """The Networks page makes a private network (after showing the range the API refused next to the field) and
    grants a shared one; a desktop made on the private network shows it and its address there in the desktop list;
    an OSF is moved onto it; a flat network is made (its refused gateway shown at its field), granted and offered
    to the tenant's OSFs; the private network, in use, is not deleted and the page says why."""
    with api.http(api.token()) as c:
        for path, body in (
            ("/users", {"login": "nina", "password": "Nina-secret-42"}),
            ("/osfs", {"name": "netted"}),
            ("/networks", {"name": "corp", "range": "10.60.0.0/24", "kind": "shared", "description": "head office"}),
        ):
            r = c.post(path, json=body)
            assert r.status_code == 201, r.text
    page.on("dialog", lambda dialog: dialog.accept())
    login(page, api)
    page.locator("#menu a", has_text="Networks").click()
    page.get_by_role("link", name="Create").click()
    page.get_by_label("name", exact=True).fill("lan")
    page.get_by_label("range", exact=True).fill("10.50.0.5/24")  # host bits set
    page.get_by_role("button", name="Create").click()
    page.locator("#range-error", has_text="bad_network_range").wait_for()
    assert page.get_by_label("range", exact=True).get_attribute("aria-invalid") == "true"
    page.get_by_label("range", exact=True).fill("10.50.0.0/24")
    page.get_by_label("tenant (private networks)").fill("default")
    page.get_by_role("button", name="Create").click()
    page.wait_for_selector("h1:has-text('network lan')")

    # the shared network: granted to a tenant from its page
    page.get_by_role("link", name="← Networks").click()
    page.locator("table.list a", has_text="corp").click()
    page.get_by_label("Tenant (name or id)").fill("default")
    page.get_by_role("button", name="Grant").click()
    page.locator("section[aria-label=Grants] tr[data-tenant=default]").wait_for()
    page.get_by_role("link", name="← Networks").click()
    row = page.locator("table.list tbody tr", has_text="corp")
    row.locator("td[data-col=tenants]", has_text="default").wait_for()
    assert row.locator("td[data-col=kind]").inner_text() == "shared"
    page.evaluate("document.getElementById('toasts').replaceChildren()")
    shot(page, "networks")

    # a desktop on the private network, through the create form
    goto(page, api.url + "/admin#/desktops/new")
    page.get_by_label("name", exact=True).fill("onlan")
    page.get_by_label("User (login)").fill("nina")
    page.get_by_label("network").select_option(label="lan (10.50.0.0/24, tenant default)")
    page.get_by_role("button", name="Create").click()
    page.wait_for_selector("h1:has-text('desktop onlan')")
    assert page.locator("dd[data-field=network]").inner_text() == "lan"
    address = page.locator("dd[data-field=network_ip]").inner_text()
    assert address.startswith("10.50.0."), address
    goto(page, api.url + "/admin#/desktops")
    page.locator("details.columns summary").click()
    page.locator("details.columns label", has_text="network ip").locator("input").check()
    row = page.locator("table.list tbody tr", has_text="onlan")
    assert row.locator("td[data-col=network]").inner_text() == "lan"
    assert row.locator("td[data-col=network_ip]").inner_text() == address

    # an OSF's network: a select of its tenant's networks (the shared one is granted to it)
    goto(page, api.url + "/admin#/osfs")
    page.locator("table.list a", has_text="netted").click()
    edit = page.locator("form[aria-label=Edit]")
    edit.get_by_label("network").select_option(label="corp (10.60.0.0/24, shared)")
    edit.get_by_role("button", name="Save").click()
    page.wait_for_function("() => document.querySelector('dd[data-field=network]')?.textContent === 'corp'")

    # a flat network (the machines' own LAN): its gateway refused at its field, then made, granted and offered
    goto(page, api.url + "/admin#/networks/new")
    page.get_by_label("name", exact=True).fill("office")
    page.get_by_label("range", exact=True).fill("192.168.20.0/24")
    page.get_by_label("kind").select_option("flat")
    assert page.get_by_label("tenant (private networks)").is_hidden()
    page.get_by_label("interface").fill("eth1")
    page.get_by_label("VLAN tag").fill("20")
    page.get_by_label("gateway").fill("192.168.21.1")  # outside the range
    page.get_by_role("button", name="Create").click()
    page.locator("#gateway-error", has_text="bad_flat_network").wait_for()
    page.get_by_label("gateway").fill("192.168.20.254")
    page.get_by_role("button", name="Create").click()
    page.wait_for_selector("h1:has-text('network office')")
    assert page.locator("dd[data-field=interface]").inner_text() == "eth1"
    assert page.locator("dd[data-field=vlan]").inner_text() == "20"
    assert page.locator("dd[data-field=gateway]").inner_text() == "192.168.20.254"
    page.get_by_label("Tenant (name or id)").fill("default")
    page.get_by_role("button", name="Grant").click()
    page.locator("section[aria-label=Grants] tr[data-tenant=default]").wait_for()
    goto(page, api.url + "/admin#/osfs")
    page.locator("table.list a", has_text="netted").click()
    edit = page.locator("form[aria-label=Edit]")
    edit.locator("select[name=network][data-loaded=yes]").wait_for(state="attached")
    assert "office (192.168.20.0/24, flat on eth1.20)" in edit.get_by_label("network").inner_text()

    # in use: the delete is refused, and the page says by what
    goto(page, api.url + "/admin#/networks")
    page.locator("table.list a", has_text="lan").click()
    page.get_by_role("button", name="Delete").click()
    refused = page.locator("p.refused")
    refused.filter(has_text="network_in_use").wait_for()
    assert "onlan" in refused.inner_text()


def test_a_warm_pool_is_made_edited_and_deleted_in_the_wat_with_the_apis_refusals_at_their_field(
    page: Any, browser: Any, api: Api
) -> None:
    """The Warm pools page makes a pool of the default OSF through its form (size 0: no guest is started), after
    showing at the OSF field why an OSF that keeps its layers cannot have one; the list shows it "0 / 0" and
    "always"; its edit form shows the refused hours at the hours field, then keeps it on weekdays only; a Read-only
    administrator sees it without Create, Edit or Delete; Delete asks, then removes it."""
    with api.http(api.token()) as c:
        for path, body in (
            ("/osfs", {"name": "kept", "keep_overlay": True}),
            ("/admins", {"name": "poolviewer", "password": "Viewer-secret-42", "roles": ["Read-only"]}),
        ):
            r = c.post(path, json=body)
            assert r.status_code == 201, r.text
    page.on("dialog", lambda dialog: dialog.accept())
    login(page, api)
    page.locator("#menu a", has_text="Warm pools").click()
    page.get_by_role("link", name="Create").click()
    page.locator("select[name=osf][data-loaded=yes]").wait_for(state="attached")
    assert page.get_by_label("OSF").input_value() == str(
        next(o["id"] for o in api_get(api, "/osfs") if o["name"] == "default")
    )  # the first OSF that may have one
    page.get_by_label("OSF").select_option(label="kept — cannot be warm: keeps its desktops' layers")
    page.get_by_label("size", exact=True).fill("0")
    page.get_by_role("button", name="Create").click()
    page.locator("#osf-error", has_text="pool_unsupported").wait_for()
    assert page.get_by_label("OSF").get_attribute("aria-invalid") == "true"
    page.get_by_label("OSF").select_option(label="default")
    assert page.get_by_label("image tag").input_value() == "default"
    assert page.get_by_label("time zone").input_value() == "UTC"
    page.get_by_role("button", name="Create").click()
    page.wait_for_selector("h1:has-text('Warm pools')")
    row = page.locator("table.list tbody tr").filter(has=page.locator("td[data-col=osf]", has_text="default"))
    row.wait_for()
    assert row.locator("td[data-col=tag]").inner_text() == "default"
    assert row.locator("td[data-col=size]").inner_text() == "0"
    assert row.locator("td[data-col=hours]").inner_text() == "always"
    assert row.locator("td[data-col=fill] .fill-text").inner_text() == "0 / 0"
    assert row.locator("td[data-col=last_error]").inner_text() == ""
    [pool] = api_get(api, "/pools")
    assert (pool["osf"], pool["tag"], pool["size"], pool["hours"], pool["timezone"]) == (
        "default",
        "default",
        0,
        "",
        "UTC",
    )

    # the edit form: a refused hours value under the hours field, then weekdays
    row.locator("td[data-col=id] a").click()
    page.wait_for_selector("h1:has-text('pool default:default')")
    edit = page.locator("form[aria-label=Edit]")
    edit.get_by_label("hours").fill("someday")
    edit.get_by_role("button", name="Save").click()
    page.locator("#hours-error", has_text="bad_login_rule").wait_for()
    assert "'someday' is not an hours window" in page.locator("#hours-error").inner_text()
    assert edit.get_by_label("hours").get_attribute("aria-invalid") == "true"
    assert api_get(api, "/pools")[0]["hours"] == ""
    edit.get_by_label("hours").fill("Mon-Fri 07:00-19:00")
    edit.get_by_role("button", name="Save").click()
    page.wait_for_function(
        "() => document.querySelector('dd[data-field=hours]')?.textContent === 'Mon-Fri 07:00-19:00'"
    )
    assert api_get(api, "/pools")[0]["hours"] == "Mon-Fri 07:00-19:00"
    page.get_by_role("link", name="← Warm pools").click()
    row.locator("td[data-col=hours]", has_text="Mon-Fri 07:00-19:00 (UTC)").wait_for()

    # a Read-only administrator (osf.see, no osf.update) sees the pool, changes nothing
    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 860})
    try:
        viewer = ctx.new_page()
        login(viewer, api, "poolviewer", "Viewer-secret-42")
        viewer.locator("#menu a", has_text="Warm pools").click()
        viewer.locator("table.list tbody tr td[data-col=fill]").wait_for()
        assert viewer.locator("a.create").count() == 0
        assert viewer.locator("table.list input[type=checkbox]").count() == 0
        viewer.locator("table.list td[data-col=id] a").click()
        viewer.wait_for_selector("h1:has-text('pool default:default')")
        viewer.locator("section[aria-label=Fill] .fill-text").wait_for()
        assert viewer.get_by_role("button", name="Delete").count() == 0
        assert viewer.locator("form[aria-label=Edit]").count() == 0
    finally:
        ctx.close()

    # Delete, after the confirm every page asks
    row.locator("td[data-col=id] a").click()
    page.wait_for_selector("h1:has-text('pool default:default')")
    page.get_by_role("button", name="Delete").click()
    page.wait_for_selector("table.list td.empty")
    assert api_get(api, "/pools") == []


def api_get(api: Api, path: str) -> list[dict[str, Any]]:
    with api.http(api.token()) as c:
        r = c.get(path)
        r.raise_for_status()
        return list(r.json()["items"])


async def fill_pools(db: Any) -> None:
    """Three warm pools as a farm at work has them: one full, one filling, one whose guests failed to start (in the
    database only: no node runs, no guest is started)."""
    import sqlalchemy as sa

    from deckard.db import schema as t
    from deckard.model.entities import utcnow
    from deckard.services.context import SYSTEM
    from deckard.services.osfs import create_osf
    from deckard.services.pools import create_pool, pool_failed

    await create_osf(db, SYSTEM, "kiosk")
    full = await create_pool(db, SYSTEM, "default", size=2)
    filling = await create_pool(db, SYSTEM, "default", tag="beta", size=4)
    failing = await create_pool(db, SYSTEM, "kiosk", size=1, hours="Mon-Fri 07:00-19:00", timezone="Europe/Madrid")
    await pool_failed(db, failing["id"], "the guest's agent did not answer within 120 s")
    async with db.begin() as conn:
        node = await conn.execute(
            sa.insert(t.nodes)
            .values(name="node-a", state="running", heartbeat_at=utcnow(), created_at=utcnow())
            .returning(t.nodes.c.id)
        )
        node_id = int(node.scalar_one())
        guests = [(full, "ready"), (full, "ready"), (filling, "ready"), (filling, "starting"), (filling, "starting")]
        for i, (pool, state) in enumerate(guests):
            await conn.execute(
                sa.insert(t.warm_guests).values(
                    pool_id=pool["id"],
                    node_id=node_id,
                    name=f"dkw{i:06x}",
                    image_id=1,
                    ip=f"10.77.0.{250 - i}",
                    agent_token="x" * 32,
                    state=state,
                    created_at=utcnow(),
                )
            )


def test_the_warm_pools_list_shows_each_pools_fill_and_last_error(
    page: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Each pool's row: ready guests of those it wants now ("2 / 2", "1 / 4 +2 starting"), its hours and time zone
    or "always", and why its last guest failed; the README's warm pools screenshot is this farm's."""
    with ApiThread(tmp_path_factory.mktemp("wat-pools"), fill_pools) as api:
        want = {(p["osf"], p["tag"]): p for p in api_get(api, "/pools")}
        login(page, api)
        goto(page, api.url + "/admin#/pools")
        page.locator("table.list tbody tr td[data-col=fill]").nth(2).wait_for()
        rows = page.locator("table.list tbody tr")
        assert rows.count() == 3
        for row in rows.all():
            key = (row.locator("td[data-col=osf]").inner_text(), row.locator("td[data-col=tag]").inner_text())
            pool = want.pop(key)
            fill = row.locator("td[data-col=fill]")
            assert fill.locator(".fill-text").inner_text() == f"{pool['ready']} / {pool['wanted']}", key
            bars = "td => [...td.querySelectorAll('.fill-bar > span')].map(s => s.getBoundingClientRect().width)"
            widths = [round(w) for w in fill.evaluate(bars)]
            of = max(pool["wanted"], pool["ready"] + pool["starting"], 1)
            assert widths == [round(80 * pool["ready"] / of), round(80 * pool["starting"] / of)], (key, widths)
            hours = f"{pool['hours']} ({pool['timezone']})" if pool["hours"] else "always"
            assert row.locator("td[data-col=hours]").inner_text() == hours, key
            assert row.locator("td[data-col=last_error]").inner_text() == (pool["last_error"] or ""), key
        assert not want
        assert page.locator("td[data-col=fill]", has_text="1 / 4 +2 starting").count() == 1
        failed = page.locator("table.list tbody tr", has_text="kiosk").locator("td[data-col=last_error] .error")
        assert failed.inner_text() == "the guest's agent did not answer within 120 s"
        page.evaluate("document.getElementById('toasts').replaceChildren()")
        shot(page, "pools")
        page.context.close()  # its open connections would hold the API server's shutdown for seconds
