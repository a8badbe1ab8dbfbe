"""Portal sessions and one-time connect tickets: how a browser proves who it is to the broker.

A browser cannot put an ``Authorization`` header on a WebSocket, and a password must not travel in a URL.  So
the portal API (which the user logged in to) hands out a **ticket**: a random secret naming one desktop, valid
for ``TICKET_TTL`` seconds and redeemable **once**; the page puts it in the broker's WebSocket URL.  A copied
or logged URL is useless a moment later.  Administrators get ``spy`` tickets the same way (ACL ``desktop.spy``,
``desktop.spy.interactive`` for input).

Portal logins are kept in the same table (kind ``portal``) rather than in ``admin_tokens``, whose rows belong
to administrators and carry ACLs; a user's token gives access to their own desktops only.  As for admin
tokens, only the SHA-256 of a secret is stored.

Issuing is bounded per user (per administrator for spy tickets): at most ``tickets_per_minute`` in any minute
and ``max_live_tickets`` issued but not yet used, else 429 ``too_many_tickets`` (``BrokerSettings``).  A ticket
is spent only when the broker accepts it: one presented for another desktop is refused and stays usable.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import User, aware, utcnow
from deckard.model.errors import Conflict, DeckardError, PermissionDenied, Unauthenticated
from deckard.model.states import DesktopState
from deckard.runtime.settings import BrokerSettings
from deckard.services.context import Actor, require
from deckard.services.desktops import get_desktop
from deckard.services.peripherals import peripherals
from deckard.services.sessions import desktop_for_user

PORTAL = "portal"
CONNECT = "connect"
SPY = "spy"
FILES = "files"  # the portal's file panel: upload into and download from the user's desktop (broker/files.py)
SOUND = "sound"  # the desktop's sound, played in the portal's page (broker/sound.py); never for a spy
CHALLENGE = "challenge"  # a login (a user's or an administrator's) waiting for its second factor
CHALLENGE_TTL = 300.0
TICKET_TTL = 30.0  # seconds between issuing a ticket and the browser opening its WebSocket
PORTAL_TTL = 8 * 3600.0  # a portal login lasts a working day
TICKET_PREFIX = "dkt_"

RATE_WINDOW = 60.0  # seconds over which ``tickets_per_minute`` counts
_DEFAULTS = BrokerSettings()

tk = t.tickets


class TooManyTickets(DeckardError):
    """A user (or administrator) asked for more tickets than the limits allow: wait and retry."""

    code = "too_many_tickets"
    status = 429


@dataclass(frozen=True)
class TicketLimits:
    per_minute: int = _DEFAULTS.tickets_per_minute
    live: int = _DEFAULTS.max_live_tickets

    @classmethod
    def from_settings(cls, settings: BrokerSettings) -> TicketLimits:
        return cls(settings.tickets_per_minute, settings.max_live_tickets)


@dataclass(frozen=True)
class Ticket:
    """A redeemed ticket: what the broker may do with the connection that presented it."""

    kind: str  # connect | spy | files | sound
    desktop_id: int
    user: User  # the desktop's owner (connect: the user connecting)
    admin_id: int | None = None
    admin_name: str = ""
    interactive: bool = False

    @property
    def spy(self) -> bool:
        return self.kind == SPY


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def _store(
    db: Database,
    kind: str,
    ttl: float,
    *,
    user_id: int | None = None,
    admin_id: int | None = None,
    desktop_id: int | None = None,
    interactive: bool = False,
    limits: TicketLimits | None = None,
) -> tuple[str, dt.datetime]:
    secret = TICKET_PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    expires = now + dt.timedelta(seconds=ttl)
    async with db.begin() as conn:
        # old rows go when new ones come: no sweeper needed, the table stays small
        await conn.execute(sa.delete(tk).where(tk.c.expires_at < now - dt.timedelta(hours=1)))
        if limits is not None:
            await _check_limits(conn, kind, limits, now, user_id=user_id, admin_id=admin_id)
        await conn.execute(
            sa.insert(tk).values(
                token_hash=_hash(secret),
                kind=kind,
                user_id=user_id,
                admin_id=admin_id,
                desktop_id=desktop_id,
                interactive=interactive,
                created_at=now,
                expires_at=expires,
            )
        )
    return secret, expires


async def _check_limits(
    conn: AsyncConnection,
    kind: str,
    limits: TicketLimits,
    now: dt.datetime,
    *,
    user_id: int | None,
    admin_id: int | None,
) -> None:
    """429 when the holder (the administrator of a spy ticket, else the user) is over a ticket limit."""
    if admin_id is not None:
        mine = sa.and_(tk.c.kind == kind, tk.c.admin_id == admin_id)
        lock = sa.select(t.administrators.c.id).where(t.administrators.c.id == admin_id)
    else:
        mine = sa.and_(tk.c.kind == kind, tk.c.user_id == user_id, tk.c.admin_id.is_(None))
        lock = sa.select(t.users.c.id).where(t.users.c.id == user_id)
    await conn.execute(lock.with_for_update())  # PostgreSQL: concurrent issues for one holder queue here
    since = now - dt.timedelta(seconds=RATE_WINDOW)
    recent = (await conn.execute(sa.select(sa.func.count()).where(mine, tk.c.created_at > since))).scalar_one()
    if recent >= limits.per_minute:
        raise TooManyTickets(
            f"more than {limits.per_minute} connect tickets in a minute: wait a minute and connect again",
            details={"retry_after_s": int(RATE_WINDOW)},
        )
    live = (
        await conn.execute(sa.select(sa.func.count()).where(mine, tk.c.used_at.is_(None), tk.c.expires_at > now))
    ).scalar_one()
    if live >= limits.live:
        raise TooManyTickets(
            f"{live} connect tickets are already waiting to be used: use one, or wait {TICKET_TTL:g} s",
            details={"retry_after_s": int(TICKET_TTL)},
        )


async def _user(conn: AsyncConnection, user_id: int) -> User:
    q = (
        sa.select(t.users, t.tenants.c.blocked.label("tenant_blocked"))
        .join(t.tenants, t.tenants.c.id == t.users.c.tenant_id)
        .where(t.users.c.id == user_id)
    )
    row = (await conn.execute(q)).first()
    if row is None or row.blocked or row.tenant_blocked:
        raise Unauthenticated("this user is blocked or no longer exists: log in again", code="user_blocked")
    return User.from_row(row._mapping)


# ---- portal sessions ---------------------------------------------------------------------------------------


async def open_portal_session(db: Database, user: User) -> tuple[str, dt.datetime]:
    """A portal session for a user the login chain (``services/identity.py``) accepted → (token, expiry)."""
    return await _store(db, PORTAL, PORTAL_TTL, user_id=user.id)


async def issue_challenge(db: Database, user: User) -> tuple[str, dt.datetime]:
    """The password was right and a second factor is due: a short-lived ticket that stands for the first step,
    so the portal asks for the code without sending the password again."""
    return await _store(db, CHALLENGE, CHALLENGE_TTL, user_id=user.id)


async def challenge_user(db: Database, secret: str) -> User:
    """The user a challenge stands for (it stays valid for more tries until it expires or is ended)."""
    async with db.connect() as conn:
        row = (
            await conn.execute(sa.select(tk).where(tk.c.token_hash == _hash(secret), tk.c.kind == CHALLENGE))
        ).first()
        expires = aware(row.expires_at) if row is not None else None
        if row is None or row.user_id is None or expires is None or expires <= utcnow():
            raise Unauthenticated("the login step has expired: log in again", code="challenge_expired")
        return await _user(conn, int(row.user_id))


async def issue_admin_challenge(db: Database, admin_id: int) -> tuple[str, dt.datetime]:
    """``issue_challenge`` for an administrator's login (``services/admins.py``): the row names the administrator
    (``admin_id``) and no user, so neither kind of login can finish the other's."""
    return await _store(db, CHALLENGE, CHALLENGE_TTL, admin_id=admin_id)


async def challenge_admin(db: Database, secret: str) -> int:
    """The administrator a challenge stands for (valid for more tries until it expires or is ended); 401
    ``challenge_expired`` otherwise, a user's challenge included."""
    async with db.connect() as conn:
        row = (
            await conn.execute(
                sa.select(tk.c.admin_id, tk.c.user_id, tk.c.expires_at).where(
                    tk.c.token_hash == _hash(secret), tk.c.kind == CHALLENGE
                )
            )
        ).first()
    expires = aware(row.expires_at) if row is not None else None
    if row is None or row.admin_id is None or row.user_id is not None or expires is None or expires <= utcnow():
        raise Unauthenticated("the login step has expired: log in again", code="challenge_expired")
    return int(row.admin_id)


async def end_challenge(db: Database, secret: str) -> None:
    async with db.begin() as conn:
        await conn.execute(sa.delete(tk).where(tk.c.token_hash == _hash(secret), tk.c.kind == CHALLENGE))


async def user_for_token(db: Database, token: str) -> User:
    """The user a portal token stands for; 401 when unknown, expired or the user is blocked."""
    async with db.connect() as conn:
        row = (await conn.execute(sa.select(tk).where(tk.c.token_hash == _hash(token), tk.c.kind == PORTAL))).first()
        if row is None or row.user_id is None:
            raise Unauthenticated("you are not logged in: log in again", code="bad_token")
        expires = aware(row.expires_at)
        if expires is None or expires <= utcnow():
            raise Unauthenticated("your session has expired: log in again", code="session_expired")
        return await _user(conn, int(row.user_id))


async def logout_user(db: Database, token: str) -> None:
    async with db.begin() as conn:
        await conn.execute(sa.delete(tk).where(tk.c.token_hash == _hash(token), tk.c.kind == PORTAL))


# ---- one-time tickets --------------------------------------------------------------------------------------


async def issue_connect_ticket(
    db: Database, user: User, desktop_id: int, *, limits: TicketLimits | None = None
) -> tuple[str, dt.datetime]:
    """A ticket for the user's own desktop (404/403 as the broker would answer for a connect; 429
    ``too_many_tickets`` over the limits, by default ``BrokerSettings``')."""
    desk = await desktop_for_user(db, user, desktop_id)
    return await _store(db, CONNECT, TICKET_TTL, user_id=user.id, desktop_id=desk.id, limits=limits or TicketLimits())


async def issue_files_ticket(
    db: Database, user: User, desktop_id: int, *, limits: TicketLimits | None = None
) -> tuple[str, dt.datetime]:
    """A ticket for the file channel of the user's own running desktop (the file panel and print jobs; 403
    ``files_disabled`` where the administrator turned both off for its tenant or OSF)."""
    idle = "files can be moved only while the desktop runs: connect to it first"
    return await _channel_ticket(db, user, desktop_id, FILES, idle, limits)


async def issue_sound_ticket(
    db: Database, user: User, desktop_id: int, *, limits: TicketLimits | None = None
) -> tuple[str, dt.datetime]:
    """A ticket for the sound channel of the user's own running desktop (403 ``sound_disabled`` where the
    administrator turned sound off for its tenant or OSF).  Only the desktop's owner gets one: an administrator
    watching (spy) hears nothing."""
    idle = "sound plays only while the desktop runs: connect to it first"
    return await _channel_ticket(db, user, desktop_id, SOUND, idle, limits)


async def _channel_ticket(
    db: Database, user: User, desktop_id: int, kind: str, not_running: str, limits: TicketLimits | None
) -> tuple[str, dt.datetime]:
    desk = await desktop_for_user(db, user, desktop_id)
    async with db.connect() as conn:
        (await peripherals(conn, desk.tenant_id, desk.osf_id)).require(kind)
    if desk.state != DesktopState.RUNNING:
        raise Conflict(not_running, code="not_running")
    return await _store(db, kind, TICKET_TTL, user_id=user.id, desktop_id=desk.id, limits=limits or TicketLimits())


async def issue_spy_ticket(
    db: Database, actor: Actor, desktop_id: int, *, interactive: bool = False, limits: TicketLimits | None = None
) -> tuple[str, dt.datetime]:
    """A ticket to watch a running desktop; needs ``desktop.spy`` (and ``desktop.spy.interactive`` for input)."""
    require(actor, "desktop.spy", *(["desktop.spy.interactive"] if interactive else []))
    row = await get_desktop(db, actor, desktop_id)  # 404 outside the actor's tenant
    if row.get("state") != DesktopState.RUNNING:
        raise Conflict("only a running desktop can be watched: it is " + str(row.get("state")), code="not_running")
    return await _store(
        db,
        SPY,
        TICKET_TTL,
        user_id=int(row["user_id"]),
        admin_id=actor.id,
        desktop_id=desktop_id,
        interactive=interactive,
        limits=limits or TicketLimits(),
    )


async def redeem_ticket(
    db: Database, secret: str, desktop_id: int | None = None, kinds: tuple[str, ...] = (CONNECT, SPY)
) -> Ticket:
    """Use a ticket of one of ``kinds`` up: 401 ``bad_ticket`` if unknown, expired, already used or of another
    kind (the same answer for each).

    With ``desktop_id`` (the connect names a desktop), a ticket for another desktop is refused with 403
    ``ticket_mismatch`` and is *not* used up."""
    bad = Unauthenticated("the connect ticket is not valid (expired or already used): connect again", code="bad_ticket")
    if not secret.startswith(TICKET_PREFIX):
        raise bad
    now = utcnow()
    async with db.begin() as conn:
        row = (await conn.execute(sa.select(tk).where(tk.c.token_hash == _hash(secret), tk.c.kind.in_(kinds)))).first()
        expires = aware(row.expires_at) if row is not None else None
        if row is None or row.used_at is not None or expires is None or expires <= now or row.desktop_id is None:
            raise bad
        if desktop_id is not None and int(row.desktop_id) != desktop_id:
            raise PermissionDenied("the ticket is for another desktop", code="ticket_mismatch")
        # the guarded update is what makes a ticket single-use when two connects race with it
        res = await conn.execute(sa.update(tk).where(tk.c.id == row.id, tk.c.used_at.is_(None)).values(used_at=now))
        if res.rowcount != 1:
            raise bad
        user = await _user(conn, int(row.user_id))
        admin_name = ""
        if row.admin_id is not None:
            admin_name = str(
                (
                    await conn.execute(sa.select(t.administrators.c.name).where(t.administrators.c.id == row.admin_id))
                ).scalar_one_or_none()
                or ""
            )
    return Ticket(
        kind=str(row.kind),
        desktop_id=int(row.desktop_id),
        user=user,
        admin_id=int(row.admin_id) if row.admin_id is not None else None,
        admin_name=admin_name,
        interactive=bool(row.interactive),
    )
