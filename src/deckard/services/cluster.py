"""Lost nodes (QVD's ClusterMonitor, done right): fence first, then release the desktops, exactly once.

Every node runs the monitor; the database decides which one acts.  The order is what keeps a desktop from ever
running on two nodes:

1. ``declare_lost``: ``UPDATE nodes SET state='lost' WHERE id=? AND state IN (live) AND heartbeat_at < cutoff
   RETURNING …`` — one monitor wins, the others see zero rows.  From now on the lost node's heartbeat UPDATE
   finds ``lost`` and that node kills its guests and re-registers (node/daemon.py).
2. The winner runs the fencing agent (node/fencing.py): the lost node's own fence agent from its row (e.g.
   ``fence_ipmilan`` to its BMC: what works across machines), else the monitor's default (kill the process group
   and guests, or a hook).
3. Only if fencing succeeded, ``release_desktops`` stops every desktop of the node in the database (stopped,
   ``node_id`` NULL, user disconnected, the reason kept) so the next connect starts it elsewhere.  If fencing
   fails the desktops stay assigned to the lost node — unavailable, never twice — the node's ``lost_reason`` says
   why (``FenceFailed``'s message: the WAT and ``deckard node list`` show it) and the next pass retries.

QVD tests ``user_cmd = NULL`` (never true) and notifies a channel nobody listens on; here every release
notifies ``DESKTOPS`` (brokers waiting on a start wake up) and the test suite checks the outcome.

The other side — when a node kills its *own* guests — is decided by node/fencing.py from the facts
``read_lease`` reads here: the node's row as the database sees it and how many other nodes could take over.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import aware, utcnow
from deckard.model.fence import FenceConfig, stored_fence
from deckard.model.states import NODE_TRANSITIONS, DesktopState, NodeState, sources
from deckard.services.events import DESKTOPS
from deckard.services.transitions import transition_desktops, transition_nodes, withdraw_starts

n = t.nodes
d = t.desktops

FENCE_RETRY_S = 5.0  # a failed fence is tried again after this (node.fence_retry_s), by one monitor

# every state that may be declared lost (model/states.py): a restart that never comes back is a loss too
LIVE_STATES = sorted(sources(NODE_TRANSITIONS, NodeState.LOST))


@dataclass(frozen=True)
class LostNode:
    """What a fencing agent needs to know about the node it must fence."""

    node_id: int
    name: str
    address: str
    pid: int | None
    run_dir: str
    boot_id: str
    driver: str
    fence: FenceConfig | None = None  # its own fence agent (model/fence.py); None: the monitor's default agent


# an agent: True when the node is known dead; False or an exception (its message is the reason shown) if not
Fence = Callable[[LostNode], Awaitable[bool]]


class FenceFailed(Exception):
    """A fencing agent's refusal, with the reason operators see in the node's ``lost_reason``."""


def _lost(r: Any) -> LostNode:
    m = r._mapping
    return LostNode(
        int(m["id"]),
        str(m["name"]),
        str(m["address"]),
        int(m["pid"]) if m["pid"] is not None else None,
        str(m["run_dir"]),
        str(m["boot_id"]),
        str(m["driver"]),
        stored_fence(m["fence_agent"], json.loads(m["fence_options"] or "{}")),
    )


_COLS = (
    n.c.id,
    n.c.name,
    n.c.address,
    n.c.pid,
    n.c.run_dir,
    n.c.boot_id,
    n.c.driver,
    n.c.fence_agent,
    n.c.fence_options,
)

# a node that will run desktops (again); not one that is stopping
TAKEOVER_STATES = (NodeState.STARTING, NodeState.RUNNING, NodeState.RESTARTING)


@dataclass(frozen=True)
class LeaseView:
    """What the database says about one node's lease: the facts node/fencing.py decides on.

    ``state`` is None when the row is gone; ``lease_age_s`` is how old its last accepted heartbeat is (the same
    clock the monitors compare with ``lost_after_s``); ``peers`` counts the other nodes that could take over its
    desktops: live, heartbeat fresh, same driver.
    """

    state: str | None
    lease_age_s: float
    peers: int


def read_lease(conn: sa.Connection, node_id: int, lost_after_s: float) -> LeaseView:
    """Read one node's lease and its possible successors (synchronous: the heartbeat thread asks)."""
    now = utcnow()
    row = conn.execute(sa.select(n.c.state, n.c.heartbeat_at, n.c.driver).where(n.c.id == node_id)).first()
    if row is None:
        return LeaseView(None, float("inf"), 0)
    beat = aware(row.heartbeat_at)
    age = (now - beat).total_seconds() if beat is not None else float("inf")
    peers = conn.execute(
        sa.select(sa.func.count())
        .select_from(n)
        .where(
            n.c.id != node_id,
            n.c.driver == row.driver,
            n.c.state.in_(TAKEOVER_STATES),
            n.c.heartbeat_at >= now - dt.timedelta(seconds=lost_after_s),
        )
    ).scalar_one()
    return LeaseView(str(row.state), max(age, 0.0), int(peers))


async def stale_nodes(db: Database, me: int, lost_after_s: float) -> list[int]:
    cutoff = utcnow() - dt.timedelta(seconds=lost_after_s)
    async with db.connect() as conn:
        q = sa.select(n.c.id).where(n.c.id != me, n.c.state.in_(LIVE_STATES), n.c.heartbeat_at < cutoff)
        return [int(r.id) for r in await conn.execute(q)]


async def declare_lost(db: Database, node_id: int, lost_after_s: float) -> LostNode | None:
    """Atomically mark one stale node lost; None when another monitor won or the node heartbeated meanwhile."""
    now = utcnow()
    cutoff = now - dt.timedelta(seconds=lost_after_s)
    async with db.begin() as conn:
        rows = await transition_nodes(
            conn,
            NodeState.LOST,
            n.c.id == node_id,
            n.c.heartbeat_at < cutoff,
            values=dict(
                lost_at=now,
                lost_reason=f"no heartbeat for {lost_after_s:.0f} s: being fenced",
                cmd=None,
                fence_tried_at=now,
            ),
        )
    return _lost(rows[0]) if rows else None


async def unfenced_lost_nodes(db: Database, me: int, retry_s: float = FENCE_RETRY_S) -> list[LostNode]:
    """Lost nodes that still hold desktops (fencing failed, or the fencer died) and were last tried ``retry_s``
    ago: claimed by one monitor (``fence_tried_at`` moves), so a BMC that refuses is not asked by every node at
    every pass."""
    now = utcnow()
    held = sa.exists().where(d.c.node_id == n.c.id)
    due = sa.or_(n.c.fence_tried_at.is_(None), n.c.fence_tried_at < now - dt.timedelta(seconds=retry_s))
    async with db.begin() as conn:
        ids = [
            int(r.id)
            for r in await conn.execute(sa.select(n.c.id).where(n.c.id != me, n.c.state == NodeState.LOST, held, due))
        ]
        claimed = []
        for node_id in ids:
            row = (
                await conn.execute(
                    sa.update(n).where(n.c.id == node_id, due).values(fence_tried_at=now).returning(*_COLS)
                )
            ).first()
            if row is not None:
                claimed.append(_lost(row))
        return claimed


async def release_desktops(db: Database, node: LostNode, how: str = "fenced") -> list[int]:
    """After fencing: every desktop of the node is stopped and free to start on another node.

    Held desktops go to ``stopped`` by the table (leaving the node and their session); starts placed on the
    node but never claimed are withdrawn, so the next connect places them elsewhere.
    """
    reason = f"the node {node.name} was lost and fenced; the desktop was stopped and starts on another node"
    held = d.c.node_id == node.node_id
    async with db.begin() as conn:
        ids = await transition_desktops(conn, DesktopState.STOPPED, held, values={"failure_reason": reason})
        ids += await withdraw_starts(conn, held)
        await conn.execute(
            sa.update(n)
            .where(n.c.id == node.node_id, n.c.state == NodeState.LOST)
            .values(lost_reason=f"{how}; {len(ids)} desktop(s) released", desktops_running=0)
        )
    for chunk in range(0, len(ids), 500):
        await db.bus.notify(DESKTOPS, ",".join(str(i) for i in ids[chunk : chunk + 500]))
    return ids


async def confirm_fenced(db: Database, node_id: int, by: str) -> list[int] | None:
    """An operator made sure the lost node is off (pacemaker's ``stonith_admin --confirm``): release its desktops
    as a fence would.  None when the node is not ``lost`` (a live node's desktops are never released)."""
    async with db.connect() as conn:
        row = (await conn.execute(sa.select(*_COLS).where(n.c.id == node_id, n.c.state == NodeState.LOST))).first()
    if row is None:
        return None
    return await release_desktops(db, _lost(row), how=f"fenced by hand (confirmed off by {by})")


async def record_fence_failure(db: Database, node: LostNode, why: str) -> None:
    async with db.begin() as conn:
        await conn.execute(
            sa.update(n)
            .where(n.c.id == node.node_id, n.c.state == NodeState.LOST)
            .values(lost_reason=f"fencing failed ({why}); its desktops stay assigned until it is fenced")
        )


async def fence_and_release(db: Database, lost: LostNode, fence: Fence) -> list[int] | None:
    """Fence one lost node, then release its desktops; None (and the reason recorded) when fencing failed."""
    why = "the fencing agent did not confirm"
    try:
        ok = await fence(lost)
    except FenceFailed as e:
        ok, why = False, str(e)
    except Exception as e:  # an agent that crashes has not fenced
        ok, why = False, f"{type(e).__name__}: {e}"
    if ok:
        return await release_desktops(db, lost)
    await record_fence_failure(db, lost, why)
    return None


async def handle_lost_nodes(
    db: Database, me: int, lost_after_s: float, fence: Fence, retry_s: float = FENCE_RETRY_S
) -> dict[int, list[int]]:
    """One monitor pass: fence and release every node that went silent; return node id → released desktops.

    The nodes are fenced at once: a BMC that takes its time (up to ``node.fence_timeout_s``) delays no other.
    """
    todo: dict[int, LostNode] = {}
    for node_id in await stale_nodes(db, me, lost_after_s):
        lost = await declare_lost(db, node_id, lost_after_s)
        if lost is not None:
            todo[lost.node_id] = lost
    for lost in await unfenced_lost_nodes(db, me, retry_s):
        todo.setdefault(lost.node_id, lost)
    done = await asyncio.gather(*(fence_and_release(db, lost, fence) for lost in todo.values()))
    return {lost.node_id: ids for lost, ids in zip(todo.values(), done, strict=True) if ids is not None}
