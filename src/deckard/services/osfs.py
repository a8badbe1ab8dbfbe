"""OSFs (QVD's operating system flavours): what a desktop is made of apart from its image — memory, CPUs,
driver and whether its writable layer survives a restart.

Desktops and disk images hang off an OSF, so an OSF is deleted only when nothing uses it (409
``has_dependents``, QVD's 7120); a tenant-confined administrator sees only its tenant's OSFs and gets 404 for
another tenant's, so it never learns they exist.

An OSF names the network its new desktops are made on (``network``: a network of its tenant or a shared one
granted to it, ``services/networks.py``); none is the farm's default network.  Changing it moves no desktop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import utcnow
from deckard.model.errors import BadInput, Conflict, NotFound
from deckard.services.context import Actor, require, require_fields
from deckard.services.events import publish
from deckard.services.listing import ListQuery, run_list
from deckard.services.networks import resolve_network
from deckard.services.rows import as_dict, unique_or_conflict
from deckard.services.tenancy import DEFAULT_TENANT, tenant_id_by_name
from deckard.services.tenant_lookup import find_osf_id as find_osf_id  # services/images.py finds OSFs here too
from deckard.services.users import tenant_filter

o = t.osfs
DRIVERS = ("container", "vm", "fake")
MIN_VM_MEMORY_MIB = 256
UPDATABLE = ("name", "memory_mib", "cpus", "keep_overlay", "driver", "description", "network")

COLUMNS: dict[str, sa.ColumnElement[Any]] = {c.key: c for c in o.c} | {"network": t.networks.c.name}


def _select() -> sa.Select[Any]:
    """OSFs with the name of their network (null: the default network)."""
    return sa.select(o, t.networks.c.name.label("network")).outerjoin(t.networks, t.networks.c.id == o.c.network_id)


def check_osf_fields(values: Mapping[str, Any]) -> None:
    """Bad values are refused with a clear code before anything changes."""
    name = values.get("name")
    if name is not None and (not name or len(name) > 64 or any(c.isspace() or c == "/" for c in name)):
        raise BadInput(f"invalid OSF name {name!r}: 1-64 characters, no spaces or '/'", code="bad_name")
    if values.get("memory_mib") is not None and not 64 <= int(values["memory_mib"]) <= 1 << 20:
        raise BadInput("memory_mib must be between 64 and 1048576", code="bad_memory")
    if values.get("cpus") is not None and not 0.1 <= float(values["cpus"]) <= 256:
        raise BadInput("cpus must be between 0.1 and 256", code="bad_cpus")
    if values.get("driver") is not None and values["driver"] not in DRIVERS:
        raise BadInput(f"unknown driver {values['driver']!r}; use one of {', '.join(DRIVERS)}", code="bad_driver")
    if values.get("driver") == "vm" and values.get("memory_mib") is not None:
        check_vm_memory(int(values["memory_mib"]))


def check_vm_memory(memory_mib: int) -> None:
    """A VM desktop's kernel, initrd and agent need room before any session: below this it cannot boot."""
    if memory_mib < MIN_VM_MEMORY_MIB:
        raise BadInput(
            f"a VM desktop needs at least {MIN_VM_MEMORY_MIB} MiB of memory, not {memory_mib}", code="bad_memory"
        )


async def _tenant_for_create(conn: AsyncConnection, actor: Actor, tenant: str | None) -> int:
    if actor.tenant_id is not None:
        if tenant is not None and await tenant_id_by_name(conn, tenant) != actor.tenant_id:
            raise NotFound(f"no tenant {tenant!r}", code="tenant_not_found")
        return actor.tenant_id
    return await tenant_id_by_name(conn, tenant or DEFAULT_TENANT)


async def list_osfs(db: Database, actor: Actor, q: ListQuery | None = None) -> tuple[list[dict[str, Any]], int]:
    require(actor, "osf.see")
    q = q or ListQuery()
    require_fields(actor, "osf", q.named_fields)
    async with db.connect() as conn:
        return await run_list(conn, _select().where(tenant_filter(actor, o.c.tenant_id)), q, COLUMNS, o.c.id)


async def get_osf(db: Database, actor: Actor, ref: str | int) -> dict[str, Any]:
    require(actor, "osf.see")
    async with db.connect() as conn:
        osf_id = await find_osf_id(conn, actor, ref)
        return as_dict((await conn.execute(_select().where(o.c.id == osf_id))).one())


async def create_osf(
    db: Database,
    actor: Actor,
    name: str,
    *,
    memory_mib: int = 1024,
    cpus: float = 1.0,
    keep_overlay: bool = False,
    driver: str = "container",
    description: str = "",
    tenant: str | None = None,
    network: str | int | None = None,
) -> dict[str, Any]:
    """An OSF; ``network`` (id or name; none or "": the default network) is where its desktops are made."""
    require(actor, "osf.create")
    values: dict[str, Any] = dict(
        name=name, memory_mib=memory_mib, cpus=cpus, keep_overlay=keep_overlay, driver=driver, description=description
    )
    check_osf_fields(values)
    with unique_or_conflict(f"an OSF named {name!r} already exists in this tenant"):
        async with db.begin() as conn:
            tenant_id = await _tenant_for_create(conn, actor, tenant)
            values["network_id"] = await resolve_network(conn, tenant_id, network)
            res = await conn.execute(
                sa.insert(o).values(tenant_id=tenant_id, created_at=utcnow(), **values).returning(o.c.id)
            )
            osf_id = int(res.scalar_one())
    await publish(db, "created", "osf", osf_id, tenant_id, name=name)
    return await get_osf(db, actor, osf_id)


async def update_osf(db: Database, actor: Actor, ref: str | int, changes: Mapping[str, Any]) -> dict[str, Any]:
    require(actor, "osf.update")
    unknown = set(changes) - set(UPDATABLE)
    if unknown:
        raise BadInput(f"cannot change {', '.join(sorted(unknown))} of an OSF", code="bad_field")
    values = {k: v for k, v in changes.items() if v is not None and k != "network"}
    check_osf_fields(values)
    with unique_or_conflict(f"an OSF named {values.get('name')!r} already exists in this tenant"):
        async with db.begin() as conn:
            osf_id = await find_osf_id(conn, actor, ref)
            row = (await conn.execute(sa.select(o.c.driver, o.c.memory_mib).where(o.c.id == osf_id))).one()
            if values.get("driver", row.driver) == "vm":  # the change may be one half: the memory or the driver
                check_vm_memory(int(values.get("memory_mib", row.memory_mib)))
            tenant_id = (await conn.execute(sa.select(o.c.tenant_id).where(o.c.id == osf_id))).scalar_one()
            if "network" in changes:  # null or "": back to the default network
                values["network_id"] = await resolve_network(conn, int(tenant_id), changes["network"])
            if values:
                await conn.execute(sa.update(o).where(o.c.id == osf_id).values(**values))
    await publish(db, "updated", "osf", osf_id, int(tenant_id), changes=sorted(values))
    return await get_osf(db, actor, osf_id)


async def delete_osf(db: Database, actor: Actor, ref: str | int) -> None:
    require(actor, "osf.delete")
    async with db.begin() as conn:
        osf_id = await find_osf_id(conn, actor, ref)
        desktops = (await conn.execute(sa.select(sa.func.count()).where(t.desktops.c.osf_id == osf_id))).scalar_one()
        images = (await conn.execute(sa.select(sa.func.count()).where(t.disk_images.c.osf_id == osf_id))).scalar_one()
        if desktops or images:
            raise Conflict(
                f"the OSF is still used by {desktops} desktop(s) and {images} disk image(s): delete them first",
                code="has_dependents",
                details={"desktops": int(desktops), "images": int(images)},
            )
        tenant_id = (await conn.execute(sa.select(o.c.tenant_id).where(o.c.id == osf_id))).scalar_one()
        await conn.execute(sa.delete(o).where(o.c.id == osf_id))
    await publish(db, "deleted", "osf", osf_id, int(tenant_id))
