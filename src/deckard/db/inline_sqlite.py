"""SQLite reads on the event loop's own thread, for ``Database.read`` (db/engine.py).

aiosqlite runs every call (open a cursor, execute, fetch, close) on a thread of its own and wakes the loop when it
is done: four thread hand-offs per statement.  A login reads three rows; its hand-offs and context switches cost
more CPU than the reads (a row read from a WAL file in the page cache takes microseconds).  A read transaction
(``BEGIN`` deferred, then SELECTs, then ``ROLLBACK``) does not wait for writers in WAL mode, so it can run inline;
these connections have a busy timeout of 0 so that the rare busy moment raises at once (``Database.read`` then
runs the reads on aiosqlite) instead of sleeping on the loop's thread.  Writers always go through aiosqlite:
``BEGIN IMMEDIATE`` may wait for another process's write lock.

This is the object SQLAlchemy's aiosqlite dialect expects from ``async_creator`` (an ``aiosqlite.Connection``
look-alike whose coroutines finish without suspending).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any


class _Cursor:
    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    async def __aenter__(self) -> _Cursor:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._cursor.close()

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> _Cursor:
        self._cursor.execute(sql, parameters)
        return self

    async def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> _Cursor:
        self._cursor.executemany(sql, seq)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(self._cursor.arraysize if size is None else size)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value


class _Now:
    """aiosqlite's request queue, as SQLAlchemy's adapter uses it to set ``isolation_level``: run it now."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except Exception as e:
            if future is not None:
                future.set_exception(e)
            return
        if future is not None:
            future.set_result(result)


class InlineConnection:
    """An ``aiosqlite.Connection`` look-alike that runs each call at once, on the caller's thread."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._connection: sqlite3.Connection | None = conn  # SQLAlchemy checks it before commit and rollback
        self._tx = _Now(conn)

    def cursor(self) -> _Cursor:
        return _Cursor(self._conn.cursor())

    async def commit(self) -> None:
        self._conn.commit()

    async def rollback(self) -> None:
        self._conn.rollback()

    async def close(self) -> None:
        if self._connection is not None:
            self._connection = None
            self._conn.close()

    def stop(self) -> None:
        if self._connection is not None:
            self._connection = None
            self._conn.close()

    async def create_function(self, *args: Any, **kw: Any) -> None:
        self._conn.create_function(*args, **kw)

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level


def creator(path: str) -> Callable[[], Any]:
    """``async_creator`` for ``create_async_engine``: a new inline connection to the file at ``path``."""

    async def connect() -> InlineConnection:
        # the pool hands a connection to one coroutine at a time, all on the loop's thread
        return InlineConnection(sqlite3.connect(path, timeout=0, check_same_thread=False))

    return connect
