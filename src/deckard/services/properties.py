"""Custom properties (QVD's ``*_properties``): free key/value pairs an administrator hangs on users, desktops,
OSFs, images and nodes, for their own scripts and inventory.

Why checked here: a property is only as visible as its object, so every call first finds the object the way
the actor may see it — another tenant's object answers 404 exactly like a missing one.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.errors import BadInput, NotFound
from deckard.services.context import Actor, require
from deckard.services.events import publish

MAX_KEY = 128
MAX_VALUE = 4096


def _object_query(obj: str, object_id: int) -> tuple[sa.Select[Any], sa.ColumnElement[Any] | None]:
    """(select of the object's tenant id, the tenant column or None for farm-wide objects)."""
    if obj == "user":
        return sa.select(t.users.c.tenant_id).where(t.users.c.id == object_id), t.users.c.tenant_id
    if obj == "desktop":
        return sa.select(t.desktops.c.tenant_id).where(t.desktops.c.id == object_id), t.desktops.c.tenant_id
    if obj == "osf":
        return sa.select(t.osfs.c.tenant_id).where(t.osfs.c.id == object_id), t.osfs.c.tenant_id
    if obj == "image":
        q = (
            sa.select(t.osfs.c.tenant_id)
            .select_from(t.disk_images.join(t.osfs, t.osfs.c.id == t.disk_images.c.osf_id))
            .where(t.disk_images.c.id == object_id)
        )
        return q, t.osfs.c.tenant_id
    if obj == "node":
        return sa.select(t.nodes.c.id).where(t.nodes.c.id == object_id), None
    raise BadInput(
        f"objects of type {obj!r} have no properties; use user, desktop, osf, image or node", code="bad_object_type"
    )


OBJECT_TYPES = ("user", "desktop", "osf", "image", "node")


async def _check_object(conn: AsyncConnection, actor: Actor, obj: str, object_id: int) -> int | None:
    q, tenant_col = _object_query(obj, object_id)
    if tenant_col is not None and not actor.all_tenants:
        q = q.where(tenant_col == actor.tenant_id)
    row = (await conn.execute(q)).first()
    if row is None:
        raise NotFound(f"no {obj} with id {object_id}", code=f"{obj}_not_found")
    return int(row[0]) if tenant_col is not None else None


async def get_properties(db: Database, actor: Actor, obj: str, object_id: int) -> dict[str, str]:
    async with db.connect() as conn:
        await _check_object(conn, actor, obj, object_id)
        require(actor, "property.see", f"{obj}.see")
        p = t.properties
        q = sa.select(p.c.key, p.c.value).where(p.c.object_type == obj, p.c.object_id == object_id).order_by(p.c.key)
        return {str(r.key): str(r.value) for r in await conn.execute(q)}


async def set_properties(
    db: Database, actor: Actor, obj: str, object_id: int, values: dict[str, str]
) -> dict[str, str]:
    """Set (add or replace) the given keys; others are kept."""
    for k, v in values.items():
        if not k or len(k) > MAX_KEY or not isinstance(v, str) or len(v) > MAX_VALUE:
            raise BadInput(
                f"property {k!r}: keys are 1-{MAX_KEY} characters, values text of at most {MAX_VALUE}",
                code="bad_property",
            )
    p = t.properties
    async with db.begin() as conn:
        tenant_id = await _check_object(conn, actor, obj, object_id)
        require(actor, "property.update", f"{obj}.see")
        if values:
            await conn.execute(
                sa.delete(p).where(p.c.object_type == obj, p.c.object_id == object_id, p.c.key.in_(list(values)))
            )
            await conn.execute(
                sa.insert(p),
                [{"object_type": obj, "object_id": object_id, "key": k, "value": v} for k, v in values.items()],
            )
    await publish(db, "updated", obj, object_id, tenant_id, properties=sorted(values))
    return await get_properties(db, actor, obj, object_id)


async def delete_property(db: Database, actor: Actor, obj: str, object_id: int, key: str) -> None:
    p = t.properties
    async with db.begin() as conn:
        tenant_id = await _check_object(conn, actor, obj, object_id)
        require(actor, "property.update", f"{obj}.see")
        res = await conn.execute(sa.delete(p).where(p.c.object_type == obj, p.c.object_id == object_id, p.c.key == key))
        if not res.rowcount:
            raise NotFound(f"{obj} {object_id} has no property {key!r}", code="property_not_found")
    await publish(db, "updated", obj, object_id, tenant_id, properties=[key])
