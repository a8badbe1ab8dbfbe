"""Disk images (QVD's DIs) and their tags: register an image file under an OSF and move tags onto it.

A tag points at exactly one image per OSF; moving a tag is a single upsert, so it is atomic.  The builder
registers its result tagged ``default`` and ``head``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import utcnow
from deckard.model.errors import NotFound
from deckard.services.context import Actor
from deckard.services.rows import as_dict
from deckard.services.tenancy import DEFAULT_TENANT, ensure_default_osf, tenant_id_by_name
from deckard.services.users import tenant_filter

i = t.disk_images


async def move_tag(conn: AsyncConnection, osf_id: int, tag: str, image_id: int) -> None:
    res = await conn.execute(
        sa.update(t.image_tags)
        .where(t.image_tags.c.osf_id == osf_id, t.image_tags.c.tag == tag)
        .values(image_id=image_id, updated_at=utcnow())
    )
    if res.rowcount == 0:
        await conn.execute(
            sa.insert(t.image_tags).values(osf_id=osf_id, tag=tag, image_id=image_id, updated_at=utcnow())
        )


async def register_image(
    db: Database,
    path: Path,
    *,
    version: str,
    digest: str = "",
    tags: tuple[str, ...] = ("default", "head"),
    osf_id: int | None = None,
) -> dict[str, Any]:
    """Register (idempotently, by OSF + version) a ready image file and point ``tags`` at it."""
    async with db.begin() as conn:
        if osf_id is None:
            osf_id = await ensure_default_osf(conn, await tenant_id_by_name(conn, DEFAULT_TENANT))
        row = (await conn.execute(sa.select(i.c.id).where(i.c.osf_id == osf_id, i.c.version == version))).first()
        if row:
            image_id = int(row.id)
            await conn.execute(sa.update(i).where(i.c.id == image_id).values(path=str(path), state="published"))
        else:
            res = await conn.execute(
                sa.insert(i)
                .values(
                    osf_id=osf_id,
                    version=version,
                    path=str(path),
                    digest=digest,
                    size=path.stat().st_size if path.exists() else 0,
                    state="published",
                    created_at=utcnow(),
                )
                .returning(i.c.id)
            )
            image_id = int(res.scalar_one())
        for tag in tags:
            await move_tag(conn, osf_id, tag, image_id)
        out = (await conn.execute(sa.select(i).where(i.c.id == image_id))).one()
        return as_dict(out)


async def resolve_image(conn: AsyncConnection, osf_id: int, tag: str) -> tuple[int, Path]:
    """The image a desktop of this OSF and tag starts from; NotFound says what to do."""
    q = (
        sa.select(i.c.id, i.c.path)
        .join(t.image_tags, t.image_tags.c.image_id == i.c.id)
        .where(t.image_tags.c.osf_id == osf_id, t.image_tags.c.tag == tag)
    )
    row = (await conn.execute(q)).first()
    if not row:
        raise NotFound(
            f"no disk image is tagged {tag!r} for this desktop's OSF: build one with `deckard image build`",
            code="image_not_found",
        )
    return int(row.id), Path(row.path)


async def list_images(db: Database, actor: Actor) -> list[dict[str, Any]]:
    tags = (
        sa.select(
            sa.func.group_concat(t.image_tags.c.tag)
            if db.dialect == "sqlite"
            else sa.func.string_agg(t.image_tags.c.tag, ",")
        )
        .where(t.image_tags.c.image_id == i.c.id)
        .scalar_subquery()
    )
    q = (
        sa.select(i, t.osfs.c.name.label("osf"), tags.label("tags"))
        .join(t.osfs, t.osfs.c.id == i.c.osf_id)
        .where(tenant_filter(actor, t.osfs.c.tenant_id))
        .order_by(i.c.id)
    )
    async with db.connect() as conn:
        rows = [as_dict(r) for r in await conn.execute(q)]
    for r in rows:
        r["tags"] = sorted((r["tags"] or "").split(",")) if r["tags"] else []
    return rows


async def list_osfs(db: Database, actor: Actor) -> list[dict[str, Any]]:
    async with db.connect() as conn:
        q = sa.select(t.osfs).where(tenant_filter(actor, t.osfs.c.tenant_id)).order_by(t.osfs.c.id)
        return [as_dict(r) for r in await conn.execute(q)]
