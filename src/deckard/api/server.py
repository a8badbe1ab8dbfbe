"""Serving the API over TLS with uvicorn, inside a process that may run other things (the node daemon).

Uvicorn normally owns the process: it installs its own SIGINT/SIGTERM handlers.  Here the host process owns
the signals and tells the API to stop by setting an ``asyncio.Event``; the server then stops accepting, lets
requests in flight finish (bounded), and returns.

Bounded resources (ARCHITECTURE.md §7; limits in ``ApiSettings``): uvicorn's h11 protocol with a cap on the
request line and headers (``h11_max_incomplete_event_size``), on connections in all (``limit_concurrency``:
503 beyond it) and on idle keep-alive time.  Uvicorn has neither a deadline for a request's headers (a client
that connects and then sends nothing, or one byte a minute, holds its connection for ever) nor a cap per
client address, so ``_BoundedH11`` adds both: a connection that has not sent a complete request head
``header_timeout_s`` after it opened (or after its previous response) is closed, and an address that already
holds ``max_connections_per_address`` connections has its new ones closed at once.  Request bodies are capped
by ``api/limits.py`` inside the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import structlog
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from deckard.runtime.limits import AddressCounts
from deckard.runtime.settings import ApiSettings

log = structlog.get_logger("deckard.api")

GRACEFUL_SHUTDOWN_S = 5  # seconds requests in flight get once stop is set


def _bounded_h11(limits: ApiSettings) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a request-head deadline and a per-address connection cap."""
    addresses = AddressCounts()

    class _BoundedH11(H11Protocol):
        _address: str | None = None
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            address = self.client[0] if self.client else ""
            if not addresses.add(address, limits.max_connections_per_address):
                log.info("api.too_many_connections", address=address, limit=limits.max_connections_per_address)
                transport.abort()  # counted as gone in connection_lost, which abort() brings
                return
            self._address = address
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            if self._address is not None:
                addresses.remove(self._address)
                self._address = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._address is None:
                return  # refused above; the transport is closing
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm_head_timer()  # a request head arrived: its body and response are the app's
            elif self._head_timer is None:
                self._arm_head_timer()  # bytes of a next request: its head must come in time too

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.cycle is None or self.cycle.response_complete:
                log.info("api.header_timeout", address=self._address)
                self.transport.abort()

    return _BoundedH11


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, listening: asyncio.Event) -> None:
        super().__init__(config)
        self.listening = listening

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # the host process handles signals and sets the stop event; uvicorn must not replace its handlers
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.listening.set()


class ApiServer:
    """One TLS listener for an app.

    ``started`` is set once it accepts connections; ``port`` is the real port (useful with port 0).
    """

    def __init__(
        self,
        app: FastAPI,
        host: str,
        port: int,
        certfile: Path | str,
        keyfile: Path | str,
        started: asyncio.Event | None = None,
        limits: ApiSettings | None = None,
    ) -> None:
        if limits is None:  # the app's own settings (create_app puts them on app.state)
            settings = getattr(app.state, "settings", None)
            limits = settings.api if settings is not None else ApiSettings()
        self.host = host
        self.port = port
        self.started = started or asyncio.Event()
        config = uvicorn.Config(
            app,
            ssl_certfile=str(certfile),
            ssl_keyfile=str(keyfile),
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            server_header=False,
            proxy_headers=False,
            http=_bounded_h11(limits),
            limit_concurrency=limits.max_connections,
            timeout_keep_alive=limits.keep_alive_s,
            h11_max_incomplete_event_size=limits.max_header_bytes,
        )
        self._server = _Server(config, self.started)

    def _bind(self) -> socket.socket:
        # binding ourselves makes port 0 (any free port) usable and reports the real one before serving
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family)
        sock.setblocking(False)
        self.port = int(sock.getsockname()[1])
        return sock

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set (or this task is cancelled), then shut down gracefully."""
        serving = asyncio.create_task(self._server.serve(sockets=[self._bind()]))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._server.should_exit = True
            stopping.cancel()
            await serving  # re-raises a startup failure (e.g. an unreadable certificate)


async def serve_api(
    app: FastAPI,
    host: str,
    port: int,
    certfile: Path | str,
    keyfile: Path | str,
    stop: asyncio.Event,
    *,
    ready: asyncio.Event | None = None,
) -> None:
    """Serve ``app`` on https://host:port until ``stop`` is set; ``ready`` is set once it is listening."""
    await ApiServer(app, host, port, certfile, keyfile, started=ready).run(stop)
