"""The login chain with a real directory (slapd, ``tests/slapd.py``) on SQLite and PostgreSQL: directory users log
in, are auto-provisioned with a first desktop, are refused outside the required group, local users still get in
after the directory passes, and a directory that stops answering is a 503 within its timeout."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from deckard.api.app import create_app
from deckard.broker.server import Broker
from deckard.client import broker as broker_client
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.errors import DeckardError
from deckard.runtime.settings import BrokerSettings, Settings
from deckard.runtime.tls import ensure_tls, server_context
from deckard.services import config, identity, osfs, users
from deckard.services.context import SYSTEM
from deckard.services.images import register_image
from deckard.services.tenancy import DEFAULT_OSF, bootstrap_farm
from deckard.testing import InProcessNode
from slapd import ALICE, BASE_DN, BOB, CAROL, SERVICE_DN, SERVICE_PASSWORD, VDI_USERS, Slapd

NET = "10.251.0.0/24"


async def _farm(db: Database, directory: Slapd, **extra: object) -> None:
    await bootstrap_farm(db)
    settings = {
        "auth.failure_floor_ms": 0,
        "auth.chain": "ldap,local",
        "auth.ldap.url": directory.url,
        "auth.ldap.bind_dn": SERVICE_DN,
        "auth.ldap.bind_password": SERVICE_PASSWORD,
        "auth.ldap.base_dn": BASE_DN,
        "auth.ldap.user_filter": "(|(uid={login})(sAMAccountName={login}))",
        "auth.ldap.required_group": VDI_USERS,
        "auth.ldap.timeout_s": 5.0,  # for a loaded machine; the test of a directory that stops answering says 0.5
        **extra,
    }
    for key, value in settings.items():
        await config.set_config(db, SYSTEM, key, value)


async def _refused(coro: object) -> DeckardError:
    with pytest.raises(DeckardError) as info:
        await coro  # type: ignore[misc]
    return info.value


async def test_a_directory_user_is_provisioned_with_a_first_desktop_at_the_first_login(
    db: Database, directory: Slapd
) -> None:
    await _farm(db, directory)
    e = await _refused(identity.login_password(db, "alice", ALICE.password, network=NET))
    assert (e.status, e.code) == (403, "user_not_provisioned"), "auto-provisioning is off by default"
    await osfs.create_osf(db, SYSTEM, "desk")
    await config.set_config(db, SYSTEM, "auth.auto.enabled", True)
    await config.set_config(db, SYSTEM, "auth.auto.osf", "desk")
    result = await identity.login_password(db, "alice", ALICE.password, source="10.0.0.7", network=NET)
    assert (result.user.login, result.plugin) == ("alice", "ldap")
    async with db.connect() as conn:
        row = (await conn.execute(sa.select(t.users).where(t.users.c.login == "alice"))).one()
        desks = (await conn.execute(sa.select(t.desktops.c.name).where(t.desktops.c.user_id == row.id))).all()
    assert (row.origin, row.display_name, row.mail, row.password_hash) == ("ldap", ALICE.display_name, ALICE.mail, None)
    assert row.external_id == ALICE.dn and [d.name for d in desks] == ["alice"]
    again = await identity.login_password(db, "alice", ALICE.password, network=NET)
    assert again.user.id == result.user.id, "the second login finds the account: no second desktop"
    e = await _refused(identity.login_password(db, "alice", "not-her-password"))
    assert e.code == "bad_credentials"


async def test_the_required_group_the_ad_forms_and_the_local_fallback(db: Database, directory: Slapd) -> None:
    await _farm(db, directory, **{"auth.auto.enabled": True})
    e = await _refused(identity.login_password(db, "bob", BOB.password, network=NET))
    assert e.code == "bad_credentials", "bob is not in vdi-users: refused like a wrong password"
    assert (await identity.login_password(db, "carol", CAROL.password, network=NET)).plugin == "ldap"  # sAMAccountName
    await users.create_user(db, SYSTEM, "localonly", "pw-local")
    assert (await identity.login_password(db, "localonly", "pw-local")).plugin == "local", "not in the directory"
    async with db.connect() as conn:
        q = sa.select(t.audit_log.c.arguments, t.audit_log.c.result).where(t.audit_log.c.action == "user.login")
        records = (await conn.execute(q)).all()
    assert any('"plugin": "ldap"' in r.arguments and r.result == "failed" for r in records)
    assert all(BOB.password not in r.arguments for r in records)


async def test_a_directory_that_stops_answering_is_a_503_within_its_timeout(db: Database, directory: Slapd) -> None:
    await _farm(db, directory, **{"auth.ldap.timeout_s": 0.5})
    await users.create_user(db, SYSTEM, "localonly", "pw-local")
    with directory.frozen():
        started = time.monotonic()
        e = await _refused(identity.login_password(db, "alice", ALICE.password))
        assert (e.status, e.code) == (503, "auth_unavailable")
        assert time.monotonic() - started < 2.5


async def test_the_readme_tour_a_directory_user_connects_with_qvds_protocol_and_in_the_portal(
    db: Database, directory: Slapd, tmp_path: Path
) -> None:
    """README, "Log in with your directory": a few config keys, then carol (an AD-style account) lists and connects
    through the real broker with her directory password — her account and first desktop made at that first login —
    and logs in to the portal, which shows the same desktop."""
    await _farm(db, directory, **{"auth.auto.enabled": True, "auth.auto.osf": DEFAULT_OSF})
    network = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24"
    node = InProcessNode.fake(db, network)
    image = node.settings.home / "image.tar"
    image.write_bytes(b"")
    await register_image(db, image, version="test")
    ca, cert, key = ensure_tls(node.settings.home / "tls")
    broker = Broker(db, BrokerSettings(start_timeout=10, display_timeout=5), server_context(cert, key), network=network)
    try:
        await node.start()
        await broker.start("127.0.0.1", 0)
        server = f"127.0.0.1:{broker.port}"
        desktops = await broker_client.list_desktops(server, "carol", CAROL.password, ca)
        assert [d["name"] for d in desktops] == ["carol"]
        reader, writer = await broker_client.connect(server, "carol", CAROL.password, ca, desktops[0]["id"])
        assert (await asyncio.wait_for(reader.readexactly(12), 10)).startswith(b"RFB ")
        writer.close()
    finally:
        await broker.close()
        await node.close()
    app = create_app(db, Settings(home=tmp_path))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://portal.test") as http:
        res = await http.post("/portal/login", json={"login": "carol", "password": CAROL.password})
        assert res.status_code == 200, res.text
        mine = await http.get("/portal/desktops", headers={"Authorization": f"Bearer {res.json()['token']}"})
        assert [d["name"] for d in mine.json()] == ["carol"]
