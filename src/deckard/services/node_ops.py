"""What a node daemon does to the database: register, heartbeat, claim commands, report observed state.

Every write a node makes is guarded by ``node_id = me`` so a node can only change the desktops it owns, and
goes through ``services/transitions.py`` so it follows the tables of ``model/states.py``; every claim is an
``UPDATE … WHERE cmd=… AND state IN (…) … RETURNING`` so a command is claimed exactly once.

The node acts on what it read a moment ago, so a refused observed-state write is an expected lost race, not a
bug: a stop claimed while the start was finishing, a desktop released by the monitor that fenced this node, a
second stop of a desktop already stopped.  ``mark_*`` and ``set_node_state`` then change nothing, log
``node.transition_refused`` and return False; the daemon goes on with what the database says.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database, prepared
from deckard.model.entities import Desktop, utcnow
from deckard.model.errors import Conflict, NotFound
from deckard.model.fence import FenceConfig
from deckard.model.states import DesktopCommand, DesktopState, NodeCommand, NodeState
from deckard.services.config import GUEST_SWITCH_KEYS, guest_switches_of, read_keys_sourced
from deckard.services.desktops import new_agent_token
from deckard.services.events import DESKTOPS
from deckard.services.images import resolve_image
from deckard.services.network_policy import (
    NETWORK_KEYS,
    DesktopNetwork,
    TenantAddress,
    desktop_network_of,
    tenant_address,
)
from deckard.services.transitions import claim_commands, transition_desktop, transition_node

log = structlog.get_logger()
d = t.desktops
va = t.volume_attachments
n = t.nodes


async def _refused_is_false(write: Awaitable[object], **about: object) -> bool:
    """Run one observed-state write; a refusal (lost race, see the module docstring) is False, not an error."""
    try:
        await write
    except (NotFound, Conflict) as e:  # Conflict covers InvalidTransition and not_owner
        log.info("node.transition_refused", code=e.code, reason=e.message, **about)
        return False
    return True


async def register_node(
    db: Database,
    name: str,
    address: str,
    broker_url: str,
    *,
    cpus: float,
    mem_total_mib: int,
    mem_free_mib: int,
    load: float = 0.0,
    driver: str = "container",
    run_dir: str = "",
    boot_id: str = "",
    fence: FenceConfig | None = None,
) -> int:
    """Register (or bring back) a node; ``fence`` replaces its fence agent, None keeps the one its row has."""
    now = utcnow()
    values: dict[str, Any] = dict(
        driver=driver,
        run_dir=run_dir,
        boot_id=boot_id,
        lost_at=None,
        lost_reason=None,
        fence_tried_at=None,
        address=address,
        broker_url=broker_url,
        pid=os.getpid(),
        started_at=now,
        heartbeat_at=now,
        cpus=cpus,
        mem_total_mib=mem_total_mib,
        mem_free_mib=mem_free_mib,
        load=load,  # the host's, at once: a node registered with none looked idle and drew every start
        cmd=None,
    )
    if fence is not None:
        values.update(fence_agent=fence.agent, fence_options=json.dumps(dict(fence.options)))
    async with db.begin() as conn:
        row = (await conn.execute(sa.select(n.c.id).where(n.c.name == name))).first()
        if row:  # every state may go to starting (model/states.py): a lost, stopped or crashed node comes back
            await transition_node(conn, int(row.id), NodeState.STARTING, values=values)
            return int(row.id)
        res = await conn.execute(
            sa.insert(n).values(name=name, created_at=now, state=NodeState.STARTING.value, **values).returning(n.c.id)
        )
        return int(res.scalar_one())


async def node_name(db: Database, node_id: int) -> str:
    """A node's name ("" if it is gone)."""
    async with db.connect() as conn:
        name = (await conn.execute(sa.select(t.nodes.c.name).where(t.nodes.c.id == node_id))).scalar()
    return str(name or "")


async def set_node_state(db: Database, node_id: int, state: NodeState | str) -> bool:
    """Move the node by the table; False when refused.  Only ``register_node`` brings a ``lost`` node back."""

    async def write() -> None:
        async with db.begin() as conn:
            await transition_node(conn, node_id, NodeState(state), values={"heartbeat_at": utcnow()})

    return await _refused_is_false(write(), node_id=node_id, to=str(state))


def write_heartbeat(conn: sa.Connection, node_id: int, *, mem_free_mib: int, load: float, running: int) -> bool:
    """Record a heartbeat on a synchronous connection (the node's heartbeat thread, node/heartbeat.py).

    False when the row is ``lost`` (another node fenced this one: it must not go on).
    """
    res = conn.execute(
        sa.update(n)
        .where(n.c.id == node_id, n.c.state != NodeState.LOST)
        .values(heartbeat_at=utcnow(), mem_free_mib=mem_free_mib, load=load, desktops_running=running)
    )
    return bool(res.rowcount)


async def heartbeat(db: Database, node_id: int, *, mem_free_mib: int, load: float, running: int) -> bool:
    """``write_heartbeat`` through the farm's pool (simulated nodes of tests and benchmarks)."""
    async with db.begin() as conn:
        return await conn.run_sync(write_heartbeat, node_id, mem_free_mib=mem_free_mib, load=load, running=running)


async def claim_node_command(db: Database, node_id: int) -> NodeCommand | None:
    """Claim this node's pending command (``stop`` | ``drain`` | ``restart``) exactly once."""
    async with db.begin() as conn:
        cmd = (await conn.execute(sa.select(n.c.cmd).where(n.c.id == node_id))).scalar_one_or_none()
        if cmd is None:
            return None
        res = await conn.execute(sa.update(n).where(n.c.id == node_id, n.c.cmd == cmd).values(cmd=None))
        return NodeCommand(cmd) if res.rowcount else None


_NEW_TOKEN = prepared(
    sa.update(d)
    .where(d.c.id == sa.bindparam("desktop_id"), d.c.guest.is_(None))
    .values(agent_token=sa.bindparam("token"))
)


async def claim_starts(db: Database, node_id: int) -> list[int]:
    """Claim every pending start for this node: stopped|failed + cmd=start → starting, cmd cleared."""
    async with db.write() as conn:
        ids = await claim_commands(
            conn, node_id, DesktopCommand.START, values={"failure_reason": None, "display_at": None}
        )
        for desktop_id in ids:  # a fresh agent token at every start (a warm guest's came with it)
            await conn.execute(_NEW_TOKEN, {"desktop_id": desktop_id, "token": new_agent_token()})
    for desktop_id in ids:
        await db.bus.notify(DESKTOPS, str(desktop_id))
    return ids


async def cold_instead(db: Database, node_id: int, desktop_id: int) -> None:
    """The warm guest a start was given could not be taken over: the desktop starts in a guest of its own, with a
    fresh agent token (the warm guest's went with it)."""
    async with db.begin() as conn:
        await conn.execute(
            sa.update(d)
            .where(d.c.id == desktop_id, d.c.node_id == node_id)
            .values(guest=None, agent_token=new_agent_token())
        )


async def claim_stops(db: Database, node_id: int) -> list[int]:
    """Claim every pending stop for this node: starting|running + cmd=stop → stopping, cmd cleared."""
    async with db.begin() as conn:
        ids = await claim_commands(conn, node_id, DesktopCommand.STOP)
    for desktop_id in ids:
        await db.bus.notify(DESKTOPS, str(desktop_id))
    return ids


async def _observe(
    db: Database, node_id: int, desktop_id: int, to: DesktopState, values: dict[str, Any] | None = None
) -> bool:
    """This node reports an observed state of a desktop it holds; False (nothing changed) when refused."""

    async def write() -> None:
        async with db.write() as conn:
            await transition_desktop(conn, desktop_id, to, node_id=node_id, values=values)
        await db.bus.notify(DESKTOPS, str(desktop_id))

    return await _refused_is_false(write(), desktop_id=desktop_id, node_id=node_id, to=str(to))


_DISPLAY_UP = prepared(  # built once: the start's path (services/config.py says why)
    sa.update(d)
    .where(
        d.c.id == sa.bindparam("desktop_id"),
        d.c.node_id == sa.bindparam("node"),  # not "node_id": SQLAlchemy keeps column names for SET values
        d.c.state == DesktopState.STARTING.value,
    )
    .values(display_at=sa.bindparam("at"), image_id=sa.bindparam("image"))
)


async def mark_display_up(db: Database, node_id: int, desktop_id: int, *, image_id: int) -> bool:
    """A starting desktop's guest shows its user's display before its agent answers (a container's boot script):
    the broker may dial it now.  False when the desktop is no longer starting here."""
    async with db.write() as conn:
        params = {"desktop_id": desktop_id, "node": node_id, "at": utcnow(), "image": image_id}
        res = await conn.execute(_DISPLAY_UP, params)
    if not res.rowcount:
        return False
    await db.bus.notify(DESKTOPS, str(desktop_id))
    return True


async def mark_running(
    db: Database, node_id: int, desktop_id: int, *, image_id: int, guest_ms: float, agent_ms: float
) -> bool:
    now = utcnow()
    values = dict(
        started_at=now,
        agent_ok_at=now,
        image_id=image_id,
        start_guest_ms=guest_ms,
        start_agent_ms=agent_ms,
        **dict.fromkeys(("expire_soft_at", "expire_hard_at", "expire_notified_at")),  # a fresh start: no expiry
        **dict.fromkeys(("input_at", "idle_warned_at")),  # nor idle time (session policies) of the last session
    )
    return await _observe(db, node_id, desktop_id, DesktopState.RUNNING, values)


async def mark_failed(db: Database, node_id: int, desktop_id: int, reason: str) -> bool:
    """The start failed: the desktop leaves the node (any node may try it again) with the reason kept."""
    return await _observe(db, node_id, desktop_id, DesktopState.FAILED, {"failure_reason": reason[:2000]})


async def mark_stopped(db: Database, node_id: int, desktop_id: int, *, reason: str | None = None) -> bool:
    """The guest is gone: the desktop leaves the node; a pending stop is done (no start can be pending here)."""
    values = {"failure_reason": reason} if reason is not None else {}
    return await _observe(db, node_id, desktop_id, DesktopState.STOPPED, values)


async def mark_zombie(db: Database, node_id: int, desktop_id: int, reason: str) -> bool:
    return await _observe(db, node_id, desktop_id, DesktopState.ZOMBIE, {"failure_reason": reason})


async def agent_ok(db: Database, node_id: int, desktop_id: int) -> None:
    async with db.begin() as conn:
        await conn.execute(
            sa.update(d).where(d.c.id == desktop_id, d.c.node_id == node_id).values(agent_ok_at=utcnow())
        )


async def farm_nodes(db: Database) -> list[tuple[int, str, str]]:
    """Every node as ``(id, address, state)``: a node's overlay peers are the others' addresses."""
    async with db.connect() as conn:
        rows = await conn.execute(sa.select(n.c.id, n.c.address, n.c.state).order_by(n.c.id))
        return [(int(r.id), str(r.address), str(r.state)) for r in rows]


async def desktops_elsewhere(db: Database, node_id: int, since: dt.datetime | None = None) -> dict[str, int]:
    """Farm address → node of the desktops placed on another node (for the overlay's neighbour entries): every
    one, or those whose state changed ``since`` (a desktop placed anew has)."""
    q = sa.select(d.c.ip, d.c.node_id).where(d.c.node_id.is_not(None), d.c.node_id != node_id)
    if since is not None:
        q = q.where(d.c.state_at >= since)
    async with db.connect() as conn:
        return {str(r.ip): int(r.node_id) for r in await conn.execute(q)}


async def desktops_on_node(db: Database, node_id: int) -> list[Desktop]:
    async def reads(conn: AsyncConnection) -> list[Desktop]:
        rows = await conn.execute(sa.select(d).where(d.c.node_id == node_id))
        return [Desktop.from_row(r._mapping) for r in rows]

    return await db.read(reads)


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
    network: DesktopNetwork
    driver: str = "container"  # the OSF's: which of the node's drivers runs the desktop
    tenant_network: TenantAddress | None = None  # on a tenant network: which, and the desktop's address in it
    mounter: bool = False  # ``nx.shares.in_containers`` on and the OSF keeps no overlay (docs/security.md)
    volumes: bool = True  # the desktop has volume attachments (``start_volumes`` settles them; none: no write)
    glx: bool = True  # OpenGL on its display (``display.glx``)


async def start_facts(db: Database, desktop_id: int) -> StartFacts:
    return await db.read(lambda conn: _start_facts(conn, desktop_id))  # on the loop's thread (a start waits on it)


_START_ROW = prepared(  # built once: a start waits on it (config.py says why)
    sa.select(
        d,
        t.users.c.login,
        t.users.c.home_key,
        t.osfs.c.memory_mib,
        t.osfs.c.cpus,
        t.osfs.c.keep_overlay,
        t.osfs.c.driver.label("osf_driver"),
        t.tenants.c.name.label("tenant_name"),
        sa.exists().where(va.c.desktop_id == d.c.id).label("has_volumes"),
    )
    .join(t.users, t.users.c.id == d.c.user_id)
    .join(t.osfs, t.osfs.c.id == d.c.osf_id)
    .join(t.tenants, t.tenants.c.id == d.c.tenant_id)
    .where(d.c.id == sa.bindparam("desktop_id"))
)


async def _start_facts(conn: AsyncConnection, desktop_id: int) -> StartFacts:
    """Four short reads (a start waits on them): the desktop with its user, OSF and tenant; its image; the
    settings a guest starts with (one read of the layers); its tenant network's address, when it has one."""
    row = (await conn.execute(_START_ROW, {"desktop_id": desktop_id})).one()
    desk = Desktop.from_row(row._mapping)
    image_id, image_path = await resolve_image(conn, desk.osf_id, desk.tag)
    values = await read_keys_sourced(conn, (*GUEST_SWITCH_KEYS, *NETWORK_KEYS), desk.tenant_id, desk.osf_id)
    switches = guest_switches_of(values, driver=row.osf_driver, keep_overlay=row.keep_overlay)
    return StartFacts(
        desk,
        row.login,
        row.tenant_name,
        row.home_key,
        row.memory_mib,
        row.cpus,
        row.keep_overlay,
        image_id,
        image_path,
        desktop_network_of(values),
        row.osf_driver,
        await tenant_address(conn, desktop_id) if desk.network_id is not None else None,
        switches.mounter,
        bool(row.has_volumes),
        switches.glx,
    )


# ---- volumes (docs/volumes.md): what the node hands a guest at start, and the hot-plug commands ---------------


@dataclass(frozen=True)
class AttachedVolume:
    """One volume attachment as the node acts on it."""

    desktop_id: int
    volume_id: int
    tenant_id: int
    read_only: bool
    pending: str | None = None  # attach | detach (the command), None at start
    name: str = ""


async def start_volumes(db: Database, desktop_id: int) -> list[AttachedVolume]:
    """The volumes a starting guest gets: every attachment of the desktop, whose commands the start settles (a
    detach still pending is done, since no guest has the volume yet; an attach is done by the start)."""
    async with db.begin() as conn:
        await conn.execute(sa.delete(va).where(va.c.desktop_id == desktop_id, va.c.pending == "detach"))
        await conn.execute(
            sa.update(va)
            .where(va.c.desktop_id == desktop_id)
            .values(pending=None, plugged=True, error_code=None, error=None)
        )
        rows = await conn.execute(
            sa.select(va.c.volume_id, va.c.read_only, t.volumes.c.tenant_id, t.volumes.c.name)
            .join(t.volumes, t.volumes.c.id == va.c.volume_id)
            .where(va.c.desktop_id == desktop_id)
            .order_by(va.c.volume_id)
        )
        return [
            AttachedVolume(desktop_id, int(r.volume_id), int(r.tenant_id), bool(r.read_only), name=r.name) for r in rows
        ]


async def pending_volume_changes(db: Database, node_id: int) -> list[AttachedVolume]:
    """Hot-plug commands for this node's running desktops (starting ones are settled by ``start_volumes``)."""
    return await db.read(lambda conn: _volume_changes(conn, node_id))


_VOLUME_CHANGES = prepared(  # built once, as what a node's pass reads (pending_work)
    sa.select(va.c.desktop_id, va.c.volume_id, va.c.read_only, va.c.pending, t.volumes.c.tenant_id, t.volumes.c.name)
    .join(d, d.c.id == va.c.desktop_id)
    .join(t.volumes, t.volumes.c.id == va.c.volume_id)
    .where(
        d.c.node_id == sa.bindparam("node_id"),
        d.c.state == DesktopState.RUNNING,
        va.c.pending.in_(("attach", "detach")),
    )
)


async def _volume_changes(conn: AsyncConnection, node_id: int) -> list[AttachedVolume]:
    rows = await conn.execute(_VOLUME_CHANGES, {"node_id": node_id})
    return [
        AttachedVolume(int(r.desktop_id), int(r.volume_id), int(r.tenant_id), bool(r.read_only), r.pending, name=r.name)
        for r in rows
    ]


@dataclass(frozen=True)
class PendingWork:
    """What a node's pass has to claim, read in one snapshot: an idle pass (four a second on SQLite) then writes
    nothing, and a busy one opens only the write transactions it needs."""

    node_command: bool
    desktop_commands: frozenset[str]  # start | stop
    volume_changes: list[AttachedVolume]


# built once: a node's pass reads them several times a second, and before every start (services/config.py)
_NODE_COMMAND = prepared(sa.select(n.c.cmd).where(n.c.id == sa.bindparam("node_id")))
_DESKTOP_COMMANDS = prepared(
    sa.select(d.c.cmd).where(d.c.node_id == sa.bindparam("node_id"), d.c.cmd.is_not(None)).distinct()
)


async def pending_work(db: Database, node_id: int) -> PendingWork:
    async def reads(conn: AsyncConnection) -> PendingWork:
        node_cmd = (await conn.execute(_NODE_COMMAND, {"node_id": node_id})).scalar_one_or_none()
        cmds = await conn.execute(_DESKTOP_COMMANDS, {"node_id": node_id})
        return PendingWork(node_cmd is not None, frozenset(cmds.scalars()), await _volume_changes(conn, node_id))

    return await db.read(reads)


async def volume_plugged(db: Database, desktop_id: int, volume_id: int, *, live: bool) -> None:
    """The attach is done: in the guest now (``live``) or at its next start (a driver without hot plug)."""
    async with db.begin() as conn:
        await conn.execute(
            sa.update(va)
            .where(va.c.desktop_id == desktop_id, va.c.volume_id == volume_id, va.c.pending == "attach")
            .values(pending=None, plugged=live)
        )


async def volume_unplugged(db: Database, desktop_id: int, volume_id: int) -> None:
    """The detach is done: the guest no longer has the volume, the attachment goes."""
    async with db.begin() as conn:
        await conn.execute(
            sa.delete(va).where(va.c.desktop_id == desktop_id, va.c.volume_id == volume_id, va.c.pending == "detach")
        )


async def volume_change_failed(db: Database, desktop_id: int, volume_id: int, code: str, message: str) -> None:
    """The node could not do the command; the API call waiting for it reports ``code`` and ``message``."""
    async with db.begin() as conn:
        await conn.execute(
            sa.update(va)
            .where(va.c.desktop_id == desktop_id, va.c.volume_id == volume_id, va.c.pending.in_(("attach", "detach")))
            .values(pending="failed", error_code=code[:32], error=message[:2000])
        )
