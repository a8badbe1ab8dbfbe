"""Tenant networks: the segments desktops live on besides the farm's default network (``network.range``).

Why: with one farm-wide range every tenant's desktops share one address space and one segment.  A tenant
administrator makes ``private`` networks in their own tenant; the farm's administrators (all tenants) make
private networks for a named tenant, or ``shared`` networks (no tenant) that they grant to tenants.  An OSF
names the network its desktops are made on, a desktop the network its address is in; NULL stays the default
network, as before networks existed.

The rules (docs/networking.md, "Tenant networks"):

* ranges are checked by ``model/network.py`` (422 ``bad_network_range``); they may not overlap (409
  ``network_overlap``) between private networks of one tenant, nor between shared networks and the default
  range — private networks of different tenants may, which is the point of them;
* a confined administrator sees their tenant's private networks and the shared networks granted to it; any
  other is 404 ``network_not_found``, like one that does not exist; only the farm's administrators change shared
  networks or grants (403 ``supertenant_only``);
* a network in use (by OSFs or desktops, or a grant by that tenant's) is not deleted or revoked (409
  ``network_in_use``).

A desktop on a network has an address there (``network_ip``, what its guest sees), unique in that network, besides
its farm address (``ip``, unique in the farm: how nodes and brokers reach it; the node maps one to the other).
``next_network_address`` picks the lowest free one; the unique index (network, network_ip) catches two creators
racing for the same address, and the caller tries again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import utcnow
from deckard.model.errors import BadInput, Conflict, NotFound
from deckard.model.network import (
    FARM_KINDS,
    NETWORK_KINDS,
    first_free_ip,
    network_gateway,
    overlapping,
    validate_flat,
    validate_range,
)
from deckard.services.context import Actor, require, require_fields, require_supertenant
from deckard.services.events import publish
from deckard.services.listing import ListQuery, run_list
from deckard.services.roles import SUPERTENANT_ID  # shared networks' events go to the farm's administrators only
from deckard.services.rows import as_dict, unique_or_conflict
from deckard.services.tenant_lookup import find_tenant, resolve_tenant_for_create

n = t.networks
g = t.network_grants
DEFAULT_NETWORK = "the farm's default network"
MOVE_HINT = (
    "`deckard desktop update NAME --network OTHER` (stopped desktops), `deckard osf update NAME --network OTHER`"
)

COLUMNS: dict[str, sa.ColumnElement[Any]] = {
    "id": n.c.id,
    "tenant_id": n.c.tenant_id,
    "tenant": t.tenants.c.name,
    "name": n.c.name,
    "kind": n.c.kind,
    "range": n.c.range,
    "gateway": n.c.gateway,
    "interface": n.c.interface,
    "vlan": n.c.vlan,
    "description": n.c.description,
    "created_at": n.c.created_at,
}


def usable_by(tenant_id: int) -> sa.ColumnElement[bool]:
    """The networks a tenant's OSFs and desktops may be on: its private ones and the shared ones granted to it."""
    granted = sa.select(g.c.network_id).where(g.c.tenant_id == tenant_id)
    return sa.or_(n.c.tenant_id == tenant_id, n.c.id.in_(granted))


def visible_networks(actor: Actor) -> sa.ColumnElement[bool]:
    return sa.true() if actor.all_tenants else usable_by(int(actor.tenant_id or 0))


def check_name(name: str) -> str:
    # '@' is kept for name@tenant, the way OSFs are named across tenants
    if not name or len(name) > 64 or any(c.isspace() or c in "/@" for c in name) or name.isdigit():
        raise BadInput(
            f"invalid network name {name!r}: 1-64 characters, not only digits, no spaces, '/' or '@'", code="bad_name"
        )
    return name


def _select() -> sa.Select[Any]:
    return sa.select(*(c.label(k) for k, c in COLUMNS.items())).outerjoin(t.tenants, t.tenants.c.id == n.c.tenant_id)


def _by_ref(ref: str | int) -> sa.ColumnElement[bool]:
    name, _, tenant = str(ref).partition("@")
    if str(ref).isdigit():
        return n.c.id == int(ref)
    if tenant:
        return sa.and_(n.c.name == name, t.tenants.c.name == tenant)
    return n.c.name == name


async def find_network(conn: AsyncConnection, actor: Actor, ref: str | int) -> dict[str, Any]:
    """A network by id, name or ``name@tenant`` among those the actor may see (a tenant's own before a shared one
    of the same name), else 404 ``network_not_found``."""
    q = _select().where(_by_ref(ref), visible_networks(actor)).order_by(n.c.tenant_id.is_(None), n.c.id)
    row = (await conn.execute(q)).first()
    if not row:
        raise NotFound(f"no network {ref!r}: `deckard network list` shows them", code="network_not_found")
    return as_dict(row)


async def _grants(conn: AsyncConnection, actor: Actor, ids: list[int]) -> dict[int, list[str]]:
    """The tenants each shared network is granted to; a confined actor learns only about its own tenant."""
    q = sa.select(g.c.network_id, t.tenants.c.name).join(t.tenants, t.tenants.c.id == g.c.tenant_id)
    q = q.where(g.c.network_id.in_(ids)).order_by(t.tenants.c.name)
    if not actor.all_tenants:
        q = q.where(g.c.tenant_id == actor.tenant_id)
    out: dict[int, list[str]] = {}
    for row in await conn.execute(q):
        out.setdefault(int(row.network_id), []).append(str(row.name))
    return out


async def _described(conn: AsyncConnection, actor: Actor, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with their grants (not a column, so not among the fields a list may pick)."""
    grants = await _grants(conn, actor, [int(r["id"]) for r in rows])
    for row in rows:
        row["tenants"] = grants.get(int(row["id"]), [])
    return rows


async def list_networks(db: Database, actor: Actor, q: ListQuery | None = None) -> tuple[list[dict[str, Any]], int]:
    require(actor, "network.see")
    q = q or ListQuery()
    require_fields(actor, "network", q.named_fields)
    if q.fields and "id" not in q.fields:
        q = dataclasses.replace(q, fields=[*q.fields, "id"])  # answers always carry the id
    async with db.connect() as conn:
        rows, total = await run_list(conn, _select().where(visible_networks(actor)), q, COLUMNS, n.c.id)
        return (rows if q.fields else await _described(conn, actor, rows)), total


async def get_network(db: Database, actor: Actor, ref: str | int) -> dict[str, Any]:
    require(actor, "network.see")
    async with db.connect() as conn:
        return (await _described(conn, actor, [await find_network(conn, actor, ref)]))[0]


async def _others(conn: AsyncConnection, tenant_id: int | None, default_range: str) -> dict[str, str]:
    """The ranges a new network may not overlap: its tenant's private networks, or the shared and flat networks;
    and the default range.  The row locked first makes two concurrent creates of one tenant (or two shared ones) wait
    for each other on PostgreSQL, so both cannot pass this check (SQLite writes one at a time anyway)."""
    lock = tenant_id if tenant_id is not None else SUPERTENANT_ID
    await conn.execute(sa.select(t.tenants.c.id).where(t.tenants.c.id == lock).with_for_update())
    same = n.c.tenant_id.is_(None) if tenant_id is None else n.c.tenant_id == tenant_id
    rows = await conn.execute(sa.select(n.c.name, n.c.range).where(same))
    # the farm's range too, for a tenant's network as well: inside the network's namespace on a node, the farm
    # gateway (its route out, the resolver) and the broker's addresses must not be the network's own
    return {**{str(r.name): str(r.range) for r in rows}, DEFAULT_NETWORK: default_range}


async def _check_overlap(conn: AsyncConnection, name: str, rng: str, tenant_id: int | None, default: str) -> None:
    others = await _others(conn, tenant_id, default)
    if name in others:
        raise Conflict(f"a network named {name!r} already exists here", code="duplicate")
    clash = overlapping(rng, others)
    if clash is not None:
        where = clash if clash == DEFAULT_NETWORK else f"network {clash!r} ({others[clash]})"
        raise Conflict(
            f"range {rng} overlaps {where}: choose a range apart from it",
            code="network_overlap",
            details={"network": clash, "range": others[clash]},
        )


async def create_network(
    db: Database,
    actor: Actor,
    name: str,
    *,
    range: str,  # the API's and the table's name for it
    default_range: str,
    kind: str = "private",
    tenant: str | int | None = None,
    description: str = "",
    interface: str | None = None,
    vlan: int | None = None,
    gateway: str | None = None,
) -> dict[str, Any]:
    """A private network in the actor's tenant (or, for the farm's administrators, the named one), or a shared
    network (farm's administrators only, no tenant) to grant to tenants afterwards, or a flat one: a network of
    the machines' own on a node ``interface`` (tagged ``vlan``), whose desktops use its router ``gateway``."""
    require(actor, "network.create")
    check_name(name)
    rng = validate_range(range)
    if kind not in NETWORK_KINDS:
        raise BadInput(f"unknown network kind {kind!r}: private, shared or flat", code="bad_network_kind")
    flat: dict[str, Any] = {}
    if kind == "flat":
        if interface is None:
            raise BadInput("a flat network needs the node interface it is on (--interface)", code="bad_flat_network")
        flat = dict(zip(("interface", "vlan", "gateway"), validate_flat(rng, interface, vlan, gateway), strict=True))
    elif interface is not None or vlan is not None or gateway is not None:
        raise BadInput("interface, VLAN and gateway are for flat networks only", code="bad_flat_network")
    if kind in FARM_KINDS:
        require_supertenant(actor, f"make {kind} networks")
        if tenant is not None:
            raise BadInput(f"a {kind} network has no tenant: grant it to tenants instead", code="bad_network_kind")
    with unique_or_conflict(f"a network named {name!r} already exists here"):
        async with db.begin() as conn:
            tenant_id = None if kind in FARM_KINDS else await resolve_tenant_for_create(conn, actor, tenant)
            await _check_overlap(conn, name, rng, tenant_id, default_range)
            values = dict(tenant_id=tenant_id, name=name, kind=kind, range=rng, description=description, **flat)
            res = await conn.execute(sa.insert(n).values(created_at=utcnow(), **values).returning(n.c.id))
            network_id = int(res.scalar_one())
    await publish(db, "created", "network", network_id, _event_tenant(tenant_id), name=name, range=rng)
    return await get_network(db, actor, network_id)


def _event_tenant(tenant_id: int | None) -> int:
    return SUPERTENANT_ID if tenant_id is None else tenant_id


async def _find_to_change(conn: AsyncConnection, actor: Actor, ref: str | int, what: str) -> dict[str, Any]:
    """The network, if the actor may change it: a tenant administrator sees shared networks but never changes them."""
    row = await find_network(conn, actor, ref)
    if row["tenant_id"] is None:
        require_supertenant(actor, what)
    return row


async def update_network(db: Database, actor: Actor, ref: str | int, changes: Mapping[str, Any]) -> dict[str, Any]:
    """Describe a network (its name, kind and range stay: desktops have addresses in it)."""
    require(actor, "network.update")
    unknown = set(changes) - {"description"}
    if unknown:
        raise BadInput(f"cannot change {', '.join(sorted(unknown))} of a network", code="bad_field")
    async with db.begin() as conn:
        row = await _find_to_change(conn, actor, ref, "change shared networks")
        if changes.get("description") is not None:
            await conn.execute(sa.update(n).where(n.c.id == row["id"]).values(description=changes["description"]))
    await publish(db, "updated", "network", row["id"], _event_tenant(row["tenant_id"]), changes=sorted(changes))
    return await get_network(db, actor, row["id"])


async def _users(conn: AsyncConnection, network_id: int, tenant_id: int | None = None) -> dict[str, list[str]]:
    """The OSFs and desktops on a network (of one tenant, if given), by name."""
    out: dict[str, list[str]] = {}
    for noun, table in (("desktops", t.desktops), ("osfs", t.osfs)):
        q = sa.select(table.c.name).where(table.c.network_id == network_id).order_by(table.c.name)
        if tenant_id is not None:
            q = q.where(table.c.tenant_id == tenant_id)
        out[noun] = [str(r.name) for r in await conn.execute(q)]
    return out


def _in_use(network: str, users: dict[str, list[str]], what: str) -> Conflict:
    desktops, osfs = users["desktops"], users["osfs"]

    def some(names: list[str]) -> str:
        return ", ".join(names[:5]) + (" …" if len(names) > 5 else "")

    parts = [f"{len(desktops)} desktop(s) ({some(desktops)})"] if desktops else []
    parts += [f"{len(osfs)} OSF(s) ({some(osfs)})"] if osfs else []
    return Conflict(
        f"cannot {what}: network {network!r} is used by {' and '.join(parts)}; move them to another network first "
        f"({MOVE_HINT})",
        code="network_in_use",
        details={"desktops": len(desktops), "osfs": len(osfs), "desktop_names": desktops[:20], "osf_names": osfs[:20]},
    )


async def delete_network(db: Database, actor: Actor, ref: str | int) -> None:
    require(actor, "network.delete")
    with unique_or_conflict("the network came into use while deleting it: try again", code="network_in_use"):
        async with db.begin() as conn:
            row = await _find_to_change(conn, actor, ref, "delete shared networks")
            users = await _users(conn, row["id"])
            if users["desktops"] or users["osfs"]:
                raise _in_use(row["name"], users, "delete it")
            await conn.execute(sa.delete(n).where(n.c.id == row["id"]))
    await publish(db, "deleted", "network", row["id"], _event_tenant(row["tenant_id"]), name=row["name"])


async def _shared(conn: AsyncConnection, actor: Actor, ref: str | int) -> dict[str, Any]:
    row = await find_network(conn, actor, ref)
    require_supertenant(actor, "grant networks to tenants")
    if row["kind"] not in FARM_KINDS:
        raise Conflict(
            f"network {row['name']!r} is private to one tenant: only shared and flat networks are granted",
            code="network_not_shared",
        )
    return row


async def grant_network(db: Database, actor: Actor, ref: str | int, tenant: str | int) -> dict[str, Any]:
    """Let a tenant's OSFs and desktops use a shared network (granting it twice changes nothing)."""
    require(actor, "network.update")
    async with db.begin() as conn:
        row = await _shared(conn, actor, ref)
        tenant_row = await find_tenant(conn, actor, tenant)
        granted = sa.select(g).where(g.c.network_id == row["id"], g.c.tenant_id == tenant_row["id"])
        if (await conn.execute(granted)).first() is None:
            await conn.execute(sa.insert(g).values(network_id=row["id"], tenant_id=tenant_row["id"]))
    await publish(db, "updated", "network", row["id"], int(tenant_row["id"]), granted=tenant_row["name"])
    return await get_network(db, actor, row["id"])


async def revoke_network(db: Database, actor: Actor, ref: str | int, tenant: str | int) -> dict[str, Any]:
    """Take a shared network back from a tenant; refused while that tenant's OSFs or desktops are on it."""
    require(actor, "network.update")
    async with db.begin() as conn:
        row = await _shared(conn, actor, ref)
        tenant_row = await find_tenant(conn, actor, tenant)
        # the grant goes first: on PostgreSQL that waits for creators holding it (resolve_network), so the check
        # below sees their OSFs and desktops, and a refusal rolls the grant back
        res = await conn.execute(sa.delete(g).where(g.c.network_id == row["id"], g.c.tenant_id == tenant_row["id"]))
        if res.rowcount == 0:
            raise NotFound(
                f"network {row['name']!r} is not granted to tenant {tenant_row['name']!r}", code="grant_not_found"
            )
        users = await _users(conn, row["id"], int(tenant_row["id"]))
        if users["desktops"] or users["osfs"]:
            raise _in_use(row["name"], users, f"revoke it from tenant {tenant_row['name']!r}")
    await publish(db, "updated", "network", row["id"], int(tenant_row["id"]), revoked=tenant_row["name"])
    return await get_network(db, actor, row["id"])


# ---- what OSFs and desktops use: which network a tenant named, and the next free address in it ------------


async def resolve_network(conn: AsyncConnection, tenant_id: int, ref: str | int | None) -> int | None:
    """The network ``ref`` (id or name) names for a tenant's OSF or desktop; None or "" is the default network.
    A network the tenant may not use is 404 ``network_not_found``, like one that does not exist."""
    if ref is None or ref == "":
        return None
    cond = n.c.id == int(ref) if str(ref).isdigit() else n.c.name == str(ref)
    q = sa.select(n.c.id, n.c.tenant_id).where(cond, usable_by(tenant_id)).order_by(n.c.tenant_id.is_(None), n.c.id)
    row = (await conn.execute(q)).first()
    if not row:
        raise NotFound(
            f"no network {ref!r} for this tenant: its own networks and the shared ones granted to it are usable",
            code="network_not_found",
        )
    if row.tenant_id is None:  # hold the grant until the caller commits: a revoke waits (revoke_network)
        held = sa.select(g.c.network_id).where(g.c.network_id == row.id, g.c.tenant_id == tenant_id)
        await conn.execute(held.with_for_update(read=True))
    return int(row.id)


async def next_network_address(conn: AsyncConnection, network_id: int) -> str:
    """The lowest free desktop address in a tenant network (its first hosts are kept, as on the default network)."""
    row = (await conn.execute(sa.select(n.c.range, n.c.gateway).where(n.c.id == network_id))).one()
    d = t.desktops
    used = await conn.execute(sa.select(d.c.network_ip).where(d.c.network_id == network_id))
    return first_free_ip(
        str(row.range), network_gateway(str(row.range), row.gateway), [str(r.network_ip) for r in used]
    )
