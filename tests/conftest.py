"""Shared fixtures: a throwaway PostgreSQL 15 cluster (run as the ``postgres`` user) and database URLs.

Integration tests take the ``db_url`` fixture, parametrised over SQLite and PostgreSQL, so every test runs
unchanged against both.  Each test gets a fresh database (a new SQLite file, or a new PostgreSQL database
in the session's cluster).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
def pg_cluster() -> Iterator[str]:
    """A PostgreSQL cluster on 127.0.0.1 for the whole session; yields a libpq URL prefix."""
    reason = pg_unavailable_reason()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="deckard-pg-"))
    data = base / "data"
    shutil.chown(base, "postgres", "postgres")
    port = _free_port()
    run = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*run, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
    )
    opts = f"-h 127.0.0.1 -p {port} -k {base} -c fsync=off -c full_page_writes=off -c max_connections=300"
    subprocess.run(
        [*run, str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*run, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def new_pg_database(cluster: str) -> str:
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(cluster.replace("+psycopg", "") + "/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{cluster}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'deckard.db'}"
    cluster = request.getfixturevalue("pg_cluster")
    return new_pg_database(cluster)
