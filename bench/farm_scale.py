"""Farm scale benchmark (fake driver, PostgreSQL): placement rate, start→claim latency, heartbeat load, failover.

200 nodes are simulated in this process (their database traffic: heartbeats every 2 s and claims on notification);
20,000 desktops are seeded.  Prints the figures; docs/benchmarks.md records them.  Needs root (PostgreSQL as the
postgres user): ``.venv/bin/python bench/farm_scale.py [--nodes 200 --desktops 20000]``.

Placement is compared in the same run: today's exhaustive scorer (``best_node``, every node scored) against
``NodeIndex``, on the same figures and on farms filled with 50 desktops a node one placement after the other (the
load spread at the end is the quality).  ``--placement-only`` does that at 200 and 1,000 nodes without a database.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import statistics
import time
from collections.abc import Callable

import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.placement import NodeIndex, NodeLoad, Request, best_node
from deckard.services import cluster, node_ops
from deckard.services.desktops import request_start
from deckard.services.events import node_channel
from deckard.services.placement import node_loads
from deckard.testing import PgCluster, seed_farm


def farm(n_nodes: int, *, mixed: bool) -> list[NodeLoad]:
    """Nodes as the bench registers them (16 CPUs, 60,000 MiB free) or, ``mixed``, of assorted sizes and loads."""
    r = random.Random(n_nodes)
    return [
        NodeLoad(
            node_id=i,
            name=f"n{i}",
            state="running",
            blocked=False,
            fresh=True,
            mem_free_mib=r.randrange(30000, 120000) if mixed else 60000,
            cpus=r.choice([8.0, 16.0, 32.0]) if mixed else 16.0,
            load=round(r.uniform(0, 4), 2) if mixed else 0.0,
            desktops=0,
        )
        for i in range(n_nodes)
    ]


def rate(decide: Callable[[], object], seconds: float = 1.0) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        decide()
        n += 1
    return n / (time.perf_counter() - t0)


def fill(loads: list[NodeLoad], placements: int, *, indexed: bool) -> tuple[float, float, list[NodeLoad]]:
    """Place ``placements`` desktops of 512 MiB one after the other: decisions/s, the same with the figures of the
    chosen node updated after each (placements/s), and the nodes at the end."""
    req, rng, spent, began = Request(512), random.Random(7), 0.0, time.perf_counter()
    index, nodes = NodeIndex(loads), list(loads)
    position = {n.node_id: i for i, n in enumerate(nodes)}
    for _ in range(placements):
        t0 = time.perf_counter()
        best = index.best(req, rng) if indexed else best_node(nodes, req, rng=rng)
        spent += time.perf_counter() - t0
        assert best is not None, "the farm is full"
        if indexed:
            index.place(best, 512)
        else:
            nodes[position[best.node_id]] = dataclasses.replace(
                best,
                desktops=best.desktops + 1,
                mem_free_mib=best.mem_free_mib - 512,
                committed_mib=best.committed_mib + 512,
            )
    return placements / spent, placements / (time.perf_counter() - began), index.nodes if indexed else nodes


def spread(nodes: list[NodeLoad]) -> str:
    desktops = [n.desktops for n in nodes]
    free = [n.mem_free_mib for n in nodes]
    return (
        f"desktops/node {min(desktops)}-{max(desktops)} (stdev {statistics.pstdev(desktops):.2f}), "
        f"free MiB {min(free)}-{max(free)}"
    )


def report_placement(loads: list[NodeLoad], *, fills: bool = True) -> None:
    """Today's exhaustive scorer (``best_node``) against the index, same nodes, same run."""
    req, rng, index = Request(512), random.Random(1), NodeIndex(loads)
    old, new = rate(lambda: best_node(loads, req, rng=rng)), rate(lambda: index.best(req, rng))
    print(
        f"placement, {len(loads)} nodes, same figures: exhaustive {old:,.0f} decisions/s, "
        f"index {new:,.0f} decisions/s ({new / old:.1f}x)"
    )
    if not fills:
        return
    placements = 50 * len(loads)
    for mixed in (False, True):
        start = farm(len(loads), mixed=True) if mixed else loads
        old, old_placed, old_nodes = fill(start, placements, indexed=False)
        new, new_placed, new_nodes = fill(start, placements, indexed=True)
        kind = "mixed nodes" if mixed else "equal nodes"
        print(f"placement, {len(loads)} {kind}, {placements:,} placements one after the other:")
        print(f"  exhaustive {old:,.0f} decisions/s ({old_placed:,.0f} placements/s): {spread(old_nodes)}")
        print(
            f"  index      {new:,.0f} decisions/s ({new_placed:,.0f} placements/s, {new / old:.1f}x): "
            f"{spread(new_nodes)}"
        )


async def xacts(db: Database) -> int:
    async with db.connect() as conn:
        q = sa.text("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        return int((await conn.execute(q)).scalar_one())


async def main(n_nodes: int, n_desktops: int, starts: int) -> None:
    pg = PgCluster().init()
    try:
        url = pg.create_database("bench")
        t0 = time.monotonic()
        ids = await seed_farm(url, users=100, desktops=n_desktops)
        print(f"seeded {len(ids)} desktops in {time.monotonic() - t0:.1f} s")
        db = Database(url, pool_size=20)
        await db.start(run_migrations=False)
        node_ids = [
            await node_ops.register_node(db, f"n{i}", "", "", cpus=16, mem_total_mib=65536, mem_free_mib=60000)
            for i in range(n_nodes)
        ]
        for nid in node_ids:
            await node_ops.set_node_state(db, nid, "running")

        # placement decisions per second (in memory, from one read of the live figures)
        async with db.connect() as conn:
            report_placement(await node_loads(conn))

        # heartbeat load: every node heartbeats every 2 s
        stop = asyncio.Event()

        async def heartbeats() -> None:
            while not stop.is_set():
                t1 = time.monotonic()
                for nid in node_ids:
                    await node_ops.heartbeat(db, nid, mem_free_mib=60000, load=0.5, running=0)
                await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - t1)))

        hb = asyncio.create_task(heartbeats())
        before, t0 = await xacts(db), time.monotonic()
        await asyncio.sleep(6)
        rate = (await xacts(db) - before) / (time.monotonic() - t0)
        print(f"heartbeats of {n_nodes} nodes every 2 s: {rate:,.0f} commits/s on PostgreSQL")

        # admin start → node claim latency: one claimer per node on its notification channel
        claimed: dict[int, float] = {}

        async def claimer(nid: int) -> None:
            async with db.bus.subscribe(node_channel(nid)) as sub:
                while not stop.is_set():
                    for did in await node_ops.claim_starts(db, nid):
                        claimed[did] = time.monotonic()
                    await sub.wait(5.0)

        claimers = [asyncio.create_task(claimer(nid)) for nid in node_ids[:50]]
        async with db.begin() as conn:  # only the first 50 nodes take starts (keeps the claimer count sane)
            await conn.execute(sa.update(t.nodes).where(t.nodes.c.id.in_(node_ids[50:])).values(blocked=True))
        await asyncio.sleep(1)
        lat = []
        for did in ids[:starts]:
            t1 = time.monotonic()
            await request_start(db, did)
            deadline = t1 + 5
            while did not in claimed and time.monotonic() < deadline:  # noqa: ASYNC110 - spin to time the claim to the ms
                await asyncio.sleep(0.001)
            lat.append((claimed.get(did, deadline) - t1) * 1000)
        lat.sort()
        p99 = lat[int(len(lat) * 0.99) - 1]
        print(f"admin start → node claim: p50 {statistics.median(lat):.1f} ms, p99 {p99:.1f} ms ({len(lat)} starts)")

        # failure detection + recovery: a node with desktops stops heartbeating
        victim = node_ids[0]
        async with db.begin() as conn:
            await conn.execute(sa.update(t.desktops).where(t.desktops.c.node_id == victim).values(state="running"))
            await conn.execute(
                sa.update(t.nodes)
                .where(t.nodes.c.id == victim)
                .values(heartbeat_at=sa.func.now() - sa.text("interval '11 seconds'"))
            )
        t1 = time.monotonic()

        async def fence(_node: cluster.LostNode) -> bool:
            return True

        released = await cluster.handle_lost_nodes(db, node_ids[1], 10.0, fence)
        print(
            f"failover: node declared lost, fenced and {sum(len(v) for v in released.values())} desktops released "
            f"in {(time.monotonic() - t1) * 1000:.0f} ms (+ detection: lost_after_s 10 s, monitor every 1-1.5 s)"
        )
        stop.set()
        for task in [hb, *claimers]:
            task.cancel()
        await asyncio.gather(hb, *claimers, return_exceptions=True)
        await db.close()
    finally:
        pg.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=200)
    p.add_argument("--desktops", type=int, default=20000)
    p.add_argument("--starts", type=int, default=300)
    p.add_argument("--placement-only", action="store_true", help="placement at 200 and 1,000 nodes, no database")
    a = p.parse_args()
    if a.placement_only:
        for size in (200, 1000):
            report_placement(farm(size, mixed=False))
    else:
        asyncio.run(main(a.nodes, a.desktops, a.starts))
