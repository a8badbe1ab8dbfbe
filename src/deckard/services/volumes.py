"""Volumes (``docs/volumes.md``): block disks a tenant makes, grows, snapshots, clones and attaches to desktops.

The bytes live behind ``drivers/volumes.py``'s backend (qcow2 files in the shared storage root); the rows here
say what exists and who has it.  Rules kept here, with stable codes:

* a volume has at most one read-write attachment, and never one beside read-only ones (``volume_in_use``);
* a volume attached anywhere is not deleted (``volume_attached``); one a running desktop writes is not
  snapshotted, resized or cloned (``volume_busy``; QEMU's image lock says the same for what the rows miss);
* a tenant's volumes stay within ``volumes.max_count`` and ``volumes.max_gib`` (``volume_quota_exceeded``);
* a confined administrator sees only its tenant's volumes and attaches them only to its tenant's desktops.

Multi-step creates (a row, then a file) undo what they did when a later step fails (``AsyncExitStack``), so a
failed create leaves neither a row nor a file.

Attaching to or detaching from a desktop that runs is the node's work: the attachment row's ``pending``
(``attach`` | ``detach``) is the command, the node's channel is notified, and the call waits (a bounded time)
for the node's answer on the same row, so ``volume_held`` (the guest has the volume mounted) reaches the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.drivers.volumes import Qcow2Backend, VolumeBackend
from deckard.model.entities import utcnow
from deckard.model.errors import BadInput, Conflict, DeckardError, DriverError, NotFound
from deckard.model.states import DesktopState
from deckard.runtime.paths import FarmPaths
from deckard.services.config import read_config
from deckard.services.context import Actor, require, require_fields
from deckard.services.events import node_channel, publish
from deckard.services.listing import ListQuery, run_list
from deckard.services.rows import as_dict, unique_or_conflict
from deckard.services.tenant_lookup import resolve_tenant_for_create
from deckard.services.users import tenant_filter

v = t.volumes
s = t.volume_snapshots
a = t.volume_attachments
d = t.desktops

MAX_GIB = 64 * 1024
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
LIVE_STATES = (DesktopState.STARTING.value, DesktopState.RUNNING.value)  # a node has (or is making) the guest
NODE_WAIT_S = 60.0  # how long an attach or detach waits for the node's answer before it answers "pending"
POLL_S = 0.2

COLUMNS: dict[str, sa.ColumnElement[Any]] = {c.key: c for c in v.c}


def volume_backend(paths: FarmPaths) -> VolumeBackend:
    """The farm's volume backend: qcow2 files in the storage root (the only one so far)."""
    return Qcow2Backend(paths.storage)


def check_name(name: str, what: str = "volume") -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise BadInput(
            f"invalid {what} name {name!r}: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            code="bad_name",
        )
    return name


def check_size(size_gib: int) -> int:
    if isinstance(size_gib, bool) or not isinstance(size_gib, int) or not 1 <= size_gib <= MAX_GIB:
        raise BadInput(f"size_gib must be a whole number of GiB between 1 and {MAX_GIB}", code="bad_size")
    return size_gib


# ---- reading -----------------------------------------------------------------------------------------------
async def find_volume(conn: AsyncConnection, actor: Actor, ref: str | int) -> dict[str, Any]:
    """The volume by id or name, as the actor may see it (404 ``volume_not_found`` otherwise)."""
    ref_s = str(ref)
    cond = v.c.id == int(ref_s) if ref_s.isdigit() else v.c.name == ref_s
    rows = (await conn.execute(sa.select(v).where(cond, tenant_filter(actor, v.c.tenant_id)).limit(2))).all()
    if len(rows) != 1:  # a name two tenants use is ambiguous to the supertenant: it names the volume by id
        raise NotFound(f"no volume {ref!r}" + (" (several tenants use that name: give the id)" if rows else ""),
                       code="volume_not_found")  # fmt: skip
    return as_dict(rows[0])


async def find_volume_id(db: Database, actor: Actor, ref: str | int) -> int:
    async with db.connect() as conn:
        return int((await find_volume(conn, actor, ref))["id"])


async def _find_desktop(conn: AsyncConnection, actor: Actor, ref: str | int, tenant_id: int) -> dict[str, Any]:
    """A desktop of the volume's tenant (404 ``desktop_not_found`` for any other, so no tenant learns of another's)."""
    ref_s = str(ref)
    cond = d.c.id == int(ref_s) if ref_s.isdigit() else d.c.name == ref_s
    q = (
        sa.select(d.c.id, d.c.name, d.c.state, d.c.node_id, d.c.tenant_id, t.osfs.c.driver)
        .join(t.osfs, t.osfs.c.id == d.c.osf_id)
        .where(cond, d.c.tenant_id == tenant_id, tenant_filter(actor, d.c.tenant_id))
    )
    row = (await conn.execute(q)).first()
    if not row:
        raise NotFound(f"no desktop {ref!r} in the volume's tenant", code="desktop_not_found")
    return as_dict(row._mapping)


async def _attachments(conn: AsyncConnection, volume_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {i: [] for i in volume_ids}
    if not volume_ids:
        return out
    q = (
        sa.select(a, d.c.name.label("desktop"), d.c.state.label("desktop_state"))
        .join(d, d.c.id == a.c.desktop_id)
        .where(a.c.volume_id.in_(volume_ids))
        .order_by(a.c.attached_at, a.c.desktop_id)
    )
    for row in await conn.execute(q):
        r = as_dict(row)
        r["in_guest"] = bool(r.pop("plugged")) and r.pop("desktop_state") == DesktopState.RUNNING
        out[int(r.pop("volume_id"))].append(r)
    return out


async def _answer(conn: AsyncConnection, volume_id: int) -> dict[str, Any]:
    row = as_dict((await conn.execute(sa.select(v).where(v.c.id == volume_id))).one())
    row["attachments"] = (await _attachments(conn, [volume_id]))[volume_id]
    return row


async def list_volumes(db: Database, actor: Actor, q: ListQuery | None = None) -> tuple[list[dict[str, Any]], int]:
    require(actor, "volume.see")
    q = q or ListQuery(per_page=10**9)
    require_fields(actor, "volume", q.named_fields)
    if q.fields and "id" not in q.fields:
        q = dataclasses.replace(q, fields=[*q.fields, "id"])
    async with db.connect() as conn:
        rows, total = await run_list(conn, sa.select(v).where(tenant_filter(actor, v.c.tenant_id)), q, COLUMNS, v.c.id)
        if not q.fields or "attachments" in q.fields:
            found = await _attachments(conn, [int(r["id"]) for r in rows])
            for r in rows:
                r["attachments"] = found[int(r["id"])]
    return rows, total


async def get_volume(db: Database, actor: Actor, ref: str | int) -> dict[str, Any]:
    require(actor, "volume.see")
    async with db.connect() as conn:
        return await _answer(conn, int((await find_volume(conn, actor, ref))["id"]))


# ---- create, clone, resize, delete ---------------------------------------------------------------------------
async def _check_quota(conn: AsyncConnection, tenant_id: int, add_gib: int, *, new_volume: bool) -> None:
    count, used = (
        await conn.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(v.c.size_gib), 0)).where(v.c.tenant_id == tenant_id)
        )
    ).one()
    max_count = int(await read_config(conn, "volumes.max_count", tenant_id))
    max_gib = int(await read_config(conn, "volumes.max_gib", tenant_id))
    if new_volume and count + 1 > max_count:
        raise Conflict(
            f"the tenant has {count} volume(s) and may have {max_count} (volumes.max_count): delete one or ask for a "
            "higher quota",
            code="volume_quota_exceeded",
            details={"key": "volumes.max_count", "limit": max_count, "used": int(count)},
        )
    if used + add_gib > max_gib:
        raise Conflict(
            f"the tenant's volumes would take {used + add_gib} GiB and may take {max_gib} GiB (volumes.max_gib): "
            "delete or shrink a volume's snapshots' source, or ask for a higher quota",
            code="volume_quota_exceeded",
            details={"key": "volumes.max_gib", "limit": max_gib, "used": int(used), "asked": add_gib},
        )


async def _insert(
    db: Database, actor: Actor, name: str, size_gib: int, description: str, tenant: str | int | None
) -> tuple[int, int]:
    with unique_or_conflict(f"a volume named {name!r} already exists in this tenant"):
        async with db.begin() as conn:
            tenant_id = await resolve_tenant_for_create(conn, actor, tenant)
            await _check_quota(conn, tenant_id, size_gib, new_volume=True)
            res = await conn.execute(
                sa.insert(v)
                .values(
                    tenant_id=tenant_id,
                    name=name,
                    size_gib=size_gib,
                    state="creating",
                    description=description,
                    created_at=utcnow(),
                )
                .returning(v.c.id)
            )
            return int(res.scalar_one()), tenant_id


async def _forget(db: Database, volume_id: int) -> None:
    async with db.begin() as conn:
        await conn.execute(sa.delete(v).where(v.c.id == volume_id))


async def create_volume(
    db: Database,
    actor: Actor,
    backend: VolumeBackend,
    name: str,
    *,
    size_gib: int | None = None,
    description: str = "",
    tenant: str | int | None = None,
    from_snapshot: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An empty volume of ``size_gib``, or with ``from_snapshot`` (``{"volume", "snapshot"}``) a clone of a snapshot
    in the source volume's tenant.  Either the row and its file both exist afterwards, or neither does."""
    require(actor, "volume.create")
    check_name(name)
    source: dict[str, Any] | None = None
    if from_snapshot is not None:
        source = await _find_snapshot(
            db, actor, from_snapshot.get("volume", ""), str(from_snapshot.get("snapshot", ""))
        )
        tenant = source["tenant_id"]
        if size_gib is not None and size_gib < source["size_gib"]:
            raise BadInput(f"a clone has at least the snapshot's {source['size_gib']} GiB", code="bad_size")
        size_gib = max(size_gib or 0, int(source["size_gib"]))
    elif size_gib is None:
        raise BadInput("give size_gib (a new volume) or from_snapshot (a clone)", code="bad_size")
    check_size(size_gib)
    async with contextlib.AsyncExitStack() as undo:
        volume_id, tenant_id = await _insert(db, actor, name, size_gib, description, tenant)
        undo.push_async_callback(_forget, db, volume_id)
        if source is None:
            await backend.create(tenant_id, volume_id, size_gib)
        else:
            await _refuse_if_written(db, int(source["volume_id"]), "cloned")
            made = await backend.clone(
                int(source["tenant_id"]), int(source["volume_id"]), source["name"], tenant_id, volume_id
            )
            undo.push_async_callback(backend.delete, tenant_id, volume_id)
            if made < size_gib:
                await backend.resize(tenant_id, volume_id, size_gib)
        async with db.begin() as conn:
            await conn.execute(sa.update(v).where(v.c.id == volume_id).values(state="ready"))
        undo.pop_all()
    extra = {"from_volume": source["volume_id"], "snapshot": source["name"]} if source else {}
    await publish(db, "created", "volume", volume_id, tenant_id, name=name, size_gib=size_gib, **extra)
    return await get_volume(db, actor, volume_id)


async def _live_attachments(conn: AsyncConnection, volume_id: int) -> list[dict[str, Any]]:
    """Attachments to desktops a node is starting or running (their guest may have the volume open)."""
    q = (
        sa.select(a.c.desktop_id, a.c.read_only, d.c.name)
        .join(d, d.c.id == a.c.desktop_id)
        .where(a.c.volume_id == volume_id, d.c.state.in_(LIVE_STATES))
    )
    return [as_dict(r._mapping) for r in await conn.execute(q)]


async def _refuse_if_written(db: Database, volume_id: int, done: str, *, any_reader: bool = False) -> None:
    async with db.connect() as conn:
        live = await _live_attachments(conn, volume_id)
    busy = [x for x in live if any_reader or not x["read_only"]]
    if busy:
        raise Conflict(
            f"the volume cannot be {done} while the running desktop {busy[0]['name']!r} has it"
            f"{'' if any_reader else ' read-write'}: detach it or stop the desktop first",
            code="volume_busy",
            details={"desktop": busy[0]["name"]},
        )


async def update_volume(
    db: Database,
    actor: Actor,
    backend: VolumeBackend,
    ref: str | int,
    *,
    size_gib: int | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """Grow the volume (never shrink: ``bad_size``) and/or change its description."""
    require(actor, "volume.update")
    async with db.connect() as conn:
        row = await find_volume(conn, actor, ref)
    volume_id, tenant_id = int(row["id"]), int(row["tenant_id"])
    values: dict[str, Any] = {}
    if description is not None:
        values["description"] = description
    if size_gib is not None and size_gib != row["size_gib"]:
        check_size(size_gib)
        if size_gib < row["size_gib"]:
            raise BadInput(
                f"a volume only grows: it has {row['size_gib']} GiB, so ask for {row['size_gib']} GiB or more",
                code="bad_size",
            )
        await _refuse_if_written(db, volume_id, "resized", any_reader=True)
        async with db.connect() as conn:
            await _check_quota(conn, tenant_id, size_gib - int(row["size_gib"]), new_volume=False)
        await backend.resize(tenant_id, volume_id, size_gib)
        values["size_gib"] = size_gib
    if values:
        async with db.begin() as conn:
            await conn.execute(sa.update(v).where(v.c.id == volume_id).values(**values))
        await publish(db, "updated", "volume", volume_id, tenant_id, changes=sorted(values))
    return await get_volume(db, actor, volume_id)


async def delete_volume(db: Database, actor: Actor, backend: VolumeBackend, ref: str | int) -> None:
    require(actor, "volume.delete")
    async with db.begin() as conn:
        row = await find_volume(conn, actor, ref)
        volume_id = int(row["id"])
        attached = (await _attachments(conn, [volume_id]))[volume_id]
        if attached:
            names = ", ".join(x["desktop"] for x in attached)
            raise Conflict(
                f"the volume is attached to {names}: detach it first",
                code="volume_attached",
                details={"desktops": [x["desktop"] for x in attached]},
            )
        await conn.execute(sa.update(v).where(v.c.id == volume_id).values(state="deleting"))
    try:
        await backend.delete(int(row["tenant_id"]), volume_id)
    except BaseException:
        async with db.begin() as conn:
            await conn.execute(sa.update(v).where(v.c.id == volume_id).values(state="ready"))
        raise
    async with db.begin() as conn:
        await conn.execute(sa.delete(v).where(v.c.id == volume_id))
    await publish(db, "deleted", "volume", volume_id, int(row["tenant_id"]), name=row["name"])


# ---- snapshots ----------------------------------------------------------------------------------------------
async def _find_snapshot(db: Database, actor: Actor, volume_ref: str | int, name: str) -> dict[str, Any]:
    async with db.connect() as conn:
        vol = await find_volume(conn, actor, volume_ref)
        row = (await conn.execute(sa.select(s).where(s.c.volume_id == vol["id"], s.c.name == name))).first()
    if not row:
        raise NotFound(f"volume {vol['name']!r} has no snapshot {name!r}", code="snapshot_not_found")
    return {**as_dict(row), "tenant_id": vol["tenant_id"]}


async def list_snapshots(db: Database, actor: Actor, ref: str | int) -> list[dict[str, Any]]:
    require(actor, "volume.see")
    async with db.connect() as conn:
        vol = await find_volume(conn, actor, ref)
        rows = await conn.execute(sa.select(s).where(s.c.volume_id == vol["id"]).order_by(s.c.created_at, s.c.id))
        return [as_dict(r) for r in rows]


async def create_snapshot(
    db: Database, actor: Actor, backend: VolumeBackend, ref: str | int, name: str
) -> dict[str, Any]:
    """Keep the volume's content under ``name`` (inside the volume: it counts towards no quota)."""
    require(actor, "volume.snapshot")
    check_name(name, "snapshot")
    async with db.connect() as conn:
        vol = await find_volume(conn, actor, ref)
    volume_id = int(vol["id"])
    await _refuse_if_written(db, volume_id, "snapshotted")
    async with contextlib.AsyncExitStack() as undo:
        with unique_or_conflict(f"volume {vol['name']!r} already has a snapshot named {name!r}"):
            async with db.begin() as conn:
                res = await conn.execute(
                    sa.insert(s)
                    .values(volume_id=volume_id, name=name, size_gib=vol["size_gib"], created_at=utcnow())
                    .returning(s.c.id)
                )
                snapshot_id = int(res.scalar_one())
        undo.push_async_callback(_forget_snapshot, db, snapshot_id)
        await backend.snapshot(int(vol["tenant_id"]), volume_id, name)
        undo.pop_all()
    await publish(db, "updated", "volume", volume_id, int(vol["tenant_id"]), snapshot=name)
    async with db.connect() as conn:
        return as_dict((await conn.execute(sa.select(s).where(s.c.id == snapshot_id))).one())


async def _forget_snapshot(db: Database, snapshot_id: int) -> None:
    async with db.begin() as conn:
        await conn.execute(sa.delete(s).where(s.c.id == snapshot_id))


async def delete_snapshot(db: Database, actor: Actor, backend: VolumeBackend, ref: str | int, name: str) -> None:
    require(actor, "volume.snapshot")
    snap = await _find_snapshot(db, actor, ref, name)
    await _refuse_if_written(db, int(snap["volume_id"]), "changed")
    await backend.delete_snapshot(int(snap["tenant_id"]), int(snap["volume_id"]), name)
    await _forget_snapshot(db, int(snap["id"]))
    await publish(db, "updated", "volume", int(snap["volume_id"]), int(snap["tenant_id"]), snapshot_deleted=name)


# ---- attach, detach -----------------------------------------------------------------------------------------
async def attach_volume(
    db: Database,
    actor: Actor,
    ref: str | int,
    desktop: str | int,
    *,
    read_only: bool = False,
    wait_s: float = NODE_WAIT_S,
) -> dict[str, Any]:
    """Give the desktop the volume: at its next start, and at once (hot plug) when a node runs it."""
    require(actor, "volume.attach")
    async with db.begin() as conn:
        vol = await find_volume(conn, actor, ref)
        volume_id = int(vol["id"])
        # one attach at a time per volume (PostgreSQL; SQLite writes one transaction at a time anyway)
        await conn.execute(sa.select(v.c.id).where(v.c.id == volume_id).with_for_update())
        desk = await _find_desktop(conn, actor, desktop, int(vol["tenant_id"]))
        if vol["state"] != "ready":
            raise Conflict(f"the volume is {vol['state']}, not ready: try again shortly", code="volume_not_ready")
        existing = (await _attachments(conn, [volume_id]))[volume_id]
        mine = next((x for x in existing if x["desktop_id"] == desk["id"]), None)
        if mine is not None:
            if mine["read_only"] == read_only:
                return await _answer(conn, volume_id)  # a repeat, declared here: nothing to do
            raise Conflict(
                f"the volume is already attached to {desk['name']!r} "
                f"{'read-only' if mine['read_only'] else 'read-write'}: detach it first to change that",
                code="volume_attached",
            )
        writer = next((x for x in existing if not x["read_only"]), None)
        if writer is not None or (existing and not read_only):
            other = writer or existing[0]
            raise Conflict(
                f"the volume is attached {'read-write' if writer else 'read-only'} to {other['desktop']!r}: "
                + ("detach it there first" if writer else "a volume is read-write on one desktop only, with no "
                   "readers beside it: attach it read-only, or detach the readers first"),
                code="volume_in_use",
                details={"desktop": other["desktop"]},
            )  # fmt: skip
        live = desk["state"] in LIVE_STATES and desk["node_id"] is not None
        await conn.execute(
            sa.insert(a).values(
                volume_id=volume_id,
                desktop_id=desk["id"],
                read_only=read_only,
                attached_at=utcnow(),
                pending="attach" if live else None,
            )
        )
    await publish(db, "updated", "volume", volume_id, int(vol["tenant_id"]), attached=desk["name"], read_only=read_only)
    if live:
        await db.bus.notify(node_channel(int(desk["node_id"])), str(desk["id"]))
        outcome = await _wait_for_node(db, volume_id, int(desk["id"]), wait_s)
        if outcome is not None:  # the node could not plug it: the attachment is undone
            async with db.begin() as conn:
                await conn.execute(sa.delete(a).where(a.c.volume_id == volume_id, a.c.desktop_id == desk["id"]))
            raise outcome
    async with db.connect() as conn:
        return await _answer(conn, volume_id)


async def detach_volume(
    db: Database, actor: Actor, ref: str | int, desktop: str | int, *, wait_s: float = NODE_WAIT_S
) -> dict[str, Any]:
    """Take the volume from the desktop; from a running guest only once nothing there has it mounted
    (``volume_held``)."""
    require(actor, "volume.attach")
    async with db.begin() as conn:
        vol = await find_volume(conn, actor, ref)
        volume_id = int(vol["id"])
        desk = await _find_desktop(conn, actor, desktop, int(vol["tenant_id"]))
        where = (a.c.volume_id == volume_id, a.c.desktop_id == desk["id"])
        if not (await conn.execute(sa.select(a.c.volume_id).where(*where))).first():
            raise NotFound(f"the volume is not attached to {desk['name']!r}", code="volume_not_attached")
        live = desk["state"] in LIVE_STATES and desk["node_id"] is not None
        if live:
            await conn.execute(sa.update(a).where(*where).values(pending="detach", error_code=None, error=None))
        else:
            await conn.execute(sa.delete(a).where(*where))
    if live:
        await db.bus.notify(node_channel(int(desk["node_id"])), str(desk["id"]))
        outcome = await _wait_for_node(db, volume_id, int(desk["id"]), wait_s)
        if outcome is not None:  # still attached, as it was
            async with db.begin() as conn:
                await conn.execute(sa.update(a).where(*where, a.c.pending == "failed").values(pending=None))
            raise outcome
    await publish(db, "updated", "volume", volume_id, int(vol["tenant_id"]), detached=desk["name"])
    async with db.connect() as conn:
        return await _answer(conn, volume_id)


async def _wait_for_node(db: Database, volume_id: int, desktop_id: int, wait_s: float) -> DeckardError | None:
    """Until the node has acted on the attachment's ``pending``: None when done (or the desktop left its node,
    which settles it too: a stopped guest has no volumes), the node's error when it failed.  After ``wait_s``
    the command stays for the node and the caller sees ``pending`` in the answer."""
    deadline = time.monotonic() + wait_s
    while True:
        async with db.begin() as conn:
            row = (
                await conn.execute(
                    sa.select(a.c.pending, a.c.error_code, a.c.error, d.c.state, d.c.node_id)
                    .join(d, d.c.id == a.c.desktop_id)
                    .where(a.c.volume_id == volume_id, a.c.desktop_id == desktop_id)
                )
            ).first()
            if row is None or row.pending is None:
                return None
            if row.pending == "failed":
                return _node_error(str(row.error_code or "volume_failed"), str(row.error or "the node failed"))
            if row.state not in LIVE_STATES or row.node_id is None:
                where = (a.c.volume_id == volume_id, a.c.desktop_id == desktop_id)
                if row.pending == "detach":
                    await conn.execute(sa.delete(a).where(*where))
                else:
                    await conn.execute(sa.update(a).where(*where).values(pending=None))
                return None
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(POLL_S)


def _node_error(code: str, message: str) -> DeckardError:
    if code in ("volume_held", "volume_busy", "volume_in_use"):
        return Conflict(message, code=code)
    return DriverError(message, code=code)
