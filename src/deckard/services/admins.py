"""Administrators' credentials: password logins that yield session tokens, long-lived API tokens, and the
lookup that turns a bearer token back into the ``Actor`` every admin service receives.

A password is checked by Deckard (argon2) when the administrator has one; a name without one (unknown, or an
administrator a directory login made) goes to the tenant's directory when its ``auth.chain`` names ``ldap``
(``services/admin_directory.py``: the directory's groups make the administrator and its roles).  An administrator
with a confirmed second factor (TOTP) then gives its code: with the login (``code``), or against the challenge a
login without it answers (401 ``totp_required``, ``details.challenge``), as the portal does for users.

Only the SHA-256 of a token is stored (``admin_tokens.token_hash``): a leaked database does not leak working
tokens, and a 256-bit random secret needs no slow hash.

Repeated failed logins make the guesser wait (``services/lockout.py``): per (account, address) pair, so nobody
can lock an administrator out by knowing their name, and per address across accounts.

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
from deckard.model.errors import BadInput, Conflict, NotFound, PermissionDenied, Unauthenticated
from deckard.services import admin_directory, lockout, second_factor, tickets
from deckard.services.config import read_configs
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
LOCAL = "local"
TIMED_CODES = frozenset({"bad_credentials", "bad_second_factor", "second_factor_replayed"})  # count as failures


def new_token() -> str:
    """A fresh secret; the prefix lets secret scanners and humans recognise a Deckard token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


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
                    a.c.origin,
                    t.tenants.c.name.label("tenant_name"),
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


@dataclass
class LoginAttempt:
    """What one administrator login found out as it went, also when it failed: for its audit record."""

    name: str = ""
    plugin: str = ""  # local | ldap: who checked the password (the second step: the administrator's origin)
    factor: str = ""  # "" | totp | recovery


def _bad_credentials() -> Unauthenticated:
    return Unauthenticated("wrong administrator name, tenant or password", code="bad_credentials")


async def login_admin(
    db: Database,
    name: str,
    password: str,
    tenant: str | None = None,
    hours: float = 12,
    *,
    source: str = "",
    code: str | None = None,
    attempt: LoginAttempt | None = None,
) -> tuple[str, dt.datetime]:
    """Check an administrator's password (and second factor) and open a session → (token, expiry).

    Every wrong password is the same 401 ``bad_credentials`` and takes the same work (an unknown name is checked
    against a decoy hash, also while the directory decides); repeated failures from one address make it wait
    (429 ``login_locked`` with ``details.retry_after_s``), wrong codes included.  A directory administrator: 403
    ``no_admin_role`` (no mapped group), 503 ``auth_unavailable`` (the directory did not answer).  A confirmed
    second factor without ``code``: 401 ``totp_required`` with ``details.challenge`` for
    ``login_admin_challenge``.  ``attempt`` is filled in as the login goes (who checked, which factor)."""
    attempt = attempt if attempt is not None else LoginAttempt()
    attempt.name = name
    keys = lockout.Keys.for_admin(name, tenant, source)
    await lockout.begin_attempt(db, keys)
    try:
        admin_id = await _authenticate(db, name, password, tenant, source, attempt)
        await _check_second_factor(db, admin_id, code, attempt)
    except Unauthenticated as e:
        if e.code in TIMED_CODES:
            await lockout.failed_attempt(db, keys)
        raise
    await lockout.succeeded(db, keys)
    return await open_admin_session(db, admin_id, hours)


async def _authenticate(
    db: Database, name: str, password: str, tenant: str | None, source: str, attempt: LoginAttempt
) -> int:
    row = await _admin_row(db, name, tenant)
    named = bool(name) and len(name) <= 64 and set(name) <= NAME_CHARS
    directory = await admin_directory.ldap_directory(db, tenant, row) if named else None
    if directory is None:
        attempt.plugin = LOCAL
        ok = await verify_password_async(row.password_hash if row else None, password)
        if row is None or not ok or row.blocked or row.tenant_blocked:
            raise _bad_credentials()
        return int(row.id)
    attempt.plugin = admin_directory.LDAP.origin
    blocked = directory.tenant_blocked or bool(row is not None and row.blocked)
    # the decoy keeps a directory login as long as a local one: the time does not tell which names are local
    admin_id, _decoy = await asyncio.gather(
        admin_directory.login_ldap(db, directory, name, password, source=source, blocked=blocked),
        verify_password_async(None, password),
        return_exceptions=True,
    )
    if isinstance(admin_id, BaseException):
        raise admin_id
    return admin_id


async def _check_second_factor(db: Database, admin_id: int, code: str | None, attempt: LoginAttempt) -> None:
    """Nothing to do without a confirmed second factor; else check ``code``, or hand out a challenge."""
    if not (await second_factor.status(db, second_factor.ADMIN, admin_id))["enrolled"]:
        return
    if not code:
        challenge, expires = await tickets.issue_admin_challenge(db, admin_id)
        raise Unauthenticated(
            "type the current 6-digit code of your authenticator app (or a recovery code)",
            code="totp_required",
            details={"challenge": challenge, "expires_at": expires.isoformat()},
        )
    attempt.factor = await second_factor.verify(db, second_factor.ADMIN, admin_id, code)


async def login_admin_challenge(
    db: Database,
    challenge: str,
    code: str,
    hours: float = 12,
    *,
    source: str = "",
    attempt: LoginAttempt | None = None,
) -> tuple[str, dt.datetime]:
    """The second step: the code for a challenge ``login_admin`` handed out → (token, expiry).  A wrong code
    counts like a wrong password; the challenge ends when it succeeds (401 ``challenge_expired`` after)."""
    attempt = attempt if attempt is not None else LoginAttempt()
    admin_id = await tickets.challenge_admin(db, challenge)
    a = t.administrators
    q = (
        sa.select(a.c.name, a.c.origin, a.c.blocked, t.tenants.c.name.label("tenant"), t.tenants.c.blocked.label("tb"))
        .join(t.tenants, t.tenants.c.id == a.c.tenant_id)
        .where(a.c.id == admin_id)
    )
    async with db.connect() as conn:
        row = (await conn.execute(q)).first()
    if row is None or row.blocked or row.tb:
        raise Unauthenticated("this administrator is blocked: ask another administrator", code="admin_blocked")
    attempt.name, attempt.plugin = str(row.name), str(row.origin)
    keys = lockout.Keys.for_admin(attempt.name, str(row.tenant), source)
    await lockout.begin_attempt(db, keys)
    try:
        attempt.factor = await second_factor.verify(db, second_factor.ADMIN, admin_id, code)
    except Unauthenticated as e:
        if e.code in TIMED_CODES:
            await lockout.failed_attempt(db, keys)
        raise
    await tickets.end_challenge(db, challenge)
    # the first step counted its try under the tenant as typed (none, most often): that pair starts afresh too
    for done in (keys, lockout.Keys.for_admin(attempt.name, None, source)):
        await lockout.succeeded(db, done)
    return await open_admin_session(db, admin_id, hours)


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
        await second_factor.forget(conn, "admin", int(row["id"]))
        await conn.execute(sa.delete(t.administrators).where(t.administrators.c.id == row["id"]))
    await publish(db, "deleted", "admin", row["id"], row["tenant_id"])


async def open_admin_session(db: Database, admin_id: int, hours: float) -> tuple[str, dt.datetime]:
    """A session for an administrator another login path (single sign-on, ``services/sso.py``) accepted."""
    expires_at = utcnow() + dt.timedelta(hours=hours)
    return await _store_token(db, admin_id, SESSION, "", expires_at), expires_at


# ---- administrators' second factor ---------------------------------------------------------------------------


def _own_id(actor: Actor) -> int:
    if actor.kind != "admin" or actor.id is None:
        raise PermissionDenied("only an administrator has a second factor of their own here", code="forbidden_action")
    return actor.id


async def own_second_factor(db: Database, actor: Actor) -> dict[str, Any]:
    """The acting administrator's second factor: ``{"enrolled", "pending", "recovery_codes_left"}``."""
    return dict(await second_factor.status(db, second_factor.ADMIN, _own_id(actor)))


async def start_own_enrolment(db: Database, actor: Actor) -> dict[str, str]:
    """A new secret for the acting administrator's authenticator app → ``{"secret", "uri"}`` (the app shows
    ``name@tenant``, or the name alone for the farm's administrators, under the tenant's ``auth.totp.issuer``);
    409 ``second_factor_enrolled`` when one is confirmed already."""
    admin_id = _own_id(actor)
    async with db.connect() as conn:
        q = (
            sa.select(t.administrators.c.name, t.administrators.c.tenant_id, t.tenants.c.name.label("tenant"))
            .join(t.tenants, t.tenants.c.id == t.administrators.c.tenant_id)
            .where(t.administrators.c.id == admin_id)
        )
        row = (await conn.execute(q)).one()
        issuer = (await read_configs(conn, "auth.totp.", int(row.tenant_id)))["auth.totp.issuer"]
    account = str(row.name) if int(row.tenant_id) == SUPERTENANT_ID else f"{row.name}@{row.tenant}"
    return await second_factor.start_enrolment(db, second_factor.ADMIN, admin_id, account, str(issuer))


async def confirm_own_enrolment(db: Database, actor: Actor, code: str) -> list[str]:
    """The app's first code confirms the secret → ten recovery codes, shown once; from now on every login of the
    administrator asks for a code.  401 ``bad_second_factor``; 409 ``no_enrolment``."""
    return await second_factor.confirm_enrolment(db, second_factor.ADMIN, _own_id(actor), code)


async def reset_admin_second_factor(db: Database, actor: Actor, admin_id: int) -> None:
    """Remove another administrator's second factor (a lost phone).  ACL ``admin.update.password``: like a new
    password it replaces a credential.  404 outside the actor's tenant; 409 ``admin_self`` for one's own (a
    stolen session must not switch it off)."""
    async with db.connect() as conn:
        row = await _find_admin(conn, actor, admin_id)
    require(actor, "admin.update.password")
    if int(row["id"]) == actor.id:
        raise Conflict("you cannot reset your own second factor: ask another administrator", code="admin_self")
    await second_factor.reset(db, second_factor.ADMIN, int(row["id"]))
    await publish(db, "updated", "admin", int(row["id"]), int(row["tenant_id"]))
