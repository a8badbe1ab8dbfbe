"""Administrators (``/admins``): create with a tenant and roles, change password, block, assign roles, delete.

``{admin}`` is an id or a name.  Roles are named by id or name; ``roles`` in an answer needs ``admin.see.roles``.
"""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, Field

from deckard.api.deps import ActorDep, DbDep, ListPairsDep
from deckard.api.envelope import ERROR_RESPONSES, Page
from deckard.api.strict import Ref, RequestModel
from deckard.services import admins
from deckard.services.listing import parse_list_query

router = APIRouter(prefix="/admins", tags=["admins"], responses=ERROR_RESPONSES)


class Admin(BaseModel):
    id: int
    tenant_id: int
    name: str
    blocked: bool
    created_at: dt.datetime
    roles: list[str] | None = Field(default=None, description="Role names (needs `admin.see.roles`).")


class AdminCreate(RequestModel):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=8, max_length=1024)
    tenant: Ref | None = Field(default=None, description="Supertenant administrators only.")
    roles: list[Ref] = Field(default_factory=list, max_length=1000, description="Role ids or names.")


class AdminUpdate(RequestModel):
    password: str | None = Field(default=None, min_length=8, max_length=1024)
    blocked: bool | None = None
    roles: list[Ref] | None = Field(default=None, max_length=1000, description="Replaces the administrator's roles.")


@router.get("", response_model=Page[Admin], summary="List administrators")
async def list_admins(actor: ActorDep, db: DbDep, pairs: ListPairsDep) -> Page[Admin]:
    rows, total = await admins.list_admins(db, actor, parse_list_query(pairs, admins.ADMIN_COLUMNS))
    return Page[Admin](items=[Admin.model_validate(r) for r in rows], total=total)


@router.post("", response_model=Admin, status_code=status.HTTP_201_CREATED, summary="Create an administrator")
async def create_admin(body: AdminCreate, actor: ActorDep, db: DbDep) -> Admin:
    row = await admins.create_admin(db, actor, body.name, body.password, tenant=body.tenant, roles=body.roles)
    return Admin.model_validate(row)


@router.get("/{admin}", response_model=Admin, summary="Show an administrator")
async def get_admin(admin: str, actor: ActorDep, db: DbDep) -> Admin:
    return Admin.model_validate(await admins.get_admin(db, actor, admin))


@router.patch("/{admin}", response_model=Admin, summary="Change an administrator's password, blocked flag or roles")
async def update_admin(admin: str, body: AdminUpdate, actor: ActorDep, db: DbDep) -> Admin:
    row = await admins.update_admin(db, actor, admin, password=body.password, blocked=body.blocked, roles=body.roles)
    return Admin.model_validate(row)


@router.delete(
    "/{admin}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response, summary="Delete an administrator"
)
async def delete_admin(admin: str, actor: ActorDep, db: DbDep) -> Response:
    await admins.delete_admin(db, actor, admin)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
