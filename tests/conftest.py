"""Shared fixtures: a throwaway PostgreSQL 15 cluster (run as the ``postgres`` user) and database URLs.

Integration tests take the ``db_url`` fixture, parametrised over SQLite and PostgreSQL, so every test runs
unchanged against both.  Each test gets a fresh database (a copy of a SQLite file, or a new PostgreSQL database
in the session's cluster, made from a template migrated once per session).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from deckard.db.engine import migrate
from deckard.testing import PG_BIN, FarmProcess, PgCluster

# the farm tests' `deckard` commands fork from a process that imported the CLI once (deckard/testing_cli.py)
os.environ.setdefault("DECKARD_TEST_CLI_FORK", "1")


def pg_unavailable_reason() -> str | None:
    if not (PG_BIN / "initdb").exists():
        return "PostgreSQL 15 is not installed (apt-get install postgresql-15; `make test` does it)"
    if os.geteuid() == 0:  # root runs the cluster as postgres (PostgreSQL refuses root); others as themselves
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "there is no postgres user to run the test cluster as"
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


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database migrated once per session; each test gets a copy (migrating costs ~0.2 s a test)."""
    path = tmp_path_factory.mktemp("schema") / "template.db"
    migrate(f"sqlite+aiosqlite:///{path}")
    return path


class ReadyDatabases:
    """Copies of a migrated template, each made while the test before runs (a thread keeps one ready), so a test
    never waits for CREATE DATABASE (~0.3 s on this machine, ~1.2 s when it had to migrate as well)."""

    def __init__(self, cluster: PgCluster) -> None:
        self.cluster = cluster
        self.template = "t_template"
        migrate(cluster.create_database(self.template))
        self._maker = ThreadPoolExecutor(1, thread_name_prefix="test-databases")
        self._next = self._maker.submit(self._make)

    def _make(self) -> str:
        return self.cluster.create_database("t_" + uuid.uuid4().hex[:12], template=self.template)

    def take(self) -> str:
        url = self._next.result()
        self._next = self._maker.submit(self._make)
        return url

    def close(self) -> None:
        self._maker.shutdown(wait=True)


@pytest.fixture(scope="session")
def pg_databases(pg_cluster: PgCluster) -> Iterator[ReadyDatabases]:
    ready = ReadyDatabases(pg_cluster)
    try:
        yield ready
    finally:
        ready.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "databases(*names): the databases a test's db_url runs on (tests/conftest.py)")
    # pytest-xdist hands out files in collection order (pytest_collection_modifyitems below), not reordered by
    # how many tests each holds (its default)
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


# Files run slowest first: the VM module (2-4 min in one file), then the chaos and end-to-end modules (0.5-2 min
# each in a handful of tests), integration modules (seconds to a minute), unit modules (seconds).  xdist's default
# (most tests first) ran the end-to-end modules last, where one of them alone made the run's tail while the other
# worker sat idle; started first, they overlap each other and the cheap files fill in at the end.
# Ahead of them, a few long integration files and the chaos modules, which need no desktop image: on a clean clone
# the images are still being built in the background (tests/prebuild_images.py, about 3 min), and an end-to-end
# module started then only waits for them (the VM module's set-up took 113-149 s in CI, most of it waiting).
FILE_ORDER = (
    "integration/test_broker_protocol.py",
    "integration/test_time_to_desktop.py",
    "integration/test_schemathesis.py",
    "integration/test_ldap_directory.py",
    "chaos/",  # image-free too (fake desktops): they cover the images' build, which the next file waits for
    "e2e/test_vm_desktops.py",
    "e2e/",
    "integration/",
    "unit/",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the files by the first ``FILE_ORDER`` prefix of their path under tests/ (a stable sort: a file's tests
    keep their order)."""
    tests = Path(__file__).parent

    def rank(item: pytest.Item) -> int:
        try:
            path = item.path.relative_to(tests).as_posix()
        except ValueError:  # outside tests/: after the others
            return len(FILE_ORDER)
        return next((n for n, prefix in enumerate(FILE_ORDER) if path.startswith(prefix)), len(FILE_ORDER))

    items.sort(key=rank)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that needs a database runs on SQLite and PostgreSQL; a module whose subject is not SQL may say
    ``DATABASES = ["sqlite"]``, a test ``@pytest.mark.databases("sqlite")`` (the marker wins)."""
    if "db_url" in metafunc.fixturenames:
        databases = getattr(metafunc.module, "DATABASES", ["sqlite", "postgresql"])
        marker = metafunc.definition.get_closest_marker("databases")
        if marker is not None:
            databases = list(marker.args)
        metafunc.parametrize("db_url", databases, indirect=True)


@pytest.fixture
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database at the newest schema: the farm's start still runs the migrations (a no-op at head)."""
    if request.param == "sqlite":
        path = tmp_path / "deckard.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite+aiosqlite:///{path}"
    ready: ReadyDatabases = request.getfixturevalue("pg_databases")
    return ready.take()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Iterator[None]:
    """With DECKARD_FORBID_SKIP=1 a skip is a failure: `make test` runs the node daemon's tests as an
    unprivileged user that way, so "they run without root" is checked, not assumed.  A failed test that used a farm
    gets the farm's logs in its report."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:  # a farm's logs go with the failure: CI shows the report, and the farm's home is removed after
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, FarmProcess):
                with contextlib.suppress(OSError):
                    report.sections.append((f"farm logs ({name})", value.log_excerpt()))
    if os.environ.get("DECKARD_FORBID_SKIP") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, but DECKARD_FORBID_SKIP=1 forbids it: {report.longrepr}"
