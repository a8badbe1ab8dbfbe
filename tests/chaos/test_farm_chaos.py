"""A farm survives its nodes and its database failing: desktops move, never run twice, never stick.

Each test starts real ``deckard node`` processes (fake driver) on a throwaway PostgreSQL and breaks something
the way production breaks: ``kill -9``, a database restart, a node cut off from the network.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid

import pytest
import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.services import maintenance, node_ops
from deckard.services.context import SYSTEM
from deckard.services.desktops import request_start
from deckard.testing import MultiNodeFarm, PgCluster, seed_farm

pytestmark = pytest.mark.chaos


async def _wait(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def _nodes(db: Database) -> dict[str, tuple[int, str]]:
    async with db.connect() as conn:
        return {r.name: (r.id, r.state) for r in await conn.execute(sa.select(t.nodes))}


async def _desktops(db: Database) -> list[sa.Row]:  # type: ignore[type-arg]
    async with db.connect() as conn:
        return list(await conn.execute(sa.select(t.desktops).order_by(t.desktops.c.id)))


async def _start_farm(
    farm: MultiNodeFarm, names: list[str], db: Database, *, started: bool = False, **kw: float
) -> dict[str, int]:
    """Start the named nodes (unless ``started``: already launched by the caller) and wait until they run."""
    for name in names:
        if not started:
            farm.start_node(name, **kw)  # type: ignore[arg-type]

    async def all_running() -> dict[str, tuple[int, str]] | None:
        nodes = await _nodes(db)
        ok = all(nodes.get(n, (0, ""))[1] == "running" for n in names)
        return nodes if ok else None

    try:
        nodes = await _wait(all_running, 30, "every node running")
    except AssertionError:
        for name in names:  # say why in the failure report
            print(f"--- {name} ---\n" + farm.nodes[name].log.read_text(errors="replace")[-2000:])
        raise
    return {n: nodes[n][0] for n in names}


async def _start_all(db: Database, ids: list[int]) -> None:
    for desktop_id in ids:
        await request_start(db, desktop_id)


async def _all_running(db: Database, ids: list[int]) -> bool:
    rows = [r for r in await _desktops(db) if r.id in ids]
    return all(r.state == "running" for r in rows)


async def test_kill_9_node_running_desktops_every_desktop_restartable_elsewhere_within_15_s(
    farm: MultiNodeFarm,
) -> None:
    ids = await seed_farm(farm.database_url, users=3, desktops=9)
    db = Database(farm.database_url)
    await db.start(run_migrations=False)
    try:
        node_ids = await _start_farm(farm, ["n1", "n2", "n3"], db)
        await _start_all(db, ids)
        await _wait(lambda: _all_running(db, ids), 20, "desktops running")
        by_node: dict[int, list[int]] = {}
        for r in await _desktops(db):
            by_node.setdefault(r.node_id, []).append(r.id)
        victim = next(name for name, nid in node_ids.items() if by_node.get(nid))
        moved = by_node[node_ids[victim]]
        farm.kill(victim)
        t0 = time.monotonic()

        async def released() -> bool:
            rows = {r.id: r for r in await _desktops(db)}
            return all(rows[i].node_id is None and rows[i].state == "stopped" for i in moved)

        await _wait(released, 15, "the lost node's desktops released")
        detect = time.monotonic() - t0
        assert (await _nodes(db))[victim][1] == "lost"
        reasons = {r.id: r.failure_reason or "" for r in await _desktops(db) if r.id in moved}
        assert all(f"node {victim} was lost and fenced" in why for why in reasons.values()), reasons
        for desktop_id in moved:
            assert await request_start(db, desktop_id) != node_ids[victim]
        await _wait(lambda: _all_running(db, ids), 15 - detect, "desktops running again on other nodes")
        rows = await _desktops(db)
        assert {r.node_id for r in rows} <= {nid for n, nid in node_ids.items() if n != victim}
    finally:
        await db.close()


async def test_node_killed_in_the_middle_of_a_start_leaves_no_desktop_stuck_starting(farm: MultiNodeFarm) -> None:
    ids = await seed_farm(farm.database_url, desktops=4)
    db = Database(farm.database_url)
    await db.start(run_migrations=False)
    try:
        node_ids = await _start_farm(farm, ["slow"], db, fake_start_delay=30.0)
        await _start_all(db, ids)

        async def starting() -> bool:
            return all(r.state == "starting" for r in await _desktops(db))

        await _wait(starting, 10, "desktops starting")
        farm.kill("slow")
        await _start_farm(farm, ["fast"], db)

        async def none_starting() -> bool:
            return all(r.state in ("stopped", "failed") and r.node_id is None for r in await _desktops(db))

        await _wait(none_starting, 20, "no desktop left starting")
        for desktop_id in ids:
            assert await request_start(db, desktop_id) not in (None, node_ids["slow"])
        await _wait(lambda: _all_running(db, ids), 10, "desktops running on the other node")
    finally:
        await db.close()


async def test_two_nodes_racing_for_the_same_start_never_both_start_it(pg: PgCluster) -> None:
    """Claims are ``UPDATE … WHERE node_id = me AND cmd = 'start' … RETURNING``: one winner, whoever races."""
    url = pg.create_database("r_" + uuid.uuid4().hex[:10]).replace("0.0.0.0", "127.0.0.1")
    ids = await seed_farm(url, desktops=200)
    dbs = [Database(url) for _ in range(4)]
    for db in dbs:
        await db.start(run_migrations=False)
    try:
        a = await node_ops.register_node(dbs[0], "a", "", "", cpus=2, mem_total_mib=1, mem_free_mib=1)
        b = await node_ops.register_node(dbs[1], "b", "", "", cpus=2, mem_total_mib=1, mem_free_mib=1)
        async with dbs[0].begin() as conn:  # every start is for a; b races as if it had been assigned too
            await conn.execute(sa.update(t.desktops).values(cmd="start", node_id=a))

        async def move_to_b() -> None:
            for desktop_id in ids[::2]:
                async with dbs[3].begin() as conn:
                    await conn.execute(
                        sa.update(t.desktops)
                        .where(t.desktops.c.id == desktop_id, t.desktops.c.cmd == "start")
                        .values(node_id=b)
                    )

        claims = await asyncio.gather(
            *(node_ops.claim_starts(dbs[0], a) for _ in range(5)),
            *(node_ops.claim_starts(dbs[1], b) for _ in range(5)),
            *(node_ops.claim_starts(dbs[2], a) for _ in range(5)),
            move_to_b(),
        )
        claimed = [i for c in claims[:-1] for i in c]  # type: ignore[union-attr]
        assert len(claimed) == len(set(claimed)), "a start was claimed twice"
        rows = await _desktops(dbs[0])
        for r in rows:
            assert (r.id in claimed) == (r.state == "starting")
    finally:
        for db in dbs:
            await db.close()


async def test_postgresql_restarted_under_load_nodes_recover_without_operator_action(
    farm: MultiNodeFarm, pg: PgCluster
) -> None:
    ids = await seed_farm(farm.database_url, desktops=6)
    db = Database(farm.database_url)
    await db.start(run_migrations=False)
    try:
        node_ids = await _start_farm(farm, ["p1", "p2"], db)
        await _start_all(db, ids[:3])
        await _wait(lambda: _all_running(db, ids[:3]), 15, "first desktops running")
        pg.stop("fast")
        await asyncio.sleep(2)
        pg.start()
        # the nodes reconnect by themselves: new starts are claimed (notifications work again) and heartbeats flow
        await _wait(lambda: _try(lambda: _start_all(db, ids[3:])), 20, "starts accepted after the restart")
        await _wait(lambda: _all_running(db, ids), 20, "every desktop running after the restart")
        nodes = await _nodes(db)
        assert all(nodes[n][1] == "running" for n in node_ids), nodes
        assert all(p.proc.poll() is None for p in farm.nodes.values())
    finally:
        await db.close()


async def _try(fn) -> bool:  # type: ignore[no-untyped-def]
    try:
        await fn()
        return True
    except Exception:
        return False


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.mark.usefixtures("pg")
async def test_node_cut_off_from_the_database_self_fences_and_the_others_take_over(farm: MultiNodeFarm) -> None:
    tag = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = f"dkc{tag}", f"dkh{tag}", f"dkn{tag}"
    octet = int(tag[:2], 16) % 200 + 20
    host_ip, ns_ip = f"10.{octet}.77.1", f"10.{octet}.77.2"
    _sh("ip", "netns", "add", ns)
    try:
        _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _sh("ip", "link", "set", ns_if, "netns", ns)
        _sh("ip", "addr", "add", f"{host_ip}/24", "dev", host_if)
        _sh("ip", "link", "set", host_if, "up")
        _sh("ip", "-n", ns, "addr", "add", f"{ns_ip}/24", "dev", ns_if)
        _sh("ip", "-n", ns, "link", "set", ns_if, "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        ids = await seed_farm(farm.database_url, desktops=4)
        db = Database(farm.database_url)
        await db.start(run_migrations=False)
        try:
            cut_url = farm.database_url.replace("127.0.0.1", host_ip)
            farm.start_node("cut", prefix=["ip", "netns", "exec", ns], database_url=cut_url)
            node_ids = await _start_farm(farm, ["cut"], db, started=True)
            await _start_all(db, ids)  # only "cut" is running: it gets them all
            await _wait(lambda: _all_running(db, ids), 15, "desktops running on the cut node")
            others = await _start_farm(farm, ["ok"], db)
            _sh("ip", "link", "set", host_if, "down")
            t0 = time.monotonic()

            async def released() -> bool:
                return all(r.node_id is None for r in await _desktops(db))

            try:
                await _wait(released, 25, "the cut node's desktops released")
            except AssertionError:
                async with db.connect() as conn:
                    print(
                        [
                            tuple(r)
                            for r in await conn.execute(
                                sa.select(
                                    t.nodes.c.name,
                                    t.nodes.c.state,
                                    t.nodes.c.heartbeat_at,
                                    t.nodes.c.lost_reason,
                                    t.nodes.c.pid,
                                )
                            )
                        ]
                    )
                print(farm.nodes["ok"].log.read_text()[-3000:])
                raise

            async def fenced() -> bool:  # the others may mark it lost a moment before it fences itself
                cut = farm.nodes["cut"]
                return "node.self_fenced" in cut.log.read_text() or cut.proc.poll() is not None

            await _wait(fenced, 10, "the cut node fenced itself")
            log = farm.nodes["cut"].log.read_text()
            assert "node.self_fenced" in log or farm.nodes["cut"].proc.poll() is not None
            for desktop_id in ids:
                assert await request_start(db, desktop_id) == others["ok"]
            await _wait(lambda: _all_running(db, ids), 10, "desktops running on the other node")
            assert time.monotonic() - t0 < 30
            del node_ids
        finally:
            await db.close()
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)  # noqa: ASYNC221 - cleanup must not be cancelled
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # noqa: ASYNC221 - cleanup must not be cancelled


async def test_rolling_restart_keeps_every_desktop_running_where_it_is(farm: MultiNodeFarm) -> None:
    """``deckard node restart --all``: each daemon re-executes itself in turn and adopts its guests."""
    ids = await seed_farm(farm.database_url, users=2, desktops=6)
    db = Database(farm.database_url)
    await db.start(run_migrations=False)
    try:
        node_ids = await _start_farm(farm, ["n1", "n2"], db)
        await _start_all(db, ids)
        await _wait(lambda: _all_running(db, ids), 20, "desktops running")
        before = {r.id: (r.node_id, r.state_at, r.agent_token) for r in await _desktops(db)}
        assert {nid for nid, _, _ in before.values()} == set(node_ids.values()), "both nodes run desktops"
        for name, node_id in node_ids.items():
            async with db.connect() as conn:
                old = (await conn.execute(sa.select(t.nodes).where(t.nodes.c.id == node_id))).one()
            await maintenance.restart_node(db, SYSTEM, name)

            async def back(node_id: int = node_id, old: sa.Row = old) -> bool:  # type: ignore[type-arg]
                async with db.connect() as conn:
                    row = (await conn.execute(sa.select(t.nodes).where(t.nodes.c.id == node_id))).one()
                return row.state == "running" and row.started_at != old.started_at

            # 20 s was not enough on a fresh machine building the standard image alongside
            await _wait(back, 60, f"node {name} back after its restart")
            assert farm.nodes[name].proc.poll() is None, "the daemon re-executes itself: same process"
            log = farm.nodes[name].log.read_text()
            assert log.count('"node.adopted"') >= sum(1 for nid, _, _ in before.values() if nid == node_id)
        after = {r.id: (r.node_id, r.state_at, r.agent_token) for r in await _desktops(db)}
        assert after == before, "no desktop was stopped, moved or restarted"
        assert await _all_running(db, ids)
    finally:
        await db.close()
