"""A warm guest gets its first viewer from the node before any user (``node/pools.py`` ``first_viewer``): Xvnc
copies its framebuffer when it lets its first viewer in, which the user taking the guest over would wait for.

Against an RFB 3.8 server on loopback that checks VNC authentication as Xvnc does: the node's viewer must prove
the guest's display secret (derived from its agent token), and a display that refuses it only costs a log line.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from deckard.drivers.display import display_password, vnc_auth_response
from deckard.node.pools import first_viewer

TOKEN = "warm-guest-agent-token"


@asynccontextmanager
async def display(secret: str) -> AsyncIterator[tuple[int, list[str]]]:
    """An RFB server with VNC authentication by ``secret``: its port, and what each viewer did."""
    seen: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"RFB 003.008\n")
            assert await reader.readexactly(12) == b"RFB 003.008\n"
            writer.write(b"\x01\x02")  # one security type: VNC authentication
            assert await reader.readexactly(1) == b"\x02"
            challenge = os.urandom(16)
            writer.write(challenge)
            if await reader.readexactly(16) != vnc_auth_response(secret, challenge):
                writer.write(struct.pack(">II", 1, 6) + b"denied")
                seen.append("refused")
                return
            writer.write(struct.pack(">I", 0))
            shared = await reader.readexactly(1)
            writer.write(struct.pack(">HH", 1280, 800) + bytes(16) + struct.pack(">I", 4) + b"test")
            await writer.drain()
            seen.append("let in, shared" if shared == b"\x01" else "let in, exclusive")
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()
        await server.wait_closed()


async def test_the_first_viewer_proves_the_guests_display_secret_and_shares_the_display() -> None:
    async with display(display_password(TOKEN)) as (port, seen):
        assert await first_viewer("127.0.0.1", TOKEN, port)
        await asyncio.sleep(0.05)
    assert seen == ["let in, shared"]  # shared: it never takes the display from anyone


async def test_a_display_that_refuses_the_first_viewer_only_costs_a_log_line() -> None:
    async with display(display_password("another guest's token")) as (port, seen):
        assert not await first_viewer("127.0.0.1", TOKEN, port)
        await asyncio.sleep(0.05)
    assert seen == ["refused"]


async def test_no_display_listening_is_no_error() -> None:
    async with display(display_password(TOKEN)) as (port, _seen):
        pass  # closed: nothing listens on the port any more
    assert not await first_viewer("127.0.0.1", TOKEN, port)
