"""The node daemon, in process and without root: the real ``NodeDaemon`` with the fake driver, on SQLite and PostgreSQL.

The fake driver's guests run the real agent RPC on their desktop's loopback address (drivers/fake_guest.py),
so the daemon takes its real paths: it waits for the agent, pings it, declares a silent one a zombie, and
adopts or kills guests when it starts.  Faults come from the driver (``start_error``, ``x_start_error``,
``kill_agent``, ``exit``), the way incus tests its daemon against its mock driver.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from deckard.client.agent import AgentClient
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.drivers.base import GuestSpec
from deckard.drivers.fake_guest import FakeGuest
from deckard.model.errors import Unavailable
from deckard.model.states import DesktopState, NodeState
from deckard.services import node_ops
from deckard.services.context import SYSTEM
from deckard.services.desktops import create_desktop, request_start, request_stop
from deckard.services.images import register_image
from deckard.services.tenancy import bootstrap_farm
from deckard.services.users import create_user
from deckard.testing import InProcessNode


@dataclass
class Farm:
    db: Database
    node: InProcessNode
    network: str
    desktops: list[int]

    def guest(self, desktop_id: int) -> FakeGuest:
        return self.node.driver.guest(self.node.settings.paths.guest_name(desktop_id))

    async def row(self, desktop_id: int) -> Any:
        async with self.db.connect() as conn:
            return (await conn.execute(sa.select(t.desktops).where(t.desktops.c.id == desktop_id))).one()

    async def node_state(self) -> str:
        assert self.node.daemon is not None and self.node.daemon.node_id is not None
        async with self.db.connect() as conn:
            q = sa.select(t.nodes.c.state).where(t.nodes.c.id == self.node.daemon.node_id)
            return str((await conn.execute(q)).scalar_one())

    async def wait_state(self, desktop_id: int, state: DesktopState, timeout: float = 20.0) -> Any:
        # generous: a fake start is ~0.1 s, but a CI machine running the e2e tests beside took over 5 s once
        return await wait_for(f"desktop {desktop_id} {state}", lambda: self._in_state(desktop_id, state), timeout)

    async def _in_state(self, desktop_id: int, state: DesktopState) -> Any:
        row = await self.row(desktop_id)
        return row if row.state == state else None

    async def start(self, desktop_id: int) -> Any:
        await request_start(self.db, desktop_id)
        return await self.wait_state(desktop_id, DesktopState.RUNNING)


async def wait_for(what: str, check: Callable[[], Awaitable[Any]], timeout: float) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := await check()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)
    return value


async def make_farm(db: Database, **node: Any) -> Farm:
    """Two desktops of one user on a fresh loopback network, and a node (not started) for them."""
    await bootstrap_farm(db)
    await create_user(db, SYSTEM, "alice", "pw-alice")
    network = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24"
    desktops = [int((await create_desktop(db, SYSTEM, f"desk{i}", "alice", network=network))["id"]) for i in (1, 2)]
    in_process = InProcessNode.fake(db, network, **node)
    image = in_process.settings.home / "image.tar"
    image.write_bytes(b"")
    await register_image(db, image, version="test")
    return Farm(db, in_process, network, desktops)


@pytest.fixture
async def farm(db: Database) -> AsyncIterator[Farm]:
    f = await make_farm(db)
    await f.node.start()
    try:
        yield f
    finally:
        await f.node.close()


async def test_a_stop_right_after_running_still_powers_the_guest_off(
    farm: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start's tail (hot-plugging volumes) still runs when the desktop is already running: a stop that overtakes
    it must not kill the guest the way a start cancelled before running is killed."""
    assert farm.node.daemon is not None
    reconcile = farm.node.daemon.volumes.reconcile

    async def slow_in_the_start(node_id: int, changes: list[node_ops.AttachedVolume] | None = None) -> int:
        task = asyncio.current_task()
        if task is not None and task.get_name().startswith("desktop-"):  # the start's tail, not the command loop
            await asyncio.Event().wait()
        return await reconcile(node_id, changes)

    monkeypatch.setattr(farm.node.daemon.volumes, "reconcile", slow_in_the_start)
    desk = await farm.start(farm.desktops[0])
    guest = farm.guest(desk.id)
    await request_stop(farm.db, desk.id)
    await farm.wait_state(desk.id, DesktopState.STOPPED)
    assert ("poweroff", {}) in guest.calls


async def test_start_runs_the_guest_and_waits_for_its_agent(farm: Farm) -> None:
    desk = await farm.start(farm.desktops[0])
    guest = farm.guest(desk.id)
    assert guest.running and guest.spec.ip == desk.ip and guest.spec.agent_token == desk.agent_token
    assert guest.calls[0][0] == "ping"  # the daemon waited for the agent before it said running
    assert desk.start_agent_ms is not None and desk.node_id == farm.node.daemon.node_id  # type: ignore[union-attr]
    reply = await AgentClient(desk.ip, desk.agent_token).ping()  # the real agent protocol, on the desktop's address
    assert reply["x_state"] == "stopped"

    async def pinged_again() -> bool:
        return sum(1 for method, _ in guest.calls if method == "ping") >= 3

    await wait_for("the agent loop to ping the running desktop", pinged_again, 3)


async def test_only_a_desktops_first_start_tells_the_driver_to_discard_what_is_at_its_layers_path(farm: Farm) -> None:
    desk = await farm.start(farm.desktops[0])
    assert farm.guest(desk.id).spec.first_start
    await request_stop(farm.db, desk.id)
    await farm.wait_state(desk.id, DesktopState.STOPPED)
    await farm.start(desk.id)
    assert not farm.guest(desk.id).spec.first_start


async def test_stop_powers_the_guest_off_and_the_desktop_is_stopped(farm: Farm) -> None:
    desk = await farm.start(farm.desktops[0])
    guest = farm.guest(desk.id)
    await request_stop(farm.db, desk.id)
    row = await farm.wait_state(desk.id, DesktopState.STOPPED)
    assert (row.node_id, row.failure_reason) == (None, None)
    assert ("poweroff", {}) in guest.calls
    assert not guest.running and await farm.node.driver.list() == []
    with pytest.raises(Unavailable) as e:
        await AgentClient(desk.ip, desk.agent_token, timeout=1).ping()
    assert e.value.code == "agent_unreachable"


async def test_a_dead_agent_makes_the_desktop_a_zombie_that_is_killed_and_stopped_with_the_reason(farm: Farm) -> None:
    desk = await farm.start(farm.desktops[0])
    other = await farm.start(farm.desktops[1])
    guest = farm.guest(desk.id)
    guest.kill_agent()
    row = await farm.wait_state(desk.id, DesktopState.STOPPED)
    assert row.failure_reason.startswith("the desktop's agent stopped answering")  # written with the zombie state
    assert not guest.running and farm.node.settings.paths.guest_name(desk.id) not in farm.node.driver.guests
    assert (await farm.row(other.id)).state == DesktopState.RUNNING  # its neighbour is left alone


async def test_a_guest_shut_down_from_inside_is_seen_and_the_desktop_stopped(farm: Farm) -> None:
    desk = await farm.start(farm.desktops[0])
    farm.guest(desk.id).exit()
    row = await farm.wait_state(desk.id, DesktopState.STOPPED)
    assert row.failure_reason == "the desktop was shut down from inside"
    assert await farm.node.driver.list() == []


async def test_a_start_the_driver_refuses_fails_with_the_drivers_reason(farm: Farm) -> None:
    farm.node.driver.start_error = "no space left on the node's disk"
    await request_start(farm.db, farm.desktops[0])
    row = await farm.wait_state(farm.desktops[0], DesktopState.FAILED)
    assert (row.failure_reason, row.node_id) == ("no space left on the node's disk", None)
    assert await farm.node.driver.list() == []
    farm.node.driver.start_error = None
    await farm.start(farm.desktops[0])  # the next start is a fresh one


async def test_a_desktop_off_loopback_fails_to_start_saying_what_to_change(farm: Farm) -> None:
    async with farm.db.begin() as conn:
        await conn.execute(sa.update(t.desktops).where(t.desktops.c.id == farm.desktops[0]).values(ip="10.1.2.3"))
    await request_start(farm.db, farm.desktops[0])
    row = await farm.wait_state(farm.desktops[0], DesktopState.FAILED)
    assert "10.1.2.3 is not a loopback address" in row.failure_reason and "127.0.0.0/8" in row.failure_reason


async def test_x_start_failure_is_the_agents_refusal_as_the_broker_sees_it(farm: Farm) -> None:
    farm.node.driver.x_start_error = "Xvnc exited at start; see /run/deckard/xvnc.log"
    desk = await farm.start(farm.desktops[0])
    agent = AgentClient(desk.ip, desk.agent_token)
    with pytest.raises(Unavailable) as e:
        await agent.x_start("alice", 1001, "1024x768")
    assert e.value.code == "agent_error" and e.value.details == {"agent_code": "x_start_failed", "http_status": 500}
    assert "Xvnc exited at start" in e.value.message
    assert await agent.x_state() == "stopped"
    assert (await farm.row(desk.id)).state == DesktopState.RUNNING  # the desktop runs on: only its display failed


async def test_restart_in_place_adopts_guests_whose_agent_answers_and_kills_the_others(db: Database) -> None:
    farm = await make_farm(db, agent_failures=1000)  # the silent agent is left to the restart to judge
    try:
        node_id = await farm.node.start()
        kept, silent = [await farm.start(i) for i in farm.desktops]
        await AgentClient(kept.ip, kept.agent_token).x_start("alice", 1001, "1024x768")
        farm.guest(silent.id).kill_agent()

        await farm.node.stop(restart=True)
        assert await farm.node_state() == NodeState.RESTARTING
        assert farm.node.driver.guests == {}  # handed over, as the process ends
        assert await farm.node.start() == node_id

        assert (await farm.row(kept.id)).state == DesktopState.RUNNING
        guest = farm.guest(kept.id)
        assert guest.running and await AgentClient(kept.ip, kept.agent_token).x_state() == "listening"
        row = await farm.row(silent.id)
        assert (row.state, row.failure_reason) == (
            DesktopState.STOPPED,
            "the node restarted and the desktop could not be kept",
        )
        assert [g.guest_name for g in await farm.node.driver.list()] == [farm.node.settings.paths.guest_name(kept.id)]
        assert await farm.node_state() == NodeState.RUNNING
    finally:
        await farm.node.close()


async def test_a_guest_no_desktop_wants_is_killed_when_the_node_starts(db: Database) -> None:
    farm = await make_farm(db)
    try:
        paths = farm.node.settings.paths
        orphan = GuestSpec(
            desktop_id=999,
            guest_name=paths.guest_name(999),
            image_id=1,
            image_path=Path("/nonexistent"),
            ip=farm.network.replace(".0/24", ".250"),
            prefix_len=24,
            gateway=farm.network.replace(".0/24", ".1"),
            mac="54:52:00:00:00:fa",
            bridge="unused",
            memory_mib=64,
            cpus=1.0,
            user_login="alice",
            user_uid=1001,
            home_dir=Path("/nonexistent"),
            agent_token="left-over",
        )
        other_farm = replace(orphan, guest_name="dkother-999", ip=farm.network.replace(".0/24", ".251"))
        for spec in (orphan, other_farm):
            await farm.node.driver.start(spec)
        await farm.node.start()
        assert set(farm.node.driver.guests) == {"dkother-999"}  # another farm's guest on this machine is not ours
    finally:
        await farm.node.close()
