"""Roles and the ACLs an administrator holds (QVD's roles, acl_role_relations, role_role_relations).

Why a module of its own: the same few queries serve three callers — the bootstrap that seeds the predefined
roles, ``actor_for_token`` that turns an administrator's roles into the ``Actor.acls`` every service checks, and
the ``/roles`` CRUD.  The pure rules (pattern expansion, closure, negative grants win, ``tenant.*`` only for the
supertenant) live in ``model/acls.py``; this module only reads and writes them.

Visibility: predefined roles are *fixed* rows of the supertenant, usable by every tenant; other roles belong to
one tenant and are invisible (404) to the administrators of any other.  Nobody may hand out more than they
hold: a grant, an inheritance or a role assignment whose ACLs are not all the actor's own is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.acls import PREDEFINED_ROLES, creates_cycle, effective_acls, expand, role_closure
from deckard.model.entities import utcnow
from deckard.model.errors import BadInput, Conflict, NotFound, PermissionDenied
from deckard.services.context import Actor, require
from deckard.services.events import publish
from deckard.services.listing import ListQuery, run_list
from deckard.services.rows import as_dict
from deckard.services.tenant_lookup import resolve_tenant_for_create

SUPERTENANT = "*"
SUPERTENANT_ID = 0  # QVD's id for the supertenant
ROLE_DESCRIPTIONS = {
    "Root": "Everything, in every tenant (supertenant administrators).",
    "Tenant admin": "Everything inside one tenant; nodes are read-only.",
    "Operator": "Sees everything and runs day-to-day actions on desktops, users and nodes.",
    "Read-only": "Sees everything (except audit and tenants) and changes nothing.",
}


async def ensure_supertenant(conn: AsyncConnection) -> int:
    row = (await conn.execute(sa.select(t.tenants.c.id).where(t.tenants.c.name == SUPERTENANT))).first()
    if row:
        return int(row.id)
    await conn.execute(
        sa.insert(t.tenants).values(
            id=SUPERTENANT_ID, name=SUPERTENANT, description="the supertenant", created_at=utcnow()
        )
    )
    return SUPERTENANT_ID


async def ensure_predefined_roles(conn: AsyncConnection, supertenant_id: int) -> dict[str, int]:
    """The fixed roles, created once and kept in step with ``PREDEFINED_ROLES``; returns name → id."""
    ids: dict[str, int] = {}
    for name, grants in PREDEFINED_ROLES.items():
        q = sa.select(t.roles.c.id).where(t.roles.c.tenant_id == supertenant_id, t.roles.c.name == name)
        row = (await conn.execute(q)).first()
        if row:
            role_id = int(row.id)
        else:
            res = await conn.execute(
                sa.insert(t.roles)
                .values(
                    tenant_id=supertenant_id,
                    name=name,
                    description=ROLE_DESCRIPTIONS.get(name, ""),
                    fixed=True,
                    created_at=utcnow(),
                )
                .returning(t.roles.c.id)
            )
            role_id = int(res.scalar_one())
        await conn.execute(sa.delete(t.role_acls).where(t.role_acls.c.role_id == role_id))
        await conn.execute(
            sa.insert(t.role_acls), [{"role_id": role_id, "acl": acl, "positive": pos} for acl, pos in grants]
        )
        ids[name] = role_id
    return ids


# ---- what an administrator may do ---------------------------------------------------------------------------


async def _parents(conn: AsyncConnection) -> dict[int, list[int]]:
    parents: dict[int, list[int]] = {}
    for r in await conn.execute(sa.select(t.role_inherits.c.role_id, t.role_inherits.c.parent_id)):
        parents.setdefault(int(r.role_id), []).append(int(r.parent_id))
    return parents


async def acls_of_roles(conn: AsyncConnection, role_ids: Iterable[int], *, supertenant: bool) -> frozenset[str]:
    """The effective ACLs of a set of roles and everything they inherit."""
    closure = role_closure(role_ids, await _parents(conn))
    if not closure:
        return frozenset()
    q = sa.select(t.role_acls.c.acl, t.role_acls.c.positive).where(t.role_acls.c.role_id.in_(closure))
    grants = [(str(r.acl), bool(r.positive)) for r in await conn.execute(q)]
    return effective_acls(grants, supertenant=supertenant)


async def acls_of_admin(conn: AsyncConnection, admin_id: int, tenant_id: int) -> frozenset[str]:
    """What ``actor_for_token`` puts in ``Actor.acls``: roles → closure → grants → effective set."""
    q = sa.select(t.admin_roles.c.role_id).where(t.admin_roles.c.admin_id == admin_id)
    role_ids = [int(r.role_id) for r in await conn.execute(q)]
    return await acls_of_roles(conn, role_ids, supertenant=tenant_id == SUPERTENANT_ID)


def _no_escalation(actor: Actor, acls: Iterable[str], what: str) -> None:
    extra = sorted(set(acls) - actor.acls)
    if extra:
        shown = ", ".join(extra[:5]) + (" …" if len(extra) > 5 else "")
        raise PermissionDenied(
            f"you cannot {what}: it would give ACLs you do not hold yourself ({shown})",
            code="forbidden_action",
            details={"missing": extra},
        )


# ---- roles CRUD ---------------------------------------------------------------------------------------------


def _visible(actor: Actor) -> sa.ColumnElement[bool]:
    if actor.all_tenants:
        return sa.true()
    return sa.or_(
        t.roles.c.tenant_id == actor.tenant_id,
        sa.and_(t.roles.c.tenant_id == SUPERTENANT_ID, t.roles.c.fixed.is_(True)),
    )


LIST_COLUMNS: dict[str, sa.ColumnElement[Any]] = {
    "id": t.roles.c.id,
    "tenant_id": t.roles.c.tenant_id,
    "name": t.roles.c.name,
    "description": t.roles.c.description,
    "fixed": t.roles.c.fixed,
    "created_at": t.roles.c.created_at,
}


async def _detail(conn: AsyncConnection, row: dict[str, Any]) -> dict[str, Any]:
    role_id = int(row["id"])
    grants = await conn.execute(
        sa.select(t.role_acls.c.acl, t.role_acls.c.positive)
        .where(t.role_acls.c.role_id == role_id)
        .order_by(t.role_acls.c.acl)
    )
    parents = await conn.execute(
        sa.select(t.role_inherits.c.parent_id)
        .where(t.role_inherits.c.role_id == role_id)
        .order_by(t.role_inherits.c.parent_id)
    )
    out = dict(row)
    out["grants"] = [{"acl": str(g.acl), "positive": bool(g.positive)} for g in grants]
    out["inherits"] = [int(p.parent_id) for p in parents]
    out["acls"] = sorted(await acls_of_roles(conn, [role_id], supertenant=row["tenant_id"] == SUPERTENANT_ID))
    return out


async def list_roles(db: Database, actor: Actor, q: ListQuery) -> tuple[list[dict[str, Any]], int]:
    require(actor, "role.see")
    async with db.connect() as conn:
        select = sa.select(*(c.label(k) for k, c in LIST_COLUMNS.items())).where(_visible(actor))
        rows, total = await run_list(conn, select, q, LIST_COLUMNS, t.roles.c.id)
        return [await _detail(conn, r) for r in rows] if not q.fields else rows, total


async def _find(conn: AsyncConnection, actor: Actor, ref: str | int) -> dict[str, Any]:
    ref_s = str(ref)
    cond = t.roles.c.id == int(ref_s) if ref_s.isdigit() else t.roles.c.name == ref_s
    q = sa.select(*(c.label(k) for k, c in LIST_COLUMNS.items())).where(cond, _visible(actor))
    if not actor.all_tenants and not ref_s.isdigit():
        # a tenant's own role of that name wins over a predefined one
        q = q.order_by(sa.desc(t.roles.c.tenant_id == actor.tenant_id))
    row = (await conn.execute(q.limit(1))).first()
    if not row:
        raise NotFound(f"no role {ref!r}", code="role_not_found")
    return as_dict(row)


async def get_role(db: Database, actor: Actor, ref: str | int) -> dict[str, Any]:
    async with db.connect() as conn:
        row = await _find(conn, actor, ref)
        require(actor, "role.see")
        return await _detail(conn, row)


def _check_grants(actor: Actor, grants: Sequence[tuple[str, bool]]) -> None:
    for acl, _positive in grants:
        if not expand(acl):
            raise BadInput(f"{acl!r} names no ACL: see GET /acls for the catalogue", code="unknown_acl")
    _no_escalation(actor, (a for acl, pos in grants if pos for a in expand(acl)), "grant these ACLs")


async def _set_inherits(
    conn: AsyncConnection, actor: Actor, role_id: int, parents: Sequence[int], supertenant: bool
) -> None:
    graph = await _parents(conn)
    graph.pop(role_id, None)
    for parent in parents:
        await _find(conn, actor, parent)
        if parent == role_id or creates_cycle(role_id, parent, graph):
            raise Conflict(f"role {parent} already inherits from this role: that would be a cycle", code="role_cycle")
        graph.setdefault(role_id, []).append(parent)
    _no_escalation(actor, await acls_of_roles(conn, parents, supertenant=supertenant), "inherit these roles")
    await conn.execute(sa.delete(t.role_inherits).where(t.role_inherits.c.role_id == role_id))
    if parents:
        await conn.execute(
            sa.insert(t.role_inherits), [{"role_id": role_id, "parent_id": p} for p in dict.fromkeys(parents)]
        )


async def create_role(
    db: Database,
    actor: Actor,
    name: str,
    *,
    description: str = "",
    grants: Sequence[tuple[str, bool]] = (),
    inherits: Sequence[int] = (),
    tenant: str | None = None,
) -> dict[str, Any]:
    require(actor, "role.create")
    _check_grants(actor, grants)
    async with db.begin() as conn:
        tenant_id = await resolve_tenant_for_create(conn, actor, tenant)
        dup = await conn.execute(
            sa.select(t.roles.c.id).where(t.roles.c.tenant_id == tenant_id, t.roles.c.name == name)
        )
        if dup.first():
            raise Conflict(f"a role named {name!r} already exists", code="duplicate")
        res = await conn.execute(
            sa.insert(t.roles)
            .values(tenant_id=tenant_id, name=name, description=description, created_at=utcnow())
            .returning(t.roles.c.id)
        )
        role_id = int(res.scalar_one())
        if grants:
            await conn.execute(
                sa.insert(t.role_acls),
                [{"role_id": role_id, "acl": a, "positive": p} for a, p in dict(grants).items()],
            )
        await _set_inherits(conn, actor, role_id, inherits, tenant_id == SUPERTENANT_ID)
        out = await _detail(conn, await _find(conn, actor, role_id))
    await publish(db, "created", "role", role_id, tenant_id)
    return out


async def update_role(
    db: Database,
    actor: Actor,
    ref: str | int,
    *,
    name: str | None = None,
    description: str | None = None,
    grants: Sequence[tuple[str, bool]] | None = None,
    inherits: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Replace what is given (grants and inherits as whole lists); fixed roles refuse (409 ``role_fixed``)."""
    async with db.begin() as conn:
        row = await _find(conn, actor, ref)
        require(actor, "role.update")
        if row["fixed"] or (not actor.all_tenants and row["tenant_id"] != actor.tenant_id):
            raise Conflict(f"role {row['name']!r} is predefined and cannot be changed", code="role_fixed")
        role_id = int(row["id"])
        values: dict[str, Any] = {}
        if name is not None:
            values["name"] = name
        if description is not None:
            values["description"] = description
        if values:
            try:
                async with conn.begin_nested():
                    await conn.execute(sa.update(t.roles).where(t.roles.c.id == role_id).values(**values))
            except sa.exc.IntegrityError:
                raise Conflict(f"a role named {name!r} already exists", code="duplicate") from None
        if grants is not None:
            _check_grants(actor, grants)
            await conn.execute(sa.delete(t.role_acls).where(t.role_acls.c.role_id == role_id))
            if grants:
                await conn.execute(
                    sa.insert(t.role_acls),
                    [{"role_id": role_id, "acl": a, "positive": p} for a, p in dict(grants).items()],
                )
        if inherits is not None:
            await _set_inherits(conn, actor, role_id, inherits, row["tenant_id"] == SUPERTENANT_ID)
        out = await _detail(conn, await _find(conn, actor, role_id))
    await publish(db, "updated", "role", role_id, row["tenant_id"])
    return out


async def delete_role(db: Database, actor: Actor, ref: str | int) -> None:
    async with db.begin() as conn:
        row = await _find(conn, actor, ref)
        require(actor, "role.delete")
        if row["fixed"] or (not actor.all_tenants and row["tenant_id"] != actor.tenant_id):
            raise Conflict(f"role {row['name']!r} is predefined and cannot be deleted", code="role_fixed")
        await conn.execute(sa.delete(t.roles).where(t.roles.c.id == row["id"]))
    await publish(db, "deleted", "role", row["id"], row["tenant_id"])


async def find_role_ids(conn: AsyncConnection, actor: Actor, refs: Iterable[str | int]) -> list[int]:
    return [int((await _find(conn, actor, r))["id"]) for r in refs]


def check_assignable(actor: Actor, acls: Iterable[str]) -> None:
    _no_escalation(actor, acls, "assign these roles")
