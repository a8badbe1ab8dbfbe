"""The broker listener (QVD's L7R): one TLS port, one task per client connection, graceful close.

The node daemon owns a :class:`Broker` and calls ``start`` and ``close``; everything the broker knows comes
from the database, so any node's broker can serve any desktop of the farm.  A TLS handshake that fails never
reaches this code (asyncio drops the connection), which is the wanted behaviour: nothing to answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import structlog

from deckard.broker.http import FrontConnection
from deckard.broker.qvd import QvdProtocol
from deckard.broker.session import Ports, SessionRunner
from deckard.db.engine import Database
from deckard.drivers.base import AGENT_PORT, DISPLAY_PORT
from deckard.runtime.settings import BrokerSettings

log = structlog.get_logger("deckard.broker")

TLS_HANDSHAKE_TIMEOUT = 10.0
CLOSE_GRACE = 3.0  # seconds connections get to close cleanly before they are aborted
DRAIN_TIMEOUT = 10.0  # seconds ``close`` then waits for them to record their end


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
    ) -> None:
        self.db = db
        self.settings = settings
        self.ssl_context = ssl_context
        self.sessions = SessionRunner(db, settings, node_id, poll, Ports(agent_port, display_port))
        self.protocol = QvdProtocol(db, self.sessions)
        self._server: asyncio.Server | None = None
        self._fronts: set[FrontConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the broker is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: FrontConnection(self._serve),
            host,
            port,
            ssl=self.ssl_context,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if self.ssl_context else None,
            reuse_address=True,
            backlog=1024,
        )
        log.info("broker.listening", host=host, port=self.port, tls=self.ssl_context is not None)

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
        if self._server is not None:
            self._server.close()
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
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        log.info("broker.closed")
