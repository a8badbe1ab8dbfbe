"""Administrators' identity through the API: directory (LDAP) logins whose groups make the administrator and its
roles, and administrators' own second factor (TOTP) with its second login step and another administrator's reset.

Real: slapd (``tests/slapd.py``, one per module: bob is in ``vdi-admins``, alice in ``vdi-users``), the API
served by ``ApiServer`` (uvicorn, TLS) on a free port, SQLite and PostgreSQL (the ``db`` fixture).  httpx plays
the WAT and the CLI.  The farm's administrators read the global configuration layer, so the directory is set
there.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
import sqlalchemy as sa
import typer
from test_sso import admin_roles, admin_row  # the same questions of the database
from typer.testing import CliRunner

from deckard.api.app import create_app
from deckard.api.server import ApiServer
from deckard.cli import admin as admin_cli
from deckard.client.profile import load_profile
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.errors import PermissionDenied
from deckard.runtime.settings import Settings
from deckard.runtime.tls import client_context, ensure_tls
from deckard.services import config, password_plugins
from deckard.services.context import SYSTEM, Actor
from deckard.services.tenancy import bootstrap_farm
from slapd import ALICE, BASE_DN, BOB, SERVICE_DN, SERVICE_PASSWORD, VDI_ADMINS, VDI_USERS, Slapd

# the DN as people type it: other case, spaces after the commas (DNs are compared as DNs)
ADMINS_AS_TYPED = ", ".join(part.upper() for part in VDI_ADMINS.split(","))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return ensure_tls(tmp_path_factory.mktemp("tls"))


@dataclass
class Farm:
    url: str
    verify: Any
    ca: Path
    db: Database
    password: str  # the bootstrap administrator's ("admin", Root, supertenant)

    def http(self, token: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(
            base_url=self.url + "/api/v1", verify=self.verify, trust_env=False, headers=headers, timeout=10
        )

    async def login(self, name: str, password: str, **extra: Any) -> httpx.Response:
        async with self.http() as http:
            return await http.post("/auth/login", json={"name": name, "password": password, **extra})

    async def token(self, name: str = "admin", password: str | None = None, **extra: Any) -> str:
        r = await self.login(name, password or self.password, **extra)
        assert r.status_code == 200, r.text
        return str(r.json()["token"])


@pytest.fixture
async def farm(db: Database, tmp_path: Path, tls: tuple[Path, Path, Path], directory: Slapd) -> AsyncIterator[Farm]:
    password = await bootstrap_farm(db)
    assert password is not None
    for key, value in {
        "auth.chain": "ldap,local",
        "auth.ldap.url": directory.url,
        "auth.ldap.bind_dn": SERVICE_DN,
        "auth.ldap.bind_password": SERVICE_PASSWORD,
        "auth.ldap.base_dn": BASE_DN,
        "auth.ldap.required_group": VDI_USERS,  # the users' gate: administrators have their own
        "auth.ldap.timeout_s": 5.0,  # for a loaded machine; the test of a directory that stops answering says 0.5
        "auth.ldap.admin_groups": f"{ADMINS_AS_TYPED} = Operator",
    }.items():
        await config.set_config(db, SYSTEM, key, value)
    ca, cert, key = tls
    server = ApiServer(create_app(db, Settings(home=tmp_path)), "127.0.0.1", 0, cert, key)
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop))
    await asyncio.wait_for(server.started.wait(), 10)
    try:
        yield Farm(f"https://127.0.0.1:{server.port}", client_context(ca), ca, db, password)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        password_plugins.close_plugins(db)


async def audit(db: Database, action: str) -> list[Any]:
    log = t.audit_log
    async with db.connect() as conn:
        return list((await conn.execute(sa.select(log).where(log.c.action == action).order_by(log.c.id))).all())


def error(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, str(r.json()["error"]["code"])


# ---- directory administrators --------------------------------------------------------------------------------


async def test_a_directory_administrator_logs_in_with_the_directory_password_and_gets_exactly_the_mapped_role(
    farm: Farm,
) -> None:
    """bob is in vdi-admins, not in vdi-users (the users' required group): the mapping alone makes him an
    Operator of the farm, with a token that works; the audit record says the directory checked the password."""
    r = await farm.login("bob", BOB.password)
    assert r.status_code == 200, r.text
    async with farm.http(r.json()["token"]) as http:
        me = (await http.get("/auth/whoami")).json()
    assert (me["name"], me["tenant_id"]) == ("bob", None)
    assert "desktop.start" in me["acls"] and "admin.create" not in me["acls"]  # Operator
    bob = await admin_row(farm.db, "bob")
    assert (bob.origin, bob.password_hash, bob.tenant_id) == ("ldap", None, 0)
    assert await admin_roles(farm.db, bob.id) == ["Operator"]
    assert (await farm.login("bob", BOB.password)).status_code == 200, "the second login finds him"

    await farm.token()  # the farm's own administrator: a local password, never asked of the directory
    records = await audit(farm.db, "auth.login")
    arguments = [json.loads(r.arguments) for r in records]
    assert [(r.admin_name, r.result, a["plugin"]) for r, a in zip(records, arguments, strict=True)] == [
        ("bob", "ok", "ldap"),
        ("bob", "ok", "ldap"),
        ("admin", "ok", "local"),
    ]
    assert all(a["password"] == "***" for a in arguments) and BOB.password not in str(arguments)

    tenant_admin = Actor("admin", 999, 1, "tina", frozenset({"config.update"}))
    with pytest.raises(PermissionDenied):  # the mapping grants roles: only the farm's administrators set it
        await config.set_config(farm.db, tenant_admin, "auth.ldap.admin_groups", f"{VDI_USERS} = Tenant admin")


async def test_no_mapped_group_is_403_and_a_wrong_password_is_401_and_counted_in_the_lockout(farm: Farm) -> None:
    assert error(await farm.login("alice", ALICE.password)) == (403, "no_admin_role")
    assert await admin_row(farm.db, "alice") is None, "refused before anything was made"
    assert error(await farm.login("nobody", "whatever-1")) == (401, "bad_credentials"), "not in the directory"

    await config.set_config(farm.db, SYSTEM, "auth.lockout.failures", 2)
    assert error(await farm.login("bob", "not-his-password")) == (401, "bad_credentials")
    locked = await farm.login("bob", "not-his-password-either")
    assert error(locked) == (429, "login_locked") and int(locked.headers["retry-after"]) >= 1
    assert error(await farm.login("bob", BOB.password)) == (429, "login_locked"), "the wait holds for the right one"
    assert await admin_row(farm.db, "bob") is None
    failed = [r for r in await audit(farm.db, "auth.login") if r.admin_name == "bob"]
    assert [(r.status, r.error_code, json.loads(r.arguments)["plugin"]) for r in failed[:1]] == [
        (401, "bad_credentials", "ldap")
    ]


async def test_a_directory_that_does_not_answer_is_a_503_within_its_timeout(farm: Farm, directory: Slapd) -> None:
    await config.set_config(farm.db, SYSTEM, "auth.ldap.timeout_s", 0.5)
    with directory.frozen():
        started = time.monotonic()
        r = await farm.login("bob", BOB.password)
        assert error(r) == (503, "auth_unavailable") and time.monotonic() - started < 2.5
        await farm.token()  # a local password does not wait for the directory
    # Back once it answers.  slapd works through the connections queued while it was stopped first, and on a
    # loaded machine that can take longer than the 0.5 s timeout: a 503 or two on the way is fine, a stuck one not.
    deadline = time.monotonic() + 15
    while (r := await farm.login("bob", BOB.password)).status_code != 200 and time.monotonic() < deadline:
        assert error(r) == (503, "auth_unavailable")
        await asyncio.sleep(0.2)
    assert r.status_code == 200, "back once it answers"


async def test_roles_follow_the_mapping_at_each_login_and_leaving_every_group_ends_roles_and_sessions(
    farm: Farm,
) -> None:
    token = await farm.token("bob", BOB.password)
    bob = await admin_row(farm.db, "bob")
    assert await admin_roles(farm.db, bob.id) == ["Operator"]

    await config.set_config(farm.db, SYSTEM, "auth.ldap.admin_groups", f"{VDI_ADMINS} = Read-only;")
    await farm.token("bob", BOB.password)
    assert await admin_roles(farm.db, bob.id) == ["Read-only"]

    await config.set_config(farm.db, SYSTEM, "auth.ldap.admin_groups", f"{VDI_ADMINS} = No such role")
    assert error(await farm.login("bob", BOB.password)) == (409, "bad_admin_groups")
    assert await admin_roles(farm.db, bob.id) == ["Read-only"], "a broken mapping changes nothing"

    await config.set_config(farm.db, SYSTEM, "auth.ldap.admin_groups", f"{VDI_USERS} = Operator")
    assert error(await farm.login("bob", BOB.password)) == (403, "no_admin_role")
    assert await admin_roles(farm.db, bob.id) == []
    async with farm.http(token) as http:
        assert error(await http.get("/auth/whoami")) == (401, "bad_token"), "his sessions ended"

    await config.set_config(farm.db, SYSTEM, "auth.ldap.admin_groups", "")
    assert error(await farm.login("bob", BOB.password)) == (401, "bad_credentials"), "the directory is the users'"
    assert json.loads((await audit(farm.db, "auth.login"))[-1].arguments)["plugin"] == "local"


# ---- administrators' second factor --------------------------------------------------------------------------


async def enrol(farm: Farm, token: str) -> tuple[pyotp.TOTP, list[str]]:
    """Enrol the token's administrator through the API: (their authenticator app, the recovery codes)."""
    async with farm.http(token) as http:
        assert (await http.get("/auth/second-factor")).json() == {
            "enrolled": False,
            "pending": False,
            "recovery_codes_left": 0,
        }
        enrolment = (await http.post("/auth/second-factor/enrol")).json()
        assert enrolment["uri"].startswith("otpauth://totp/")
        app = pyotp.TOTP(enrolment["secret"])
        assert error(await http.post("/auth/second-factor/confirm", json={"code": "000000"})) == (
            401,
            "bad_second_factor",
        )
        confirmed = await http.post("/auth/second-factor/confirm", json={"code": app.now()})
        assert confirmed.status_code == 200, confirmed.text
        assert (await http.get("/auth/second-factor")).json()["enrolled"] is True
    return app, confirmed.json()["recovery_codes"]


def next_code(app: pyotp.TOTP) -> str:
    """The code of the next 30-second step: accepted now (±1 step), and later than the one enrolment used."""
    return app.at(time.time() + 30)


async def test_an_administrator_with_a_second_factor_logs_in_in_two_steps_and_a_code_is_never_replayed(
    farm: Farm,
) -> None:
    app, recovery = await enrol(farm, await farm.token())
    assert len(recovery) == 10

    first = await farm.login("admin", farm.password)
    assert error(first) == (401, "totp_required")
    challenge = first.json()["error"]["details"]["challenge"]
    async with farm.http() as http:
        step = "/auth/login/second-factor"
        wrong = await http.post(step, json={"challenge": challenge, "code": "000000"})
        assert error(wrong) == (401, "bad_second_factor"), "the challenge survives a wrong code"
        code = next_code(app)
        ok = await http.post(step, json={"challenge": challenge, "code": code})
        assert ok.status_code == 200, ok.text
        async with farm.http(ok.json()["token"]) as mine:
            assert (await mine.get("/auth/whoami")).json()["name"] == "admin"
        assert error(await http.post(step, json={"challenge": challenge, "code": code})) == (401, "challenge_expired")
        again = (await farm.login("admin", farm.password)).json()["error"]["details"]["challenge"]
        replayed = await http.post(step, json={"challenge": again, "code": code})
        assert error(replayed) == (401, "second_factor_replayed")
    async with httpx.AsyncClient(base_url=farm.url, verify=farm.verify, trust_env=False) as portal:
        r = await portal.post("/portal/login/second-factor", json={"challenge": again, "code": "123456"})
    assert error(r) == (401, "challenge_expired"), "an administrator's challenge is no good to the users' portal"

    assert (await farm.login("admin", farm.password, code=recovery[0])).status_code == 200, "with the login"
    assert error(await farm.login("admin", farm.password, code=recovery[0])) == (401, "bad_second_factor")

    records = await audit(farm.db, "auth.login.second-factor")
    assert [(r.admin_name, r.result, r.error_code) for r in records] == [
        ("admin", "failed", "bad_second_factor"),
        ("admin", "ok", ""),
        ("", "failed", "challenge_expired"),  # an ended challenge names no one
        ("admin", "failed", "second_factor_replayed"),
    ]
    assert json.loads(records[1].arguments) == {"challenge": "***", "code": "***", "plugin": "local", "factor": "totp"}
    inline = [json.loads(r.arguments) for r in await audit(farm.db, "auth.login") if r.result == "ok"][-1]
    assert (inline["code"], inline["factor"]) == ("***", "recovery")


async def test_deckard_login_asks_for_the_code_when_the_server_wants_one(farm: Farm, tmp_path: Path) -> None:
    app, _recovery = await enrol(farm, await farm.token())
    cli = typer.Typer()
    admin_cli.register(cli)
    profile = tmp_path / "profile.json"
    args = ["login", farm.url, "--user", "admin", "--password", farm.password, "--ca", str(farm.ca)]
    out = await asyncio.to_thread(CliRunner().invoke, cli, [*args, "--profile", str(profile)], next_code(app) + "\n")
    assert out.exit_code == 0, out.output
    assert "Code from your authenticator app" in out.output
    async with farm.http(load_profile(profile).token) as http:
        assert (await http.get("/auth/whoami")).json()["name"] == "admin"


async def test_wrong_codes_count_in_the_lockout_like_wrong_passwords(farm: Farm) -> None:
    app, _recovery = await enrol(farm, await farm.token())
    await config.set_config(farm.db, SYSTEM, "auth.lockout.failures", 3)
    challenge = (await farm.login("admin", farm.password)).json()["error"]["details"]["challenge"]
    async with farm.http() as http:
        answers = [
            error(await http.post("/auth/login/second-factor", json={"challenge": challenge, "code": "000000"}))
            for _ in range(3)
        ]
        assert answers == [(401, "bad_second_factor")] * 2 + [(429, "login_locked")]
        late = await http.post("/auth/login/second-factor", json={"challenge": challenge, "code": next_code(app)})
        assert error(late) == (429, "login_locked"), "the right code waits too"


async def test_another_administrator_resets_a_lost_second_factor_within_their_tenant(farm: Farm) -> None:
    root = await farm.token()
    made: dict[str, int] = {}
    async with farm.http(root) as http:
        for name, tenant, role in [
            ("carl", "*", "Root"),
            ("olga", "*", "Operator"),
            ("tina", "default", "Tenant admin"),
        ]:
            body = {"name": name, "password": f"{name}-pw-123", "tenant": tenant, "roles": [role]}
            r = await http.post("/admins", json=body)
            assert r.status_code == 201, r.text
            made[name] = int(r.json()["id"])
    carl_token = await farm.token("carl", "carl-pw-123")
    await enrol(farm, carl_token)
    assert error(await farm.login("carl", "carl-pw-123")) == (401, "totp_required")

    reset = f"/admins/{made['carl']}/second-factor"
    refusals = {
        carl_token: (409, "admin_self"),  # one's own: a stolen session must not switch it off
        await farm.token("tina", "tina-pw-123", tenant="default"): (404, "admin_not_found"),  # another tenant's
        await farm.token("olga", "olga-pw-123"): (403, "forbidden_action"),  # no admin.update.password
    }
    for token, refusal in refusals.items():
        async with farm.http(token) as http:
            assert error(await http.delete(reset)) == refusal
    async with farm.http(root) as http:
        assert (await http.delete(reset)).status_code == 204
    assert (await farm.login("carl", "carl-pw-123")).status_code == 200, "the password alone again"
    records = await audit(farm.db, "admin.second-factor")
    assert [(r.admin_name, r.result, r.object_id) for r in records][-1] == ("admin", "ok", str(made["carl"]))
