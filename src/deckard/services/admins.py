"""Administrators' credentials: password logins that yield session tokens, long-lived API tokens, and the
lookup that turns a bearer token back into the ``Actor`` every admin service receives.

Only the SHA-256 of a token is stored (``admin_tokens.token_hash``): a leaked database does not leak working
tokens, and a 256-bit random secret needs no slow hash.

Repeated failed logins slow down the guesser, not the account: failures are counted per (account, address)
pair, and after ``auth.lockout.failures`` of them each further try from that address to that account waits
2, 4, 8 … seconds (at most ``auth.lockout.max_delay_s``); the same account from another address is not
affected, so nobody can lock an administrator out by knowing their name.  An address that fails against many
accounts (``auth.lockout.source_failures``, far above what a NAT full of honest administrators does) is slowed
the same way for every account.  While it waits the answer is 429 ``login_locked`` with ``Retry-After``, and
the password is not even checked.  The counters live in ``login_failures`` (not process memory) because every
API process of a farm must share them and a restart must not hand an attacker a fresh budget; rows are
forgotten ``auth.lockout.window_s`` after their last wait ended, and pruned as failures come in.

Administrator CRUD (gated by ``admin.*`` ACLs, confined to the actor's tenant) is at the end.  QVD bound its
sessions to the client IP and kept them in a cookie; Deckard's tokens are bearer tokens so the CLI, scripts and
the web UI use the same path.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.auth.local import hash_password, verify_password_async
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import aware, utcnow
from deckard.model.errors import BadInput, Conflict, NotFound, Unauthenticated
from deckard.services.config import read_config
from deckard.services.context import Actor, require, visible
from deckard.services.events import publish
from deckard.services.listing import ListQuery, run_list
from deckard.services.roles import (
    SUPERTENANT,
    SUPERTENANT_ID,
    acls_of_admin,
    acls_of_roles,
    check_assignable,
    find_role_ids,
)
from deckard.services.rows import as_dict
from deckard.services.tenancy import DEFAULT_TENANT
from deckard.services.tenant_lookup import resolve_tenant_for_create

TOKEN_PREFIX = "dk_"
SESSION = "session"
API = "api"


def new_token() -> str:
    """A fresh secret; the prefix lets secret scanners and humans recognise a Deckard token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class LoginLocked(Unauthenticated):
    """Too many failed logins from this address: 429, with when the wait ends (``details.locked_until``,
    ``details.retry_after_s``; the API sends ``Retry-After``)."""

    code = "login_locked"
    status = 429


def _lookup_order(tenant: str | None) -> list[str]:
    # without a tenant: the supertenant's administrators first, then the default tenant's (monotenant farms)
    return [tenant] if tenant is not None else [SUPERTENANT, DEFAULT_TENANT]


async def _admin_row(db: Database, name: str, tenant: str | None) -> sa.Row[*tuple[Any, ...]] | None:
    a = t.administrators
    async with db.connect() as conn:
        for tenant_name in _lookup_order(tenant):
            q = (
                sa.select(
                    a.c.id,
                    a.c.tenant_id,
                    a.c.password_hash,
                    a.c.blocked,
                    t.tenants.c.blocked.label("tenant_blocked"),
                )
                .join(t.tenants, t.tenants.c.id == a.c.tenant_id)
                .where(a.c.name == name, t.tenants.c.name == tenant_name)
            )
            row = (await conn.execute(q)).first()
            if row is not None:
                return row
    return None


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


# ---- lockout: back-off per (account, address), and per address across accounts ------------------------------

LOCKOUT_LOCK = 0x6C6F636B  # "lock": serialises the bookkeeping of login tries on PostgreSQL


@dataclass(frozen=True)
class LockoutPolicy:
    failures: int  # per (account, address) before the waits start
    source_failures: int  # per address, all accounts together
    window_s: int  # quiet time after the last wait that forgets the count
    max_delay_s: int


def backoff_s(failures: int, threshold: int, cap: int) -> int:
    """Seconds to wait after ``failures`` failures: none below ``threshold``, then 2, 4, 8 … at most ``cap``."""
    if failures < threshold:
        return 0
    return int(min(cap, 2 ** min(failures - threshold + 1, 30)))


def _lock_keys(name: str, tenant: str | None, source: str) -> tuple[str, str | None]:
    pair = f"pair:{tenant or ''}/{name}@{source}"[:200]
    return pair, (f"source:{source}"[:200] if source else None)


async def _policy(conn: AsyncConnection) -> LockoutPolicy:
    return LockoutPolicy(
        failures=int(await read_config(conn, "auth.lockout.failures", None)),
        source_failures=int(await read_config(conn, "auth.lockout.source_failures", None)),
        window_s=int(await read_config(conn, "auth.lockout.window_s", None)),
        max_delay_s=int(await read_config(conn, "auth.lockout.max_delay_s", None)),
    )


def _locked(until: dt.datetime, now: dt.datetime) -> LoginLocked:
    wait = max(1, int((until - now).total_seconds() + 0.999))
    return LoginLocked(
        f"too many failed logins from this address: try again in {wait} s (the account itself is not locked; "
        "another administrator can check the audit log)",
        details={"locked_until": until.isoformat(), "retry_after_s": wait},
    )


async def _serialise(db: Database, conn: AsyncConnection) -> None:
    if db.dialect == "postgresql":  # SQLite's BEGIN IMMEDIATE already makes writers take turns
        await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(LOCKOUT_LOCK)))


async def _current(conn: AsyncConnection, key: str, now: dt.datetime, policy: LockoutPolicy) -> tuple[int, Any]:
    """(failures, row) for a key; a row whose last wait ended more than the window ago counts as none."""
    lf = t.login_failures
    row = (await conn.execute(sa.select(lf).where(lf.c.key == key))).first()
    if row is None:
        return 0, None
    quiet_since = aware(row.locked_until) or aware(row.first_at) or now
    if quiet_since + dt.timedelta(seconds=policy.window_s) < now:
        return 0, row
    return int(row.failures), row


async def _count(
    conn: AsyncConnection, key: str, now: dt.datetime, threshold: int, policy: LockoutPolicy
) -> dt.datetime | None:
    """One more failure under ``key``; returns when its wait ends (None: no wait yet)."""
    lf = t.login_failures
    failures, row = await _current(conn, key, now, policy)
    failures += 1
    delay = backoff_s(failures, threshold, policy.max_delay_s)
    until = now + dt.timedelta(seconds=delay) if delay else None
    values = {"failures": failures, "first_at": now if failures == 1 else row.first_at, "locked_until": until}
    if row is None:
        await conn.execute(sa.insert(lf).values(key=key, **values))
    else:
        await conn.execute(sa.update(lf).where(lf.c.key == key).values(**values))
    return until


async def _begin_attempt(db: Database, pair: str, source: str | None) -> None:
    """Refuse (429) while the pair or the address waits; otherwise count this try against the pair *before*
    the password is checked, so parallel guesses cannot all slip in before the first failure is written."""
    lf = t.login_failures
    now = utcnow()
    keys = [k for k in (pair, source) if k]
    async with db.begin() as conn:
        await _serialise(db, conn)
        policy = await _policy(conn)
        rows = (await conn.execute(sa.select(lf.c.locked_until).where(lf.c.key.in_(keys)))).all()
        until = max((u for u in (aware(r.locked_until) for r in rows) if u is not None), default=None)
        if until is not None and until > now:
            raise _locked(until, now)
        await _count(conn, pair, now, policy.failures, policy)
        # rows nobody has failed under for a window (and whose wait is over) are forgotten: the table stays small
        horizon = now - dt.timedelta(seconds=policy.window_s + policy.max_delay_s)
        await conn.execute(sa.delete(lf).where(sa.func.coalesce(lf.c.locked_until, lf.c.first_at) < horizon))


async def _failed_attempt(db: Database, pair: str, source: str | None) -> dt.datetime | None:
    """The password was wrong: count it against the address too; returns when the pair's wait ends, if it has one."""
    lf = t.login_failures
    now = utcnow()
    async with db.begin() as conn:
        await _serialise(db, conn)
        policy = await _policy(conn)
        if source is not None:
            await _count(conn, source, now, policy.source_failures, policy)
        rows = (await conn.execute(sa.select(lf.c.locked_until).where(lf.c.key.in_([pair, source or pair])))).all()
    return max((u for u in (aware(r.locked_until) for r in rows) if u is not None and u > now), default=None)


async def _clear_pair(db: Database, pair: str) -> None:
    async with db.begin() as conn:
        await conn.execute(sa.delete(t.login_failures).where(t.login_failures.c.key == pair))


async def login_admin(
    db: Database,
    name: str,
    password: str,
    tenant: str | None = None,
    hours: float = 12,
    *,
    source: str = "",
) -> tuple[str, dt.datetime]:
    """Check an administrator's password and open a session.  Every failure is the same 401 and takes the same
    time (an unknown name is checked against a decoy hash); repeated failures from one address make it wait
    (429 ``login_locked`` with ``details.retry_after_s``), see the module docstring."""
    pair, src = _lock_keys(name, tenant, source)
    await _begin_attempt(db, pair, src)
    row = await _admin_row(db, name, tenant)
    ok = await verify_password_async(row.password_hash if row else None, password)
    if row is None or not ok or row.blocked or row.tenant_blocked:
        until = await _failed_attempt(db, pair, src)
        if until is not None:
            raise _locked(until, utcnow())
        raise Unauthenticated("wrong administrator name, tenant or password", code="bad_credentials")
    await _clear_pair(db, pair)
    expires_at = utcnow() + dt.timedelta(hours=hours)
    token = await _store_token(db, int(row.id), SESSION, "", expires_at)
    return token, expires_at


async def create_api_token(db: Database, admin_name: str, token_name: str, tenant: str | None = None) -> str:
    """A token that does not expire (until revoked), for scripts and the CLI profile ``deckard up`` writes."""
    row = await _admin_row(db, admin_name, tenant)
    if row is None:
        raise NotFound(f"no administrator {admin_name!r} in tenant {tenant!r}", code="admin_not_found")
    return await _store_token(db, int(row.id), API, token_name, None)


async def actor_for_token(db: Database, token: str) -> Actor:
    """The administrator a bearer token stands for, with the ACLs of their roles (``services/roles.py``);
    401 ``bad_token`` or ``session_expired`` otherwise.  Supertenant administrators act on every tenant
    (``tenant_id`` None), all others on their own tenant only."""
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
        acls = await acls_of_admin(conn, int(row.id), int(row.tenant_id))
    tenant_id = None if int(row.tenant_id) == SUPERTENANT_ID else int(row.tenant_id)
    return Actor("admin", int(row.id), tenant_id, str(row.name), acls)


async def revoke_token(db: Database, token: str) -> None:
    """Revoke a token (logout); revoking an unknown or already revoked token is not an error."""
    async with db.begin() as conn:
        await conn.execute(
            sa.update(t.admin_tokens).where(t.admin_tokens.c.token_hash == token_hash(token)).values(revoked=True)
        )


# ---- administrators CRUD ------------------------------------------------------------------------------------

ADMIN_COLUMNS: dict[str, sa.ColumnElement[Any]] = {
    "id": t.administrators.c.id,
    "tenant_id": t.administrators.c.tenant_id,
    "name": t.administrators.c.name,
    "blocked": t.administrators.c.blocked,
    "created_at": t.administrators.c.created_at,
}
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789._-")


def _admins_visible(actor: Actor) -> sa.ColumnElement[bool]:
    return sa.true() if actor.all_tenants else t.administrators.c.tenant_id == actor.tenant_id


async def _with_roles(conn: AsyncConnection, actor: Actor, row: dict[str, Any]) -> dict[str, Any]:
    q = (
        sa.select(t.roles.c.name)
        .join(t.admin_roles, t.admin_roles.c.role_id == t.roles.c.id)
        .where(t.admin_roles.c.admin_id == row["id"])
        .order_by(t.roles.c.name)
    )
    out = dict(row)
    out["roles"] = [str(r.name) for r in await conn.execute(q)]
    return visible(actor, "admin", out)


async def _find_admin(conn: AsyncConnection, actor: Actor, ref: str | int) -> dict[str, Any]:
    ref_s = str(ref)
    cond = t.administrators.c.id == int(ref_s) if ref_s.isdigit() else t.administrators.c.name == ref_s
    q = sa.select(*(c.label(k) for k, c in ADMIN_COLUMNS.items())).where(cond, _admins_visible(actor))
    row = (await conn.execute(q.order_by(t.administrators.c.id).limit(1))).first()
    if not row:
        raise NotFound(f"no administrator {ref!r}", code="admin_not_found")
    return as_dict(row)


async def list_admins(db: Database, actor: Actor, q: ListQuery) -> tuple[list[dict[str, Any]], int]:
    require(actor, "admin.see")
    async with db.connect() as conn:
        select = sa.select(*(c.label(k) for k, c in ADMIN_COLUMNS.items())).where(_admins_visible(actor))
        rows, total = await run_list(conn, select, q, ADMIN_COLUMNS, t.administrators.c.id)
        return [await _with_roles(conn, actor, r) for r in rows], total


async def get_admin(db: Database, actor: Actor, ref: str | int) -> dict[str, Any]:
    async with db.connect() as conn:
        row = await _find_admin(conn, actor, ref)
        require(actor, "admin.see")
        return await _with_roles(conn, actor, row)


async def _assign_roles(conn: AsyncConnection, actor: Actor, admin_id: int, tenant_id: int, roles: list[str]) -> None:
    role_ids = await find_role_ids(conn, actor, roles)
    rq = sa.select(t.roles.c.id, t.roles.c.name, t.roles.c.tenant_id, t.roles.c.fixed).where(t.roles.c.id.in_(role_ids))
    for r in await conn.execute(rq):
        if int(r.tenant_id) != tenant_id and not (int(r.tenant_id) == SUPERTENANT_ID and r.fixed):
            raise BadInput(f"role {r.name!r} belongs to another tenant than the administrator", code="bad_role")
    check_assignable(actor, await acls_of_roles(conn, role_ids, supertenant=tenant_id == SUPERTENANT_ID))
    await conn.execute(sa.delete(t.admin_roles).where(t.admin_roles.c.admin_id == admin_id))
    if role_ids:
        await conn.execute(
            sa.insert(t.admin_roles), [{"admin_id": admin_id, "role_id": r} for r in dict.fromkeys(role_ids)]
        )


def _check_password(password: str) -> None:
    if len(password) < 8:
        raise BadInput("the password is too short: use at least 8 characters", code="weak_password")


async def create_admin(
    db: Database,
    actor: Actor,
    name: str,
    password: str,
    *,
    tenant: str | None = None,
    roles: list[str] | None = None,
) -> dict[str, Any]:
    require(actor, "admin.create")
    if roles:
        require(actor, "admin.update.roles")
    if not name or len(name) > 64 or not set(name) <= NAME_CHARS:
        raise BadInput(
            f"invalid administrator name {name!r}: use lowercase letters, digits, '.', '_' or '-'", code="bad_name"
        )
    _check_password(password)
    pw_hash = await asyncio.to_thread(hash_password, password)
    async with db.begin() as conn:
        tenant_id = await resolve_tenant_for_create(conn, actor, tenant)
        a = t.administrators
        if (await conn.execute(sa.select(a.c.id).where(a.c.tenant_id == tenant_id, a.c.name == name))).first():
            raise Conflict(f"an administrator named {name!r} already exists", code="duplicate")
        res = await conn.execute(
            sa.insert(a)
            .values(tenant_id=tenant_id, name=name, password_hash=pw_hash, created_at=utcnow())
            .returning(a.c.id)
        )
        admin_id = int(res.scalar_one())
        await _assign_roles(conn, actor, admin_id, tenant_id, roles or [])
        out = await _with_roles(conn, actor, await _find_admin(conn, actor, admin_id))
    await publish(db, "created", "admin", admin_id, tenant_id)
    return out


async def update_admin(
    db: Database,
    actor: Actor,
    ref: str | int,
    *,
    password: str | None = None,
    blocked: bool | None = None,
    roles: list[str] | None = None,
) -> dict[str, Any]:
    """Change an administrator's password (``admin.update.password``, or one's own), blocked flag
    (``admin.update``) or roles (``admin.update.roles``; the list replaces the old one)."""
    async with db.connect() as conn:
        row = await _find_admin(conn, actor, ref)
    admin_id, tenant_id = int(row["id"]), int(row["tenant_id"])
    values: dict[str, Any] = {}
    if password is not None:
        if admin_id != actor.id:
            require(actor, "admin.update.password")
        _check_password(password)
        values["password_hash"] = await asyncio.to_thread(hash_password, password)
    if blocked is not None:
        require(actor, "admin.update")
        if admin_id == actor.id and blocked:
            raise Conflict("you cannot block yourself", code="admin_self")
        values["blocked"] = blocked
    if roles is not None:
        require(actor, "admin.update.roles")
        if admin_id == actor.id:
            raise Conflict("you cannot change your own roles: ask another administrator", code="admin_self")
    async with db.begin() as conn:
        if values:
            await conn.execute(sa.update(t.administrators).where(t.administrators.c.id == admin_id).values(**values))
        if roles is not None:
            await _assign_roles(conn, actor, admin_id, tenant_id, roles)
        if password is not None or blocked:
            # a new password or a block ends the administrator's open sessions
            await conn.execute(
                sa.update(t.admin_tokens)
                .where(t.admin_tokens.c.admin_id == admin_id, t.admin_tokens.c.kind == SESSION)
                .values(revoked=True)
            )
        out = await _with_roles(conn, actor, await _find_admin(conn, actor, admin_id))
    await publish(db, "updated", "admin", admin_id, tenant_id)
    return out


async def delete_admin(db: Database, actor: Actor, ref: str | int) -> None:
    async with db.begin() as conn:
        row = await _find_admin(conn, actor, ref)
        require(actor, "admin.delete")
        if row["id"] == actor.id:
            raise Conflict("you cannot delete yourself: ask another administrator", code="admin_self")
        await conn.execute(sa.delete(t.administrators).where(t.administrators.c.id == row["id"]))
    await publish(db, "deleted", "admin", row["id"], row["tenant_id"])
