"""Placement as a use case: read live node figures and the desktop's needs, let the model rank the nodes.

``choose_node`` runs inside the transaction that writes the start command (services/desktops.request_start), so
host assignment and command are one atomic write (QVD's FIXME).  ``explain_desktop`` runs the same ranking for an
administrator and returns every node with its score or the filter that excluded it.

Farm-wide knobs live in the database config table (global rows) so every API process and broker agree:
``placement.placer`` (default ``qvd``), ``placement.reserve`` (``largest`` | ``none`` | a fraction such as
``0.1``), ``placement.reserve_release_s`` (how long a lost node releases the reserve, default 1800),
``node.lost_after_s`` (how stale a heartbeat makes a node unusable, default 10).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database, prepared
from deckard.model.entities import aware, utcnow
from deckard.model.errors import BadInput, NotFound, Unavailable
from deckard.model.placement import (
    POLICIES,
    SPREAD,
    Candidate,
    NodeIndex,
    NodeLoad,
    Request,
    Reserve,
    rank_nodes,
)
from deckard.model.states import DesktopCommand, DesktopState, NodeState
from deckard.services.config import read_keys_sourced
from deckard.services.context import Actor, require

LOST_AFTER_S = 10.0
HEARTBEAT_STALE = dt.timedelta(seconds=LOST_AFTER_S)

d = t.desktops


# built once: every start places its desktop (services/config.py says why)
_GLOBAL_VALUE = prepared(
    sa.select(t.config.c.value).where(t.config.c.tenant_id == 0, t.config.c.key == sa.bindparam("key"))
)


def _per_node(grouped: bool) -> sa.Select[Any]:
    """Desktops, memory and (``grouped``) members of the ``group`` parameter's placement group, per node."""
    members = sa.func.count().filter(d.c.placement_group == sa.bindparam("group")) if grouped else sa.literal(0)
    return (
        sa.select(
            d.c.node_id,
            sa.func.count().label("n"),
            sa.func.coalesce(sa.func.sum(t.osfs.c.memory_mib), 0).label("mib"),
            members.label("g"),
        )
        .join(t.osfs, t.osfs.c.id == d.c.osf_id)
        # a start placed and not yet claimed counts: a burst of starts spreads instead of all taking the best node
        .where(d.c.node_id.is_not(None), sa.or_(d.c.state != DesktopState.STOPPED, d.c.cmd == DesktopCommand.START))
        .group_by(d.c.node_id)
    )


_PER_NODE = {False: prepared(_per_node(False)), True: prepared(_per_node(True))}
# warm guests (services/pools.py) hold their OSF's memory on their node like desktops
_WARM_PER_NODE = prepared(
    sa.select(
        t.warm_guests.c.node_id,
        sa.func.count().label("n"),
        sa.func.coalesce(sa.func.sum(t.osfs.c.memory_mib), 0).label("mib"),
    )
    .join(t.warm_pools, t.warm_pools.c.id == t.warm_guests.c.pool_id)
    .join(t.osfs, t.osfs.c.id == t.warm_pools.c.osf_id)
    .group_by(t.warm_guests.c.node_id)
)
_NODES = prepared(sa.select(t.nodes))
_REQUEST = prepared(
    sa.select(t.osfs.c.memory_mib, t.osfs.c.driver, d.c.placement_group, d.c.placement_policy)
    .join(t.osfs, t.osfs.c.id == d.c.osf_id)
    .where(d.c.id == sa.bindparam("desktop_id"))
)


async def config_value(conn: AsyncConnection, key: str, default: str) -> str:
    row = (await conn.execute(_GLOBAL_VALUE, {"key": key})).first()
    return str(row.value) if row else default


def parse_reserve(value: str, *, released: bool) -> Reserve:
    if value in ("largest", "none"):
        return Reserve(mode=value, released=released)
    try:
        return Reserve(mode="fraction", fraction=float(value), released=released)
    except ValueError:
        return Reserve(mode="largest", released=released)


async def node_loads(conn: AsyncConnection, *, group: str | None = None) -> list[NodeLoad]:
    """Every node with its live figures, the memory its desktops hold and (for ``group``) its group members."""
    usage = {r.node_id: r for r in await conn.execute(_PER_NODE[bool(group)], {"group": group} if group else {})}
    warm = {r.node_id: (int(r.n), int(r.mib)) for r in await conn.execute(_WARM_PER_NODE)}
    stale = float(await config_value(conn, "node.lost_after_s", str(LOST_AFTER_S)))
    now = utcnow()
    out = []
    for r in await conn.execute(_NODES):
        hb = aware(r.heartbeat_at)
        u = usage.get(r.id)
        out.append(
            NodeLoad(
                node_id=r.id,
                name=r.name,
                state=r.state,
                blocked=r.blocked,
                fresh=hb is not None and (now - hb).total_seconds() < stale,
                mem_free_mib=r.mem_free_mib,
                cpus=r.cpus,
                load=r.load,
                desktops=(int(u.n) if u else 0) + warm.get(r.id, (0, 0))[0],
                driver=r.driver,
                committed_mib=(int(u.mib) if u else 0) + warm.get(r.id, (0, 0))[1],
                groups={group: int(u.g)} if (group and u) else {},
            )
        )
    return out


_POLICY_KEYS = ("placement.reserve", "placement.placer", "placement.reserve_release_s")


async def _policy(conn: AsyncConnection, loads: list[NodeLoad]) -> tuple[Reserve, str]:
    """The farm's reserve (``placement.reserve``) and placer (``placement.placer``) for these nodes.

    The reserve is released while a node is lost, for ``placement.reserve_release_s`` after it was declared lost:
    long enough for its desktops to start on the others, not for ever (a machine that never comes back would
    otherwise leave the farm without a reserve for the next failure).
    """
    values = await read_keys_sourced(conn, _POLICY_KEYS, None)
    released = False
    if any(n.state == NodeState.LOST for n in loads):
        window = dt.timedelta(seconds=int(values["placement.reserve_release_s"][0]))
        recent = t.nodes.c.lost_at >= utcnow() - window
        q = sa.select(sa.func.count()).where(t.nodes.c.state == NodeState.LOST, recent)
        released = int((await conn.execute(q)).scalar_one()) > 0
    reserve = parse_reserve(values["placement.reserve"][0], released=released)
    return reserve, values["placement.placer"][0]


async def _rank(conn: AsyncConnection, req: Request) -> list[Candidate]:
    loads = await node_loads(conn, group=req.group)
    reserve, placer = await _policy(conn, loads)
    return rank_nodes(loads, req, reserve=reserve, placer=placer)


async def rank_desktop(conn: AsyncConnection, desktop_id: int) -> list[Candidate]:
    """Every node ranked for a start of this desktop, best first (refused ones last, with their reason)."""
    return await _rank(conn, await desktop_request(conn, desktop_id))


async def node_index(conn: AsyncConnection) -> NodeIndex:
    """Every node in a placement index with the farm's placer and reserve: many decisions on one read of the nodes
    (bulk starts), each drawn with the exhaustive ranking's odds (``model/placement.py``)."""
    loads = await node_loads(conn)
    reserve, placer = await _policy(conn, loads)
    return NodeIndex(loads, reserve=reserve, placer=placer)


async def desktop_request(conn: AsyncConnection, desktop_id: int) -> Request:
    row = (await conn.execute(_REQUEST, {"desktop_id": desktop_id})).first()
    if row is None:
        raise NotFound(f"desktop {desktop_id} not found", code="not_found")
    return Request(int(row.memory_mib), driver=row.driver, group=row.placement_group, policy=row.placement_policy)


async def explain(conn: AsyncConnection, memory_mib: int) -> list[Candidate]:
    return await _rank(conn, Request(memory_mib))


async def choose_node(
    conn: AsyncConnection, memory_mib: int, *, desktop_id: int | None = None, driver: str | None = None
) -> int:
    """The best node for a start (of a desktop, or of a guest of ``driver``), or Unavailable saying why every node
    was refused."""
    req = await desktop_request(conn, desktop_id) if desktop_id is not None else Request(memory_mib, driver=driver)
    return best_node(await _rank(conn, req))


def best_node(ranked: list[Candidate]) -> int:
    """The first of a ranking, or Unavailable saying why every node was refused."""
    if not ranked:
        raise Unavailable("no node has registered: start `deckard node` (or `deckard up`)", code="no_node")
    best = ranked[0]
    if best.score is None:
        why = "; ".join(f"{c.node.name}: {c.excluded_by}" for c in ranked)
        raise Unavailable(f"no node can take this desktop now ({why})", code="no_node")
    return best.node.node_id


def candidate_row(c: Candidate) -> dict[str, Any]:
    n = c.node
    return {
        "node_id": n.node_id,
        "node": n.name,
        "eligible": c.score is not None,
        "score": round(c.score, 1) if c.score is not None else None,
        "excluded_by": c.excluded_by,
        "state": n.state,
        "blocked": n.blocked,
        "mem_free_mib": n.mem_free_mib,
        "committed_mib": n.committed_mib,
        "desktops": n.desktops,
        "load": n.load,
        "cpus": n.cpus,
    }


async def set_placement_group(
    db: Database, actor: Actor, desktop_id: int, group: str | None, policy: str | None
) -> dict[str, Any]:
    """Name the desktop's placement group (``spread``: anti-affinity, ``pack``: affinity); None clears it."""
    require(actor, "desktop.update")
    if policy is not None and policy not in POLICIES:
        raise BadInput(f"unknown placement policy {policy!r}; choose one of: {', '.join(POLICIES)}", code="bad_policy")
    if group is not None and not (0 < len(group) <= 64):
        raise BadInput("a placement group name has 1 to 64 characters", code="bad_group")
    async with db.begin() as conn:
        q = sa.update(d).where(d.c.id == desktop_id)
        if actor.tenant_id is not None:
            q = q.where(d.c.tenant_id == actor.tenant_id)
        res = await conn.execute(
            q.values(placement_group=group, placement_policy=(policy or SPREAD) if group else None)
        )
        if res.rowcount == 0:
            raise NotFound(f"desktop {desktop_id} not found", code="not_found")
    return {
        "desktop_id": desktop_id,
        "placement_group": group,
        "placement_policy": (policy or SPREAD) if group else None,
    }


async def explain_desktop(db: Database, actor: Actor, desktop_id: int) -> dict[str, Any]:
    """Where a start of this desktop would go now: every node, its score or the filter that excluded it."""
    require(actor, "desktop.see", "node.see")
    async with db.connect() as conn:
        q = sa.select(d.c.id, d.c.name, d.c.tenant_id, d.c.state, d.c.node_id).where(d.c.id == desktop_id)
        row = (await conn.execute(q)).first()
        if row is None or (actor.tenant_id is not None and row.tenant_id != actor.tenant_id):
            raise NotFound(f"desktop {desktop_id} not found", code="not_found")
        req = await desktop_request(conn, desktop_id)
        ranked = await _rank(conn, req)
    chosen = ranked[0].node.name if ranked and ranked[0].score is not None else None
    return {
        "desktop_id": row.id,
        "desktop": row.name,
        "state": row.state,
        "node_id": row.node_id,
        "memory_mib": req.memory_mib,
        "placement_group": req.group,
        "placement_policy": req.policy,
        "would_choose": chosen,
        "nodes": [candidate_row(c) if actor.all_tenants else _tenant_candidate(c) for c in ranked],
    }


HOST_FIGURES = ("score", "mem_free_mib", "committed_mib", "desktops", "load", "cpus")


def _tenant_candidate(c: Candidate) -> dict[str, Any]:
    """A node as a tenant's administrator may see it in an explanation: whether and roughly why, no host figures
    (free memory, load and desktop counts would tell them about other tenants' use of the shared node)."""
    row = candidate_row(c)
    for key in HOST_FIGURES:
        row[key] = None
    why = row["excluded_by"]
    if isinstance(why, str) and why.startswith("not enough free memory"):
        row["excluded_by"] = "not enough free memory"
    elif isinstance(why, str) and why.startswith("would use the"):
        row["excluded_by"] = "memory kept in reserve for the desktops of a failed node"
    return row
