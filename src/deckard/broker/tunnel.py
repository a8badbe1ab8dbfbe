"""The byte relay between a client and its desktop's display server, once the broker has answered ``101``.

Built from two asyncio ``Protocol`` callbacks that write straight into the other side's transport: no task,
no queue and no ``StreamReader`` per chunk, which is what made the relay fast in ``reference/platform.md``
("Moving desktop bytes").  Flow control is the transports' own: when one side's write buffer fills, the other
side stops reading until it drains, so a slow viewer cannot make the broker buffer a desktop's output.

The broker terminates the RFB handshake on both sides instead of passing it through:

* :class:`DesktopHandshake` — towards the desktop the broker is the VNC client and answers Xvnc's VNC
  authentication with the desktop's secret (:mod:`deckard.drivers.display`), so nothing else
  on the desktop network can take the display, even where routing would let it reach the port.
* :class:`ClientHandshake` — towards the viewer the broker is the VNC server: it offers security *None*
  (the user is already authenticated by the broker) and checks every handshake byte.  A client that sends
  garbage is dropped by the broker; its bytes never reach Xvnc, whose blacklist ("Too many security
  failures") would otherwise lock the desktop's owner out.

Once the viewer's ``ClientInit`` arrives it is forwarded with a ``SetEncodings`` of the two desktop-size
pseudo-encodings in the same write: Xvnc drops a viewer whose ``SetEncodings`` has not arrived yet when the
screen is resized ("Client does not support desktop size"), which happens when another viewer of the same
display resizes (the user's resize-to-window while an administrator's spy connects); the client's own
``SetEncodings`` replaces it a round trip later.  From then on the relay copies bytes only.

NX (QVD's clients, ``nx.py``) uses the same relay with other handshakes: nothing towards the desktop (nxagent
waits for the client's options) and :class:`~deckard.broker.nx.NxClientHandshake` towards the client, which
puts the desktop's cookie into nxproxy's options; no greeting is sent (nxproxy speaks first).  The desktop is
dialled only once the client's options are complete (:meth:`Tunnel.open_later`): nxagent aborts a session whose
proxy connection closes during the negotiation, so a client that leaves right after the ``101`` must not
have opened one.

Each received ``bytes`` object is handed to ``write`` as is, never reused (a uvloop gotcha).
"""

from __future__ import annotations

import asyncio
import re
import struct
from typing import Protocol, cast

from deckard.broker.http import WRITE_HIGH_WATER, FrontConnection, direct_buffer, read_buffer, taken
from deckard.client.rfb import SECURITY_NONE, SECURITY_VNC_AUTH
from deckard.drivers.display import vnc_auth_response

CLOSE_GRACE = 5.0  # seconds a closing side may take to flush before it is aborted

# SetEncodings: DesktopSize (-223) and ExtendedDesktopSize (-308) pseudo-encodings
RESIZE_ENCODINGS = struct.pack("!BxH2i", 2, 2, -223, -308)
RFB_GREETING = b"RFB 003.008\n"
_VERSION_RE = re.compile(rb"RFB 003\.(\d{3})\n")
_MAX_REASON = 4096  # bytes of a refusal reason from the desktop we are willing to read
MAX_PENDING = 1 << 20  # bytes a client may send while its desktop is being dialled (open_later)


class HandshakeError(ConnectionError):
    """A side of the handshake broke the protocol or refused; the message says which and why."""


class ClientSideHandshake(Protocol):
    """What the relay needs of the client's side of a handshake (sans-IO)."""

    done: bool

    def feed(self, data: bytes) -> tuple[bytes, bytes]: ...  # (to the client, to the desktop)


class _NoHandshake:
    """The desktop side of NX: nxagent says nothing until the client's options have reached it."""

    done = True
    opening = b""

    def feed(self, data: bytes) -> bytes:  # noqa: ARG002 (never called: done from the start)
        raise HandshakeError("the desktop spoke before the client")


def _u32(value: int) -> bytes:
    return struct.pack("!I", value)


def _reason_string(reason: str) -> bytes:
    """RFB's reason: its length, then its text."""
    data = reason.encode()
    return _u32(len(data)) + data


def _failure(reason: str) -> bytes:
    """A failed SecurityResult (3.8) with its reason."""
    return _u32(1) + _reason_string(reason)


class DesktopHandshake:
    """The broker as the RFB 3.8 client of a desktop's Xvnc, up to a successful security result (sans-IO).

    :meth:`feed` takes the desktop's bytes and returns what to send back; ``done`` is set once the desktop
    waits for ``ClientInit``.  VNC authentication is used when the desktop offers it and we have the secret;
    security None only when that is all the desktop offers (an image from before display secrets).
    """

    # what the broker sends as soon as it is connected, before the desktop's own version: RFB's client version is
    # the same whatever the server's (3.8, or the server is refused), and the server reads it once it has sent
    # its own, so the security types come with the desktop's greeting, a round trip sooner
    opening = RFB_GREETING

    def __init__(self, password: str | None) -> None:
        self._password = password
        self._buf = bytearray()
        self._stage = "version"  # version → types → (challenge) → result → (reason) → done
        self._need = 12
        self.done = False

    @property
    def answered(self) -> bool:
        """The display has greeted and has every answer of the broker's: only its verdict (the result) is left."""
        return self.done or self._stage == "result"

    def feed(self, data: bytes) -> bytes:
        """What to send the desktop after ``data``; raises :class:`HandshakeError`."""
        if self.done and data:
            raise HandshakeError("the desktop spoke before ClientInit")
        buf = self._buf
        buf += data
        out = bytearray()
        while len(buf) >= self._need and not self.done:
            chunk = bytes(buf[: self._need])
            del buf[: self._need]
            out += self._step(chunk)
        if self.done and buf:
            raise HandshakeError("the desktop spoke before ClientInit")
        return bytes(out)

    def _step(self, chunk: bytes) -> bytes:
        stage = self._stage
        if stage == "version":
            m = _VERSION_RE.fullmatch(chunk)
            if m is None or int(m.group(1)) < 8:
                raise HandshakeError(f"the desktop's display is not an RFB 3.8 server: {chunk!r}")
            self._stage, self._need = "count", 1
            return b""  # the broker's version went at the connection's start (opening)
        if stage == "count":
            if chunk[0] == 0:
                self._stage, self._need = "reason_length", 4
                return b""
            self._stage, self._need = "types", chunk[0]
            return b""
        if stage == "types":
            if self._password is not None and SECURITY_VNC_AUTH in chunk:
                self._stage, self._need = "challenge", 16
                return bytes([SECURITY_VNC_AUTH])
            if SECURITY_NONE in chunk:
                self._stage, self._need = "result", 4
                return bytes([SECURITY_NONE])
            raise HandshakeError(f"the desktop's display offers no usable security type ({list(chunk)})")
        if stage == "challenge":
            assert self._password is not None
            self._stage, self._need = "result", 4
            return vnc_auth_response(self._password, chunk)
        if stage == "result":
            if chunk == _u32(0):
                self.done = True
                return b""
            self._stage, self._need = "reason_length", 4
            return b""
        if stage == "reason_length":
            length = int.from_bytes(chunk, "big")
            if length == 0 or length > _MAX_REASON:
                raise HandshakeError("the desktop's display refused the broker")
            self._stage, self._need = "reason", length
            return b""
        reason = chunk.decode(errors="replace")
        raise HandshakeError(f"the desktop's display refused the broker: {reason}")


class ClientHandshake:
    """The broker as the RFB server of a viewer, up to its ``ClientInit`` (sans-IO).

    The broker has already sent :data:`RFB_GREETING`.  :meth:`feed` takes the viewer's bytes and returns
    ``(to_client, to_desktop)``; ``to_desktop`` stays empty until ``ClientInit``, which it carries followed by
    :data:`RESIZE_ENCODINGS` and whatever the viewer sent after it.  Versions 3.3 to 3.8 are served as RFB
    says (an unknown minor version is 3.3, a later one 3.8).

    While ``desktop_ready`` is False (the desktop's display has greeted the broker but not yet accepted its
    answer: :meth:`Tunnel.start`) the viewer's security result is held, and so is anything it sends after it;
    :meth:`release` gives it (or a refusal) once the display's verdict is in.  The two handshakes so run side by
    side, and no viewer byte reaches the display before the broker is through with it.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._stage = "version"  # version → security → (held) → init → done
        self._minor = 8
        self._held = b""  # the security result the viewer is owed once the display has accepted the broker
        self.desktop_ready = True
        self.done = False

    def _grant(self, to_client: bytearray, result: bytes) -> None:
        """The viewer's security step is through: its result (3.8), its security type (3.3) or nothing (3.7)."""
        if self.desktop_ready:
            to_client += result
            self._stage = "init"
        else:
            self._held, self._stage = result, "held"

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        if self.done:
            return b"", data
        if self._stage == "refused":
            raise HandshakeError("the desktop's display refused the broker")
        buf = self._buf
        buf += data
        to_client = bytearray()
        while buf and not self.done and self._stage != "held":
            if self._stage == "version":
                if len(buf) < 12:
                    if not RFB_GREETING.startswith(bytes(buf[:4])):
                        raise HandshakeError("the client does not speak RFB")
                    break
                m = _VERSION_RE.fullmatch(bytes(buf[:12]))
                del buf[:12]
                if m is None:
                    raise HandshakeError("the client does not speak RFB")
                minor = int(m.group(1))
                self._minor = 8 if minor >= 8 else 7 if minor == 7 else 3
                if self._minor == 3:
                    self._grant(to_client, _u32(SECURITY_NONE))
                else:
                    to_client += bytes([1, SECURITY_NONE])
                    self._stage = "security"
            elif self._stage == "security":
                choice = buf[0]
                del buf[:1]
                if choice != SECURITY_NONE:
                    if self._minor == 8:
                        to_client += _failure("the broker offers security type None only")
                    raise HandshakeError(f"the client chose security type {choice}, not None")
                self._grant(to_client, _u32(0) if self._minor == 8 else b"")
            else:
                self.done = True
                rest = bytes(buf[1:])
                to_desktop = bytes(buf[:1]) + RESIZE_ENCODINGS + rest
                buf.clear()
                return bytes(to_client), to_desktop
        if len(buf) > MAX_PENDING:
            raise HandshakeError("the client sent too much before the desktop's display answered")
        return bytes(to_client), b""

    def release(self, ok: bool, reason: str = "") -> tuple[bytes, bytes]:
        """The display's verdict on the broker: ``(to_client, to_desktop)`` as :meth:`feed` — the held result and
        what the viewer sent after it, or (``ok`` False) RFB's refusal with ``reason`` where the version has one."""
        self.desktop_ready = True
        if self._stage != "held":
            return b"", b""
        if not ok:
            self._stage = "refused"
            if self._minor == 8:
                return _failure(reason), b""
            # 3.3: security type 0 ("failed") and the reason in place of the type; 3.7 has no result for None
            return (_u32(0) + _reason_string(reason), b"") if self._minor == 3 else (b"", b"")
        held, self._held, self._stage = self._held, b"", "init"
        to_client, to_desktop = self.feed(b"")
        return held + to_client, to_desktop


class _DesktopSide(asyncio.BufferedProtocol):
    """The connection to the desktop's display server (Xvnc on port 5900), read into the thread's shared buffer
    as the client side is (``http.py`` says why: no 256 KiB allocation, and its mmap, per read)."""

    def __init__(self, tunnel: Tunnel, password: str | None, raw: bool = False) -> None:
        self.tunnel = tunnel
        self.transport: asyncio.Transport | None = None
        self.handshake: DesktopHandshake | _NoHandshake = _NoHandshake() if raw else DesktopHandshake(password)
        # the display has greeted and has the broker's answers (``DesktopHandshake.answered``): what ``open`` waits
        # for; its verdict goes to the tunnel (``desktop_accepted``, or ``desktop_lost`` with ``failure``)
        self.greeted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.failure = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports do not subclass asyncio.Transport
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self.handshake.opening:
            transport.write(self.handshake.opening)
        if self.handshake.done and not self.greeted.done():
            self.greeted.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:  # noqa: ARG002  (the buffer has one size)
        if self.tunnel.direct:
            return direct_buffer().body
        return read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self.tunnel.direct:
            self.tunnel.to_client_direct(nbytes)
        else:
            self.data_received(taken(nbytes))

    def data_received(self, data: bytes) -> None:
        if self.handshake.done:
            self.tunnel.from_desktop(data)
            return
        handshake = self.handshake
        assert isinstance(handshake, DesktopHandshake)
        try:
            reply = handshake.feed(data)
        except HandshakeError as e:
            self.failure = str(e)
            if not self.greeted.done():
                self.greeted.set_exception(e)
            if self.transport is not None:
                self.transport.abort()
            return
        if reply and self.transport is not None:
            self.transport.write(reply)
        if handshake.answered and not self.greeted.done():
            self.greeted.set_result(None)
        if handshake.done:
            self.tunnel.desktop_accepted()

    def eof_received(self) -> bool | None:
        self.tunnel.close("desktop closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.greeted.done():
            self.greeted.set_exception(ConnectionError(f"the display closed during the handshake: {exc or 'EOF'}"))
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

    def __init__(
        self, front: FrontConnection, handshake: ClientSideHandshake | None = None, greeting: bytes = RFB_GREETING
    ) -> None:
        """An RFB relay by default; NX passes its client handshake, no greeting, and opens with ``raw``."""
        self.front = front
        self._greeting = greeting
        self._raw = handshake is not None
        self.desktop: _DesktopSide | None = None
        self.bytes_in = 0  # client → desktop
        self.bytes_out = 0  # desktop → client
        self.reason = ""
        self._started = False
        self._early: list[bytes] = []
        self._desktop_closed = False
        self.handshake: ClientSideHandshake = handshake or ClientHandshake()
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[str] = loop.create_future()
        self._abort_handle: asyncio.TimerHandle | None = None
        self._target: tuple[str, int, float] | None = None  # open_later: dial the desktop after the handshake
        self._opening: asyncio.Future[None] | None = None
        self._pending: list[bytes] = []  # client bytes that came while the desktop was being dialled
        # desktop bytes go to the client straight from the thread's direct buffer (set once relaying): only
        # through a transport that copies what it cannot send at once (tlsfront.TlsTransport), as uvloop's do not
        self.direct = False

    async def open(self, host: str, port: int, timeout: float, password: str | None = None) -> None:
        """Connect to the display server and authenticate (raises OSError, including HandshakeError, or
        TimeoutError).  Returns once the display has greeted and has the broker's answer to its challenge: its
        verdict, a few milliseconds later on a display still starting, comes while the viewer's own handshake runs
        (the viewer's security result waits for it, ``ClientHandshake``); a refusal then closes the tunnel with
        RFB's reason."""
        loop = asyncio.get_running_loop()

        async def connect() -> None:
            _transport, self.desktop = await loop.create_connection(
                lambda: _DesktopSide(self, password, self._raw), host, port
            )
            await self.desktop.greeted

        await asyncio.wait_for(connect(), timeout)

    def open_later(self, host: str, port: int, timeout: float) -> None:
        """Connect to the display once the client's handshake is through (raw, for NX); a failure closes."""
        self._target = (host, port, timeout)

    async def _open_now(self) -> None:
        assert self._target is not None
        host, port, timeout = self._target
        loop = asyncio.get_running_loop()
        try:
            transport, desktop = await asyncio.wait_for(
                loop.create_connection(lambda: _DesktopSide(self, None, raw=True), host, port), timeout
            )
        except (OSError, TimeoutError) as e:
            self._desktop_closed = True
            self.close(f"cannot connect to the desktop's display at {host}:{port} ({e or 'timeout'})")
            return
        if self.front.gone or self.done.done():
            transport.abort()
            return
        self.desktop = desktop
        transport.write(b"".join(self._pending))
        self._pending.clear()

    def start(self, early_from_client: bytes = b"") -> None:
        """Begin relaying: the ``101`` has been written to the client just before."""
        self._started = True
        self.front.relay = self
        if isinstance(self.handshake, ClientHandshake) and self.desktop is not None:
            self.handshake.desktop_ready = self.desktop.handshake.done
        if self._greeting:
            self._to_client(self._greeting)
        if early_from_client:
            self.from_client(early_from_client)
        for chunk in self._early:
            self._to_client(chunk)
        self._early.clear()
        self._go_direct()
        if self._desktop_closed or self.front.gone:
            self.close(self.reason or "closed before the relay started")

    # client → desktop
    def from_client(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if not self.handshake.done:
            try:
                to_client, data = self.handshake.feed(data)
            except HandshakeError as e:
                self.close(str(e))
                return
            if to_client:
                self._to_client(to_client)
            if not data:
                return
        if self._target is not None and self.desktop is None:
            self._pending.append(data)
            if self._opening is None:
                self._opening = asyncio.ensure_future(self._open_now())
            elif sum(map(len, self._pending)) > MAX_PENDING:
                self.close("the client sent too much before the desktop's display answered")
            return
        self._to_desktop(data)

    def _to_desktop(self, data: bytes) -> None:
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

    def to_client_direct(self, nbytes: int) -> None:
        """The ``nbytes`` the desktop just read into the direct buffer, to the client (``direct``)."""
        self.bytes_out += nbytes
        self.front.write(direct_buffer().body[:nbytes])

    def _go_direct(self) -> None:
        """Desktop bytes straight from the read buffer to the client, once relaying and the display's handshake
        is through (what it says before is the handshake's, not the viewer's)."""
        through = self.desktop is None or self.desktop.handshake.done
        self.direct = through and bool(getattr(self.front.transport, "copies_unsent", False))

    def desktop_accepted(self) -> None:
        """The display accepted the broker: the viewer gets its held security result, the display what the viewer
        sent after it."""
        if not self._started:
            return
        self._go_direct()
        if not isinstance(self.handshake, ClientHandshake):
            return
        to_client, to_desktop = self.handshake.release(True)
        if to_client:
            self._to_client(to_client)
        if to_desktop:
            self._to_desktop(to_desktop)

    def desktop_lost(self, exc: Exception | None) -> None:
        self._desktop_closed = True
        if self._started:
            lost = f"desktop connection lost: {exc}" if exc else "desktop closed the connection"
            reason = (self.desktop.failure if self.desktop else "") or lost
            if isinstance(self.handshake, ClientHandshake) and not self.handshake.desktop_ready:
                to_client, _ = self.handshake.release(False, reason)  # the viewer is told why, where RFB can
                if to_client:
                    self._to_client(to_client)
            self.close(reason)
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
