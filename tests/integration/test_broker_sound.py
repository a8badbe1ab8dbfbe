"""The desktop's sound through the broker (``/ws/sound``), against a real database, broker and portal tickets.

Real: the Broker with the farm's TLS, the database (SQLite and PostgreSQL), tickets and configuration.  The desktop
is the fake guest of ``test_broker_protocol.py``; the agent's ``/sound`` route is replaced by a double of
``client/agent_sound.AgentSound`` fed by the test (the agent's side is ``tests/unit/test_vma_sound.py``, the whole
path with a real container and Chromium ``tests/e2e/test_standard_peripherals.py``).
"""

# ruff: noqa: F811  (tests take the imported ``farm`` fixture as a parameter)

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from test_broker_files import _running
from test_broker_protocol import Farm, farm  # noqa: F401  (the fixture)
from test_broker_websocket import WsClient, connect_ticket

from deckard.api.app import create_app
from deckard.broker import sound as broker_sound
from deckard.client.agent_sound import AgentSoundError
from deckard.model.errors import Conflict, NotFound, PermissionDenied
from deckard.runtime.settings import Settings
from deckard.services import config, identity, portal, tickets
from deckard.services.context import SYSTEM

# the subject is the sound relay;
# the connect path's SQL runs on PostgreSQL in test_broker_protocol.py
DATABASES = ["sqlite"]

HEADER = {"codec": "opus", "rate": 48000, "channels": 2, "frame_ms": 20, "bitrate": 96000, "pre_skip": 312}


class FakeSound:
    """The agent's sound route as the broker sees it: packets the test puts in a queue (a layer double)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[list[tuple[int, bytes]] | None] = asyncio.Queue()
        self.refusal: AgentSoundError | None = None
        self.opened = self.closed = 0
        self.sessions: list[broker_sound.SoundSession] = []

    def __call__(self, *_args: Any, **_kw: Any) -> FakeSound:
        return self

    @asynccontextmanager
    async def stream(self) -> AsyncIterator[tuple[dict[str, Any], AsyncIterator[list[tuple[int, bytes]]]]]:
        if self.refusal is not None:
            raise self.refusal
        self.opened += 1

        async def batches() -> AsyncIterator[list[tuple[int, bytes]]]:
            while (batch := await self.queue.get()) is not None:
                self.queue.task_done()
                yield batch

        try:
            yield HEADER, batches()
        finally:
            self.closed += 1


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> FakeSound:
    double = FakeSound()
    monkeypatch.setattr(broker_sound, "AgentSound", double)

    class Recorded(broker_sound.SoundSession):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            double.sessions.append(self)

    monkeypatch.setattr(broker_sound, "SoundSession", Recorded)
    return double


async def _sound_ticket(farm: Farm, login: str = "alice", password: str = "pw-alice") -> str:
    user = (await identity.login_password(farm.db, login, password)).user
    ticket, _ = await tickets.issue_sound_ticket(farm.db, user, farm.alice_desk["id"])
    return ticket


async def _open(farm: Farm, ticket: str, desk_id: int | None = None) -> tuple[WsClient, int, dict[str, str]]:
    return await WsClient.open(farm, f"/ws/sound?id={desk_id or farm.alice_desk['id']}&ticket={ticket}")


async def _until_closed(agent: FakeSound, sessions: int = 1) -> None:
    for _ in range(200):
        if agent.closed >= sessions:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the agent's stream was not closed")


async def test_packets_come_through_in_order_after_the_header_and_the_capture_ends_with_the_page(
    farm: Farm, agent: FakeSound
) -> None:
    await _running(farm)
    ws, status, headers = await _open(farm, await _sound_ticket(farm))
    assert status == 101, headers
    op, data = await ws.frame()
    assert (op, json.loads(data)) == (1, {"ready": HEADER})
    sent = [(1_700_000_000_000_000 + n * 20_000, bytes([n % 256]) * (50 + n)) for n in range(120)]
    for i in range(0, len(sent), 7):
        agent.queue.put_nowait(sent[i : i + 7])
    got = []
    for _ in sent:
        op, data = await ws.frame()
        assert op == 2
        got.append((struct.unpack(">Q", data[:8])[0], data[8:]))
    assert got == sent
    ws.send(b"ping!", opcode=9)
    assert await ws.frame() == (10, b"ping!")
    ws.send(struct.pack("!H", 1000), opcode=8)
    assert (await ws.frame())[0] == 8
    await ws.close()
    await _until_closed(agent)  # the browser left: the agent's capture is let go


async def test_a_slow_browser_loses_the_oldest_packets_and_the_broker_holds_a_bounded_amount(
    farm: Farm, agent: FakeSound
) -> None:
    await _running(farm)
    ws, status, _ = await _open(farm, await _sound_ticket(farm))
    assert status == 101
    assert (await ws.frame())[0] == 1
    session = agent.sessions[-1]
    # 40 s of 1 kB packets while the browser reads nothing: far more than the kernel's socket buffers hold
    packet = b"\x55" * 1000
    peak_buffer = peak_queue = 0
    for n in range(0, 40_000, 100):
        agent.queue.put_nowait([(n + i, packet) for i in range(100)])
        await agent.queue.join()
        await asyncio.sleep(0)  # the batch is offered once the pump runs again
        peak_buffer = max(peak_buffer, session._buffered())
        peak_queue = max(peak_queue, len(session.queue))
    assert session.dropped > 1000, session.dropped
    assert peak_queue <= broker_sound.QUEUE_PACKETS
    assert peak_buffer <= broker_sound.SEND_BUFFER + len(packet) + 8 + 14, peak_buffer
    # the browser reads again: what it gets is in order and ends with the newest packet
    agent.queue.put_nowait([(99_999, b"last")])
    last = -1
    while True:
        op, data = await ws.frame()
        assert op == 2
        ts = struct.unpack(">Q", data[:8])[0]
        assert ts > last
        last = ts
        if ts == 99_999:
            break
    await ws.close()
    await _until_closed(agent)


@pytest.mark.usefixtures("agent")
async def test_only_the_owners_sound_ticket_opens_the_channel_once(farm: Farm) -> None:
    desk_id = farm.alice_desk["id"]
    alice = (await identity.login_password(farm.db, "alice", "pw-alice")).user
    with pytest.raises(Conflict) as early:
        await tickets.issue_sound_ticket(farm.db, alice, desk_id)
    assert early.value.code == "not_running"
    await _running(farm)
    for other in (
        await connect_ticket(farm),
        (await tickets.issue_files_ticket(farm.db, alice, desk_id))[0],
        # an administrator's spy ticket for the desktop (what /spy-ticket stores): a spy hears nothing
        (await tickets._store(farm.db, tickets.SPY, 30, user_id=alice.id, admin_id=1, desktop_id=desk_id))[0],
    ):
        _ws, status, headers = await _open(farm, other)
        assert (status, headers["x-deckard-error"]) == (401, "bad_ticket")
    sound = await _sound_ticket(farm)
    _ws, status, _ = await WsClient.open(farm, f"/ws/connect?id={desk_id}&ticket={sound}")
    assert status == 401  # nor does a sound ticket open the display
    sound = await _sound_ticket(farm)
    _ws, status, headers = await _open(farm, sound, desk_id=farm.bob_desk["id"])
    assert (status, headers["x-deckard-error"]) == (403, "ticket_mismatch")
    ws, status, _ = await _open(farm, sound)  # not used up by the mismatch
    assert status == 101
    await ws.close()
    _ws, status, headers = await _open(farm, sound)
    assert (status, headers["x-deckard-error"]) == (401, "bad_ticket")  # replayed
    bob = (await identity.login_password(farm.db, "bob", "pw-bob")).user
    with pytest.raises((PermissionDenied, NotFound)):
        await tickets.issue_sound_ticket(farm.db, bob, desk_id)  # not his desktop


async def test_the_switch_refuses_tickets_and_channels_and_the_list_says_so(farm: Farm, agent: FakeSound) -> None:
    await _running(farm)
    alice = (await identity.login_password(farm.db, "alice", "pw-alice")).user
    listed = await portal.list_own_desktops(farm.db, alice)
    assert next(d for d in listed if d["id"] == farm.alice_desk["id"])["features"]["sound"] is True
    ticket = await _sound_ticket(farm)
    await config.set_config(farm.db, SYSTEM, "portal.sound.enabled", False)
    try:
        _ws, status, headers = await _open(farm, ticket)
        assert (status, headers["x-deckard-error"]) == (403, "sound_disabled")
        with pytest.raises(PermissionDenied) as refused:
            await tickets.issue_sound_ticket(farm.db, alice, farm.alice_desk["id"])
        assert refused.value.code == "sound_disabled"
        listed = await portal.list_own_desktops(farm.db, alice)
        assert next(d for d in listed if d["id"] == farm.alice_desk["id"])["features"]["sound"] is False
    finally:
        await config.set_config(farm.db, SYSTEM, "portal.sound.enabled", True)
    assert agent.opened == 0


async def test_a_desktop_without_sound_says_no_sound_and_closes(farm: Farm, agent: FakeSound) -> None:
    await _running(farm)
    agent.refusal = AgentSoundError("no_sound", "this desktop has no sound (its image has no audio server)")
    ws, status, _ = await _open(farm, await _sound_ticket(farm))
    assert status == 101
    op, data = await ws.frame()
    assert op == 1 and json.loads(data)["error"]["code"] == "no_sound"
    op, data = await ws.frame()
    assert op == 8 and struct.unpack("!H", data[:2])[0] == 1000
    await ws.close()


async def test_the_portal_api_gives_the_owner_a_sound_ticket_for_ws_sound(farm: Farm, tmp_path: Any) -> None:
    await _running(farm)
    app = create_app(farm.db, Settings(home=tmp_path))
    desk_id = farm.alice_desk["id"]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://portal.test") as http:
        token = (await http.post("/portal/login", json={"login": "alice", "password": "pw-alice"})).json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        listed = (await http.get("/portal/desktops", headers=auth)).json()
        assert next(d for d in listed if d["id"] == desk_id)["features"]["sound"] is True
        res = await http.post(f"/portal/desktops/{desk_id}/ticket", json={"purpose": "sound"}, headers=auth)
        assert res.status_code == 200, res.text
        assert f"/ws/sound?id={desk_id}&ticket=" in res.json()["broker_ws_url"]
        res = await http.post(f"/portal/desktops/{farm.bob_desk['id']}/ticket", json={"purpose": "sound"}, headers=auth)
        assert res.status_code == 403, "another user's desktop"
        await config.set_config(farm.db, SYSTEM, "portal.sound.enabled", False)
        try:
            res = await http.post(f"/portal/desktops/{desk_id}/ticket", json={"purpose": "sound"}, headers=auth)
            assert (res.status_code, res.json()["error"]["code"]) == (403, "sound_disabled")
        finally:
            await config.set_config(farm.db, SYSTEM, "portal.sound.enabled", True)
