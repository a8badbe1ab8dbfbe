"""Host-outage reserve and node maintenance in a farm (issue 15, item 5): two real node daemons (fake driver, in
process) on one database and one farm storage, and the real API for the reserve.

* evacuate blocks the node and stops its desktops; each starts again on the other node when its user starts it,
  with the same home (homes are per user on the farm's storage, not per node);
* drain blocks the node, tells the users of its running desktops to leave (the agent's ``expire``), keeps them
  running, and places new starts elsewhere;
* ``placement.reserve`` set through the API keeps memory free on every node for the desktops of a failed one
  (a start that would use it goes elsewhere or is refused, ``explain`` says so), and is released while a node is
  lost.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
import test_api
from test_api import Farm, add_node, call

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.drivers.fake import FakeDriver
from deckard.model.entities import utcnow
from deckard.model.errors import BadInput, Unavailable
from deckard.services import maintenance, nodes
from deckard.services.context import SYSTEM
from deckard.services.desktops import create_desktop, request_start
from deckard.services.images import register_image
from deckard.services.tenancy import bootstrap_farm
from deckard.services.users import create_user
from deckard.testing import InProcessNode

DATABASES = ["sqlite"]  # what is under test is the daemons and placement; test_fencing.py runs on PostgreSQL
d = t.desktops

farm = test_api.farm  # the real API with TLS


async def wait_for(what: str, check: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := await check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)
    return value


@dataclass
class TwoNodes:
    db: Database
    n1: InProcessNode
    n2: InProcessNode
    ids: dict[str, int]  # node name → id
    desktops: list[int]  # running on n1

    async def rows(self) -> dict[int, Any]:
        async with self.db.connect() as conn:
            return {r.id: r for r in await conn.execute(sa.select(d).where(d.c.id.in_(self.desktops)))}

    async def all_in(self, state: str, node: str | None) -> bool:
        want = self.ids[node] if node else None
        return all(r.state == state and r.node_id == want for r in (await self.rows()).values())


def same_storage(node: InProcessNode, like: InProcessNode) -> InProcessNode:
    """``node`` with ``like``'s farm home (the shared storage: images, overlays, homes) and its own run directory."""
    shutil.rmtree(node.settings.home, ignore_errors=True)  # its own, made by InProcessNode.fake, is not used
    settings = node.settings.model_copy(
        update={
            "home": like.settings.home,
            "node": node.settings.node.model_copy(update={"run_dir": like.settings.home / "run-n2"}),
        }
    )
    return InProcessNode(node.db, settings, FakeDriver(settings.paths))


@pytest.fixture
async def two(db: Database) -> AsyncIterator[TwoNodes]:
    await bootstrap_farm(db)
    network = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24"
    for login in ("alice", "bob"):
        await create_user(db, SYSTEM, login, f"pw-{login}")
    ids = [int((await create_desktop(db, SYSTEM, f"d-{u}", u, network=network))["id"]) for u in ("alice", "bob")]
    n1 = InProcessNode.fake(db, network, name="n1")
    n2 = same_storage(InProcessNode.fake(db, network, name="n2"), n1)
    (n1.settings.home / "image.tar").write_bytes(b"")
    await register_image(db, n1.settings.home / "image.tar", version="test")
    try:
        node_ids = {"n1": await n1.start(), "n2": await n2.start()}
        await nodes.set_node_blocked(db, SYSTEM, node_ids["n2"], True)  # so that the desktops go to n1
        for desktop_id in ids:
            assert await request_start(db, desktop_id) == node_ids["n1"]
        farm = TwoNodes(db, n1, n2, node_ids, ids)
        await wait_for("desktops running on n1", lambda: farm.all_in("running", "n1"))
        await nodes.set_node_blocked(db, SYSTEM, node_ids["n2"], False)
        yield farm
    finally:
        await n2.close()
        await n1.close()


async def test_evacuate_blocks_the_node_and_its_desktops_start_again_on_the_other_node_with_their_homes(
    two: TwoNodes,
) -> None:
    db = two.db
    homes = {}
    for desktop_id in two.desktops:
        guest = two.n1.driver.guest(two.n1.settings.paths.guest_name(desktop_id))
        homes[desktop_id] = guest.spec.home_dir
        guest.spec.home_dir.mkdir(parents=True, exist_ok=True)
        (guest.spec.home_dir / "notes.txt").write_text(f"written on n1 by desktop {desktop_id}")
    out = await maintenance.evacuate_node(db, SYSTEM, "n1")
    assert out["blocked"] is True and sorted(out["stopping_desktops"]) == sorted(two.desktops)
    await wait_for("desktops stopped and off n1", lambda: two.all_in("stopped", None))
    assert await two.n1.driver.list() == []  # the guests are gone from n1
    assert (await nodes.get_node(db, SYSTEM, two.ids["n1"]))["blocked"] is True
    for desktop_id in two.desktops:  # their users start them again
        assert await request_start(db, desktop_id) == two.ids["n2"]
    await wait_for("desktops running on n2", lambda: two.all_in("running", "n2"))
    for desktop_id in two.desktops:
        guest = two.n2.driver.guest(two.n2.settings.paths.guest_name(desktop_id))
        assert guest.spec.home_dir == homes[desktop_id]
        assert (guest.spec.home_dir / "notes.txt").read_text() == f"written on n1 by desktop {desktop_id}"


async def test_drain_notifies_the_users_keeps_their_desktops_running_and_places_new_starts_elsewhere(
    two: TwoNodes,
) -> None:
    db = two.db
    out = await maintenance.drain_node(db, SYSTEM, "n1")
    assert out == {"node_id": two.ids["n1"], "node": "n1", "blocked": True, "notified_desktops": 2}
    guests = [two.n1.driver.guest(two.n1.settings.paths.guest_name(i)) for i in two.desktops]

    async def notified() -> bool:
        return all(any(name == "expire" for name, _ in g.calls) for g in guests)

    await wait_for("the expire notice in every running desktop", notified)
    await asyncio.sleep(0.3)
    assert await two.all_in("running", "n1")  # nobody is thrown out: they leave when they are ready
    network = str(two.n1.settings.network.range)
    new = int((await create_desktop(db, SYSTEM, "d-new", "alice", network=network))["id"])
    assert await request_start(db, new) == two.ids["n2"]


# ---- the reserve, end to end through the API ---------------------------------------------------------------
async def set_memory(db: Database, name: str, free_mib: int) -> None:
    async with db.begin() as conn:
        await conn.execute(sa.update(t.nodes).where(t.nodes.c.name == name).values(mem_free_mib=free_mib))


async def test_the_reserve_set_through_the_api_keeps_memory_free_and_is_released_while_a_node_is_lost(
    farm: Farm,
) -> None:
    api = await farm.admin_client()
    await call(api.create_user, "alice", "pw-1234")
    desk = await call(api.create_desktop, "desk", "alice")  # the default OSF: 1024 MiB
    with pytest.raises(BadInput):
        await call(api.set_config, "placement.reserve", "most")
    assert (await call(api.set_config, "placement.reserve", "0.3")).value == "0.3"
    assert (await call(api.get_config, "placement.reserve")).value == "0.3"
    for name in ("n1", "n2"):
        await add_node(farm.db, name)
    # the reserve is 0.3 of the largest node's memory (free + committed): 600 MiB; on n1 a start leaves 476
    await set_memory(farm.db, "n1", 1500)
    await set_memory(farm.db, "n2", 2000)
    why = {c.node: c.excluded_by for c in (await call(api.explain_desktop, desk.id)).nodes}
    assert why["n1"] == "would use the 600 MiB kept in reserve for the desktops of a failed node"
    assert why["n2"] is None
    for name in ("n1", "n2"):  # now 420 MiB, and a start would leave 376 on either
        await set_memory(farm.db, name, 1400)
    explained = await call(api.explain_desktop, desk.id)
    assert explained.would_choose is None and all("kept in reserve" in (c.excluded_by or "") for c in explained.nodes)
    with pytest.raises(Unavailable) as e:
        await call(api.start_desktop, desk.id)
    assert "reserve" in e.value.message
    lost = await add_node(farm.db, "n3")  # a node was lost long ago and never came back: the reserve holds
    async with farm.db.begin() as conn:
        old = utcnow() - dt.timedelta(hours=1)
        await conn.execute(sa.update(t.nodes).where(t.nodes.c.id == lost).values(state="lost", lost_at=old))
    assert (await call(api.explain_desktop, desk.id)).would_choose is None
    async with farm.db.begin() as conn:  # it is lost now: the reserve is there to take its desktops
        await conn.execute(sa.update(t.nodes).where(t.nodes.c.id == lost).values(lost_at=utcnow()))
    assert (await call(api.explain_desktop, desk.id)).would_choose in ("n1", "n2")
    assert (await call(api.start_desktop, desk.id)).cmd == "start"
