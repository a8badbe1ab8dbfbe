"""Administrators (``/admins``): create with a tenant and roles, change password, block, assign roles, delete,
reset a lost second factor.

``{admin}`` is an id or a name.  Roles are named by id or name; ``roles`` in an answer needs ``admin.see.roles``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status
from pydantic import Field

from deckard.api.deps import ActorDep, DbDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.resource import ObjectRoutes
from deckard.api.strict import Ref, RequestModel
from deckard.model.ids import ID_MAX
from deckard.model.schemas import Admin
from deckard.services import admins

router = APIRouter(prefix="/admins", tags=["admins"], responses=ERROR_RESPONSES)
AdminId = Annotated[int, Path(ge=1, le=ID_MAX, description="The administrator's id.")]


class AdminCreate(RequestModel):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=8, max_length=1024)
    tenant: Ref | None = Field(default=None, description="Supertenant administrators only.")
    roles: list[Ref] = Field(default_factory=list, max_length=1000, description="Role ids or names.")


class AdminUpdate(RequestModel):
    password: str | None = Field(default=None, min_length=8, max_length=1024)
    blocked: bool | None = None
    roles: list[Ref] | None = Field(default=None, max_length=1000, description="Replaces the administrator's roles.")


admin = ObjectRoutes(router, "admin", Admin)
admin.add_list(lambda s, q: admins.list_admins(s.db, s.actor, q), admins.ADMIN_COLUMNS, "List administrators")


admin.add_create(
    AdminCreate,
    lambda s, body: admins.create_admin(s.db, s.actor, body.name, body.password, tenant=body.tenant, roles=body.roles),
    "Create an administrator",
)
admin.add_get(lambda s, ref: admins.get_admin(s.db, s.actor, ref), "Show an administrator")
admin.add_patch(
    AdminUpdate,
    lambda s, ref, body: admins.update_admin(s.db, s.actor, ref, **body.model_dump(exclude_unset=True)),
    "Change an administrator's password, blocked flag or roles",
)
admin.add_delete(lambda s, ref: admins.delete_admin(s.db, s.actor, ref), "Delete an administrator")


@router.delete(
    "/{admin_id}/second-factor",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Reset another administrator's second factor (ACL admin.update.password)",
)
async def reset_second_factor(admin_id: AdminId, actor: ActorDep, db: DbDep) -> Response:
    """Its secret and recovery codes are deleted: the next login asks for the password only.  404 outside your
    tenant; 409 ``admin_self`` for your own."""
    await admins.reset_admin_second_factor(db, actor, admin_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
