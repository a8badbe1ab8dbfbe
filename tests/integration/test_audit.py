"""The audit log through the real API: every non-GET request is recorded (who, action, object, arguments with
secrets masked, result, status, code, source), login attempts too, and the hash chain shows tampering:
``/audit/verify`` names the first changed or removed record."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
import test_api
from test_api import Farm, call

from deckard.db import schema as t
from deckard.model.errors import DeckardError
from deckard.services.audit import append_audit, verify_chain

farm = test_api.farm  # the real API with TLS, shared with test_api.py


async def test_actions_are_recorded_with_secrets_masked(farm: Farm) -> None:
    root = await farm.admin_client()
    user = await call(root.create_user, "alice", "alice-password")
    await call(root.update_user, user.id, description="front desk")
    with pytest.raises(DeckardError):
        await call(root.delete_user, 99999)
    page = await call(root.list_audit, {"sort": "id"})
    records = page.items
    by_action = {r.action: r for r in records}
    created = by_action["user.create"]
    assert created.admin_name == "admin" and created.result == "ok" and created.status == 201
    assert created.arguments["login"] == "alice" and created.arguments["password"] == "***"
    assert created.source == "127.0.0.1"
    assert by_action["user.update"].object_id == str(user.id)
    failed = by_action["user.delete"]
    assert failed.result == "failed" and failed.status == 404 and failed.error_code == "user_not_found"
    login = by_action["auth.login"]
    assert login.arguments["password"] == "***" and login.result == "ok"
    assert "alice-password" not in str(records) and farm.password not in str(records)


async def test_a_secret_configuration_value_is_masked_in_the_audit_log(farm: Farm) -> None:
    root = await farm.admin_client()
    entry = await call(root.set_config, "auth.ldap.bind_password", "directory-service-secret")
    assert entry.value == "***" and entry.secret
    page = await call(root.list_audit, {"sort": "id"})
    (record,) = [r for r in page.items if r.object_id == "auth.ldap.bind_password"]
    assert record.arguments["value"] == "***" and "directory-service-secret" not in str(page.items)


async def test_failed_logins_are_audited(farm: Farm) -> None:
    with pytest.raises(DeckardError):
        await call(farm.client().login, "admin", "not-the-password")
    root = await farm.admin_client()
    failed = (await call(root.list_audit, {"action": "auth.login", "result": "failed"})).items
    assert failed and failed[0].admin_name == "admin" and failed[0].error_code == "bad_credentials"


async def test_audit_list_filters_like_every_list(farm: Farm) -> None:
    root = await farm.admin_client()
    for login in ("u1", "u2", "u3"):
        await call(root.create_user, login, "pw-" + login)
    page = await call(root.list_audit, {"action": "user.create", "per_page": "2"})
    assert page.total == 3 and len(page.items) == 2
    assert page.items[0].id > page.items[1].id  # newest first


async def test_verify_is_ok_then_names_the_first_tampered_record(farm: Farm) -> None:
    root = await farm.admin_client()
    for login in ("u1", "u2", "u3"):
        await call(root.create_user, login, "pw-" + login)
    ok = await call(root.verify_audit)
    assert ok.ok and ok.checked >= 4 and ok.first_broken_id is None
    ids = [r.id for r in (await call(root.list_audit, {"action": "user.create", "sort": "id"})).items]
    async with farm.db.begin() as conn:
        await conn.execute(sa.update(t.audit_log).where(t.audit_log.c.id == ids[1]).values(object_id="forged"))
    broken = await call(root.verify_audit)
    assert not broken.ok and broken.first_broken_id == ids[1] and "changed" in broken.reason
    assert broken.checked == ids[1] - 1


async def test_removing_a_record_breaks_the_chain_at_the_next_one(farm: Farm) -> None:
    for i in range(4):
        await append_audit(farm.db, action=f"test.{i}", result="ok")
    async with farm.db.begin() as conn:
        ids = [r.id for r in await conn.execute(sa.select(t.audit_log.c.id).order_by(t.audit_log.c.id))]
        await conn.execute(sa.delete(t.audit_log).where(t.audit_log.c.id == ids[1]))
    out = await verify_chain(farm.db)
    assert not out["ok"] and out["first_broken_id"] == ids[2] and "removed" in out["reason"]


async def test_concurrent_appends_keep_one_chain(farm: Farm) -> None:
    await asyncio.gather(*(append_audit(farm.db, action=f"test.{i}", result="ok") for i in range(20)))
    assert (await verify_chain(farm.db))["ok"]


async def test_the_cli_verify_exits_1_and_names_the_broken_record(farm: Farm) -> None:
    from typer.testing import CliRunner

    from deckard.cli import audit as audit_cli
    from deckard.cli import session

    root = await farm.admin_client()
    await call(root.create_user, "u1", "pw-u1")
    first = (await call(root.list_audit, {"sort": "id"})).items[0].id
    async with farm.db.begin() as conn:
        await conn.execute(sa.update(t.audit_log).where(t.audit_log.c.id == first).values(result="failed"))
    runner = CliRunner()
    original = session.open_client
    session.open_client = lambda _profile: farm.client(root.token)  # type: ignore[assignment]
    try:
        result = await asyncio.to_thread(runner.invoke, audit_cli.app, ["verify"])
    finally:
        session.open_client = original  # type: ignore[assignment]
    assert result.exit_code == 1
    assert f"record {first}" in result.output
