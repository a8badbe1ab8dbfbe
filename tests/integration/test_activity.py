"""The farm's activity over time (``services/activity.py``, ``node/activity.py``, ``GET /stats``'s ``activity``), on
SQLite and PostgreSQL: one sample a minute whichever nodes try, the farm's and each busy tenant's counts, old
samples deleted, the history through the real API (steps, gaps, tenant scoping) and the node's loop."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
import sqlalchemy as sa
import test_api
from test_api import add_node, call
from test_tenancy_acl import multitenant, tenant_admin

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import utcnow
from deckard.node.activity import run_activity_loop
from deckard.services import activity

farm = test_api.farm  # the real API with TLS


async def _run(db: Database, name: str, connected: bool = False) -> None:
    """Desktop ``name`` running on some node (and its user connected)."""
    async with db.begin() as conn:
        node = (await conn.execute(sa.select(t.nodes.c.id).order_by(t.nodes.c.id))).scalars().first()
        await conn.execute(
            sa.update(t.desktops)
            .where(t.desktops.c.name == name)
            .values(state="running", node_id=node, user_state="connected" if connected else "disconnected")
        )


async def _rows(db: Database) -> list[tuple[dt.datetime, int, int, int, int]]:
    async with db.connect() as conn:
        q = sa.select(t.activity).order_by(t.activity.c.at, t.activity.c.tenant_id)
        return [(r.at, r.tenant_id, r.running, r.connected, r.nodes) for r in await conn.execute(q)]


async def test_one_sample_a_minute_with_the_farms_and_each_busy_tenants_counts(farm: test_api.Farm) -> None:
    root = await farm.admin_client()
    await multitenant(root)
    acme = await tenant_admin(farm, root, "acme", "ann", ["Tenant admin"])
    beta = await tenant_admin(farm, root, "beta", "bob", ["Tenant admin"])
    await tenant_admin(farm, root, "idle", "ida", ["Tenant admin"])  # a tenant with nothing running: no row
    for client, login in ((acme, "alice"), (acme, "amos"), (beta, "bruno")):
        await call(client.create_user, login, "pw-secret-1")
        await call(client.create_desktop, f"{login}-desk", login)
    await add_node(farm.db, "n1")
    await add_node(farm.db, "n2")
    await _run(farm.db, "alice-desk", connected=True)
    await _run(farm.db, "amos-desk")
    await _run(farm.db, "bruno-desk", connected=True)
    tenants = {tn.name: tn.id for tn in await call(root.list_tenants)}

    now = utcnow().replace(second=30)
    results = await asyncio.gather(*(activity.record(farm.db, now) for _ in range(4)))  # four nodes at once
    assert sorted(results) == [False, False, False, True]
    rows = await _rows(farm.db)
    assert [r[1:] for r in rows] == [(0, 3, 2, 2), (tenants["acme"], 2, 1, 2), (tenants["beta"], 1, 1, 2)]
    assert {r[0] for r in rows} == {rows[0][0]}  # the minute, whatever the second
    assert not await activity.record(farm.db, now + dt.timedelta(seconds=20))  # the same minute: nothing more

    old = now - activity.KEEP - dt.timedelta(minutes=1)
    async with farm.db.begin() as conn:
        await conn.execute(sa.insert(t.activity).values(at=old, tenant_id=0, running=1, connected=0, nodes=1))
    assert await activity.record(farm.db, now + dt.timedelta(minutes=1))
    rows = await _rows(farm.db)
    assert len(rows) == 6 and all(r[2:] != (1, 0, 1) for r in rows)  # the sample older than KEEP is gone


async def test_the_history_has_steps_gaps_and_each_tenants_own_counts(farm: test_api.Farm) -> None:
    root = await farm.admin_client()
    await multitenant(root)
    acme = await tenant_admin(farm, root, "acme", "ann", ["Tenant admin"])
    beta = await tenant_admin(farm, root, "beta", "bob", ["Tenant admin"])
    acme_id = next(tn.id for tn in await call(root.list_tenants) if tn.name == "acme")
    now = utcnow()
    minute = activity.minute_of(now)

    def ago(minutes: int) -> dt.datetime:
        return minute - dt.timedelta(minutes=minutes)

    async with farm.db.begin() as conn:
        await conn.execute(
            sa.insert(t.activity),
            [
                *({"at": ago(m), "tenant_id": 0, "running": 5, "connected": 2, "nodes": 3} for m in (10, 9, 8, 4)),
                {"at": ago(9), "tenant_id": acme_id, "running": 4, "connected": 1, "nodes": 3},
                {"at": ago(60 * 25), "tenant_id": 0, "running": 9, "connected": 9, "nodes": 9},  # before the day
            ],
        )
    s = await call(root.stats)
    assert s.activity.step_s == 60
    points = [(p.at, p.running, p.connected, p.nodes) for p in s.activity.points]
    assert points == [
        (ago(10), 5, 2, 3),
        (ago(9), 5, 2, 3),
        (ago(8), 5, 2, 3),
        *((ago(m), None, None, None) for m in (7, 6, 5)),  # the farm was down: a gap, not a line across
        (ago(4), 5, 2, 3),
    ]
    mine = [(p.running, p.connected, p.nodes) for p in (await call(acme.stats)).activity.points]
    assert mine[:4] == [(0, 0, 3), (4, 1, 3), (0, 0, 3), (None, None, None)]  # 0 where acme had no row
    assert [p.running for p in (await call(beta.stats)).activity.points] == [0, 0, 0, None, None, None, 0]

    async with farm.db.begin() as conn:  # a day of samples: 5-minute steps, each its highest counts
        await conn.execute(sa.delete(t.activity))
        await conn.execute(
            sa.insert(t.activity),
            [{"at": ago(m), "tenant_id": 0, "running": m % 7, "connected": 0, "nodes": 1} for m in range(1, 1440)],
        )
    day = (await call(root.stats)).activity
    assert day.step_s == 300 and len(day.points) <= activity.MAX_POINTS
    assert max(p.running or 0 for p in day.points) == 6 and all(p.running is not None for p in day.points)


async def test_a_nodes_loop_samples_at_once_and_stops_when_told(farm: test_api.Farm) -> None:
    await add_node(farm.db, "n1")
    stop = asyncio.Event()
    loop = asyncio.create_task(run_activity_loop(farm.db, 1, stop))
    try:
        for _ in range(200):
            if await _rows(farm.db):
                break
            await asyncio.sleep(0.05)
        assert [r[1:] for r in await _rows(farm.db)] == [(0, 0, 0, 1)]
    finally:
        stop.set()
        await asyncio.wait_for(loop, 5)


async def test_the_cli_draws_the_days_running_desktops_as_a_sparkline(
    farm: test_api.Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from deckard.cli import session
    from deckard.cli import stats as stats_cli

    root = await farm.admin_client()
    minute = activity.minute_of(utcnow())
    async with farm.db.begin() as conn:
        await conn.execute(
            sa.insert(t.activity),
            [
                {"at": minute - dt.timedelta(minutes=m), "tenant_id": 0, "running": r, "connected": 0, "nodes": 1}
                for m, r in ((5, 0), (4, 2), (3, 4), (1, 8))  # two minutes ago: no sample
            ],
        )
    monkeypatch.setattr(session, "open_client", lambda _profile: farm.client(root.token))
    out = await asyncio.to_thread(CliRunner().invoke, stats_cli.app, [])
    assert out.exit_code == 0, out.output
    (line,) = [line for line in out.output.splitlines() if line.startswith("running:")]
    assert line == "running:  ▁▃▅ █  desktops over the last 5 min, at most 8"
