"""The administrators' side of identity through the real API (SQLite): login bans listed and
cleared (a tenant's administrator sees their tenant's only), a user's second factor shown and reset (audited),
a user's personal tokens listed and revoked, an administrator's own expiring API tokens, and the CLI on top."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import time
from typing import Any

import pyotp
import pytest
import sqlalchemy as sa
import test_api
import typer
from test_api import Farm, call
from test_tenancy_acl import multitenant, tenant_admin
from typer.testing import CliRunner

from deckard.cli import admin as admin_cli
from deckard.cli import identity as identity_cli
from deckard.cli import session
from deckard.db import schema as t
from deckard.model.errors import BadInput, Conflict, DeckardError, NotFound, Unauthenticated
from deckard.services import config, identity, personal_tokens, second_factor
from deckard.services.context import SYSTEM

# HTTP, flows and rules, not SQL: SQLite only (the queries underneath run on PostgreSQL in test_identity.py,
# test_second_factor.py and test_admin_identity.py), to keep make test under its time budget
DATABASES = ["sqlite"]  # read by tests/conftest.py

farm = test_api.farm  # the real API with TLS, shared with test_api.py
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")


async def _lockout_after_two(farm: Farm) -> None:
    await config.set_config(farm.db, SYSTEM, "auth.lockout.account_failures", 2)
    await config.set_config(farm.db, SYSTEM, "auth.failure_floor_ms", 0)
    await config.set_config(farm.db, SYSTEM, "auth.lockout.refusal_delay_ms", 0)


async def _guess(farm: Farm, login: str, times: int = 2) -> None:
    """Wrong passwords from different addresses: only the account's counter reaches its lock."""
    for i in range(times):
        with pytest.raises(DeckardError):
            await identity.login_password(farm.db, login, "wrong", source=f"10.0.0.{i + 1}")


async def _audit(farm: Farm, action: str) -> list[sa.Row[Any]]:
    log = t.audit_log
    async with farm.db.connect() as conn:
        return list((await conn.execute(sa.select(log).where(log.c.action == action).order_by(log.c.id))).all())


async def _refused(fn: Any, *args: Any) -> DeckardError:
    """The error a service call (a coroutine) or a client call (in a thread) ends with."""
    with pytest.raises(DeckardError) as e:
        await (fn(*args) if asyncio.iscoroutinefunction(fn) else call(fn, *args))
    return e.value


async def test_a_guessed_account_shows_as_a_ban_and_clearing_it_lets_the_user_in(farm: Farm) -> None:
    root = await farm.admin_client()
    await call(root.create_user, "alice", "pw-alice")
    await _lockout_after_two(farm)
    await _guess(farm, "alice")
    bans = {b.key: b for b in await call(root.list_bans)}
    ban = bans["account:default/alice"]
    assert ban.kind == "account" and ban.failures == 2 and ban.locked_until > dt.datetime.now(dt.UTC)
    locked = await _refused(identity.login_password, farm.db, "alice", "pw-alice")
    assert locked.code == "account_locked"

    await call(root.clear_ban, "account:default/alice")  # the key's '/' travels as %2F
    assert "account:default/alice" not in {b.key for b in await call(root.list_bans)}
    assert (await identity.login_password(farm.db, "alice", "pw-alice", source="10.9.9.9")).user.login == "alice"
    again = await _refused(root.clear_ban, "account:default/alice")
    assert isinstance(again, NotFound) and again.code == "ban_not_found"
    cleared = await _audit(farm, "auth.bans")
    assert [(r.result, r.status) for r in cleared] == [("ok", 204), ("failed", 404)]


async def test_a_tenant_administrator_sees_and_clears_only_their_tenants_bans(farm: Farm) -> None:
    root = await farm.admin_client()
    await multitenant(root)
    ann = await tenant_admin(farm, root, "acme", "ann", ["Tenant admin"])
    await call(ann.create_user, "bob", "pw-bob")
    await call(root.create_user, "alice", "pw-alice")
    await _lockout_after_two(farm)
    await _guess(farm, "alice")
    await _guess(farm, "bob@acme")
    assert {"account:default/alice", "account:acme/bob"} <= {b.key for b in await call(root.list_bans)}
    mine = await call(ann.list_bans)
    assert [b.key for b in mine] == ["account:acme/bob"], "another tenant's accounts and addresses stay hidden"
    hidden = await _refused(ann.clear_ban, "account:default/alice")
    assert hidden.code == "ban_not_found"
    await call(ann.clear_ban, "account:acme/bob")
    assert await call(ann.list_bans) == []
    assert "account:default/alice" in {b.key for b in await call(root.list_bans)}


async def test_resetting_a_second_factor_is_audited_and_the_user_logs_in_without_a_code(farm: Farm) -> None:
    root = await farm.admin_client()
    alice = await call(root.create_user, "alice", "pw-alice")
    await config.set_config(farm.db, SYSTEM, "auth.failure_floor_ms", 0)
    await config.set_config(farm.db, SYSTEM, "auth.lockout.refusal_delay_ms", 0)
    enrol = await second_factor.start_enrolment(farm.db, "user", alice.id, "alice@default", "Deckard")
    await second_factor.confirm_enrolment(farm.db, "user", alice.id, pyotp.TOTP(enrol["secret"]).at(time.time() - 30))
    status = await call(root.get_second_factor, alice.id)
    assert (status.enrolled, status.pending, status.recovery_codes_left) == (True, False, 10)
    asked = await _refused(identity.login_password, farm.db, "alice", "pw-alice")
    assert asked.code == "totp_required"

    await call(root.reset_second_factor, alice.id)
    assert not (await call(root.get_second_factor, alice.id)).enrolled
    result = await identity.login_password(farm.db, "alice", "pw-alice")
    assert (result.user.login, result.factor) == ("alice", "")
    (record,) = await _audit(farm, "user.second-factor")
    assert (record.result, record.status, record.object_id, record.admin_name) == ("ok", 204, str(alice.id), "admin")
    missing = await _refused(root.reset_second_factor, 999_999)
    assert missing.code == "user_not_found"


async def test_another_tenants_administrator_cannot_see_or_reset_a_users_second_factor(farm: Farm) -> None:
    root = await farm.admin_client()
    await multitenant(root)
    alice = await call(root.create_user, "alice", "pw-alice")
    ann = await tenant_admin(farm, root, "acme", "ann", ["Tenant admin"])
    for fn in (ann.get_second_factor, ann.reset_second_factor, ann.list_user_tokens):
        assert (await _refused(fn, alice.id)).code == "user_not_found"
    viewer = await tenant_admin(farm, root, "default", "viewer", ["Read-only"])
    assert not (await call(viewer.get_second_factor, alice.id)).enrolled
    assert (await _refused(viewer.reset_second_factor, alice.id)).code == "forbidden_action"


async def test_an_administrator_lists_and_revokes_a_users_personal_tokens(farm: Farm) -> None:
    root = await farm.admin_client()
    alice = await call(root.create_user, "alice", "pw-alice")
    await config.set_config(farm.db, SYSTEM, "auth.failure_floor_ms", 0)
    await config.set_config(farm.db, SYSTEM, "auth.lockout.refusal_delay_ms", 0)
    user = (await identity.login_password(farm.db, "alice", "pw-alice")).user
    secret, row = await personal_tokens.create_token(farm.db, user, "laptop", days=7)
    (listed,) = await call(root.list_user_tokens, alice.id)
    assert (listed.id, listed.name, listed.revoked) == (row["id"], "laptop", False)
    assert secret not in listed.model_dump_json()
    await call(root.revoke_user_token, alice.id, row["id"])
    assert (await call(root.list_user_tokens, alice.id))[0].revoked
    assert (await _refused(identity.login_token, farm.db, secret)).code == "bad_token"
    assert (await _refused(root.revoke_user_token, alice.id, row["id"] + 1000)).code == "token_not_found"
    assert (await _refused(root.list_user_tokens, 999_999)).code == "user_not_found"


async def test_own_api_tokens_work_as_bearer_until_revoked_or_expired(farm: Farm) -> None:
    root = await farm.admin_client()
    made = await call(root.create_own_token, "ci", 7)
    assert made.token.startswith("dk_") and made.name == "ci"
    assert dt.timedelta(days=6, hours=23) < made.expires_at - dt.datetime.now(dt.UTC) <= dt.timedelta(days=7)
    ci = farm.client(made.token)
    assert (await call(ci.whoami)).name == "admin"
    listed = {tok.name: tok for tok in await call(root.list_own_tokens)}
    assert listed["ci"].id == made.id and not listed["ci"].revoked
    async with farm.http(root.token) as http:
        body = (await http.get("/auth/tokens")).json()
    assert made.token not in json.dumps(body) and not any("token_hash" in i for i in body["items"])
    dup = await _refused(root.create_own_token, "ci", 7)
    assert isinstance(dup, Conflict) and dup.code == "duplicate"

    await call(root.revoke_own_token, made.id)
    gone = await _refused(ci.whoami)
    assert isinstance(gone, Unauthenticated) and gone.code == "bad_token"
    assert (await call(root.create_own_token, "ci", 1)).name == "ci"  # a revoked name is free again

    old = await call(root.create_own_token, "old", 1)
    async with farm.db.begin() as conn:
        past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        await conn.execute(sa.update(t.admin_tokens).where(t.admin_tokens.c.id == old.id).values(expires_at=past))
    expired = await _refused(farm.client(old.token).whoami)
    assert (expired.status, expired.code) == (401, "session_expired")


async def test_own_tokens_are_bounded_and_nobody_elses_can_be_revoked(farm: Farm) -> None:
    root = await farm.admin_client()
    for days in (0, 366):
        bad = await _refused(root.create_own_token, "x", days)
        assert isinstance(bad, BadInput) and bad.status == 422
    assert (await _refused(root.create_own_token, "no/slash", 7)).code == "bad_token_name"
    mine = await call(root.create_own_token, "mine", 7)
    other = await tenant_admin(farm, root, "default", "ops", ["Operator"])
    assert (await _refused(other.revoke_own_token, mine.id)).code == "token_not_found"
    assert "mine" not in {tok.name for tok in await call(other.list_own_tokens)}
    assert (await call(farm.client(mine.token).whoami)).name == "admin"


def _cli(farm: Farm, token: str, *args: str) -> Any:
    """``deckard <args>`` (the admin nouns, as ``cli/main.py`` registers them) against the real API."""
    app = typer.Typer()
    admin_cli.register(app)
    identity_cli.register(app)
    original = session.open_client
    session.open_client = lambda _profile: farm.client(token)  # type: ignore[assignment]
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        session.open_client = original


async def test_the_cli_shows_and_clears_bans_second_factors_and_tokens(farm: Farm) -> None:
    root = await farm.admin_client()
    assert root.token
    alice = await call(root.create_user, "alice", "pw-alice")
    await _lockout_after_two(farm)
    user = (await identity.login_password(farm.db, "alice", "pw-alice")).user
    _secret, row = await personal_tokens.create_token(farm.db, user, "laptop", days=7)
    await _guess(farm, "alice")

    async def run(*args: str) -> str:
        out = await asyncio.to_thread(_cli, farm, root.token or "", *args)
        assert out.exit_code == 0, out.output
        # the API serves from this process: its request log lines land in the same stdout
        return "\n".join(line for line in out.stdout.splitlines() if not LOG_LINE.match(line))

    assert "account:default/alice" in (await run("ban", "list"))
    assert "cleared" in (await run("ban", "clear", "account:default/alice"))
    assert json.loads(await run("user", "second-factor", "alice", "--json"))["enrolled"] is False
    assert "reset" in (await run("user", "reset-second-factor", "alice"))
    assert "laptop" in (await run("user", "tokens", "alice"))
    await run("user", "revoke-token", "alice", str(row["id"]))
    assert (await call(root.list_user_tokens, alice.id))[0].revoked

    made = json.loads(await run("token", "create", "backup", "--days", "3", "--json"))
    assert made["token"].startswith("dk_") and made["name"] == "backup"
    shown = await run("token", "create", "nightly")
    assert "not shown again" in shown and "dk_" in shown
    listed = await run("token", "list")
    assert "backup" in listed and "nightly" in listed and made["token"] not in listed
    await run("token", "revoke", str(made["id"]))
    assert (await _refused(farm.client(made["token"]).whoami)).code == "bad_token"
    refused = await asyncio.to_thread(_cli, farm, root.token or "", "token", "create", "x", "--days", "400")
    assert refused.exit_code == 2  # a usage error: Typer bounds --days before any request
