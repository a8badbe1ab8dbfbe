"""The farm database's two kinds of transaction, on SQLite and PostgreSQL: ``begin()`` writes, ``connect()`` reads.

A read must neither wait for a writer nor make one wait (on SQLite: a WAL snapshot taken with a deferred
``BEGIN``), sees one consistent snapshot, and cannot write.
"""

from __future__ import annotations

import asyncio

import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import utcnow
from deckard.services.tenancy import bootstrap_farm


async def _tenant_names(db: Database) -> set[str]:
    async with db.connect() as conn:
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
    assert "acme" not in await asyncio.wait_for(_tenant_names(db), 5)
    async with db.connect() as reading:
        await reading.execute(sa.select(t.tenants.c.id))
        release.set()  # the writer commits while a read transaction is open
        await asyncio.wait_for(task, 5)
        # the open read keeps its snapshot on SQLite (PostgreSQL's READ COMMITTED sees the commit)
        names = {str(n) for n in (await reading.execute(sa.select(t.tenants.c.name))).scalars()}
        assert ("acme" in names) == (db.dialect == "postgresql")
    assert "acme" in await _tenant_names(db)


async def test_what_a_read_transaction_writes_is_not_kept(db: Database) -> None:
    await bootstrap_farm(db)
    async with db.connect() as conn:
        await conn.execute(sa.insert(t.tenants).values(name="ghost", created_at=utcnow()))
    assert "ghost" not in await _tenant_names(db)
