"""The test viewer (``client/rfb.py``) waits for a drawing as a VNC viewer does: the whole screen once, then the
changes as the server sends them (incremental requests), not a new full frame every so often."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from typing import Any

from deckard.client.rfb import BYTES_PER_PIXEL, grab_framebuffer, is_blank

WIDTH, HEIGHT = 8, 4


async def _fake_display(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[int]) -> None:
    """RFB 3.8, security None, a flat screen; an incremental request is answered 0.1 s later with one small
    rectangle of another colour (the session drew a window)."""
    writer.write(b"RFB 003.008\n")
    await reader.readexactly(12)
    writer.write(b"\x01\x01")  # one security type: None
    await reader.readexactly(1)
    writer.write(struct.pack(">I", 0))
    await reader.readexactly(1)  # ClientInit
    writer.write(struct.pack(">HH", WIDTH, HEIGHT) + bytes(16) + struct.pack(">I", 4) + b"test")
    await reader.readexactly(20)  # SetPixelFormat
    await reader.readexactly(4 + 4)  # SetEncodings, one encoding
    while True:
        kind, incremental, *_ = struct.unpack(">BBHHHH", await reader.readexactly(10))
        assert kind == 3
        requests.append(incremental)
        if not incremental:
            rect = struct.pack(">HHHHi", 0, 0, WIDTH, HEIGHT, 0) + b"\x10\x20\x30\x00" * (WIDTH * HEIGHT)
        else:
            await asyncio.sleep(0.1)
            rect = struct.pack(">HHHHi", 2, 1, 2, 2, 0) + b"\xff\xff\xff\x00" * 4
        writer.write(b"\x00\x00" + struct.pack(">H", 1) + rect)
        await writer.drain()


@contextlib.asynccontextmanager
async def _viewer_of_fake_display(requests: list[int]) -> AsyncIterator[tuple[asyncio.StreamReader, Any]]:
    server = await asyncio.start_server(lambda r, w: _fake_display(r, w, requests), "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        yield reader, writer
        writer.close()
    finally:
        server.close()


async def test_grab_follows_the_screens_changes_until_it_is_drawn() -> None:
    requests: list[int] = []
    loop = asyncio.get_running_loop()
    async with _viewer_of_fake_display(requests) as (reader, writer):
        t0 = loop.time()
        width, height, pixels = await grab_framebuffer(reader, writer, until_drawn=10)
        took = loop.time() - t0
    assert (width, height) == (WIDTH, HEIGHT) and len(pixels) == WIDTH * HEIGHT * BYTES_PER_PIXEL
    assert not is_blank(pixels)
    assert pixels[(1 * WIDTH + 2) * BYTES_PER_PIXEL : (1 * WIDTH + 2) * BYTES_PER_PIXEL + 3] == b"\xff\xff\xff"
    assert pixels[:3] == b"\x10\x20\x30"  # the rest of the first full frame stays
    assert requests == [0, 1]  # one full frame, then one incremental request answered as soon as drawn
    assert took < 5


async def test_without_until_drawn_one_full_frame_is_enough() -> None:
    requests: list[int] = []
    async with _viewer_of_fake_display(requests) as (reader, writer):
        _w, _h, pixels = await grab_framebuffer(reader, writer)
    assert is_blank(pixels) and requests == [0]
