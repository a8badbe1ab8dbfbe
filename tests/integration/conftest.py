"""Integration fixtures: a started Database for each test, on SQLite and on PostgreSQL (``db_url``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from deckard.db.engine import Database


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    await database.start()
    try:
        yield database
    finally:
        await database.close()
