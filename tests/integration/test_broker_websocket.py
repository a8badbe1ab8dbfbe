"""The browser's path: portal API tickets and the broker's WebSocket, against a real database and broker.

Real: the Broker with the farm's TLS, the database (SQLite and PostgreSQL), the services, the portal API (in
process through httpx's ASGI transport).  Fake, as in ``test_broker_protocol.py`` whose fixtures are reused: the
node daemon and the guest (agent + a display that sends the RFB banner and then echoes).
"""

# ruff: noqa: F811  (tests take the imported ``farm`` fixture as a parameter)

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_broker_protocol import (
    BROKER_SECURITY,
    DISPLAY_ECHO,
    VIEWER_HANDSHAKE,
    Farm,
    farm,  # noqa: F401  (the fixture)
)

from deckard.api.app import create_app
from deckard.broker.frames import unmask
from deckard.broker.websocket import ViewOnlyFilter
from deckard.model.errors import Unauthenticated
from deckard.runtime.settings import Settings
from deckard.runtime.tls import client_context
from deckard.services import identity, tickets
from deckard.services.admins import login_admin

# The WebSocket path is the subject, not SQL: SQLite, but for one whole connect.
DATABASES = ["sqlite"]

RFB_BANNER = b"RFB 003.008\n"


class WsClient:
    """A minimal masked-frame WebSocket client over TLS (what a browser does, byte for byte)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, farm: Farm, target: str, protocols: str = "binary") -> tuple[WsClient, int, dict[str, str]]:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", farm.broker.port, ssl=client_context(farm.ca), server_hostname="127.0.0.1"
        )
        key = base64.b64encode(os.urandom(16)).decode()
        head = (
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{farm.broker.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {protocols}\r\nOrigin: https://127.0.0.1\r\n\r\n"
        )
        writer.write(head.encode())
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
        lines = raw.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        if status != 101 and "content-length" in headers:
            await reader.readexactly(int(headers["content-length"]))
        return cls(reader, writer), status, headers

    def send(self, payload: bytes, opcode: int = 2) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        self.writer.write(head + mask + unmask(payload, mask))

    async def frame(self, timeout: float = 15) -> tuple[int, bytes]:
        async def read() -> tuple[int, bytes]:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            assert not b1 & 0x80, "server frames are never masked"
            return b0 & 0x0F, await self.reader.readexactly(n)

        return await asyncio.wait_for(read(), timeout)

    async def binary(self, size: int) -> bytes:
        """Read binary frames until ``size`` bytes arrived (text frames are progress, kept aside)."""
        out = b""
        while len(out) < size:
            op, data = await self.frame()
            assert op in (1, 2), (op, data)
            if op == 2:
                out += data
        return out

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


async def connect_ticket(farm: Farm, login: str = "alice", password: str = "pw-alice") -> str:
    user = (await identity.login_password(farm.db, login, password)).user
    ticket, _exp = await tickets.issue_connect_ticket(farm.db, user, farm.alice_desk["id"])
    return ticket


@pytest.mark.databases("sqlite", "postgresql")
async def test_browser_connects_with_a_ticket_gets_progress_then_vnc_bytes_both_ways(farm: Farm) -> None:
    farm.node.driver.start_delay = 0.3
    desk_id = farm.alice_desk["id"]
    ticket = await connect_ticket(farm)
    ws, status, headers = await WsClient.open(farm, f"/qvd/connect_to_vm?id={desk_id}&ticket={ticket}")
    assert status == 101
    assert headers["upgrade"].lower() == "websocket" and headers["sec-websocket-protocol"] == "binary"
    progress = []
    while True:
        op, data = await ws.frame()
        if op == 1:
            progress.append(json.loads(data)["progress"])
            continue
        assert op == 2
        break
    assert "Starting desktop" in progress or any("start" in p for p in progress)
    assert progress[-1] == "Waiting for the display to come up"
    banner = data if len(data) >= 12 else data + await ws.binary(12 - len(data))
    assert banner == RFB_BANNER
    ws.send(VIEWER_HANDSHAKE)
    assert await ws.binary(len(BROKER_SECURITY) + len(DISPLAY_ECHO)) == BROKER_SECURITY + DISPLAY_ECHO
    big = os.urandom(200_000)  # 64-bit length frame, bulk unmasking
    ws.send(b"hello")
    ws.send(big)
    assert await ws.binary(5 + len(big)) == b"hello" + big
    row = await farm.connected_row(desk_id)
    assert row.session_id
    ws.send(struct.pack("!H", 1000), opcode=8)
    op, data = await ws.frame()
    assert op == 8 and struct.unpack("!H", data[:2])[0] == 1000
    await ws.close()
    rows = await farm.wait_for("the connection to be recorded", lambda: _ended(farm, desk_id))
    assert rows[-1].protocol == "websocket" and rows[-1].result == "closed"
    assert rows[-1].bytes_in >= 5 + len(big) and rows[-1].bytes_out >= 12 + 5 + len(big)


async def _ended(farm: Farm, desk_id: int) -> Any:
    rows = await farm.connection_rows(desk_id)
    return rows if rows and rows[-1].ended_at is not None else None


async def test_a_ticket_is_single_use_and_bad_or_expired_ones_get_401_before_the_upgrade(farm: Farm) -> None:
    desk_id = farm.alice_desk["id"]
    ticket = await connect_ticket(farm)
    ws, status, _ = await WsClient.open(farm, f"/ws/connect?ticket={ticket}")
    assert status == 101
    await ws.close()
    again, status, _ = await WsClient.open(farm, f"/ws/connect?ticket={ticket}")
    assert status == 401, "a used ticket must not open a second connection"
    await again.close()
    for bad in ("", "dkt_nonsense", "x"):
        c, status, _ = await WsClient.open(farm, f"/ws/connect?ticket={bad}")
        assert status == 401
        await c.close()
    # expired: issue one, then age it in the database
    ticket = await connect_ticket(farm)
    import datetime as dt

    import sqlalchemy as sa

    from deckard.db import schema as t

    async with farm.db.begin() as conn:
        await conn.execute(
            sa.update(t.tickets)
            .where(t.tickets.c.token_hash == tickets._hash(ticket))
            .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
    c, status, _ = await WsClient.open(farm, f"/ws/connect?ticket={ticket}")
    assert status == 401
    await c.close()
    with pytest.raises(Unauthenticated):
        await tickets.redeem_ticket(farm.db, ticket)
    # a ticket for one desktop does not open another
    ticket = await connect_ticket(farm)
    c, status, _ = await WsClient.open(farm, f"/qvd/connect_to_vm?id={farm.bob_desk['id']}&ticket={ticket}")
    assert status == 403
    await c.close()
    assert desk_id


async def test_a_failed_start_closes_the_websocket_with_1011_and_the_reason(farm: Farm) -> None:
    farm.node.driver.start_error = "no space left on the node"
    ticket = await connect_ticket(farm)
    ws, status, _ = await WsClient.open(farm, f"/ws/connect?ticket={ticket}")
    assert status == 101
    while True:
        op, data = await ws.frame()
        if op == 8:
            break
    assert struct.unpack("!H", data[:2])[0] == 1011
    assert "no space left on the node" in data[2:].decode()
    await ws.close()


async def test_spy_watches_without_taking_over_and_drops_input_unless_interactive(farm: Farm, tmp_path: Path) -> None:
    desk_id = farm.alice_desk["id"]
    user_ws, status, _ = await WsClient.open(farm, f"/ws/connect?ticket={await connect_ticket(farm)}")
    assert status == 101
    assert await user_ws.binary(12) == RFB_BANNER
    session_before = (await farm.desktop_row(desk_id)).session_id
    assert session_before

    app = create_app(farm.db, Settings(home=tmp_path))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://api.test") as http:
        admin_password = await _admin_password(farm)
        token, _ = await login_admin(farm.db, "admin", admin_password, tenant=None, hours=1, source="test")
        res = await http.post(f"/api/v1/desktops/{desk_id}/spy-ticket", headers={"Authorization": f"Bearer {token}"})
        assert res.status_code == 200, res.text
        spy_ticket = res.json()["ticket"]
        assert res.json()["broker_ws_url"].startswith("wss://")

    spy, status, _ = await WsClient.open(farm, f"/ws/connect?ticket={spy_ticket}")
    assert status == 101
    assert await spy.binary(12) == RFB_BANNER
    # the RFB handshake and a framebuffer request pass, a key event does not; ClientInit is forced to shared
    key_event = bytes([4, 1, 0, 0, 0, 0, 0, 0x61])
    fbur = bytes([3, 0, 0, 0, 0, 0, 4, 0, 3, 0])
    spy.send(RFB_BANNER + b"\x01" + b"\x00" + key_event + fbur)
    assert await spy.binary(len(BROKER_SECURITY) + len(DISPLAY_ECHO) + 10) == BROKER_SECURITY + DISPLAY_ECHO + fbur
    guest = farm.guest(desk_id)
    notice = ("spy_notice", {"admin": "admin", "interactive": "0"})

    async def notified() -> bool:
        return notice in guest.calls

    await farm.wait_for("the user to be told about the spy", notified)
    row = await farm.desktop_row(desk_id)
    assert row.session_id == session_before and row.user_state == "connected", "the spy must not take over"
    user_ws.send(VIEWER_HANDSHAKE)
    assert await user_ws.binary(len(BROKER_SECURITY) + len(DISPLAY_ECHO)) == BROKER_SECURITY + DISPLAY_ECHO
    user_ws.send(b"still mine")
    assert await user_ws.binary(10) == b"still mine"
    await spy.close()
    await user_ws.close()


async def _admin_password(farm: Farm) -> str:
    # the farm fixture bootstrapped before us; set a known password for the built-in admin
    import sqlalchemy as sa

    from deckard.auth.local import hash_password
    from deckard.db import schema as t

    async with farm.db.begin() as conn:
        await conn.execute(
            sa.update(t.administrators)
            .where(t.administrators.c.name == "admin")
            .values(password_hash=hash_password("admin-pw"))
        )
    return "admin-pw"


async def test_portal_api_login_list_ticket_stop_and_reset(farm: Farm, tmp_path: Path) -> None:
    app = create_app(farm.db, Settings(home=tmp_path))
    desk_id = farm.alice_desk["id"]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://portal.test") as http:
        res = await http.post("/portal/login", json={"login": "alice", "password": "wrong"})
        assert res.status_code == 401
        res = await http.post("/portal/login", json={"login": "alice", "password": "pw-alice"})
        assert res.status_code == 200
        auth = {"Authorization": f"Bearer {res.json()['token']}"}
        assert (await http.get("/portal/desktops")).status_code == 401
        listed = (await http.get("/portal/desktops", headers=auth)).json()
        assert [(d["id"], d["state"]) for d in listed] == [(desk_id, "stopped")]
        res = await http.post(f"/portal/desktops/{farm.bob_desk['id']}/ticket", headers=auth)
        assert res.status_code == 403, "another user's desktop"
        res = await http.post(f"/portal/desktops/{desk_id}/ticket", headers=auth)
        assert res.status_code == 200
        body = res.json()
        assert body["broker_ws_url"].startswith("wss://portal.test:") and body["ticket"] in body["broker_ws_url"]
        overlay = Settings(home=tmp_path).paths.overlay(desk_id)
        overlay.mkdir(parents=True)
        (overlay / "junk").write_text("x")
        res = await http.post(f"/portal/desktops/{desk_id}/reset", headers=auth)
        assert res.status_code == 200, res.text
        assert not overlay.exists()
        # running: reset is refused with a clear 409, stop works
        ws, status, _ = await WsClient.open(farm, f"/ws/connect?ticket={body['ticket']}")
        assert status == 101 and await ws.binary(12) == RFB_BANNER
        res = await http.post(f"/portal/desktops/{desk_id}/reset", headers=auth)
        assert res.status_code == 409 and "stop it first" in res.json()["error"]["message"]
        res = await http.post(f"/portal/desktops/{desk_id}/stop", headers=auth)
        stopping = res.json()
        # the node may have claimed the stop already (cmd cleared, state stopping or stopped): either is the stop
        assert res.status_code == 200 and (stopping["cmd"] == "stop" or stopping["state"] in ("stopping", "stopped"))
        await ws.close()
        await http.post("/portal/logout", headers=auth)
        assert (await http.get("/portal/desktops", headers=auth)).status_code == 401


def test_view_only_filter_keeps_viewer_messages_and_drops_input_split_anywhere() -> None:
    stream = (
        RFB_BANNER
        + b"\x01\x00"
        + bytes([0]) + bytes(19)  # SetPixelFormat
        + bytes([2, 0, 0, 2]) + bytes(8)  # SetEncodings (2)
        + bytes([5, 1, 0, 1, 0, 2])  # PointerEvent: dropped
        + bytes([6, 0, 0, 0, 0, 0, 0, 3]) + b"abc"  # ClientCutText: dropped
        + bytes([255, 0]) + bytes(10)  # QEMU extended key: dropped
        + bytes([3, 1, 0, 0, 0, 0, 0, 10, 0, 10])  # FramebufferUpdateRequest
    )  # fmt: skip
    expected = RFB_BANNER + b"\x01\x01" + bytes([0]) + bytes(19) + bytes([2, 0, 0, 2]) + bytes(8)
    expected += bytes([3, 1, 0, 0, 0, 0, 0, 10, 0, 10])
    for step in (1, 3, 7, len(stream)):
        f = ViewOnlyFilter()
        out = b"".join(f.feed(stream[i : i + step]) for i in range(0, len(stream), step))
        assert out == expected
        assert f.dropped == 3


def test_unmask_matches_a_byte_by_byte_xor() -> None:
    for n in (0, 1, 3, 4, 5, 1000, 65537):
        data, key = os.urandom(n), os.urandom(4)
        assert unmask(data, key) == bytes(b ^ key[i % 4] for i, b in enumerate(data))
