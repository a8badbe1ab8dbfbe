"""Second factors: a TOTP secret per account, confirmed with a first code, and ten single-use recovery codes.

Users and administrators enrol the same way; an account is named by ``principal`` (``"user"`` or ``"admin"``)
and ``principal_id`` (its row in ``users`` or ``administrators``).  The life of a second factor:

1. ``start_enrolment`` stores a fresh, *unconfirmed* secret and returns it with the URI an authenticator app
   reads.  Starting again replaces it: a half-finished enrolment does not lock anybody out.
2. ``confirm_enrolment`` checks a first code from the app (so the person really holds the secret), marks the
   secret confirmed and returns ten recovery codes, shown once: only their hashes are kept.
3. ``verify`` (at each login, after the password) accepts a current code or an unused recovery code.
4. ``reset`` (an administrator's action: the caller checks ACLs and audits) or ``forget`` (the account is being
   deleted) remove it all.

Codes cannot be replayed: ``second_factors.last_step`` is the newest 30-second step used, and a code is
accepted only for a later step.  The check and the write are one guarded UPDATE (``… WHERE last_step < :step``),
so two logins racing with the same code cannot both pass; recovery codes are spent the same way
(``… WHERE used_at IS NULL``).  Nothing here logs; no message repeats a secret or a code.

Errors: a wrong code is 401 ``bad_second_factor``, a code already used 401 ``second_factor_replayed``, an
account without a confirmed second factor 401 ``second_factor_not_enrolled`` (at login) or 409 ``no_enrolment``
(when confirming or regenerating), enrolling twice 409 ``second_factor_enrolled``.
"""

from __future__ import annotations

from typing import Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.auth.totp import (
    hash_recovery_code,
    looks_like_totp_code,
    new_recovery_codes,
    new_secret,
    provisioning_uri,
    verify_code,
)
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import utcnow
from deckard.model.errors import BadInput, Conflict, NotFound, Unauthenticated

Principal = Literal["user", "admin"]
USER: Principal = "user"
ADMIN: Principal = "admin"
TOTP = "totp"
RECOVERY = "recovery"
RECOVERY_CODES = 10

sf = t.second_factors
rc = t.recovery_codes

_TYPE_CODE = "open your authenticator app and type the current 6-digit code"


def _check(principal: str) -> None:
    if principal not in (USER, ADMIN):
        raise BadInput(f"unknown principal {principal!r}; choose one of: admin, user", code="bad_principal")


def _second_factor_of(principal: str, principal_id: int) -> sa.ColumnElement[bool]:
    return sa.and_(sf.c.principal == principal, sf.c.principal_id == principal_id)


def _recovery_codes_of(principal: str, principal_id: int) -> sa.ColumnElement[bool]:
    return sa.and_(rc.c.principal == principal, rc.c.principal_id == principal_id)


async def status(db: Database, principal: Principal, principal_id: int) -> dict[str, bool | int]:
    """``{"enrolled": confirmed, "pending": started but not confirmed, "recovery_codes_left": unused codes}``."""
    _check(principal)
    async with db.connect() as conn:
        row = (
            await conn.execute(sa.select(sf.c.confirmed_at).where(_second_factor_of(principal, principal_id)))
        ).first()
        left = (
            await conn.execute(
                sa.select(sa.func.count()).where(_recovery_codes_of(principal, principal_id), rc.c.used_at.is_(None))
            )
        ).scalar_one()
    return {
        "enrolled": row is not None and row.confirmed_at is not None,
        "pending": row is not None and row.confirmed_at is None,
        "recovery_codes_left": int(left),
    }


async def start_enrolment(
    db: Database, principal: Principal, principal_id: int, account: str, issuer: str
) -> dict[str, str]:
    """A fresh unconfirmed secret for the account (replacing an earlier unconfirmed one) → ``{"secret", "uri"}``;
    ``account`` and ``issuer`` are what the authenticator app shows (e.g. ``alice@default``, ``Deckard``).

    404 ``user_not_found``/``admin_not_found`` for an unknown account; 409 ``second_factor_enrolled`` when it
    already has a confirmed second factor."""
    _check(principal)
    secret = new_secret()
    async with db.begin() as conn:
        # the account's row is the lock: concurrent starts for one account take turns instead of racing to insert
        accounts = t.users if principal == USER else t.administrators
        found = (
            await conn.execute(sa.select(accounts.c.id).where(accounts.c.id == principal_id).with_for_update())
        ).first()
        if found is None and principal == USER:
            raise NotFound(f"there is no user with id {principal_id}", code="user_not_found")
        if found is None:
            raise NotFound(f"there is no administrator with id {principal_id}", code="admin_not_found")
        row = (
            await conn.execute(sa.select(sf.c.confirmed_at).where(_second_factor_of(principal, principal_id)))
        ).first()
        if row is not None and row.confirmed_at is not None:
            raise Conflict(
                "this account already has a second factor: reset it first, then enrol again",
                code="second_factor_enrolled",
            )
        await conn.execute(sa.delete(sf).where(_second_factor_of(principal, principal_id)))
        await conn.execute(
            sa.insert(sf).values(
                principal=principal, principal_id=principal_id, secret=secret, created_at=utcnow(), last_step=0
            )
        )
    return {"secret": secret, "uri": provisioning_uri(secret, account, issuer)}


async def confirm_enrolment(
    db: Database, principal: Principal, principal_id: int, code: str, *, now: float | None = None
) -> list[str]:
    """Confirm the pending secret with a first code from the app → ten recovery codes, to show once.

    The code's step is recorded, so the same code cannot log in right after.  Older recovery codes are deleted.
    ``now`` (Unix time) is for tests; the wall clock otherwise.  401 ``bad_second_factor`` for a wrong code;
    409 ``no_enrolment`` when no enrolment was started, ``second_factor_enrolled`` when it is already confirmed."""
    _check(principal)
    async with db.begin() as conn:
        row = (
            await conn.execute(
                sa.select(sf.c.secret, sf.c.confirmed_at).where(_second_factor_of(principal, principal_id))
            )
        ).first()
        if row is None:
            raise Conflict(
                "no second factor is waiting to be confirmed: start the enrolment first", code="no_enrolment"
            )
        if row.confirmed_at is not None:
            raise Conflict(
                "this account already has a second factor: reset it first, then enrol again",
                code="second_factor_enrolled",
            )
        step = verify_code(row.secret, code, last_step=-1, now=now)
        if step is None:
            raise Unauthenticated(
                f"the code is wrong: {_TYPE_CODE} for the account you just added", code="bad_second_factor"
            )
        # guarded by the secret checked above: a concurrent restart of the enrolment wins, this confirm loses
        done = await conn.execute(
            sa.update(sf)
            .where(_second_factor_of(principal, principal_id), sf.c.secret == row.secret, sf.c.confirmed_at.is_(None))
            .values(confirmed_at=utcnow(), last_step=step)
        )
        if done.rowcount != 1:
            raise Conflict(
                "the enrolment was started again meanwhile: add the new secret to your app and confirm it",
                code="no_enrolment",
            )
        return await _replace_recovery_codes(conn, principal, principal_id)


async def verify(db: Database, principal: Principal, principal_id: int, code: str, *, now: float | None = None) -> str:
    """Check a second factor at login → ``"totp"`` or ``"recovery"`` (which kind was used: worth auditing).

    A six-digit code is a TOTP code, anything else a recovery code.  ``now`` (Unix time) is for tests.
    401 ``second_factor_not_enrolled`` when the account has no confirmed second factor, ``second_factor_replayed``
    for a TOTP code (or an older one) already used, ``bad_second_factor`` for a wrong or spent code."""
    _check(principal)
    async with db.begin() as conn:
        row = (
            await conn.execute(
                sa.select(sf.c.secret, sf.c.last_step).where(
                    _second_factor_of(principal, principal_id), sf.c.confirmed_at.is_not(None)
                )
            )
        ).first()
        if row is None:
            raise Unauthenticated(
                "this account has no second factor yet: enrol one first", code="second_factor_not_enrolled"
            )
        if looks_like_totp_code(code):
            await _use_totp_code(conn, principal, principal_id, row.secret, int(row.last_step), code, now)
            return TOTP
        await _use_recovery_code(conn, principal, principal_id, code)
        return RECOVERY


async def _use_totp_code(
    conn: AsyncConnection,
    principal: Principal,
    principal_id: int,
    secret: str,
    last_step: int,
    code: str,
    now: float | None,
) -> None:
    step = verify_code(secret, code, last_step=last_step, now=now)
    if step is None:
        if verify_code(secret, code, last_step=-1, now=now) is not None:  # valid, but its step is used up
            raise Unauthenticated(
                "this code was already used: wait for the next code in your authenticator app and type it",
                code="second_factor_replayed",
            )
        raise Unauthenticated(f"the code is wrong: {_TYPE_CODE}", code="bad_second_factor")
    # the guard is what makes a code single-use when two logins race with it (the loser sees the newer step)
    done = await conn.execute(
        sa.update(sf)
        .where(_second_factor_of(principal, principal_id), sf.c.confirmed_at.is_not(None), sf.c.last_step < step)
        .values(last_step=step)
    )
    if done.rowcount != 1:
        raise Unauthenticated(
            "this code was already used: wait for the next code in your authenticator app and type it",
            code="second_factor_replayed",
        )


async def _use_recovery_code(conn: AsyncConnection, principal: Principal, principal_id: int, code: str) -> None:
    mine = sa.and_(_recovery_codes_of(principal, principal_id), rc.c.code_hash == hash_recovery_code(code))
    done = await conn.execute(sa.update(rc).where(mine, rc.c.used_at.is_(None)).values(used_at=utcnow()))
    if done.rowcount == 1:
        return
    spent = (await conn.execute(sa.select(rc.c.id).where(mine))).first() is not None
    if spent:
        raise Unauthenticated(
            f"this recovery code was already used (each works once): use another one, or {_TYPE_CODE}",
            code="bad_second_factor",
        )
    raise Unauthenticated(
        f"the code is wrong: {_TYPE_CODE}, or type one of your recovery codes", code="bad_second_factor"
    )


async def regenerate_recovery_codes(db: Database, principal: Principal, principal_id: int) -> list[str]:
    """Ten new recovery codes (to show once) in place of the old ones, used or not; 409 ``no_enrolment`` when the
    account has no confirmed second factor."""
    _check(principal)
    async with db.begin() as conn:
        confirmed = (
            await conn.execute(
                sa.select(sf.c.principal).where(
                    _second_factor_of(principal, principal_id), sf.c.confirmed_at.is_not(None)
                )
            )
        ).first()
        if confirmed is None:
            raise Conflict(
                "this account has no second factor, so no recovery codes: enrol one first", code="no_enrolment"
            )
        return await _replace_recovery_codes(conn, principal, principal_id)


async def _replace_recovery_codes(conn: AsyncConnection, principal: Principal, principal_id: int) -> list[str]:
    codes = new_recovery_codes(RECOVERY_CODES)
    await conn.execute(sa.delete(rc).where(_recovery_codes_of(principal, principal_id)))
    await conn.execute(
        sa.insert(rc),
        [{"principal": principal, "principal_id": principal_id, "code_hash": hash_recovery_code(c)} for c in codes],
    )
    return codes


async def reset(db: Database, principal: Principal, principal_id: int) -> None:
    """Remove the account's secret (confirmed or pending) and recovery codes; nothing to remove is no error.
    The caller (an administrator's action) checks ACLs and writes the audit record."""
    _check(principal)
    async with db.begin() as conn:
        await forget(conn, principal, principal_id)


async def forget(conn: AsyncConnection, principal: Principal, principal_id: int) -> None:
    """Delete the account's second factor inside the caller's transaction (the account is being deleted: the
    tables have no foreign key to two parents, so the rows go with the account here)."""
    _check(principal)
    await conn.execute(sa.delete(sf).where(_second_factor_of(principal, principal_id)))
    await conn.execute(sa.delete(rc).where(_recovery_codes_of(principal, principal_id)))
