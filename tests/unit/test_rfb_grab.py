"""The test viewer (``client/rfb.py``) waits for a drawing as a VNC viewer does: the whole screen once, then the
changes as the server sends them (incremental requests), not a new full frame every so often."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from deckard.client.rfb import (
    BYTES_PER_PIXEL,
    ENCODING_RAW,
    ENCODING_RRE,
    RFBError,
    _read_update,
    grab_framebuffer,
    is_blank,
)

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
    _kind, count = struct.unpack(">BxH", await reader.readexactly(4))  # SetEncodings
    encodings = struct.unpack(f">{count}i", await reader.readexactly(4 * count))
    assert encodings == (ENCODING_RAW, ENCODING_RRE)
    while True:
        kind, incremental, *_ = struct.unpack(">BBHHHH", await reader.readexactly(10))
        assert kind == 3
        requests.append(incremental)
        if not incremental:  # flat: RRE, no subrectangle (as Xvnc sends a flat area to a viewer that has RRE)
            rect = struct.pack(">HHHHiI", 0, 0, WIDTH, HEIGHT, ENCODING_RRE, 0) + b"\x10\x20\x30\x00"
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
        t0, before = loop.time(), time.perf_counter()
        received: list[float] = []
        width, height, pixels = await grab_framebuffer(reader, writer, until_drawn=10, received=received)
        took = loop.time() - t0
    assert (width, height) == (WIDTH, HEIGHT) and len(pixels) == WIDTH * HEIGHT * BYTES_PER_PIXEL
    assert not is_blank(pixels)
    assert pixels[(1 * WIDTH + 2) * BYTES_PER_PIXEL : (1 * WIDTH + 2) * BYTES_PER_PIXEL + 3] == b"\xff\xff\xff"
    assert pixels[:3] == b"\x10\x20\x30"  # the rest of the first full frame stays
    assert requests == [0, 1]  # one full frame, then one incremental request answered as soon as drawn
    assert len(received) == 2 and before <= received[0] <= received[1] <= time.perf_counter()  # when each came
    assert took < 5


async def test_without_until_drawn_one_full_frame_is_enough() -> None:
    requests: list[int] = []
    async with _viewer_of_fake_display(requests) as (reader, writer):
        _w, _h, pixels = await grab_framebuffer(reader, writer)
    assert is_blank(pixels) and requests == [0]


def _update(*rects: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(b"\x00\x00" + struct.pack(">H", len(rects)) + b"".join(rects))
    reader.feed_eof()
    return reader


async def test_rre_rectangles_are_painted_where_they_belong() -> None:
    frame = bytearray(WIDTH * HEIGHT * BYTES_PER_PIXEL)
    # a 4x3 rectangle at (3, 1): grey, with a red 2x1 subrectangle at (1, 2) of it
    grey, red = b"\x80\x80\x80\x00", b"\x00\x00\xff\x00"
    rect = struct.pack(">HHHHiI", 3, 1, 4, 3, ENCODING_RRE, 1) + grey + red + struct.pack(">HHHH", 1, 2, 2, 1)
    assert await _read_update(_update(rect), frame, WIDTH) == 12

    def pixel(x: int, y: int) -> bytes:
        return bytes(frame[(y * WIDTH + x) * BYTES_PER_PIXEL : (y * WIDTH + x + 1) * BYTES_PER_PIXEL])

    assert pixel(3, 1) == grey and pixel(6, 3) == grey and pixel(4, 3) == red and pixel(5, 3) == red
    assert pixel(2, 1) == bytes(4) and pixel(7, 1) == bytes(4) and pixel(3, 0) == bytes(4)
    painted = sum(pixel(x, y) != bytes(4) for x in range(WIDTH) for y in range(HEIGHT))
    assert painted == 12


@pytest.mark.parametrize(
    "rect",
    [
        struct.pack(">HHHHiI", 6, 0, 4, 1, ENCODING_RRE, 0) + bytes(4),  # past the right edge
        struct.pack(">HHHHi", 0, 3, 1, 2, ENCODING_RAW) + bytes(8),  # past the bottom
        struct.pack(">HHHHiI", 0, 0, 2, 2, ENCODING_RRE, 1) + bytes(8) + struct.pack(">HHHH", 1, 1, 2, 2),  # its sub
    ],
)
async def test_a_rectangle_outside_the_screen_is_refused(rect: bytes) -> None:
    frame = bytearray(WIDTH * HEIGHT * BYTES_PER_PIXEL)
    with pytest.raises(RFBError, match="outside"):
        await _read_update(_update(rect), frame, WIDTH)
    assert len(frame) == WIDTH * HEIGHT * BYTES_PER_PIXEL
