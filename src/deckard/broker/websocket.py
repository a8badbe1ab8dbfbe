"""The browser's way in: WebSocket on the broker's connect path, authenticated by a one-time ticket.

``GET /qvd/connect_to_vm?id=N&ticket=T`` (or ``/ws/connect?ticket=T``) with ``Upgrade: websocket``.  A browser
cannot set ``Authorization`` on a WebSocket, so the portal API issues a short-lived single-use ticket
(``services/tickets.py``) that the page puts in the URL.  A bad ticket is refused with HTTP ``401`` before the
upgrade; anything that goes wrong later is a close frame ``1011`` whose reason the page shows.

wsproto does the handshake (it knows the RFC's checks and the ``Sec-WebSocket-Accept`` arithmetic); after it,
:class:`WsTunnel` turns client frames into raw VNC bytes and VNC bytes into unmasked binary frames with the
sans-IO framing of ``broker/frames.py``.

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
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog
import wsproto
import wsproto.events as wse
from wsproto.utilities import RemoteProtocolError

from deckard.broker.frames import (
    CLOSE_ERROR,
    CLOSE_NORMAL,
    CLOSE_PROTOCOL,
    MAX_MESSAGE,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameError,
    FrameReader,
    close_payload,
    frame_header,
)
from deckard.broker.http import FRAME_HEADROOM, FrontConnection, HttpChannel, direct_buffer
from deckard.broker.params import GEOMETRY, ConnectParams, parse_desktop_id
from deckard.broker.session import ConnectRequest, SessionRunner
from deckard.broker.tunnel import Tunnel
from deckard.client.agent import AgentClient
from deckard.db.engine import Database
from deckard.drivers.display import display_password
from deckard.model.errors import BadInput, Conflict, DeckardError, Unavailable
from deckard.model.states import DesktopState
from deckard.services.desktops import load_desktop
from deckard.services.sessions import desktop_for_user
from deckard.services.tickets import Ticket, redeem_ticket

if TYPE_CHECKING:
    from deckard.broker.qvd import Request

log = structlog.get_logger("deckard.broker")

WS_PATHS = ("/qvd/connect_to_vm", "/ws/connect")
DISPLAY_CONNECT_TIMEOUT = 5.0


def is_websocket(req: Request) -> bool:
    return req.path in WS_PATHS and req.method == "GET" and "websocket" in req.header_tokens("upgrade")


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
                self._stage = "init"  # the broker offers security None only (tunnel.ClientHandshake)
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

    def to_client_direct(self, nbytes: int) -> None:
        """As the plain tunnel's, with the frame header written into the room before the payload: one write."""
        self.bytes_out += nbytes
        if (tr := self._frame_transport()) is not None:
            header = frame_header(OP_BINARY, nbytes)
            start = FRAME_HEADROOM - len(header)
            whole = direct_buffer().whole
            whole[start:FRAME_HEADROOM] = header
            tr.write(whole[start : FRAME_HEADROOM + nbytes])

    def _frame_transport(self) -> asyncio.Transport | None:
        """The client's transport while frames may still go out (open, and no close frame sent)."""
        tr = self.front.transport
        return tr if tr is not None and not tr.is_closing() and not self._close_sent else None

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        if (tr := self._frame_transport()) is not None:
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

    def switch(self, headers: Sequence[tuple[str, str]] = ()) -> bytes:  # noqa: ARG002 (no NX over WebSocket)
        return self.channel.leave()  # the 101 went out before the flow started

    def refuse(self, reason: str, code: str = "") -> None:  # noqa: ARG002 (a close frame has no room for it)
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
            desktop_id = parse_desktop_id(req.query) if any(k == "id" for k, _ in req.query) else None
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
            if desk.state != DesktopState.RUNNING or not desk.agent_token:
                raise Conflict(f"the desktop is not running (it is {desk.state})", code="not_running")
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
