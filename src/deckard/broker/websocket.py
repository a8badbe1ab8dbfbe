"""The browser's way in: WebSocket on the broker's connect path, authenticated by a one-time ticket.

``GET /qvd/connect_to_vm?id=N&ticket=T`` (or ``/ws/connect?ticket=T``) with ``Upgrade: websocket``.  A browser
cannot set ``Authorization`` on a WebSocket, so the portal API issues a short-lived single-use ticket
(``services/tickets.py``) that the page puts in the URL.  A bad ticket is refused with HTTP ``401`` before the
upgrade; anything that goes wrong later is a close frame ``1011`` whose reason the page shows.

Why frames are parsed here and not by wsproto: wsproto does the handshake (it knows the RFC's checks and the
``Sec-WebSocket-Accept`` arithmetic), but ``reference/platform.md`` measured a wsproto-framed relay at less
than half the throughput of frames parsed in the ``Protocol`` with bulk unmasking.  After the handshake,
:class:`WsTunnel` turns client frames into raw VNC bytes and VNC bytes into unmasked binary frames.

Before the relay starts the broker sends TEXT frames ``{"progress": "..."}`` (the same messages QVD clients
get as ``102`` lines); the page shows them and keeps them away from noVNC, which only sees binary frames.

Why client frames are streamed: a frame's header announces its length up to 2^63 bytes; buffering a frame until
it is complete would let any client make the broker hold that much.  :class:`FrameReader` unmasks a data frame's
payload chunk by chunk as it arrives (the mask's phase carried across chunk boundaries) and hands it on at
once, so a connection holds a frame header and at most one control frame (125 bytes).  Text messages are
capped at ``max_ws_message`` (close ``1009``); a binary message of any size is fine, it never sits in memory.

Spy tickets connect to the same display *without* taking the session over (a second VNC client, Xvnc runs
``-AlwaysShared``).  Unless the ticket is interactive, :class:`ViewOnlyFilter` drops every client message
that would act on the desktop (keys, pointer, clipboard, resize) and keeps the ones a viewer needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
import wsproto
import wsproto.events as wse
from wsproto.utilities import RemoteProtocolError

from deckard.broker.http import FrontConnection, HttpChannel
from deckard.broker.params import GEOMETRY, ConnectParams, parse_id
from deckard.broker.session import ConnectRequest, SessionRunner
from deckard.broker.tunnel import Tunnel
from deckard.client.agent import AgentClient
from deckard.db.engine import Database
from deckard.drivers.display import display_password
from deckard.model.errors import BadInput, DeckardError, Unavailable
from deckard.services.desktops import load_desktop
from deckard.services.sessions import desktop_for_user
from deckard.services.tickets import Ticket, redeem_ticket

if TYPE_CHECKING:
    from deckard.broker.qvd import Request

apply_mask: Callable[[bytes, bytes], bytes] | None
try:  # the C unmasker of the ``websockets`` package, when installed
    from websockets.speedups import apply_mask as _c_apply_mask

    apply_mask = _c_apply_mask
except ImportError:  # pragma: no cover - depends on the environment
    apply_mask = None

log = structlog.get_logger("deckard.broker")

WS_PATHS = ("/qvd/connect_to_vm", "/ws/connect")
MAX_MESSAGE = 256 * 1024  # default cap of a text message (BrokerSettings.max_ws_message)
MAX_CONTROL = 125  # RFC 6455 §5.5
MAX_LENGTH = 2**63 - 1  # the most significant bit of a 64-bit length must be 0
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_NORMAL, CLOSE_PROTOCOL, CLOSE_TOO_BIG, CLOSE_ERROR = 1000, 1002, 1009, 1011
DISPLAY_CONNECT_TIMEOUT = 5.0


def is_websocket(req: Request) -> bool:
    return req.path in WS_PATHS and req.method == "GET" and "websocket" in req.header_tokens("upgrade")


def unmask(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``key`` in bulk (C when available, one big-int XOR otherwise)."""
    n = len(data)
    if n == 0:
        return b""
    if apply_mask is not None:
        return apply_mask(bytes(data), key)
    mask = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(mask, "little")).to_bytes(n, "little")


def frame_header(opcode: int, length: int) -> bytes:
    """A final, unmasked (server → client) frame header."""
    if length < 126:
        return bytes((0x80 | opcode, length))
    if length < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, length)
    return struct.pack("!BBQ", 0x80 | opcode, 127, length)


def close_payload(code: int, reason: str) -> bytes:
    raw = reason.encode()[:120]  # a control frame carries at most 125 bytes
    while raw:  # do not cut a UTF-8 sequence in half
        try:
            raw.decode()
            break
        except UnicodeDecodeError:
            raw = raw[:-1]
    return struct.pack("!H", code) + raw


class FrameError(Exception):
    """The client broke RFC 6455 (or a limit): close the WebSocket with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


Control = tuple[int, bytes]  # (opcode, payload) of a ping, pong or close frame


class FrameReader:
    """Client → broker frames, parsed as bytes arrive (sans-IO; ``feed`` raises :class:`FrameError`).

    ``feed`` returns, in order, data payload chunks (``bytes``: binary, text and continuation frames, unmasked)
    and complete control frames (``(opcode, payload)``).  After a close frame nothing more is read.
    """

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self.closed = False
        self._head = bytearray()  # a frame header split across reads
        self._opcode = -1  # of the frame whose payload is being read; -1 between frames
        self._fin = False
        self._key = b""
        self._offset = 0  # payload bytes of this frame already read: the phase of the mask
        self._left = 0  # payload bytes of this frame still to come
        self._control = bytearray()
        self._message = -1  # opcode of the data message in progress (fragmented); -1 when none
        self._message_size = 0

    @staticmethod
    def _header_size(b1: int) -> int:
        n = b1 & 0x7F
        return 6 if n < 126 else 8 if n == 126 else 14  # with the 4-byte mask key

    def feed(self, data: bytes) -> list[bytes | Control]:
        out: list[bytes | Control] = []
        pos, end = 0, len(data)
        while pos < end and not self.closed:
            if self._opcode < 0:
                head = self._head
                if not head and end - pos >= 2:
                    size = self._header_size(data[pos + 1])
                    if end - pos >= size:
                        self._begin(data, pos, size, out)
                        pos += size
                        left = self._left
                        if 0 < left <= end - pos and self._opcode < 8:  # a whole data frame: no state to keep
                            out.append(unmask(data[pos : pos + left], self._key))
                            pos += left
                            self._left = 0
                            self._end(out)
                        continue
                need = 2 if len(head) < 2 else self._header_size(head[1])
                take = min(need - len(head), end - pos)
                head += data[pos : pos + take]
                pos += take
                if len(head) >= 2 and len(head) == self._header_size(head[1]):
                    self._begin(head, 0, len(head), out)
                    head.clear()
                continue
            take = min(self._left, end - pos)
            chunk = data if pos == 0 and take == end else data[pos : pos + take]
            phase = self._offset & 3
            plain = unmask(chunk, self._key if not phase else self._key[phase:] + self._key[:phase])
            self._offset += take
            self._left -= take
            pos += take
            if self._opcode >= 8:
                self._control += plain
            else:
                out.append(plain)
            if not self._left:
                self._end(out)
        return out

    def _begin(self, buf: bytes | bytearray, pos: int, size: int, out: list[bytes | Control]) -> None:
        """A complete frame header at ``buf[pos:pos + size]``: check it, then expect its payload."""
        b0, b1 = buf[pos], buf[pos + 1]
        if b0 & 0x70:
            raise FrameError(CLOSE_PROTOCOL, "reserved bits set without an extension")
        if not b1 & 0x80:
            raise FrameError(CLOSE_PROTOCOL, "the client sent an unmasked frame")
        opcode = b0 & 0x0F
        fin = bool(b0 & 0x80)
        length = b1 & 0x7F
        if length == 126:
            length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
        elif length == 127:
            length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            if length > MAX_LENGTH:
                raise FrameError(CLOSE_PROTOCOL, "frame length out of range")
        if opcode == OP_BINARY and self._message < 0:  # the common case first: a new binary message
            self._message, self._message_size = opcode, length
        elif opcode >= 8:
            if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                raise FrameError(CLOSE_PROTOCOL, f"unknown control opcode {opcode}")
            if not fin or length > MAX_CONTROL:
                raise FrameError(CLOSE_PROTOCOL, "control frames must be final and at most 125 bytes")
        elif opcode == OP_CONT:
            if self._message < 0:
                raise FrameError(CLOSE_PROTOCOL, "continuation frame without a message to continue")
            self._message_size += length
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._message >= 0:
                raise FrameError(CLOSE_PROTOCOL, "a new message began before the last one ended")
            self._message, self._message_size = opcode, length
        else:
            raise FrameError(CLOSE_PROTOCOL, f"unknown data opcode {opcode}")
        if self._message == OP_TEXT and opcode < 8 and self._message_size > self.max_message:
            raise FrameError(CLOSE_TOO_BIG, f"text message larger than {self.max_message} bytes")
        self._opcode, self._fin, self._left, self._offset = opcode, fin, length, 0
        self._key = bytes(buf[pos + size - 4 : pos + size])
        if not length:
            self._end(out)

    def _end(self, out: list[bytes | Control]) -> None:
        """The current frame's payload is complete."""
        opcode, self._opcode = self._opcode, -1
        if opcode >= 8:
            out.append((opcode, bytes(self._control)))
            self._control.clear()
            self.closed = opcode == OP_CLOSE
        elif self._fin:
            self._message = -1


class ViewOnlyFilter:
    """Passes the RFB client messages a viewer needs; drops input (keys, pointer, clipboard, resize).

    Client → server only: the handshake (version, security choice, ClientInit forced to *shared*), then
    SetPixelFormat, SetEncodings, FramebufferUpdateRequest, EnableContinuousUpdates and Fence pass.  A dropped
    message is skipped as it streams by (a clipboard of 2 GiB costs nothing); a passed one is at most
    ``MAX_KEPT`` bytes (SetEncodings of ``MAX_ENCODINGS``), so the filter never holds more than that.
    """

    MAX_ENCODINGS = 1024  # noVNC sends about 20
    MAX_KEPT = 4 + 4 * MAX_ENCODINGS
    PASSED = (0, 2, 3, 150, 248)

    def __init__(self) -> None:
        self._buf = bytearray()
        self._stage = "version"  # version → security → init → messages
        self._skip = 0  # bytes of a dropped message still to come
        self.dropped = 0

    def feed(self, data: bytes) -> bytes:
        """Allowed bytes out of ``data``; ValueError on a message this filter cannot size or will not keep."""
        if self._skip:
            skipped = min(self._skip, len(data))
            self._skip -= skipped
            data = data[skipped:]
        self._buf += data
        out = bytearray()
        buf = self._buf
        while buf:
            n = self._size(buf)
            if n is None:
                break
            if self._stage == "messages" and buf[0] not in self.PASSED:
                self.dropped += 1
                taken = min(n, len(buf))
                del buf[:taken]
                self._skip = n - taken
                if self._skip:
                    break
                continue
            if n > self.MAX_KEPT:
                raise ValueError(f"RFB client message of {n} bytes is too large")
            if len(buf) < n:
                break
            msg = bytes(buf[:n])
            del buf[:n]
            if self._stage == "init":
                msg = b"\x01"  # shared: never disconnect the user's own viewer
                self._stage = "messages"
            elif self._stage == "security":
                self._stage = "vncauth" if msg[0] == 2 else "init"
            elif self._stage == "vncauth":
                self._stage = "init"
            elif self._stage == "version":
                self._stage = "security"
            out += msg
        if self._skip:  # what followed in this chunk belonged to the skipped message
            buf.clear()
        return bytes(out)

    def _size(self, buf: bytearray) -> int | None:
        """Length of the next client message, None until enough bytes arrived to know it."""
        stage = self._stage
        if stage == "version":
            return 12
        if stage == "vncauth":
            return 16
        if stage in ("security", "init"):
            return 1
        kind = buf[0]
        fixed = {0: 20, 3: 10, 4: 8, 5: 6, 150: 10, 250: 4}
        if kind in fixed:
            return fixed[kind]
        if kind == 2:  # SetEncodings: 4 + 4 * count
            return None if len(buf) < 4 else 4 + 4 * int.from_bytes(buf[2:4], "big")
        if kind == 6:  # ClientCutText: 8 + |length| (negative: extended clipboard)
            return None if len(buf) < 8 else 8 + abs(int.from_bytes(buf[4:8], "big", signed=True))
        if kind == 248:  # Fence: 9 + length
            return None if len(buf) < 9 else 9 + buf[8]
        if kind == 251:  # SetDesktopSize: 8 + 16 * screens
            return None if len(buf) < 8 else 8 + 16 * buf[6]
        if kind == 255:  # QEMU: extended key event (the only one noVNC sends to Xvnc)
            if len(buf) < 2:
                return None
            if buf[1] == 0:
                return 12
        raise ValueError(f"unexpected RFB client message type {kind}")


class WsTunnel(Tunnel):
    """A :class:`Tunnel` whose client side speaks WebSocket frames (binary payloads are the VNC bytes)."""

    def __init__(self, front: FrontConnection, view_only: bool = False, max_message: int = MAX_MESSAGE) -> None:
        super().__init__(front)
        self.reader = FrameReader(max_message)
        self._close_sent = False
        self.filter = ViewOnlyFilter() if view_only else None

    # client → desktop
    def from_client(self, data: bytes) -> None:
        try:
            events = self.reader.feed(data)
        except FrameError as e:
            self.close(e.reason, e.code)
            return
        payloads: list[bytes] = []
        for event in events:
            if isinstance(event, bytes):
                payloads.append(event)
                continue
            opcode, payload = event
            if opcode == OP_PING:
                self._send_frame(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else CLOSE_NORMAL
                self._forward(payloads)
                self.close("client closed the connection", code if 1000 <= code < 5000 else CLOSE_NORMAL)
                return
        self._forward(payloads)

    def _forward(self, payloads: list[bytes]) -> None:
        if not payloads:
            return
        data = payloads[0] if len(payloads) == 1 else b"".join(payloads)
        if self.filter is not None:
            try:
                data = self.filter.feed(data)
            except ValueError as e:
                self.close(f"view-only: {e}", CLOSE_PROTOCOL)
                return
        if data:
            super().from_client(data)

    # desktop → client
    def _to_client(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self._send_frame(OP_BINARY, data)

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        tr = self.front.transport
        if tr is not None and not tr.is_closing() and not self._close_sent:
            tr.writelines((frame_header(opcode, len(payload)), payload))

    def send_text(self, text: str) -> None:
        self._send_frame(OP_TEXT, text.encode())

    def close(self, reason: str, code: int = CLOSE_NORMAL) -> None:
        if not self._close_sent:
            self._send_frame(OP_CLOSE, close_payload(code, reason))
            self._close_sent = True
        super().close(reason)


def send_text(front: FrontConnection, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    front.write(frame_header(OP_TEXT, len(data)) + data)


def send_close(front: FrontConnection, code: int, reason: str) -> None:
    payload = close_payload(code, reason)
    front.write(frame_header(OP_CLOSE, len(payload)) + payload)


class WsClient:
    """The connect flow's client side for a browser (see ``session.ClientSide``)."""

    protocol = "websocket"

    def __init__(self, channel: HttpChannel, max_message: int = MAX_MESSAGE) -> None:
        self.channel = channel
        self.front = channel.front
        self.max_message = max_message

    def progress(self, message: str) -> None:
        if not self.front.gone:
            send_text(self.front, {"progress": message})

    def new_tunnel(self) -> Tunnel:
        return WsTunnel(self.front, max_message=self.max_message)

    def switch(self) -> bytes:
        return self.channel.leave()  # the 101 went out before the flow started

    def refuse(self, reason: str) -> None:
        if not self.front.gone:
            send_close(self.front, CLOSE_ERROR, reason.rstrip("."))
            self.front.close()


def handshake(req: Request) -> bytes:
    """wsproto checks the upgrade request and writes the ``101`` (subprotocol ``binary`` when offered)."""
    ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    lines = [f"GET {req.target} HTTP/1.1", *(f"{k}: {v}" for k, v in req.headers.items())]
    try:
        ws.receive_data(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        for event in ws.events():
            if isinstance(event, wse.Request):
                sub = "binary" if "binary" in event.subprotocols else None
                return ws.send(wse.AcceptConnection(subprotocol=sub))
            if isinstance(event, wse.RejectConnection):
                break
    except UnicodeError:  # wsproto decodes Host and the token lists as ASCII/IDNA (found by bench/fuzz.py)
        pass
    raise BadInput("not a valid WebSocket upgrade request", code="bad_websocket")


class WebSocketConnect:
    """Serves one WebSocket connect: ticket → ``101`` → the connect (or spy) flow → frame relay."""

    def __init__(self, db: Database, sessions: SessionRunner) -> None:
        self.db = db
        self.sessions = sessions

    async def serve(self, channel: HttpChannel, req: Request) -> None:
        t0 = time.monotonic()
        try:
            # bad input is refused before the ticket is looked at: a refused request must not use it up
            ids = [v for k, v in req.query if k == "id"]
            desktop_id = parse_id(ids[0]) if ids else None
            if ids and (desktop_id is None or len(ids) > 1):
                raise BadInput("the desktop id must be one positive integer of at most 19 digits", code="bad_id")
            geometry = next((v for k, v in req.query if k == "geometry"), "")
            if geometry and not GEOMETRY.match(geometry):
                raise BadInput(f"geometry {geometry[:40]!r} must look like 1280x800", code="bad_geometry")
            response = handshake(req)
            tickets = [v for k, v in req.query if k == "ticket"]
            ticket = await redeem_ticket(self.db, tickets[0] if tickets else "", desktop_id)
            channel.front.mark_authenticated()
            desk = None if ticket.spy else await desktop_for_user(self.db, ticket.user, ticket.desktop_id)
        except DeckardError as e:
            status = e.status if e.status in (401, 403, 404, 422) else 400
            channel.respond(status, e.message + "\n", headers=(("X-Deckard-Error", e.code),))
            log.info("broker.request", peer=channel.front.peer, path=req.path, status=status, error=e.code)
            return
        except RemoteProtocolError as e:
            channel.respond(400, f"bad WebSocket request: {e}\n", headers=(("X-Deckard-Error", "bad_websocket"),))
            return
        channel.front.write(response)
        auth_ms = round((time.monotonic() - t0) * 1000, 1)
        if ticket.spy:
            await self._spy(channel, ticket)
            return
        assert desk is not None
        params = ConnectParams(desk.id, {"qvd.client.geometry": geometry} if geometry else {})
        login = ticket.user.login
        await self.sessions.run(
            WsClient(channel, self.sessions.settings.max_ws_message),
            ConnectRequest(ticket.user, login, params, desk, req.received_at, auth_ms),
        )

    async def _spy(self, channel: HttpChannel, ticket: Ticket) -> None:
        """Watch the desktop's display as a second, shared VNC client; the session is not touched."""
        front = channel.front
        bound = log.bind(desktop_id=ticket.desktop_id, admin=ticket.admin_name, peer=front.peer)
        tunnel = WsTunnel(front, view_only=not ticket.interactive, max_message=self.sessions.settings.max_ws_message)
        try:
            async with self.db.connect() as conn:
                desk = await load_desktop(conn, ticket.desktop_id)
            if desk.state != "running" or not desk.agent_token:
                raise Unavailable(f"the desktop is not running (it is {desk.state})", code="not_running")
            send_text(front, {"progress": "Connecting to the desktop's display"})
            try:
                secret = display_password(desk.agent_token or "")
                await tunnel.open(desk.ip, self.sessions.ports.display, DISPLAY_CONNECT_TIMEOUT, secret)
            except (OSError, TimeoutError):
                raise Unavailable(
                    "the desktop has no display yet (the user has not connected)", code="no_display"
                ) from None
        except DeckardError as e:
            tunnel.discard()
            send_close(front, CLOSE_ERROR, e.message)
            front.close()
            bound.info("broker.spy", result="failed", reason=e.message)
            return
        agent = AgentClient(desk.ip, desk.agent_token, port=self.sessions.ports.agent)
        notice = asyncio.create_task(agent.spy_notice(ticket.admin_name, interactive=ticket.interactive))
        tunnel.start(channel.leave())
        bound.info("broker.spy", result="connected", interactive=ticket.interactive)
        reason = await tunnel.done
        if not notice.done():
            notice.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await notice  # an old agent without spy_notice must not break the spy
        bound.info(
            "broker.spy",
            result="closed",
            reason=reason,
            bytes_in=tunnel.bytes_in,
            bytes_out=tunnel.bytes_out,
            dropped=tunnel.filter.dropped if tunnel.filter else 0,
        )


__all__ = ["FrameError", "FrameReader", "ViewOnlyFilter", "WebSocketConnect", "WsTunnel", "is_websocket", "unmask"]
