"""Notifications between processes: PostgreSQL LISTEN/NOTIFY, or an in-process bus for SQLite.

Waiters never sleep blindly: they wait for a notification on a channel *or* a short timeout, then re-read
the database (level-based, like a reconciler).  With SQLite, notifications only reach waiters in the same
process, so waiters in other processes rely on the timeout (a short poll): the caller picks it.

Channels are plain names (``node.3``, ``desktop.17``, ``events``); they are mapped to valid PostgreSQL
identifiers.  Payloads are short strings.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import structlog

log = structlog.get_logger()


def pg_channel(channel: str) -> str:
    return "deckard_" + "".join(c if c.isalnum() else "_" for c in channel)


class Subscription:
    """A queue of payloads for one or more channels; ``wait`` returns a payload or None on timeout."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str] = asyncio.Queue()

    async def wait(self, timeout: float) -> str | None:
        # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the payload when a cancel meets it, and a
        # loop stopped by cancelling it then never stops (a broker's close hung so in CI)
        try:
            async with asyncio.timeout(timeout):
                return await self.queue.get()
        except TimeoutError:
            return None

    async def wait_about(self, key: str, timeout: float) -> bool:
        """Wait for a payload that names ``key`` (one of its comma-separated items) or nothing in particular
        (``""``): True; False after ``timeout``.  Payloads about others are passed over, so a waiter re-reads
        the database for its own changes only (a broker's connect among hundreds starting at once)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            payload = await self.wait(left)
            if payload is None:
                return False
            if not payload or key in payload.split(","):
                return True
        return False

    def drain(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()


class Bus:
    """In-process bus; the base of the PostgreSQL bus, which adds cross-process delivery."""

    def __init__(self) -> None:
        self._subs: dict[str, set[Subscription]] = defaultdict(set)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _deliver(self, channel: str, payload: str) -> None:
        for sub in list(self._subs.get(channel, ())):
            sub.queue.put_nowait(payload)

    async def notify(self, channel: str, payload: str = "") -> None:
        """Deliver after the caller's transaction has committed."""
        self._deliver(channel, payload)

    async def _listen(self, channel: str) -> None:
        """In-process delivery needs no subscription on a server."""

    async def _unlisten(self, channel: str) -> None:
        """In-process delivery needs no subscription on a server."""

    @contextlib.asynccontextmanager
    async def subscribe(self, *channels: str) -> AsyncIterator[Subscription]:
        sub = Subscription()
        for ch in channels:
            first = not self._subs[ch]
            self._subs[ch].add(sub)
            if first:
                await self._listen(ch)
        try:
            yield sub
        finally:
            for ch in channels:
                self._subs[ch].discard(sub)
                if not self._subs[ch]:
                    del self._subs[ch]
                    await self._unlisten(ch)


class PgBus(Bus):
    """LISTEN/NOTIFY over one dedicated psycopg connection that reconnects after a database restart."""

    def __init__(self, conninfo: str) -> None:
        super().__init__()
        self._conninfo = conninfo
        self._conn: Any = None
        self._task: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()
        self._sender: Any = None
        self._ready = asyncio.Event()
        self._closing = False
        self._listening: set[str] = set()
        self._listen_changed = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pg-listen")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), 10)

    async def close(self) -> None:
        self._closing = True
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for c in (self._conn, self._sender):
            if c is not None:
                with contextlib.suppress(Exception):
                    await c.close()

    async def _run(self) -> None:
        import psycopg

        while not self._closing:
            try:
                self._conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                listening: set[str] = set()
                first = True
                while True:
                    wanted = set(self._subs)
                    for ch in wanted - listening:
                        await self._conn.execute(f"LISTEN {pg_channel(ch)}")
                    for ch in listening - wanted:
                        await self._conn.execute(f"UNLISTEN {pg_channel(ch)}")
                    listening = wanted
                    self._listening = listening
                    self._listen_changed.set()
                    if first:
                        first = False
                        self._ready.set()
                        # a reconnect may have missed notifications: wake every waiter so it re-reads
                        for ch in listening:
                            self._deliver(ch, "")
                    # short timeout: new subscriptions get their LISTEN within this delay
                    async for n in self._conn.notifies(timeout=0.05):
                        for name in listening:
                            if pg_channel(name) == n.channel:
                                self._deliver(name, n.payload)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # database restarted or unreachable: retry, waiters fall back on timeouts
                log.warning("bus.listen_lost", error=str(e))
                self._ready.clear()
                with contextlib.suppress(Exception):
                    await self._conn.close()
                await asyncio.sleep(0.5)

    async def _listen(self, channel: str) -> None:
        # return once the LISTEN is in place, so a waiter that re-reads the database next misses nothing
        deadline = asyncio.get_running_loop().time() + 1.0
        while channel not in self._listening and self._ready.is_set():
            self._listen_changed.clear()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._listen_changed.wait(), left)

    async def notify(self, channel: str, payload: str = "") -> None:
        import psycopg

        async with self._send_lock:
            for _ in range(2):
                try:
                    if self._sender is None or self._sender.closed:
                        self._sender = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                    await self._sender.execute("SELECT pg_notify(%s, %s)", (pg_channel(channel), payload))
                    return
                except Exception as e:
                    log.warning("bus.notify_failed", channel=channel, error=str(e))
                    self._sender = None
