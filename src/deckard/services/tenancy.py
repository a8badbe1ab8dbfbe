"""Tenants and the bootstrap of a new farm: the supertenant ``*`` and ``default`` tenant, the default OSF, the
predefined roles and the first administrator (Root, in the supertenant).

Bootstrap runs at every start and is idempotent, so a farm created before roles existed is brought up to date:
its first administrator moves to the supertenant and gets Root (otherwise nobody could administer it).
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.auth.local import hash_password
from deckard.db import schema as t
from deckard.db.engine import Database, prepared
from deckard.model.entities import utcnow
from deckard.model.errors import NotFound
from deckard.services.roles import ensure_predefined_roles, ensure_supertenant
from deckard.services.tenant_lookup import DEFAULT_TENANT as DEFAULT_TENANT  # re-exported: callers name it here

DEFAULT_OSF = "default"


async def ensure_default_tenant(conn: AsyncConnection) -> int:
    row = (await conn.execute(sa.select(t.tenants.c.id).where(t.tenants.c.name == DEFAULT_TENANT))).first()
    if row:
        return int(row.id)
    res = await conn.execute(
        sa.insert(t.tenants).values(name=DEFAULT_TENANT, created_at=utcnow()).returning(t.tenants.c.id)
    )
    return int(res.scalar_one())


async def tenant_id_by_name(conn: AsyncConnection, name: str) -> int:
    row = (await conn.execute(sa.select(t.tenants.c.id).where(t.tenants.c.name == name))).first()
    if not row:
        raise NotFound(f"no tenant named {name!r}")
    return int(row.id)


_NAME = prepared(
    sa.select(t.tenants.c.name).where(t.tenants.c.id == sa.bindparam("tenant_id"))
)  # built once: starts read it


async def tenant_name(conn: AsyncConnection, tenant_id: int) -> str:
    row = (await conn.execute(_NAME, {"tenant_id": tenant_id})).first()
    if not row:
        raise NotFound(f"no tenant with id {tenant_id}")
    return str(row.name)


async def ensure_default_osf(conn: AsyncConnection, tenant_id: int) -> int:
    q = sa.select(t.osfs.c.id).where(t.osfs.c.tenant_id == tenant_id, t.osfs.c.name == DEFAULT_OSF)
    row = (await conn.execute(q)).first()
    if row:
        return int(row.id)
    res = await conn.execute(
        sa.insert(t.osfs)
        .values(tenant_id=tenant_id, name=DEFAULT_OSF, memory_mib=1024, cpus=1.0, created_at=utcnow())
        .returning(t.osfs.c.id)
    )
    return int(res.scalar_one())


async def bootstrap_farm(db: Database, admin_name: str = "admin") -> str | None:
    """Create the tenants, default OSF, roles and the first administrator; return its password the first time.

    Several nodes of a new farm may bootstrap at once: the loser of an insert race retries and finds the rows.
    """
    for attempt in range(5):
        try:
            return await _bootstrap_once(db, admin_name)
        except sa.exc.IntegrityError:
            if attempt == 4:
                raise
    return None


async def _bootstrap_once(db: Database, admin_name: str) -> str | None:
    async with db.begin() as conn:
        tenant_id = await ensure_default_tenant(conn)
        super_id = await ensure_supertenant(conn)
        await ensure_default_osf(conn, tenant_id)
        roles = await ensure_predefined_roles(conn, super_id)
        exists = (await conn.execute(sa.select(sa.func.count()).select_from(t.administrators))).scalar_one()
        if exists:
            assigned = (await conn.execute(sa.select(sa.func.count()).select_from(t.admin_roles))).scalar_one()
            if not assigned:  # a farm from before roles: its first administrator becomes Root
                a = t.administrators
                row = (await conn.execute(sa.select(a.c.id).where(a.c.name == admin_name).order_by(a.c.id))).first()
                if row:
                    await conn.execute(sa.update(a).where(a.c.id == row.id).values(tenant_id=super_id))
                    await conn.execute(sa.insert(t.admin_roles).values(admin_id=row.id, role_id=roles["Root"]))
            return None
        password = secrets.token_urlsafe(12)
        res = await conn.execute(
            sa.insert(t.administrators)
            .values(tenant_id=super_id, name=admin_name, password_hash=hash_password(password), created_at=utcnow())
            .returning(t.administrators.c.id)
        )
        await conn.execute(sa.insert(t.admin_roles).values(admin_id=res.scalar_one(), role_id=roles["Root"]))
        return password
