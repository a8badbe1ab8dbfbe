"""Tenants as seen by administrators (QVD's multitenancy, seed 002 §3.4): list, create, change, block, delete.

Why here and not in ``tenancy.py``: that module bootstraps a farm and knows nothing of actors; this one is the
admin use case, gated by the ``tenant.*`` ACLs that only supertenant administrators can ever hold.  A tenant
administrator sees only their own tenant, and any other tenant's id or name answers 404 exactly like one that
does not exist — they never learn other tenants exist.

A farm is monotenant until ``tenancy.multi`` is set: creating a second tenant is refused until then, so a small
farm never has to think about tenants at all.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import utcnow
from deckard.model.errors import BadInput, Conflict
from deckard.services.config import read_config
from deckard.services.context import Actor, require
from deckard.services.events import publish
from deckard.services.listing import ListQuery, run_list
from deckard.services.roles import SUPERTENANT_ID
from deckard.services.tenancy import ensure_default_osf
from deckard.services.tenant_lookup import DEFAULT_TENANT, TENANT_COLUMNS, find_tenant, tenants_visible

PROTECTED = {"*", DEFAULT_TENANT}
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789._-")
LIST_COLUMNS = TENANT_COLUMNS  # what list filters and sort keys may name, like every listing service


async def is_multitenant(conn: AsyncConnection) -> bool:
    return bool(await read_config(conn, "tenancy.multi", None))


async def list_tenants(db: Database, actor: Actor, q: ListQuery) -> tuple[list[dict[str, Any]], int]:
    require(actor, "tenant.see")
    async with db.connect() as conn:
        select = sa.select(*(c.label(k) for k, c in LIST_COLUMNS.items())).where(tenants_visible(actor))
        return await run_list(conn, select, q, LIST_COLUMNS, t.tenants.c.id)


async def get_tenant(db: Database, actor: Actor, ref: str | int) -> dict[str, Any]:
    async with db.connect() as conn:
        row = await find_tenant(conn, actor, ref)
    require(actor, "tenant.see")
    return row


def check_tenant_name(name: str) -> str:
    if not name or len(name) > 32 or not set(name) <= NAME_CHARS or name[0] in ".-":
        raise BadInput(
            f"invalid tenant name {name!r}: use 1-32 lowercase letters, digits, '.', '_' or '-'", code="bad_name"
        )
    return name


async def create_tenant(db: Database, actor: Actor, name: str, description: str = "") -> dict[str, Any]:
    require(actor, "tenant.create")
    check_tenant_name(name)
    async with db.begin() as conn:
        if not await is_multitenant(conn):
            raise Conflict(
                "this farm is monotenant: set tenancy.multi to true first (deckard config set tenancy.multi true)",
                code="monotenant",
            )
        if (await conn.execute(sa.select(t.tenants.c.id).where(t.tenants.c.name == name))).first():
            raise Conflict(f"a tenant named {name!r} already exists", code="duplicate")
        res = await conn.execute(
            sa.insert(t.tenants)
            .values(name=name, description=description, created_at=utcnow())
            .returning(t.tenants.c.id)
        )
        tenant_id = int(res.scalar_one())
        await ensure_default_osf(conn, tenant_id)  # so the tenant can have desktops at once, like `default`
        row = await find_tenant(conn, actor, tenant_id)
    await publish(db, "created", "tenant", tenant_id, tenant_id)
    return row


async def update_tenant(
    db: Database, actor: Actor, ref: str | int, *, description: str | None = None, blocked: bool | None = None
) -> dict[str, Any]:
    async with db.begin() as conn:
        row = await find_tenant(conn, actor, ref)
        require(actor, "tenant.update")
        if blocked is not None:
            require(actor, "tenant.block")
            if row["id"] == SUPERTENANT_ID and blocked:
                raise Conflict("the supertenant cannot be blocked", code="tenant_protected")
        values = {k: v for k, v in (("description", description), ("blocked", blocked)) if v is not None}
        if values:
            await conn.execute(sa.update(t.tenants).where(t.tenants.c.id == row["id"]).values(**values))
        row = await find_tenant(conn, actor, row["id"])
    await publish(db, "updated", "tenant", row["id"], row["id"])
    return row


async def delete_tenant(db: Database, actor: Actor, ref: str | int) -> None:
    """Delete an empty tenant (its default OSF, private networks, roles and config go with it); refused while it has
    users, desktops, administrators or images."""
    async with db.begin() as conn:
        row = await find_tenant(conn, actor, ref)
        require(actor, "tenant.delete")
        if row["name"] in PROTECTED:
            raise Conflict(f"tenant {row['name']!r} cannot be deleted", code="tenant_protected")
        tid = row["id"]
        for table, what in ((t.users, "users"), (t.desktops, "desktops"), (t.administrators, "administrators")):
            n = (
                await conn.execute(sa.select(sa.func.count()).select_from(table).where(table.c.tenant_id == tid))
            ).scalar_one()
            if n:
                raise Conflict(f"tenant {row['name']!r} still has {n} {what}: delete them first", code="has_dependents")
        images = (
            await conn.execute(
                sa.select(sa.func.count())
                .select_from(t.disk_images.join(t.osfs, t.osfs.c.id == t.disk_images.c.osf_id))
                .where(t.osfs.c.tenant_id == tid)
            )
        ).scalar_one()
        if images:
            raise Conflict(
                f"tenant {row['name']!r} still has {images} images: delete them first", code="has_dependents"
            )
        await conn.execute(sa.delete(t.osfs).where(t.osfs.c.tenant_id == tid))
        await conn.execute(sa.delete(t.networks).where(t.networks.c.tenant_id == tid))  # its private networks
        await conn.execute(sa.delete(t.config).where(t.config.c.tenant_id == tid))
        await conn.execute(sa.delete(t.tenants).where(t.tenants.c.id == tid))
    await publish(db, "deleted", "tenant", tid, tid)
