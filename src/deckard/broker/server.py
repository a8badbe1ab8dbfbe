"""The broker listener (QVD's L7R): one TLS port, one task per client connection, graceful close.

The node daemon owns a :class:`Broker` and calls ``start`` and ``close``; everything the broker knows comes
from the database, so any node's broker can serve any desktop of the farm.  A TLS handshake that fails never
reaches this code (asyncio drops the connection), which is the wanted behaviour: nothing to answer.

Why the broker accepts sockets itself instead of ``loop.create_server(ssl=...)``: the connection caps must
act *before* the TLS handshake, when a refused connection costs nothing but a reset.  A server made by
``create_server`` calls the protocol only after the handshake, so a flood of clients that never finish it
could not be counted.  Here each accepted socket is counted against two caps (``BrokerSettings``): all open
connections, and connections from its source address that have not logged in yet (so an office behind one
NAT is not limited to 64 desktops, while anonymous ones are).  Over a cap, the socket is reset at once.

Why ``malloc_trim``: after a burst of thousands of connections closes, glibc keeps the freed heap in its
arenas and the process's RSS stays high; giving it back once the burst is over keeps the farm's memory near
idle (``bench/abuse.py`` and ``bench/tunnels.py`` measure it).  The database's idle pooled connections go first
(``Database.release_idle``: on SQLite each holds a page cache, filled by the burst's logins), then a garbage
collection: a tunnel's objects (client connection, relay, desktop side) refer to each other, so an idle process
would otherwise keep them until the collector's next full pass, which allocation counts may not call for in a
long while.

Why ``mallopt``: streams move 256 KiB buffers; glibc's adaptive mmap threshold soon serves them from the heap,
and each thread (database drivers, executors) gets an arena of its own, so the heap kept every stream's
high-water mark: ten full-screen streams took the farm from 208 to 297 MB.  With big buffers always mapped
(freed straight back) and two arenas, the same streams keep it between 128 and 138 MB (``bench/soak.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import socket
import ssl
import struct
from collections.abc import Callable

import structlog

from deckard.broker.http import FrontConnection
from deckard.broker.qvd import QvdProtocol
from deckard.broker.session import Ports, SessionRunner
from deckard.broker.tlsfront import accept_tls
from deckard.db.engine import Database
from deckard.drivers.base import AGENT_PORT, DISPLAY_PORT
from deckard.drivers.display import load_des
from deckard.runtime.limits import AddressCounts
from deckard.runtime.settings import BrokerSettings

log = structlog.get_logger("deckard.broker")

CLOSE_GRACE = 3.0  # seconds connections get to close cleanly before they are aborted
DRAIN_TIMEOUT = 10.0  # seconds ``close`` then waits for them to record their end
TRIM_AFTER_BURST = 256  # connections closed since the peak before the heap is given back to the system
TRIM_DELAY = 1.0  # seconds after the burst's closes; more closes in the meantime wait for the same trim
REFUSAL_LOG_EVERY = 5.0  # seconds between two log lines about refused connections
RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST and keeps no TIME_WAIT
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's default, made fixed: setting it turns the adaptive threshold off


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    return trim


_malloc_trim = _load_malloc_trim()


def bound_the_heap() -> bool:
    """Big buffers by mmap (returned at free) and at most two arenas (glibc ``mallopt``); False elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_ARENA_MAX, 2))


def release_freed_memory() -> bool:
    """Give the heap freed by closed connections back to the system (glibc); False where unavailable."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


class Broker:
    """Accepts QVD-protocol clients on ``host:port`` and tunnels them to their desktops."""

    def __init__(
        self,
        db: Database,
        settings: BrokerSettings,
        ssl_context: ssl.SSLContext | None,
        node_id: int | None = None,
        poll: float = 0.25,
        *,
        agent_port: int = AGENT_PORT,
        display_port: int = DISPLAY_PORT,
        network: str | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.ssl_context = ssl_context
        self.sessions = SessionRunner(db, settings, node_id, poll, Ports(agent_port, display_port))
        self.protocol = QvdProtocol(db, self.sessions, network)
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._fronts: set[FrontConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._handshakes: set[asyncio.Task[None]] = set()
        self.open_connections = 0
        # connections per source address that have not logged in
        self.prelogin = AddressCounts()
        self.refused = 0
        self._refusals_logged = 0
        self._last_refusal_log = 0.0
        self._peak = 0  # most connections open since the last trim
        self._trim: asyncio.TimerHandle | None = None

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the broker is not listening")
        return int(self._listener.getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, _type, _proto, _name, address = infos[0]
        sock = socket.create_server(address, family=family, backlog=1024)
        sock.setblocking(False)
        if self.settings.trim_heap:
            bound_the_heap()
        load_des()  # the first tunnel's VNC authentication
        self._listener = sock
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop(sock), name="broker-accept")
        log.info("broker.listening", host=host, port=self.port, tls=self.ssl_context is not None)

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(sock)
            except OSError as e:  # out of file descriptors, or a connection reset in the backlog
                log.warning("broker.accept_failed", error=str(e))
                await asyncio.sleep(0.1)
                continue
            self._admit(conn, address)

    def _admit(self, conn: socket.socket, address: object) -> None:
        """Count a new connection, or reset it at once when a cap is reached."""
        peer = str(address[0]) if isinstance(address, tuple) and address else ""
        settings = self.settings
        full = self.open_connections >= settings.max_connections
        if full or not self.prelogin.add(peer, settings.max_connections_per_address):
            self._refuse(conn, peer)
            return
        self.open_connections += 1
        self._peak = max(self._peak, self.open_connections)
        conn.setblocking(False)
        front = FrontConnection(self._serve, peer)
        front.on_authenticated = self._logged_in
        front.closed.add_done_callback(lambda _f: self._released(front))
        task = asyncio.get_running_loop().create_task(self._handshake(conn, front), name=f"broker-tls-{peer}")
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def _refuse(self, conn: socket.socket, peer: str) -> None:
        self.refused += 1
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
        conn.close()
        now = asyncio.get_running_loop().time()
        if now - self._last_refusal_log >= REFUSAL_LOG_EVERY:
            log.warning(
                "broker.connections_refused",
                peer=peer,
                refused=self.refused - self._refusals_logged,
                open=self.open_connections,
                prelogin_from_peer=self.prelogin[peer],
            )
            self._last_refusal_log = now
            self._refusals_logged = self.refused

    async def _handshake(self, conn: socket.socket, front: FrontConnection) -> None:
        """TLS (bounded by ``first_request_timeout``); then the protocol's ``connection_made`` serves it."""
        try:
            if self.ssl_context is None:
                await asyncio.get_running_loop().connect_accepted_socket(lambda: front, conn)
            else:
                await accept_tls(conn, self.ssl_context, front, self.settings.first_request_timeout)
        except (OSError, TimeoutError, ssl.SSLError, asyncio.CancelledError):
            with contextlib.suppress(OSError):
                conn.close()
            if not front.closed.done():
                front.closed.set_result(None)  # never connected: release its place here

    def _logged_in(self, front: FrontConnection) -> None:
        self.prelogin.remove(front.peer)

    def _released(self, front: FrontConnection) -> None:
        self.open_connections -= 1
        if not front.authenticated:
            self.prelogin.remove(front.peer)
        if self._peak - self.open_connections >= TRIM_AFTER_BURST and self._trim is None and self.settings.trim_heap:
            self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY, self._trim_heap)

    def _trim_heap(self) -> None:
        self._trim = None
        self._peak = self.open_connections
        task = asyncio.get_running_loop().create_task(self._give_back_memory(), name="broker-trim")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _give_back_memory(self) -> None:
        await self.db.release_idle()  # the logins' database connections first: their memory is freed with them
        gc.collect()  # a tunnel's objects refer to each other: without a collection their memory waits for one
        release_freed_memory()

    def _serve(self, front: FrontConnection) -> None:
        self._fronts.add(front)
        task = asyncio.get_running_loop().create_task(self._run(front), name=f"broker-{front.peer}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, front: FrontConnection) -> None:
        try:
            await self.protocol.serve(front)
        except Exception:
            log.exception("broker.connection_crashed", peer=front.peer)
            front.abort()
        finally:
            if front.relay is None:
                self._fronts.discard(front)
            else:
                front.closed.add_done_callback(lambda _f: self._fronts.discard(front))

    async def close(self) -> None:
        """Stop accepting, close every connection and tunnel, and wait for them to record their end."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
        for task in list(self._handshakes):
            task.cancel()
        self.sessions.shutting_down = True
        for front in list(self._fronts):
            if front.relay is not None:
                front.relay.close("broker shutting down")
            else:
                front.close()
        if self._tasks:  # a client that does not answer the TLS close is cut off after a grace period
            await asyncio.wait(set(self._tasks), timeout=CLOSE_GRACE)
        for front in list(self._fronts):
            front.abort()
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=DRAIN_TIMEOUT)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._handshakes:
            await asyncio.wait(set(self._handshakes), timeout=CLOSE_GRACE)
        await self.sessions.watch.close()
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None
        self._listener = None
        log.info("broker.closed")
