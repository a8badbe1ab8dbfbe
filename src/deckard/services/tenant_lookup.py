"""Which tenant (or OSF) an administrator means: by id or name as the actor may see it, and where a create lands.

Why a module of its own: ``config``, ``roles``, ``users`` and ``admins`` all resolve a tenant the actor named, and
``tenants`` (the admin CRUD) depends on ``config`` and ``roles``.  With the lookup in ``tenants`` those modules
imported each other in a circle, hidden by imports inside functions; here it sits below all of them and imports
no other use case.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.model.errors import NotFound
from deckard.services.context import Actor
from deckard.services.rows import as_dict

DEFAULT_TENANT = "default"

TENANT_COLUMNS: dict[str, sa.ColumnElement[Any]] = {
    "id": t.tenants.c.id,
    "name": t.tenants.c.name,
    "blocked": t.tenants.c.blocked,
    "description": t.tenants.c.description,
    "created_at": t.tenants.c.created_at,
}


def tenants_visible(actor: Actor) -> sa.ColumnElement[bool]:
    return sa.true() if actor.all_tenants else t.tenants.c.id == actor.tenant_id


async def find_tenant(conn: AsyncConnection, actor: Actor, ref: str | int) -> dict[str, Any]:
    """A tenant by id or name, as the actor may see it (404 ``tenant_not_found`` otherwise)."""
    ref_s = str(ref)
    cond = t.tenants.c.id == int(ref_s) if ref_s.isdigit() else t.tenants.c.name == ref_s
    q = sa.select(*(c.label(k) for k, c in TENANT_COLUMNS.items())).where(cond, tenants_visible(actor))
    row = (await conn.execute(q)).first()
    if not row:
        raise NotFound(f"no tenant {ref!r}", code="tenant_not_found")
    return as_dict(row)


async def resolve_tenant_for_create(
    conn: AsyncConnection, actor: Actor, tenant: str | int | None, *, default: str = DEFAULT_TENANT
) -> int:
    """Where a create lands: a confined actor always in their own tenant (naming another is a 404); a
    supertenant administrator where they say, else ``default``."""
    if not actor.all_tenants:
        assert actor.tenant_id is not None
        if tenant is not None:
            row = await find_tenant(conn, actor, tenant)
            return int(row["id"])
        return actor.tenant_id
    row = await find_tenant(conn, actor, tenant if tenant is not None else default)
    return int(row["id"])


async def find_osf(conn: AsyncConnection, actor: Actor, ref: str | int) -> tuple[int, int]:
    """An OSF by id, name, or ``name@tenant`` among those the actor may see: ``(osf id, tenant id)``
    (NotFound ``osf_not_found``)."""
    o = t.osfs
    name, _, tenant = str(ref).partition("@")
    cond = o.c.id == int(ref) if str(ref).isdigit() else o.c.name == name
    visible = sa.true() if actor.all_tenants else o.c.tenant_id == actor.tenant_id
    q = sa.select(o.c.id, o.c.tenant_id).where(cond, visible).order_by(o.c.id)
    if tenant:
        q = q.join(t.tenants, t.tenants.c.id == o.c.tenant_id).where(t.tenants.c.name == tenant)
    row = (await conn.execute(q)).first()
    if not row:
        raise NotFound(f"no OSF {ref!r}: `deckard osf list` shows them", code="osf_not_found")
    return int(row.id), int(row.tenant_id)


async def find_osf_id(conn: AsyncConnection, actor: Actor, ref: str | int) -> int:
    return (await find_osf(conn, actor, ref))[0]
