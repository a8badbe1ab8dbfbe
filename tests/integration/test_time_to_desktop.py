"""Time to desktop per phase, per image and per node (``GET /stats/time-to-desktop``, ``deckard stats
time-to-desktop``), on SQLite and PostgreSQL.

A real connect through the broker to a fake-driver desktop (``test_metrics.py``'s farm) records the node and the
image in the connection history and logs one ``broker.connection`` line and one ``node.reconcile`` line; the
figures themselves are checked on connection rows written with known timings, through the real API with TLS
(``test_api.py``'s farm): percentiles, grouping, the window, tenant scoping and a bad window.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
import test_api
import test_metrics
from test_api import add_node, call
from test_metrics import RFB_BANNER, connections_recorded
from test_tenancy_acl import multitenant, tenant_admin

from deckard.client import broker as broker_client
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import utcnow
from deckard.model.errors import BadInput, PermissionDenied
from deckard.services.stats import percentile

farm = test_api.farm  # the real API with TLS
broker_farm = test_metrics.farm  # the broker, a node with the fake driver, the API over ASGI

PHASES = ("auth", "claim", "start", "agent", "display", "total")


async def test_a_connect_through_the_broker_records_its_node_and_image_and_logs_one_line(
    broker_farm: test_metrics.Farm,
) -> None:
    with structlog.testing.capture_logs() as logs:
        reader, writer = await broker_client.connect(
            f"127.0.0.1:{broker_farm.broker.port}", "alice", "pw-alice", broker_farm.ca, broker_farm.desktop_id
        )
        assert await asyncio.wait_for(reader.readexactly(len(RFB_BANNER)), 5) == RFB_BANNER
        writer.close()
        for _ in range(600):  # up to 30 s on a loaded machine
            if rows := await connections_recorded(broker_farm.db, broker_farm.desktop_id):
                break
            await asyncio.sleep(0.05)
        for _ in range(100):  # the log line follows the row
            if any(e["event"] == "broker.connection" for e in logs):
                break
            await asyncio.sleep(0.05)
    (row,) = rows
    async with broker_farm.db.connect() as conn:
        node_id = (await conn.execute(sa.select(t.nodes.c.id))).scalar_one()
    assert (row.node_id, row.image_id) == (node_id, broker_farm.image_id)

    (line,) = [e for e in logs if e["event"] == "broker.connection"]
    assert line["desktop_id"] == broker_farm.desktop_id and line["connection_id"] == row.id
    assert (line["result"], line["code"], line["node_id"], line["image_id"]) == (
        "closed",
        None,
        node_id,
        broker_farm.image_id,
    )
    assert all(line[f"t_{phase}_ms"] == getattr(row, f"t_{phase}_ms") for phase in PHASES)
    passes = [e for e in logs if e["event"] == "node.reconcile"]
    assert [(e["starts"], e["stops"]) for e in passes if e["starts"]] == [(1, 0)]
    assert all(e["ms"] >= 0 and e["log_level"] == "info" for e in passes)

    login = await broker_farm.http.post(
        "/api/v1/auth/login", json={"name": "admin", "password": broker_farm.admin_password}
    )
    res = await broker_farm.http.get(
        "/api/v1/stats/time-to-desktop", headers={"Authorization": f"Bearer {login.json()['token']}"}
    )
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["count"] == 1 and body["window"] == "24h"
    (image,) = body["by_image"]
    (node,) = body["by_node"]
    assert (image["image_id"], image["version"], image["count"]) == (broker_farm.image_id, "test", 1)
    assert (node["node_id"], node["node"]) == (node_id, broker_farm.node.settings.node.name)
    for phase in PHASES:  # a cold start: every phase timed once, p50 = p95 = the row's figure
        want = getattr(row, f"t_{phase}_ms")
        assert image["phases"][phase] == node["phases"][phase] == {"count": 1, "p50": want, "p95": want}, phase


async def _image(db: Database, version: str) -> int:
    async with db.begin() as conn:
        osf = (await conn.execute(sa.select(t.osfs.c.id).order_by(t.osfs.c.id))).scalars().first()
        res = await conn.execute(
            sa.insert(t.disk_images)
            .values(osf_id=osf, version=version, path=f"{version}.tar", state="published", created_at=utcnow())
            .returning(t.disk_images.c.id)
        )
        return int(res.scalar_one())


async def _connections(db: Database, login: str, rows: list[dict[str, Any]]) -> None:
    """Connection history rows of ``login`` (a user of any tenant): started a minute ago unless ``ago`` says."""
    now = utcnow()
    async with db.begin() as conn:
        user_id = (await conn.execute(sa.select(t.users.c.id).where(t.users.c.login == login))).scalar_one()
        for r in rows:
            started = now - r.pop("ago", dt.timedelta(minutes=1))
            await conn.execute(
                sa.insert(t.connections).values(
                    {"user_id": user_id, "login": login, "started_at": started, "result": "closed", **r}
                )
            )


def _timed(total: float, **more: Any) -> dict[str, Any]:
    """A connection that reached its desktop: every phase but ``agent`` (a warm desktop) timed from ``total``."""
    return {
        "t_auth_ms": total / 10,
        "t_claim_ms": total / 20,
        "t_start_ms": total / 2,
        "t_display_ms": total / 4,
        "t_total_ms": total,
        **more,
    }


async def test_phases_are_grouped_by_image_and_by_node_within_the_window(farm: test_api.Farm) -> None:
    api = await farm.admin_client()
    await call(api.create_user, "alice", "pw-alice-1")
    n1, n2 = await add_node(farm.db, "n1"), await add_node(farm.db, "n2")
    old, new = await _image(farm.db, "2026.11"), await _image(farm.db, "2026.12")
    totals_new_n1 = [100.0, 200.0, 300.0, 400.0, 1000.0]
    await _connections(
        farm.db,
        "alice",
        [
            *(_timed(ms, image_id=new, node_id=n1) for ms in totals_new_n1),
            _timed(800.0, image_id=new, node_id=n2, t_agent_ms=350.0),  # a cold start: the agent phase too
            _timed(2000.0, image_id=old, node_id=n2),
            _timed(5000.0),  # recorded before connections knew their image and node
            _timed(9000.0, image_id=new, node_id=n1, ago=dt.timedelta(hours=30)),  # outside the day
            {"image_id": new, "node_id": n1, "t_auth_ms": 5.0, "result": "failed"},  # never reached the desktop
        ],
    )
    s = await call(api.time_to_desktop)
    assert (s.window, s.count, s.phases) == ("24h", 8, list(PHASES))
    assert 86399 <= (s.at - s.since).total_seconds() <= 86401

    by_image = {g.image_id: g for g in s.by_image}
    assert [g.image_id for g in s.by_image] == [new, old, None]  # most connections first, the unknown last
    assert (by_image[new].osf, by_image[new].version, by_image[new].count) == ("default", "2026.12", 6)
    totals_new = [*totals_new_n1, 800.0]
    total = by_image[new].phases["total"]
    assert (total.count, total.p50, total.p95) == (6, percentile(totals_new, 50), percentile(totals_new, 95))
    assert (total.p50, total.p95) == (300.0, 1000.0)
    start = by_image[new].phases["start"]
    assert (start.p50, start.p95) == (150.0, 500.0)
    agent = by_image[new].phases["agent"]
    assert (agent.count, agent.p50, agent.p95) == (1, 350.0, 350.0)
    assert by_image[old].phases["agent"].model_dump() == {"count": 0, "p50": None, "p95": None}
    assert by_image[None].count == 1 and by_image[None].version is None

    by_node = {g.node_id: g for g in s.by_node}
    assert [g.node_id for g in s.by_node] == [n1, n2, None]
    assert (by_node[n1].node, by_node[n1].count) == ("n1", 5)
    assert (by_node[n1].phases["total"].p50, by_node[n1].phases["total"].p95) == (300.0, 1000.0)
    assert (by_node[n2].node, by_node[n2].count, by_node[n2].phases["total"].p95) == ("n2", 2, 2000.0)

    week = await call(api.time_to_desktop, "7d")
    assert week.count == 9 and week.window == "7d"
    assert {g.node_id: g.count for g in week.by_node}[n1] == 6
    assert (await call(api.time_to_desktop, "1m")).count == 0  # every row started a minute or more ago


async def test_an_empty_window_answers_empty_groups(farm: test_api.Farm) -> None:
    s = await call((await farm.admin_client()).time_to_desktop, "30m")
    assert (s.count, s.by_image, s.by_node, s.window) == (0, [], [], "30m")


@pytest.mark.databases("sqlite")  # the window's parsing is the subject
@pytest.mark.parametrize("window", ["0", "30s", "8d", "169h", "abc", "", "-1h", "24 h", "1e3", "9" * 40, "24H "])
async def test_a_bad_window_is_422_bad_window(farm: test_api.Farm, window: str) -> None:
    api = await farm.admin_client()
    if window == "24H ":  # case and spaces around are forgiven, as for every duration
        assert (await call(api.time_to_desktop, window)).window == "24h"
        return
    with pytest.raises(BadInput) as e:
        await call(api.time_to_desktop, window)
    assert (e.value.code, e.value.status) == ("bad_window", 422)
    assert e.value.details == {"field": "window", "min": "1m", "max": "7d"}
    assert "1m to 7d" in e.value.message


async def test_a_tenant_administrator_sees_only_the_connections_of_their_tenant(farm: test_api.Farm) -> None:
    root = await farm.admin_client()
    await multitenant(root)
    acme = await tenant_admin(farm, root, "acme", "ann", ["Tenant admin"])
    beta = await tenant_admin(farm, root, "beta", "bob", ["Tenant admin"])
    await call(acme.create_user, "alice", "pw-alice-1")
    await call(beta.create_user, "bruno", "pw-bruno-1")
    node = await add_node(farm.db, "shared")
    await _connections(farm.db, "alice", [_timed(100.0, node_id=node), _timed(300.0, node_id=node)])
    await _connections(farm.db, "bruno", [_timed(5000.0, node_id=node)])

    mine = await call(acme.time_to_desktop)
    assert mine.count == 2
    (shared,) = mine.by_node
    assert (shared.node, shared.count, shared.phases["total"].p95) == ("shared", 2, 300.0)
    assert (await call(beta.time_to_desktop)).by_node[0].phases["total"].p50 == 5000.0
    assert (await call(root.time_to_desktop)).count == 3

    await call(acme.create_role, "Desktops only", grants=[("desktop.see", True)])
    await call(acme.create_admin, "deskview", "pw-deskview-1234", roles=["Desktops only"])
    viewer = farm.client()
    await call(viewer.login, "deskview", "pw-deskview-1234", "acme")
    with pytest.raises(PermissionDenied) as e:
        await call(viewer.time_to_desktop)
    assert e.value.code == "forbidden_action"


async def test_the_cli_prints_a_table_per_image_and_per_node(
    farm: test_api.Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from deckard.cli import session
    from deckard.cli import stats as stats_cli

    root = await farm.admin_client()
    await call(root.create_user, "alice", "pw-alice-1")
    node = await add_node(farm.db, "n1")
    image = await _image(farm.db, "2026.12")
    await _connections(farm.db, "alice", [_timed(ms, node_id=node, image_id=image) for ms in (100.0, 300.0)])
    monkeypatch.setattr(session, "open_client", lambda _profile: farm.client(root.token))
    runner = CliRunner()
    out = await asyncio.to_thread(runner.invoke, stats_cli.app, ["time-to-desktop", "--window", "2h"])
    assert out.exit_code == 0, out.output
    lines = [line for line in out.output.splitlines() if "api.request" not in line]  # the API's log, same process
    assert lines[0] == "time to desktop over 2h (2 connections), p50/p95 in ms per phase"
    rows = [[cell.strip() for cell in line.split("│")] for line in lines if "│" in line]
    assert rows == [
        ["default 2026.12", "2", "10/30", "5/15", "50/150", "-", "25/75", "100/300"],
        ["n1", "2", "10/30", "5/15", "50/150", "-", "25/75", "100/300"],
    ]
    as_json = await asyncio.to_thread(runner.invoke, stats_cli.app, ["time-to-desktop", "--json"])
    assert '"by_node"' in as_json.output and as_json.exit_code == 0
    bad = await asyncio.to_thread(runner.invoke, stats_cli.app, ["time-to-desktop", "--window", "1y"])
    assert bad.exit_code == 1 and "bad_window" in bad.output
