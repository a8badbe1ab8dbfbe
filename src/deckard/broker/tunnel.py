"""The byte relay between a client and its desktop's display server, once the broker has answered ``101``.

Built from two asyncio ``Protocol`` callbacks that write straight into the other side's transport: no task,
no queue and no ``StreamReader`` per chunk, which is what made the relay fast in ``reference/platform.md``
("Moving desktop bytes").  Flow control is the transports' own: when one side's write buffer fills, the other
side stops reading until it drains, so a slow viewer cannot make the broker buffer a desktop's output.

Two gotchas from the same page are handled here: the display server speaks first (the RFB banner) and may
do so before the client has its ``101``, so its early bytes are held until :meth:`Tunnel.start`; and each
received ``bytes`` object is handed to ``write`` as is, never reused.

A third comes from Xvnc: a viewer whose ``SetEncodings`` has not arrived yet when the screen is resized (by
another viewer of the same display: the user's resize-to-window while an administrator's spy connects, or a
second device) is dropped with "Client does not support desktop size".  :class:`ResizeGuard` closes that
window: the broker sends a ``SetEncodings`` of the two desktop-size pseudo-encodings in the same write as the
client's ``ClientInit``, so Xvnc reads it right after sending ``ServerInit``; the client's own ``SetEncodings``
replaces it a round trip later.
"""

from __future__ import annotations

import asyncio
import struct
from typing import cast

from deckard.broker.http import WRITE_HIGH_WATER, FrontConnection

CLOSE_GRACE = 5.0  # seconds a closing side may take to flush before it is aborted


# SetEncodings: DesktopSize (-223) and ExtendedDesktopSize (-308) pseudo-encodings
RESIZE_ENCODINGS = struct.pack("!BxH2i", 2, 2, -223, -308)


class ResizeGuard:
    """Puts :data:`RESIZE_ENCODINGS` right behind the client's ``ClientInit``.

    Only the handshake of Deckard's desktops is understood (RFB 3.7/3.8 with security type None, as Xvnc is
    run): the server's version and security types are checked, then the client's first 14 bytes (version,
    choice, ClientInit) counted.  Anything else and the guard steps aside (``done``, nothing injected).
    """

    CLIENT_INIT_END = 12 + 1 + 1  # version, security type None, ClientInit

    def __init__(self) -> None:
        self._server = bytearray()
        self._none_only = False  # the server offered exactly [None] with RFB >= 3.7
        self._client_seen = 0
        self.done = False

    def from_server(self, data: bytes) -> None:
        if self.done or self._none_only:
            return
        buf = self._server
        buf += data[: 14 - len(buf)]
        if len(buf) < 14:
            return
        minor = int(buf[8:11]) if buf[:4] == b"RFB " and buf[8:11].isdigit() else 0
        self._none_only = minor >= 7 and buf[12] == 1 and buf[13] == 1
        self.done = not self._none_only

    def from_client(self, data: bytes) -> bytes:
        """The client's bytes, with :data:`RESIZE_ENCODINGS` inserted after ``ClientInit``."""
        if self.done:
            return data
        start = self._client_seen
        self._client_seen += len(data)
        if start <= 12 < self._client_seen and data[12 - start] != 1:  # the client chose another type
            self.done = True
            return data
        if self._client_seen < self.CLIENT_INIT_END:
            return data
        self.done = True
        if not self._none_only:
            return data
        cut = self.CLIENT_INIT_END - start
        return data[:cut] + RESIZE_ENCODINGS + data[cut:]


class _DesktopSide(asyncio.Protocol):
    """The connection to the desktop's display server (Xvnc on port 5900)."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports do not subclass asyncio.Transport
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if not self.tunnel.guard.done:
            self.tunnel.guard.from_server(data)
        self.tunnel.from_desktop(data)

    def eof_received(self) -> bool | None:
        self.tunnel.close("desktop closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.desktop_lost(exc)

    def pause_writing(self) -> None:
        front = self.tunnel.front.transport
        if front is not None and not front.is_closing():
            front.pause_reading()

    def resume_writing(self) -> None:
        front = self.tunnel.front.transport
        if front is not None and not front.is_closing():
            front.resume_reading()


class Tunnel:
    """Relays bytes between ``front`` (the client) and a desktop; ``done`` resolves when both sides closed."""

    def __init__(self, front: FrontConnection) -> None:
        self.front = front
        self.desktop: _DesktopSide | None = None
        self.bytes_in = 0  # client → desktop
        self.bytes_out = 0  # desktop → client
        self.reason = ""
        self._started = False
        self._early: list[bytes] = []
        self._desktop_closed = False
        self.guard = ResizeGuard()
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[str] = loop.create_future()
        self._abort_handle: asyncio.TimerHandle | None = None

    async def open(self, host: str, port: int, timeout: float) -> None:
        """Connect to the display server (raises OSError / TimeoutError)."""
        loop = asyncio.get_running_loop()
        _transport, self.desktop = await asyncio.wait_for(
            loop.create_connection(lambda: _DesktopSide(self), host, port), timeout
        )

    def start(self, early_from_client: bytes = b"") -> None:
        """Begin relaying: the ``101`` has been written to the client just before."""
        self._started = True
        self.front.relay = self
        if early_from_client:
            self.from_client(early_from_client)
        for chunk in self._early:
            self._to_client(chunk)
        self._early.clear()
        if self._desktop_closed or self.front.gone:
            self.close(self.reason or "closed before the relay started")

    # client → desktop
    def from_client(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if not self.guard.done:
            data = self.guard.from_client(data)
        dt = self.desktop.transport if self.desktop else None
        if dt is not None and not dt.is_closing():
            dt.write(data)

    def client_closed(self) -> None:
        self.close("client closed the connection")
        self._maybe_done()

    def client_pause_writing(self) -> None:
        dt = self.desktop.transport if self.desktop else None
        if dt is not None and not dt.is_closing():
            dt.pause_reading()

    def client_resume_writing(self) -> None:
        dt = self.desktop.transport if self.desktop else None
        if dt is not None and not dt.is_closing():
            dt.resume_reading()

    # desktop → client
    def from_desktop(self, data: bytes) -> None:
        if not self._started:
            self._early.append(data)
            return
        self._to_client(data)

    def _to_client(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.front.write(data)

    def desktop_lost(self, exc: Exception | None) -> None:
        self._desktop_closed = True
        if self._started:
            self.close(f"desktop connection lost: {exc}" if exc else "desktop closed the connection")
        self._maybe_done()

    # ending
    def discard(self) -> None:
        """Drop a desktop connection that was never started (the client got an error or left)."""
        dt = self.desktop.transport if self.desktop else None
        if dt is not None:
            dt.abort()

    def close(self, reason: str) -> None:
        """Close both sides (pending bytes are flushed first, for at most CLOSE_GRACE seconds)."""
        if not self.reason:
            self.reason = reason
        self.front.close()
        dt = self.desktop.transport if self.desktop else None
        if dt is not None and not dt.is_closing():
            dt.close()
        if self._abort_handle is None and not self.done.done():
            self._abort_handle = asyncio.get_running_loop().call_later(CLOSE_GRACE, self._abort)
        self._maybe_done()

    def _abort(self) -> None:
        self.front.abort()
        dt = self.desktop.transport if self.desktop else None
        if dt is not None:
            dt.abort()

    def _maybe_done(self) -> None:
        desktop_closed = self._desktop_closed or self.desktop is None
        if desktop_closed and self.front.closed.done() and not self.done.done():
            if self._abort_handle is not None:
                self._abort_handle.cancel()
            self.done.set_result(self.reason)
