"""The node's expiry watch against a fake guest agent on a 127.x loopback address (standing for the desktop):
soft expiry calls the agent's ``expire`` once; hard expiry writes the ``stop`` command like an admin stop."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random

import sqlalchemy as sa
from test_api import add_node

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import utcnow
from deckard.node.expiry import expire_once
from deckard.services.tenancy import bootstrap_farm


class FakeAgent:
    """Answers every ``/vma/<method>`` with ``{"ok": true}`` and records the methods called."""

    def __init__(self, ip: str) -> None:
        self.ip = ip
        self.calls: list[str] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.ip, 3030, reuse_address=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        self.calls.append(head.split(" ")[1].split("?")[0].removeprefix("/vma/"))
        data = json.dumps({"ok": True}).encode()
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
        await writer.drain()
        writer.close()


async def running_desktop(db: Database, node_id: int, ip: str, **expiry: dt.datetime) -> int:
    await bootstrap_farm(db)
    async with db.begin() as conn:
        tenant = (await conn.execute(sa.select(t.tenants.c.id).where(t.tenants.c.name == "default"))).scalar_one()
        osf = (await conn.execute(sa.select(t.osfs.c.id).where(t.osfs.c.name == "default"))).scalar_one()
        user = (
            await conn.execute(
                sa.insert(t.users).values(tenant_id=tenant, login="bob", created_at=utcnow()).returning(t.users.c.id)
            )
        ).scalar_one()
        res = await conn.execute(
            sa.insert(t.desktops)
            .values(
                tenant_id=tenant,
                name="bob-1",
                user_id=user,
                osf_id=osf,
                ip=ip,
                mac="02:00:00:00:00:02",
                created_at=utcnow(),
                state="running",
                node_id=node_id,
                agent_token="tok",
                **expiry,
            )
            .returning(t.desktops.c.id)
        )
        return int(res.scalar_one())


async def desktop(db: Database, desktop_id: int) -> sa.Row:  # type: ignore[type-arg]
    async with db.connect() as conn:
        return (await conn.execute(sa.select(t.desktops).where(t.desktops.c.id == desktop_id))).one()


def loopback_ip() -> str:
    return f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{random.randint(2, 250)}"


async def test_soft_expiry_runs_the_agent_notice_once(db: Database) -> None:
    ip = loopback_ip()
    agent = FakeAgent(ip)
    await agent.start()
    try:
        node = await add_node(db)
        past = utcnow() - dt.timedelta(seconds=1)
        desk = await running_desktop(db, node, ip, expire_soft_at=past, expire_hard_at=past + dt.timedelta(hours=1))
        await expire_once(db, node)
        await expire_once(db, node)
        assert agent.calls == ["expire"]
        row = await desktop(db, desk)
        assert row.expire_notified_at is not None and row.cmd is None
    finally:
        assert agent.server is not None
        agent.server.close()


async def test_soft_expiry_in_the_future_does_nothing(db: Database) -> None:
    ip = loopback_ip()
    agent = FakeAgent(ip)
    await agent.start()
    try:
        node = await add_node(db)
        soon = utcnow() + dt.timedelta(minutes=5)
        desk = await running_desktop(db, node, ip, expire_soft_at=soon, expire_hard_at=soon)
        await expire_once(db, node)
        assert agent.calls == [] and (await desktop(db, desk)).cmd is None
    finally:
        assert agent.server is not None
        agent.server.close()


async def test_hard_expiry_writes_the_stop_command(db: Database) -> None:
    node = await add_node(db)
    past = utcnow() - dt.timedelta(seconds=1)
    desk = await running_desktop(db, node, loopback_ip(), expire_soft_at=past, expire_hard_at=past)
    await expire_once(db, node)
    row = await desktop(db, desk)
    assert row.cmd == "stop" and row.state == "running"  # the node's stop path takes it from here
