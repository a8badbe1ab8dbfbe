"""Connection history (QVD's user connection log) with per-phase timings: who connected to which desktop,
from where, how it ended and how long each phase of time-to-desktop took (ARCHITECTURE.md §2, step 6).

Rows are written by the broker (``services/sessions.py``); this module only reads them for administrators.
A connection belongs to its user's tenant.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.services.context import Actor, require, require_fields, visible_rows
from deckard.services.listing import ListQuery, run_list
from deckard.services.users import tenant_filter

c = t.connections

COLUMNS: list[sa.ColumnElement[Any]] = [
    c.c.id,
    t.users.c.tenant_id,
    c.c.desktop_id,
    t.desktops.c.name.label("desktop"),
    c.c.user_id,
    c.c.login,
    c.c.broker_node_id,
    c.c.node_id,
    c.c.image_id,
    c.c.source,
    c.c.protocol,
    c.c.started_at,
    c.c.connected_at,
    c.c.ended_at,
    c.c.result,
    c.c.reason,
    c.c.t_auth_ms,
    c.c.t_claim_ms,
    c.c.t_start_ms,
    c.c.t_agent_ms,
    c.c.t_display_ms,
    c.c.t_total_ms,
    c.c.bytes_in,
    c.c.bytes_out,
]
FIELDS: dict[str, sa.ColumnElement[Any]] = {
    (col.name if isinstance(col, sa.Label) else str(col.key)): (col.element if isinstance(col, sa.Label) else col)
    for col in COLUMNS
}


async def list_connections(db: Database, actor: Actor, q: ListQuery | None = None) -> tuple[list[dict[str, Any]], int]:
    """A page of the connection history (newest first unless ``q`` sorts otherwise) and the total."""
    require(actor, "connection.see")
    q = q or ListQuery()
    require_fields(actor, "connection", q.named_fields)
    if q.fields and "id" not in q.fields:
        q = dataclasses.replace(q, fields=[*q.fields, "id"])  # answers always carry the id
    if not q.sort:
        q = ListQuery(q.filters, [("started_at", True)], q.page, q.per_page, q.fields)
    base = (
        sa.select(*COLUMNS)
        .join(t.users, t.users.c.id == c.c.user_id)
        .outerjoin(t.desktops, t.desktops.c.id == c.c.desktop_id)
        .where(tenant_filter(actor, t.users.c.tenant_id))
    )
    async with db.connect() as conn:
        rows, total = await run_list(conn, base, q, FIELDS, c.c.id)
    return visible_rows(actor, "connection", rows), total
