"""Integration fixtures: a started, migrated Database for each test, on SQLite and on PostgreSQL.

``db_url`` (tests/conftest.py) is parametrised over both, so every test that takes ``db`` runs on both.
"""

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
