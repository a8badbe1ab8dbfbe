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
from deckard.broker.params import GEOMETRY, ConnectParams
from deckard.broker.session import ConnectRequest, SessionRunner
from deckard.broker.tunnel import Tunnel
from deckard.client.agent import AgentClient
from deckard.db.engine import Database
from deckard.model.errors import BadInput, DeckardError, PermissionDenied, Unavailable
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
MAX_FRAME = 16 * 1024 * 1024  # a VNC client never sends frames anywhere near this
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


class ViewOnlyFilter:
    """Passes the RFB client messages a viewer needs; drops input (keys, pointer, clipboard, resize).

    Client → server only: the handshake (version, security choice, ClientInit forced to *shared*), then
    SetPixelFormat, SetEncodings, FramebufferUpdateRequest, EnableContinuousUpdates and Fence pass.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._stage = "version"  # version → security → init → messages
        self.dropped = 0

    def feed(self, data: bytes) -> bytes:
        """Allowed bytes out of ``data``; ValueError on a message this filter cannot size."""
        self._buf += data
        out = bytearray()
        buf = self._buf
        while buf:
            n = self._size(buf)
            if n is None or len(buf) < n:
                break
            msg = bytes(buf[:n])
            del buf[:n]
            if self._stage == "messages" and msg[0] not in (0, 2, 3, 150, 248):
                self.dropped += 1
                continue
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

    def __init__(self, front: FrontConnection, view_only: bool = False) -> None:
        super().__init__(front)
        self._rx = bytearray()
        self._close_sent = False
        self.filter = ViewOnlyFilter() if view_only else None

    # client → desktop
    def from_client(self, data: bytes) -> None:
        rx = self._rx
        rx += data
        off = 0
        end = len(rx)
        payloads: list[bytes] = []
        while end - off >= 2:
            b0, b1 = rx[off], rx[off + 1]
            length = b1 & 0x7F
            pos = off + 2
            if length == 126:
                if end - pos < 2:
                    break
                length = int.from_bytes(rx[pos : pos + 2], "big")
                pos += 2
            elif length == 127:
                if end - pos < 8:
                    break
                length = int.from_bytes(rx[pos : pos + 8], "big")
                pos += 8
            if not b1 & 0x80:
                self.close("the client sent an unmasked frame", CLOSE_PROTOCOL)
                return
            if length > MAX_FRAME:
                self.close("frame too large", CLOSE_TOO_BIG)
                return
            if end - pos < 4 + length:
                break
            key = bytes(rx[pos : pos + 4])
            pos += 4
            payload = unmask(memoryview(rx)[pos : pos + length], key)
            off = pos + length
            opcode = b0 & 0x0F
            if opcode in (OP_BINARY, OP_CONT, OP_TEXT):
                payloads.append(payload)
            elif opcode == OP_PING:
                self._send_frame(OP_PONG, payload[:125])
            elif opcode == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else CLOSE_NORMAL
                del rx[:off]
                self._forward(payloads)
                self.close("client closed the connection", code if 1000 <= code < 5000 else CLOSE_NORMAL)
                return
        if off:
            del rx[:off]
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

    def __init__(self, channel: HttpChannel) -> None:
        self.channel = channel
        self.front = channel.front

    def progress(self, message: str) -> None:
        if not self.front.gone:
            send_text(self.front, {"progress": message})

    def new_tunnel(self) -> Tunnel:
        return WsTunnel(self.front)

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
    ws.receive_data(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    for event in ws.events():
        if isinstance(event, wse.Request):
            sub = "binary" if "binary" in event.subprotocols else None
            return ws.send(wse.AcceptConnection(subprotocol=sub))
        if isinstance(event, wse.RejectConnection):
            break
    raise BadInput("not a valid WebSocket upgrade request", code="bad_websocket")


class WebSocketConnect:
    """Serves one WebSocket connect: ticket → ``101`` → the connect (or spy) flow → frame relay."""

    def __init__(self, db: Database, sessions: SessionRunner) -> None:
        self.db = db
        self.sessions = sessions

    async def serve(self, channel: HttpChannel, req: Request) -> None:
        t0 = time.monotonic()
        try:
            tickets = [v for k, v in req.query if k == "ticket"]
            ticket = await redeem_ticket(self.db, tickets[0] if tickets else "")
            ids = [v for k, v in req.query if k == "id"]
            if ids and ids[0] != str(ticket.desktop_id):
                raise PermissionDenied("the ticket is for another desktop", code="ticket_mismatch")
            geometry = next((v for k, v in req.query if k == "geometry"), "")
            if geometry and not GEOMETRY.match(geometry):
                raise BadInput(f"geometry {geometry!r} must look like 1280x800", code="bad_geometry")
            desk = None if ticket.spy else await desktop_for_user(self.db, ticket.user, ticket.desktop_id)
            response = handshake(req)
        except DeckardError as e:
            status = e.status if e.status in (401, 403, 404, 422) else 400
            channel.respond(status, e.message + "\n")
            log.info("broker.request", peer=channel.front.peer, path=req.path, status=status, error=e.code)
            return
        except RemoteProtocolError as e:
            channel.respond(400, f"bad WebSocket request: {e}\n")
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
            WsClient(channel), ConnectRequest(ticket.user, login, params, desk, req.received_at, auth_ms)
        )

    async def _spy(self, channel: HttpChannel, ticket: Ticket) -> None:
        """Watch the desktop's display as a second, shared VNC client; the session is not touched."""
        front = channel.front
        bound = log.bind(desktop_id=ticket.desktop_id, admin=ticket.admin_name, peer=front.peer)
        tunnel = WsTunnel(front, view_only=not ticket.interactive)
        try:
            async with self.db.connect() as conn:
                desk = await load_desktop(conn, ticket.desktop_id)
            if desk.state != "running" or not desk.agent_token:
                raise Unavailable(f"the desktop is not running (it is {desk.state})", code="not_running")
            send_text(front, {"progress": "Connecting to the desktop's display"})
            try:
                await tunnel.open(desk.ip, self.sessions.ports.display, DISPLAY_CONNECT_TIMEOUT)
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


__all__ = ["ViewOnlyFilter", "WebSocketConnect", "WsTunnel", "is_websocket", "unmask"]
