"""Integration fixtures: a started, migrated Database for each test, on SQLite and on PostgreSQL.

``db_url`` (tests/conftest.py) is parametrised over both, so every test that takes ``db`` runs on both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from deckard.db.engine import Database
from slapd import Slapd, slapd_missing_reason


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    await database.start()
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture(scope="module")
def directory() -> Iterator[Slapd]:
    """A real slapd (``tests/slapd.py``) for a module's tests of directory logins."""
    reason = slapd_missing_reason()
    if reason:
        pytest.skip(reason)
    with Slapd() as server:
        yield server
