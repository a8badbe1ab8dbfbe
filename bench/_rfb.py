"""A VNC viewer reduced to what the data-path benchmarks need: the RFB 3.8 handshake (security None behind the
broker, or VNC authentication straight to Xvnc), Raw encoding only, and full-screen updates asked for as fast as
they come (three requests in flight), so the relay under test carries 4 bytes a pixel with nothing to compress.

The byte source is any ``read(n)``/``send(data)`` pair: an ``asyncio`` stream (the broker's TLS tunnel, socat) or a
WebSocket's binary messages (the broker's ``/ws/connect``, websockify) through :class:`WsBytes`.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from deckard.drivers.display import vnc_auth_response

Read = Callable[[int], Awaitable[bytes]]
Send = Callable[[bytes], Awaitable[None]]
Skip = Callable[[int], Awaitable[None]]  # consume bytes the viewer only counts (pixels), without keeping them


class WsBytes:
    """The bytes of a WebSocket's binary messages, read by size."""

    def __init__(self, ws: Any) -> None:
        self.ws, self.buf = ws, bytearray()

    async def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            msg = await asyncio.wait_for(self.ws.recv(), 60)
            if isinstance(msg, bytes):
                self.buf += msg
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def skip(self, n: int) -> None:
        """``read(n)`` without keeping the bytes: whole messages are only counted, not joined and sliced."""
        take = min(n, len(self.buf))
        del self.buf[:take]
        n -= take
        while n > 0:
            msg = await asyncio.wait_for(self.ws.recv(), 60)
            if not isinstance(msg, bytes):
                continue
            if len(msg) > n:
                self.buf += memoryview(msg)[n:]
            n -= min(n, len(msg))

    async def send(self, data: bytes) -> None:
        await self.ws.send(data)


def stream_io(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[Read, Send, Skip]:
    async def send(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    async def skip(n: int) -> None:  # one wake-up for the whole update (reading it in pieces cost the viewer more)
        await reader.readexactly(n)

    return reader.readexactly, send, skip


class RawViewer:
    """One RFB session asking for Raw full-screen updates."""

    def __init__(self, read: Read, send: Send, skip: Skip) -> None:
        self.read, self.send, self.skip = read, send, skip
        self.width = self.height = 0

    async def handshake(self, password: str | None = None) -> None:
        """Through ``ServerInit``: security None (the broker authenticated already) or VNC auth with ``password``."""
        assert (await self.read(12)).startswith(b"RFB 003.008")
        await self.send(b"RFB 003.008\n")
        offered = await self.read((await self.read(1))[0])
        if password is None:
            assert 1 in offered, offered
            await self.send(b"\x01")
        else:
            assert 2 in offered, offered
            await self.send(b"\x02")
            await self.send(vnc_auth_response(password, await self.read(16)))
        assert await self.read(4) == b"\0\0\0\0", "VNC authentication failed"
        await self.send(b"\x01")  # shared
        self.width, self.height = struct.unpack("!HH", await self.read(4))
        await self.read(16)
        await self.read(struct.unpack("!I", await self.read(4))[0])
        await self.send(struct.pack("!BxHi", 2, 1, 0))  # SetEncodings: Raw only

    async def stream(self, seconds: float) -> tuple[int, float]:
        """(pixel bytes received, seconds taken) of full-screen updates for about ``seconds``."""
        request = struct.pack("!BBHHHH", 3, 0, 0, 0, self.width, self.height)
        for _ in range(3):
            await self.send(request)
        got, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            got += await self.update()
            await self.send(request)
        return got, time.perf_counter() - t0

    async def update(self) -> int:
        """One FramebufferUpdate (a bell is skipped); its pixel bytes."""
        kind = (await self.read(1))[0]
        if kind == 2:  # bell
            return 0
        if kind != 0:
            raise AssertionError(f"unexpected server message {kind}")
        rects = struct.unpack("!xH", await self.read(3))[0]
        total = 0
        for _ in range(rects):
            _x, _y, w, h, enc = struct.unpack("!HHHHi", await self.read(12))
            if enc == 0:
                await self.skip(w * h * 4)  # counted, not kept: the viewer's own copies are not the relay's cost
                total += w * h * 4
            elif enc == -308:  # ExtendedDesktopSize
                screens = (await self.read(4))[0]
                await self.read(16 * screens)
            elif enc != -223:  # DesktopSize
                raise AssertionError(f"unexpected encoding {enc}")
        return total
