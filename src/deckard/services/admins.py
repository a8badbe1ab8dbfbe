"""Administrators' credentials: password logins that yield session tokens, long-lived API tokens, and the
lookup that turns a bearer token back into the ``Actor`` every admin service receives.

Only the SHA-256 of a token is stored (``admin_tokens.token_hash``): a leaked database does not leak working
tokens, and a 256-bit random secret needs no slow hash.  QVD bound its sessions to the client IP and kept them
in a cookie; Deckard's tokens are bearer tokens so the CLI, scripts and the web UI use the same path.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from functools import cache
from typing import Any

import sqlalchemy as sa

from deckard.auth.local import hash_password, verify_password_async
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import aware, utcnow
from deckard.model.errors import NotFound, Unauthenticated
from deckard.services.context import Actor

TOKEN_PREFIX = "dk_"
SESSION = "session"
API = "api"


def new_token() -> str:
    """A fresh secret; the prefix lets secret scanners and humans recognise a Deckard token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@cache
def _decoy_hash() -> str:
    # verifying against a decoy for unknown names keeps "no such admin" as slow as "wrong password"
    return hash_password(secrets.token_urlsafe(16))


async def _admin_row(db: Database, name: str, tenant: str) -> sa.Row[*tuple[Any, ...]] | None:
    a = t.administrators
    q = (
        sa.select(a.c.id, a.c.tenant_id, a.c.password_hash, a.c.blocked, t.tenants.c.blocked.label("tenant_blocked"))
        .join(t.tenants, t.tenants.c.id == a.c.tenant_id)
        .where(a.c.name == name, t.tenants.c.name == tenant)
    )
    async with db.connect() as conn:
        return (await conn.execute(q)).first()


async def _store_token(db: Database, admin_id: int, kind: str, name: str, expires_at: dt.datetime | None) -> str:
    token = new_token()
    async with db.begin() as conn:
        await conn.execute(
            sa.insert(t.admin_tokens).values(
                admin_id=admin_id,
                token_hash=token_hash(token),
                kind=kind,
                name=name,
                created_at=utcnow(),
                expires_at=expires_at,
            )
        )
    return token


async def login_admin(
    db: Database, name: str, password: str, tenant: str = "default", hours: float = 12
) -> tuple[str, dt.datetime]:
    """Check an administrator's password and open a session; every failure is the same 401."""
    row = await _admin_row(db, name, tenant)
    ok = await verify_password_async(row.password_hash if row else _decoy_hash(), password)
    if row is None or not ok or row.blocked or row.tenant_blocked:
        raise Unauthenticated("wrong administrator name, tenant or password", code="bad_credentials")
    expires_at = utcnow() + dt.timedelta(hours=hours)
    token = await _store_token(db, int(row.id), SESSION, "", expires_at)
    return token, expires_at


async def create_api_token(db: Database, admin_name: str, token_name: str, tenant: str = "default") -> str:
    """A token that does not expire (until revoked), for scripts and the CLI profile ``deckard up`` writes."""
    row = await _admin_row(db, admin_name, tenant)
    if row is None:
        raise NotFound(f"no administrator {admin_name!r} in tenant {tenant!r}", code="admin_not_found")
    return await _store_token(db, int(row.id), API, token_name, None)


async def actor_for_token(db: Database, token: str) -> Actor:
    """The administrator a bearer token stands for; 401 ``bad_token`` or ``session_expired`` otherwise."""
    a, tok = t.administrators, t.admin_tokens
    q = (
        sa.select(
            a.c.id,
            a.c.tenant_id,
            a.c.name,
            a.c.blocked,
            tok.c.expires_at,
            tok.c.revoked,
            t.tenants.c.blocked.label("tenant_blocked"),
        )
        .join(a, a.c.id == tok.c.admin_id)
        .join(t.tenants, t.tenants.c.id == a.c.tenant_id)
        .where(tok.c.token_hash == token_hash(token))
    )
    async with db.connect() as conn:
        row = (await conn.execute(q)).first()
    if row is None or row.revoked or row.blocked or row.tenant_blocked:
        raise Unauthenticated("the token is not valid: log in again", code="bad_token")
    expires_at = aware(row.expires_at)
    if expires_at is not None and expires_at <= utcnow():
        raise Unauthenticated("the session has expired: log in again", code="session_expired")
    return Actor("admin", int(row.id), int(row.tenant_id), str(row.name))


async def revoke_token(db: Database, token: str) -> None:
    """Revoke a token (logout); revoking an unknown or already revoked token is not an error."""
    async with db.begin() as conn:
        await conn.execute(
            sa.update(t.admin_tokens).where(t.admin_tokens.c.token_hash == token_hash(token)).values(revoked=True)
        )
