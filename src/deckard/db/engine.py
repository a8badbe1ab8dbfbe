"""The farm database: an async engine, the notification bus, and migrations applied at start.

SQLite (aiosqlite) is the default for a single-node farm; PostgreSQL (psycopg 3) for a farm of nodes.  Both run
the same SQLAlchemy Core statements; the few dialect differences (``RETURNING`` is on both; SQLite needs
``BEGIN IMMEDIATE`` to serialise writers) are handled here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa
import structlog
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from deckard.db import inline_sqlite
from deckard.db.notify import Bus, PgBus

log = structlog.get_logger()

MIGRATIONS = Path(__file__).parent / "migrations"
T = TypeVar("T")
S = TypeVar("S", bound=sa.Executable)
WRITER_WAIT_S = 30  # how long a SQLite writer waits for its turn before "database is locked"
WAL_CHECKPOINT_BYTES = 4 << 20  # SQLite's automatic checkpoint: 1,000 pages of 4 KiB


def sync_url(url: str) -> str:
    return url.replace("sqlite+aiosqlite", "sqlite").replace("postgresql+psycopg_async", "postgresql+psycopg")


def async_url(url: str) -> str:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url.split(":///", 1)[1]
    return url


_PREPARED: list[sa.Executable] = []


def prepared(statement: S) -> S:
    """Mark a statement built once at import that a connect or a start runs: :meth:`Database.prepare` compiles it
    into every engine's cache when a server starts, so the first user after a restart does not wait for SQLAlchemy
    to compile it (0.5-1.5 ms a statement, a first connect ran some twenty).  Its parameters must all be named
    ``bindparam`` s, passed by name when it runs (a statement is cached per set of names)."""
    _PREPARED.append(statement)
    return statement


def _null_parameters(statement: sa.Executable) -> dict[str, object]:
    """A NULL for each of ``statement``'s named parameters (an empty list for an IN's)."""
    binds = statement.compile().binds.values()  # type: ignore[attr-defined]
    return {b.key: [] if b.expanding else None for b in binds if b.required}


def libpq_url(url: str) -> str:
    return "postgresql://" + url.split("://", 1)[1]


def migrate(url: str) -> None:
    """Bring the schema to the newest revision (blocking; run once at start)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", sync_url(async_url(url)).replace("%", "%%"))
    command.upgrade(cfg, "head")  # one head: tests/unit/test_migrations.py keeps it so


class Database:
    """What every layer above gets: ``begin()`` for a transaction, ``bus`` for notifications."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = async_url(url)
        self.dialect = "postgresql" if self.url.startswith("postgresql") else "sqlite"
        kwargs: dict[str, object] = {}
        if self.dialect == "postgresql":
            # a node cut off in the middle of a transaction must not hold its row locks until TCP gives up
            # (hours): the server ends such sessions, and nobody waits on a lock for ever.  The idle limit is
            # well above a busy process's pause between two statements (5 s was not: an API process starved of
            # CPU on a loaded machine lost a login's transaction), and below the lock wait, so whoever waits
            # on a dead session's lock gets it rather than an error
            options = "-c idle_in_transaction_session_timeout=15000 -c lock_timeout=20000"
            kwargs = {
                "pool_size": pool_size,
                "max_overflow": 20,
                "pool_pre_ping": True,
                "connect_args": {
                    "options": options,
                    "keepalives_idle": 5,
                    "keepalives_interval": 2,
                    "keepalives_count": 3,
                },
            }
        else:
            kwargs = {"connect_args": {"timeout": 30}}
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        self._inline: AsyncEngine | None = None
        self._inline_writer: AsyncEngine | None = None
        self._sqlite_file: str | None = None  # a file the inline connections may use (not :memory:)
        self._checkpoint: asyncio.Task[None] | None = None
        self._writers: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        if self.dialect == "sqlite":
            _sqlite_setup(self.engine.sync_engine, busy_ms=WRITER_WAIT_S * 1000, immediate=True)
            path = self.url.split(":///", 1)[1]
            if path and not path.startswith(":memory:") and "?" not in path:
                self._inline = create_async_engine(self.url, async_creator=inline_sqlite.creator(path))
                _inline_setup(self._inline.sync_engine)
                self._inline_writer = create_async_engine(
                    self.url, async_creator=inline_sqlite.creator(path), pool_size=1, max_overflow=0
                )
                _sqlite_setup(self._inline_writer.sync_engine, busy_ms=0, immediate=True, checkpoints=False)
                self._sqlite_file = path
        self.bus: Bus = PgBus(libpq_url(self.url)) if self.dialect == "postgresql" else Bus()

    async def release_idle(self) -> None:
        """Close the pools' idle connections to a SQLite database; they open again when next needed (~0.3 ms).

        Each keeps SQLite's page cache (up to 2 MB) and its prepared statements, and after a burst of logins the
        pools keep eleven of them (five each for aiosqlite and the inline readers, the inline writer): about 7 MB
        of a farm process that a broker gives back after a burst (``broker/server.py``; ``bench/tunnels.py``).
        The statements SQLAlchemy compiled stay (they belong to the engine).  PostgreSQL's pages are the
        server's: nothing to do there."""
        if self.dialect != "sqlite":
            return
        for engine in self.engines:
            await engine.dispose()  # connections in use stay open and are closed when given back

    @property
    def engines(self) -> list[AsyncEngine]:
        """Every engine of this database: the pool, and on a SQLite file the inline readers and writer.  Each
        compiles and caches its statements on its own."""
        return [e for e in (self.engine, self._inline, self._inline_writer) if e is not None]

    @property
    def shared_across_processes(self) -> bool:
        """Whether notifications reach other processes (else waiters must poll)."""
        return self.dialect == "postgresql"

    async def start(self, *, run_migrations: bool = True) -> None:
        if run_migrations:
            await asyncio.to_thread(migrate, self.url)
        if self.dialect == "sqlite":
            _private_sqlite_files(self.url)
        await self.bus.start()

    async def prepare(self) -> int:
        """Compile every :func:`prepared` statement into each engine's cache (a long-lived process, at its start):
        each runs once with NULL parameters, which match no row, and is rolled back (writes not on the read-only
        inline connections).  Returns how many ran; one that fails was compiled all the same."""
        ran = 0
        nulls = [_null_parameters(statement) for statement in _PREPARED]
        for engine in self.engines:
            async with engine.connect() as conn:
                for statement, params in zip(_PREPARED, nulls, strict=True):
                    if statement.is_dml and engine is self._inline:
                        continue
                    try:
                        await conn.execute(statement, params)
                        ran += 1
                    except sa.exc.DBAPIError as e:
                        log.debug("db.prepare_failed", statement=str(statement)[:80], error=str(e.orig))
                    await conn.rollback()
        return ran

    async def close(self) -> None:
        await self.bus.close()
        if self._checkpoint is not None and self._checkpoint.get_loop() is asyncio.get_running_loop():
            await asyncio.gather(self._checkpoint, return_exceptions=True)
        for engine in self.engines:
            await engine.dispose()

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        if self.dialect != "sqlite":
            async with self._transaction() as conn:
                yield conn
            return
        async with self._writer_turn(), self._transaction() as conn:
            yield conn

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """``begin()`` for a short transaction on a hot path (a connect, a start): a few statements on the rows
        it names, nothing that scans a table.

        On a SQLite file it runs on the event loop's own thread (``db/inline_sqlite.py``) when the file's write
        lock is free at once: a commit in WAL mode with ``synchronous=NORMAL`` appends to the log without a
        sync, and aiosqlite's four thread hand-offs per statement cost more than the statements (a start's claim
        took 3-4 ms, most of it hand-offs).  Its log is checkpointed on a worker thread, never on the loop's
        (``_checkpoint_soon``).  When another process holds the lock it is ``begin()``, which waits for it.
        Elsewhere it is ``begin()``."""
        if self._inline_writer is None:
            async with self.begin() as conn:
                yield conn
            return
        async with self._writer_turn():
            inline = await self._inline_begin()
            if inline is None:  # another process writes: wait for it on aiosqlite's thread
                async with self._transaction() as conn:
                    yield conn
                return
            try:
                yield inline
                await inline.commit()
            finally:
                await inline.close()
        self._checkpoint_soon()

    async def _inline_begin(self) -> AsyncConnection | None:
        """The inline writer in a transaction that holds the write lock, or None when the lock is taken (a new
        connection's set-up may meet it too)."""
        assert self._inline_writer is not None
        conn: AsyncConnection | None = None
        try:
            conn = await self._inline_writer.connect()
            await conn.begin()
            return conn
        except OperationalError as e:
            if conn is not None:
                await conn.close()
            if not _busy(e):
                raise
            return None

    @asynccontextmanager
    async def _writer_turn(self) -> AsyncIterator[None]:
        """SQLite has one writer at a time: this process's writers queue here, in order, rather than in SQLite's
        busy handler, whose growing sleeps on aiosqlite's threads cost CPU and make the last comer wait longest."""
        loop = asyncio.get_running_loop()
        if self._writers is None or self._writers[0] is not loop:  # a Database used from another loop (tests)
            self._writers = (loop, asyncio.Lock())
        writers = self._writers[1]
        try:
            async with asyncio.timeout(WRITER_WAIT_S):
                await writers.acquire()
        except TimeoutError:
            raise OperationalError("BEGIN IMMEDIATE", {}, sqlite3.OperationalError("database is locked")) from None
        try:
            yield
        finally:
            writers.release()

    def _checkpoint_soon(self) -> None:
        """Once the write-ahead log passes SQLite's own threshold (the inline writer does not checkpoint, so that
        a commit never copies pages and syncs the file on the loop's thread), a passive checkpoint on a worker
        thread: it waits for nobody, and writers go on meanwhile."""
        path = self._sqlite_file
        if path is None or (self._checkpoint is not None and not self._checkpoint.done()):
            return
        try:
            if os.stat(f"{path}-wal").st_size < WAL_CHECKPOINT_BYTES:
                return
        except OSError:
            return

        def checkpoint() -> None:
            try:
                with contextlib.closing(sqlite3.connect(path, timeout=WRITER_WAIT_S, isolation_level=None)) as conn:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error:  # the next commit tries again
                return

        self._checkpoint = asyncio.get_running_loop().create_task(asyncio.to_thread(checkpoint))

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        conn = await self.engine.connect()
        try:
            yield conn
        finally:
            await _give_back(conn)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        """``engine.begin()``, except that a cancelled task still ends its transaction (see ``_give_back``)."""
        conn = await self.engine.connect()
        try:
            await conn.begin()
            yield conn
            await asyncio.shield(conn.commit())  # once asked, it completes even if the caller is cancelled
        finally:
            await _give_back(conn)

    async def read(self, reads: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """``reads(conn)`` in one read-only transaction, for hot paths that only read (a login).

        On a SQLite file it runs on the event loop's own thread (``db/inline_sqlite.py``): a WAL snapshot that
        cannot write (``query_only``) and never waits for a lock (busy timeout 0).  aiosqlite's thread hand-offs
        cost more CPU than a login's reads; the few times the file is busy (a checkpoint's restart, a recovery)
        ``reads`` runs again through ``connect()``, so it must only read.  Elsewhere it is ``connect()``.
        """
        if self._inline is not None:
            try:
                async with self._inline.connect() as conn:
                    return await reads(conn)
            except OperationalError as e:
                if not _busy(e):
                    raise
        async with self.connect() as conn:
            return await reads(conn)


async def _give_back(conn: AsyncConnection) -> None:
    """Roll back what is open and return the connection to the pool, in a task of its own: a task cancelled in the
    middle of a query (a broker shutting down, a client gone) must not leave the transaction open until the garbage
    collector finds it, since on SQLite every transaction here holds the file's one write lock (``BEGIN
    IMMEDIATE``) and every other writer would wait out its busy timeout behind it."""
    await asyncio.shield(conn.close())


def _busy(e: OperationalError) -> bool:
    orig = e.orig
    return isinstance(orig, sqlite3.OperationalError) and orig.sqlite_errorcode & 0xFF in (
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
    )


def _private_sqlite_files(url: str) -> None:
    """The database holds password hashes and agent tokens: owner only (SQLite creates it 0644 under umask 022)."""
    path = url.split(":///", 1)[1] if ":///" in url else ""
    for name in (path, f"{path}-wal", f"{path}-shm"):
        if name and os.path.isfile(name):
            os.chmod(name, 0o600)


def heartbeat_engine(url: str, timeout_s: float) -> sa.Engine:
    """A synchronous engine of one connection for a node's heartbeat thread (node/heartbeat.py).

    It shares nothing with the farm's pool, and every statement on it gives up after ``timeout_s`` on the
    database side (SQLite's busy timeout; PostgreSQL's statement and lock timeouts) and on the wire (libpq's
    connect and TCP user timeouts, keepalives), so the thread that owns it never hangs on a stalled database.
    On SQLite each statement is its own transaction: the heartbeat is one UPDATE, and a read must not take the
    write lock the farm's ``BEGIN IMMEDIATE`` takes (readers go on in WAL mode while a writer holds it).
    """
    url = sync_url(async_url(url))
    ms = max(int(timeout_s * 1000), 1)
    if url.startswith("postgresql"):
        options = f"-c statement_timeout={ms} -c lock_timeout={ms} -c idle_in_transaction_session_timeout=5000"
        connect_args: dict[str, object] = {
            "options": options,
            "connect_timeout": max(int(timeout_s + 0.999), 2),  # libpq: whole seconds, 1 means 2
            "tcp_user_timeout": ms,
            "keepalives_idle": 1,
            "keepalives_interval": 1,
            "keepalives_count": 2,
        }
        return sa.create_engine(url, pool_size=1, max_overflow=0, pool_timeout=timeout_s, connect_args=connect_args)
    engine = sa.create_engine(url, pool_size=1, max_overflow=0, connect_args={"timeout": timeout_s})
    _sqlite_setup(engine, busy_ms=ms, immediate=False)
    return engine


def _sqlite_setup(engine: sa.Engine, *, busy_ms: int, immediate: bool, checkpoints: bool = True) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: object, _record: object) -> None:
        # autocommit off at the driver level so SQLAlchemy's BEGIN (made IMMEDIATE below) takes the write lock
        dbapi_conn.isolation_level = None  # type: ignore[attr-defined]
        cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={busy_ms}")
        cur.execute("PRAGMA synchronous=NORMAL")
        if not checkpoints:
            cur.execute("PRAGMA wal_autocheckpoint=0")
        cur.close()

    @event.listens_for(engine, "invalidate")
    def _on_invalidate(dbapi_conn: object, _record: object, _exc: object) -> None:
        # A task cancelled in the middle of a query gets its connection invalidated and closed; but a statement
        # whose cursor its traceback still holds keeps the transaction, and with it the write lock, alive in a
        # "zombie" close until the garbage collector finds the traceback.  A rollback queued on aiosqlite's thread
        # first (ahead of the close) ends the transaction whatever the cursors.
        aiosqlite_conn = getattr(dbapi_conn, "_connection", None)  # under SQLAlchemy's async adapter only
        rollback = getattr(aiosqlite_conn, "rollback", None)
        if rollback is not None:
            with contextlib.suppress(RuntimeError):  # no running loop: the garbage collector's clean-up
                task = asyncio.get_running_loop().create_task(rollback())
                task.add_done_callback(lambda t: t.cancelled() or t.exception())  # closed already: nothing to do

    if immediate:

        @event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def _inline_setup(engine: sa.Engine) -> None:
    """The inline readers' connections (``Database.read``): a deferred ``BEGIN`` (a WAL snapshot, no lock), no
    writes, no waiting on the loop's thread."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: object, _record: object) -> None:
        dbapi_conn.isolation_level = None  # type: ignore[attr-defined]
        cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
        cur.execute("PRAGMA query_only=1")
        cur.execute("PRAGMA busy_timeout=0")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN")
