"""Shared fixtures: a throwaway PostgreSQL 15 cluster (run as the ``postgres`` user) and database URLs.

Integration tests take the ``db_url`` fixture, parametrised over SQLite and PostgreSQL, so every test runs
unchanged against both.  Each test gets a fresh database (a new SQLite file, or a new PostgreSQL database
in the session's cluster).
"""

from __future__ import annotations

import os
import pwd
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deckard.testing import PG_BIN, PgCluster


def pg_unavailable_reason() -> str | None:
    if not (PG_BIN / "initdb").exists():
        return "PostgreSQL 15 is not installed (apt-get install postgresql-15; `make test` does it)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "there is no postgres user to run the test cluster as"
    if os.geteuid() != 0:
        return "starting a PostgreSQL cluster as the postgres user needs root"
    return None


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL cluster on 127.0.0.1 for the whole session."""
    reason = pg_unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = PgCluster().init()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'deckard.db'}"
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    return cluster.create_database("t_" + uuid.uuid4().hex[:12])
