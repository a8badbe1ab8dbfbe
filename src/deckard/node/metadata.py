"""The guests' metadata service: the OpenStack and EC2 layouts over HTTP on the node's bridge address.

Guests ask ``http://169.254.169.254/``; the node's packet filter (``drivers/firewall.py``) sends that to this
server on the gateway address and ``METADATA_PORT``.  Who asks is known by the connection's **source address**
only, never by anything in the request: a desktop learns its own facts and no other's (desktops cannot forge
their source address, ``services/network_policy.py``).  What is served is in ``model/guest_metadata.py``: no
secrets, since every process in the guest can ask.

Why a small server of our own and not uvicorn: it answers one GET per connection from a handful of guests, and
what matters is what it refuses — anything but GET and HEAD (405), heads over 8 KiB (431), slow clients (closed
after 5 s), more than ``RATE`` requests a second from one address (429), more than ``MAX_CONNECTIONS`` at once.
Answers are bounded by the layout (user-data at most 64 KiB, 16 keys).

Nodes of one machine share a bridge: the first binds the address, the others find it taken and leave it be, and
try again every ``refresh`` (``ensure``) so one of them takes over if it goes, as the resolver does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import structlog

from deckard.model.guest_metadata import METADATA_PORT, TEXT, GuestMetadata, answer

log = structlog.get_logger()

Lookup = Callable[[str], Awaitable[GuestMetadata | None]]

MAX_HEAD = 8192
READ_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 256
RATE = 20.0  # requests a second per source address, sustained
BURST = 40  # and at once
CACHE_S = 2.0  # a guest's facts are read from the database at most this often (cloud-init asks ~20 paths at boot)


class RateLimit:
    """A token bucket per source address."""

    def __init__(self, rate: float = RATE, burst: int = BURST, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # source → (tokens, when)

    def allow(self, source: str) -> bool:
        now = self.clock()
        tokens, then = self._buckets.get(source, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        if len(self._buckets) > 4096:  # forget full buckets: they say nothing a new one would not
            full = self.burst / self.rate
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full}
        if tokens < 1:
            self._buckets[source] = (tokens, now)
            return False
        self._buckets[source] = (tokens - 1, now)
        return True


def _response(status: int, content_type: str, body: bytes, *, head: bool, extra: str = "") -> bytes:
    reason = HTTPStatus(status).phrase
    lines = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        f"Cache-Control: no-store\r\nConnection: close\r\n{extra}\r\n"
    )
    return lines.encode() + (b"" if head else body)


def _error(status: int, *, head: bool = False, extra: str = "") -> bytes:
    return _response(status, TEXT, f"{HTTPStatus(status).phrase.lower()}\n".encode(), head=head, extra=extra)


class MetadataServer:
    """Serves ``lookup(source address)``'s metadata on ``host:port`` (port 0: any, for tests)."""

    def __init__(self, lookup: Lookup, host: str, port: int = METADATA_PORT, *, limit: RateLimit | None = None):
        self.lookup = lookup
        self.host = host
        self.port = port
        self.limit = limit or RateLimit()
        self._server: asyncio.Server | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._cache: dict[str, tuple[float, GuestMetadata | None]] = {}
        self._shared = False

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        """Listen; an address another node of this machine serves already is left to it (``ensure`` retries)."""
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_HEAD)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                if not self._shared:
                    log.info("network.metadata_shared", address=f"{self.host}:{self.port}")
                self._shared = True
                return
            log.warning("network.metadata_failed", address=f"{self.host}:{self.port}", error=str(e))
            return
        self._shared = False
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("network.metadata_started", address=f"{self.host}:{self.port}")

    async def ensure(self) -> None:
        if not self.running:
            await self.start()

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2)

    async def _facts(self, source: str) -> GuestMetadata | None:
        now = time.monotonic()
        cached = self._cache.get(source)
        if cached is not None and cached[0] > now:
            return cached[1]
        md = await self.lookup(source)
        if len(self._cache) > 4096:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        self._cache[source] = (now + CACHE_S, md)
        return md

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():  # too many at once: the newest is dropped, the others go on
            writer.close()
            return
        async with self._slots:
            try:
                writer.write(await self._respond(reader, str(writer.get_extra_info("peername")[0])))
                await asyncio.wait_for(writer.drain(), READ_TIMEOUT_S)
            except (OSError, TimeoutError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(OSError, TimeoutError):
                    await asyncio.wait_for(writer.wait_closed(), 1)

    async def _respond(self, reader: asyncio.StreamReader, source: str) -> bytes:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
        except (asyncio.LimitOverrunError, ValueError):
            return _error(431)
        except (asyncio.IncompleteReadError, TimeoutError):
            return _error(408)
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _error(400)
        method, target = parts[0].decode("latin-1"), parts[1].decode("latin-1")
        is_head = method == "HEAD"
        if not self.limit.allow(source):
            log.warning("network.metadata_throttled", source=source)
            return _error(429, head=is_head, extra="Retry-After: 1\r\n")
        if method not in ("GET", "HEAD"):
            return _error(405, extra="Allow: GET, HEAD\r\n")
        try:
            md = await self._facts(source)
        except Exception as e:  # the database away: the guest asks again, cloud-init does
            log.warning("network.metadata_unavailable", source=source, error=str(e))
            return _error(503, head=is_head, extra="Retry-After: 2\r\n")
        status, content_type, body = answer(md, target)
        log.debug(
            "network.metadata_request",
            source=source,
            path=target[:100],
            status=status,
            desktop_id=md.desktop_id if md else None,
        )
        return _response(status, content_type, body, head=is_head)
