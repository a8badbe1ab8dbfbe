"""Roles (``/roles``) and the ACL catalogue (``/acls``).

A role has grants (an ACL name or pattern, positive or negative) and inherits other roles; the answer also
shows the effective ``acls``.  Predefined roles are fixed (409 ``role_fixed``), an inheritance cycle is 409
``role_cycle``.  ``{role}`` is an id or a name.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, Field

from deckard.api.deps import ActorDep, DbDep, ListPairsDep
from deckard.api.envelope import ERROR_RESPONSES, Page
from deckard.api.strict import Ref, RequestModel
from deckard.model.acls import ACLS, GATED_FIELDS
from deckard.model.ids import ID_MAX
from deckard.services import roles
from deckard.services.context import require
from deckard.services.listing import parse_list_query

router = APIRouter(tags=["roles"], responses=ERROR_RESPONSES)

RoleId = Annotated[int, Field(ge=0, le=ID_MAX)]


class Grant(RequestModel):
    acl: str = Field(min_length=1, max_length=128, description="An ACL name or a pattern (`desktop.*`, `*.see`).")
    positive: bool = Field(default=True, description="False: a negative grant, which always wins.")


class Role(BaseModel):
    id: int
    tenant_id: int
    name: str
    description: str
    fixed: bool
    created_at: dt.datetime
    grants: list[Grant] = Field(default_factory=list)
    inherits: list[int] = Field(default_factory=list)
    acls: list[str] = Field(default_factory=list, description="The effective ACLs of the role.")


class RoleCreate(RequestModel):
    name: str = Field(min_length=1, max_length=64)
    description: str = Field(default="", max_length=4096)
    grants: list[Grant] = Field(default_factory=list)
    inherits: list[RoleId] = Field(default_factory=list, description="Ids of roles this role inherits from.")
    tenant: Ref | None = Field(default=None, description="Supertenant administrators only.")


class RoleUpdate(RequestModel):
    name: str | None = Field(default=None, min_length=1, max_length=64)
    description: str | None = Field(default=None, max_length=4096)
    grants: list[Grant] | None = Field(default=None, description="Replaces the role's grants.")
    inherits: list[RoleId] | None = Field(default=None, description="Replaces the roles it inherits from.")


class Acl(BaseModel):
    name: str
    object: str
    gated_field: bool = Field(description="Whether it lets an administrator see a hidden field.")


def _grants(grants: list[Grant] | None) -> list[tuple[str, bool]] | None:
    return None if grants is None else [(g.acl, g.positive) for g in grants]


@router.get("/acls", response_model=Page[Acl], summary="The ACL catalogue")
async def list_acls(actor: ActorDep) -> Page[Acl]:
    require(actor, "role.see")
    gated = {f"{o}.see.{f}" for o, fs in GATED_FIELDS.items() for f in fs}
    items = [Acl(name=a, object=a.split(".", 1)[0], gated_field=a in gated) for a in sorted(ACLS)]
    return Page[Acl](items=items, total=len(items))


@router.get("/roles", response_model=Page[Role], summary="List roles")
async def list_roles(actor: ActorDep, db: DbDep, pairs: ListPairsDep) -> Page[Role]:
    rows, total = await roles.list_roles(db, actor, parse_list_query(pairs, roles.LIST_COLUMNS))
    return Page[Role](items=[Role.model_validate(r) for r in rows], total=total)


@router.post("/roles", response_model=Role, status_code=status.HTTP_201_CREATED, summary="Create a role")
async def create_role(body: RoleCreate, actor: ActorDep, db: DbDep) -> Role:
    row = await roles.create_role(
        db,
        actor,
        body.name,
        description=body.description,
        grants=_grants(body.grants) or [],
        inherits=body.inherits,
        tenant=body.tenant,
    )
    return Role.model_validate(row)


@router.get("/roles/{role}", response_model=Role, summary="Show a role with its grants and effective ACLs")
async def get_role(role: str, actor: ActorDep, db: DbDep) -> Role:
    return Role.model_validate(await roles.get_role(db, actor, role))


@router.patch("/roles/{role}", response_model=Role, summary="Change a role (not a predefined one)")
async def update_role(role: str, body: RoleUpdate, actor: ActorDep, db: DbDep) -> Role:
    row = await roles.update_role(
        db,
        actor,
        role,
        name=body.name,
        description=body.description,
        grants=_grants(body.grants),
        inherits=body.inherits,
    )
    return Role.model_validate(row)


@router.delete(
    "/roles/{role}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response, summary="Delete a role"
)
async def delete_role(role: str, actor: ActorDep, db: DbDep) -> Response:
    await roles.delete_role(db, actor, role)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
