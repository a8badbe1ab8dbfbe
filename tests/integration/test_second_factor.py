"""Second factors over a real database (SQLite and PostgreSQL): enrol, confirm, log in, recover, reset.

Codes are made by pyotp, as an authenticator app would make them.  Apart from the first test (the wall clock, as
at a real login), the service is given a fixed ``now`` so that a step boundary can never make a test flaky.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pyotp
import pytest
import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import utcnow
from deckard.model.errors import BadInput, Conflict, DeckardError, NotFound, Unauthenticated
from deckard.services import second_factor as sf
from deckard.services import users
from deckard.services.context import SYSTEM
from deckard.services.roles import SUPERTENANT_ID
from deckard.services.tenancy import bootstrap_farm

T = 1_800_000_015.0  # the middle of a 30-second step
STEP = 60_000_000  # T // 30


async def _accounts(db: Database) -> tuple[int, int]:
    """A user and an administrator: their ids."""
    await bootstrap_farm(db)
    user = await users.create_user(db, SYSTEM, "alice", None)
    async with db.connect() as conn:
        admin_id = (
            await conn.execute(sa.select(t.administrators.c.id).where(t.administrators.c.name == "admin"))
        ).scalar_one()
    return int(user["id"]), int(admin_id)


async def _enrolled(db: Database, user_id: int, *, step: int = STEP) -> tuple[pyotp.TOTP, list[str]]:
    """The user enrolled and confirmed with the code of ``step``: the app's generator and the recovery codes."""
    started = await sf.start_enrolment(db, sf.USER, user_id, "alice@default", "Deckard")
    app = pyotp.TOTP(started["secret"])
    codes = await sf.confirm_enrolment(db, sf.USER, user_id, app.generate_otp(step), now=T)
    return app, codes


async def _refused(call: Awaitable[object], code: str, kind: type[DeckardError] = Unauthenticated) -> None:
    with pytest.raises(kind) as e:
        await call
    assert e.value.code == code, e.value.message


async def _rows(db: Database) -> tuple[int, int]:
    async with db.connect() as conn:
        factors = (await conn.execute(sa.select(sa.func.count()).select_from(t.second_factors))).scalar_one()
        codes = (await conn.execute(sa.select(sa.func.count()).select_from(t.recovery_codes))).scalar_one()
    return int(factors), int(codes)


def _wrong_code(app: pyotp.TOTP) -> str:
    """A six-digit code valid for no step near T."""
    near = {app.generate_otp(STEP + i) for i in range(-3, 4)}
    return next(c for c in (f"{n:06d}" for n in range(1_000_000)) if c not in near)


async def test_enrol_confirm_and_log_in_with_the_current_code_of_an_app(db: Database) -> None:
    user_id, _ = await _accounts(db)
    assert await sf.status(db, sf.USER, user_id) == {"enrolled": False, "pending": False, "recovery_codes_left": 0}
    started = await sf.start_enrolment(db, sf.USER, user_id, "alice@default", "Deckard")
    assert started["uri"].startswith("otpauth://totp/Deckard:alice%40default?")
    assert f"secret={started['secret']}" in started["uri"]
    assert await sf.status(db, sf.USER, user_id) == {"enrolled": False, "pending": True, "recovery_codes_left": 0}

    if time.time() % 30 > 29:  # the previous step must still be in the window when the confirm arrives
        await asyncio.sleep(30 - time.time() % 30 + 0.05)
    app = pyotp.TOTP(started["secret"])
    codes = await sf.confirm_enrolment(db, sf.USER, user_id, app.at(time.time() - 30))
    assert len(codes) == 10 and len(set(codes)) == 10
    assert await sf.status(db, sf.USER, user_id) == {"enrolled": True, "pending": False, "recovery_codes_left": 10}
    assert await sf.verify(db, sf.USER, user_id, app.now()) == sf.TOTP
    async with db.connect() as conn:
        stored = (await conn.execute(sa.select(t.recovery_codes.c.code_hash))).scalars().all()
    assert not set(codes) & set(stored)  # only hashes are kept


async def test_the_code_that_confirmed_the_enrolment_cannot_log_in_right_after(db: Database) -> None:
    user_id, _ = await _accounts(db)
    app, _ = await _enrolled(db, user_id, step=STEP)
    await _refused(sf.verify(db, sf.USER, user_id, app.generate_otp(STEP), now=T), "second_factor_replayed")
    assert await sf.verify(db, sf.USER, user_id, app.generate_otp(STEP + 1), now=T) == sf.TOTP


async def test_an_older_code_after_a_newer_one_is_refused_as_a_replay(db: Database) -> None:
    user_id, _ = await _accounts(db)
    app, _ = await _enrolled(db, user_id, step=STEP - 1)
    assert await sf.verify(db, sf.USER, user_id, app.generate_otp(STEP + 1), now=T) == sf.TOTP
    await _refused(sf.verify(db, sf.USER, user_id, app.generate_otp(STEP), now=T), "second_factor_replayed")
    await _refused(sf.verify(db, sf.USER, user_id, app.generate_otp(STEP + 1), now=T), "second_factor_replayed")
    async with db.connect() as conn:
        assert (await conn.execute(sa.select(t.second_factors.c.last_step))).scalar_one() == STEP + 1


async def _race(db: Database, make: Callable[[], Coroutine[Any, Any, str]], n: int = 6) -> list[str | BaseException]:
    """Run ``n`` calls of ``make`` so that all of them have read the account before any may write.

    A transaction holds the write locks while the racers start: on PostgreSQL every racer reads the old
    ``last_step`` (or the unused code) and then queues on the row lock at its UPDATE, which is the race the
    guarded UPDATE must win; SQLite lets one writer in at a time (``BEGIN IMMEDIATE``), so there they queue."""
    async with db.begin() as blocker:
        await blocker.execute(sa.select(t.second_factors.c.principal).with_for_update())
        await blocker.execute(sa.select(t.recovery_codes.c.id).with_for_update())
        racers = [asyncio.create_task(make()) for _ in range(n)]
        await _until_waiting_on_locks(db, n)
    return list(await asyncio.gather(*racers, return_exceptions=True))


async def _until_waiting_on_locks(db: Database, n: int) -> None:
    if db.dialect != "postgresql":
        await asyncio.sleep(0.05)
        return
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    for _ in range(500):
        async with db.connect() as conn:
            if (await conn.execute(query)).scalar_one() >= n:
                return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{n} racers never all waited on the row lock")


async def test_racing_logins_with_one_code_let_exactly_one_in(db: Database) -> None:
    user_id, _ = await _accounts(db)
    app, codes = await _enrolled(db, user_id, step=STEP - 1)
    code = app.generate_otp(STEP)
    results = await _race(db, lambda: sf.verify(db, sf.USER, user_id, code, now=T))
    assert results.count(sf.TOTP) == 1, results
    assert sorted({r.code for r in results if isinstance(r, Unauthenticated)}) == ["second_factor_replayed"]
    assert len(results) == 6 and all(r == sf.TOTP or isinstance(r, Unauthenticated) for r in results)

    results = await _race(db, lambda: sf.verify(db, sf.USER, user_id, codes[0]))
    assert results.count(sf.RECOVERY) == 1, results
    assert sorted({r.code for r in results if isinstance(r, Unauthenticated)}) == ["bad_second_factor"]
    assert len(results) == 6 and all(r == sf.RECOVERY or isinstance(r, Unauthenticated) for r in results)


async def test_a_recovery_code_works_once_however_it_is_typed(db: Database) -> None:
    user_id, _ = await _accounts(db)
    _, codes = await _enrolled(db, user_id)
    assert await sf.verify(db, sf.USER, user_id, codes[0]) == sf.RECOVERY
    await _refused(sf.verify(db, sf.USER, user_id, codes[0]), "bad_second_factor")
    assert await sf.verify(db, sf.USER, user_id, " " + codes[1].upper().replace("-", " ") + " ") == sf.RECOVERY
    assert (await sf.status(db, sf.USER, user_id))["recovery_codes_left"] == 8

    fresh = await sf.regenerate_recovery_codes(db, sf.USER, user_id)
    assert (await sf.status(db, sf.USER, user_id))["recovery_codes_left"] == 10
    await _refused(sf.verify(db, sf.USER, user_id, codes[2]), "bad_second_factor")  # the old set is gone
    assert await sf.verify(db, sf.USER, user_id, fresh[0]) == sf.RECOVERY


async def test_wrong_codes_and_wrong_states_are_refused_with_their_codes(db: Database) -> None:
    user_id, admin_id = await _accounts(db)
    await _refused(sf.verify(db, sf.USER, user_id, "123456", now=T), "second_factor_not_enrolled")
    await _refused(sf.confirm_enrolment(db, sf.USER, user_id, "123456", now=T), "no_enrolment", Conflict)
    await _refused(sf.regenerate_recovery_codes(db, sf.USER, user_id), "no_enrolment", Conflict)

    started = await sf.start_enrolment(db, sf.USER, user_id, "alice@default", "Deckard")
    app = pyotp.TOTP(started["secret"])
    await _refused(sf.verify(db, sf.USER, user_id, app.generate_otp(STEP), now=T), "second_factor_not_enrolled")
    await _refused(sf.confirm_enrolment(db, sf.USER, user_id, _wrong_code(app), now=T), "bad_second_factor")
    assert (await sf.status(db, sf.USER, user_id))["pending"]  # a wrong code leaves the enrolment to retry

    await sf.confirm_enrolment(db, sf.USER, user_id, app.generate_otp(STEP), now=T)
    await _refused(sf.verify(db, sf.USER, user_id, _wrong_code(app), now=T), "bad_second_factor")
    await _refused(sf.verify(db, sf.USER, user_id, "not-a-code", now=T), "bad_second_factor")
    await _refused(sf.verify(db, sf.USER, user_id, "", now=T), "bad_second_factor")
    await _refused(sf.start_enrolment(db, sf.USER, user_id, "a", "D"), "second_factor_enrolled", Conflict)
    await _refused(sf.confirm_enrolment(db, sf.USER, user_id, "123456", now=T), "second_factor_enrolled", Conflict)

    await _refused(sf.start_enrolment(db, sf.USER, 10_000, "a", "D"), "user_not_found", NotFound)
    await _refused(sf.start_enrolment(db, sf.ADMIN, admin_id + 10_000, "a", "D"), "admin_not_found", NotFound)
    await _refused(sf.status(db, "robot", user_id), "bad_principal", BadInput)  # type: ignore[arg-type]
    assert await _rows(db) == (1, 10)


async def test_starting_again_before_confirming_replaces_the_secret(db: Database) -> None:
    user_id, _ = await _accounts(db)
    first = pyotp.TOTP((await sf.start_enrolment(db, sf.USER, user_id, "alice@default", "Deckard"))["secret"])
    second = pyotp.TOTP((await sf.start_enrolment(db, sf.USER, user_id, "alice@default", "Deckard"))["secret"])
    assert first.secret != second.secret
    if first.generate_otp(STEP) != second.generate_otp(STEP):  # one in a million they agree
        await _refused(sf.confirm_enrolment(db, sf.USER, user_id, first.generate_otp(STEP), now=T), "bad_second_factor")
    await sf.confirm_enrolment(db, sf.USER, user_id, second.generate_otp(STEP), now=T)
    assert await _rows(db) == (1, 10)


async def test_reset_removes_the_secret_and_the_recovery_codes_and_allows_a_new_enrolment(db: Database) -> None:
    user_id, _ = await _accounts(db)
    _, codes = await _enrolled(db, user_id)
    await sf.reset(db, sf.USER, user_id)
    assert await _rows(db) == (0, 0)
    assert await sf.status(db, sf.USER, user_id) == {"enrolled": False, "pending": False, "recovery_codes_left": 0}
    await _refused(sf.verify(db, sf.USER, user_id, codes[0]), "second_factor_not_enrolled")
    await sf.reset(db, sf.USER, user_id)  # nothing left to remove: no error
    await _enrolled(db, user_id)
    assert await _rows(db) == (1, 10)


async def test_users_and_administrators_with_the_same_id_are_different_accounts(db: Database) -> None:
    user_id, admin_id = await _accounts(db)
    if admin_id != user_id:  # the same row id in both tables, so only ``principal`` tells them apart
        async with db.begin() as conn:
            await conn.execute(
                sa.insert(t.administrators).values(
                    id=user_id, tenant_id=SUPERTENANT_ID, name="twin", password_hash=None, created_at=utcnow()
                )
            )
    user_app, user_codes = await _enrolled(db, user_id)
    await _refused(
        sf.verify(db, sf.ADMIN, user_id, user_app.generate_otp(STEP + 1), now=T), "second_factor_not_enrolled"
    )
    started = await sf.start_enrolment(db, sf.ADMIN, user_id, "admin@*", "Deckard")
    admin_app = pyotp.TOTP(started["secret"])
    admin_codes = await sf.confirm_enrolment(db, sf.ADMIN, user_id, admin_app.generate_otp(STEP), now=T)
    await _refused(sf.verify(db, sf.ADMIN, user_id, user_codes[0]), "bad_second_factor")
    assert await sf.verify(db, sf.USER, user_id, user_codes[0]) == sf.RECOVERY
    assert await sf.verify(db, sf.ADMIN, user_id, admin_codes[0]) == sf.RECOVERY

    async with db.begin() as conn:  # an account being deleted: its rows go in the same transaction
        await sf.forget(conn, sf.ADMIN, user_id)
    assert await sf.status(db, sf.ADMIN, user_id) == {"enrolled": False, "pending": False, "recovery_codes_left": 0}
    assert (await sf.status(db, sf.USER, user_id))["enrolled"]
    assert await _rows(db) == (1, 10)
