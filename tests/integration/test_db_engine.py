"""``Database.read``: a hot path's reads in one read-only transaction, on SQLite and PostgreSQL.

On a SQLite file the reads run on the event loop's own thread (``db/inline_sqlite.py``) as a WAL snapshot: they
neither wait for a writer nor make one wait, cannot write, and when the file is busy they run again on aiosqlite
instead of blocking the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import engine
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import utcnow
from deckard.services.tenancy import bootstrap_farm


@contextlib.asynccontextmanager
async def loop_ticks() -> AsyncIterator[list[int]]:
    """How many times a 10 ms ticker ran meanwhile: the event loop must go on while a statement waits for a lock."""
    ticks = [0]

    async def ticker() -> None:
        while True:
            ticks[0] += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    try:
        yield ticks
    finally:
        task.cancel()


async def _names(conn: AsyncConnection) -> set[str]:
    return {str(n) for n in (await conn.execute(sa.select(t.tenants.c.name))).scalars()}


async def test_a_read_neither_waits_for_a_writer_nor_blocks_one(db: Database) -> None:
    await bootstrap_farm(db)
    holding, release = asyncio.Event(), asyncio.Event()

    async def writer() -> None:
        async with db.begin() as conn:
            await conn.execute(sa.insert(t.tenants).values(name="acme", created_at=utcnow()))
            holding.set()
            await release.wait()

    task = asyncio.create_task(writer())
    await holding.wait()
    # the writer holds its transaction open: a read goes on at once and does not see the uncommitted row
    assert "acme" not in await asyncio.wait_for(db.read(_names), 5)
    release.set()
    await asyncio.wait_for(task, 5)
    assert "acme" in await db.read(_names)


async def test_a_read_sees_one_snapshot(db: Database) -> None:
    await bootstrap_farm(db)

    async def twice(conn: AsyncConnection) -> tuple[set[str], set[str]]:
        first = await _names(conn)
        async with db.begin() as w:  # another connection commits between the two reads
            await w.execute(sa.insert(t.tenants).values(name="later", created_at=utcnow()))
        return first, await _names(conn)

    first, second = await db.read(twice)
    assert "later" not in first
    # SQLite keeps the snapshot; PostgreSQL's READ COMMITTED sees the commit
    assert ("later" in second) == (db.dialect == "postgresql")


async def test_what_a_read_writes_is_never_kept(db: Database) -> None:
    await bootstrap_farm(db)

    async def sneaky(conn: AsyncConnection) -> None:
        await conn.execute(sa.insert(t.tenants).values(name="ghost", created_at=utcnow()))

    if db.dialect == "sqlite":
        with pytest.raises(sa.exc.OperationalError, match="readonly"):
            await db.read(sneaky)
    else:
        await db.read(sneaky)  # rolled back
    assert "ghost" not in await db.read(_names)


@pytest.mark.databases("sqlite")
async def test_sqlite_reads_and_hot_writes_run_inline_and_other_writes_on_aiosqlite(db: Database) -> None:
    async def driver(conn: AsyncConnection) -> str:
        raw = await conn.get_raw_connection()
        return type(raw.driver_connection).__name__

    assert await db.read(driver) == "InlineConnection"
    async with db.write() as conn:
        assert await driver(conn) == "InlineConnection"
    async with db.begin() as conn:
        raw = await conn.get_raw_connection()
        assert type(raw.driver_connection).__module__.startswith("aiosqlite")


@pytest.mark.databases("sqlite")
async def test_a_hot_write_waits_for_another_processs_lock_on_aiosqlite_and_the_loop_keeps_running(
    db: Database,
) -> None:
    """The inline writer never waits on the loop's thread: a file another process writes sends it to aiosqlite
    (a process's first write too, whose inline connection is made then)."""
    await bootstrap_farm(db)
    holder = sqlite3.connect(db.url.split(":///", 1)[1], isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    fresh = Database(db.url)
    await fresh.start(run_migrations=False)

    async def release() -> None:
        await asyncio.sleep(0.5)
        holder.execute("COMMIT")
        holder.close()

    release_task = asyncio.create_task(release())
    try:
        async with loop_ticks() as ticks:
            started = time.monotonic()
            async with fresh.write() as conn:
                await conn.execute(sa.insert(t.tenants).values(name="waited", created_at=utcnow()))
            assert time.monotonic() - started >= 0.4 and ticks[0] >= 20
        assert "waited" in await fresh.read(_names)
    finally:
        await release_task
        await fresh.close()


async def test_a_hot_write_that_fails_keeps_nothing_and_the_next_one_goes_on(db: Database) -> None:
    await bootstrap_farm(db)
    with pytest.raises(RuntimeError):
        async with db.write() as conn:
            await conn.execute(sa.insert(t.tenants).values(name="lost", created_at=utcnow()))
            raise RuntimeError("a service refuses half-way")
    async with db.write() as conn:
        await conn.execute(sa.insert(t.tenants).values(name="kept", created_at=utcnow()))
    names = await db.read(_names)
    assert "kept" in names and "lost" not in names


@pytest.mark.databases("sqlite")
async def test_the_hot_writers_log_is_checkpointed_on_aiosqlites_thread(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inline writer does not checkpoint (a commit would copy pages and sync the file on the loop's thread);
    once the log passes the threshold a passive checkpoint runs elsewhere and the pages reach the file."""
    monkeypatch.setattr(engine, "WAL_CHECKPOINT_BYTES", 256 << 10)
    await bootstrap_farm(db)
    path = Path(db.url.split(":///", 1)[1])
    before = path.stat().st_size
    for i in range(40):
        async with db.write() as conn:
            await conn.execute(
                sa.insert(t.tenants).values(name=f"big{i}", created_at=utcnow(), description="x" * 16000)
            )
    checkpoint = db._checkpoint
    assert checkpoint is not None
    await asyncio.wait_for(checkpoint, 10)
    assert path.stat().st_size - before > 256 << 10


async def test_release_idle_closes_the_pooled_sqlite_connections_and_they_open_again(db: Database) -> None:
    """After a burst the broker gives back what the idle connections hold (a page cache each, on SQLite); a
    connection in use meanwhile stays usable, and the next statements open new ones."""
    async with db.connect(), db.connect():  # two at once: both go back to the pool (on SQLite, no transaction)
        pass
    async with db.write() as conn:
        await conn.execute(sa.select(1))
    assert await db.read(_names) == set()
    pools = [e.sync_engine.pool for e in (db.engine, db._inline, db._inline_writer) if e is not None]
    idle = [pool.checkedin() for pool in pools]
    await db.release_idle()
    if db.dialect == "sqlite":
        assert idle == [2, 1, 1] and [pool.checkedin() for pool in pools] == [0, 0, 0]
    else:  # the server's memory, not this process's: the pool is kept
        assert [pool.checkedin() for pool in pools] == idle
    async with db.connect() as busy:  # in use while the pools are released: it goes on
        await busy.execute(sa.select(1))
        await db.release_idle()
        assert (await busy.execute(sa.select(1))).scalar() == 1
    async with db.write() as conn:
        await conn.execute(sa.insert(t.tenants).values(name="after", created_at=utcnow()))
    assert await db.read(_names) == {"after"}


@pytest.mark.databases("sqlite")
async def test_a_busy_file_sends_the_read_to_aiosqlite_and_the_loop_keeps_running(db: Database) -> None:
    await bootstrap_farm(db)
    path = db.url.split(":///", 1)[1]
    await db.close()  # no connection of the farm's open: the exclusive lock below needs that
    # another process's exclusive lock (no WAL shared memory): an inline read is refused at once
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("SELECT count(*) FROM tenants").fetchall()

    async def release() -> None:
        await asyncio.sleep(0.5)
        holder.execute("COMMIT")
        holder.execute("PRAGMA locking_mode=NORMAL")
        holder.execute("SELECT 1").fetchall()  # the exclusive lock goes with the next access
        holder.close()

    release_task = asyncio.create_task(release())
    try:
        async with loop_ticks() as ticks:
            started = time.monotonic()
            names = await asyncio.wait_for(db.read(_names), 10)
            assert names and time.monotonic() - started >= 0.4  # it waited for the lock, on aiosqlite's thread
            assert ticks[0] >= 20  # while the loop went on
    finally:
        await release_task


@pytest.mark.parametrize("open_", ["begin", "write"])
async def test_many_writers_at_once_all_commit_in_turn(db: Database, open_: str) -> None:
    await bootstrap_farm(db)
    inside = 0
    most = 0

    async def writer(i: int) -> None:
        nonlocal inside, most
        async with getattr(db, open_)() as conn:
            inside += 1
            most = max(most, inside)
            await conn.execute(sa.insert(t.tenants).values(name=f"w{i}", created_at=utcnow()))
            await asyncio.sleep(0.01)  # hold the transaction across a suspension, as a service does
            inside -= 1

    await asyncio.wait_for(asyncio.gather(*(writer(i) for i in range(30))), 60)
    assert {f"w{i}" for i in range(30)} <= await db.read(_names)
    if db.dialect == "sqlite":
        assert most == 1  # queued on the process's writer lock, not in SQLite's busy handler


SLOW = sa.text(
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000000) SELECT count(*) FROM c"
)


@pytest.mark.parametrize("cancels", [1, 2])
@pytest.mark.parametrize("open_", ["begin", "connect"])
async def test_a_task_cancelled_mid_query_ends_its_transaction(db: Database, open_: str, cancels: int) -> None:
    """A broker shutting down cancels its sessions mid-query (and a second cancel can land while a connection is
    being given back): the transaction must end at once, or on SQLite the file's write lock stays taken while
    the cancelled task's traceback keeps the statement alive (a CI teardown waited 30 s for it)."""
    await bootstrap_farm(db)
    started = asyncio.Event()

    async def slow_query() -> None:
        async with getattr(db, open_)() as conn:
            started.set()
            await conn.execute(SLOW if db.dialect == "sqlite" else sa.text("SELECT pg_sleep(0.5)"))

    task = asyncio.create_task(slow_query())
    await started.wait()
    await asyncio.sleep(0.05)
    for _ in range(cancels):
        task.cancel()
        await asyncio.sleep(0)
    with pytest.raises(asyncio.CancelledError):
        await task  # the task object (and its traceback) stays referenced here, as in a broker's task set
    t0 = time.monotonic()
    async with db.begin() as conn:
        await conn.execute(sa.insert(t.tenants).values(name="after", created_at=utcnow()))
    assert time.monotonic() - t0 < 10, "the cancelled task's transaction held the write lock"
    async with db.connect() as conn:
        assert "after" in await _names(conn)


async def test_a_task_cancelled_inside_a_hot_write_ends_its_transaction(db: Database) -> None:
    """The inline writer's statements finish before the loop runs anything else: a cancel lands between them,
    and the transaction ends with it (the next writer goes on at once)."""
    await bootstrap_farm(db)
    inside = asyncio.Event()

    async def held() -> None:
        async with db.write() as conn:
            await conn.execute(sa.insert(t.tenants).values(name="cancelled", created_at=utcnow()))
            inside.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(held())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    t0 = time.monotonic()
    async with db.write() as conn:
        await conn.execute(sa.insert(t.tenants).values(name="after", created_at=utcnow()))
    assert time.monotonic() - t0 < 1
    names = await db.read(_names)
    assert "after" in names and "cancelled" not in names


@pytest.mark.databases("postgresql")
async def test_a_session_the_server_ended_mid_transaction_is_a_503_to_try_again(db: Database) -> None:
    """A pause between two statements longer than the idle-in-transaction limit (a process starved of CPU): the
    server ends the session, and the API answers 503 ``database_unavailable``, not 500 ``internal``."""
    from starlette.requests import Request

    from deckard.api import errors

    with pytest.raises(sa.exc.DBAPIError) as caught:
        async with db.begin() as conn:
            await conn.execute(sa.text("SET LOCAL idle_in_transaction_session_timeout = 100"))
            await asyncio.sleep(0.5)
            await conn.execute(sa.select(t.tenants.c.name))
    request = Request({"type": "http", "method": "POST", "path": "/api/v1/auth/login", "headers": []})
    response = await errors._statement_error(request, caught.value)
    assert response.status_code == 503 and b'"database_unavailable"' in response.body
    assert response.headers["retry-after"] == "2"
    # the pool hands out a working connection next
    async with db.connect() as conn:
        assert (await conn.execute(sa.select(sa.literal(1)))).scalar() == 1


async def test_a_bad_statement_stays_a_500(db: Database) -> None:
    from starlette.requests import Request

    from deckard.api import errors

    with pytest.raises(sa.exc.DBAPIError) as caught:
        async with db.connect() as conn:
            await conn.execute(sa.text("SELECT no_such_column FROM tenants"))
    request = Request({"type": "http", "method": "GET", "path": "/api/v1/tenants", "headers": []})
    assert (await errors._statement_error(request, caught.value)).status_code == 500
