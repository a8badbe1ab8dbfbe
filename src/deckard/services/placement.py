"""Placement as a use case: read live node figures and let the model rank them (QVD's load balancer)."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.model.entities import aware, utcnow
from deckard.model.errors import Unavailable
from deckard.model.placement import Candidate, NodeLoad, rank_nodes

HEARTBEAT_STALE = dt.timedelta(seconds=15)


async def node_loads(conn: AsyncConnection) -> list[NodeLoad]:
    running = (
        sa.select(sa.func.count())
        .where(t.desktops.c.node_id == t.nodes.c.id, t.desktops.c.state != "stopped")
        .scalar_subquery()
    )
    rows = await conn.execute(sa.select(t.nodes, running.label("n")))
    now = utcnow()
    out = []
    for r in rows:
        hb = aware(r.heartbeat_at)
        out.append(
            NodeLoad(
                node_id=r.id,
                name=r.name,
                state=r.state,
                blocked=r.blocked,
                fresh=hb is not None and now - hb < HEARTBEAT_STALE,
                mem_free_mib=r.mem_free_mib,
                cpus=r.cpus,
                load=r.load,
                desktops=int(r.n),
            )
        )
    return out


async def explain(conn: AsyncConnection, memory_mib: int) -> list[Candidate]:
    return rank_nodes(await node_loads(conn), memory_mib)


async def choose_node(conn: AsyncConnection, memory_mib: int) -> int:
    ranked = await explain(conn, memory_mib)
    if not ranked:
        raise Unavailable("no node has registered: start `deckard node` (or `deckard up`)", code="no_node")
    best = ranked[0]
    if best.score is None:
        why = "; ".join(f"{c.node.name}: {c.excluded_by}" for c in ranked)
        raise Unavailable(f"no node can take this desktop now ({why})", code="no_node")
    return best.node.node_id
