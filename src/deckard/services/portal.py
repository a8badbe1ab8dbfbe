"""The user portal's use cases: a user's own desktops, stopping and resetting one, and where the brokers are.

Users are not administrators: they act only on their own desktops, checked here by ``desktop_for_user`` (404
unknown, 403 another user's or blocked), never by the route.  A reset runs the administrators' service as an
actor confined to that desktop and holding only ``desktop.reset``.

The brokers: the ``broker_url`` each running node registered.  The API turns them into WebSocket origins a
browser can reach (``api/routes/portal.py``); the list for every page's Content-Security-Policy is cached
(``RunningBrokers``), because pages are public and loading one must not cost a query each time.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.acls import ACLS
from deckard.model.entities import User
from deckard.model.errors import Conflict, NotFound
from deckard.model.states import DesktopState, NodeState
from deckard.runtime.paths import FarmPaths
from deckard.services.context import Actor
from deckard.services.desktops import request_stop, reset_desktop
from deckard.services.peripherals import peripherals
from deckard.services.sessions import desktop_for_user

d, n = t.desktops, t.nodes
PORTAL_COLUMNS = (d.c.id, d.c.name, d.c.state, d.c.cmd, d.c.blocked, d.c.user_state, d.c.failure_reason)


async def list_own_desktops(db: Database, user: User) -> list[dict[str, Any]]:
    """The user's desktops, their states and what each offers in the browser (``features``), by name."""
    q = sa.select(*PORTAL_COLUMNS, d.c.osf_id).where(d.c.user_id == user.id).order_by(d.c.name)
    out = []
    async with db.connect() as conn:
        for r in (await conn.execute(q)).mappings():
            offered = await peripherals(conn, user.tenant_id, int(r["osf_id"]))
            out.append({**{k: v for k, v in r.items() if k != "osf_id"}, "features": offered.features()})
    return out


async def _own_desktop(db: Database, user: User, desktop_id: int) -> dict[str, Any]:
    q = sa.select(*PORTAL_COLUMNS).where(d.c.user_id == user.id, d.c.id == desktop_id)
    async with db.connect() as conn:
        row = (await conn.execute(q)).mappings().first()
    if row is None:  # deleted meanwhile
        raise NotFound(f"there is no desktop with id {desktop_id}", code="desktop_not_found")
    return dict(row)


async def stop_own_desktop(db: Database, user: User, desktop_id: int) -> dict[str, Any]:
    await desktop_for_user(db, user, desktop_id)
    await request_stop(db, desktop_id)
    return await _own_desktop(db, user, desktop_id)


async def reset_own_desktop(db: Database, user: User, desktop_id: int, paths: FarmPaths) -> dict[str, Any]:
    """Discard the user's desktop's writable layer (their home is kept); a running desktop is refused."""
    desk = await desktop_for_user(db, user, desktop_id)
    if desk.state not in (DesktopState.STOPPED, DesktopState.FAILED) or desk.cmd is not None:
        raise Conflict(
            "your desktop is running: stop it first, then reset it (your home directory is kept)",
            code="desktop_running",
        )
    # the user acts on their own desktop only: an actor confined to it with just the reset ACL
    actor = Actor("user", user.id, user.tenant_id, user.login, frozenset({"desktop.reset"} & ACLS))
    await reset_desktop(db, actor, desktop_id, paths)
    return await _own_desktop(db, user, desktop_id)


async def broker_url_for(db: Database, desktop_id: int) -> str | None:
    """A running node's ``broker_url``: the desktop's own node first, else the lowest id; None without nodes."""
    q = (
        sa.select(n.c.broker_url)
        .select_from(n.outerjoin(d, sa.and_(d.c.node_id == n.c.id, d.c.id == desktop_id)))
        .where(n.c.state == NodeState.RUNNING, n.c.broker_url != "")
        .order_by(d.c.id.is_(None), n.c.id)
        .limit(1)
    )
    async with db.connect() as conn:
        url = (await conn.execute(q)).scalar_one_or_none()
    return None if url is None else str(url)


class RunningBrokers:
    """The ``broker_url`` of every running node, read at most every ``ttl`` seconds."""

    def __init__(self, db: Database, ttl: float = 10.0) -> None:
        self.db = db
        self.ttl = ttl
        self._urls: list[str] = []
        self._read_at = -ttl

    async def __call__(self) -> list[str]:
        now = time.monotonic()
        if now - self._read_at >= self.ttl:
            q = sa.select(n.c.broker_url).where(n.c.state == NodeState.RUNNING, n.c.broker_url != "").distinct()
            try:
                async with self.db.connect() as conn:
                    self._urls = [str(u) for u in (await conn.execute(q)).scalars()]
            except (sa.exc.SQLAlchemyError, OSError):
                pass  # the database is away: the last list (the page itself will say what is wrong)
            self._read_at = now
        return self._urls
