"""Statements built once and marked ``prepared`` are compiled into every engine's cache when a server starts
(``Database.prepare``): the first connect after a restart compiles none of them (they were 0.5-1.5 ms each on the
first user's path, some twenty of them).  On SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event

from deckard.db.engine import Database
from deckard.model.errors import NotFound
from deckard.services import config, desktops, node_ops, placement, sessions


def _count_compiles(db: Database) -> list[str]:
    """The statements each of ``db``'s engines compiles from now on (a miss of its statement cache)."""
    compiled: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, _many: bool) -> None:
        if context.cache_hit == context.dialect.CACHE_MISS:
            compiled.append(" ".join(statement.split())[:100])

    for engine in db.engines:
        event.listen(engine.sync_engine, "before_cursor_execute", before)
    return compiled


async def _a_start_and_a_login_read(db: Database) -> None:
    """What the first connect after a restart runs of the prepared statements: placement's figures, a desktop's
    row and its start's facts, the configuration layers, the session watch's read; on every engine they run on."""
    async with db.write() as conn:
        await placement.node_loads(conn)
        with pytest.raises(NotFound):
            await desktops.load_desktop(conn, 999_999)
    await db.read(lambda conn: config.read_keys_sourced(conn, ["network.egress"], 1, 1))
    await sessions.session_owners(db, [999_999])
    await node_ops.pending_work(db, 999_999)
    async with db.connect() as conn:
        await config.read_keys_sourced(conn, ["network.egress"], 1, 1)


async def test_a_started_server_compiles_none_of_its_prepared_statements_on_the_first_connect(db_url: str) -> None:
    cold = Database(db_url)
    await cold.start()
    try:
        compiled = _count_compiles(cold)
        await _a_start_and_a_login_read(cold)
        assert compiled, "without prepare() the first run compiles them"
    finally:
        await cold.close()

    warm = Database(db_url)
    await warm.start()
    try:
        assert await warm.prepare() > 0
        compiled = _count_compiles(warm)
        await _a_start_and_a_login_read(warm)
        assert compiled == []
    finally:
        await warm.close()
