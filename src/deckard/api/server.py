"""Serving the API over TLS with uvicorn, inside a process that may run other things (the node daemon).

Uvicorn normally owns the process: it installs its own SIGINT/SIGTERM handlers.  Here the host process owns
the signals and tells the API to stop by setting an ``asyncio.Event``; the server then stops accepting, lets
requests in flight finish (bounded), and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI

GRACEFUL_SHUTDOWN_S = 5  # seconds requests in flight get once stop is set


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
    ) -> None:
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
