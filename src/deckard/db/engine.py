"""The farm database: an async engine, the notification bus, and migrations applied at start.

SQLite (aiosqlite) is the default for a single-node farm; PostgreSQL (psycopg 3) for a farm of nodes.  Both run
the same SQLAlchemy Core statements; the few dialect differences (``RETURNING`` is on both; SQLite needs
``BEGIN IMMEDIATE`` to serialise writers) are handled here.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from deckard.db.notify import Bus, PgBus

MIGRATIONS = Path(__file__).parent / "migrations"


def sync_url(url: str) -> str:
    return url.replace("sqlite+aiosqlite", "sqlite").replace("postgresql+psycopg_async", "postgresql+psycopg")


def async_url(url: str) -> str:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url.split(":///", 1)[1]
    return url


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
            # (hours): the server ends such sessions, and nobody waits on a lock for ever
            options = "-c idle_in_transaction_session_timeout=5000 -c lock_timeout=10000"
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
        if self.dialect == "sqlite":
            _sqlite_setup(self.engine.sync_engine, busy_ms=30000, immediate=True)
        self.bus: Bus = PgBus(libpq_url(self.url)) if self.dialect == "postgresql" else Bus()

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

    async def close(self) -> None:
        await self.bus.close()
        await self.engine.dispose()

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn


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


def _sqlite_setup(engine: sa.Engine, *, busy_ms: int, immediate: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: object, _record: object) -> None:
        # autocommit off at the driver level so SQLAlchemy's BEGIN (made IMMEDIATE below) takes the write lock
        dbapi_conn.isolation_level = None  # type: ignore[attr-defined]
        cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={busy_ms}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    if immediate:

        @event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
