"""One ``connect_to_vm`` after authentication: take the desktop, start it, wait, bring up the display, relay.

This is QVD's L7R session flow (``reference/qvd.md`` §1, steps 2-5) with Deckard's differences:

* **takeover without signals**: ``open_session`` writes a fresh session id on the desktop; every session
  (in this process or another node's broker) watches the ``desktops`` channel and ends itself when the id
  is no longer its own.  With SQLite the channel does not cross processes, so the watch also polls.
* **waiting on notifications**: ``wait_until_running`` wakes on the desktop's changes and each state seen
  becomes a ``102 Processing`` with ``X-QVD-VM-Info``, as QVD's client expects.
* **a client that leaves does not stop the start**: every wait races the client's connection; if the
  client goes, the wait is dropped (the node carries on starting the desktop) and the connection is
  recorded ``aborted``.

Every outcome is written to the connection history with per-phase timings (milliseconds):
``t_auth_ms`` authentication, ``t_claim_ms`` taking the desktop and placing the start, ``t_start_ms``
waiting until it runs (or, for a guest that shows its display at boot, until the node launched it),
``t_agent_ms`` the node's guest-to-agent time of the start this connect caused, ``t_display_ms`` the agent's
``x_start`` (or dialling the display shown at boot until its Xvnc listens, or a warm guest's just taken over:
``x_start`` then finishes beside the relay), ``t_total_ms`` request received →
``101`` sent.  The same outcome is
one ``broker.connection`` log line (result, code, reason, phases, desktop, node, image, bytes) when the
connection ends; ``broker.connected`` marks the ``101`` of a session that may last hours.

The display is Xvnc (VNC) or, for QVD's clients, nxagent (NX, ``nx.py``): the agent's ``x_start`` is told which,
and the relay is opened on that display's port with that protocol's handshake.  The agent keeps one session per
desktop whatever the client: it shows an NX session to VNC clients and an Xvnc session to QVD's clients
(``docs/clients.md``).

The flow does not know which protocol the client speaks: a :class:`ClientSide` says how progress, the switch
to the relay and a refusal look on the wire (QVD: ``102``/``101``/``503``; WebSocket: text frames, the relay,
a close frame, see ``websocket.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import structlog

from deckard.broker.http import FrontConnection, HttpChannel
from deckard.broker.nx import NX_PORT, NxClientHandshake, new_slave_key
from deckard.broker.params import ConnectParams
from deckard.broker.tunnel import Tunnel
from deckard.client.agent import AgentClient
from deckard.db.engine import Database
from deckard.drivers.display import display_password, nx_cookie
from deckard.model.entities import Desktop, User, uid_for_user
from deckard.model.errors import Conflict, DeckardError, Unavailable
from deckard.model.states import DesktopState
from deckard.runtime.metrics import BROKER_BYTES, BROKER_CONNECTS, BROKER_TUNNELS, TIME_TO_DESKTOP
from deckard.runtime.settings import BrokerSettings
from deckard.services.config import read_configs
from deckard.services.desktops import request_start
from deckard.services.events import DESKTOPS
from deckard.services.node_ops import node_name
from deckard.services.sessions import (
    Progress,
    SessionOwner,
    close_session,
    mark_connected,
    open_session,
    session_owners,
    wait_until_running,
)

log = structlog.get_logger("deckard.broker")

T = TypeVar("T")

DISPLAY_CONNECT_TIMEOUT = 5.0
FINISH_WAIT = 2.0  # seconds a relay the display ended before its start finished waits for the start's outcome
# a display shown at boot is dialled until its Xvnc listens (refused meanwhile) again after a twentieth of the time
# it has been refused, between these bounds: a quick Xvnc is found within a millisecond or two of listening (at a
# fixed 5 ms, 2.5 ms late on average), a slow one on a busy node fewer dials (~110 in a second instead of 200)
DIAL_RETRY_S = (0.001, 0.02)
BOOT_DIAL_TIMEOUT = 1.0  # one such dial: a SYN left unanswered is sent again by a new dial, not in a second
# the agent's refusals that are the client's to act on, passed on with their own code
AGENT_CONFLICTS = frozenset({"display_in_use_by_other_protocol", "display_busy", "nx_unavailable"})
SHARED_BUS_SAFETY_POLL = 5.0  # with PostgreSQL notifications are reliable: poll only as a safety net
CLOSE_WAIT = 2.0  # seconds the broker's close waits for the session watch to end


def ended_because(owner: SessionOwner | None, session_id: str) -> tuple[str, str] | None:
    """(result, reason) once ``session_id`` no longer holds its desktop (``owner``: the desktop now), else None."""
    if owner is None:
        return "ended", "the desktop was deleted"
    if owner.session_id == session_id:
        return None
    if owner.session_id is not None:
        return "taken_over", "another connection took over this desktop"
    if owner.state == DesktopState.FAILED:  # the node clears the session when a start fails
        return "failed", f"the desktop failed to start: {owner.failure_reason}"
    return "ended", f"the desktop's session ended (desktop {owner.state})"


class SessionWatch:
    """One watch over every session of a broker: a session ends itself when its id no longer holds its desktop.

    Why one and not one per session: each watch looked again at every change notified on the ``desktops``
    channel and, with SQLite (whose channel does not cross processes), every ``interval`` anyway, so 500 idle
    tunnels made 2,000 queries a second and their tasks a sixth of a core.  Here a notification about a watched
    desktop looks at that desktop at once; every ``interval`` (and on a notification that names no desktop) one
    query looks at all of them.
    """

    def __init__(self, db: Database, interval: float) -> None:
        self.db = db
        self.interval = interval
        self._waiting: dict[int, dict[str, asyncio.Future[tuple[str, str]]]] = {}  # desktop → session → end
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def ended(self, desktop_id: int, session_id: str) -> tuple[str, str]:
        """(result, reason) once ``session_id`` no longer holds ``desktop_id``."""
        loop = asyncio.get_running_loop()
        end: asyncio.Future[tuple[str, str]] = loop.create_future()
        self._waiting.setdefault(desktop_id, {})[session_id] = end
        if self._task is None or self._task.done():  # first session, or the watch died of an unexpected error
            self._task = loop.create_task(self._run(), name="broker-session-watch")
        try:
            return await end
        finally:
            sessions = self._waiting.get(desktop_id, {})
            if sessions.get(session_id) is end:
                del sessions[session_id]
                if not sessions:
                    del self._waiting[desktop_id]

    async def close(self) -> None:
        self._closed = True  # Python 3.11's wait_for can swallow a cancel that meets a notification: the loop
        if self._task is not None:  # checks this flag too, and the wait for it is bounded
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=CLOSE_WAIT)
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        async with self.db.bus.subscribe(DESKTOPS) as sub:
            while not self._closed:
                payload = await sub.wait(self.interval)
                if not self._waiting:
                    continue
                if not payload or loop.time() - last >= self.interval:  # a timeout, or news of no desktop
                    ids, last = list(self._waiting), loop.time()
                else:  # one desktop's id, or a batch's (a bulk stop, a lost node's release)
                    ids = [int(i) for i in payload.split(",") if i.isdigit() and int(i) in self._waiting]
                    if not ids:
                        continue
                # the sessions waiting now: one that starts waiting during the query opened after the query began
                # to read, and the owners it reads may be from before it took the desktop (a CI run's new
                # connect was ended as "taken over" so); the next pass judges it
                judged = [(desktop_id, list(self._waiting.get(desktop_id, {}).items())) for desktop_id in ids]
                try:
                    # shielded: a cancel in the middle of a query would leave SQLite's write lock held
                    owners = await asyncio.shield(session_owners(self.db, ids))
                except Exception as e:  # database hiccup: keep the tunnels, look again soon
                    log.warning("broker.session_watch_failed", desktops=len(ids), error=str(e))
                    continue
                for desktop_id, sessions in judged:
                    for session_id, end in sessions:
                        outcome = ended_because(owners.get(desktop_id), session_id)
                        if outcome is not None and not end.done():
                            end.set_result(outcome)


class ClientGone(Exception):
    """The client closed its connection while the broker was still bringing the desktop up."""


class SessionLost(Exception):
    """The desktop's session now belongs to another connection (or ended) while bringing it up."""


@dataclass
class Ports:
    agent: int
    display: int
    nx: int = NX_PORT


class LoginRecord:
    """A connect's login audit record (``identity.login_password(record_later=True)``), written while the desktop
    boots rather than before its start is asked for: the record and the start share the farm's one event loop.
    ``start`` is idempotent; ``written`` starts it if nobody did and waits for it (every connect ends with it)."""

    def __init__(self) -> None:
        self._write: Callable[[], Awaitable[None]] | None = None
        self._task: asyncio.Future[None] | None = None

    def hold(self, write: Callable[[], Awaitable[None]] | None) -> None:
        self._write = write

    def start(self) -> None:
        if self._write is not None and self._task is None:
            self._task = asyncio.ensure_future(self._write())

    async def written(self) -> None:
        self.start()
        if self._task is not None:
            await asyncio.shield(self._task)  # the record is written even if this connect is cancelled


@dataclass
class ConnectRequest:
    """What the HTTP layer hands over once the user is authenticated and the parameters are valid."""

    user: User
    login: str  # as the user typed it (with the tenant, if any)
    params: ConnectParams
    desktop: Desktop
    received_at: float  # time.monotonic() when the request arrived
    auth_ms: float
    head_started: bool = False  # its desktop's start was asked for while the password was checked (qvd.py)
    slave_key: str = ""  # an NX connect's key to its slave channel (shared folders), given in the 101
    timings: dict[str, float] = field(default_factory=dict)
    login_record: LoginRecord = field(default_factory=LoginRecord)


class ClientSide(Protocol):
    """What the connect flow needs from the client's protocol."""

    front: FrontConnection
    protocol: str  # recorded in the connection history

    def progress(self, message: str) -> None: ...
    def new_tunnel(self) -> Tunnel: ...
    # leave the handshake (``headers``: more for the 101, where the protocol has one); returns client bytes that
    # already followed it
    def switch(self, headers: Sequence[tuple[str, str]] = ()) -> bytes: ...
    def refuse(self, reason: str, code: str = "") -> None: ...


class QvdClient:
    """QVD's L7R client: ``102 Processing`` + ``X-QVD-VM-Info``, then ``101`` or ``503``."""

    protocol = "qvd"

    def __init__(self, channel: HttpChannel) -> None:
        self.channel = channel
        self.front = channel.front

    def progress(self, message: str) -> None:
        if not self.front.gone:
            self.channel.inform(102, [("X-QVD-VM-Info", message)])

    def new_tunnel(self) -> Tunnel:
        return Tunnel(self.front)

    def switch(self, headers: Sequence[tuple[str, str]] = ()) -> bytes:
        return self.channel.switch_protocols([("Connection", "Upgrade"), ("Upgrade", "QVD/1.0"), *headers])

    def refuse(self, reason: str, code: str = "") -> None:
        if self.front.gone:
            return
        reason = reason.rstrip(".")
        headers = [("X-Deckard-Error", code)] if code else []
        self.channel.respond(503, f"The requested desktop is not available: {reason}, retry later.", headers=headers)


def _ms(since: float) -> float:
    return round((time.monotonic() - since) * 1000, 1)


class SessionRunner:
    """Runs connect flows for one broker; owns nothing but configuration."""

    def __init__(self, db: Database, settings: BrokerSettings, node_id: int | None, poll: float, ports: Ports) -> None:
        self.db = db
        self.settings = settings
        self.node_id = node_id
        self.poll = poll
        self.ports = ports
        self.shutting_down = False
        self._node_names: dict[int, str] = {}  # node id → name, for the metrics' node label
        # with PostgreSQL notifications are reliable: the watch polls only as a safety net
        self.watch = SessionWatch(db, max(poll, SHARED_BUS_SAFETY_POLL) if db.shared_across_processes else poll)

    async def _observe_connect(self, running: Desktop, timings: dict[str, float]) -> None:
        """One time-to-desktop observation per phase (after the ``101``: not on the user's clock)."""
        node = ""
        if running.node_id is not None:
            node = self._node_names.get(running.node_id, "")
            if not node:
                with contextlib.suppress(Exception):  # a metric label is not worth failing a connect for
                    node = self._node_names[running.node_id] = await node_name(self.db, running.node_id)
        image = str(running.image_id) if running.image_id is not None else ""
        for key, ms in timings.items():
            TIME_TO_DESKTOP.labels(key.removeprefix("t_").removesuffix("_ms"), image, node).observe(ms / 1000)

    async def run(self, client: ClientSide | HttpChannel, req: ConnectRequest) -> None:
        """Bring the desktop up and relay until either side closes; every outcome is recorded."""
        if isinstance(client, HttpChannel):
            client = QvdClient(client)
        front = client.front
        desk = req.desktop
        session_id, conn_id = await open_session(
            self.db,
            desk,
            req.user,
            login=req.login,
            broker_node_id=self.node_id,
            source=front.peer,
            protocol=client.protocol,
            auth_ms=req.auth_ms,
        )
        bound = log.bind(desktop_id=desk.id, session=session_id, login=req.login, peer=front.peer)
        watch = asyncio.create_task(self.watch.ended(desk.id, session_id), name=f"session-watch-{session_id}")
        result, reason, tunnel = "failed", "", None
        relaying = False  # counted among the open tunnels
        refusal = None  # the 503 text, sent once the outcome is recorded
        refusal_code = ""
        running: Desktop | None = None  # the desktop once up: its node and image go in the outcome's log line
        finish: asyncio.Task[None] | None = None  # what is left of the connect once relaying (``_bring_up``)
        try:
            tunnel, running, finish = await self._bring_up(client, req, watch)
            # the 101 first, then the record: the user's clock stops at the display, not at the database
            tunnel.start(client.switch([("X-QVD-Slave-Key", req.slave_key)] if req.slave_key else []))
            relaying = True
            BROKER_TUNNELS.inc()
            BROKER_CONNECTS.labels("connected").inc()
            await mark_connected(self.db, desk.id, session_id, conn_id, req.timings)
            bound.info("broker.connected", **req.timings)
            await self._observe_connect(running, req.timings)
            relay_end: set[asyncio.Future[Any]] = {tunnel.done, watch}
            await asyncio.wait(relay_end, return_when=asyncio.FIRST_COMPLETED)
            closed_first = not watch.done()
            if closed_first and finish is not None and not finish.done():
                # the display went before the start finished: the start's outcome says why (its guest died)
                outcome: set[asyncio.Future[Any]] = {finish, watch}
                await asyncio.wait(outcome, timeout=FINISH_WAIT, return_when=asyncio.FIRST_COMPLETED)
                closed_first = not watch.done()
            failed = finish.exception() if finish is not None and finish.done() else None
            if isinstance(failed, DeckardError):  # it closed the tunnel
                result, reason, refusal_code = "failed", failed.message, failed.code
            elif not closed_first:
                result, reason = watch.result()
                tunnel.close(reason)
                await tunnel.done
            else:
                result, reason = "closed", tunnel.done.result()
                if self.shutting_down:
                    reason = "broker shutting down"
        except ClientGone:
            result = "aborted"
            reason = "broker shutting down" if self.shutting_down else "the client left before the desktop was ready"
        except SessionLost:
            result, reason = watch.result()
            refusal = reason
        except DeckardError as e:
            result, reason = "failed", e.message
            refusal, refusal_code = e.message, e.code
        except Exception as e:  # a bug must still end the connection cleanly and be recorded
            bound.exception("broker.connect_crashed")
            result, reason = "failed", f"internal error ({type(e).__name__})"
            refusal = "internal error in the broker"
        finally:
            if relaying:
                BROKER_TUNNELS.dec()
            else:
                BROKER_CONNECTS.labels(result).inc()
            for task in (watch, finish):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            if tunnel is not None and result != "closed" and not tunnel.done.done():
                if not tunnel.front.relay:
                    tunnel.discard()
                elif result == "failed":  # a failure once relaying (the database, a bug): the tunnel ends with it
                    tunnel.close(reason)
        bytes_in = tunnel.bytes_in if tunnel else 0
        bytes_out = tunnel.bytes_out if tunnel else 0
        if relaying:
            BROKER_BYTES.labels("in").inc(bytes_in)
            BROKER_BYTES.labels("out").inc(bytes_out)
        # recorded even when the broker task is being cancelled at shutdown
        await asyncio.shield(
            close_session(
                self.db,
                desk.id,
                session_id,
                conn_id,
                result=result,
                reason=reason,
                bytes_in=bytes_in,
                bytes_out=bytes_out,
                timings=req.timings,
            )
        )
        bound.info(
            "broker.connection",
            connection_id=conn_id,
            result=result,
            code=refusal_code or None,
            reason=reason,
            node_id=running.node_id if running else None,
            image_id=running.image_id if running else None,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            **req.timings,
        )
        if refusal is not None:
            client.refuse(refusal, refusal_code)

    async def _step(self, aw: Awaitable[T], front: FrontConnection, watch: asyncio.Task[Any]) -> T:
        """Await ``aw`` unless the client leaves or the session is taken over first."""
        task = asyncio.ensure_future(aw)
        racers: set[asyncio.Future[Any]] = {task, front.closed, watch}
        await asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if front.closed.done():
            raise ClientGone
        raise SessionLost

    async def _bring_up(
        self, client: ClientSide, req: ConnectRequest, watch: asyncio.Task[Any]
    ) -> tuple[Tunnel, Desktop, asyncio.Task[None] | None]:
        """The desktop started and its display dialled: the tunnel, the desktop as it was then, and the task that
        finishes the connect while the relay runs (None: nothing left)."""
        front = client.front
        desk = req.desktop
        timings = req.timings
        timings["t_auth_ms"] = req.auth_ms

        async def progress(p: Progress) -> None:
            client.progress(p.message)

        t = time.monotonic()
        await request_start(self.db, desk.id, allow_running=True)
        timings["t_claim_ms"] = _ms(t)

        nx = req.params.nx
        t = time.monotonic()
        running = await self._step(
            wait_until_running(
                self.db,
                desk.id,
                timeout=self.settings.start_timeout,
                poll=self.poll,
                on_progress=progress,
                display_first=not nx,
            ),
            front,
            watch,
        )
        timings["t_start_ms"] = _ms(t)
        req.login_record.start()  # the guest boots: the loop has time for it now
        await progress(Progress("display", "Waiting for the display to come up"))
        if running.state != DesktopState.RUNNING:  # its display came up at boot: dialled while its agent starts
            t = time.monotonic()
            ready = asyncio.ensure_future(
                wait_until_running(self.db, desk.id, timeout=self.settings.start_timeout, poll=self.poll)
            )
            relayed = await self._display_before_agent(client, req, running, ready, watch)
            if relayed is not None:
                timings["t_display_ms"] = _ms(t)
                timings["t_total_ms"] = _ms(req.received_at)
                return relayed[0], running, relayed[1]
            running = await self._step(ready, front, watch)  # the agent answered first: the usual path
            timings["t_start_ms"] += _ms(t)
        if (req.head_started or desk.state != DesktopState.RUNNING) and running.start_agent_ms is not None:
            timings["t_agent_ms"] = round(running.start_agent_ms, 1)
        if not nx and running.guest and desk.state != DesktopState.RUNNING:
            t = time.monotonic()
            taken = await self._taken_over_display(client, req, running, watch)
            if taken is not None:
                timings["t_display_ms"] = _ms(t)
                timings["t_total_ms"] = _ms(req.received_at)
                return taken[0], running, taken[1]

        t = time.monotonic()
        printing = False
        if nx:  # what the slave channel may carry for this desktop: shared folders (a key), printing
            async with self.db.connect() as conn:
                switches = await read_configs(conn, "nx.", desk.tenant_id, desk.osf_id)
            if switches["nx.shares.enabled"]:
                req.slave_key = new_slave_key()
            printing = bool(switches["nx.printing.enabled"])
        token = running.agent_token or ""
        port, secret = self.ports.display, display_password(token)
        early: tuple[Tunnel, asyncio.Future[None]] | None = None
        if not nx:  # the display is most often up already (started at boot, a warm guest's): its RFB handshake goes
            # beside x_start, and a display that x_start had to start itself gets a connection of its own after it
            first = client.new_tunnel()
            early = (first, asyncio.ensure_future(first.open(running.ip, port, DISPLAY_CONNECT_TIMEOUT, secret)))
        try:
            started = await self._step(
                self._x_start(
                    running, req, {"protocol": "nx", **nx.agent_params(req.slave_key, printing)} if nx else None
                ),
                front,
                watch,
            )
        except BaseException:
            if early is not None:
                await _abandon(*early)
            raise
        timings["t_display_ms"] = _ms(t)

        if nx:  # dialled once nxproxy's options are in: nxagent aborts on a proxy that leaves mid-negotiation
            tunnel = Tunnel(front, NxClientHandshake(nx_cookie(token)), greeting=b"")
            tunnel.open_later(running.ip, self.ports.nx, DISPLAY_CONNECT_TIMEOUT)
            timings["t_total_ms"] = _ms(req.received_at)
            return tunnel, running, None
        assert early is not None
        reused = await self._early_tunnel(*early, bool(started.get("already")), front, watch)
        if reused is not None:
            tunnel = reused
        else:
            tunnel = client.new_tunnel()
            try:
                await self._step(tunnel.open(running.ip, port, DISPLAY_CONNECT_TIMEOUT, secret), front, watch)
            except (OSError, TimeoutError) as e:
                raise Unavailable(
                    f"cannot connect to the desktop's display at {running.ip}:{port} ({e or 'timeout'})",
                    code="display_unreachable",
                ) from None
            except BaseException:
                tunnel.discard()
                raise
        if watch.done():
            tunnel.discard()
            raise SessionLost
        timings["t_total_ms"] = _ms(req.received_at)
        return tunnel, running, None

    async def _x_start(self, running: Desktop, req: ConnectRequest, extra: dict[str, str] | None = None) -> Any:
        """The agent's ``x_start`` for this connect; its refusals that are the client's to act on as Conflict."""
        agent = AgentClient(running.ip, running.agent_token or "", port=self.ports.agent)
        try:
            return await agent.x_start(
                user=req.user.login,
                uid=uid_for_user(req.user.id),
                geometry=req.params.geometry,
                timeout=self.settings.display_timeout,
                keyboard=req.params.keyboard,
                extra=extra,
            )
        except Unavailable as e:
            agent_code = e.details.get("agent_code")
            if agent_code in AGENT_CONFLICTS:
                raise Conflict(e.message, code=str(agent_code)) from None
            raise

    async def _display_before_agent(
        self,
        client: ClientSide,
        req: ConnectRequest,
        booting: Desktop,
        ready: asyncio.Future[Desktop],
        watch: asyncio.Task[Any],
    ) -> tuple[Tunnel, asyncio.Task[None]] | None:
        """Dial the display a starting guest showed at boot (``display_at``) while its agent starts: refused until
        Xvnc listens, dialled again after :data:`DIAL_RETRY_S`.  Returns the tunnel and the task that finishes the
        connect once the agent answers (its ``x_start``: the user checked, the keyboard set), or None when the
        agent answered first (``ready``, the wait for it, is done: the caller goes the usual way, which says what is
        wrong if the start failed or the display still does not answer)."""
        front = client.front
        secret = display_password(booting.agent_token or "")
        loop = asyncio.get_running_loop()
        since = loop.time()
        try:
            while not ready.done():
                tunnel = client.new_tunnel()
                try:
                    await self._step(
                        tunnel.open(booting.ip, self.ports.display, BOOT_DIAL_TIMEOUT, secret), front, watch
                    )
                except (OSError, TimeoutError):  # refused until Xvnc listens; whatever else is wrong the usual path
                    tunnel.discard()  # reports once the agent answers (this one is only ever a head start)
                    retry = min(max((loop.time() - since) / 20, DIAL_RETRY_S[0]), DIAL_RETRY_S[1])
                    await self._step(asyncio.wait({ready}, timeout=retry), front, watch)
                    continue
                except BaseException:
                    tunnel.discard()
                    raise
                finish = asyncio.create_task(self._finish_start(tunnel, ready, req), name=f"finish-{booting.id}")
                finish.add_done_callback(lambda _: ready.cancel())  # cancelled before it ran: the wait goes too
                return tunnel, finish
        except BaseException:
            ready.cancel()
            await asyncio.gather(ready, return_exceptions=True)
            raise
        return None

    async def _taken_over_display(
        self, client: ClientSide, req: ConnectRequest, running: Desktop, watch: asyncio.Task[Any]
    ) -> tuple[Tunnel, asyncio.Task[None]] | None:
        """The display of a warm guest this connect's start took over (``running.guest``): the take-over started
        this user's session on it, so it is relayed as soon as it is dialled, and ``x_start`` (the user checked,
        the keyboard set) finishes beside the relay, as for a display shown at boot.  None when the dial failed:
        the caller goes the usual way, which says what is wrong."""
        tunnel = client.new_tunnel()
        secret = display_password(running.agent_token or "")
        opening = tunnel.open(running.ip, self.ports.display, DISPLAY_CONNECT_TIMEOUT, secret)
        if not await self._opened(tunnel, opening, client.front, watch):
            return None
        ready: asyncio.Future[Desktop] = asyncio.get_running_loop().create_future()
        ready.set_result(running)
        return tunnel, asyncio.create_task(self._finish_start(tunnel, ready, req), name=f"finish-{running.id}")

    async def _finish_start(self, tunnel: Tunnel, ready: asyncio.Future[Desktop], req: ConnectRequest) -> None:
        """The rest of a connect relayed before the agent answered: its ``x_start`` once it runs.  A failure
        closes the tunnel with its reason and is raised (the connection's outcome)."""
        try:
            await self._x_start(await ready, req)
        except DeckardError as e:
            tunnel.close(e.message)
            raise
        except Exception:
            log.exception("broker.finish_crashed")
            tunnel.close("internal error in the broker")
            raise

    async def _early_tunnel(
        self,
        tunnel: Tunnel,
        opening: asyncio.Future[None],
        already: bool,
        front: FrontConnection,
        watch: asyncio.Task[Any],
    ) -> Tunnel | None:
        """The connection opened beside ``x_start`` when it reached the display that ``x_start`` found running
        (``already``); None when it failed or reached a display started since (a new connection is opened then)."""
        if not opening.done() and tunnel.desktop is None:  # still dialling: a SYN the kernel will only retry in a
            await _abandon(tunnel, opening)  # second (x_start paid it too, on a path not yet learned); dial anew
            return None
        if not await self._opened(tunnel, opening, front, watch):
            return None
        if already:
            return tunnel
        tunnel.discard()
        return None

    async def _opened(
        self, tunnel: Tunnel, opening: Awaitable[None], front: FrontConnection, watch: asyncio.Task[Any]
    ) -> bool:
        """Whether the tunnel's dial (``opening``) reached the display; a tunnel whose dial failed is discarded."""
        try:
            await self._step(opening, front, watch)
        except (OSError, TimeoutError):
            tunnel.discard()
            return False
        except BaseException:
            tunnel.discard()
            raise
        return True


async def _abandon(tunnel: Tunnel, opening: asyncio.Future[None]) -> None:
    """Stop a display connection being opened and drop it (the connect failed before it was needed)."""
    opening.cancel()
    await asyncio.gather(opening, return_exceptions=True)
    tunnel.discard()
