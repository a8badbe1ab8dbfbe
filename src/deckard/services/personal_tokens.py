"""Users' personal tokens: named, expiring, revocable secrets for scripts and QVD's ``--token`` (``Authorization:
Bearer``).  Only the SHA-256 of a token is stored; the secret is shown once, when it is made.

A user makes and revokes their own (portal); an administrator with ``user.update`` lists and revokes a user's.
Every token expires (at most ``auth.tokens.max_days``), and a user has at most ``MAX_PER_USER`` of them.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from typing import Any

import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import User, aware, utcnow
from deckard.model.errors import BadInput, Conflict, NotFound, Unauthenticated
from deckard.services.admins import token_hash
from deckard.services.config import get_config
from deckard.services.context import Actor, require
from deckard.services.rows import as_dict
from deckard.services.users import get_user

PREFIX = "dku_"  # recognisable by secret scanners and people: a Deckard user token
MAX_PER_USER = 20
DEFAULT_DAYS = 30
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")
ut = t.user_tokens
COLUMNS = (ut.c.id, ut.c.name, ut.c.created_at, ut.c.expires_at, ut.c.last_used_at, ut.c.revoked)


def check_new_token(name: str, days: int, longest: int) -> None:
    """A token's name and lifetime (users' and administrators' alike): 422 ``bad_token_name`` or
    ``bad_token_lifetime``."""
    if not NAME.fullmatch(name):
        raise BadInput(
            "name the token with 1-64 letters, digits, spaces, '.', '_' or '-' (e.g. 'laptop')", code="bad_token_name"
        )
    if not 1 <= days <= longest:
        raise BadInput(f"a token lives 1 to {longest} days", code="bad_token_lifetime", details={"maximum": longest})


def check_room(names: list[str], name: str, limit: int) -> None:
    """Whether one more token fits beside the owner's unrevoked ``names``: 409 ``duplicate`` or
    ``too_many_tokens``."""
    if name in names:
        raise Conflict(f"you already have a token named {name!r}: revoke it or pick another name", code="duplicate")
    if len(names) >= limit:
        raise Conflict(f"you have {limit} tokens: revoke one first", code="too_many_tokens")


async def create_token(db: Database, user: User, name: str, days: int | None = None) -> tuple[str, dict[str, Any]]:
    """A new token for ``user`` → (the secret, shown once; its row).  422 ``bad_token_name`` /
    ``bad_token_lifetime``, 409 ``duplicate`` or ``too_many_tokens``."""
    longest = int(await get_config(db, "auth.tokens.max_days", user.tenant_id))
    days = min(DEFAULT_DAYS, longest) if days is None else days
    check_new_token(name, days, longest)
    token = PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    async with db.begin() as conn:
        mine = await conn.execute(sa.select(ut.c.name).where(ut.c.user_id == user.id, ut.c.revoked.is_(False)))
        check_room([str(r.name) for r in mine], name, MAX_PER_USER)
        await conn.execute(sa.delete(ut).where(ut.c.user_id == user.id, ut.c.name == name))  # a revoked namesake
        res = await conn.execute(
            sa.insert(ut)
            .values(
                user_id=user.id,
                name=name,
                token_hash=token_hash(token),
                created_at=now,
                expires_at=now + dt.timedelta(days=days),
            )
            .returning(*COLUMNS)
        )
        return token, as_dict(res.one())


async def list_tokens(db: Database, user_id: int) -> list[dict[str, Any]]:
    async with db.connect() as conn:
        rows = await conn.execute(sa.select(*COLUMNS).where(ut.c.user_id == user_id).order_by(ut.c.created_at.desc()))
        return [dict(r._mapping) for r in rows]


async def revoke_token(db: Database, user_id: int, token_id: int) -> None:
    """Revoke one of ``user_id``'s tokens; 404 ``token_not_found`` for anyone else's."""
    async with db.begin() as conn:
        res = await conn.execute(sa.update(ut).where(ut.c.id == token_id, ut.c.user_id == user_id).values(revoked=True))
    if not res.rowcount:
        raise NotFound(f"no token {token_id}", code="token_not_found")


async def _visible_user(db: Database, actor: Actor, user_id: int) -> None:
    await get_user(db, actor, user_id)  # 404 for a user the actor may not see


async def admin_list_tokens(db: Database, actor: Actor, user_id: int) -> list[dict[str, Any]]:
    require(actor, "user.see")
    await _visible_user(db, actor, user_id)
    return await list_tokens(db, user_id)


async def admin_revoke_token(db: Database, actor: Actor, user_id: int, token_id: int) -> None:
    require(actor, "user.update")
    await _visible_user(db, actor, user_id)
    await revoke_token(db, user_id, token_id)


async def token_owner(db: Database, token: str) -> Any:
    """The users row (with ``tenant_blocked``) a token stands for; 401 ``bad_token`` (unknown or revoked) or
    ``token_expired``.  Notes when it was last used."""
    q = (
        sa.select(
            t.users,
            t.tenants.c.blocked.label("tenant_blocked"),
            ut.c.id.label("token_id"),
            ut.c.expires_at,
            ut.c.revoked.label("token_revoked"),
        )
        .join(t.users, t.users.c.id == ut.c.user_id)
        .join(t.tenants, t.tenants.c.id == t.users.c.tenant_id)
        .where(ut.c.token_hash == token_hash(token))
    )
    now = utcnow()
    async with db.connect() as conn:
        row = (await conn.execute(q)).first()
    if row is None or row.token_revoked:
        raise Unauthenticated("the token is not valid: make a new one in the portal", code="bad_token")
    expires = aware(row.expires_at)
    if expires is None or expires <= now:
        raise Unauthenticated("the token has expired: make a new one in the portal", code="token_expired")
    async with db.begin() as conn:
        await conn.execute(sa.update(ut).where(ut.c.id == row.token_id).values(last_used_at=now))
    return row
