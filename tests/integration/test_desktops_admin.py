"""Desktops, users and nodes administered through the real API (TLS, uvicorn, SQLite and PostgreSQL): update,
reset, disconnect, block, bulk actions that answer per item, lists with filters/sort/paging/fields, node
blocking, connection history and dashboard statistics."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
import test_api
from test_api import Farm, add_node, call

from deckard.client.api import ApiClient
from deckard.db import schema as t
from deckard.model.entities import utcnow
from deckard.model.errors import BadInput, Conflict, PermissionDenied, Unavailable
from deckard.model.schemas import Connection, Desktop, Node, User
from deckard.runtime.paths import FarmPaths

farm = test_api.farm  # the real API with TLS, shared with test_api.py


async def _desktops(farm: Farm, n: int, *, users: tuple[str, ...] = ("alice",)) -> tuple[ApiClient, list[Desktop]]:
    api = await farm.admin_client()
    for login in users:
        await call(api.create_user, login, "pw-1234")
    made = [await call(api.create_desktop, f"desk{i}", users[i % len(users)]) for i in range(n)]
    return api, made


async def _set(farm: Farm, desktop_id: int, **values: Any) -> None:
    async with farm.db.begin() as conn:
        await conn.execute(sa.update(t.desktops).where(t.desktops.c.id == desktop_id).values(**values))


async def test_update_renames_and_describes_but_refuses_a_new_tag_while_running(farm: Farm) -> None:
    api, (desk,) = await _desktops(farm, 1)
    row = await call(api.update_desktop, desk.id, name="renamed", description="for tests", tag="head")
    assert (row.name, row.description, row.tag) == ("renamed", "for tests", "head")
    await _set(farm, desk.id, state="running")
    with pytest.raises(Conflict) as e:
        await call(api.update_desktop, "renamed", tag="default")
    assert e.value.code == "desktop_running"
    assert (await call(api.get_desktop, desk.id)).tag == "head"  # nothing changed
    assert (await call(api.update_desktop, "renamed", description="still ok")).description == "still ok"


async def test_reset_discards_the_overlay_of_a_stopped_desktop_and_refuses_a_running_one(
    farm: Farm, tmp_path: Any
) -> None:
    api, (desk,) = await _desktops(farm, 1)
    paths = FarmPaths(tmp_path)
    overlay = paths.overlay(desk.id)
    (overlay / "upper").mkdir(parents=True)
    (overlay / "upper" / "junk").write_text("x")
    await call(api.reset_desktop, desk.name)
    assert not overlay.exists()
    overlay.mkdir(parents=True)
    await _set(farm, desk.id, state="running")
    with pytest.raises(Conflict) as e:
        await call(api.reset_desktop, desk.name)
    assert e.value.code == "desktop_running" and overlay.exists()


async def test_delete_takes_the_desktops_layer_with_it(farm: Farm, tmp_path: Any) -> None:
    api, (desk,) = await _desktops(farm, 1)
    overlay = FarmPaths(tmp_path).overlay(desk.id)
    (overlay / "upper").mkdir(parents=True)
    (overlay / "upper" / "junk").write_text("x")
    await _set(farm, desk.id, state="running")
    with pytest.raises(Conflict):
        await call(api.delete_desktop, desk.name)
    assert overlay.exists()
    await _set(farm, desk.id, state="stopped")
    await call(api.delete_desktop, desk.name)
    assert not overlay.exists()


async def test_disconnect_clears_the_session_so_the_tunnel_closes(farm: Farm) -> None:
    api, (desk,) = await _desktops(farm, 1)
    await _set(farm, desk.id, state="running", session_id="abc123", user_state="connected")
    row = await call(api.disconnect_desktop, desk.id)
    assert row.user_state == "disconnected"
    async with farm.db.connect() as conn:
        sid = (await conn.execute(sa.select(t.desktops.c.session_id).where(t.desktops.c.id == desk.id))).scalar()
    assert sid is None


async def test_a_blocked_desktop_cannot_start_until_unblocked(farm: Farm) -> None:
    api, (desk,) = await _desktops(farm, 1)
    await add_node(farm.db)
    assert (await call(api.block_desktop, desk.id)).blocked is True
    with pytest.raises(PermissionDenied) as e:
        await call(api.start_desktop, desk.id)
    assert (e.value.code, e.value.status) == ("desktop_blocked", 403)
    await call(api.unblock_desktop, desk.id)
    assert (await call(api.start_desktop, desk.id)).cmd == "start"


async def test_expire_sets_the_deadlines_an_operator_may_not_and_clear_removes_them(farm: Farm) -> None:
    """``desktop.expire`` (QVD's vm_expiration_soft/hard set by an administrator): seconds from now, a new soft
    deadline is announced again, the hard one may not come first, and the ACL is required."""
    api, (desk,) = await _desktops(farm, 1)
    await _set(farm, int(desk.id or 0), state="running", expire_notified_at=utcnow())
    before = utcnow()
    row = await call(api.expire_desktop, str(desk.name), soft_s=60, hard_s=600)
    assert row.expire_soft_at is not None and row.expire_hard_at is not None
    assert 60 <= (row.expire_soft_at - before).total_seconds() < 90
    assert (row.expire_hard_at - row.expire_soft_at).total_seconds() == 540
    async with farm.db.connect() as conn:
        notified = await conn.scalar(sa.select(t.desktops.c.expire_notified_at).where(t.desktops.c.id == desk.id))
    assert notified is None  # the node warns the user about the new deadline
    with pytest.raises(BadInput) as e:
        await call(api.expire_desktop, str(desk.name), soft_s=600, hard_s=60)
    assert e.value.code == "bad_expiry"
    await call(api.create_admin, "op", "pw-12345678", roles=["Operator"])
    operator = farm.client()
    await call(operator.login, "op", "pw-12345678")
    with pytest.raises(PermissionDenied) as denied:
        await call(operator.expire_desktop, str(desk.name), hard_s=0)
    assert denied.value.code == "forbidden_action"
    cleared = await call(api.expire_desktop, str(desk.name))
    assert cleared.expire_soft_at is None and cleared.expire_hard_at is None


async def test_bulk_start_answers_per_item_with_mixed_results(farm: Farm) -> None:
    api, made = await _desktops(farm, 5)
    node_id = await add_node(farm.db)
    ids = [d.id for d in made]
    await _set(farm, ids[0], blocked=True)
    await _set(farm, ids[1], state="running")
    out = await call(api.bulk, "desktops", "start", ids=[*ids, 9999])
    assert sorted(out.ok) == ids[2:]
    assert out.failed[str(ids[0])]["code"] == "desktop_blocked"
    assert out.failed[str(ids[1])]["code"] == "cannot_start"
    assert out.failed["9999"]["code"] == "desktop_not_found"
    for i in ids[2:]:
        row = await call(api.get_desktop, i)
        assert row.cmd == "start" and row.node_id == node_id
    again = await call(api.bulk, "desktops", "start", ids=ids[2:])  # asking twice is the same request
    assert sorted(again.ok) == ids[2:] and not again.failed


async def test_bulk_start_places_with_the_farms_placer_and_each_osfs_driver(farm: Farm) -> None:
    api, made = await _desktops(farm, 6)
    a, b = await add_node(farm.db, "n1"), await add_node(farm.db, "n2")
    vm = await add_node(farm.db, "n3")
    async with farm.db.begin() as conn:
        await conn.execute(sa.update(t.nodes).where(t.nodes.c.id == vm).values(driver="vm"))
    await call(api.set_config, "placement.placer", "binpack")  # fill one node before the next
    out = await call(api.bulk, "desktops", "start", ids=[d.id for d in made[:4]])
    assert sorted(out.ok) == sorted(d.id for d in made[:4])
    nodes = {(await call(api.get_desktop, d.id)).node_id for d in made[:4]}
    assert len(nodes) == 1 and nodes <= {a, b}  # packed on one container node, never on the VM node
    await call(api.create_osf, "vms", driver="vm")
    for d in made[4:]:
        await call(api.update_desktop, d.id, osf="vms")
    out = await call(api.bulk, "desktops", "start", ids=[d.id for d in made[4:]])
    assert sorted(out.ok) == sorted(d.id for d in made[4:])
    assert {(await call(api.get_desktop, d.id)).node_id for d in made[4:]} == {vm}


async def test_bulk_by_filter_acts_only_on_matching_desktops(farm: Farm) -> None:
    api, made = await _desktops(farm, 4, users=("alice", "bob"))
    out = await call(api.bulk, "desktops", "block", filter={"user": "bob"})
    bobs = sorted(d.id for d in made if d.user == "bob")
    assert sorted(out.ok) == bobs and not out.failed
    rows = await call(api.list_page, "desktops", Desktop, [("blocked", "true")])
    assert sorted(r.id for r in rows.items) == bobs
    no_node = await call(api.bulk, "desktops", "start", filter={"blocked": False})
    assert {e["code"] for e in no_node.failed.values()} == {"no_node"} and not no_node.ok


async def test_bulk_delete_refuses_running_desktops_and_deletes_the_rest(farm: Farm) -> None:
    api, made = await _desktops(farm, 3)
    await _set(farm, made[0].id, state="running")
    out = await call(api.bulk, "desktops", "delete", ids=[d.id for d in made])
    assert sorted(out.ok) == [made[1].id, made[2].id]
    assert out.failed[str(made[0].id)]["code"] == "desktop_running"


async def test_bulk_user_block_reports_unknown_ids(farm: Farm) -> None:
    api, _ = await _desktops(farm, 0, users=("alice", "bob"))
    ids = [u.id for u in await call(api.list_users)]
    out = await call(api.bulk, "users", "block", ids=[*ids, 4242])
    assert sorted(out.ok) == sorted(ids) and out.failed["4242"]["code"] == "user_not_found"
    assert all(u.blocked for u in await call(api.list_users))
    with pytest.raises(BadInput):
        await call(api.bulk, "users", "block", filter={"nope": "x"})


async def test_list_filters_sort_pages_and_selects_fields(farm: Farm) -> None:
    api, made = await _desktops(farm, 12, users=("alice", "bob"))
    page = await call(api.list_page, "desktops", Desktop, [("user", "alice"), ("sort", "-name"), ("per_page", "4")])
    assert page.total == 6 and len(page.items) == 4
    names = [r.name for r in page.items]
    assert names == sorted(names, reverse=True) and all(r.user == "alice" for r in page.items)
    page2 = await call(
        api.list_page, "desktops", Desktop, [("user", "alice"), ("sort", "-name"), ("per_page", "4"), ("page", "2")]
    )
    assert len(page2.items) == 2 and not {r.id for r in page2.items} & {r.id for r in page.items}
    ids = [d.id for d in made]
    ranged = await call(api.list_page, "desktops", Desktop, [("id__gte", str(ids[3])), ("id__lt", str(ids[6]))])
    assert [r.id for r in ranged.items] == ids[3:6]
    contains = await call(api.list_page, "desktops", Desktop, [("name__contains", "SK1")])  # case-insensitive
    assert {r.name for r in contains.items} == {"desk1", "desk10", "desk11"}
    inside = await call(api.list_page, "desktops", Desktop, [("name__in", "desk2,desk5,nope")])
    assert sorted(r.name for r in inside.items) == ["desk2", "desk5"] and inside.total == 2
    slim = await call(api.list_page, "desktops", Desktop, [("fields", "name,state"), ("per_page", "1")])
    assert slim.items[0].model_fields_set == {"id", "name", "state"} and slim.total == 12
    for bad in ([("colour", "red")], [("sort", "colour")], [("name__like", "x")], [("id", "abc")]):
        with pytest.raises(BadInput):
            await call(api.list_page, "desktops", Desktop, bad)
    users = await call(api.list_page, "users", User, [("login__contains", "bo")])
    assert [u.login for u in users.items] == ["bob"]


async def test_a_blocked_node_gets_no_desktops(farm: Farm) -> None:
    api, (desk,) = await _desktops(farm, 1)
    await add_node(farm.db, "n1")
    assert (await call(api.block_node, "n1")).blocked is True
    assert [n.name for n in (await call(api.list_page, "nodes", Node, [("blocked", "true")])).items] == ["n1"]
    with pytest.raises(Unavailable) as e:
        await call(api.start_desktop, desk.id)
    assert e.value.code == "no_node"
    await call(api.unblock_node, "n1")
    assert (await call(api.start_desktop, desk.id)).cmd == "start"


async def test_connection_history_and_stats(farm: Farm) -> None:
    api, (desk,) = await _desktops(farm, 1)
    await add_node(farm.db)
    async with farm.db.begin() as conn:
        user_id = (await conn.execute(sa.select(t.users.c.id).where(t.users.c.login == "alice"))).scalar_one()
        for ms in (100.0, 200.0, 900.0):
            await conn.execute(
                sa.insert(t.connections).values(
                    desktop_id=desk.id, user_id=user_id, login="alice", started_at=utcnow(), t_total_ms=ms
                )
            )
    history = await call(api.list_page, "connections", Connection, [("t_total_ms__gte", "200"), ("sort", "t_total_ms")])
    assert [c.t_total_ms for c in history.items] == [200.0, 900.0]
    assert history.items[0].desktop == desk.name
    await _set(farm, desk.id, state="running", user_state="connected", expire_hard_at=utcnow())
    s = await call(api.stats)
    assert s.desktops["total"] == 1 and s.desktops["by_state"] == {"running": 1}
    assert s.users == {"total": 1, "blocked": 0, "connected": 1}
    assert s.nodes["by_state"] == {"running": 1}
    day = s.time_to_desktop_ms["last_24h"]
    assert (day["count"], day["p50"], day["p99"]) == (3, 200.0, 900.0)
    assert len(s.time_to_desktop_ms["hourly"]) >= 1
    assert [d["id"] for d in s.near_expiry] == [desk.id]
    assert s.busiest_nodes[0]["name"] == "n1"
