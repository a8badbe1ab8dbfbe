"""User sessions on desktops, as the broker drives them: list, take over, wait for start, record history.

Takeover without locks: every connect writes a fresh ``session_id`` on the desktop; a tunnel whose id is no
longer the desktop's closes itself (it hears the change on the ``desktops`` channel).  So "a second connect
takes over" needs no cross-process signal beyond the notification every write already sends.

``desktops.user_state`` moves by ``USER_TRANSITIONS`` through ``services/transitions.py``, guarded by the
session id: a connection that was taken over (or whose desktop stopped, which ends its session) changes
nothing when it reports ``connected`` or closes — an expected race, answered False, not an error.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database, prepared
from deckard.model.entities import Desktop, User, utcnow
from deckard.model.errors import Conflict, DeckardError, InvalidTransition, NotFound, PermissionDenied, Unavailable
from deckard.model.states import DesktopState, UserState
from deckard.services.desktops import load_desktop, request_start, request_stop
from deckard.services.events import DESKTOPS
from deckard.services.transitions import transition_session

d = t.desktops
c = t.connections


async def user_desktops(db: Database, user: User) -> list[dict[str, Any]]:
    """QVD's list_of_vm: ``[{"id","name","state","blocked"}]`` for the user's own desktops."""
    q = sa.select(d.c.id, d.c.name, d.c.state, d.c.blocked).where(d.c.user_id == user.id).order_by(d.c.id)

    async def reads(conn: AsyncConnection) -> list[dict[str, Any]]:
        rows = await conn.execute(q)
        return [{"id": r.id, "name": r.name, "state": r.state, "blocked": 1 if r.blocked else 0} for r in rows]

    return await db.read(reads)


async def desktop_for_user(db: Database, user: User, desktop_id: int) -> Desktop:
    """The desktop if the user may connect to it: 404 when unknown, 403 when another user's or blocked."""
    try:
        desk = await _read_desktop(db, desktop_id)
    except NotFound:
        raise NotFound(f"there is no desktop with id {desktop_id}", code="desktop_not_found") from None
    if desk.user_id != user.id:
        # same answer as QVD: the desktop exists but is not this user's
        raise PermissionDenied("this desktop belongs to another user", code="not_your_desktop")
    if desk.blocked:
        raise PermissionDenied("the desktop is offline for maintenance: ask your administrator", code="desktop_blocked")
    return desk


async def head_start(db: Database, user_id: int, desktop_id: int) -> bool:
    """Ask for the start of a user's desktop at rest while the login that names it is still being checked (the
    broker, ``identity.login_password``'s ``on_known``): the password's hash and the guest's boot run side by
    side.  Only for a login that could succeed at once (no second step, no failures counted against it), so a
    guesser starts at most one desktop before a wrong password stops it again and counts against the account.
    True when a start was asked for; refusals are the connect's to report, once logged in."""
    try:
        return await request_start(db, desktop_id, owner=user_id) is not None
    except DeckardError:
        return False


async def withdraw_head_start(db: Database, desktop_id: int) -> None:
    """The login that asked for a head start failed: stop the desktop again, unless a connect has taken it
    since (its session id; at rest a desktop has none)."""
    await request_stop(
        db, desktop_id, reason="stopped: the login that started it failed", keep_if=lambda desk: bool(desk.session_id)
    )


_NEW_CONNECTION = sa.insert(c).returning(c.c.id)  # built once: every connect (services/config.py says why)


async def open_session(
    db: Database,
    desk: Desktop,
    user: User,
    *,
    login: str,
    broker_node_id: int | None,
    source: str,
    protocol: str,
    auth_ms: float,
) -> tuple[str, int]:
    """Take the desktop's display for a new connection; returns (session id, connection history id)."""
    session_id = secrets.token_hex(8)
    now = utcnow()
    async with db.write() as conn:
        await transition_session(
            conn,
            desk.id,
            UserState.CONNECTING,
            values={"user_state_at": now, "session_id": session_id, "session_node_id": broker_node_id},
        )
        res = await conn.execute(
            _NEW_CONNECTION,
            dict(
                desktop_id=desk.id,
                user_id=user.id,
                login=login,
                broker_node_id=broker_node_id,
                source=source,
                protocol=protocol,
                started_at=now,
                t_auth_ms=auth_ms,
            ),
        )
        conn_id = int(res.scalar_one())
    await db.bus.notify(DESKTOPS, str(desk.id))
    return session_id, conn_id


@dataclass(frozen=True)
class SessionOwner:
    """Who holds a desktop's session now, and the state that says why a session ended."""

    session_id: str | None
    state: DesktopState
    failure_reason: str | None


_OWNERS = prepared(
    sa.select(d.c.id, d.c.session_id, d.c.state, d.c.failure_reason).where(
        d.c.id.in_(sa.bindparam("ids", expanding=True))
    )
)  # built once: the brokers' session watch reads it every pass


async def session_owners(db: Database, desktop_ids: list[int]) -> dict[int, SessionOwner]:
    """The session holder of each of ``desktop_ids`` in one query (a deleted desktop is missing)."""

    async def reads(conn: AsyncConnection) -> dict[int, SessionOwner]:
        owners: dict[int, SessionOwner] = {}
        for i in range(0, len(desktop_ids), 500):  # bounded IN lists
            for row in await conn.execute(_OWNERS, {"ids": desktop_ids[i : i + 500]}):
                owners[int(row.id)] = SessionOwner(row.session_id, DesktopState(row.state), row.failure_reason)
        return owners

    return await db.read(reads)


async def _session_moved(conn: AsyncConnection, desktop_id: int, session_id: str, to: UserState) -> bool:
    """Move the user connection while ``session_id`` owns it; False when it no longer does (or the desktop
    is gone).  A refusal by the table is a bug in the caller and raises ``InvalidTransition``."""
    try:
        await transition_session(conn, desktop_id, to, session_id=session_id)
    except InvalidTransition:
        raise
    except (NotFound, Conflict):
        return False
    return True


async def mark_connected(
    db: Database, desktop_id: int, session_id: str, conn_id: int, timings: dict[str, float]
) -> bool:
    """The display answered: ``connecting → connected``; False when the session was taken over meanwhile.

    The connection records where its desktop runs now (node and image, from the desktop's row): the dashboard's
    time-to-desktop per image and per node.  A connection that never got this far keeps NULL for both."""
    where = {col: sa.select(d.c[col]).where(d.c.id == desktop_id).scalar_subquery() for col in ("node_id", "image_id")}
    async with db.write() as conn:
        moved = await _session_moved(conn, desktop_id, session_id, UserState.CONNECTED)
        await conn.execute(sa.update(c).where(c.c.id == conn_id).values(connected_at=utcnow(), **where, **timings))
    await db.bus.notify(DESKTOPS, str(desktop_id))
    return moved


async def close_session(
    db: Database,
    desktop_id: int,
    session_id: str,
    conn_id: int,
    *,
    result: str,
    reason: str = "",
    bytes_in: int = 0,
    bytes_out: int = 0,
    timings: dict[str, float] | None = None,
) -> bool:
    """Record the end of a connection; the desktop is disconnected only if this session still owns it (True)."""
    async with db.write() as conn:
        moved = await _session_moved(conn, desktop_id, session_id, UserState.DISCONNECTED)
        if moved:
            await conn.execute(sa.update(d).where(d.c.id == desktop_id).values(session_id=None, session_node_id=None))
        await conn.execute(
            sa.update(c)
            .where(c.c.id == conn_id)
            .values(
                ended_at=utcnow(),
                result=result,
                reason=reason[:1000],
                bytes_in=bytes_in,
                bytes_out=bytes_out,
                **(timings or {}),
            )
        )
    await db.bus.notify(DESKTOPS, str(desktop_id))
    return moved


@dataclass(frozen=True)
class Progress:
    state: str
    message: str


PROGRESS_TEXT: dict[str, str] = {
    DesktopState.STOPPED: "Desktop is stopped, asking a node to start it",
    DesktopState.STARTING: "Starting desktop",
    DesktopState.RUNNING: "Desktop is running",
    DesktopState.STOPPING: "Desktop is stopping",
    DesktopState.ZOMBIE: "Desktop is being cleaned up",
}


async def _read_desktop(db: Database, desktop_id: int) -> Desktop:
    return await db.read(lambda conn: load_desktop(conn, desktop_id))  # on the loop's thread: no hand-off to wait on


async def wait_until_running(
    db: Database,
    desktop_id: int,
    *,
    timeout: float,
    poll: float,
    on_progress: Any = None,
    display_first: bool = False,
) -> Desktop:
    """Wait on notifications (not sleeps) until the desktop runs; Unavailable with the reason if it fails.

    ``display_first``: a starting desktop whose guest showed its display at boot (``display_at``) is returned as
    it is, before its agent answers (the broker dials that display meanwhile)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_state = None
    async with db.bus.subscribe(DESKTOPS) as sub:
        while True:
            # shielded: a waiter cancelled mid-read (the client left) must not strand a connection (a read falls
            # back to one when SQLite's file is busy, and there it holds the write lock)
            desk = await asyncio.shield(_read_desktop(db, desktop_id))
            if desk.state != last_state:
                last_state = desk.state
                if on_progress is not None:
                    await on_progress(Progress(desk.state, PROGRESS_TEXT.get(desk.state, desk.state)))
            booted = display_first and desk.state == DesktopState.STARTING and desk.display_at is not None
            if (desk.state == DesktopState.RUNNING or booted) and desk.cmd is None and desk.agent_token:
                return desk
            if desk.state == DesktopState.FAILED and desk.cmd is None:
                raise Unavailable(f"the desktop failed to start: {desk.failure_reason}", code="start_failed")
            if desk.state == DesktopState.STOPPED and desk.cmd is None:
                raise Unavailable("the desktop was stopped while starting", code="start_aborted")
            left = deadline - loop.time()
            if left <= 0:
                raise Unavailable(
                    f"the desktop did not start within {timeout:.0f} s (state {desk.state})", code="start_timeout"
                )
            await sub.wait_about(str(desktop_id), min(left, poll))
