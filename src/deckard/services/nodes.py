"""Nodes (QVD's hosts) as administrators see them: read straight from the ``nodes`` table the node daemons
keep up to date (registration, heartbeat, load), so the admin plane never asks a node anything."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.services.context import Actor
from deckard.services.rows import as_dict

n = t.nodes

NODE_COLUMNS = [
    n.c.id,
    n.c.name,
    n.c.address,
    n.c.broker_url,
    n.c.state,
    n.c.blocked,
    n.c.cmd,
    n.c.started_at,
    n.c.heartbeat_at,
    n.c.mem_total_mib,
    n.c.mem_free_mib,
    n.c.cpus,
    n.c.load,
    n.c.desktops_running,
    n.c.created_at,
]


async def list_nodes(db: Database, actor: Actor) -> list[dict[str, Any]]:
    """Every node of the farm; nodes belong to no tenant (ACLs on who may see them come with roles)."""
    del actor  # authorization point: the next issue checks the actor's ACLs here
    async with db.connect() as conn:
        return [as_dict(r) for r in await conn.execute(sa.select(*NODE_COLUMNS).order_by(n.c.id))]
