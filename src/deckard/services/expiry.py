"""Expiry of desktops running an image that is no longer the one their tag points at (QVD's
``vm_expiration_soft/hard``, reference/qvd.md §2).

Publishing an image onto a tag gives every running desktop of that OSF and tag that runs another image two
deadlines: at the *soft* one the guest agent runs the notify hook (the user sees "save your work, this desktop
restarts soon"); at the *hard* one the desktop is stopped the way an administrator stops it, so the normal
stop path runs and the next start picks the new image.  The API writes the deadlines (desired state); the
owning node watches them (``node/expiry.py``), like every other command.  Deadlines only ever move earlier:
publishing twice does not give a desktop more time.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import Desktop, utcnow
from deckard.model.states import DesktopState
from deckard.services.config import read_config

d = t.desktops


async def expiry_defaults(db: Database, tenant_id: int | None) -> tuple[int, int]:
    """Soft and hard expiry delays (seconds) for a tenant: config ``image.expire.soft_s``/``hard_s``.

    Their built-in defaults are the catalogue's (``model/config_keys.py``), the one place they are written.
    """
    async with db.connect() as conn:
        soft = int(await read_config(conn, "image.expire.soft_s", tenant_id))
        hard = int(await read_config(conn, "image.expire.hard_s", tenant_id))
    return soft, hard


def _earliest(column: sa.Column[Any], new: dt.datetime) -> sa.ColumnElement[Any]:
    return sa.case((sa.and_(column.is_not(None), column < new), column), else_=sa.literal(new, column.type))


async def set_expiry_for_tags(
    conn: AsyncConnection,
    osf_id: int,
    tags: Sequence[str],
    image_id: int,
    *,
    soft_s: int,
    hard_s: int,
    now: dt.datetime | None = None,
) -> list[int]:
    """Give the running desktops of ``osf_id`` on ``tags`` that do not run ``image_id`` their deadlines.

    Runs inside the caller's transaction (the one that moves the tags); returns the desktop ids.
    """
    now = now or utcnow()
    soft_at = now + dt.timedelta(seconds=soft_s)
    hard_at = now + dt.timedelta(seconds=max(hard_s, soft_s))
    cond = sa.and_(
        d.c.osf_id == osf_id,
        d.c.tag.in_(list(tags)),
        d.c.state == DesktopState.RUNNING,
        sa.or_(d.c.image_id.is_(None), d.c.image_id != image_id),
    )
    ids = [int(r.id) for r in await conn.execute(sa.select(d.c.id).where(cond))]
    if ids:
        await conn.execute(
            sa.update(d)
            .where(d.c.id.in_(ids))
            .values(
                expire_soft_at=_earliest(d.c.expire_soft_at, soft_at),
                expire_hard_at=_earliest(d.c.expire_hard_at, hard_at),
            )
        )
    return ids


async def desktops_to_notify(db: Database, node_id: int, now: dt.datetime | None = None) -> list[Desktop]:
    """Running desktops of this node past their soft deadline whose user has not been told yet."""
    now = now or utcnow()
    q = sa.select(d).where(
        d.c.node_id == node_id,
        d.c.state == DesktopState.RUNNING,
        d.c.expire_soft_at.is_not(None),
        d.c.expire_soft_at <= now,
        d.c.expire_notified_at.is_(None),
    )
    async with db.connect() as conn:
        return [Desktop.from_row(r._mapping) for r in await conn.execute(q)]


async def desktops_to_stop(db: Database, node_id: int, now: dt.datetime | None = None) -> list[int]:
    """Running desktops of this node past their hard deadline and not already being stopped."""
    now = now or utcnow()
    q = sa.select(d.c.id).where(
        d.c.node_id == node_id,
        d.c.state == DesktopState.RUNNING,
        d.c.cmd.is_(None),
        d.c.expire_hard_at.is_not(None),
        d.c.expire_hard_at <= now,
    )
    async with db.connect() as conn:
        return [int(r.id) for r in await conn.execute(q)]


async def mark_notified(db: Database, desktop_id: int) -> None:
    async with db.begin() as conn:
        await conn.execute(sa.update(d).where(d.c.id == desktop_id).values(expire_notified_at=utcnow()))
