"""The administrators' side of identity: a user's second factor as an administrator sees and resets it, and an
administrator's own named, expiring API tokens.

Why apart from ``second_factor`` and ``admins``: those hold the mechanics (secrets, hashes, lookups) and take no
actor; the ACL checks and the tenant confinement of an administrator's actions live here, once.  A user the
actor may not see is 404 ``user_not_found`` (``users.get_user``), so a tenant's administrator never learns
whether another tenant's user exists.

Own tokens are ``admin_tokens`` rows of kind ``api``: the secret is shown once and only its SHA-256 is kept
(``admins.token_hash``); each expires after 1 to ``MAX_DAYS`` days; an administrator has at most
``MAX_PER_ADMIN`` unrevoked ones, each name once.  Session tokens (kind ``session``) are not listed: logging
out ends those.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import utcnow
from deckard.model.errors import NotFound, PermissionDenied
from deckard.services import second_factor
from deckard.services.admins import API, new_token, token_hash
from deckard.services.context import Actor, require
from deckard.services.personal_tokens import check_new_token, check_room
from deckard.services.rows import as_dict
from deckard.services.users import get_user

MAX_DAYS = 365
MAX_PER_ADMIN = 20
tok = t.admin_tokens
COLUMNS = (tok.c.id, tok.c.name, tok.c.created_at, tok.c.expires_at, tok.c.revoked)


# ---- a user's second factor ---------------------------------------------------------------------------------


async def second_factor_status(db: Database, actor: Actor, user_id: int) -> dict[str, Any]:
    """``{"user_id", "enrolled", "pending", "recovery_codes_left"}`` (ACL ``user.see``)."""
    require(actor, "user.see")
    await get_user(db, actor, user_id)  # 404 for a user the actor may not see
    return {"user_id": user_id, **await second_factor.status(db, second_factor.USER, user_id)}


async def reset_second_factor(db: Database, actor: Actor, user_id: int) -> None:
    """Remove the user's second factor (the next login asks for the password only, or to enrol again where the
    tenant requires it).  ACL ``user.update.password``: like a new password, it replaces a credential."""
    require(actor, "user.update.password")
    await get_user(db, actor, user_id)
    await second_factor.reset(db, second_factor.USER, user_id)


# ---- an administrator's own API tokens ----------------------------------------------------------------------


def _admin_id(actor: Actor) -> int:
    if actor.kind != "admin" or actor.id is None:
        raise PermissionDenied("only an administrator has API tokens of their own", code="forbidden_action")
    return actor.id


async def create_own_token(db: Database, actor: Actor, name: str, days: int) -> tuple[str, dict[str, Any]]:
    """A new API token for the acting administrator → (the secret, to show once; its row).

    422 ``bad_token_name`` / ``bad_token_lifetime``; 409 ``duplicate`` (an unrevoked token has the name) or
    ``too_many_tokens``."""
    admin_id = _admin_id(actor)
    check_new_token(name, days, MAX_DAYS)
    token = new_token()
    now = utcnow()
    async with db.begin() as conn:
        # the administrator's row is the lock: two creates cannot both pass the checks below
        await conn.execute(sa.select(t.administrators.c.id).where(t.administrators.c.id == admin_id).with_for_update())
        q = sa.select(tok.c.name).where(tok.c.admin_id == admin_id, tok.c.kind == API, tok.c.revoked.is_(False))
        check_room([str(r.name) for r in await conn.execute(q)], name, MAX_PER_ADMIN)
        res = await conn.execute(
            sa.insert(tok)
            .values(
                admin_id=admin_id,
                token_hash=token_hash(token),
                kind=API,
                name=name,
                created_at=now,
                expires_at=now + dt.timedelta(days=days),
            )
            .returning(*COLUMNS)
        )
        return token, as_dict(res.one())


async def list_own_tokens(db: Database, actor: Actor) -> list[dict[str, Any]]:
    """The acting administrator's API tokens, newest first (revoked ones too; never a secret or its hash)."""
    admin_id = _admin_id(actor)
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.select(*COLUMNS)
            .where(tok.c.admin_id == admin_id, tok.c.kind == API)
            .order_by(tok.c.created_at.desc(), tok.c.id.desc())
        )
        return [as_dict(r._mapping) for r in rows]


async def revoke_own_token(db: Database, actor: Actor, token_id: int) -> None:
    """Revoke one of the acting administrator's API tokens; 404 ``token_not_found`` for any other token."""
    admin_id = _admin_id(actor)
    async with db.begin() as conn:
        res = await conn.execute(
            sa.update(tok)
            .where(tok.c.id == token_id, tok.c.admin_id == admin_id, tok.c.kind == API)
            .values(revoked=True)
        )
    if not res.rowcount:
        raise NotFound(f"you have no API token {token_id}", code="token_not_found")
