"""Roles (``/roles``) and the ACL catalogue (``/acls``).

A role has grants (an ACL name or pattern, positive or negative) and inherits other roles; the answer also
shows the effective ``acls``.  Predefined roles are fixed (409 ``role_fixed``), an inheritance cycle is 409
``role_cycle``.  ``{role}`` is an id or a name.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import Field

from deckard.api.deps import ActorDep, Scope
from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.resource import ObjectRoutes
from deckard.api.strict import Ref, RequestModel
from deckard.model.acls import ACLS, GATED_FIELDS
from deckard.model.ids import ID_MAX
from deckard.model.schemas import Acl, Grant, Page, Role
from deckard.services import roles
from deckard.services.context import require

router = APIRouter(tags=["roles"], responses=ERROR_RESPONSES)

RoleId = Annotated[int, Field(ge=0, le=ID_MAX)]


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


def _grants(grants: list[Grant] | None) -> list[tuple[str, bool]] | None:
    return None if grants is None else [(g.acl, g.positive) for g in grants]


@router.get("/acls", response_model=Page[Acl], summary="The ACL catalogue")
async def list_acls(actor: ActorDep) -> Page[Acl]:
    require(actor, "role.see")
    gated = {f"{o}.see.{f}" for o, fs in GATED_FIELDS.items() for f in fs}
    items = [Acl(name=a, object=a.split(".", 1)[0], gated_field=a in gated) for a in sorted(ACLS)]
    return Page[Acl](items=items, total=len(items))


role = ObjectRoutes(APIRouter(prefix="/roles"), "role", Role)
role.add_list(lambda s, q: roles.list_roles(s.db, s.actor, q), roles.LIST_COLUMNS, "List roles")


role.add_create(
    RoleCreate,
    lambda s, body: roles.create_role(
        s.db,
        s.actor,
        body.name,
        description=body.description,
        grants=_grants(body.grants) or [],
        inherits=body.inherits,
        tenant=body.tenant,
    ),
    "Create a role",
)


async def _update(s: Scope, ref: str, body: RoleUpdate) -> dict[str, Any]:
    changes = body.model_dump(exclude_unset=True, exclude={"grants"})
    return await roles.update_role(s.db, s.actor, ref, grants=_grants(body.grants), **changes)


role.add_get(lambda s, ref: roles.get_role(s.db, s.actor, ref), "Show a role with its grants and effective ACLs")
role.add_patch(RoleUpdate, _update, "Change a role (not a predefined one)")
role.add_delete(lambda s, ref: roles.delete_role(s.db, s.actor, ref), "Delete a role")
router.include_router(role.router)
