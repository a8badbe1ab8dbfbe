"""The broker's two RFB handshakes side by side, over real loopback sockets: the ``101`` and the viewer's handshake
go ahead once the desktop's display has greeted the broker, and its verdict on the broker's answer decides the
viewer's security result.  No viewer byte reaches the display before that verdict (a stray byte would be taken for
the broker's answer, and Xvnc blacklists an address after a few failures)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from deckard.broker.http import FrontConnection
from deckard.broker.tunnel import RESIZE_ENCODINGS, RFB_GREETING, Tunnel
from deckard.client.rfb import SECURITY_VNC_AUTH
from deckard.drivers.display import vnc_auth_response

SECRET = "s3cret!!"
CHALLENGE = bytes(range(16))
CLIENT_INIT = b"\x01"


class Display(asyncio.Protocol):
    """An RFB 3.8 server that asks for VNC authentication and gives its verdict only when told (:meth:`give`);
    what it reads from the broker is kept apart by whether it came before the verdict or after."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.answered = asyncio.Event()  # the broker's version, choice and answer to the challenge are in
        self.before_verdict = bytearray()
        self.after_verdict = bytearray()
        self.got_after = asyncio.Event()
        self.verdict_given = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(RFB_GREETING + bytes([1, SECURITY_VNC_AUTH]))

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.verdict_given:
            self.after_verdict += data
            self.got_after.set()
            return
        had = len(self.before_verdict)
        self.before_verdict += data
        if had < 13 <= len(self.before_verdict):  # the broker's version and its choice
            self.transport.write(CHALLENGE)
        if len(self.before_verdict) >= 13 + 16:
            self.answered.set()

    def give(self, result: bytes) -> None:
        assert self.transport is not None
        self.verdict_given = True
        self.transport.write(result)
        if result != struct.pack("!I", 0):
            self.transport.close()


@dataclass
class Rig:
    display: Display
    display_port: int
    fronts: asyncio.Queue[FrontConnection]
    front_port: int


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    loop = asyncio.get_running_loop()
    display = Display()
    server = await loop.create_server(lambda: display, "127.0.0.1", 0)
    fronts: asyncio.Queue[FrontConnection] = asyncio.Queue()
    front_server = await loop.create_server(lambda: FrontConnection(fronts.put_nowait), "127.0.0.1", 0)
    try:
        yield Rig(display, server.sockets[0].getsockname()[1], fronts, front_server.sockets[0].getsockname()[1])
    finally:
        for s in (server, front_server):
            s.close()
        if display.transport is not None:
            display.transport.abort()


async def _viewer_and_tunnel(
    rig: Rig,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Tunnel]:
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.front_port)
    tunnel = Tunnel(await asyncio.wait_for(rig.fronts.get(), 5))
    # returns while the display's verdict is still to come
    await asyncio.wait_for(tunnel.open("127.0.0.1", rig.display_port, 5, SECRET), 5)
    assert rig.display.answered.is_set() and not rig.display.verdict_given
    tunnel.start()
    assert await asyncio.wait_for(reader.readexactly(12), 5) == RFB_GREETING
    writer.write(b"RFB 003.008\n")
    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\x01\x01"  # security None offered at once
    writer.write(b"\x01" + CLIENT_INIT)  # None, and its ClientInit without waiting for the result
    await writer.drain()
    return reader, writer, tunnel


async def test_the_viewers_handshake_runs_beside_the_displays_verdict(rig: Rig) -> None:
    reader, writer, tunnel = await _viewer_and_tunnel(rig)
    with pytest.raises(TimeoutError):  # the viewer's result waits for the display's
        await asyncio.wait_for(reader.readexactly(1), 0.2)
    rig.display.give(struct.pack("!I", 0))
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"\x00\x00\x00\x00"
    await asyncio.wait_for(rig.display.got_after.wait(), 5)
    # before its verdict the display had only the broker's own bytes: version, choice, answer to the challenge
    assert rig.display.before_verdict == RFB_GREETING + bytes([SECURITY_VNC_AUTH]) + vnc_auth_response(
        SECRET, CHALLENGE
    )
    assert bytes(rig.display.after_verdict).startswith(CLIENT_INIT + RESIZE_ENCODINGS)
    tunnel.close("done")
    writer.close()


async def test_a_display_that_refuses_the_broker_gives_the_viewer_rfbs_reason(rig: Rig) -> None:
    reader, writer, tunnel = await _viewer_and_tunnel(rig)
    reason = b"denied"
    rig.display.give(struct.pack("!II", 1, len(reason)) + reason)
    status, length = struct.unpack("!II", await asyncio.wait_for(reader.readexactly(8), 5))
    message = (await asyncio.wait_for(reader.readexactly(length), 5)).decode()
    assert status == 1 and message == "the desktop's display refused the broker: denied"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # and the tunnel closes
    assert await asyncio.wait_for(tunnel.done, 5) == message
    assert rig.display.before_verdict.endswith(vnc_auth_response(SECRET, CHALLENGE))
    writer.close()
