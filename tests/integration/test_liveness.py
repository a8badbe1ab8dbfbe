"""Liveness on SQLite and PostgreSQL: the heartbeat thread, the lease facts it reads, and when a node fences itself.

Issue 9: one slow heartbeat write on a busy all-in-one farm made the node kill every desktop, though no other node
could ever have taken them over.  These tests stall the real database (a writer holding the lock on our row) or
point the heartbeat at one that does not answer, and check the verdict of node/fencing.py on real facts.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

import pytest
import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database, heartbeat_engine
from deckard.model.entities import utcnow
from deckard.model.states import DesktopState
from deckard.node.fencing import Verdict
from deckard.node.heartbeat import Beat, Heartbeat
from deckard.runtime.settings import NodeSettings
from deckard.services import node_ops
from deckard.services.cluster import read_lease
from deckard.services.context import SYSTEM
from deckard.services.desktops import create_desktop, request_start
from deckard.services.images import register_image
from deckard.services.tenancy import bootstrap_farm
from deckard.services.users import create_user
from deckard.testing import InProcessNode

n = t.nodes
LEASE_FIELDS = ("heartbeat_s", "heartbeat_timeout_s", "self_fence_after_s", "lost_after_s")
CFG = NodeSettings(heartbeat_s=0.2, heartbeat_timeout_s=0.3, self_fence_after_s=1.0, lost_after_s=3.0)


async def add_node(db: Database, name: str, *, driver: str = "container", state: str = "running") -> int:
    node_id = await node_ops.register_node(
        db, name, "10.250.0.1", "", cpus=2, mem_total_mib=8000, mem_free_mib=8000, driver=driver
    )
    await node_ops.set_node_state(db, node_id, state)
    return node_id


async def set_node(db: Database, node_id: int, **values: object) -> None:
    async with db.begin() as conn:
        await conn.execute(sa.update(n).where(n.c.id == node_id).values(**values))


async def age_lease(db: Database, node_id: int, seconds: float) -> None:
    await set_node(db, node_id, heartbeat_at=utcnow() - dt.timedelta(seconds=seconds))


@asynccontextmanager
async def stalled(db: Database, node_id: int) -> AsyncIterator[None]:
    """Another transaction holds the write lock on our row (SQLite: the database's; PostgreSQL: the row's)."""
    async with db.begin() as conn:
        await conn.execute(sa.select(n.c.id).where(n.c.id == node_id).with_for_update())
        yield


def unreachable_url(db: Database) -> str:
    if db.dialect == "postgresql":
        return "postgresql://deckard@127.0.0.1:1/deckard"  # nothing listens on port 1
    return "sqlite:////nonexistent-deckard-dir/deckard.db"


@pytest.fixture
def engine(db: Database) -> Iterator[sa.Engine]:
    eng = heartbeat_engine(db.url, CFG.heartbeat_timeout_s)
    yield eng
    eng.dispose()


async def beat(hb: Heartbeat, engine: sa.Engine) -> Beat:
    return await asyncio.to_thread(hb.beat_once, engine)


# ---- the facts -----------------------------------------------------------------------------------------
async def test_the_lease_counts_as_peers_only_live_fresh_nodes_with_the_same_driver(
    db: Database, engine: sa.Engine
) -> None:
    me = await add_node(db, "me")
    with engine.connect() as conn:
        alone = read_lease(conn, me, CFG.lost_after_s)
    assert (alone.state, alone.peers) == ("running", 0)
    assert alone.lease_age_s < 1.0
    await add_node(db, "peer")
    await add_node(db, "other-driver", driver="fake")
    await add_node(db, "leaving", state="stopping")
    await age_lease(db, await add_node(db, "silent"), 60)
    with engine.connect() as conn:
        assert read_lease(conn, me, CFG.lost_after_s).peers == 1
    await age_lease(db, me, 42)
    await set_node(db, me, state="lost")
    with engine.connect() as conn:
        lost = read_lease(conn, me, CFG.lost_after_s)
        assert read_lease(conn, 10_000, CFG.lost_after_s).state is None
    assert lost.state == "lost"
    assert 41 < lost.lease_age_s < 60


async def test_a_heartbeat_renews_the_lease_and_is_refused_on_a_lost_row(db: Database, engine: sa.Engine) -> None:
    me = await add_node(db, "me")
    await age_lease(db, me, 30)
    with engine.begin() as conn:
        assert node_ops.write_heartbeat(conn, me, mem_free_mib=1, load=0.5, running=3)
    with engine.connect() as conn:
        assert read_lease(conn, me, CFG.lost_after_s).lease_age_s < 1.0
    await set_node(db, me, state="lost")
    with engine.begin() as conn:
        assert not node_ops.write_heartbeat(conn, me, mem_free_mib=1, load=0.5, running=3)
    async with db.connect() as conn:
        row = (await conn.execute(sa.select(n.c.desktops_running, n.c.state).where(n.c.id == me))).one()
    assert (row.desktops_running, row.state) == (3, "lost")


# ---- the verdicts on a stalled database ------------------------------------------------------------------
async def test_a_single_node_whose_heartbeat_stalls_beyond_its_lease_keeps_its_guests(
    db: Database, engine: sa.Engine
) -> None:
    me = await add_node(db, "alone")
    hb = Heartbeat(db.url, me, CFG)
    await age_lease(db, me, 5 * CFG.self_fence_after_s)
    hb.ok_at -= 5 * CFG.self_fence_after_s
    async with stalled(db, me):
        b = await beat(hb, engine)
    assert not b.accepted and b.error
    assert b.decision.verdict is Verdict.KEEP, b.decision.reason
    assert "no other node" in b.decision.reason


async def test_a_node_whose_lapsed_lease_another_node_could_take_over_fences(db: Database, engine: sa.Engine) -> None:
    me = await add_node(db, "me")
    await add_node(db, "peer")
    hb = Heartbeat(db.url, me, CFG)
    await age_lease(db, me, 2 * CFG.self_fence_after_s)
    async with stalled(db, me):
        b = await beat(hb, engine)
    assert not b.accepted
    assert b.decision.verdict is Verdict.FENCE, b.decision.reason


async def test_a_node_whose_lease_the_database_still_holds_does_not_fence(db: Database, engine: sa.Engine) -> None:
    """Our clock says the lease ran out (a write hung for long), but the database has a recent heartbeat."""
    me = await add_node(db, "me")
    await add_node(db, "peer")
    hb = Heartbeat(db.url, me, CFG)
    hb.ok_at -= 10 * CFG.self_fence_after_s
    async with stalled(db, me):
        b = await beat(hb, engine)
    assert not b.accepted
    assert b.decision.verdict is Verdict.KEEP, b.decision.reason
    assert "still holds our lease" in b.decision.reason


async def test_a_node_declared_lost_kills_its_guests_even_alone(db: Database, engine: sa.Engine) -> None:
    me = await add_node(db, "me")
    await set_node(db, me, state="lost")
    b = await beat(Heartbeat(db.url, me, CFG), engine)
    assert not b.accepted
    assert b.decision.verdict is Verdict.LOST


@pytest.mark.parametrize("with_peer", [False, True])
async def test_a_node_cut_off_from_the_database_fences_only_when_it_had_a_peer(
    db: Database, engine: sa.Engine, with_peer: bool
) -> None:
    me = await add_node(db, "me")
    if with_peer:
        await add_node(db, "peer")
    hb = Heartbeat(db.url, me, CFG)
    assert (await beat(hb, engine)).accepted  # learns the peers while the database answers
    cut_off = heartbeat_engine(unreachable_url(db), CFG.heartbeat_timeout_s)
    try:
        early = await beat(hb, cut_off)
        hb.ok_at -= CFG.self_fence_after_s
        late = await beat(hb, cut_off)
    finally:
        cut_off.dispose()
    assert not early.accepted and not late.accepted
    assert early.decision.verdict is Verdict.KEEP  # the lease still runs
    assert late.decision.verdict is (Verdict.FENCE if with_peer else Verdict.KEEP), late.decision.reason


# ---- the thread ------------------------------------------------------------------------------------------
async def test_the_heartbeat_thread_rides_out_a_stall_longer_than_the_lease_on_a_single_node(db: Database) -> None:
    me = await add_node(db, "alone")
    hb = Heartbeat(db.url, me, CFG)
    verdicts: list[tuple[Verdict, bool]] = []

    async def on_beat(b: Beat) -> None:
        verdicts.append((b.decision.verdict, b.accepted))

    async def running() -> int:
        return 7

    stop = asyncio.Event()
    task = asyncio.create_task(hb.run(stop, running, on_beat))
    await asyncio.sleep(0.6)
    async with stalled(db, me):
        await asyncio.sleep(2 * CFG.self_fence_after_s)
    stalled_beats = len(verdicts)
    await asyncio.sleep(0.8)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert (Verdict.KEEP, False) in verdicts  # the stall was seen ...
    assert all(v is Verdict.KEEP for v, _ in verdicts)  # ... and nothing was killed
    assert any(ok for _, ok in verdicts[stalled_beats:])  # heartbeats resumed after it
    async with db.connect() as conn:
        row = (await conn.execute(sa.select(n.c.desktops_running).where(n.c.id == me))).one()
    assert row.desktops_running == 7  # the loop's figure reached the thread's write
    assert hb.healthy_for() > 0


# ---- the node daemon, in process (fake driver) -----------------------------------------------------------
async def node_with_a_running_desktop(db: Database) -> tuple[InProcessNode, int]:
    await bootstrap_farm(db)
    await create_user(db, SYSTEM, "alice", "pw-alice")
    network = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24"
    desktop_id = int((await create_desktop(db, SYSTEM, "desk", "alice", network=network))["id"])
    node = InProcessNode.fake(db, network, **CFG.model_dump(include=set(LEASE_FIELDS)))
    image = node.settings.home / "image.tar"
    image.write_bytes(b"")
    await register_image(db, image, version="test")
    await node.start()
    await request_start(db, desktop_id)
    await wait_until(lambda: desktop_state(db, desktop_id), DesktopState.RUNNING)
    return node, desktop_id


async def desktop_state(db: Database, desktop_id: int) -> str:
    async with db.connect() as conn:
        return str((await conn.execute(sa.select(t.desktops.c.state).where(t.desktops.c.id == desktop_id))).scalar())


async def wait_until(read: Callable[[], Awaitable[object]], value: object, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (seen := await read()) != value:
        assert asyncio.get_running_loop().time() < deadline, f"still {seen!r}, waited for {value!r}"
        await asyncio.sleep(0.05)


async def test_a_one_node_farm_keeps_its_desktops_through_a_database_stall_longer_than_the_lease(
    db: Database,
) -> None:
    node, desktop_id = await node_with_a_running_desktop(db)
    try:
        assert node.daemon is not None and node.daemon.node_id is not None
        async with stalled(db, node.daemon.node_id):
            await asyncio.sleep(2.5 * CFG.self_fence_after_s)
        await asyncio.sleep(3 * CFG.heartbeat_s)
        assert [g.running for g in await node.driver.list()] == [True]
        assert await desktop_state(db, desktop_id) == DesktopState.RUNNING
        assert not node.daemon._fenced
    finally:
        await node.close()


async def test_a_node_with_a_live_peer_stops_its_guests_when_its_lease_lapses(db: Database) -> None:
    node, desktop_id = await node_with_a_running_desktop(db)
    try:
        assert node.daemon is not None and node.daemon.node_id is not None
        await add_node(db, "peer", driver="fake")  # fresh heartbeat: it could take the desktop over
        async with stalled(db, node.daemon.node_id):
            # killed while the database is still stalled: once the lease is out, plus a loaded machine's slack
            await wait_until(node.driver.list, [], timeout=10 * CFG.self_fence_after_s)
        # the database answers again and says we were not declared lost: the node reconciles and goes on
        await wait_until(lambda: desktop_state(db, desktop_id), DesktopState.STOPPED)
        await request_start(db, desktop_id)
        await wait_until(lambda: desktop_state(db, desktop_id), DesktopState.RUNNING)
        assert [g.running for g in await node.driver.list()] == [True]
    finally:
        await node.close()


async def test_a_node_declared_lost_kills_its_guests_registers_again_and_keeps_what_it_starts_next(
    db: Database,
) -> None:
    node, desktop_id = await node_with_a_running_desktop(db)
    try:
        assert node.daemon is not None and node.daemon.node_id is not None
        node_id = node.daemon.node_id
        await set_node(db, node_id, state="lost")  # what another node's monitor writes
        await wait_until(lambda: desktop_state(db, desktop_id), DesktopState.STOPPED)
        assert await node.driver.list() == []

        async def node_state() -> str:
            async with db.connect() as conn:
                return str((await conn.execute(sa.select(n.c.state).where(n.c.id == node_id))).scalar())

        await wait_until(node_state, "running")
        await request_start(db, desktop_id)
        await wait_until(lambda: desktop_state(db, desktop_id), DesktopState.RUNNING)
        await asyncio.sleep(10 * CFG.heartbeat_s)  # verdicts about the old registration must not reach it
        assert [g.running for g in await node.driver.list()] == [True]
        assert await desktop_state(db, desktop_id) == DesktopState.RUNNING
    finally:
        await node.close()
