"""Chaos tests: a farm of ``deckard node --driver fake`` processes on one throwaway PostgreSQL, broken on purpose.

Select them with ``-m chaos`` (they need root for the PostgreSQL cluster and network namespaces).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deckard.testing import MultiNodeFarm, PgCluster


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: kills nodes and databases on purpose (bounded, needs root)")


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    if os.geteuid() != 0 or not shutil.which("ip") or not Path("/usr/lib/postgresql/15/bin/initdb").exists():
        pytest.skip("chaos tests need root, iproute2 and PostgreSQL 15")
    cluster = PgCluster(listen="0.0.0.0").init()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def farm(pg: PgCluster) -> Iterator[MultiNodeFarm]:
    url = pg.create_database("c_" + uuid.uuid4().hex[:10])
    f = MultiNodeFarm(url.replace("0.0.0.0", "127.0.0.1"), lost_after=8.0)
    try:
        yield f
    finally:
        f.close()
