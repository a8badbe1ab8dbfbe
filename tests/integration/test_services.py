"""Use cases over a real database (SQLite and PostgreSQL): desktops, start commands and claims."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.errors import Conflict, InvalidTransition, NotFound, Unavailable
from deckard.services import desktops, node_ops, users
from deckard.services.context import SYSTEM
from deckard.services.tenancy import bootstrap_farm

NET = "10.250.0.0/24"


async def _farm(db: Database) -> int:
    await bootstrap_farm(db)
    await users.create_user(db, SYSTEM, "alice", "s3cret!")
    await desktops.create_desktop(db, SYSTEM, "alice-desk", "alice", network=NET)
    node_id = await node_ops.register_node(db, "n1", "10.250.0.1", "", cpus=2, mem_total_mib=8000, mem_free_mib=8000)
    await node_ops.set_node_state(db, node_id, "running")
    return node_id


async def test_bootstrap_is_idempotent_and_returns_the_password_once(db: Database) -> None:
    assert await bootstrap_farm(db)
    assert await bootstrap_farm(db) is None


async def test_desktops_get_distinct_ips_and_macs_from_them(db: Database) -> None:
    await _farm(db)
    created = await asyncio.gather(
        *(desktops.create_desktop(db, SYSTEM, f"d{i}", "alice", network=NET) for i in range(12))
    )
    ips = {d["ip"] for d in created}
    assert len(ips) == 12
    for d in created:
        assert d["mac"].endswith(d["ip"].split(".")[-1] and f"{int(d['ip'].split('.')[-1]):02x}")


async def test_start_is_claimed_exactly_once_by_racing_claimers(db: Database) -> None:
    node_id = await _farm(db)
    desk_id = await desktops.find_desktop_id(db, SYSTEM, "alice-desk")
    assert await desktops.request_start(db, desk_id) == node_id
    claims = await asyncio.gather(*(node_ops.claim_starts(db, node_id) for _ in range(8)))
    assert sorted(i for ids in claims for i in ids) == [desk_id]
    row = await desktops.get_desktop(db, SYSTEM, desk_id)
    assert row["state"] == "starting" and row["cmd"] is None


async def test_a_node_sees_what_it_has_to_claim_in_one_read(db: Database) -> None:
    """An idle pass of the node's loop (four a second on SQLite) reads once and writes nothing."""
    node_id = await _farm(db)
    idle = await node_ops.pending_work(db, node_id)
    assert (idle.node_command, idle.desktop_commands, idle.volume_changes) == (False, frozenset(), [])
    desk_id = await desktops.find_desktop_id(db, SYSTEM, "alice-desk")
    await desktops.request_start(db, desk_id)
    assert (await node_ops.pending_work(db, node_id)).desktop_commands == {"start"}
    assert (await node_ops.pending_work(db, node_id + 1)).desktop_commands == frozenset()  # another node's: not ours
    await node_ops.claim_starts(db, node_id)
    await node_ops.mark_running(db, node_id, desk_id, image_id=None, guest_ms=1, agent_ms=1)  # type: ignore[arg-type]
    assert (await node_ops.pending_work(db, node_id)).desktop_commands == frozenset()
    await desktops.request_stop(db, desk_id)
    assert (await node_ops.pending_work(db, node_id)).desktop_commands == {"stop"}
    async with db.begin() as conn:
        await conn.execute(sa.update(t.nodes).where(t.nodes.c.id == node_id).values(cmd="drain"))
    assert (await node_ops.pending_work(db, node_id)).node_command


async def test_start_of_a_running_desktop_is_refused_with_a_code(db: Database) -> None:
    node_id = await _farm(db)
    desk_id = await desktops.find_desktop_id(db, SYSTEM, "alice-desk")
    await desktops.request_start(db, desk_id)
    await node_ops.claim_starts(db, node_id)
    await node_ops.mark_running(db, node_id, desk_id, image_id=None, guest_ms=1, agent_ms=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidTransition) as e:
        await desktops.request_start(db, desk_id)
    assert e.value.code == "cannot_start"
    with pytest.raises(Conflict):
        await desktops.delete_desktop(db, SYSTEM, desk_id)


async def test_start_without_a_node_says_what_to_do(db: Database) -> None:
    await bootstrap_farm(db)
    await users.create_user(db, SYSTEM, "bob", "pw12")
    d = await desktops.create_desktop(db, SYSTEM, "bob-desk", "bob", network=NET)
    with pytest.raises(Unavailable) as e:
        await desktops.request_start(db, d["id"])
    assert "deckard node" in e.value.message
    row = await desktops.get_desktop(db, SYSTEM, d["id"])
    assert row["cmd"] is None and row["node_id"] is None


async def test_stop_before_claim_withdraws_the_start(db: Database) -> None:
    node_id = await _farm(db)
    desk_id = await desktops.find_desktop_id(db, SYSTEM, "alice-desk")
    await desktops.request_start(db, desk_id)
    await desktops.request_stop(db, desk_id)
    assert await node_ops.claim_starts(db, node_id) == []
    row = await desktops.get_desktop(db, SYSTEM, desk_id)
    assert row["state"] == "stopped" and row["cmd"] is None


async def test_failed_start_keeps_the_reason_and_can_be_retried(db: Database) -> None:
    node_id = await _farm(db)
    desk_id = await desktops.find_desktop_id(db, SYSTEM, "alice-desk")
    await desktops.request_start(db, desk_id)
    await node_ops.claim_starts(db, node_id)
    await node_ops.mark_failed(db, node_id, desk_id, "image file missing")
    row = await desktops.get_desktop(db, SYSTEM, desk_id)
    assert row["state"] == "failed" and row["failure_reason"] == "image file missing"
    assert await desktops.request_start(db, desk_id) == node_id


async def test_unknown_desktop_is_not_found(db: Database) -> None:
    with pytest.raises(NotFound):
        await desktops.find_desktop_id(db, SYSTEM, "nope")


async def test_notifications_reach_a_subscriber(db: Database) -> None:
    async with db.bus.subscribe("node.7") as sub:
        await db.bus.notify("node.7", "42")
        assert await sub.wait(5) == "42"


async def test_schema_is_migrated(db: Database) -> None:
    async with db.connect() as conn:
        n = (await conn.execute(sa.select(sa.func.count()).select_from(t.tenants))).scalar_one()
    assert n == 0


async def test_a_vm_osf_needs_room_to_boot_and_keeps_it(db: Database) -> None:
    from deckard.model.errors import BadInput
    from deckard.services import osfs

    await _farm(db)
    with pytest.raises(BadInput) as e:
        await osfs.create_osf(db, SYSTEM, "tiny-vm", memory_mib=128, driver="vm")
    assert e.value.code == "bad_memory" and "256" in e.value.message
    await osfs.create_osf(db, SYSTEM, "small", memory_mib=128)  # a container is fine with it
    with pytest.raises(BadInput):
        await osfs.update_osf(db, SYSTEM, "small", {"driver": "vm"})  # nor by changing one half at a time
    await osfs.create_osf(db, SYSTEM, "vm", memory_mib=512, driver="vm")
    with pytest.raises(BadInput):
        await osfs.update_osf(db, SYSTEM, "vm", {"memory_mib": 200})
    assert (await osfs.update_osf(db, SYSTEM, "vm", {"memory_mib": 768}))["memory_mib"] == 768


async def test_a_burst_of_starts_spreads_over_the_nodes_before_any_is_claimed(db: Database) -> None:
    """Starts placed and not yet claimed count on their node: six at once on two like nodes go three and three."""
    await bootstrap_farm(db)
    await users.create_user(db, SYSTEM, "alice", "s3cret!")
    ids = [(await desktops.create_desktop(db, SYSTEM, f"d{i}", "alice", network=NET))["id"] for i in range(6)]
    nodes = []
    for name, free in (("n1", 8000), ("n2", 7990)):  # n1 a little better: without the count it took all six
        node_id = await node_ops.register_node(
            db, name, "10.250.0.1", "", cpus=2, mem_total_mib=8000, mem_free_mib=free, load=0.5
        )
        await node_ops.set_node_state(db, node_id, "running")
        nodes.append(node_id)
    placed = [await desktops.request_start(db, desk_id) for desk_id in ids]
    assert sorted(placed.count(n) for n in nodes) == [3, 3], placed
    async with db.connect() as conn:
        loads = (await conn.execute(sa.select(t.nodes.c.name, t.nodes.c.load))).all()
    assert sorted(loads) == [("n1", 0.5), ("n2", 0.5)], "a node registers with its host's load"
