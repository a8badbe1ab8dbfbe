"""What a node daemon does to the database: register, heartbeat, claim commands, report observed state.

Every write a node makes is guarded by ``node_id = me`` so a node can only change the desktops it owns, and
every claim is an ``UPDATE … WHERE <expected state> … RETURNING`` so a command is claimed exactly once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import Desktop, utcnow
from deckard.services.desktops import new_agent_token
from deckard.services.events import DESKTOPS
from deckard.services.images import resolve_image
from deckard.services.tenancy import tenant_name

d = t.desktops
n = t.nodes


async def register_node(
    db: Database,
    name: str,
    address: str,
    broker_url: str,
    *,
    cpus: float,
    mem_total_mib: int,
    mem_free_mib: int,
    driver: str = "container",
    run_dir: str = "",
    boot_id: str = "",
) -> int:
    now = utcnow()
    values: dict[str, Any] = dict(
        driver=driver,
        run_dir=run_dir,
        boot_id=boot_id,
        lost_at=None,
        lost_reason=None,
        address=address,
        broker_url=broker_url,
        state="starting",
        pid=os.getpid(),
        started_at=now,
        heartbeat_at=now,
        cpus=cpus,
        mem_total_mib=mem_total_mib,
        mem_free_mib=mem_free_mib,
        cmd=None,
    )
    async with db.begin() as conn:
        row = (await conn.execute(sa.select(n.c.id).where(n.c.name == name))).first()
        if row:
            await conn.execute(sa.update(n).where(n.c.id == row.id).values(**values))
            return int(row.id)
        res = await conn.execute(sa.insert(n).values(name=name, created_at=now, **values).returning(n.c.id))
        return int(res.scalar_one())


async def set_node_state(db: Database, node_id: int, state: str) -> bool:
    """Only ``register_node`` brings a ``lost`` node back: a fenced node must not look live again."""
    async with db.begin() as conn:
        res = await conn.execute(
            sa.update(n).where(n.c.id == node_id, n.c.state != "lost").values(state=state, heartbeat_at=utcnow())
        )
        return bool(res.rowcount)


async def heartbeat(db: Database, node_id: int, *, mem_free_mib: int, load: float, running: int) -> bool:
    """Record a heartbeat; False when the row is ``lost`` (another node fenced this one: it must not go on)."""
    async with db.begin() as conn:
        res = await conn.execute(
            sa.update(n)
            .where(n.c.id == node_id, n.c.state != "lost")
            .values(heartbeat_at=utcnow(), mem_free_mib=mem_free_mib, load=load, desktops_running=running)
        )
        return bool(res.rowcount)


async def claim_node_command(db: Database, node_id: int) -> str | None:
    """Claim this node's pending command (``stop`` | ``drain``) exactly once."""
    async with db.begin() as conn:
        cmd = (await conn.execute(sa.select(n.c.cmd).where(n.c.id == node_id))).scalar_one_or_none()
        if cmd is None:
            return None
        res = await conn.execute(sa.update(n).where(n.c.id == node_id, n.c.cmd == cmd).values(cmd=None))
        return str(cmd) if res.rowcount else None


async def claim_starts(db: Database, node_id: int) -> list[int]:
    """Claim every pending start for this node: stopped|failed + cmd=start → starting, cmd cleared."""
    async with db.begin() as conn:
        res = await conn.execute(
            sa.update(d)
            .where(d.c.node_id == node_id, d.c.cmd == "start", d.c.state.in_(["stopped", "failed"]))
            .values(state="starting", state_at=utcnow(), cmd=None, failure_reason=None)
            .returning(d.c.id)
        )
        ids = [int(r.id) for r in res]
        for desktop_id in ids:  # a fresh agent token at every start
            await conn.execute(sa.update(d).where(d.c.id == desktop_id).values(agent_token=new_agent_token()))
    for desktop_id in ids:
        await db.bus.notify(DESKTOPS, str(desktop_id))
    return ids


async def claim_stops(db: Database, node_id: int) -> list[int]:
    async with db.begin() as conn:
        res = await conn.execute(
            sa.update(d)
            .where(d.c.node_id == node_id, d.c.cmd == "stop", d.c.state.in_(["starting", "running"]))
            .values(state="stopping", state_at=utcnow(), cmd=None)
            .returning(d.c.id)
        )
        ids = [int(r.id) for r in res]
    for desktop_id in ids:
        await db.bus.notify(DESKTOPS, str(desktop_id))
    return ids


async def _set(
    db: Database, node_id: int, desktop_id: int, values: dict[str, Any], *, expect: str | None = None
) -> bool:
    q = sa.update(d).where(d.c.id == desktop_id, d.c.node_id == node_id)
    if expect is not None:
        q = q.where(d.c.state == expect)
    async with db.begin() as conn:
        res = await conn.execute(q.values(values | {"state_at": utcnow()}))
    await db.bus.notify(DESKTOPS, str(desktop_id))
    return bool(res.rowcount)


async def mark_running(
    db: Database, node_id: int, desktop_id: int, *, image_id: int, guest_ms: float, agent_ms: float
) -> bool:
    now = utcnow()
    values = dict(
        state="running",
        started_at=now,
        agent_ok_at=now,
        image_id=image_id,
        start_guest_ms=guest_ms,
        start_agent_ms=agent_ms,
        **dict.fromkeys(("expire_soft_at", "expire_hard_at", "expire_notified_at")),  # a fresh start: no expiry
    )
    return await _set(db, node_id, desktop_id, values, expect="starting")


async def mark_failed(db: Database, node_id: int, desktop_id: int, reason: str) -> bool:
    """The start failed: the desktop leaves the node (any node may try it again) with the reason kept."""
    values = dict(
        state="failed",
        failure_reason=reason[:2000],
        node_id=None,
        cmd=None,
        agent_token=None,
        user_state="disconnected",
        session_id=None,
    )
    return await _set(db, node_id, desktop_id, values)


async def mark_stopped(db: Database, node_id: int, desktop_id: int, *, reason: str | None = None) -> bool:
    values: dict[str, Any] = dict(
        state="stopped", node_id=None, agent_token=None, user_state="disconnected", session_id=None, started_at=None
    )
    if reason is not None:
        values["failure_reason"] = reason
    # a pending stop is done; a pending start (admin asked again) is kept only if it targets this node
    values["cmd"] = sa.case((d.c.cmd == "start", d.c.cmd), else_=None)
    return await _set(db, node_id, desktop_id, values)


async def mark_zombie(db: Database, node_id: int, desktop_id: int, reason: str) -> bool:
    return await _set(db, node_id, desktop_id, {"state": "zombie", "failure_reason": reason})


async def agent_ok(db: Database, node_id: int, desktop_id: int) -> None:
    async with db.begin() as conn:
        await conn.execute(
            sa.update(d).where(d.c.id == desktop_id, d.c.node_id == node_id).values(agent_ok_at=utcnow())
        )


async def desktops_on_node(db: Database, node_id: int) -> list[Desktop]:
    async with db.connect() as conn:
        rows = await conn.execute(sa.select(d).where(d.c.node_id == node_id))
        return [Desktop.from_row(r._mapping) for r in rows]


@dataclass(frozen=True)
class StartFacts:
    """What the node needs from the database to build a guest spec."""

    desktop: Desktop
    user_login: str
    tenant: str
    home_key: str  # names the user's home directory (``FarmPaths.user_home``)
    memory_mib: int
    cpus: float
    keep_overlay: bool
    image_id: int
    image_path: Path


async def start_facts(db: Database, desktop_id: int) -> StartFacts:
    async with db.connect() as conn:
        row = (
            await conn.execute(
                sa.select(
                    d, t.users.c.login, t.users.c.home_key, t.osfs.c.memory_mib, t.osfs.c.cpus, t.osfs.c.keep_overlay
                )
                .join(t.users, t.users.c.id == d.c.user_id)
                .join(t.osfs, t.osfs.c.id == d.c.osf_id)
                .where(d.c.id == desktop_id)
            )
        ).one()
        desk = Desktop.from_row(row._mapping)
        image_id, image_path = await resolve_image(conn, desk.osf_id, desk.tag)
        return StartFacts(
            desk,
            row.login,
            await tenant_name(conn, desk.tenant_id),
            row.home_key,
            row.memory_mib,
            row.cpus,
            row.keep_overlay,
            image_id,
            image_path,
        )
