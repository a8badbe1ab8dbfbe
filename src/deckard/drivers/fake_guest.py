"""A fake desktop on loopback: the real guest agent over a pretend X session, and a display that checks VNC auth.

The fake driver (drivers/fake.py) starts one :class:`FakeGuest` per desktop inside the node's process, so the
node and the broker run their real code paths against it: the node waits for the agent and pings it, the
broker calls ``x_start`` and authenticates to the display.  The agent is deckard-vma's own RPC code
(:class:`deckard.vma.agent.Agent` and its HTTP ``Handler``, fed from asyncio streams), with only the X session
replaced: a protocol change in the agent reaches the fake without anyone copying it.  The display speaks
RFB 3.8 with VNC authentication against the desktop's display secret (drivers/display.py), as Xvnc does in a
real desktop, and then echoes what it receives, so a tunnel's bytes can be checked end to end.  An NX session
(``protocol=nx``) opens a second port that checks nxproxy's first fields for the desktop's NX cookie, as
nxagent does, then echoes too.

Both listen on the desktop's own address, which is why the fake driver wants a loopback desktop network: on
Linux every address of 127.0.0.0/8 can be bound without configuring anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import socketserver
import subprocess
import time
from typing import Any, cast

import structlog

from deckard.drivers.base import AGENT_PORT, DISPLAY_PORT, GuestSpec
from deckard.drivers.display import display_password, nx_cookie, vnc_auth_response
from deckard.vma import agent as vma

log = structlog.get_logger()

RFB_VERSION = b"RFB 003.008\n"
_NO_SERVER = cast("socketserver.BaseServer", None)  # the handler never looks at its server
MAX_REQUEST = 64 * 1024  # the agent's RPCs are a line of query string; anything bigger is not the node or the broker


class FakeXSession(vma.XSession):
    """The display's life as the agent sees it; ``x_start`` opens the guest's display port instead of Xvnc."""

    def __init__(self, guest: FakeGuest) -> None:
        super().__init__(vma.Children())
        self.guest = guest

    def current_state(self) -> str:
        if self.state == "listening" and self.guest.viewers:
            return "connected"
        return self.state

    def start(  # a fake display has no geometry, keyboard nor Xvnc
        self,
        login: str,
        uid: int,
        geometry: str,  # noqa: ARG002
        keyboard: str = "",  # noqa: ARG002
        xvnc: subprocess.Popen[bytes] | None = None,  # noqa: ARG002
    ) -> dict[str, Any]:
        with self.lock:
            if self.state == "listening" and self.user == login:
                return {"state": self.current_state(), "user": login, "already": True}
            if self.guest.x_start_error:
                raise vma.AgentError("x_start_failed", self.guest.x_start_error, 500)
            try:
                self.guest.open_display()
            except OSError as exc:
                raise vma.AgentError("x_start_failed", f"could not start the display: {exc}", 500) from exc
            self.state, self.user, self.uid = "listening", login, uid
        return {"state": "listening", "user": login, "elapsed_ms": 0}

    def stop(self) -> None:
        with self.lock:
            self.state, self.user, self.uid = "stopped", None, None
            self.claimed = False
        self.guest.close_display()

    def notify(self, text: str, timeout: int = 60) -> str:  # noqa: ARG002 (nobody reads a fake banner)
        return "xmessage" if self.state == "listening" else "none"

    def input_idle_ms(self) -> int | None:
        return self.guest.input_idle_ms() if self.state == "listening" else None

    def expire(self) -> str:
        return self.notify("expired")


class FakeNxSession(vma.NxSession):
    """An NX session as the agent sees it; ``x_start`` opens the guest's NX port instead of nxagent."""

    def __init__(self, guest: FakeGuest) -> None:
        super().__init__(vma.Children(), guest.spec.agent_token)
        self.guest = guest
        self.view = False  # shown to VNC viewers (attach_vnc)

    def current_state(self) -> str:
        if self.state == "listening":
            return "connected" if self.guest.nx_viewers else "listening"
        return self.state

    def server_alive(self) -> bool:
        return self.guest.running

    def start_nx(
        self,
        login: str,
        uid: int,
        geometry: str,  # noqa: ARG002
        keyboard: str,  # noqa: ARG002
        opts: dict[str, Any],  # noqa: ARG002
        shadow_of: vma.XSession | None = None,
    ) -> dict[str, Any]:
        """nxagent's port opens; with ``shadow_of`` it shows the guest's VNC session (whose display stays)."""
        with self.lock:
            self.shadow = shadow_of is not None
            if self.view:  # a QVD client takes the session back from the VNC viewers
                self.view = False
                self.guest.close_display()
            if self.state == "listening" and self.user == login:
                return {"state": self.current_state(), "user": login, "already": True, "protocol": "nx"}
            try:
                self.guest.open_nx()
            except OSError as exc:
                raise vma.AgentError("x_start_failed", f"could not start nxagent: {exc}", 500) from exc
            self.state, self.user, self.uid = "listening", login, uid
        return {"state": "listening", "user": login, "elapsed_ms": 0, "protocol": "nx"}

    def attach_vnc(self, login: str, geometry: str, keyboard: str) -> dict[str, Any]:  # noqa: ARG002
        """The session shown to VNC viewers: the guest's display port opens, as the agent's view does."""
        with self.lock:
            try:
                self.guest.open_display()
            except OSError as exc:
                raise vma.AgentError("x_start_failed", f"could not show the NX session: {exc}", 500) from exc
            self.view = True
        return {"state": "listening", "user": login, "resumed": True, "protocol": "vnc"}

    def viewed(self) -> bool:
        return self.view

    def stop(self) -> None:
        with self.lock:
            self.state, self.user, self.uid = "stopped", None, None
            viewed, self.view, self.shadow = self.view, False, False
        self.guest.close_nx()
        if viewed:
            self.guest.close_display()

    def notify(self, text: str, timeout: int = 60) -> str:  # noqa: ARG002
        return "xmessage" if self.state == "listening" else "none"

    def input_idle_ms(self) -> int | None:
        return self.guest.input_idle_ms() if self.state == "listening" else None


class FakeAgent(vma.Agent):
    """deckard-vma's RPC methods on the fake session; it records every call for tests to read."""

    def __init__(self, guest: FakeGuest) -> None:
        super().__init__(guest.spec.agent_token, is_init=False)
        self.guest = guest
        self.x = FakeXSession(guest)
        self.nx = FakeNxSession(guest)

    def call(self, method: str, params: dict[str, str]) -> dict[str, Any]:
        self.guest.calls.append((method, dict(params)))
        return super().call(method, params)

    def poweroff(self) -> None:
        super().poweroff()  # runs on the timer thread of rpc_poweroff, or on the loop for a driver stop
        with contextlib.suppress(RuntimeError):  # the loop is gone: so is the guest
            self.guest.loop.call_soon_threadsafe(self.guest.exit)


class _Buffered:
    """Mixed into the agent's HTTP handler: it runs over one request already read into memory (no socket)."""

    request: bytes

    def setup(self) -> None:
        self.rfile = io.BytesIO(self.request)
        self.wfile = io.BytesIO()

    def finish(self) -> None:
        pass  # the caller reads wfile


class FakeGuest:
    """One desktop's agent and display on ``spec.ip``; ``running`` until it powers off or is killed."""

    def __init__(self, spec: GuestSpec, *, x_start_error: str | None = None) -> None:
        self.spec = spec
        self.loop = asyncio.get_running_loop()
        self.running = False
        self.x_start_error = x_start_error  # x_start answers x_start_failed with this message (a broken image)
        self.calls: list[tuple[str, dict[str, str]]] = []  # every RPC the agent received, in order
        self.auth_failures = 0  # display connections refused by VNC authentication
        self.display_bytes = 0  # what reached the display after authentication
        self.viewers: set[asyncio.StreamWriter] = set()  # authenticated display connections
        self.display_connects = 0  # display connections accepted, ever
        self.display_at_boot = False  # its display came up with it, before its agent (``boot(display=True)``)
        # the user's last keyboard or mouse input (monotonic), as an X server counts it: from the display's start;
        # tests move it with ``set_idle`` (None: the agent cannot tell, like a display without MIT-SCREEN-SAVER)
        self.input_at: float | None = time.monotonic()
        self._display_conns: set[asyncio.StreamWriter] = set()
        self.nx_viewers: set[asyncio.StreamWriter] = set()  # NX connections past the cookie check
        self.nx_options: list[str] = []  # the first fields of every NX connection, as the fake nxagent got them
        self._nx_server: socket.socket | None = None
        self._nx_servers: list[asyncio.Server] = []
        self.agent = FakeAgent(self)
        self._handler = type("FakeGuestHandler", (_Buffered, vma.handler_class()), {"agent": self.agent})
        self._agent_server: asyncio.Server | None = None
        # a slow agent's start (``boot(agent_delay=…)``): its timer and its bound socket
        self._agent_later: tuple[asyncio.TimerHandle, socket.socket] | None = None
        self._display_sock: socket.socket | None = None  # bound at x_start; served once its server is up
        self._display_server: asyncio.Server | None = None

    # ---- life ----------------------------------------------------------------------------------------
    async def boot(self, *, agent_delay: float = 0.0, display: bool = False) -> None:
        """Bring the agent up on the desktop's address (``agent_delay`` seconds later: a slow agent, whose port
        refuses until then) and with ``display`` the user's display at once (a boot script's); OSError when the
        address cannot be bound."""
        if agent_delay:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.spec.ip, AGENT_PORT))  # bound, not listening: connections are refused until it serves
            sock.setblocking(False)
            self._agent_later = (self.loop.call_later(agent_delay, lambda: self._serve_agent_later(sock)), sock)
        else:
            self._agent_server = await asyncio.start_server(self._serve_agent, self.spec.ip, AGENT_PORT)
        self.running = True
        if display:
            self.resume_display(self.spec.user_login, self.spec.user_uid)
            self.display_at_boot = True

    def _serve_agent_later(self, sock: socket.socket) -> None:
        self._agent_later = None

        def served(task: asyncio.Task[asyncio.Server]) -> None:
            if task.cancelled() or task.exception() is not None:
                sock.close()
            elif self.running:
                self._agent_server = task.result()
            else:  # the guest ended meanwhile
                task.result().close()

        self.loop.create_task(asyncio.start_server(self._serve_agent, sock=sock)).add_done_callback(served)

    @property
    def agent_alive(self) -> bool:
        return self._agent_server is not None

    def kill_agent(self) -> None:
        """The agent dies and the guest runs on (what the node must detect as a zombie)."""
        if self._agent_later is not None:  # one still to come never does
            timer, sock = self._agent_later
            timer.cancel()
            sock.close()
            self._agent_later = None
        if self._agent_server is not None:
            self._agent_server.close()
            self._agent_server = None

    def exit(self) -> None:
        """The guest ends (powered off from inside, or killed): its agent and display go with it."""
        self.kill_agent()
        self.close_display()
        self.close_nx()
        self.running = False

    def resume_display(self, user: str, uid: int) -> None:
        """After a hand-over: the display that was up before is up again, for the same user."""
        self.open_display()
        self.agent.x.state, self.agent.x.user, self.agent.x.uid = "listening", user, uid

    def set_idle(self, seconds: float | None) -> None:
        """The user last typed or moved the mouse ``seconds`` ago (0: now); None: the agent cannot tell."""
        self.input_at = None if seconds is None else time.monotonic() - seconds

    def input_idle_ms(self) -> int | None:
        return None if self.input_at is None else round((time.monotonic() - self.input_at) * 1000)

    # ---- NX ------------------------------------------------------------------------------------------
    def open_nx(self) -> None:
        if self._nx_server is not None:
            return
        self.input_at = time.monotonic()
        sock = socket.create_server((self.spec.ip, vma.NX_PORT))
        sock.setblocking(False)
        self._nx_server = sock
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._start_nx_server(sock)))

    async def _start_nx_server(self, sock: socket.socket) -> None:
        server = await asyncio.start_server(self._serve_nx, sock=sock)
        self._nx_servers.append(server)
        if self._nx_server is not sock:
            server.close()

    def close_nx(self) -> None:
        self._nx_server = None
        for server in self._nx_servers:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(server.close)
        self._nx_servers.clear()
        for conn in list(self.nx_viewers):
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(conn.close)

    async def _serve_nx(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """nxagent's side: the proxy's version and options, the cookie checked, then an echo."""
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            version = await reader.readuntil(b" ")
            options = (await reader.readuntil(b" ")).strip().decode(errors="replace")
            self.nx_options.append(version.decode(errors="replace").strip() + " " + options)
            cookies = [o.partition("=")[2] for o in options.split(",") if o.startswith("cookie=")]
            if cookies != [nx_cookie(self.spec.agent_token)]:
                self.auth_failures += 1
                writer.close()
                return
            self.nx_viewers.add(writer)
            try:
                while data := await reader.read(65536):
                    self.display_bytes += len(data)
                    writer.write(data)
                    await writer.drain()
            finally:
                self.nx_viewers.discard(writer)
        writer.close()

    # ---- display -------------------------------------------------------------------------------------
    def open_display(self) -> None:
        if self._display_sock is not None:
            return
        self.input_at = time.monotonic()
        # bound here, synchronously, so that the port accepts connections as soon as x_start answers
        sock = socket.create_server((self.spec.ip, DISPLAY_PORT))
        sock.setblocking(False)
        self._display_sock = sock
        task = self.loop.create_task(asyncio.start_server(self._serve_display, sock=sock))
        task.add_done_callback(lambda t: self._display_started(sock, t))

    def _display_started(self, sock: socket.socket, task: asyncio.Task[asyncio.Server]) -> None:
        if task.cancelled() or task.exception() is not None:
            sock.close()
            return
        if self._display_sock is sock:
            self._display_server = task.result()
        else:  # closed before it came up
            task.result().close()

    def close_display(self) -> None:
        if not _on_loop(self.loop):  # the agent's poweroff runs on a timer thread
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.close_display)
            return
        if self._display_server is not None:
            self._display_server.close()  # one still being created is closed by _display_started
        self._display_server = self._display_sock = None
        for conn in list(self._display_conns):
            conn.close()

    # ---- servers -------------------------------------------------------------------------------------
    async def _serve_agent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(v)
                    for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n"))
                    if k.lower() == b"content-length"
                ),
                0,
            )
            if len(head) + length <= MAX_REQUEST:
                body = await reader.readexactly(length) if length else b""
                handler = self._handler(head + body, writer.get_extra_info("peername"), _NO_SERVER)
                writer.write(handler.wfile.getvalue())
                await writer.drain()
        writer.close()

    async def _serve_display(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.display_connects += 1
        self._display_conns.add(writer)
        writer.write(RFB_VERSION)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await self._authenticate_and_echo(reader, writer)
        self._display_conns.discard(writer)
        writer.close()

    async def _authenticate_and_echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(12)
        writer.write(b"\x01\x02")  # one security type: VNC authentication, as Xvnc -SecurityTypes VncAuth
        await reader.readexactly(1)
        challenge = os.urandom(16)
        writer.write(challenge)
        if await reader.readexactly(16) != vnc_auth_response(display_password(self.spec.agent_token), challenge):
            self.auth_failures += 1
            writer.write(b"\x00\x00\x00\x01\x00\x00\x00\x0eauthentication")
            await writer.drain()
            return
        writer.write(b"\x00\x00\x00\x00")
        self.viewers.add(writer)
        try:
            while data := await reader.read(65536):
                self.display_bytes += len(data)
                writer.write(data)
                await writer.drain()
        finally:
            self.viewers.discard(writer)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
