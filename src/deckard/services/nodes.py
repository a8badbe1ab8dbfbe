"""Nodes (QVD's hosts) as administrators see them: read straight from the ``nodes`` table the node daemons
keep up to date (registration, heartbeat, load), so the admin plane never asks a node anything.

Blocking a node is desired state like any other: placement skips blocked nodes (``model/placement.py``), the
desktops already running there stay.

Nodes belong to no tenant: they are the farm owner's machines, shared by every tenant.  So every node action
(block, drain, evacuate, stop, restart) is for supertenant administrators only, whatever a tenant's role grants
(``require_supertenant``), and a tenant's administrator, even with ``node.see`` and ``node.see.*``, sees only
``TENANT_FIELDS`` — enough to read the node column of their desktops, nothing about the host (its address,
broker URL, pid, memory, load or how many desktops of other tenants it runs).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.errors import InvalidTransition, NotFound, PermissionDenied
from deckard.model.fence import fence_config, masked_options
from deckard.services.cluster import confirm_fenced
from deckard.services.context import Actor, require, require_fields, require_supertenant, visible_rows
from deckard.services.events import publish
from deckard.services.listing import ListQuery, run_list
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
    n.c.pid,
    n.c.started_at,
    n.c.heartbeat_at,
    n.c.mem_total_mib,
    n.c.mem_free_mib,
    n.c.cpus,
    n.c.load,
    n.c.desktops_running,
    n.c.created_at,
    n.c.lost_at,
    n.c.lost_reason,  # why it was declared lost, and whether fencing it worked (services/cluster.py)
    n.c.fence_agent,
]
FIELDS: dict[str, sa.ColumnElement[Any]] = {c.key: c for c in NODE_COLUMNS}
TENANT_FIELDS = ("id", "name", "state", "blocked")  # what a tenant's administrator may know of a shared node


def _tenant_view(actor: Actor, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows as ``actor`` may see them: host details dropped for anyone confined to a tenant, the fence
    agent's secrets masked for everyone (``fence_options`` is read for ``fence_agent``, never sent out whole)."""
    for r in rows:
        options = r.pop("fence_options", None)
        if "fence_agent" in r:
            r["fence_options"] = masked_options(json.loads(options or "{}")) if r["fence_agent"] else None
    if actor.all_tenants:
        return visible_rows(actor, "node", rows)
    return [{k: v for k, v in r.items() if k in TENANT_FIELDS} for r in rows]


def _check_tenant_query(actor: Actor, q: ListQuery) -> ListQuery:
    if actor.all_tenants:
        return q
    bad = sorted(q.named_fields - set(TENANT_FIELDS))
    if bad:
        raise PermissionDenied(
            f"you may not filter or sort nodes on {', '.join(bad)}: a tenant sees only {', '.join(TENANT_FIELDS)}",
            code="forbidden_filter",
        )
    if q.fields:
        return dataclasses.replace(q, fields=[f for f in q.fields if f in TENANT_FIELDS])
    return q


async def list_nodes(db: Database, actor: Actor, q: ListQuery | None = None) -> tuple[list[dict[str, Any]], int]:
    """A page of the farm's nodes and the total matching ``q``."""
    require(actor, "node.see")
    q = q or ListQuery(per_page=10**9)
    require_fields(actor, "node", q.named_fields)
    q = _check_tenant_query(actor, q)
    if q.fields and "id" not in q.fields:
        q = dataclasses.replace(q, fields=[*q.fields, "id"])  # answers always carry the id
    async with db.connect() as conn:
        rows, total = await run_list(conn, sa.select(*NODE_COLUMNS, n.c.fence_options), q, FIELDS, n.c.id)
    if q.fields and "fence_agent" in q.fields:  # the options go with the agent (masked by _tenant_view)
        q_rows = {r["id"]: r for r in rows}
        async with db.connect() as conn:
            opts = await conn.execute(sa.select(n.c.id, n.c.fence_options).where(n.c.id.in_(list(q_rows))))
            for i, o in opts:
                q_rows[int(i)]["fence_options"] = o
    return _tenant_view(actor, rows), total


async def find_node_id(db: Database, actor: Actor, ref: str | int) -> int:
    require(actor, "node.see")
    cond = n.c.id == int(ref) if str(ref).isdigit() else n.c.name == str(ref)
    async with db.connect() as conn:
        row = (await conn.execute(sa.select(n.c.id).where(cond))).first()
    if not row:
        raise NotFound(f"no node {ref!r}", code="node_not_found")
    return int(row.id)


async def get_node(db: Database, actor: Actor, node_id: int) -> dict[str, Any]:
    require(actor, "node.see")
    async with db.connect() as conn:
        row = (
            (await conn.execute(sa.select(*NODE_COLUMNS, n.c.fence_options).where(n.c.id == node_id)))
            .mappings()
            .first()
        )
    if not row:
        raise NotFound(f"no node with id {node_id}", code="node_not_found")
    return _tenant_view(actor, [as_dict(row)])[0]


async def set_node_blocked(db: Database, actor: Actor, node_id: int, blocked: bool) -> dict[str, Any]:
    """Block (no new desktops are placed there) or unblock a node: supertenant administrators only."""
    require(actor, "node.block")
    require_supertenant(actor, "block or unblock a node")
    await get_node(db, actor, node_id)
    async with db.begin() as conn:
        await conn.execute(sa.update(n).where(n.c.id == node_id).values(blocked=blocked))
    await publish(db, "updated", "node", node_id, None, blocked=blocked)
    return await get_node(db, actor, node_id)


async def set_node_fence(
    db: Database, actor: Actor, node_id: int, agent: str | None, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Give a node its own fence agent (what another node runs to power it off when it is lost), or none
    (``agent`` None or ""): the farm's default fencing.  Supertenant administrators only: it holds a BMC's password.
    """
    require(actor, "node.update")
    require_supertenant(actor, "configure how a node is fenced")
    await get_node(db, actor, node_id)
    if agent:
        config = fence_config(agent, options)
        values = {"fence_agent": config.agent, "fence_options": json.dumps(dict(config.options))}
    else:
        values = {"fence_agent": "", "fence_options": "{}"}
    async with db.begin() as conn:
        await conn.execute(sa.update(n).where(n.c.id == node_id).values(**values))
    await publish(db, "updated", "node", node_id, None, fence_agent=values["fence_agent"])
    return await get_node(db, actor, node_id)


async def confirm_node_off(db: Database, actor: Actor, node_id: int) -> dict[str, Any]:
    """The operator says the lost node's machine is off (its BMC cannot say it): its desktops are released as
    after a fence.  Refused (``node_not_lost``) for a node that is not ``lost``."""
    require(actor, "node.update")
    require_supertenant(actor, "confirm that a node is powered off")
    node = await get_node(db, actor, node_id)
    released = await confirm_fenced(db, node_id, actor.name or "an administrator")
    if released is None:
        raise InvalidTransition(
            f"node {node['name']} is {node['state']}, not lost: only a lost node's desktops can be released by hand "
            "(to move the desktops of a live node, evacuate it)",
            code="node_not_lost",
        )
    await publish(db, "updated", "node", node_id, None, released=len(released))
    return await get_node(db, actor, node_id)
