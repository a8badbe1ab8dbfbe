"""Random admin, broker and node actions against the real services: the state machines hold (hypothesis).

A farm of two nodes and a handful of desktops; each step is one action as the admin API, the broker or a node
daemon would do it, through the same service functions.  The test keeps a small model of what the outside world
knows — which node holds a guest for which desktop (it claimed its start and has not reported it gone) and which
start commands are waiting to be claimed — and after every step checks the database against it:

* a desktop is held by at most one node, and a starting/running/stopping/zombie desktop by exactly the node in
  its ``node_id``; a desktop at rest (stopped, failed) by none, with no agent token and no connected user;
* commands are consistent with states (``start`` only at rest and with a node, ``stop`` only on a held desktop);
* every start command is claimed once, by the node it was placed on (two claimers racing split nothing);
* a node's report the table refuses returns False and changes nothing; an illegal write raises
  ``invalid_transition`` and changes nothing.

Each example runs its coroutines on an event loop the state machine owns (``asyncio.Runner``), on one database
per backend reset between examples; the figures are bounded to stay under ~20 s per backend.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model import placement as model_placement
from deckard.model.entities import User, utcnow
from deckard.model.errors import DeckardError, InvalidTransition
from deckard.model.states import (
    COMMAND_ALLOWED_FROM,
    DESKTOP_AT_REST,
    DESKTOP_TRANSITIONS,
    NODE_TRANSITIONS,
    DesktopCommand,
    DesktopState,
    NodeState,
    UserState,
)
from deckard.services import cluster, desktops, images, node_ops, sessions, transitions, users
from deckard.services.cluster import LostNode
from deckard.services.context import SYSTEM
from deckard.services.tenancy import bootstrap_farm

NET = "10.252.0.0/24"
SLOTS = 3  # desktop names d0..d2
NODES = ("n1", "n2")
d = t.desktops

REPORTED = [DesktopState.RUNNING, DesktopState.FAILED, DesktopState.STOPPED, DesktopState.ZOMBIE]  # node_ops.mark_*
slot = st.integers(0, SLOTS - 1)
node = st.sampled_from(NODES)
# which of the sessions or held guests a rule acts on: an index drawn the same way whatever they are.  Drawing
# from the set itself, or a precondition on it, made what hypothesis draws depend on the database's answers, and
# a replay that saw other answers (a race of two claimers, a clock) failed with FlakyStrategyDefinition.
pick = st.integers(0, 2 * SLOTS - 1)


def picked(items: dict[int, Any], k: int) -> int | None:
    """The ``k``-th of ``items``' keys (modulo), None when there are none."""
    return sorted(items)[k % len(items)] if items else None


class Farm:
    """One database and event loop for every example of a backend; ``reset`` empties it between examples."""

    def __init__(self, url: str) -> None:
        self.runner = asyncio.Runner()
        self.db = Database(url)
        self.run(self._start())

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    async def _start(self) -> None:
        await self.db.start()
        await bootstrap_farm(self.db)
        await users.create_user(self.db, SYSTEM, "alice", "s3cret!")
        self.image_id = int((await images.create_image(self.db, SYSTEM, "v1"))["id"])  # what mark_running records
        self.node_ids = {
            name: await node_ops.register_node(
                self.db, name, f"10.252.0.{i + 1}", "", cpus=4, mem_total_mib=64000, mem_free_mib=64000
            )
            for i, name in enumerate(NODES)
        }
        async with self.db.begin() as conn:
            row = (await conn.execute(sa.select(t.users).where(t.users.c.login == "alice"))).one()
            # nodes go silent only when a rule says so: a slow example must not make placement see stale heartbeats
            # (a run that depends on the clock cannot be replayed, and hypothesis rightly calls it flaky)
            await conn.execute(
                sa.insert(t.config).values(tenant_id=0, key="node.lost_after_s", value="86400", updated_at=utcnow())
            )
        self.user = User.from_row(row._mapping)

    async def reset(self) -> None:
        async with self.db.begin() as conn:
            await conn.execute(sa.delete(t.connections))
            await conn.execute(sa.delete(d))
            await conn.execute(
                sa.update(t.nodes).values(
                    state=NodeState.RUNNING.value, cmd=None, blocked=False, heartbeat_at=utcnow(), lost_at=None
                )
            )

    def close(self) -> None:
        self.run(self.db.close())
        self.runner.close()


class FarmMachine(RuleBasedStateMachine):
    farm: Farm  # set by the test for its backend

    def __init__(self) -> None:
        super().__init__()
        self.db = self.farm.db
        self.ids: dict[int, int] = {}  # slot → desktop id
        self.held: dict[int, str] = {}  # desktop id → the node holding its guest
        self.pending: dict[int, int] = {}  # desktop id → node id of its unclaimed start command
        self.sessions: dict[int, tuple[str, int]] = {}  # desktop id → (session id, connection id)

    def run(self, coro: Any) -> Any:
        return self.farm.run(coro)

    @initialize()
    def farm_with_desktops(self) -> None:
        self.run(self.farm.reset())
        for i in range(SLOTS):
            self.admin_creates(i)

    # ---- reading -------------------------------------------------------------------------------------
    async def _rows(self) -> dict[int, dict[str, Any]]:
        async with self.db.connect() as conn:
            return {int(r.id): dict(r._mapping) for r in await conn.execute(sa.select(d))}

    def row(self, desktop_id: int) -> dict[str, Any] | None:
        rows: dict[int, dict[str, Any]] = self.run(self._rows())
        return rows.get(desktop_id)

    def node_state(self, name: str) -> str:
        async def read() -> str:
            async with self.db.connect() as conn:
                q = sa.select(t.nodes.c.state).where(t.nodes.c.id == self.farm.node_ids[name])
                return str((await conn.execute(q)).scalar_one())

        return str(self.run(read()))

    def _after_request(self, desktop_id: int) -> None:
        """Record the start command a request left (or took back)."""
        row = self.row(desktop_id)
        event(f"request leaves {row and (row['state'], row['cmd'])}")
        if row is not None and row["cmd"] == DesktopCommand.START:
            self.pending[desktop_id] = int(row["node_id"])
        else:
            self.pending.pop(desktop_id, None)

    def _refused_unchanged(self, desktop_id: int, call: Any) -> None:
        """An admin or broker request either succeeds or raises and changes nothing."""
        before = self.row(desktop_id)
        try:
            self.run(call)
        except DeckardError:
            assert self.row(desktop_id) == before
        self._after_request(desktop_id)

    # ---- admin ---------------------------------------------------------------------------------------
    @rule(i=slot)
    def admin_creates(self, i: int) -> None:
        if i not in self.ids:
            self.ids[i] = int(self.run(desktops.create_desktop(self.db, SYSTEM, f"d{i}", "alice", network=NET))["id"])

    @rule(i=slot)
    def admin_deletes(self, i: int) -> None:
        if i not in self.ids:
            return
        desktop_id = self.ids[i]
        before = self.row(desktop_id)
        assert before is not None
        try:
            self.run(desktops.delete_desktop(self.db, SYSTEM, desktop_id))
        except DeckardError as e:
            assert e.code == "desktop_running" and self.row(desktop_id) == before
        else:
            assert before["state"] in DESKTOP_AT_REST and before["cmd"] is None
            del self.ids[i]
            self.sessions.pop(desktop_id, None)

    @rule(i=slot)
    def admin_starts(self, i: int) -> None:
        if i in self.ids:
            self._refused_unchanged(self.ids[i], desktops.start_desktop(self.db, SYSTEM, self.ids[i]))

    @rule(i=slot)
    def admin_stops(self, i: int) -> None:
        if i in self.ids:
            self._refused_unchanged(self.ids[i], desktops.stop_desktop(self.db, SYSTEM, self.ids[i]))

    @rule(i=slot, blocked=st.booleans())
    def admin_blocks(self, i: int, blocked: bool) -> None:
        if i in self.ids:
            self.run(desktops.set_blocked(self.db, SYSTEM, self.ids[i], blocked))

    @rule(i=slot)
    def admin_disconnects(self, i: int) -> None:
        if i in self.ids:
            out = self.run(desktops.disconnect_desktop(self.db, SYSTEM, self.ids[i]))
            assert out["user_state"] == UserState.DISCONNECTED

    # ---- broker --------------------------------------------------------------------------------------
    @rule(i=slot)
    def broker_starts(self, i: int) -> None:
        if i in self.ids:
            self._refused_unchanged(self.ids[i], desktops.request_start(self.db, self.ids[i], allow_running=True))

    @rule(i=slot)
    def broker_connects(self, i: int) -> None:
        if i not in self.ids:
            return
        try:
            desk = self.run(sessions.desktop_for_user(self.db, self.farm.user, self.ids[i]))
        except DeckardError as e:
            assert e.code == "desktop_blocked"
            return
        sid, conn_id = self.run(
            sessions.open_session(
                self.db, desk, self.farm.user, login="alice", broker_node_id=None, source="t", protocol="t", auth_ms=0
            )
        )
        self.sessions[desk.id] = (sid, conn_id)
        row = self.row(desk.id)
        assert row is not None and (row["user_state"], row["session_id"]) == (UserState.CONNECTING, sid)

    @rule(k=pick)
    def broker_reports_connected(self, k: int) -> None:
        if (desktop_id := picked(self.sessions, k)) is None:
            return
        row = self.row(desktop_id)
        sid, conn_id = self.sessions[desktop_id]
        owned = row is not None and row["session_id"] == sid
        if row is None or row["state"] != DesktopState.RUNNING or (owned and row["user_state"] == UserState.CONNECTED):
            return  # the broker reports connected once, when its desktop runs
        moved = self.run(sessions.mark_connected(self.db, desktop_id, sid, conn_id, {}))
        assert moved == owned
        after = self.row(desktop_id)
        assert after is not None
        if moved:
            assert after["user_state"] == UserState.CONNECTED
        else:
            assert after == row

    @rule(k=pick)
    def broker_closes(self, k: int) -> None:
        if (desktop_id := picked(self.sessions, k)) is None:
            return
        sid, conn_id = self.sessions.pop(desktop_id)
        row = self.row(desktop_id)
        if row is None:
            return
        moved = self.run(sessions.close_session(self.db, desktop_id, sid, conn_id, result="ok"))
        assert moved == (row["session_id"] == sid)
        after = self.row(desktop_id)
        assert after is not None
        if moved:
            assert (after["user_state"], after["session_id"]) == (UserState.DISCONNECTED, None)
        else:
            assert after == row

    # ---- nodes ---------------------------------------------------------------------------------------
    @rule(first=node, finish=st.booleans())
    def nodes_claim(self, first: str, finish: bool) -> None:
        """One pass of each node's command loop: stops, then starts (as node/daemon.py does).

        With ``finish`` the node also completes what it claimed (guest up → running, guest gone → stopped);
        otherwise the work stays in flight for the other rules to race with.
        """
        for n in sorted(NODES, key=lambda x: x != first):
            stopping = self._claim_stops(n)
            starting = self._claim_starts(n)
            for desktop_id in stopping if finish else []:
                self._report(n, desktop_id, DesktopState.STOPPED)
            for desktop_id in starting if finish else []:
                self._report(n, desktop_id, DesktopState.RUNNING)

    def _claim_starts(self, n: str) -> list[int]:
        me = self.farm.node_ids[n]
        if self.node_state(n) == NodeState.LOST:
            return []  # a fenced node claims nothing: its heartbeat told it to stop
        claims = self.run(_gather(node_ops.claim_starts(self.db, me), node_ops.claim_starts(self.db, me)))
        first, second = (set(c) for c in claims)
        assert not first & second, "a start was claimed twice"
        event(f"claimed {len(first | second)} start(s)")
        for desktop_id in first | second:
            assert self.pending.pop(desktop_id) == me, "a start was claimed by a node it was not placed on"
            assert desktop_id not in self.held
            self.held[desktop_id] = n
        assert not [i for i, owner in self.pending.items() if owner == me], "a start placed here was not claimed"
        return sorted(first | second)

    def _claim_stops(self, n: str) -> list[int]:
        me = self.farm.node_ids[n]
        before = self.run(self._rows())
        claimed: list[int] = self.run(node_ops.claim_stops(self.db, me))
        for desktop_id in claimed:
            was = before[desktop_id]
            assert (was["cmd"], was["node_id"], self.held.get(desktop_id)) == (DesktopCommand.STOP, me, n)
            assert was["state"] in COMMAND_ALLOWED_FROM[DesktopCommand.STOP]
        return claimed

    @rule(k=pick, to=st.sampled_from(REPORTED))
    def node_reports_on_a_desktop_it_holds(self, k: int, to: DesktopState) -> None:
        """What a daemon does with its guests: running, failed to start, gone, agent silent."""
        if (desktop_id := picked(self.held, k)) is None:
            return
        self._report(self.held[desktop_id], desktop_id, to)

    @rule(n=node, i=slot, to=st.sampled_from(REPORTED))
    def node_reports_late_or_on_another_nodes_desktop(self, n: str, i: int, to: DesktopState) -> None:
        """A stale or confused report: whatever the desktop's state, the table and the owner decide."""
        if i in self.ids:
            self._report(n, self.ids[i], to)

    def _report(self, n: str, desktop_id: int, to: DesktopState) -> None:
        me = self.farm.node_ids[n]
        before = self.row(desktop_id)
        assert before is not None
        reports: dict[DesktopState, Callable[[], Awaitable[bool]]] = {
            DesktopState.RUNNING: lambda: node_ops.mark_running(
                self.db, me, desktop_id, image_id=self.farm.image_id, guest_ms=1, agent_ms=1
            ),
            DesktopState.FAILED: lambda: node_ops.mark_failed(self.db, me, desktop_id, "boom"),
            DesktopState.STOPPED: lambda: node_ops.mark_stopped(self.db, me, desktop_id),
            DesktopState.ZOMBIE: lambda: node_ops.mark_zombie(self.db, me, desktop_id, "silent"),
        }
        report = reports[to]
        accepted = self.run(report())
        legal = before["node_id"] == me and to in DESKTOP_TRANSITIONS[DesktopState(before["state"])]
        assert accepted == legal, (before["state"], to)
        event(f"node report {before['state']} -> {to}: {'accepted' if accepted else 'refused'}")
        after = self.row(desktop_id)
        assert after is not None
        if not accepted:
            assert after == before
            return
        assert after["state"] == to
        if to in DESKTOP_AT_REST:
            assert self.held.pop(desktop_id) == n

    @rule(i=slot, to=st.sampled_from(list(DesktopState)))
    def illegal_write_is_refused(self, i: int, to: DesktopState) -> None:
        if i not in self.ids:
            return
        desktop_id = self.ids[i]
        before = self.row(desktop_id)
        assert before is not None
        if to in DESKTOP_TRANSITIONS[DesktopState(before["state"])]:
            return

        async def write() -> None:
            async with self.db.begin() as conn:
                await transitions.transition_desktop(conn, desktop_id, to)

        with pytest.raises(InvalidTransition) as e:
            self.run(write())
        assert e.value.code == "invalid_transition" and self.row(desktop_id) == before

    @rule(n=node, to=st.sampled_from([NodeState.RUNNING, NodeState.STOPPING, NodeState.RESTARTING]))
    def node_sets_its_state(self, n: str, to: NodeState) -> None:
        old = NodeState(self.node_state(n))
        accepted = self.run(node_ops.set_node_state(self.db, self.farm.node_ids[n], to))
        assert accepted == (to in NODE_TRANSITIONS[old])
        assert self.node_state(n) == (to if accepted else old)

    @rule(n=node)
    def node_goes_silent_and_is_fenced(self, n: str) -> None:
        """The other node's monitor declares ``n`` lost, fences it (its guests die) and releases its desktops."""
        me, judge = self.farm.node_ids[n], self.farm.node_ids[next(x for x in NODES if x != n)]

        async def silence() -> None:
            async with self.db.begin() as conn:
                old = utcnow() - dt.timedelta(hours=1)
                await conn.execute(sa.update(t.nodes).where(t.nodes.c.id == me).values(heartbeat_at=old))
                await conn.execute(sa.update(t.nodes).where(t.nodes.c.id == judge).values(heartbeat_at=utcnow()))

        async def fence(lost: LostNode) -> bool:
            for desktop_id in [i for i, holder in self.held.items() if holder == lost.name]:
                del self.held[desktop_id]
            return True

        self.run(silence())
        released = self.run(cluster.handle_lost_nodes(self.db, judge, 30.0, fence))
        for desktop_id in released.get(me, []):
            self.pending.pop(desktop_id, None)
        assert not [i for i, holder in self.held.items() if holder == n]

    @rule(n=node)
    def lost_node_registers_again(self, n: str) -> None:
        if self.node_state(n) != NodeState.LOST:
            return
        self.run(node_ops.register_node(self.db, n, "", "", cpus=4, mem_total_mib=64000, mem_free_mib=64000))
        assert self.node_state(n) == NodeState.STARTING
        assert self.run(node_ops.set_node_state(self.db, self.farm.node_ids[n], NodeState.RUNNING))

    # ---- invariants ----------------------------------------------------------------------------------
    @invariant()
    def desktops_agree_with_who_holds_them(self) -> None:
        rows = self.run(self._rows())
        node_names = {v: k for k, v in self.farm.node_ids.items()}
        for desktop_id, r in rows.items():
            state, cmd, where = DesktopState(r["state"]), r["cmd"], r["node_id"]
            UserState(r["user_state"])
            if state in DESKTOP_AT_REST:
                assert desktop_id not in self.held, f"{desktop_id} is {state} but a node still runs it"
                assert r["agent_token"] is None and r["user_state"] != UserState.CONNECTED
                assert cmd in (None, DesktopCommand.START) and (where is None) == (cmd is None)
            else:
                assert where is not None and self.held.get(desktop_id) == node_names[where], (desktop_id, state)
                assert cmd in (None, DesktopCommand.STOP)
                if cmd == DesktopCommand.STOP:
                    assert state in COMMAND_ALLOWED_FROM[DesktopCommand.STOP]
            if r["user_state"] != UserState.DISCONNECTED:
                assert r["session_id"] is not None
        assert set(self.held) <= set(rows)
        assert self.pending == {i: r["node_id"] for i, r in rows.items() if r["cmd"] == DesktopCommand.START}


async def _gather(*coros: Any) -> list[Any]:
    return list(await asyncio.gather(*coros))


@pytest.fixture
def farm(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Farm]:
    # placement breaks ties at random; hypothesis needs the same choices to replay the same run
    monkeypatch.setattr(model_placement, "random", SimpleNamespace(Random=lambda: random.Random(0)))
    f = Farm(db_url)
    try:
        yield f
    finally:
        f.close()


def test_random_admin_broker_and_node_actions_keep_the_state_machines(farm: Farm) -> None:
    FarmMachine.farm = farm
    run_state_machine_as_test(
        FarmMachine,
        settings=settings(
            max_examples=20,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
