"""The login chain (``services/identity.py``) on SQLite and PostgreSQL: local passwords, failure floor, account lock
and bans, login rules, personal tokens, second factor, audit records."""

from __future__ import annotations

import datetime as dt
import time

import pyotp
import pytest
import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.errors import DeckardError
from deckard.services import config, identity, lockout, personal_tokens, second_factor, users
from deckard.services.context import SYSTEM, Actor
from deckard.services.tenancy import bootstrap_farm


async def _farm(db: Database, floor_ms: int = 0) -> dict[str, object]:
    await bootstrap_farm(db)
    alice = await users.create_user(db, SYSTEM, "alice", "pw-alice")
    await config.set_config(db, SYSTEM, "auth.failure_floor_ms", floor_ms)
    await config.set_config(db, SYSTEM, "auth.lockout.refusal_delay_ms", 0)
    return alice


async def _refused(coro: object) -> DeckardError:
    with pytest.raises(DeckardError) as info:
        await coro  # type: ignore[misc]
    return info.value


async def _logins(db: Database) -> list[sa.Row[object]]:
    log = t.audit_log
    async with db.connect() as conn:
        q = sa.select(log).where(log.c.action == "user.login").order_by(log.c.id)
        return list((await conn.execute(q)).all())


async def test_a_local_login_is_decided_by_the_local_plugin_and_audited(db: Database) -> None:
    await _farm(db)
    result = await identity.login_password(db, "alice", "pw-alice", source="10.1.2.3", via="portal")
    assert (result.user.login, result.plugin, result.factor) == ("alice", "local", "")
    for login in ("alice", "nobody", "alice@no-such-tenant"):
        e = await _refused(identity.login_password(db, login, "wrong", source="10.1.2.3"))
        assert (e.status, e.code) == (401, "bad_credentials")
    ok, *failed = await _logins(db)
    assert (ok.result, ok.source, ok.admin_name) == ("ok", "10.1.2.3", "user:alice")
    assert '"plugin":"local"' in ok.arguments.replace(" ", "") and '"via":"portal"' in ok.arguments.replace(" ", "")
    assert [(r.result, r.error_code) for r in failed] == [("failed", "bad_credentials")] * 3
    assert "wrong" not in " ".join(r.arguments for r in failed), "no password in the audit log"


async def test_every_failure_takes_the_floor_whether_or_not_the_name_exists(db: Database) -> None:
    await _farm(db, floor_ms=300)
    for login in ("alice", "nobody"):
        started = time.monotonic()
        await _refused(identity.login_password(db, login, "wrong"))
        assert time.monotonic() - started >= 0.29


async def test_an_account_guessed_at_is_locked_until_an_administrator_clears_it(db: Database) -> None:
    await _farm(db)
    await config.set_config(db, SYSTEM, "auth.lockout.account_failures", 3)
    for i in range(3):  # from three addresses: the per-address back-off never starts
        await _refused(identity.login_password(db, "alice", "wrong", source=f"10.0.0.{i}"))
    e = await _refused(identity.login_password(db, "alice", "pw-alice", source="10.9.9.9"))
    assert (e.status, e.code) == (403, "account_locked") and "locked_until" in e.details
    bans = await lockout.list_bans(db, SYSTEM)
    assert [b["key"] for b in bans] == ["account:default/alice"]
    stranger = Actor("admin", 99, 12345, "other-tenant-admin")  # confined to another tenant, all ACLs
    assert await lockout.list_bans(db, stranger) == []
    await lockout.clear_ban(db, SYSTEM, "account:default/alice")
    assert (await identity.login_password(db, "alice", "pw-alice", source="10.9.9.9")).user.login == "alice"


async def test_login_rules_refuse_other_networks_and_hours_and_a_user_rule_replaces_the_tenant_rule(
    db: Database,
) -> None:
    alice = await _farm(db)
    await config.set_config(db, SYSTEM, "auth.rules.networks", "10.0.0.0/8")
    e = await _refused(identity.login_password(db, "alice", "pw-alice", source="192.168.1.5"))
    assert (e.status, e.code) == (403, "login_network_refused")
    assert (await identity.login_password(db, "alice", "pw-alice", source="10.20.30.40")).user.login == "alice"
    with pytest.raises(DeckardError) as bad_rule:
        await users.update_user(db, SYSTEM, int(alice["id"]), allowed_networks="192.168.0.0/33")  # type: ignore[call-overload]
    assert bad_rule.value.code == "bad_login_rule"
    await users.update_user(db, SYSTEM, int(alice["id"]), allowed_networks="192.168.0.0/16")  # type: ignore[call-overload]
    assert (await identity.login_password(db, "alice", "pw-alice", source="192.168.1.5")).user.login == "alice"
    now = dt.datetime.now(dt.UTC)
    closed = (now + dt.timedelta(days=2)).strftime("%a") + " 00:00-00:01"  # a minute on another day
    await config.set_config(db, SYSTEM, "auth.rules.hours", closed)
    e = await _refused(identity.login_password(db, "alice", "pw-alice", source="192.168.1.5"))
    assert (e.status, e.code) == (403, "login_hours_refused")
    with pytest.raises(DeckardError) as bad:
        await config.set_config(db, SYSTEM, "auth.rules.hours", "Mon-Fri 9-17")
    assert bad.value.code == "bad_login_rule"


async def test_personal_tokens_log_in_until_revoked_or_expired(db: Database) -> None:
    await _farm(db)
    user = (await identity.login_password(db, "alice", "pw-alice")).user
    token, row = await personal_tokens.create_token(db, user, "laptop", days=7)
    assert token.startswith("dku_") and row["name"] == "laptop"
    assert (await identity.login_token(db, token, source="10.0.0.1")).plugin == "token"
    assert (await personal_tokens.list_tokens(db, user.id))[0]["last_used_at"] is not None
    e = await _refused(personal_tokens.create_token(db, user, "laptop"))
    assert e.code == "duplicate"
    e = await _refused(personal_tokens.create_token(db, user, "long", days=10_000))
    assert e.code == "bad_token_lifetime"
    await personal_tokens.revoke_token(db, user.id, row["id"])
    assert (await _refused(identity.login_token(db, token))).code == "bad_token"
    token2, row2 = await personal_tokens.create_token(db, user, "ci")
    async with db.begin() as conn:
        past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        await conn.execute(sa.update(t.user_tokens).where(t.user_tokens.c.id == row2["id"]).values(expires_at=past))
    assert (await _refused(identity.login_token(db, token2))).code == "token_expired"
    assert (await _refused(identity.login_token(db, "dku_forged"))).code == "bad_token"


async def test_a_second_factor_is_asked_for_checked_and_never_replayed(db: Database) -> None:
    await _farm(db)
    user = (await identity.login_password(db, "alice", "pw-alice")).user
    enrol = await second_factor.start_enrolment(db, "user", user.id, "alice@default", "Deckard")
    totp = pyotp.TOTP(enrol["secret"])
    await second_factor.confirm_enrolment(db, "user", user.id, totp.at(time.time() - 30))
    e = await _refused(identity.login_password(db, "alice", "pw-alice", via="portal"))
    assert (e.status, e.code) == (401, "totp_required")
    challenge = e.details["challenge"]
    wrong = await _refused(identity.login_challenge(db, challenge, "000000" if totp.now() != "000000" else "111111"))
    assert wrong.code == "bad_second_factor"
    result = await identity.login_challenge(db, challenge, totp.now())
    assert (result.user.id, result.factor) == (user.id, "totp")
    assert (await _refused(identity.login_challenge(db, challenge, totp.now()))).code == "challenge_expired"
    replay = await _refused(identity.login_password(db, "alice", "pw-alice", factors={"totp": totp.now()}))
    assert replay.code == "second_factor_replayed"


async def test_a_tenant_that_requires_a_second_factor_sends_users_to_enrol(db: Database) -> None:
    await _farm(db)
    await config.set_config(db, SYSTEM, "auth.totp.required", True)
    e = await _refused(identity.login_password(db, "alice", "pw-alice"))
    assert (e.status, e.code) == (401, "totp_enrolment_required") and e.details["challenge"]


async def test_a_blocked_user_cannot_log_in_with_a_password_or_a_token(db: Database) -> None:
    alice = await _farm(db)
    user = (await identity.login_password(db, "alice", "pw-alice")).user
    token, _row = await personal_tokens.create_token(db, user, "laptop")
    await users.update_user(db, SYSTEM, int(alice["id"]), blocked=True)  # type: ignore[call-overload]
    assert (await _refused(identity.login_password(db, "alice", "pw-alice"))).code == "user_blocked"
    assert (await _refused(identity.login_token(db, token))).code == "user_blocked"


async def test_a_directory_password_is_never_shown_back_nor_taken_back_as_stars(db: Database) -> None:
    await _farm(db)
    await config.set_config(db, SYSTEM, "auth.ldap.bind_password", "s3cret-service")
    (entry,) = await config.list_config(db, SYSTEM, "auth.ldap.bind_password")
    assert (entry["value"], entry["secret"]) == ("***", True)
    e = await _refused(config.set_config(db, SYSTEM, "auth.ldap.bind_password", "***"))
    assert e.code == "bad_config_value"
    assert await config.get_config(db, "auth.ldap.bind_password") == "s3cret-service"
