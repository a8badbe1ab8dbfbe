"""A tiny RFB (VNC) client that grabs one full frame: proof that a desktop really shows something.

The end-to-end tests (driver, broker tunnel, browser) need more than "port 5900 is open": an Xvnc with a
dead session still answers, with a black screen.  This client does the RFB 3.8 handshake (security None
through the broker, VNC authentication with the desktop's secret when it talks to a desktop directly),
asks for the whole framebuffer at 32 bits per pixel (then, to wait for a drawing, its changes) in raw encoding,
with RRE for the flat areas as every real viewer asks for something more compact than raw (a flat screen is then
a few bytes instead of 4 MB a frame, whose copying and decrypting took the CPU from the session that was
drawing), and :func:`is_blank` says whether every pixel has the same colour.  It works over any asyncio stream,
so it runs directly against a guest or through the broker's tunnel.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable

from deckard.drivers.display import vnc_auth_response

SECURITY_NONE = 1
SECURITY_VNC_AUTH = 2
ENCODING_RAW = 0
ENCODING_RRE = 2
BYTES_PER_PIXEL = 4


class RFBError(Exception):
    """The server broke the protocol or refused us."""


async def _read_reason(reader: asyncio.StreamReader) -> str:
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    return (await reader.readexactly(length)).decode(errors="replace")


async def handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, password: str | None = None
) -> tuple[int, int, str]:
    """Version, security (VNC authentication with ``password``, else None), ClientInit (shared).

    Returns (width, height, desktop name).
    """
    banner = await reader.readexactly(12)
    if not banner.startswith(b"RFB "):
        raise RFBError(f"not an RFB server: {banner!r}")
    minor = int(banner[8:11])
    version = b"RFB 003.008\n" if minor >= 8 else b"RFB 003.003\n"
    writer.write(version)
    await writer.drain()
    if version == b"RFB 003.008\n":
        (count,) = struct.unpack(">B", await reader.readexactly(1))
        if count == 0:
            raise RFBError(f"server refused the connection: {await _read_reason(reader)}")
        types = await reader.readexactly(count)
        if password is not None and SECURITY_VNC_AUTH in types:
            writer.write(bytes([SECURITY_VNC_AUTH]))
            challenge = await reader.readexactly(16)
            writer.write(vnc_auth_response(password, challenge))
        elif SECURITY_NONE in types:
            writer.write(bytes([SECURITY_NONE]))
        else:
            raise RFBError(f"server does not offer security None (offers {list(types)}): it needs a password")
        await writer.drain()
        (result,) = struct.unpack(">I", await reader.readexactly(4))
        if result != 0:
            raise RFBError(f"security handshake failed: {await _read_reason(reader)}")
    else:
        (sec,) = struct.unpack(">I", await reader.readexactly(4))
        if sec != SECURITY_NONE:
            raise RFBError(f"server requires security type {sec}")
    writer.write(b"\x01")  # ClientInit: share the desktop with other viewers
    await writer.drain()
    width, height = struct.unpack(">HH", await reader.readexactly(4))
    await reader.readexactly(16)  # server pixel format: we set our own below
    name = await _read_reason(reader)
    return width, height, name


async def grab_framebuffer(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    until_drawn: float = 0.0,
    password: str | None = None,
    drawn: Callable[[bytes], bool] | None = None,
    received: list[float] | None = None,
) -> tuple[int, int, bytes]:
    """Handshake, then return (width, height, pixels) with pixels as 32-bit little-endian BGRX.

    With ``until_drawn`` > 0, follow the screen's changes (incremental updates, as a viewer does: each arrives as
    soon as it is drawn) for up to that many seconds until it is drawn: not one flat colour (a session draws its
    windows a moment after the display starts listening), or what ``drawn(pixels)`` looks for.  ``received``
    gets the ``time.perf_counter()`` at which each update was read in full: when the frame arrived, without the
    checks of it that follow (a benchmark's figure is the former).
    """
    done = drawn or (lambda frame: not is_blank(frame))
    width, height, _ = await handshake(reader, writer, password=password)
    # SetPixelFormat: 32 bpp, depth 24, little endian, true colour, 8 bits per channel (R<<16 | G<<8 | B)
    pixel_format = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
    writer.write(b"\x00\x00\x00\x00" + pixel_format)
    # raw first (Xvnc's choice for what is not flat), RRE for the flat rectangles Xvnc finds
    writer.write(struct.pack(">BxHii", 2, 2, ENCODING_RAW, ENCODING_RRE))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + until_drawn
    frame = bytearray(width * height * BYTES_PER_PIXEL)
    _request(writer, width, height, incremental=False)  # the whole screen first
    covered = 0
    while covered < width * height:
        covered += await _read_update(reader, frame, width)
    if received is not None:
        received.append(time.perf_counter())
    # then what changes, as a viewer asks for it: the server answers as soon as something is drawn
    while loop.time() < deadline and not done(bytes(frame)):
        _request(writer, width, height, incremental=True)
        await writer.drain()
        try:
            await asyncio.wait_for(_read_update(reader, frame, width), deadline - loop.time())
        except TimeoutError:
            break
        if received is not None:
            received.append(time.perf_counter())
    return width, height, bytes(frame)


def _request(writer: asyncio.StreamWriter, width: int, height: int, *, incremental: bool) -> None:
    writer.write(struct.pack(">BBHHHH", 3, int(incremental), 0, 0, width, height))


async def _read_update(reader: asyncio.StreamReader, frame: bytearray, width: int) -> int:
    """Read one server message into ``frame``; returns how many pixels a FramebufferUpdate covered (0 for others)."""
    (msg_type,) = struct.unpack(">B", await reader.readexactly(1))
    if msg_type == 1:  # SetColourMapEntries: not used in true colour, skip it
        _, _, count = struct.unpack(">BHH", await reader.readexactly(5))
        await reader.readexactly(count * 6)
        return 0
    if msg_type == 2:  # Bell
        return 0
    if msg_type == 3:  # ServerCutText
        await reader.readexactly(3)
        await _read_reason(reader)
        return 0
    if msg_type != 0:
        raise RFBError(f"unexpected server message type {msg_type}")
    (nrects,) = struct.unpack(">xH", await reader.readexactly(3))
    covered = 0
    for _ in range(nrects):
        x, y, w, h, encoding = struct.unpack(">HHHHi", await reader.readexactly(12))
        if x + w > width or (y + h) * width * BYTES_PER_PIXEL > len(frame):
            raise RFBError(f"a rectangle outside the screen: {(x, y, w, h)}")
        if encoding == ENCODING_RAW:
            data = await reader.readexactly(w * h * BYTES_PER_PIXEL)
            row = w * BYTES_PER_PIXEL
            for line in range(h):
                start = ((y + line) * width + x) * BYTES_PER_PIXEL
                frame[start : start + row] = data[line * row : (line + 1) * row]
        elif encoding == ENCODING_RRE:  # a background colour, then rectangles of one colour each
            (count,) = struct.unpack(">I", await reader.readexactly(4))
            _fill(frame, width, (x, y, w, h), await reader.readexactly(BYTES_PER_PIXEL))
            subrects = await reader.readexactly(count * (BYTES_PER_PIXEL + 8))
            for at in range(0, len(subrects), BYTES_PER_PIXEL + 8):
                sx, sy, sw, sh = struct.unpack_from(">HHHH", subrects, at + BYTES_PER_PIXEL)
                if sx + sw > w or sy + sh > h:
                    raise RFBError(f"an RRE subrectangle outside its rectangle: {(sx, sy, sw, sh)} in {(w, h)}")
                _fill(frame, width, (x + sx, y + sy, sw, sh), subrects[at : at + BYTES_PER_PIXEL])
        else:
            raise RFBError(f"server sent encoding {encoding}, we asked for raw and RRE only")
        covered += w * h
    return covered


def _fill(frame: bytearray, width: int, rect: tuple[int, int, int, int], pixel: bytes) -> None:
    x, y, w, h = rect
    row = pixel * w
    for line in range(y, y + h):
        start = (line * width + x) * BYTES_PER_PIXEL
        frame[start : start + len(row)] = row


def colour_share(pixels: bytes, rgb: tuple[int, int, int], tolerance: int = 8, step: int = 7) -> float:
    """The share of pixels (every ``step``-th one) within ``tolerance`` of the colour ``rgb``."""
    want = (rgb[2], rgb[1], rgb[0])  # BGRX
    seen = hits = 0
    for i in range(0, len(pixels) - BYTES_PER_PIXEL + 1, BYTES_PER_PIXEL * step):
        seen += 1
        hits += all(abs(pixels[i + k] - want[k]) <= tolerance for k in range(3))
    return hits / seen if seen else 0.0


def is_blank(pixels: bytes) -> bool:
    """True when every pixel has the same colour (a dead or black desktop); the padding byte is ignored."""
    if len(pixels) < BYTES_PER_PIXEL:
        return True
    for channel in range(3):
        values = pixels[channel::BYTES_PER_PIXEL]
        if values.count(values[0]) != len(values):
            return False
    return True
