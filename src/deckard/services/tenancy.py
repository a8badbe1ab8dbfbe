"""Tenants and the bootstrap of a new farm: the default tenant, OSF and first administrator."""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.auth.local import hash_password
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import utcnow
from deckard.model.errors import NotFound

DEFAULT_TENANT = "default"
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


async def tenant_name(conn: AsyncConnection, tenant_id: int) -> str:
    row = (await conn.execute(sa.select(t.tenants.c.name).where(t.tenants.c.id == tenant_id))).first()
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
    """Create the default tenant, OSF and the first administrator; return its password the first time only."""
    async with db.begin() as conn:
        tenant_id = await ensure_default_tenant(conn)
        await ensure_default_osf(conn, tenant_id)
        exists = (await conn.execute(sa.select(sa.func.count()).select_from(t.administrators))).scalar_one()
        if exists:
            return None
        password = secrets.token_urlsafe(12)
        await conn.execute(
            sa.insert(t.administrators).values(
                tenant_id=tenant_id, name=admin_name, password_hash=hash_password(password), created_at=utcnow()
            )
        )
        return password
