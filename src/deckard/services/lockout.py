"""Failed logins slow the guesser down, and lock a user account that is being guessed at.

Three counters live in ``login_failures`` (not process memory: every broker and API process of a farm shares them,
and a restart must not hand an attacker a fresh budget):

- **pair** (account, address): after ``auth.lockout.failures`` failures each further try from that address to that
  account waits 2, 4, 8 … seconds (at most ``auth.lockout.max_delay_s``).  The same account from another address is
  not affected, so nobody can lock an administrator out by knowing their name.
- **source** (address, all accounts): slowed the same way after ``auth.lockout.source_failures`` failures — far
  above what a NAT full of honest people produces.
- **account** (users only, any address): after ``auth.lockout.account_failures`` failures within the window the
  account is locked for ``auth.lockout.account_lock_s``; the person is told until when, and an administrator can
  clear it.  Failures are counted for any name, known or not, so a lock tells nothing about which names exist.

While one waits the answer is 429 ``login_locked`` (``Retry-After``) or 403 ``account_locked``, and the password is
not even checked.  A try counts against the pair *before* the password is checked, so parallel guesses cannot all
slip in before the first failure is written.  Rows are forgotten ``auth.lockout.window_s`` after their last wait
ended, and pruned as failures come in.  Administrators list and clear the current bans (``list_bans``,
``clear_ban``): a tenant's administrators see their tenant's accounts, the farm's see addresses too.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database, prepared
from deckard.model.entities import aware, utcnow
from deckard.model.errors import NotFound, PermissionDenied, Unauthenticated
from deckard.services.config import read_configs
from deckard.services.context import Actor, require

LOCKOUT_LOCK = 0x6C6F636B  # "lock": serialises the bookkeeping of login tries on PostgreSQL
KEY_LEN = 200


class LoginLocked(Unauthenticated):
    """Too many failed logins from this address: 429, with when the wait ends (``details.locked_until``,
    ``details.retry_after_s``; the API sends ``Retry-After``)."""

    code = "login_locked"
    status = 429


class AccountLocked(PermissionDenied):
    """Too many failed logins to this account: 403 until ``details.locked_until``."""

    code = "account_locked"


@dataclass(frozen=True)
class Keys:
    """The counters one login try touches."""

    pair: str
    source: str | None
    account: str | None = None  # users only
    tenant_id: int | None = None  # whose account policy applies
    # count the try before the password is checked (administrators: parallel guesses cannot all slip in before the
    # first failure is written); users' logins only read here and count failures after, to keep the busy login
    # path to one write — parallel guesses are then bounded by the broker's connections per address
    count_first: bool = False

    @classmethod
    def for_user(cls, login: str, tenant: str, tenant_id: int | None, source: str) -> Keys:
        return cls(
            f"user:{tenant}/{login}@{source}"[:KEY_LEN],
            f"source:{source}"[:KEY_LEN] if source else None,
            f"account:{tenant}/{login}"[:KEY_LEN],
            tenant_id,
        )

    @classmethod
    def for_admin(cls, name: str, tenant: str | None, source: str) -> Keys:
        source_key = f"source:{source}"[:KEY_LEN] if source else None
        return cls(f"pair:{tenant or ''}/{name}@{source}"[:KEY_LEN], source_key, count_first=True)


@dataclass(frozen=True)
class Policy:
    failures: int  # per (account, address) before the waits start
    source_failures: int  # per address, all accounts together
    window_s: int  # quiet time after the last wait that forgets the count
    max_delay_s: int
    account_failures: int
    account_lock_s: int


def backoff_s(failures: int, threshold: int, cap: int) -> int:
    """Seconds to wait after ``failures`` failures: none below ``threshold``, then 2, 4, 8 … at most ``cap``."""
    if failures < threshold:
        return 0
    return int(min(cap, 2 ** min(failures - threshold + 1, 30)))


async def _policy(conn: AsyncConnection, tenant_id: int | None) -> Policy:
    values = await read_configs(conn, "auth.lockout.", tenant_id)
    return Policy(**{name: int(values[f"auth.lockout.{name}"]) for name in Policy.__dataclass_fields__})


def locked(until: dt.datetime, now: dt.datetime) -> LoginLocked:
    wait = max(1, int((until - now).total_seconds() + 0.999))
    return LoginLocked(
        f"too many failed logins from this address: try again in {wait} s (the account itself is not locked)",
        details={"locked_until": until.isoformat(), "retry_after_s": wait},
    )


def account_locked(until: dt.datetime) -> AccountLocked:
    return AccountLocked(
        f"this account is locked after too many failed logins until {until.isoformat(timespec='seconds')}: "
        "wait, or ask your administrator to clear it",
        details={"locked_until": until.isoformat()},
    )


async def _serialise(db: Database, conn: AsyncConnection) -> None:
    if db.dialect == "postgresql":  # SQLite's BEGIN IMMEDIATE already makes writers take turns
        await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(LOCKOUT_LOCK)))


async def _current(conn: AsyncConnection, key: str, now: dt.datetime, policy: Policy) -> tuple[int, Any]:
    """(failures, row) for a key; a row whose last wait ended more than the window ago counts as none."""
    lf = t.login_failures
    row = (await conn.execute(sa.select(lf).where(lf.c.key == key))).first()
    if row is None:
        return 0, None
    quiet_since = aware(row.locked_until) or aware(row.first_at) or now
    if quiet_since + dt.timedelta(seconds=policy.window_s) < now:
        return 0, row
    return int(row.failures), row


async def _count(conn: AsyncConnection, key: str, now: dt.datetime, policy: Policy, wait_s: Any) -> dt.datetime | None:
    """One more failure under ``key``; ``wait_s(failures)`` says how long it must wait (0: not yet); returns
    when that wait ends (None: no wait)."""
    lf = t.login_failures
    failures, row = await _current(conn, key, now, policy)
    failures += 1
    delay = wait_s(failures)
    until = now + dt.timedelta(seconds=delay) if delay else None
    values = {"failures": failures, "first_at": now if failures == 1 else row.first_at, "locked_until": until}
    if row is None:
        await conn.execute(sa.insert(lf).values(key=key, **values))
    else:
        await conn.execute(sa.update(lf).where(lf.c.key == key).values(**values))
    return until


async def _waits_until(conn: AsyncConnection, keys: list[str], now: dt.datetime) -> dict[str, dt.datetime]:
    lf = t.login_failures
    rows = (await conn.execute(sa.select(lf.c.key, lf.c.locked_until).where(lf.c.key.in_(keys)))).all()
    return {str(r.key): u for r in rows if (u := aware(r.locked_until)) is not None and u > now}


def _refuse_waits(keys: Keys, waits: dict[str, dt.datetime], now: dt.datetime) -> None:
    if keys.account in waits:
        raise account_locked(waits[keys.account])
    if waits:
        raise locked(max(waits.values()), now)


# waits this process has already seen, so a flood from a waiting address is refused without a database read:
# remembered at most REMEMBER_S (the database stays the truth: a ban an administrator clears ends here soon too)
REMEMBER_S = 5.0
_seen_waits: dict[tuple[str, str], dt.datetime] = {}  # (database, key) → until


def _remember(db: Database, waits: dict[str, dt.datetime], now: dt.datetime) -> None:
    if len(_seen_waits) > 10_000:  # bounded: an attacker with many addresses cannot grow it without limit
        _seen_waits.clear()
    horizon = now + dt.timedelta(seconds=REMEMBER_S)
    _seen_waits.update({(db.url, k): min(u, horizon) for k, u in waits.items()})


def precheck(db: Database, keys: Keys) -> None:
    """Refuse from memory, before taking a database connection, whoever this process already saw waiting: a
    flood from a waiting address must not queue honest logins behind it for the connection pool."""
    now = utcnow()
    watched = [k for k in (keys.pair, keys.source, keys.account) if k]
    _refuse_waits(keys, {k: u for k in watched if (u := _seen_waits.get((db.url, k))) is not None and u > now}, now)


# built once: every login reads it (services/config.py says why)
_WATCHED = prepared(
    sa.select(t.login_failures.c.key, t.login_failures.c.locked_until).where(
        t.login_failures.c.key.in_(sa.bindparam("keys", expanding=True))
    )
)


async def check(db: Database, conn: AsyncConnection, keys: Keys) -> frozenset[str]:
    """``begin_attempt`` for a login that counts failures after (``count_first`` False), inside a connection the
    caller already holds: refuses while anything waits; returns which of the login's counters (``"pair"``,
    ``"source"``, ``"account"``) hold failures (those of the pair and account a success must clear:
    ``succeeded``)."""
    assert not keys.count_first
    now = utcnow()
    watched = [k for k in (keys.pair, keys.source, keys.account) if k]
    rows = (await conn.execute(_WATCHED, {"keys": watched})).all()
    waits = {str(r.key): u for r in rows if (u := aware(r.locked_until)) is not None and u > now}
    _remember(db, waits, now)
    _refuse_waits(keys, waits, now)
    counted = {str(r.key) for r in rows}
    return frozenset(kind for kind in ("pair", "source", "account") if getattr(keys, kind) in counted)


async def begin_attempt(db: Database, keys: Keys) -> None:
    """Refuse while the account is locked (403) or the pair or address waits (429); with ``count_first``, count
    this try against the pair before the password is checked."""
    if not keys.count_first:
        async with db.connect() as conn:
            await check(db, conn, keys)
        return
    now = utcnow()
    watched = [k for k in (keys.pair, keys.source, keys.account) if k]
    async with db.begin() as conn:
        await _serialise(db, conn)
        policy = await _policy(conn, keys.tenant_id)
        _refuse_waits(keys, await _waits_until(conn, watched, now), now)
        await _count(conn, keys.pair, now, policy, lambda n: backoff_s(n, policy.failures, policy.max_delay_s))


async def failed_attempt(db: Database, keys: Keys) -> None:
    """The login failed: count it against the address and the account too; raises the wait it now has, if any."""
    now = utcnow()
    async with db.begin() as conn:
        await _serialise(db, conn)
        policy = await _policy(conn, keys.tenant_id)
        if not keys.count_first:
            await _count(conn, keys.pair, now, policy, lambda n: backoff_s(n, policy.failures, policy.max_delay_s))
        if keys.source is not None:
            await _count(
                conn, keys.source, now, policy, lambda n: backoff_s(n, policy.source_failures, policy.max_delay_s)
            )
        if keys.account is not None:
            lock_s = policy.account_lock_s
            await _count(conn, keys.account, now, policy, lambda n: lock_s if n >= policy.account_failures else 0)
        waits = await _waits_until(conn, [k for k in (keys.pair, keys.source, keys.account) if k], now)
        # rows nobody has failed under for a window (and whose wait is over) are forgotten as failures come in,
        # users' and administrators' alike: the table stays small
        horizon = now - dt.timedelta(seconds=policy.window_s + max(policy.max_delay_s, policy.account_lock_s))
        lf = t.login_failures
        await conn.execute(sa.delete(lf).where(sa.func.coalesce(lf.c.locked_until, lf.c.first_at) < horizon))
        _remember(db, waits, now)
    _refuse_waits(keys, waits, now)


async def succeeded(db: Database, keys: Keys) -> None:
    """The right password: the pair and the account start afresh (the address keeps its count)."""
    mine = [k for k in (keys.pair, keys.account) if k]
    async with db.begin() as conn:
        await conn.execute(sa.delete(t.login_failures).where(t.login_failures.c.key.in_(mine)))


# ---- what administrators see and clear -----------------------------------------------------------------------


def _tenant_of(key: str) -> str | None:
    """The tenant name a counter belongs to (None: an address, which belongs to the farm)."""
    kind, _, rest = key.partition(":")
    return rest.split("/", 1)[0] if kind in ("user", "account", "pair") and "/" in rest else None


async def _visible(conn: AsyncConnection, actor: Actor, key: str) -> bool:
    if actor.all_tenants:
        return True
    tenant = _tenant_of(key)
    if tenant is None:
        return False
    name = (await conn.execute(sa.select(t.tenants.c.name).where(t.tenants.c.id == actor.tenant_id))).scalar()
    return bool(name == tenant)


async def list_bans(db: Database, actor: Actor) -> list[dict[str, Any]]:
    """Counters that make someone wait now: ``{"key", "kind", "failures", "locked_until"}``, newest wait first."""
    require(actor, "user.see")
    lf = t.login_failures
    now = utcnow()
    async with db.connect() as conn:
        rows = (
            await conn.execute(sa.select(lf).where(lf.c.locked_until > now).order_by(lf.c.locked_until.desc()))
        ).all()
        out = []
        for r in rows:
            if await _visible(conn, actor, str(r.key)):
                out.append(
                    {
                        "key": str(r.key),
                        "kind": str(r.key).partition(":")[0],
                        "failures": int(r.failures),
                        "locked_until": aware(r.locked_until),
                    }
                )
    return out


async def clear_ban(db: Database, actor: Actor, key: str) -> None:
    """Forget a counter (the account or address may log in at once); 404 ``ban_not_found`` if there is none the
    actor may see."""
    require(actor, "user.update")
    async with db.begin() as conn:
        if not await _visible(conn, actor, key):
            raise NotFound(f"no ban {key[:80]!r}", code="ban_not_found")
        res = await conn.execute(sa.delete(t.login_failures).where(t.login_failures.c.key == key))
        _seen_waits.pop((db.url, key), None)
    if not res.rowcount:
        raise NotFound(f"no ban {key[:80]!r}", code="ban_not_found")
