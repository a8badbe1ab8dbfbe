"""Session policies with the real node daemon and the fake driver's guests (their agent is deckard-vma's own RPC
with a pretend display whose idle time a test sets), on SQLite and PostgreSQL: a desktop stops after its user
disconnected, an idle user is warned and then disconnected or stopped, a session ends at its maximum length; and
the API's list and bulk filters ``disconnected_for`` / ``idle_for``.

Users connect the way the broker does (``services/sessions.py``); the policies are set through the configuration
service, per OSF or for the whole farm.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
import test_api
from test_api import add_node, call
from test_node_daemon import Farm, make_farm, wait_for

from deckard.client.agent import AgentClient
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.drivers.fake_guest import FakeGuest
from deckard.model.entities import User, aware, utcnow
from deckard.model.schemas import Desktop
from deckard.model.states import DesktopState, UserState
from deckard.services import sessions
from deckard.services.config import set_config
from deckard.services.context import SYSTEM
from deckard.services.desktops import load_desktop, update_desktop
from deckard.services.images import register_image
from deckard.services.osfs import create_osf

api_farm = test_api.farm  # the real API with TLS, shared with test_api.py

SLACK_S = 1.5  # the fast node's passes are 0.2 s apart; the rest is the database and the event loop on 2 cores


@pytest.fixture
async def farm(db: Database) -> AsyncIterator[Farm]:
    f = await make_farm(db)
    await f.node.start()
    try:
        yield f
    finally:
        await f.node.close()


async def policy(db: Database, osf: str | None = None, **values: Any) -> None:
    """Set ``session.<key>`` values, on an OSF's layer or the farm's."""
    for key, value in values.items():
        await set_config(db, SYSTEM, f"session.{key}", value, osf=osf)


async def connect(farm: Farm, desktop_id: int) -> tuple[str, int]:
    """The user connects as through the broker (the display is started, the session recorded): (session, conn)."""
    async with farm.db.connect() as conn:
        desk = await load_desktop(conn, desktop_id)
        user = User.from_row(
            (await conn.execute(sa.select(t.users).where(t.users.c.id == desk.user_id))).one()._mapping
        )
    assert desk.agent_token
    await AgentClient(desk.ip, desk.agent_token).x_start(user.login, 10000 + user.id)
    session_id, conn_id = await sessions.open_session(
        farm.db, desk, user, login=user.login, broker_node_id=None, source="test", protocol="qvd", auth_ms=0
    )
    assert await sessions.mark_connected(farm.db, desktop_id, session_id, conn_id, {})
    return session_id, conn_id


async def audit_of(db: Database, desktop_id: int) -> list[Any]:
    a = t.audit_log
    q = sa.select(a).where(a.c.object_type == "desktop", a.c.object_id == str(desktop_id)).order_by(a.c.id)
    async with db.connect() as conn:
        return list(await conn.execute(q))


async def audit_record(db: Database, desktop_id: int, action: str) -> Any:
    """The one ``action`` record of the desktop, waited for: audit appends are group-committed, so the record may
    land a moment after the state change a test saw."""
    found: list[Any] = []

    async def there() -> bool:
        found[:] = [r for r in await audit_of(db, desktop_id) if r.action == action]
        return bool(found)

    await wait_for(f"the {action} audit record", there, 5)
    (record,) = found
    return record


def notices(guest: FakeGuest) -> list[dict[str, str]]:
    return [params for method, params in guest.calls if method == "session_notice"]


async def test_a_desktop_stops_its_delay_after_its_user_disconnected_where_its_osf_says_so(farm: Farm) -> None:
    """The OSF layer decides for its desktops only; the stop has the policy's reason and an audit record."""
    kiosk_osf = await create_osf(farm.db, SYSTEM, "kiosk")
    image = farm.node.settings.home / "image.tar"
    await register_image(farm.db, image, version="kiosk", osf_id=int(kiosk_osf["id"]))
    await update_desktop(farm.db, SYSTEM, farm.desktops[1], osf="kiosk")
    kiosk, default = await farm.start(farm.desktops[1]), await farm.start(farm.desktops[0])
    session_id, conn_id = await connect(farm, kiosk.id)
    # set once its user is on: a running desktop nobody ever connected to counts as disconnected since its start,
    # and starting the other desktop may take longer than the delay on a busy machine
    await policy(farm.db, osf="kiosk", stop_after_disconnect_s=1)
    await asyncio.sleep(1.2)  # connected longer than the delay: nothing happens
    assert (await farm.row(kiosk.id)).state == DesktopState.RUNNING

    await sessions.close_session(farm.db, kiosk.id, session_id, conn_id, result="closed")
    left = time.monotonic()
    row = await farm.wait_state(kiosk.id, DesktopState.STOPPED, timeout=1 + SLACK_S + 3)
    assert 1.0 <= time.monotonic() - left <= 1 + SLACK_S
    assert row.failure_reason == "session policy (disconnected): nobody was connected to it for 1s"
    record = await audit_record(farm.db, kiosk.id, "desktop.stop")
    assert (record.admin_name, record.result, record.source) == ("session-policy", "ok", f"node {row_node(farm)}")
    assert '"reason": "disconnected"' in record.arguments
    # the default OSF's desktop, disconnected all along, is not the kiosk policy's business
    assert (await farm.row(default.id)).state == DesktopState.RUNNING


def row_node(farm: Farm) -> int:
    assert farm.node.daemon is not None and farm.node.daemon.node_id is not None
    return farm.node.daemon.node_id


async def test_an_idle_user_is_warned_input_cancels_it_and_then_they_are_disconnected(farm: Farm) -> None:
    await policy(farm.db, idle_after_s=2, idle_warn_s=1, idle_action="disconnect")
    desk = await farm.start(farm.desktops[0])
    await connect(farm, desk.id)
    guest = farm.guest(desk.id)

    async def warned() -> Any:
        row = await farm.row(desk.id)
        return row if row.idle_warned_at is not None else None

    row = await wait_for("the idle notice", warned, 1 + SLACK_S)
    assert notices(guest) == [{"reason": "idle", "action": "disconnect", "in_s": "1"}]
    assert row.input_at is not None and row.user_state == UserState.CONNECTED

    guest.set_idle(0)  # the user moves the mouse: the notice no longer holds
    moved = time.monotonic()

    async def came_back() -> bool:
        return (await farm.row(desk.id)).idle_warned_at is None

    await wait_for("the notice to be forgotten", came_back, SLACK_S)
    assert (await farm.row(desk.id)).user_state == UserState.CONNECTED

    async def disconnected() -> Any:
        row = await farm.row(desk.id)
        return row if row.user_state == UserState.DISCONNECTED else None

    row = await wait_for("the idle disconnect", disconnected, 2 + 2 * SLACK_S)
    # not before the idle time counted from the input; after it within two passes' slack (a loaded CI machine
    # once took 4.6 s: the notice, then the disconnect, each a pass late)
    assert 1.9 <= time.monotonic() - moved <= 2 + 2 * SLACK_S
    assert (row.state, row.session_id, row.idle_warned_at) == (DesktopState.RUNNING, None, None)
    assert len(notices(guest)) == 2  # warned again before the disconnect
    record = await audit_record(farm.db, desk.id, "desktop.disconnect")
    assert record.admin_name == "session-policy" and '"reason": "idle"' in record.arguments


async def test_an_idle_desktop_is_stopped_when_the_action_is_stop_and_never_on_a_guess(farm: Farm) -> None:
    """Of two idle users, the one whose agent cannot tell the idle time keeps their desktop."""
    await policy(farm.db, idle_after_s=1, idle_warn_s=0, idle_action="stop")
    idle, unknown = [await farm.start(i) for i in farm.desktops]
    guests = [farm.guest(idle.id), farm.guest(unknown.id)]
    for desk in (idle, unknown):
        await connect(farm, desk.id)
    guests[0].set_idle(30)  # nobody touched it since long before the connection
    guests[1].set_idle(None)  # an X server without MIT-SCREEN-SAVER
    row = await farm.wait_state(idle.id, DesktopState.STOPPED, timeout=1 + SLACK_S + 3)
    assert row.failure_reason.startswith("session policy (idle): ")
    assert notices(guests[0]) == []  # idle_warn_s=0: no notice
    await asyncio.sleep(0.5)
    row = await farm.row(unknown.id)
    assert (row.state, row.user_state, row.input_at) == (DesktopState.RUNNING, UserState.CONNECTED, None)


async def test_a_session_is_warned_and_stopped_at_its_maximum_length(farm: Farm) -> None:
    await policy(farm.db, max_length_s=2, max_length_warn_s=1)
    desk = await farm.start(farm.desktops[0])
    await connect(farm, desk.id)
    guest = farm.guest(desk.id)
    started = aware((await farm.row(desk.id)).started_at)

    async def warned() -> bool:
        return bool(notices(guest))

    await wait_for("the max-length notice", warned, 1 + SLACK_S)
    (notice,) = notices(guest)
    assert notice["reason"] == "max_length" and notice["action"] == "stop" and int(notice["in_s"]) == 1
    row = await farm.wait_state(desk.id, DesktopState.STOPPED, timeout=2 + SLACK_S + 3)
    assert row.failure_reason.startswith("session policy (max_length): ")
    assert len(notices(guest)) == 1
    record = await audit_record(farm.db, desk.id, "desktop.stop")
    # on time: from the start, however late the notice came
    assert dt.timedelta(seconds=2) <= aware(record.at) - started <= dt.timedelta(seconds=2 + SLACK_S)


async def test_without_policies_a_farm_behaves_as_before(farm: Farm) -> None:
    """No notice, no stop, no disconnect; the connected user's input time is still recorded for the listing."""
    kept, alone = [await farm.start(i) for i in farm.desktops]
    await connect(farm, kept.id)
    await asyncio.sleep(1)
    rows = [await farm.row(i) for i in farm.desktops]
    assert [(r.state, r.user_state) for r in rows] == [
        (DesktopState.RUNNING, UserState.CONNECTED),
        (DesktopState.RUNNING, UserState.DISCONNECTED),
    ]
    assert rows[0].input_at is not None and rows[1].input_at is None
    assert [m for m, _ in farm.guest(kept.id).calls].count("idle") == 1  # once a minute, not at every pass
    assert notices(farm.guest(kept.id)) == [] and notices(farm.guest(alone.id)) == []


# ---- the list and bulk filters, through the real API ------------------------------------------------------------


async def _set(db: Database, desktop_id: int, **values: Any) -> None:
    async with db.begin() as conn:
        await conn.execute(sa.update(t.desktops).where(t.desktops.c.id == desktop_id).values(**values))


async def test_the_api_filters_desktops_by_disconnected_and_idle_time(api_farm: test_api.Farm) -> None:
    api = await api_farm.admin_client()
    await call(api.create_user, "alice", "pw-1234")
    away, idle, busy, off = [await call(api.create_desktop, f"desk{i}", "alice") for i in range(4)]
    node = await add_node(api_farm.db)
    now = utcnow()

    def ago(**kw: float) -> dt.datetime:
        return now - dt.timedelta(**kw)

    running = {"state": "running", "node_id": node, "started_at": ago(hours=5)}
    await _set(api_farm.db, away.id, **running, user_state="disconnected", user_state_at=ago(hours=3))
    await _set(
        api_farm.db, idle.id, **running, user_state="connected", user_state_at=ago(hours=2), input_at=ago(minutes=45)
    )
    await _set(
        api_farm.db, busy.id, **running, user_state="connected", user_state_at=ago(hours=2), input_at=ago(seconds=5)
    )
    await _set(api_farm.db, off.id, user_state_at=ago(days=3))  # stopped: nobody's idle time, nor a disconnect

    async def names(**params: str) -> list[str]:
        rows = await call(api.list_all, "desktops", Desktop, [*params.items(), ("sort", "name")])
        return [r.name or "" for r in rows]

    assert await names(disconnected_for="2h") == ["desk0"]
    assert await names(disconnected_for="4h") == []
    assert await names(idle_for="30m") == ["desk1"]
    assert await names(idle_for="1m", disconnected_for="1m") == []
    assert await names(idle_for="1") == ["desk1", "desk2"]
    assert await names(idle_since__null="false", sort="idle_since") == ["desk1", "desk2"]  # the longest idle first
    (row,) = await call(api.list_all, "desktops", Desktop, [("name", "desk1")])
    assert row.idle_since == ago(minutes=45) and row.disconnected_since is None
    (row,) = await call(api.list_all, "desktops", Desktop, [("name", "desk0")])
    assert row.disconnected_since == ago(hours=3) and row.idle_since is None

    async with api_farm.http(api.token) as http:
        r = await http.get("/desktops", params={"idle_for": "a while"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_duration"

    out = await call(api.bulk, "desktops", "stop", filter={"disconnected_for": "2h", "state": "running"})
    assert (out.ok, out.failed) == ([away.id], {})
    async with api_farm.db.connect() as conn:
        cmds = dict((r.id, r.cmd) for r in await conn.execute(sa.select(t.desktops.c.id, t.desktops.c.cmd)))
    assert cmds == {away.id: "stop", idle.id: None, busy.id: None, off.id: None}


async def test_an_older_agent_without_the_idle_method_means_unknown(
    farm: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    desk = await farm.start(farm.desktops[0])
    assert desk.agent_token
    agent = AgentClient(desk.ip, desk.agent_token)
    assert await agent.input_idle_ms() is None  # no display yet
    await agent.x_start("alice", 10001)
    assert isinstance(await agent.input_idle_ms(), int)
    monkeypatch.setattr(farm.guest(desk.id).agent, "rpc_idle", None)  # an agent from before session policies
    assert await agent.input_idle_ms() is None
