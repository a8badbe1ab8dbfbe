"""Warm pools on SQLite and PostgreSQL: what a node is asked to keep, and a ready guest taken by one start only.

The take-over itself (a real container, the user's home and account) is tested end to end in
``tests/e2e/test_warm_pools.py``; here the database's part, where two connects racing for the last ready guest on
PostgreSQL really run side by side: exactly one of them may get it, or two users would share one guest.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.drivers.base import GuestInfo
from deckard.model.states import DesktopState
from deckard.node.pools import WarmPools
from deckard.runtime.paths import FarmPaths
from deckard.services import config, node_ops, pools
from deckard.services.context import SYSTEM
from deckard.services.desktops import create_desktop, request_start, request_stop
from deckard.services.images import register_image
from deckard.services.tenancy import bootstrap_farm
from deckard.services.users import create_user

NETWORK = "10.251.0.0/24"


async def _farm(db: Database, tmp_path: Path, users: int) -> tuple[int, list[int]]:
    """A farm with one running container node, the default OSF's image and ``users`` users with a desktop each."""
    await bootstrap_farm(db)
    node_id = await node_ops.register_node(
        db, "node-a", "10.250.0.1", "", cpus=8, mem_total_mib=64000, mem_free_mib=64000, driver="container"
    )
    await node_ops.set_node_state(db, node_id, "running")
    image = tmp_path / "image.tar"
    image.write_bytes(b"")
    await register_image(db, image, version="test")
    desktops = []
    for i in range(users):
        await create_user(db, SYSTEM, f"user{i}", "pw-user")
        desktops.append(int((await create_desktop(db, SYSTEM, f"desk{i}", f"user{i}", network=NETWORK))["id"]))
    return node_id, desktops


async def _warm_guests(db: Database, node_id: int, count: int) -> list[pools.WarmGuest]:
    """What the node's pass does: a guest for each place the plan has, then ready (its agent answered)."""
    made = []
    for i in range(count):
        plans, _own = await pools.node_plan(db, node_id)
        (plan, spec), *_ = plans
        assert spec is not None and plan.live == i
        guest = await pools.add_warm_guest(db, spec, node_id, f"warm-{i}", f"token-{i}", NETWORK)
        assert guest is not None
        assert await pools.warm_ready(db, guest.id)
        made.append(guest)
    return made


async def _guest_of(db: Database, desktop_id: int) -> str | None:
    async with db.connect() as conn:
        q = sa.select(t.desktops.c.guest).where(t.desktops.c.id == desktop_id)
        return (await conn.execute(q)).scalar_one()  # type: ignore[no-any-return]


async def test_two_starts_racing_for_the_last_ready_guest_never_both_get_it(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node_id, (first, second) = await _farm(db, tmp_path, users=2)
    await pools.create_pool(db, SYSTEM, "default", size=1)
    (guest,) = await _warm_guests(db, node_id, 1)
    # both starts see the ready guest before either takes it (PostgreSQL runs them side by side; SQLite's second
    # transaction waits for the first's lock, so there the rendezvous times out and they run one after the other)
    arrived: list[asyncio.Event] = [asyncio.Event(), asyncio.Event()]
    real = pools.resolve_image

    async def rendezvous(*args: object) -> object:
        arrived[0 if not arrived[0].is_set() else 1].set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrived[1].wait(), 1.0)
        return await real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(pools, "resolve_image", rendezvous)

    placed = await asyncio.gather(request_start(db, first), request_start(db, second))

    assert placed == [node_id, node_id]
    taken = [await _guest_of(db, first), await _guest_of(db, second)]
    assert sorted(taken, key=str) == [None, guest.name], "one warm guest, one desktop: the other starts cold"
    async with db.connect() as conn:
        left = (await conn.execute(sa.select(sa.func.count()).select_from(t.warm_guests))).scalar_one()
        tokens = dict((await conn.execute(sa.select(t.desktops.c.guest, t.desktops.c.agent_token))).all())
    assert left == 0, "the taken guest left its pool"
    assert tokens[guest.name] == guest.agent_token, "the desktop calls the guest's agent with the guest's token"


async def test_a_start_withdrawn_before_its_node_claimed_it_leaves_the_warm_guest_it_was_given(
    db: Database, tmp_path: Path
) -> None:
    """A start taken back at once (a stop, or a failed login's head start) leaves the desktop at rest as it was:
    no guest, no agent token; the guest, out of its pool and nobody's, is the node's to stop."""
    node_id, (desk,) = await _farm(db, tmp_path, users=1)
    await pools.create_pool(db, SYSTEM, "default", size=1)
    (guest,) = await _warm_guests(db, node_id, 1)
    await request_start(db, desk)
    assert await _guest_of(db, desk) == guest.name
    await request_stop(db, desk)
    async with db.connect() as conn:
        row = (await conn.execute(sa.select(t.desktops).where(t.desktops.c.id == desk))).one()
    assert (row.state, row.cmd, row.node_id, row.guest, row.agent_token) == ("stopped", None, None, None, None)
    taken = {d.guest for d in await node_ops.desktops_on_node(db, node_id) if d.guest}
    assert guest.name not in taken, "the pool's pass stops it as an orphan"


async def test_a_shrunk_pool_trims_its_newest_guest_and_a_started_desktop_never_takes_one_of_another_tag(
    db: Database, tmp_path: Path
) -> None:
    node_id, (desk,) = await _farm(db, tmp_path, users=1)
    standard = tmp_path / "standard.tar"
    standard.write_bytes(b"")
    await register_image(db, standard, version="standard-1", tags=("standard",))
    pool = await pools.create_pool(db, SYSTEM, "default", tag="standard", size=2)
    guests = await _warm_guests(db, node_id, 2)
    plans, own = await pools.node_plan(db, node_id)
    assert [(plan.wanted, plan.live, plan.trim) for plan, _spec in plans] == [(2, 2, ())]
    assert sorted(g.name for g in own) == ["warm-0", "warm-1"]

    await pools.update_pool(db, SYSTEM, pool["id"], {"size": 1})
    plans, _own = await pools.node_plan(db, node_id)
    assert [plan.trim for plan, _spec in plans] == [(guests[-1].name,)], "the newest guest goes"

    await request_start(db, desk)  # its tag is "default": the pool is for "standard"
    assert await _guest_of(db, desk) is None
    async with db.connect() as conn:
        state = (await conn.execute(sa.select(t.desktops.c.state).where(t.desktops.c.id == desk))).scalar_one()
        left = (await conn.execute(sa.select(sa.func.count()).select_from(t.warm_guests))).scalar_one()
    assert state == DesktopState.STOPPED and left == 2  # the start is a command for the node; no guest taken


class _Guests:
    """The driver's part a pool pass uses: the guests running, and killing one (a layer's test double)."""

    def __init__(self, names: list[str]) -> None:
        self.running, self.killed = set(names), []

    async def list(self) -> list[GuestInfo]:
        return [GuestInfo(guest_name=name, running=True) for name in sorted(self.running)]

    async def kill(self, name: str) -> None:
        self.killed.append(name)
        self.running.discard(name)


@pytest.mark.parametrize(("key", "default"), [("nx.shares.in_containers", False), ("display.glx", True)])
async def test_guests_started_before_a_setting_of_theirs_changed_are_replaced(
    db: Database, tmp_path: Path, key: str, default: bool
) -> None:
    """``nx.shares.in_containers`` decides whether a guest's init may keep CAP_SYS_ADMIN for the mounter, and
    ``display.glx`` whether its display has OpenGL: a pool's new guests follow them, and guests started the other
    way leave the pool (an administrator turning the mounter off must not see a desktop taken over with it
    afterwards)."""
    node_id, _desks = await _farm(db, tmp_path, users=0)
    await pools.create_pool(db, SYSTEM, "default", size=1)

    flip = 0 if key == "nx.shares.in_containers" else 1
    plans, _own = await pools.node_plan(db, node_id)
    assert [spec.switches[flip] for _plan, spec in plans if spec] == [default]
    await config.set_config(db, SYSTEM, key, not default)
    plans, _own = await pools.node_plan(db, node_id)
    assert [spec.switches[flip] for _plan, spec in plans if spec] == [not default]
    started = next(spec for _plan, spec in plans if spec).switches

    (guest,) = await _warm_guests(db, node_id, 1)
    driver = _Guests([guest.name])
    node = WarmPools(
        db,
        driver,  # type: ignore[arg-type]
        FarmPaths(tmp_path / "farm"),
        node_id,
        network=NETWORK,
        bridge="none",
        may_start=lambda: False,  # this pass only trims
        slots=asyncio.Semaphore(1),
    )
    node._started_as[guest.name] = started  # as if this node had booted it as the setting says now
    await node.reconcile()
    assert driver.killed == [], "started as the setting says: kept"
    await config.set_config(db, SYSTEM, key, default)
    await node.reconcile()
    assert driver.killed == [guest.name]
    _plans, own = await pools.node_plan(db, node_id)
    assert own == [], "out of the pool: no start takes it"
