"""The guests' metadata service (``node/metadata.py``) over real TCP, on SQLite and PostgreSQL: it answers by the
caller's source address with that desktop's facts (the real node daemon and the fake driver run the desktops on
loopback addresses, so a client bound to a desktop's address is that desktop), refuses what is not a GET, and
throttles a guest that asks too often.  The user's SSH keys and the OSF's user-data are set through the admin API
and the portal, as administrators and users set them.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from test_node_daemon import Farm, make_farm

from deckard.api.app import create_app
from deckard.db.engine import Database
from deckard.model.errors import BadInput
from deckard.model.guest_metadata import GuestMetadata
from deckard.model.states import DesktopState
from deckard.node.metadata import MetadataServer, RateLimit
from deckard.runtime.settings import Settings
from deckard.services import guest_metadata, users
from deckard.services.config import set_config
from deckard.services.context import SYSTEM


def ssh_key(fill: int = 1, comment: str = "alice@laptop") -> str:
    blob = (11).to_bytes(4, "big") + b"ssh-ed25519" + (32).to_bytes(4, "big") + bytes([fill]) * 32
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


@pytest.fixture
async def farm(db: Database) -> AsyncIterator[Farm]:
    f = await make_farm(db)
    await f.node.start()
    try:
        yield f
    finally:
        await f.node.close()


@pytest.fixture
async def server(farm: Farm) -> AsyncIterator[MetadataServer]:
    """The service with the node's real lookup, on 127.0.0.1 (the desktops' loopback addresses reach it)."""
    assert farm.node.daemon is not None and farm.node.daemon.node_id is not None
    lookup = functools.partial(
        guest_metadata.metadata_for_ip, farm.db, farm.node.daemon.node_id, network=farm.network, farm_id="f00d"
    )
    srv = MetadataServer(lookup, "127.0.0.1", 0)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def ask(
    srv: MetadataServer, source: str, path: str, method: str = "GET", extra: bytes = b""
) -> tuple[int, bytes]:
    """One request from ``source`` (the client's bound address) → (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port, local_addr=(source, 0))
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n".encode() + extra + b"\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_a_desktop_gets_its_own_metadata_keys_and_user_data_by_its_source_address(
    farm: Farm, server: MetadataServer
) -> None:
    desk = await farm.start(farm.desktops[0])
    other = await farm.row(farm.desktops[1])  # stopped: its address learns nothing
    key = ssh_key()
    alice = await users.find_user_id(farm.db, SYSTEM, "alice")
    await users.update_user(farm.db, SYSTEM, alice, ssh_keys=[key, "", key])
    await set_config(farm.db, SYSTEM, "guest.user_data", "#cloud-config\nhostname: x\n", osf=int(desk.osf_id))

    status, body = await ask(server, desk.ip, "/openstack/latest/meta_data.json")
    meta = json.loads(body)
    assert status == 200
    assert meta["uuid"] == f"deckard-f00d-{desk.id}" and meta["hostname"] == "desk1" and meta["name"] == "desk1"
    assert meta["public_keys"] == {"key-0": key} and meta["project_id"] == "default"
    assert meta["availability_zone"] == farm.node.settings.node.name and meta["meta"] == {"deckard_user": "alice"}
    assert await ask(server, desk.ip, "/latest/meta-data/local-ipv4") == (200, desk.ip.encode())
    assert await ask(server, desk.ip, "/latest/meta-data/public-keys/0/openssh-key") == (200, key.encode())
    # cached for 2 s: the user-data set above may not show at once
    await asyncio.sleep(2.1)
    assert await ask(server, desk.ip, "/openstack/latest/user_data") == (200, b"#cloud-config\nhostname: x\n")
    net = json.loads((await ask(server, desk.ip, "/openstack/latest/network_data.json"))[1])
    assert net["networks"][0]["ip_address"] == desk.ip and net["links"][0]["ethernet_mac_address"] == desk.mac

    assert other.state == DesktopState.STOPPED
    assert (await ask(server, other.ip, "/openstack/latest/meta_data.json"))[0] == 404
    assert (await ask(server, "127.0.0.1", "/openstack/latest/meta_data.json"))[0] == 404  # the node itself
    assert (await ask(server, desk.ip, "/latest/meta-data/iam/security-credentials/"))[0] == 404


async def test_metadata_for_a_desktop_serves_the_nocloud_seed_whatever_its_state(farm: Farm) -> None:
    md = await guest_metadata.metadata_for_desktop(farm.db, farm.desktops[1], network=farm.network, farm_id="f00d")
    assert md.hostname == "desk2" and md.user == "alice" and md.prefix_len == 24 and md.user_data == ""
    assert md.dns_servers == (md.gateway,) and md.public_keys == ()


async def test_only_get_and_head_are_answered_and_a_head_has_no_body(farm: Farm, server: MetadataServer) -> None:
    desk = await farm.start(farm.desktops[0])
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        assert (await ask(server, desk.ip, "/latest/api/token", method))[0] == 405, method
    assert await ask(server, desk.ip, "/latest/meta-data/hostname", "HEAD") == (200, b"")
    assert (await ask(server, desk.ip, "/x", extra=b"X-Big: " + b"a" * 9000 + b"\r\n"))[0] == 431


async def test_a_guest_that_asks_too_often_gets_429_and_others_do_not(farm: Farm) -> None:
    desk = await farm.start(farm.desktops[0])
    asked: list[str] = []

    async def lookup(ip: str) -> GuestMetadata | None:  # injected: the limit is the server's, whoever answers
        asked.append(ip)
        return None

    srv = MetadataServer(lookup, "127.0.0.1", 0, limit=RateLimit(rate=1, burst=3))
    await srv.start()
    try:
        statuses = [(await ask(srv, desk.ip, "/"))[0] for _ in range(5)]
        assert statuses == [404, 404, 404, 429, 429]
        assert (await ask(srv, "127.0.0.9", "/"))[0] == 404
        assert set(asked) == {desk.ip, "127.0.0.9"}
    finally:
        await srv.stop()


async def test_a_lookup_that_fails_is_503_and_the_service_stays_up() -> None:
    async def lookup(_ip: str) -> GuestMetadata | None:
        raise ConnectionError("the database is away")

    srv = MetadataServer(lookup, "127.0.0.1", 0)
    await srv.start()
    try:
        assert (await ask(srv, "127.0.0.2", "/"))[0] == 503
        assert (await ask(srv, "127.0.0.2", "/"))[0] == 503
    finally:
        await srv.stop()


async def test_bad_keys_and_user_data_are_refused_with_their_codes(farm: Farm) -> None:
    alice = await users.find_user_id(farm.db, SYSTEM, "alice")
    with pytest.raises(BadInput) as e:
        await users.update_user(farm.db, SYSTEM, alice, ssh_keys=["ssh-ed25519 AAAA"])
    assert e.value.code == "bad_ssh_key"
    with pytest.raises(BadInput) as e:
        await set_config(farm.db, SYSTEM, "guest.user_data", "x" * 70000)
    assert e.value.code == "bad_user_data"
    assert (await users.get_user(farm.db, SYSTEM, alice))["ssh_keys"] == []


async def test_admins_set_keys_through_the_api_and_users_through_the_portal(db: Database, tmp_path: Path) -> None:
    from deckard.services.tenancy import bootstrap_farm

    password = await bootstrap_farm(db)
    await users.create_user(db, SYSTEM, "alice", "pw-alice")
    app = create_app(db, Settings(home=tmp_path))
    key1, key2 = ssh_key(1), ssh_key(2, "desk")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://farm.test") as http:
        login = await http.post("/api/v1/auth/login", json={"name": "admin", "password": password})
        admin = {"Authorization": f"Bearer {login.json()['token']}"}
        res = await http.patch("/api/v1/users/alice", headers=admin, json={"ssh_keys": [key1]})
        assert res.status_code == 200, res.text
        assert res.json()["ssh_keys"] == [key1]
        assert (await http.get("/api/v1/users/alice", headers=admin)).json()["ssh_keys"] == [key1]
        res = await http.patch("/api/v1/users/alice", headers=admin, json={"ssh_keys": ["nope"]})
        assert res.status_code == 422 and res.json()["error"]["code"] == "bad_ssh_key"

        login = await http.post("/portal/login", json={"login": "alice", "password": "pw-alice"})
        me = {"Authorization": f"Bearer {login.json()['token']}"}
        assert (await http.get("/portal/me/ssh-keys", headers=me)).json() == {"keys": [key1]}
        res = await http.put("/portal/me/ssh-keys", headers=me, json={"keys": [key2, " ", key1]})
        assert res.status_code == 200, res.text
        assert res.json() == {"keys": [key2, key1]}
        res = await http.put("/portal/me/ssh-keys", headers=me, json={"keys": ["ssh-rsa AAAA"]})
        assert res.status_code == 422 and res.json()["error"]["code"] == "bad_ssh_key"
        assert (await http.get("/api/v1/users/alice", headers=admin)).json()["ssh_keys"] == [key2, key1]
        assert (await http.get("/portal/me/ssh-keys")).status_code == 401
