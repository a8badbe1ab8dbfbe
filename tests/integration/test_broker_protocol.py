"""The broker speaks QVD's client protocol over TLS, against a real database, node daemon and fake guests.

What is real: the Broker on 127.0.0.1 with the farm's TLS, the database (fixture ``db``), the services, the
agent client, and the node daemon (``deckard.testing.InProcessNode``).  What is faked, because it is the layer
below the one under test: the guests, which the fake driver serves on their desktop's address (the real agent
RPC on ``:3030`` and a display with VNC authentication that echoes on ``:5900``; drivers/fake_guest.py).  Each
test puts its desktops on its own ``127.x.y.0/24`` network: all of 127/8 is loopback on Linux, so fake guests
bind their desktop's real address and ports.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyotp
import pytest
import sqlalchemy as sa

from deckard.auth import local as local_auth
from deckard.broker.server import Broker
from deckard.broker.tunnel import RESIZE_ENCODINGS
from deckard.client import broker as broker_client
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.drivers.display import nx_cookie
from deckard.drivers.fake_guest import FakeGuest
from deckard.model.entities import uid_for_user
from deckard.model.errors import NotFound, PermissionDenied, Unauthenticated, Unavailable
from deckard.runtime.settings import BrokerSettings
from deckard.runtime.tls import client_context, ensure_tls, server_context
from deckard.services import identity, personal_tokens, second_factor
from deckard.services.context import SYSTEM
from deckard.services.desktops import create_desktop, request_stop, set_blocked
from deckard.services.images import register_image
from deckard.services.tenancy import bootstrap_farm
from deckard.services.users import create_user, update_user
from deckard.testing import InProcessNode

# The wire protocol is the subject, not SQL: SQLite, but for the connects whose claim and start the database orders.
DATABASES = ["sqlite"]

RFB_BANNER = b"RFB 003.008\n"
# what a viewer sends after the banner (version, security None, shared ClientInit) and what the broker answers
VIEWER_HANDSHAKE = RFB_BANNER + b"\x01" + b"\x01"
BROKER_SECURITY = b"\x01\x01" + b"\x00\x00\x00\x00"
# the fake display echoes the ClientInit and the broker's SetEncodings that came with it
DISPLAY_ECHO = b"\x01" + RESIZE_ENCODINGS
QVD_PARAMS = (
    "qvd.client.os=linux&qvd.client.keyboard=pc105%2Fes&qvd.client.link=adsl&qvd.client.geometry=1024x768"
    "&qvd.client.fullscreen=&qvd.client.nxagent.extra_args=&qvd.client.printing.enabled=1"
    "&qvd.client.usb.enabled=0&qvd.client.usb.implementation=USBIP&qvd.client.audio.compression.enable=1"
    "&qvd.client.audio.redirect.enable=0&qvd.client.audio.redirect.server=&qvd.client.audio.redirect.port="
)


@dataclass
class Farm:
    db: Database
    broker: Broker
    node: InProcessNode
    ca: Path
    alice_desk: dict[str, Any]
    bob_desk: dict[str, Any]
    alice_id: int

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.broker.port}"

    def guest(self, desktop_id: int) -> FakeGuest:
        return self.node.driver.guest(self.node.settings.paths.guest_name(desktop_id))

    async def connection_rows(self, desktop_id: int) -> list[Any]:
        async with self.db.connect() as conn:
            q = sa.select(t.connections).where(t.connections.c.desktop_id == desktop_id).order_by(t.connections.c.id)
            return list(await conn.execute(q))

    async def ended_connection(self, desktop_id: int) -> Any:
        """The desktop's last connection once it is recorded as ended."""

        async def ended() -> Any:
            rows = await self.connection_rows(desktop_id)
            return rows[-1] if rows and rows[-1].ended_at is not None else None

        return await self.wait_for("the connection to be recorded", ended)

    async def desktop_row(self, desktop_id: int) -> Any:
        async with self.db.connect() as conn:
            return (await conn.execute(sa.select(t.desktops).where(t.desktops.c.id == desktop_id))).one()

    async def connected_row(self, desktop_id: int) -> Any:
        """The desktop's row once its user is connected: the broker records it just after the ``101``."""

        async def connected() -> Any:
            row = await self.desktop_row(desktop_id)
            return row if row.user_state == "connected" else None

        return await self.wait_for("the user to be recorded connected", connected)

    async def wait_for(self, what: str, check: Any, timeout: float = 10.0) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await check()
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)


@pytest.fixture
async def farm(db: Database) -> AsyncIterator[Farm]:
    await bootstrap_farm(db)
    alice = await create_user(db, SYSTEM, "alice", "pw-alice")
    await create_user(db, SYSTEM, "bob", "pw-bob")
    network = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24"
    alice_desk = await create_desktop(db, SYSTEM, "alice-desk", "alice", network=network)
    bob_desk = await create_desktop(db, SYSTEM, "bob-desk", "bob", network=network)
    node = InProcessNode.fake(db, network)
    home = node.settings.home
    image = home / "image.tar"
    image.write_bytes(b"")
    await register_image(db, image, version="test")
    ca, cert, key = ensure_tls(home / "tls")
    broker = Broker(
        db, BrokerSettings(start_timeout=10, display_timeout=5), server_context(cert, key), node_id=None, poll=0.1
    )
    try:
        await node.start()
        await broker.start("127.0.0.1", 0)
        yield Farm(db, broker, node, ca, alice_desk, bob_desk, int(alice["id"]))
    finally:
        await broker.close()
        await node.close()


# ---------------------------------------------------------------- a raw client, byte for byte like QVD's


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def basic(login: str, password: str) -> str:
    return "Basic " + b64(f"{login}:{password}")


class RawClient:
    """Writes requests exactly as given and reads replies head by head (no Host unless the test adds one)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, farm: Farm) -> RawClient:
        ctx = client_context(farm.ca)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", farm.broker.port, ssl=ctx, server_hostname="127.0.0.1"
        )
        return cls(reader, writer)

    def send(self, target: str, headers: dict[str, str] | None = None, method: str = "GET") -> None:
        lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def head(self) -> tuple[str, dict[str, str]]:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 30)  # a loaded CI machine
        lines = raw.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        return lines[0], headers

    async def response(self) -> tuple[int, dict[str, str], bytes, list[str]]:
        """The final response, with the X-QVD-VM-Info of every 102 before it."""
        infos = []
        while True:
            status_line, headers = await self.head()
            assert status_line.startswith("HTTP/1.1 "), status_line
            status = int(status_line.split()[1])
            if status == 102:
                assert status_line == "HTTP/1.1 102 Processing"
                infos.append(headers["x-qvd-vm-info"])
                continue
            break
        body = b""
        if status != 101:
            assert "chunked" not in headers.get("transfer-encoding", "")
            body = await self.reader.readexactly(int(headers["content-length"]))
        return status, headers, body, infos

    async def request(
        self, target: str, headers: dict[str, str] | None = None, method: str = "GET"
    ) -> tuple[int, dict[str, str], bytes, list[str]]:
        self.send(target, headers, method)
        return await self.response()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


ALICE = {"Authorization": basic("alice", "pw-alice")}
# Deckard's own clients ask for the VNC display; QVD's send no such header and get NX (broker/nx.py)
UPGRADE = {"Connection": "Upgrade", "Upgrade": "QVD/1.0", "X-Deckard-Display": "vnc"}
QVD_UPGRADE = {"Connection": "Upgrade", "Upgrade": "QVD/1.0"}
NXPROXY_FIRST = b"NXPROXY-3.5.0-3.5.99.26 stream=default,data=default "


async def viewer_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Do a viewer's RFB handshake through the tunnel; the broker authenticated to the display meanwhile."""
    assert await asyncio.wait_for(reader.readexactly(len(RFB_BANNER)), 5) == RFB_BANNER
    writer.write(VIEWER_HANDSHAKE)
    assert await asyncio.wait_for(reader.readexactly(len(BROKER_SECURITY)), 5) == BROKER_SECURITY
    assert await asyncio.wait_for(reader.readexactly(len(DISPLAY_ECHO)), 5) == DISPLAY_ECHO


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 10) -> bool:
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
    except (ConnectionError, ssl.SSLError):
        pass
    return True


# ---------------------------------------------------------------- tests


async def relayed_before_the_agent(farm: Farm, agent_delay: float) -> tuple[RawClient, int]:
    """Connect to alice's desktop, whose guest shows its display at boot and whose agent answers ``agent_delay``
    seconds later: the client after the ``101`` and its viewer's handshake, and the desktop's id."""
    farm.node.driver.display_at_boot = True
    farm.node.driver.agent_delay = agent_delay
    desk_id = farm.alice_desk["id"]
    c = await RawClient.open(farm)
    assert (await c.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **UPGRADE}))[0] == 101
    await viewer_handshake(c.reader, c.writer)
    return c, desk_id


async def test_ping_answers_i_am_alive_without_credentials_or_host(farm: Farm) -> None:
    c = await RawClient.open(farm)
    status, headers, body, _ = await c.request("/qvd/ping")
    assert (status, body) == (200, b"I am alive!")
    assert headers["content-length"] == "11"
    await c.close()


@pytest.mark.databases("sqlite", "postgresql")
async def test_qvd_client_lists_then_connects_on_one_connection_and_bytes_flow_both_ways(farm: Farm) -> None:
    """As QVD's own client (asking for VNC): no Host header, ``list_of_vm?``, then connect on the same TLS
    connection."""
    farm.node.driver.start_delay = 0.3  # slow enough for the broker to see the desktop starting
    c = await RawClient.open(farm)
    status, headers, body, _ = await c.request(
        "/qvd/list_of_vm?", {**ALICE, "Accept": "application/json", "User-Agent": "QVD::HTTPC/0.01 (linux)"}
    )
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    desktops = json.loads(body)
    assert [(d["id"], d["name"], d["state"], d["blocked"]) for d in desktops] == [
        (farm.alice_desk["id"], "alice-desk", "stopped", 0)
    ]
    desk_id = farm.alice_desk["id"]
    status, headers, _, infos = await c.request(f"/qvd/connect_to_vm?id={desk_id}&{QVD_PARAMS}", {**ALICE, **UPGRADE})
    assert status == 101
    assert headers["connection"].lower() == "upgrade" and headers["upgrade"] == "QVD/1.0"
    assert infos[-1] == "Waiting for the display to come up"
    assert any("start" in i.lower() for i in infos[:-1])
    await viewer_handshake(c.reader, c.writer)
    c.writer.write(b"hello desktop")
    assert await asyncio.wait_for(c.reader.readexactly(13), 5) == b"hello desktop"

    guest = farm.guest(desk_id)
    x_starts = [params for method, params in guest.calls if method == "x_start"]
    uid = str(uid_for_user(farm.alice_id))  # QVD's pc105/es keyboard reaches the session as the XKB layout
    assert x_starts[-1] == {"user": "alice", "uid": uid, "geometry": "1024x768", "keyboard": "es"}
    await farm.connected_row(desk_id)

    await c.close()

    async def ended() -> Any:
        rows = await farm.connection_rows(desk_id)
        return rows if rows and rows[-1].ended_at is not None else None

    rows = await farm.wait_for("the connection to be recorded", ended)
    row = rows[-1]
    assert row.result == "closed"
    assert row.login == "alice" and row.protocol == "qvd" and row.source == "127.0.0.1"
    assert (row.bytes_in, row.bytes_out) == (len(VIEWER_HANDSHAKE) + 13, 12 + len(BROKER_SECURITY) + 13 + 13)
    assert farm.guest(desk_id).auth_failures == 0
    for name in ("t_auth_ms", "t_claim_ms", "t_start_ms", "t_display_ms", "t_total_ms"):
        assert getattr(row, name) is not None and getattr(row, name) >= 0, name
    assert row.t_agent_ms == round((await farm.desktop_row(desk_id)).start_agent_ms, 1)  # the node's figure
    assert row.t_total_ms >= row.t_start_ms
    desk = await farm.desktop_row(desk_id)
    assert (desk.state, desk.user_state) == ("running", "disconnected")


async def test_every_connects_login_is_audited_once_also_when_the_connect_is_refused_after_it(farm: Farm) -> None:
    """The broker writes a connect's login record while the desktop boots (``LoginRecord``): it is there for a
    connect that got its desktop and for one refused after the login (no such desktop), once each."""
    c = await RawClient.open(farm)
    status, *_ = await c.request(f"/qvd/connect_to_vm?id={farm.alice_desk['id']}&{QVD_PARAMS}", {**ALICE, **UPGRADE})
    assert status == 101
    await c.close()
    c = await RawClient.open(farm)
    status, headers, _, _ = await c.request(f"/qvd/connect_to_vm?id=999999&{QVD_PARAMS}", {**ALICE, **UPGRADE})
    assert status == 404 and headers["x-deckard-error"] == "desktop_not_found"
    await c.close()

    log = t.audit_log

    async def two_logins() -> list[Any] | None:
        async with farm.db.connect() as conn:
            q = sa.select(log).where(log.c.action == "user.login", log.c.admin_name == "user:alice")
            rows = list(await conn.execute(q))
        return rows if len(rows) >= 2 else None

    rows = await farm.wait_for("two login records", two_logins)
    await asyncio.sleep(0.2)  # and no third
    assert len(await two_logins() or []) == 2
    assert [(r.result, json.loads(r.arguments)["via"]) for r in rows] == [("ok", "broker"), ("ok", "broker")]


async def test_client_module_lists_and_connects_with_progress(farm: Farm) -> None:
    desktops = await broker_client.list_desktops(farm.server, "alice", "pw-alice", farm.ca)
    chosen = broker_client.resolve_desktop(desktops, None)
    assert chosen["name"] == "alice-desk"
    progress: list[str] = []
    reader, writer = await broker_client.connect(
        farm.server, "alice", "pw-alice", farm.ca, chosen["id"], progress.append
    )
    assert await asyncio.wait_for(reader.readexactly(len(RFB_BANNER)), 5) == RFB_BANNER
    assert progress[-1] == "Waiting for the display to come up"
    writer.close()


async def test_client_module_raises_deckard_errors_with_the_brokers_message(farm: Farm) -> None:
    with pytest.raises(Unauthenticated, match="wrong user name or password"):
        await broker_client.list_desktops(farm.server, "alice", "nope", farm.ca)
    with pytest.raises(NotFound):
        await broker_client.connect(farm.server, "alice", "pw-alice", farm.ca, 999999)
    with pytest.raises(PermissionDenied):
        await broker_client.connect(farm.server, "alice", "pw-alice", farm.ca, farm.bob_desk["id"])


async def test_wrong_password_is_401_with_the_basic_challenge(farm: Farm) -> None:
    c = await RawClient.open(farm)
    status, headers, _, _ = await c.request("/qvd/list_of_vm?", {"Authorization": basic("alice", "bad")})
    assert status == 401
    assert headers["www-authenticate"] == 'Basic realm="QVD"'
    status, headers, _, _ = await c.request(f"/qvd/connect_to_vm?id={farm.alice_desk['id']}", UPGRADE)
    assert status == 401 and headers["www-authenticate"] == 'Basic realm="QVD"'
    await c.close()


async def desktop_in(farm: Farm, desktop_id: int, states: tuple[str, ...]) -> Any:
    async def there() -> Any:
        row = await farm.desktop_row(desktop_id)
        return row if row.state in states and row.cmd is None else None

    return await farm.wait_for(f"the desktop to be {' or '.join(states)}", there)


async def test_a_head_start_runs_beside_the_password_check_and_a_wrong_password_stops_it(
    farm: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The desktop named by a connect starts while the password is checked; the wrong password's 401 (after the
    failure floor) stops it again, and the failure it counts ends head starts for the account until a login
    succeeds: a guesser starts one desktop, not one per guess."""
    desk_id = farm.alice_desk["id"]
    target = f"/qvd/connect_to_vm?id={desk_id}"
    started_during_check = asyncio.Event()
    verify = local_auth.verify_password_async

    async def check_once_started(password_hash: str | None, password: str) -> bool:
        # The first guess's check ends only once its head start is seen (or after wait_for's 10 s): on a loaded
        # machine the check and the failure floor could otherwise end before a poll sees the desktop starting.
        if password == "wrong":
            with contextlib.suppress(AssertionError):
                await desktop_in(farm, desk_id, ("starting", "running"))
                started_during_check.set()
        return await verify(password_hash, password)

    monkeypatch.setattr(local_auth, "verify_password_async", check_once_started)
    c = await RawClient.open(farm)
    c.send(target, {"Authorization": basic("alice", "wrong"), **UPGRADE})
    status, headers, _, _ = await c.response()
    assert started_during_check.is_set(), "the desktop did not start while the password was checked"
    assert (status, headers["x-deckard-error"]) == (401, "bad_credentials")
    row = await desktop_in(farm, desk_id, ("stopped",))
    assert row.failure_reason == "stopped: the login that started it failed"
    assert await farm.connection_rows(desk_id) == []

    c.send(target, {"Authorization": basic("alice", "wrong again"), **UPGRADE})
    assert (await c.response())[0] == 401
    row = await farm.desktop_row(desk_id)
    assert (row.state, row.cmd, row.failure_reason) == ("stopped", None, "stopped: the login that started it failed")
    assert (await c.request(target, {**ALICE, **UPGRADE}))[0] == 101  # the right password still connects
    await viewer_handshake(c.reader, c.writer)
    await c.close()


async def test_a_connect_during_a_failed_logins_head_start_keeps_the_desktop(
    farm: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone guessing alice's password starts her desktop just as she connects: her session has it, so the
    guess's 401 stops nothing."""
    alice_in = asyncio.Event()  # the guess is checked until alice is connected (on a loaded machine it could end first)
    verify = local_auth.verify_password_async

    async def slow_guess(password_hash: str | None, password: str) -> bool:
        if password == "guess":
            await alice_in.wait()
        return await verify(password_hash, password)

    monkeypatch.setattr(local_auth, "verify_password_async", slow_guess)
    desk_id = farm.alice_desk["id"]
    guesser = await RawClient.open(farm)
    guesser.send(f"/qvd/connect_to_vm?id={desk_id}", {"Authorization": basic("alice", "guess"), **UPGRADE})
    await desktop_in(farm, desk_id, ("starting", "running"))
    alice = await RawClient.open(farm)
    assert (await alice.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **UPGRADE}))[0] == 101
    await viewer_handshake(alice.reader, alice.writer)
    alice_in.set()
    assert (await guesser.response())[0] == 401
    await guesser.close()
    await asyncio.sleep(0.3)  # a withdrawal would be written by now
    row = await farm.desktop_row(desk_id)
    assert (row.state, row.cmd, row.user_state) == ("running", None, "connected")
    alice.writer.write(b"still here")
    assert await asyncio.wait_for(alice.reader.readexactly(10), 5) == b"still here"
    await alice.close()


async def test_qvd_clients_log_in_with_a_personal_token_and_a_totp_header(farm: Farm) -> None:
    """``--token`` sends ``Bearer base64(token)``; a second factor goes in ``Auth-<hex("totp")>``, and the connect
    that follows the list on one connection does not spend the code again."""
    user = (await identity.login_password(farm.db, "alice", "pw-alice")).user
    token, _row = await personal_tokens.create_token(farm.db, user, "qvd client")
    c = await RawClient.open(farm)
    status, _, body, _ = await c.request("/qvd/list_of_vm?", {"Authorization": "Bearer " + b64(token)})
    assert status == 200 and [d["name"] for d in json.loads(body)] == ["alice-desk"]
    status, headers, _, _ = await c.request("/qvd/list_of_vm?", {"Authorization": "Bearer " + b64("dku_forged")})
    assert (status, headers["x-deckard-error"]) == (401, "bad_token")
    await c.close()

    enrol = await second_factor.start_enrolment(farm.db, "user", user.id, "alice@default", "Deckard")
    totp = pyotp.TOTP(enrol["secret"])
    await second_factor.confirm_enrolment(farm.db, "user", user.id, totp.at(time.time() - 30))
    c = await RawClient.open(farm)
    status, headers, body, _ = await c.request("/qvd/list_of_vm?", ALICE)
    assert (status, headers["x-deckard-error"]) == (401, "totp_required") and b"6-digit code" in body
    with_code = {**ALICE, "Auth-" + b"totp".hex(): b64(totp.now())}
    status, _, _, _ = await c.request("/qvd/list_of_vm?", with_code)
    assert status == 200
    status, _, _, _ = await c.request(f"/qvd/connect_to_vm?id={farm.alice_desk['id']}", {**with_code, **UPGRADE})
    assert status == 101, "the connect reuses the list's login: the code is not refused as a replay"
    await c.close()
    c = await RawClient.open(farm)
    status, headers, _, _ = await c.request("/qvd/list_of_vm?", with_code)
    assert (status, headers["x-deckard-error"]) == (401, "second_factor_replayed")
    await c.close()


async def test_blocked_user_is_401(farm: Farm) -> None:
    await update_user(farm.db, SYSTEM, farm.alice_id, blocked=True)
    c = await RawClient.open(farm)
    status, _, body, _ = await c.request("/qvd/list_of_vm?", ALICE)
    assert status == 401 and b"blocked" in body
    await c.close()


@pytest.mark.parametrize(
    ("query", "headers", "status", "text"),
    [
        ("id=999999", {**ALICE, **UPGRADE}, 404, "no desktop"),
        ("id=BOB", {**ALICE, **UPGRADE}, 403, "another user"),
        ("id=ALICE", ALICE, 426, "Upgrade"),
        ("qvd.client.os=linux", {**ALICE, **UPGRADE}, 422, "no desktop id"),
        ("id=ALICE&qvd.client.os=linux&vm.network=x", {**ALICE, **UPGRADE}, 403, "vm.network"),
        ("id=ALICE&qvd.client.geometry=huge", {**ALICE, **UPGRADE}, 422, "1024x768"),
    ],
    ids=[
        "unknown-desktop-404",
        "other-users-desktop-403",
        "no-upgrade-426",
        "missing-id-422",
        "unknown-parameter-403",
        "bad-geometry-422",
    ],
)
async def test_connect_checks_refuse_before_any_session(
    farm: Farm, query: str, headers: dict[str, str], status: int, text: str
) -> None:
    query = query.replace("BOB", str(farm.bob_desk["id"])).replace("ALICE", str(farm.alice_desk["id"]))
    c = await RawClient.open(farm)
    got, _, body, infos = await c.request(f"/qvd/connect_to_vm?{query}", headers)
    assert (got, infos) == (status, [])
    assert text in body.decode()
    # the connection stays usable (keep-alive) and nothing was started or recorded
    assert (await c.request("/qvd/ping"))[0] == 200
    await c.close()
    assert await farm.connection_rows(farm.alice_desk["id"]) == []
    assert (await farm.desktop_row(farm.alice_desk["id"])).cmd is None


async def test_blocked_desktop_is_403_offline_for_maintenance(farm: Farm) -> None:
    await set_blocked(farm.db, SYSTEM, farm.alice_desk["id"], True)
    c = await RawClient.open(farm)
    status, _, body, _ = await c.request(f"/qvd/connect_to_vm?id={farm.alice_desk['id']}", {**ALICE, **UPGRADE})
    assert status == 403 and b"maintenance" in body
    listed = json.loads((await c.request("/qvd/list_of_vm?", ALICE))[2])
    assert listed[0]["blocked"] == 1
    await c.close()


async def test_unknown_path_is_404_and_wrong_method_is_405(farm: Farm) -> None:
    c = await RawClient.open(farm)
    assert (await c.request("/nothing/here"))[0] == 404
    status, headers, _, _ = await c.request("/qvd/list_of_vm", ALICE, method="POST")
    assert status == 405 and headers["allow"] == "GET"
    await c.close()


async def test_garbage_instead_of_http_gets_400_and_the_connection_closes(farm: Farm) -> None:
    c = await RawClient.open(farm)
    c.writer.write(b"\x16\x03\x01\x02\x00garbage that is not http\r\n\r\n")
    status_line, _ = await c.head()
    assert status_line == "HTTP/1.1 400 Bad Request"
    assert await closed_by_peer(c.reader)
    c2 = await RawClient.open(farm)
    c2.writer.write(b"HELLO THERE\r\n\r\n")
    assert (await c2.head())[0] == "HTTP/1.1 400 Bad Request"
    await c.close()
    await c2.close()


async def test_tls_handshake_failure_just_closes_and_the_broker_keeps_serving(farm: Farm) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", farm.broker.port)
    writer.write(b"GET /qvd/ping HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), 15) == b""
    writer.close()
    c = await RawClient.open(farm)
    assert (await c.request("/qvd/ping"))[0] == 200
    await c.close()


async def test_a_client_that_does_not_speak_rfb_is_dropped_before_the_display(farm: Farm) -> None:
    """Garbage after the 101 never reaches the display server (Xvnc would blacklist the broker's address)."""
    desk_id = farm.alice_desk["id"]
    c = await RawClient.open(farm)
    assert (await c.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **UPGRADE}))[0] == 101
    assert await c.reader.readexactly(len(RFB_BANNER)) == RFB_BANNER
    c.writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await closed_by_peer(c.reader)
    guest = farm.guest(desk_id)
    assert (guest.display_bytes, guest.auth_failures) == (0, 0)
    await c.close()
    # the same desktop still works for its owner
    c = await RawClient.open(farm)
    assert (await c.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **UPGRADE}))[0] == 101
    await viewer_handshake(c.reader, c.writer)
    await c.close()


@pytest.mark.databases("sqlite", "postgresql")
async def test_a_second_connect_takes_over_and_closes_the_first_tunnel(farm: Farm) -> None:
    desk_id = farm.alice_desk["id"]
    first = await RawClient.open(farm)
    assert (await first.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **UPGRADE}))[0] == 101
    assert await first.reader.readexactly(len(RFB_BANNER)) == RFB_BANNER
    second = await RawClient.open(farm)
    assert (await second.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **UPGRADE}))[0] == 101
    await viewer_handshake(second.reader, second.writer)
    assert await closed_by_peer(first.reader)
    second.writer.write(b"still here")
    assert await second.reader.readexactly(10) == b"still here"

    async def first_recorded() -> Any:
        rows = await farm.connection_rows(desk_id)
        return rows if rows[0].ended_at is not None else None

    rows = await farm.wait_for("the first connection to end", first_recorded)
    assert rows[0].result == "taken_over"
    assert "took over" in rows[0].reason
    assert rows[1].ended_at is None
    await farm.connected_row(desk_id)
    await second.close()
    await first.close()


async def test_a_display_already_up_is_dialled_beside_x_start_and_that_connection_is_the_tunnel(farm: Farm) -> None:
    """The broker opens the display connection while ``x_start`` runs; when ``x_start`` finds the display up, that
    connection carries the session (one connection per connect, never a second one)."""
    desk_id = farm.alice_desk["id"]
    first = await RawClient.open(farm)
    assert (await first.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **UPGRADE}))[0] == 101
    await viewer_handshake(first.reader, first.writer)
    guest = farm.guest(desk_id)
    assert guest.display_connects == 1  # the display was started by this x_start: the early dial was refused
    await first.close()
    second = await RawClient.open(farm)
    assert (await second.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **UPGRADE}))[0] == 101
    await viewer_handshake(second.reader, second.writer)
    second.writer.write(b"through")
    assert await second.reader.readexactly(7) == b"through"
    assert guest.display_connects == 2
    assert [m for m, _ in guest.calls].count("x_start") == 2
    await second.close()


@pytest.mark.databases("sqlite", "postgresql")
async def test_a_display_up_at_boot_is_relayed_before_the_agent_answers_and_x_start_follows(farm: Farm) -> None:
    """A guest whose display comes up with it (a container's boot script): the user's viewer gets the display
    while the agent is still starting, and the broker's ``x_start`` (the user checked, the keyboard set) follows
    once the agent answers, on the same tunnel."""
    c, desk_id = await relayed_before_the_agent(farm, 1.0)
    c.writer.write(b"before the agent")
    assert await c.reader.readexactly(16) == b"before the agent"
    desk = await farm.connected_row(desk_id)
    assert desk.state == "starting"
    assert desk.display_at is not None
    guest = farm.guest(desk_id)
    assert "x_start" not in [m for m, _ in guest.calls]

    async def x_started() -> bool:
        return "x_start" in [m for m, _ in guest.calls]

    await farm.wait_for("the broker's x_start once the agent answers", x_started)
    assert (await farm.desktop_row(desk_id)).state == "running"
    c.writer.write(b"after")
    assert await c.reader.readexactly(5) == b"after"
    assert guest.display_connects == 1
    row = (await farm.connection_rows(desk_id))[-1]
    assert row.connected_at is not None and row.ended_at is None
    await c.close()
    # the next start of the desktop dials only once its new guest has shown the display again
    farm.node.driver.display_at_boot = False
    farm.node.driver.agent_delay = 0.0
    await request_stop(farm.db, desk_id)

    async def stopped() -> bool:
        return bool((await farm.desktop_row(desk_id)).state == "stopped")

    await farm.wait_for("the desktop to stop", stopped)
    assert (await farm.desktop_row(desk_id)).display_at is not None  # kept at rest, cleared by the next claim
    c = await RawClient.open(farm)
    assert (await c.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **UPGRADE}))[0] == 101
    await viewer_handshake(c.reader, c.writer)
    assert [m for m, _ in farm.guest(desk_id).calls].count("x_start") == 1
    assert (await farm.desktop_row(desk_id)).display_at is None
    await c.close()


async def test_a_display_said_up_at_boot_that_never_listens_is_started_by_x_start_once_the_agent_answers(
    farm: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The boot script's Xvnc died (or never came): the dials before the agent are only a head start, so the
    connect goes the usual way once the agent answers and its ``x_start`` starts the display."""
    monkeypatch.setattr(FakeGuest, "resume_display", lambda *_args: None)  # said up at boot, never listening
    c, desk_id = await relayed_before_the_agent(farm, 0.3)
    assert (await farm.desktop_row(desk_id)).state == "running"
    assert [m for m, _ in farm.guest(desk_id).calls].count("x_start") == 1
    await c.close()


async def test_a_start_that_fails_after_its_display_was_relayed_ends_the_tunnel_with_the_reason(farm: Farm) -> None:
    c, desk_id = await relayed_before_the_agent(farm, 30.0)  # the agent never answers: the guest exits instead
    farm.guest(desk_id).exit()
    assert await closed_by_peer(c.reader)
    row = await farm.ended_connection(desk_id)
    assert row.result == "failed" and "exited during start" in row.reason
    desk = await farm.desktop_row(desk_id)
    assert (desk.state, desk.user_state) == ("failed", "disconnected")
    await c.close()


async def test_an_x_start_refused_after_the_display_was_relayed_ends_the_tunnel_with_the_agents_reason(
    farm: Farm,
) -> None:
    c, desk_id = await relayed_before_the_agent(farm, 0.5)
    guest = farm.guest(desk_id)
    guest.agent.x.state = "stopped"  # the agent lost the display before the broker's x_start came
    guest.x_start_error = "Xvnc exited at start; see /run/deckard/xvnc.log"
    assert await closed_by_peer(c.reader)
    row = await farm.ended_connection(desk_id)
    assert row.result == "failed" and "Xvnc exited at start" in row.reason
    assert (await farm.desktop_row(desk_id)).user_state == "disconnected"
    await c.close()


async def test_client_leaving_during_the_start_is_recorded_aborted_and_the_start_goes_on(farm: Farm) -> None:
    farm.node.driver.start_delay = 1.0
    desk_id = farm.alice_desk["id"]
    c = await RawClient.open(farm)
    c.send(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **UPGRADE})
    status_line, _ = await c.head()
    assert status_line == "HTTP/1.1 102 Processing"
    c.writer.transport.abort()  # the user closed the client window

    async def aborted() -> Any:
        rows = await farm.connection_rows(desk_id)
        return rows if rows and rows[-1].ended_at is not None else None

    rows = await farm.wait_for("the connection to be recorded", aborted)
    assert rows[-1].result == "aborted"
    assert (await farm.desktop_row(desk_id)).user_state == "disconnected"

    async def running() -> bool:
        return bool((await farm.desktop_row(desk_id)).state == "running")

    await farm.wait_for("the desktop to run anyway", running)
    assert (await farm.desktop_row(desk_id)).user_state == "disconnected"


@pytest.mark.databases("sqlite", "postgresql")
async def test_failed_start_is_503_with_the_nodes_reason(farm: Farm) -> None:
    farm.node.driver.start_error = "the image is corrupt: rebuild it"
    farm.node.driver.start_delay = 0.3  # the broker sees the start under way (a 102) before it fails
    desk_id = farm.alice_desk["id"]
    c = await RawClient.open(farm)
    status, _, body, infos = await c.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **UPGRADE})
    assert status == 503
    text = body.decode()
    assert text.startswith("The requested desktop is not available: ")
    assert "the image is corrupt: rebuild it" in text and text.endswith(", retry later.")
    assert infos
    rows = await farm.connection_rows(desk_id)
    assert rows[-1].result == "failed" and "image is corrupt" in rows[-1].reason
    assert (await farm.desktop_row(desk_id)).user_state == "disconnected"
    await c.close()
    with pytest.raises(Unavailable, match="image is corrupt"):
        await broker_client.connect(farm.server, "alice", "pw-alice", farm.ca, desk_id)


async def test_a_display_that_fails_to_start_is_503_with_the_agents_reason(farm: Farm) -> None:
    farm.node.driver.x_start_error = "Xvnc exited at start; see /run/deckard/xvnc.log"
    desk_id = farm.alice_desk["id"]
    c = await RawClient.open(farm)
    status, _, body, _ = await c.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **UPGRADE})
    assert status == 503
    assert "Xvnc exited at start" in body.decode()
    rows = await farm.connection_rows(desk_id)
    assert rows[-1].result == "failed" and "Xvnc exited at start" in rows[-1].reason
    desk = await farm.desktop_row(desk_id)
    assert (desk.state, desk.user_state) == ("running", "disconnected")  # only the display failed
    await c.close()


async def test_stop_vm_asks_the_node_to_stop(farm: Farm) -> None:
    desk_id = farm.alice_desk["id"]
    c = await RawClient.open(farm)
    assert (await c.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **UPGRADE}))[0] == 101
    await c.close()
    guest = farm.guest(desk_id)
    c = await RawClient.open(farm)
    status, _, body, _ = await c.request(f"/qvd/stop_vm?id={desk_id}", ALICE)
    assert (status, body) == (200, b"Machine stopped")

    async def stopped() -> bool:
        return bool((await farm.desktop_row(desk_id)).state == "stopped")

    await farm.wait_for("the node to stop the desktop", stopped)
    assert ("poweroff", {}) in guest.calls and not guest.running
    assert (await c.request(f"/qvd/stop_vm?id={farm.bob_desk['id']}", ALICE))[0] == 403
    assert (await c.request("/qvd/stop_vm", ALICE))[0] == 422
    await c.close()


async def test_closing_the_broker_closes_tunnels_and_records_them(farm: Farm) -> None:
    desk_id = farm.alice_desk["id"]
    c = await RawClient.open(farm)
    assert (await c.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **UPGRADE}))[0] == 101
    assert await c.reader.readexactly(len(RFB_BANNER)) == RFB_BANNER
    await farm.broker.close()
    assert await closed_by_peer(c.reader)
    rows = await farm.connection_rows(desk_id)
    assert (rows[-1].result, rows[-1].reason) == ("closed", "broker shutting down")
    await c.close()


# ---------------------------------------------------------------- NX: QVD's clients


async def test_a_qvd_client_gets_nx_with_its_options_and_the_broker_supplies_the_cookie(farm: Farm) -> None:
    """No ``X-Deckard-Display``: the agent starts nxagent with the client's options, and nxproxy's first fields
    reach it with the desktop's cookie (the client's own is dropped); then bytes flow both ways."""
    desk_id = farm.alice_desk["id"]
    c = await RawClient.open(farm)
    status, headers, _, _ = await c.request(f"/qvd/connect_to_vm?id={desk_id}&{QVD_PARAMS}", {**ALICE, **QVD_UPGRADE})
    assert status == 101 and headers["upgrade"] == "QVD/1.0"
    c.writer.write(b"NXPROXY-3.5.0-3.5.99.26 cookie=guessed,stream=default,data=default hello nx")
    assert await asyncio.wait_for(c.reader.readexactly(8), 5) == b"hello nx"  # nothing before: nxproxy speaks first
    guest = farm.guest(desk_id)
    cookie = nx_cookie(guest.spec.agent_token)
    assert guest.nx_options == [f"NXPROXY-3.5.0-3.5.99.26 cookie={cookie},stream=default,data=default"]
    x_start = [params for method, params in guest.calls if method == "x_start"][-1]
    slave_key = headers["x-qvd-slave-key"]  # this connect's key to its slave channel (shared folders)
    assert len(slave_key) == 64 and slave_key.isalnum()
    assert {k: v for k, v in x_start.items() if k.startswith(("nx_", "protocol"))} == {
        "protocol": "nx",
        "nx_keyboard": "pc105/es",
        "nx_link": "adsl",
        "nx_fullscreen": "0",
        "nx_client": "linux",
        "nx_slave_key": slave_key,
        "nx_printing": "1",  # the client asked (qvd.client.printing.enabled=1) and nx.printing.enabled is on
    }
    x_state = guest.agent.call("x_state", {})
    assert (x_state["state"], x_state["protocol"]) == ("connected", "nx")
    await c.close()


async def test_bad_nx_options_are_refused_before_anything_starts(farm: Farm) -> None:
    desk_id = farm.alice_desk["id"]
    c = await RawClient.open(farm)
    for query, code in (
        ("qvd.client.link=warp", "bad_nx_option"),
        ("qvd.client.nxagent.extra_args=-display%20evil", "bad_nx_option"),
        ("qvd.client.frobnicate=1", "unsupported_client_parameter"),
    ):
        status, headers, body, _ = await c.request(f"/qvd/connect_to_vm?id={desk_id}&{query}", {**ALICE, **QVD_UPGRADE})
        assert (status, headers["x-deckard-error"]) == (422, code), body
    assert (await farm.desktop_row(desk_id)).state == "stopped"
    await c.close()


async def test_a_vnc_client_takes_an_nx_session_over_and_a_qvd_client_takes_it_back(farm: Farm) -> None:
    """One session whatever the client: a VNC client (the browser, deckard connect) is shown the NX session (the
    agent's view of it on the display port) and the QVD client is cut off; a QVD client takes it back."""
    desk_id = farm.alice_desk["id"]
    nx = await RawClient.open(farm)
    assert (await nx.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **QVD_UPGRADE}))[0] == 101
    nx.writer.write(NXPROXY_FIRST + b"ping")
    assert await asyncio.wait_for(nx.reader.readexactly(4), 5) == b"ping"
    vnc = await RawClient.open(farm)
    assert (await vnc.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **UPGRADE}))[0] == 101
    await viewer_handshake(vnc.reader, vnc.writer)
    vnc.writer.write(b"seen")
    assert await asyncio.wait_for(vnc.reader.readexactly(4), 5) == b"seen"
    assert await closed_by_peer(nx.reader)
    x_state = farm.guest(desk_id).agent.call("x_state", {})
    assert x_state["protocol"] == "nx"  # still the NX session, shown to the VNC client

    back = await RawClient.open(farm)
    assert (await back.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **QVD_UPGRADE}))[0] == 101
    back.writer.write(NXPROXY_FIRST + b"pong")
    assert await asyncio.wait_for(back.reader.readexactly(4), 5) == b"pong"
    assert await closed_by_peer(vnc.reader)
    for c in (back, vnc, nx):
        await c.close()


async def test_a_qvd_client_is_shown_the_vnc_session_a_browser_opened(farm: Farm) -> None:
    """The other way round: a VNC client's session is shown to a QVD client (nxagent's shadow of it), which
    takes the desktop over; the VNC session itself stays."""
    desk_id = farm.alice_desk["id"]
    vnc = await RawClient.open(farm)
    assert (await vnc.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **UPGRADE}))[0] == 101
    await viewer_handshake(vnc.reader, vnc.writer)
    nx = await RawClient.open(farm)
    assert (await nx.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **QVD_UPGRADE}))[0] == 101
    nx.writer.write(NXPROXY_FIRST + b"ping")
    assert await asyncio.wait_for(nx.reader.readexactly(4), 5) == b"ping"
    assert await closed_by_peer(vnc.reader)
    x_state = farm.guest(desk_id).agent.call("x_state", {})
    assert (x_state["protocol"], x_state["shadowed"]) == ("vnc", True)
    again = await RawClient.open(farm)  # and the browser takes it back: the same Xvnc session
    assert (await again.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **UPGRADE}))[0] == 101
    await viewer_handshake(again.reader, again.writer)
    assert await closed_by_peer(nx.reader)
    for c in (again, nx, vnc):
        await c.close()


async def test_garbage_instead_of_nxproxy_never_reaches_nxagent(farm: Farm) -> None:
    desk_id = farm.alice_desk["id"]
    c = await RawClient.open(farm)
    assert (await c.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **QVD_UPGRADE}))[0] == 101
    c.writer.write(RFB_BANNER)
    assert await closed_by_peer(c.reader)
    assert farm.guest(desk_id).nx_options == []
    await c.close()


async def test_a_qvd_client_gone_right_after_the_101_never_reaches_nxagent(farm: Farm) -> None:
    """nxagent aborts a session whose proxy leaves mid-negotiation: the broker dials it only once nxproxy's first
    fields are in, so a client that leaves first leaves the session alone."""
    desk_id = farm.alice_desk["id"]
    c = await RawClient.open(farm)
    assert (await c.request(f"/qvd/connect_to_vm?id={desk_id}", {**ALICE, **QVD_UPGRADE}))[0] == 101
    c.writer.write(b"NXPROXY-3.5.0-3.5")  # half of the first field, then gone
    await c.close()

    async def recorded() -> Any:
        rows = await farm.connection_rows(desk_id)
        return rows if rows and rows[-1].ended_at is not None else None

    await farm.wait_for("the connection to be recorded", recorded)
    guest = farm.guest(desk_id)
    assert (guest.nx_options, guest.auth_failures) == ([], 0)
    assert guest.agent.call("x_state", {})["state"] == "listening"
