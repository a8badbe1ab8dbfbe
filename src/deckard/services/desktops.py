"""Desktops (QVD's VMs) as the admin and the broker see them: create, list, update, start, stop, disconnect,
block, reset, delete.

Starting follows ARCHITECTURE.md §2: the node is chosen and the start command written in **one** transaction
(QVD had them apart, a FIXME), guarded by the observed state so that two requests never both win; then the
chosen node is notified and claims the command.  Only nodes write observed state (services/node_ops.py).

Every admin use case here takes an ``Actor`` and checks its ACL first (``desktop.<action>``); answers pass
through ``visible`` so gated fields never leave the service.  The broker's entry points (``request_start``,
``request_stop``) take no actor: the user was authorized by owning the desktop.

Every desktop has a farm address (``ip``, from ``network.range``, unique in the farm: how nodes and brokers reach
it).  A desktop on a tenant network (``services/networks.py``: the OSF's unless the desktop names another) also
has an address there (``network_ip``, unique in that network), which is what its guest sees.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import secrets
import shutil
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database, prepared
from deckard.model.entities import Desktop, utcnow
from deckard.model.errors import BadInput, Conflict, NotFound, PermissionDenied, Unavailable
from deckard.model.network import first_free_ip, gateway_of, mac_for_ip
from deckard.model.states import DESKTOP_AT_REST, DesktopCommand, DesktopState, UserState, check_command
from deckard.runtime.metrics import PLACEMENT_DECISIONS
from deckard.runtime.paths import FarmPaths
from deckard.services.context import Actor, require, require_fields, visible, visible_rows
from deckard.services.events import DESKTOPS, node_channel, publish
from deckard.services.images import validate_tag
from deckard.services.listing import ListQuery, run_list
from deckard.services.networks import next_network_address, resolve_network
from deckard.services.placement import best_node, rank_desktop
from deckard.services.pools import take_warm
from deckard.services.rows import one_row
from deckard.services.tenancy import DEFAULT_OSF
from deckard.services.transitions import command_desktop, command_desktops, transition_session, withdraw_starts
from deckard.services.users import check_login, find_user_id, tenant_filter

d = t.desktops
AT_REST = sorted(DESKTOP_AT_REST)  # no node holds the desktop: it may be deleted, reset, retagged


def _later(a: sa.ColumnElement[Any], b: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    return sa.case((sa.or_(b.is_(None), a > b), a), else_=b)


_RUNNING = d.c.state == DesktopState.RUNNING.value
# the session policies' clocks (model/session_policy.py, the same rules): since when a running desktop has had nobody
# connected (from its start if nobody connected since), and since when its connected user has not typed nor moved
# the mouse (from the connection if later; null when the agent could not tell)
DISCONNECTED_SINCE = sa.case(
    (sa.and_(_RUNNING, d.c.user_state == UserState.DISCONNECTED.value), _later(d.c.user_state_at, d.c.started_at))
)
IDLE_SINCE = sa.case(
    (
        sa.and_(_RUNNING, d.c.user_state == UserState.CONNECTED.value, d.c.input_at.is_not(None)),
        _later(d.c.input_at, d.c.user_state_at),
    )
)

LIST_COLUMNS = [
    d.c.id,
    d.c.tenant_id,
    d.c.name,
    d.c.user_id,
    t.users.c.login.label("user"),
    d.c.osf_id,
    t.osfs.c.name.label("osf"),
    d.c.tag,
    d.c.network_id,
    t.networks.c.name.label("network"),
    d.c.network_ip,
    d.c.ip,
    d.c.mac,
    d.c.blocked,
    d.c.description,
    d.c.state,
    d.c.state_at,
    d.c.cmd,
    d.c.node_id,
    t.nodes.c.name.label("node"),
    d.c.user_state,
    d.c.image_id,
    d.c.failure_reason,
    d.c.started_at,
    d.c.expire_soft_at,
    d.c.expire_hard_at,
    d.c.created_at,
    DISCONNECTED_SINCE.label("disconnected_since"),
    IDLE_SINCE.label("idle_since"),
]

# list field name → the column a filter or sort uses (labels resolved to their base column, so indexes apply)
FIELDS: dict[str, sa.ColumnElement[Any]] = {
    (c.name if isinstance(c, sa.Label) else c.key): (c.element if isinstance(c, sa.Label) else c) for c in LIST_COLUMNS
}


def _listing() -> sa.Select[Any]:
    return (
        sa.select(*LIST_COLUMNS)
        .join(t.users, t.users.c.id == d.c.user_id)
        .join(t.osfs, t.osfs.c.id == d.c.osf_id)
        .outerjoin(t.nodes, t.nodes.c.id == d.c.node_id)
        .outerjoin(t.networks, t.networks.c.id == d.c.network_id)
    )


async def _osf_id(conn: AsyncConnection, tenant_id: int, ref: str | int | None) -> int:
    ref = DEFAULT_OSF if ref is None else ref
    cond = t.osfs.c.id == int(ref) if str(ref).isdigit() else t.osfs.c.name == str(ref)
    row = (await conn.execute(sa.select(t.osfs.c.id).where(cond, t.osfs.c.tenant_id == tenant_id))).first()
    if not row:
        raise NotFound(f"no OSF {ref!r}", code="osf_not_found")
    return int(row.id)


async def _network_id(conn: AsyncConnection, tenant_id: int, osf_id: int, ref: str | int | None) -> int | None:
    """The network a new desktop is made on: the one named ("": the default network), else its OSF's."""
    if ref is not None:
        return await resolve_network(conn, tenant_id, ref)
    osf_network = (await conn.execute(sa.select(t.osfs.c.network_id).where(t.osfs.c.id == osf_id))).scalar_one()
    return None if osf_network is None else int(osf_network)


async def create_desktop(
    db: Database,
    actor: Actor,
    name: str,
    user: str | int,
    *,
    network: str,
    osf: str | int | None = None,
    tag: str = "default",
    description: str = "",
    tenant_network: str | int | None = None,
) -> dict[str, Any]:
    """A stopped desktop with its farm address, from ``network`` (the farm's range, ``Settings.network.range``),
    and on a tenant network its address there.  ``tenant_network`` names that network (id or name): by default the
    OSF's; "" is the farm's default network.
    """
    require(actor, "desktop.create")
    check_login(name)  # same rules as logins: it names containers and appears in URLs
    validate_tag(tag)  # a desktop's tag names an image tag: the same rules
    user_id = await find_user_id(db, actor, user)
    gateway = gateway_of(network)
    for _attempt in range(20):
        try:
            async with db.begin() as conn:
                tenant_id = (
                    await conn.execute(sa.select(t.users.c.tenant_id).where(t.users.c.id == user_id))
                ).scalar_one()
                osf_id = await _osf_id(conn, tenant_id, osf)
                taken = await conn.execute(sa.select(d.c.id).where(d.c.tenant_id == tenant_id, d.c.name == name))
                if taken.first():
                    raise Conflict(f"a desktop named {name!r} already exists", code="duplicate")
                used = [r.ip for r in await conn.execute(sa.select(d.c.ip).union_all(sa.select(t.warm_guests.c.ip)))]
                ip = first_free_ip(network, gateway, used)
                network_id = await _network_id(conn, tenant_id, osf_id, tenant_network)
                network_ip = None if network_id is None else await next_network_address(conn, network_id)
                res = await conn.execute(
                    sa.insert(d)
                    .values(
                        tenant_id=tenant_id,
                        name=name,
                        user_id=user_id,
                        osf_id=osf_id,
                        tag=tag,
                        network_id=network_id,
                        network_ip=network_ip,
                        ip=ip,
                        mac=mac_for_ip(ip),
                        description=description,
                        created_at=utcnow(),
                        state_at=utcnow(),
                    )
                    .returning(d.c.id)
                )
                desktop_id = int(res.scalar_one())
            break
        except sa.exc.IntegrityError:
            continue  # another creator took the same IP between our read and insert: pick again
    else:
        raise Conflict("could not allocate an IP address: too many concurrent creations, retry", code="ip_race")
    await db.bus.notify(DESKTOPS, str(desktop_id))
    await publish(db, "created", "desktop", desktop_id, tenant_id, name=name)
    return await get_desktop(db, actor, desktop_id)


async def find_desktop_id(db: Database, actor: Actor, ref: str | int) -> int:
    async with db.connect() as conn:
        cond = d.c.id == int(ref) if str(ref).isdigit() else d.c.name == str(ref)
        row = (await conn.execute(sa.select(d.c.id).where(cond, tenant_filter(actor, d.c.tenant_id)))).first()
    if not row:
        raise NotFound(f"no desktop {ref!r}", code="desktop_not_found")
    return int(row.id)


async def _row(db: Database, actor: Actor, desktop_id: int) -> dict[str, Any]:
    q = _listing().where(d.c.id == desktop_id, tenant_filter(actor, d.c.tenant_id))
    return await one_row(db, q, "desktop", desktop_id)


async def get_desktop(db: Database, actor: Actor, desktop_id: int) -> dict[str, Any]:
    require(actor, "desktop.see")
    return visible(actor, "desktop", await _row(db, actor, desktop_id))


def desktop_scope(actor: Actor) -> sa.Select[Any]:
    """The desktops an actor may see, as the base of a list or a bulk action's filter."""
    return _listing().where(tenant_filter(actor, d.c.tenant_id))


async def list_desktops(
    db: Database, actor: Actor, q: ListQuery | None = None, *, user_id: int | None = None
) -> tuple[list[dict[str, Any]], int]:
    """A page of desktops and the total matching ``q`` (filters and sorts on hidden fields are refused)."""
    require(actor, "desktop.see")
    q = q or ListQuery(per_page=10**9)
    require_fields(actor, "desktop", q.named_fields)
    if q.fields and "id" not in q.fields:
        q = dataclasses.replace(q, fields=[*q.fields, "id"])  # answers always carry the id
    base = desktop_scope(actor)
    if user_id is not None:
        base = base.where(d.c.user_id == user_id)
    async with db.connect() as conn:
        rows, total = await run_list(conn, base, q, FIELDS, d.c.id)
    return visible_rows(actor, "desktop", rows), total


_DESKTOP = prepared(sa.select(d).where(d.c.id == sa.bindparam("desktop_id")))  # built once: connects and starts read it


async def load_desktop(conn: AsyncConnection, desktop_id: int) -> Desktop:
    row = (await conn.execute(_DESKTOP, {"desktop_id": desktop_id})).first()
    if not row:
        raise NotFound(f"no desktop with id {desktop_id}", code="desktop_not_found")
    return Desktop.from_row(row._mapping)


async def delete_desktop(db: Database, actor: Actor, desktop_id: int, paths: FarmPaths | None = None) -> None:
    """Delete a stopped desktop and, given the farm's ``paths``, its writable layer (kept by an OSF that keeps
    layers; the user's home stays).  Ids are never reused (revision 0018), and a desktop's first start discards a
    layer left at its path all the same (``GuestSpec.first_start``)."""
    require(actor, "desktop.delete")
    row = await _row(db, actor, desktop_id)
    async with db.begin() as conn:
        res = await conn.execute(sa.delete(d).where(d.c.id == desktop_id, d.c.state.in_(AT_REST), d.c.cmd.is_(None)))
        if res.rowcount == 0:
            raise Conflict("the desktop is running or busy: stop it first", code="desktop_running")
    if paths is not None:
        await _discard_layer(paths, desktop_id)
    await db.bus.notify(DESKTOPS, str(desktop_id))
    await publish(db, "deleted", "desktop", desktop_id, row["tenant_id"], name=row["name"])


async def _changed(db: Database, actor: Actor, desktop_id: int, **data: Any) -> dict[str, Any]:
    await db.bus.notify(DESKTOPS, str(desktop_id))
    row = await _row(db, actor, desktop_id)
    await publish(db, "updated", "desktop", desktop_id, row["tenant_id"], **data)
    return visible(actor, "desktop", row)


async def set_blocked(db: Database, actor: Actor, desktop_id: int, blocked: bool) -> dict[str, Any]:
    require(actor, "desktop.block")
    await _row(db, actor, desktop_id)
    async with db.begin() as conn:
        await conn.execute(sa.update(d).where(d.c.id == desktop_id).values(blocked=blocked))
    return await _changed(db, actor, desktop_id, blocked=blocked)


async def set_expiry(
    db: Database, actor: Actor, desktop_id: int, *, soft_s: int | None, hard_s: int | None
) -> dict[str, Any]:
    """Set the desktop's expiry deadlines (QVD's ``vm_expiration_soft/hard``), seconds from now; ``None`` clears one.

    Unlike publishing an image, which only moves deadlines earlier, an administrator sets them as asked; a new
    soft deadline is announced to the user again.  The owning node acts on them (``node/expiry.py``).
    """
    require(actor, "desktop.expire")
    if soft_s is not None and hard_s is not None and hard_s < soft_s:
        raise BadInput("the hard deadline comes before the soft one: the user would not be warned", code="bad_expiry")
    await _row(db, actor, desktop_id)
    now = utcnow()
    soft_at, hard_at = (None if s is None else now + dt.timedelta(seconds=s) for s in (soft_s, hard_s))
    async with db.begin() as conn:
        values = {"expire_soft_at": soft_at, "expire_hard_at": hard_at, "expire_notified_at": None}
        await conn.execute(sa.update(d).where(d.c.id == desktop_id).values(**values))
    return await _changed(db, actor, desktop_id, expire_soft_at=soft_at, expire_hard_at=hard_at)


async def update_desktop(
    db: Database,
    actor: Actor,
    desktop_id: int,
    *,
    name: str | None = None,
    description: str | None = None,
    tag: str | None = None,
    osf: str | int | None = None,
    tenant_network: str | int | None = None,
) -> dict[str, Any]:
    """Rename, describe, retag, or move to another OSF or network; tag, OSF and network only while stopped (they
    pick the image and the address).  ``tenant_network`` is the network to move to (id or name; "": the farm's
    default network); the desktop gets an address there and keeps its farm address."""
    require(actor, "desktop.update")
    row = await _row(db, actor, desktop_id)
    values: dict[str, Any] = {}
    if name is not None and name != row["name"]:
        values["name"] = check_login(name)
    if description is not None:
        values["description"] = description
    if tag is not None:
        values["tag"] = validate_tag(tag)
    for _attempt in range(20):
        try:
            async with db.begin() as conn:
                changed = await _update(conn, row, values, osf, tenant_network)
            break
        except sa.exc.IntegrityError:
            continue  # another desktop took the new address (or the name) meanwhile: look again
    else:
        raise Conflict("could not allocate an IP address: too many concurrent changes, retry", code="ip_race")
    if not changed:
        return visible(actor, "desktop", row)
    return await _changed(db, actor, desktop_id, fields=sorted(changed))


async def _update(
    conn: AsyncConnection,
    row: dict[str, Any],
    asked: dict[str, Any],
    osf: str | int | None,
    tenant_network: str | int | None,
) -> list[str]:
    """Write a desktop's changes in one guarded UPDATE; the names of the columns changed."""
    values = dict(asked)
    tenant_id = int(row["tenant_id"])
    if osf is not None:
        values["osf_id"] = await _osf_id(conn, tenant_id, osf)
    if tenant_network is not None:
        network_id = await resolve_network(conn, tenant_id, tenant_network)
        if network_id != row["network_id"]:
            values["network_id"] = network_id
            values["network_ip"] = None if network_id is None else await next_network_address(conn, network_id)
    if not values:
        return []
    cond = [d.c.id == row["id"]]
    if {"tag", "osf_id", "network_id"} & set(values):
        cond += [d.c.state.in_(AT_REST), d.c.cmd.is_(None)]
    if "name" in values:
        taken = await conn.execute(sa.select(d.c.id).where(d.c.tenant_id == tenant_id, d.c.name == values["name"]))
        if taken.first():
            raise Conflict(f"a desktop named {values['name']!r} already exists", code="duplicate")
    res = await conn.execute(sa.update(d).where(*cond).values(**values))
    if res.rowcount == 0:
        raise Conflict(
            "the OSF, tag or network of a running desktop cannot change: stop it first", code="desktop_running"
        )
    return sorted(values)


async def disconnect_desktop(db: Database, actor: Actor, desktop_id: int) -> dict[str, Any]:
    """Drop the user's display session: clearing ``session_id`` makes its tunnel close itself.

    Disconnecting a desktop nobody is connected to is a success that changes nothing (a repeat, declared here).
    """
    require(actor, "desktop.disconnect")
    row = await _row(db, actor, desktop_id)
    if row["user_state"] == UserState.DISCONNECTED:
        return visible(actor, "desktop", row)
    async with db.begin() as conn:
        await transition_session(
            conn, desktop_id, UserState.DISCONNECTED, values={"session_id": None, "session_node_id": None}
        )
    return await _changed(db, actor, desktop_id, user_state=UserState.DISCONNECTED.value)


async def reset_desktop(db: Database, actor: Actor, desktop_id: int, paths: FarmPaths) -> dict[str, Any]:
    """Discard the desktop's writable layer (``FarmPaths.overlay``) so its next start is a clean image.

    Only a stopped desktop: the overlay of a running one is in use (409 ``desktop_running``, stop it first).
    The storage root is shared by all nodes (ARCHITECTURE.md §5), so the API removes it directly.
    """
    require(actor, "desktop.reset")
    row = await _row(db, actor, desktop_id)
    if row["state"] not in DESKTOP_AT_REST or row["cmd"] is not None:
        raise Conflict("the desktop is running or busy: stop it before resetting it", code="desktop_running")
    await _discard_layer(paths, desktop_id)
    return await _changed(db, actor, desktop_id, reset=True)


async def _discard_layer(paths: FarmPaths, desktop_id: int) -> None:
    """Remove a desktop's writable layer from the storage root (``FarmPaths.overlay``), whatever it holds."""
    await asyncio.to_thread(shutil.rmtree, paths.overlay(desktop_id), True)


async def request_start(
    db: Database, desktop_id: int, *, allow_running: bool = False, owner: int | None = None
) -> int | None:
    """Place the desktop and write the start command in one transaction; return the node id.

    With ``allow_running`` (the broker), a desktop already starting or running is fine and returns its node.
    With ``owner`` (a head start: ``sessions.head_start``), only that user's desktop, at rest, unblocked and with
    no command, is started; otherwise nothing is written and None returned.
    """
    async with db.write() as conn:
        desk = await load_desktop(conn, desktop_id)
        if owner is not None and (
            desk.user_id != owner or desk.blocked or desk.cmd is not None or desk.state not in DESKTOP_AT_REST
        ):
            return None
        if desk.blocked:
            raise PermissionDenied(  # 403 as in the broker (QVD: "offline for maintenance"): one code, one status
                "the desktop is blocked (offline for maintenance): ask your administrator", code="desktop_blocked"
            )
        if desk.cmd == DesktopCommand.START or (
            allow_running and desk.state in (DesktopState.STARTING, DesktopState.RUNNING) and desk.cmd is None
        ):
            return desk.node_id
        if desk.cmd == DesktopCommand.STOP:
            raise Conflict("the desktop is being stopped: try again in a few seconds", code="desktop_busy")
        check_command(DesktopCommand.START, DesktopState(desk.state))
        ranked = await rank_desktop(conn, desktop_id)
        warm = await take_warm(conn, desk, ranked)
        values: dict[str, Any] = {}
        if warm is not None:  # the node takes the guest over for the desktop (node/daemon.py)
            node_id: int = warm.node_id
            values = {"guest": warm.name, "agent_token": warm.agent_token}
            PLACEMENT_DECISIONS.labels("warm").inc()
        else:
            try:
                node_id = best_node(ranked)
            except Unavailable:
                PLACEMENT_DECISIONS.labels("no_node").inc()
                raise
            PLACEMENT_DECISIONS.labels("placed").inc()
        if not await command_desktop(conn, desktop_id, DesktopCommand.START, values={"node_id": node_id, **values}):
            raise Conflict("the desktop changed while starting it: retry", code="desktop_busy")
    await db.bus.notify(node_channel(node_id), str(desktop_id))
    await db.bus.notify(DESKTOPS, str(desktop_id))
    return node_id


async def request_stop(
    db: Database, desktop_id: int, *, reason: str | None = None, keep_if: Callable[[Desktop], bool] | None = None
) -> None:
    """Write the stop command; a stop already asked for is a success (a repeat, declared here).

    ``reason`` says why an automatic stop happens (a session policy): it stays the desktop's ``failure_reason``
    once stopped, until its next start.  ``keep_if`` leaves the desktop as it is when true of it, read in the
    same transaction (a head start withdrawn unless someone connected since: ``sessions.withdraw_head_start``).
    """
    async with db.begin() as conn:
        desk = await load_desktop(conn, desktop_id)
        if desk.cmd == DesktopCommand.STOP or (keep_if is not None and keep_if(desk)):
            return
        # not claimed yet: withdraw the start instead of racing the node
        if desk.cmd == DesktopCommand.START and await withdraw_starts(conn, d.c.id == desktop_id):
            await db.bus.notify(DESKTOPS, str(desktop_id))
            return
        check_command(DesktopCommand.STOP, DesktopState(desk.state))
        values = {"failure_reason": reason[:2000]} if reason else None
        if not await command_desktops(conn, DesktopCommand.STOP, d.c.id == desktop_id, values=values):
            raise Conflict("the desktop changed while stopping it: retry", code="desktop_busy")
    if desk.node_id is not None:
        await db.bus.notify(node_channel(desk.node_id), str(desktop_id))
    await db.bus.notify(DESKTOPS, str(desktop_id))


async def start_desktop(db: Database, actor: Actor, desktop_id: int) -> dict[str, Any]:
    require(actor, "desktop.start")
    await _row(db, actor, desktop_id)
    await request_start(db, desktop_id)
    return await get_desktop(db, actor, desktop_id)


async def stop_desktop(db: Database, actor: Actor, desktop_id: int) -> dict[str, Any]:
    require(actor, "desktop.stop")
    await _row(db, actor, desktop_id)
    await request_stop(db, desktop_id)
    return await get_desktop(db, actor, desktop_id)


async def notify_desktops(db: Database, desktop_ids: Iterable[int]) -> None:
    """One ``DESKTOPS`` notification for many desktops: a comma-separated id list, chunked under PG's limit."""
    chunk: list[str] = []
    for desktop_id in desktop_ids:
        chunk.append(str(desktop_id))
        if len(chunk) >= 500:
            await db.bus.notify(DESKTOPS, ",".join(chunk))
            chunk = []
    if chunk:
        await db.bus.notify(DESKTOPS, ",".join(chunk))


def new_agent_token() -> str:
    return secrets.token_hex(24)
