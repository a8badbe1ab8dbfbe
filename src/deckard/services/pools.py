"""Warm pools (``model/warm_pool.py``, ``docs/pools.md``): the administrators' settings, the nodes' bookkeeping of
their warm guests, and the take-over a start does.

A pool is a setting of an OSF (``osf.see`` to see it, ``osf.update`` to change it), for one of its image tags.
Only OSFs whose desktops a warm guest can become have pools: container desktops, on the farm's default network,
whose writable layer is thrown away at every start (409 ``pool_unsupported`` says which rule an OSF breaks).  A
tenant-confined administrator's pools together keep at most ``pools.tenant_max`` guests: they use the farm's
memory.

Nodes keep the pools filled (``node/pools.py``): every pass each node reads :func:`node_plan`; a pool short of
guests gets one on the node placement picks (warm guests count as load there, like desktops), and a pool with too
many loses its newest ones.  A start (``services/desktops.request_start``) takes a ready guest of the desktop's
pool over in the same transaction that places it (:func:`take_warm`): the guest leaves ``warm_guests`` and the
desktop names it in ``guest``, so a guest serves one desktop once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database, prepared
from deckard.model.entities import Desktop, utcnow
from deckard.model.errors import BadInput, Conflict, DeckardError, NotFound
from deckard.model.network import last_free_ip
from deckard.model.placement import Candidate
from deckard.model.warm_pool import PoolPlan, WarmState, check_pool, excess, wanted_now
from deckard.services.config import GuestSwitches, guest_switches, read_config
from deckard.services.context import Actor, require, require_fields
from deckard.services.events import publish
from deckard.services.images import resolve_image, validate_tag
from deckard.services.listing import ListQuery, run_list
from deckard.services.placement import choose_node
from deckard.services.rows import as_dict, unique_or_conflict
from deckard.services.tenant_lookup import find_osf
from deckard.services.users import tenant_filter

p = t.warm_pools
w = t.warm_guests
o = t.osfs
POOLS = "pools"  # the bus channel nodes listen on: a pool changed or a guest was taken
UPDATABLE = ("size", "hours", "timezone")


def _live(state: str) -> sa.ColumnElement[int]:
    return sa.select(sa.func.count()).where(w.c.pool_id == p.c.id, w.c.state == state).scalar_subquery()


def _select() -> sa.Select[Any]:
    """Pools with their OSF's name and tenant, and how many of their guests are ready and starting now."""
    return sa.select(
        p,
        o.c.name.label("osf"),
        o.c.tenant_id,
        _live(WarmState.READY).label("ready"),
        _live(WarmState.STARTING).label("starting"),
    ).join(o, o.c.id == p.c.osf_id)


COLUMNS: dict[str, sa.ColumnElement[Any]] = {c.key: c for c in p.c} | {"osf": o.c.name, "tenant_id": o.c.tenant_id}


def _shown(row: dict[str, Any], now: dt.datetime | None = None) -> dict[str, Any]:
    """A pool's row with ``wanted``: how many guests it keeps at this moment (its size, or 0 outside its hours)."""
    if {"size", "hours", "timezone"} <= row.keys():
        row["wanted"] = wanted_now(row["size"], row["hours"], row["timezone"], now or utcnow())
    return row


def unsupported(osf: Mapping[str, Any]) -> str | None:
    """Why desktops of this OSF cannot come from a warm guest; None when they can."""
    if osf["driver"] != "container":
        return f"its desktops are {osf['driver']} guests: warm pools are for container desktops"
    if osf["keep_overlay"]:
        return "it keeps its desktops' writable layers: a warm guest's layer cannot become a desktop's"
    if osf["network_id"] is not None:
        return "its desktops are on a tenant network: warm guests are on the farm's default network"
    return None


async def _osf_for_pool(conn: AsyncConnection, osf_id: int) -> None:
    row = (await conn.execute(sa.select(o).where(o.c.id == osf_id))).one()
    why = unsupported(dict(row._mapping))
    if why:
        raise Conflict(f"the OSF {row.name!r} cannot have a warm pool: {why}", code="pool_unsupported")


async def _check_tenant_total(
    conn: AsyncConnection, actor: Actor, tenant_id: int, pool_id: int | None, size: int
) -> None:
    """A confined administrator's pools keep at most ``pools.tenant_max`` guests together."""
    if actor.all_tenants:
        return
    limit = int(await read_config(conn, "pools.tenant_max", tenant_id))
    others = sa.select(sa.func.coalesce(sa.func.sum(p.c.size), 0)).join(o, o.c.id == p.c.osf_id)
    others = others.where(o.c.tenant_id == tenant_id, p.c.id != (pool_id or 0))
    total = int((await conn.execute(others)).scalar_one()) + size
    if total > limit:
        raise Conflict(
            f"the tenant's warm pools would keep {total} guests; pools.tenant_max allows {limit}: ask the farm's "
            "administrators",
            code="pool_limit",
            details={"limit": limit, "total": total},
        )


async def list_pools(db: Database, actor: Actor, q: ListQuery | None = None) -> tuple[list[dict[str, Any]], int]:
    require(actor, "osf.see")
    q = q or ListQuery()
    require_fields(actor, "osf", q.named_fields)
    if q.fields and "id" not in q.fields:
        q = dataclasses.replace(q, fields=[*q.fields, "id"])
    async with db.connect() as conn:
        rows, total = await run_list(conn, _select().where(tenant_filter(actor, o.c.tenant_id)), q, COLUMNS, p.c.id)
    now = utcnow()
    return [_shown(r, now) for r in rows], total


async def find_pool(conn: AsyncConnection, actor: Actor, ref: str | int) -> int:
    """A pool by id among those the actor may see (NotFound ``pool_not_found``)."""
    if not str(ref).isdigit():
        raise NotFound(f"no warm pool {ref!r}: pools are named by id (`deckard pool list`)", code="pool_not_found")
    q = sa.select(p.c.id).join(o, o.c.id == p.c.osf_id).where(p.c.id == int(ref), tenant_filter(actor, o.c.tenant_id))
    if (await conn.execute(q)).first() is None:
        raise NotFound(f"no warm pool {ref!r}: `deckard pool list` shows them", code="pool_not_found")
    return int(ref)


async def get_pool(db: Database, actor: Actor, ref: str | int) -> dict[str, Any]:
    require(actor, "osf.see")
    async with db.connect() as conn:
        pool_id = await find_pool(conn, actor, ref)
        return _shown(as_dict((await conn.execute(_select().where(p.c.id == pool_id))).one()))


async def create_pool(
    db: Database,
    actor: Actor,
    osf: str | int,
    *,
    tag: str = "default",
    size: int,
    hours: str = "",
    timezone: str = "UTC",
) -> dict[str, Any]:
    require(actor, "osf.update")
    validate_tag(tag)
    check_pool(size, hours, timezone)
    with unique_or_conflict(f"the OSF {osf!r} already has a warm pool for the tag {tag!r}: change it instead"):
        async with db.begin() as conn:
            osf_id, tenant_id = await find_osf(conn, actor, osf)
            await _osf_for_pool(conn, osf_id)
            await _check_tenant_total(conn, actor, tenant_id, None, size)
            values = dict(osf_id=osf_id, tag=tag, size=size, hours=hours, timezone=timezone, created_at=utcnow())
            pool_id = int((await conn.execute(sa.insert(p).values(**values).returning(p.c.id))).scalar_one())
    await _changed(db, "created", pool_id, tenant_id, osf=str(osf), tag=tag, size=size)
    return await get_pool(db, actor, pool_id)


async def update_pool(db: Database, actor: Actor, ref: str | int, changes: Mapping[str, Any]) -> dict[str, Any]:
    require(actor, "osf.update")
    unknown = set(changes) - set(UPDATABLE)
    if unknown:
        raise BadInput(f"cannot change {', '.join(sorted(unknown))} of a warm pool", code="bad_field")
    values = {k: v for k, v in changes.items() if v is not None}
    check_pool(values.get("size"), values.get("hours"), values.get("timezone"))
    async with db.begin() as conn:
        pool_id = await find_pool(conn, actor, ref)
        row = (
            await conn.execute(
                sa.select(p.c.size, o.c.tenant_id).join(o, o.c.id == p.c.osf_id).where(p.c.id == pool_id)
            )
        ).one()
        await _check_tenant_total(conn, actor, int(row.tenant_id), pool_id, int(values.get("size", row.size)))
        if values:
            await conn.execute(sa.update(p).where(p.c.id == pool_id).values(**values))
    await _changed(db, "updated", pool_id, int(row.tenant_id), changes=sorted(values))
    return await get_pool(db, actor, pool_id)


async def delete_pool(db: Database, actor: Actor, ref: str | int) -> None:
    """The pool goes; its warm guests are stopped by their nodes (their rows go with it)."""
    require(actor, "osf.update")
    async with db.begin() as conn:
        pool_id = await find_pool(conn, actor, ref)
        tenant_id = (
            await conn.execute(sa.select(o.c.tenant_id).join(p, p.c.osf_id == o.c.id).where(p.c.id == pool_id))
        ).scalar_one()
        await conn.execute(sa.delete(w).where(w.c.pool_id == pool_id))  # SQLite runs without foreign keys' cascade
        await conn.execute(sa.delete(p).where(p.c.id == pool_id))
    await _changed(db, "deleted", pool_id, int(tenant_id))


async def _changed(db: Database, kind: str, pool_id: int, tenant_id: int, **data: Any) -> None:
    await publish(db, kind, "pool", pool_id, tenant_id, **data)
    await db.bus.notify(POOLS, str(pool_id))


# ---- the nodes' side ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """What a node needs to start a warm guest of one pool."""

    pool_id: int
    osf_id: int
    memory_mib: int
    cpus: float
    image_id: int
    image_path: Path
    mounter: bool = False  # its guests may mount QVD clients' shared folders (``config.guest_switches``)
    glx: bool = True  # OpenGL on its guests' displays (``display.glx``)

    @property
    def switches(self) -> GuestSwitches:
        return GuestSwitches(self.mounter, self.glx)


@dataclasses.dataclass(frozen=True)
class WarmGuest:
    id: int
    pool_id: int
    node_id: int
    name: str
    image_id: int
    ip: str
    agent_token: str
    state: str


async def node_plan(db: Database, node_id: int) -> tuple[list[tuple[PoolPlan, PoolSpec | None]], list[WarmGuest]]:
    """Every pool with what it wants now, how many guests it has and which of this node's guests go; with the spec
    of a new guest (None when its OSF can no longer have one or its image is missing); and this node's guests."""
    now = utcnow()
    async with db.connect() as conn:
        pools = (await conn.execute(sa.select(p, o).join(o, o.c.id == p.c.osf_id).order_by(p.c.id))).all()
        guests = (await conn.execute(sa.select(w).order_by(w.c.id))).all()
        plans: list[tuple[PoolPlan, PoolSpec | None]] = []
        for row in pools:
            m = row._mapping
            mine = [g for g in guests if g.pool_id == m[p.c.id]]
            spec: PoolSpec | None = None
            wanted = wanted_now(m[p.c.size], m[p.c.hours], m[p.c.timezone], now)
            stale: set[str] = set()
            if unsupported({k: m[o.c[k]] for k in ("driver", "keep_overlay", "network_id")}) is not None:
                wanted = 0
            else:
                try:
                    image_id, image_path = await resolve_image(conn, m[o.c.id], m[p.c.tag])
                except DeckardError:
                    wanted = 0  # no image for the tag (or a blocked one): nothing to keep warm
                else:
                    switches = await guest_switches(
                        conn, m[o.c.tenant_id], m[o.c.id], driver=m[o.c.driver], keep_overlay=m[o.c.keep_overlay]
                    )
                    spec = PoolSpec(
                        m[p.c.id], m[o.c.id], m[o.c.memory_mib], m[o.c.cpus], image_id, image_path, *switches
                    )
                    stale = {g.name for g in mine if g.image_id != image_id}  # the tag moved to a new image
            current = [(int(g.id), str(g.name), int(g.node_id)) for g in mine if g.name not in stale]
            trim = excess(current, wanted, node_id) + tuple(
                g.name for g in mine if g.name in stale and g.node_id == node_id
            )
            plans.append((PoolPlan(int(m[p.c.id]), wanted, len(current), trim), spec))
        own = [_warm(g) for g in guests if g.node_id == node_id]
    return plans, own


def _warm(row: Any) -> WarmGuest:
    return WarmGuest(
        int(row.id),
        int(row.pool_id),
        int(row.node_id),
        str(row.name),
        int(row.image_id),
        str(row.ip),
        str(row.agent_token),
        str(row.state),
    )


async def add_warm_guest(
    db: Database, spec: PoolSpec, node_id: int, name: str, token: str, network: str
) -> WarmGuest | None:
    """Record a new warm guest of ``spec``'s pool on this node, if placement picks this node for it; None when it
    picks another node (that node adds it) or no node.  Its address is the highest free one of ``network``."""
    for _attempt in range(5):
        try:
            async with db.begin() as conn:
                try:
                    chosen = await choose_node(conn, spec.memory_mib, driver="container")
                except DeckardError:
                    return None
                if chosen != node_id:
                    return None
                used = [r.ip for r in await conn.execute(sa.select(t.desktops.c.ip).union_all(sa.select(w.c.ip)))]
                values = dict(
                    pool_id=spec.pool_id,
                    node_id=node_id,
                    name=name,
                    image_id=spec.image_id,
                    ip=last_free_ip(network, used),
                    agent_token=token,
                    state=WarmState.STARTING,
                    created_at=utcnow(),
                )
                row = (await conn.execute(sa.insert(w).values(**values).returning(w))).one()
                return _warm(row)
        except sa.exc.IntegrityError:
            continue  # another node took the same address at the same moment: the next one
    return None


async def warm_ready(db: Database, guest_id: int) -> bool:
    """The guest's agent answers: users may take it.  False when its row went meanwhile (its pool was deleted)."""
    async with db.begin() as conn:
        res = await conn.execute(sa.update(w).where(w.c.id == guest_id).values(state=WarmState.READY))
    if res.rowcount:
        await db.bus.notify(POOLS, str(guest_id))
    return bool(res.rowcount)


async def drop_warm_guests(db: Database, names: list[str]) -> int:
    """Take guests out of their pools; how many were still there (a start may have taken one meanwhile)."""
    if not names:
        return 0
    async with db.begin() as conn:
        return int((await conn.execute(sa.delete(w).where(w.c.name.in_(names)))).rowcount)


async def drop_node_guests(db: Database, node_id: int) -> list[str]:
    """Every warm guest of a node leaves its pool (the node restarted: it starts them afresh); their names."""
    async with db.begin() as conn:
        names = [str(r.name) for r in await conn.execute(sa.select(w.c.name).where(w.c.node_id == node_id))]
        await conn.execute(sa.delete(w).where(w.c.node_id == node_id))
    return names


async def pool_failed(db: Database, pool_id: int, reason: str) -> None:
    """A warm guest of the pool failed to start: the pool says why (``deckard pool list``)."""
    async with db.begin() as conn:
        await conn.execute(
            sa.update(p).where(p.c.id == pool_id).values(last_error=reason[:2000], last_error_at=utcnow())
        )


async def pool_healthy(db: Database, pool_id: int) -> None:
    async with db.begin() as conn:
        await conn.execute(
            sa.update(p)
            .where(p.c.id == pool_id, p.c.last_error.is_not(None))
            .values(last_error=None, last_error_at=None)
        )


_READY_GUESTS = prepared(  # built once: every start asks (services/config.py says why)
    sa.select(w)
    .join(p, p.c.id == w.c.pool_id)
    .where(p.c.osf_id == sa.bindparam("osf_id"), p.c.tag == sa.bindparam("tag"), w.c.state == WarmState.READY)
    .order_by(w.c.id)
)
_ATTACHED = prepared(sa.select(sa.func.count()).where(t.volume_attachments.c.desktop_id == sa.bindparam("desktop_id")))
_OSF_KIND = prepared(sa.select(o.c.driver, o.c.keep_overlay, o.c.network_id).where(o.c.id == sa.bindparam("osf_id")))
_TAKEN = prepared(sa.delete(w).where(w.c.id == sa.bindparam("guest_id"), w.c.state == WarmState.READY))


async def take_warm(conn: AsyncConnection, desk: Desktop, ranked: list[Candidate]) -> WarmGuest | None:
    """In the start's transaction: a ready warm guest of the desktop's pool on the best-ranked node that has one,
    taken out of the pool for this desktop; None when the desktop cannot take one (its pool is empty or missing,
    it has volumes, or its OSF's desktops cannot come from a warm guest).  Every start asks: a desktop without a
    ready guest of its OSF and tag costs one query."""
    if desk.network_id is not None:
        return None
    guests = (await conn.execute(_READY_GUESTS, {"osf_id": desk.osf_id, "tag": desk.tag})).all()
    if not guests:
        return None
    if int((await conn.execute(_ATTACHED, {"desktop_id": desk.id})).scalar_one()):
        return None  # a container gets its volumes at boot
    osf = (await conn.execute(_OSF_KIND, {"osf_id": desk.osf_id})).one()
    if unsupported(dict(osf._mapping)) is not None:
        return None
    try:
        image_id, _path = await resolve_image(conn, desk.osf_id, desk.tag)
    except DeckardError:
        return None
    ready: dict[int, list[Any]] = {}
    for g in guests:
        if g.image_id == image_id:  # a guest of the tag's previous image is being replaced
            ready.setdefault(int(g.node_id), []).append(g)
    for candidate in ranked:
        if candidate.score is None or candidate.node.node_id not in ready:
            continue
        guest = ready[candidate.node.node_id][0]
        gone = await conn.execute(_TAKEN, {"guest_id": guest.id})
        if gone.rowcount:  # another start took it first otherwise: the next node's
            return _warm(guest)
    return None
