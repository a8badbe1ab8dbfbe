"""Tenants (``/tenants``): supertenant administrators only (``tenant.*`` ACLs); ``{tenant}`` is an id or a name.

A confined administrator sees only their own tenant; any other id answers 404 (``services/tenants.py``).
"""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, Field

from deckard.api.deps import ActorDep, DbDep, ListPairsDep
from deckard.api.envelope import ERROR_RESPONSES, Page
from deckard.api.strict import RequestModel
from deckard.services import tenants
from deckard.services.listing import parse_list_query

router = APIRouter(prefix="/tenants", tags=["tenants"], responses=ERROR_RESPONSES)


class Tenant(BaseModel):
    id: int
    name: str
    blocked: bool
    description: str
    created_at: dt.datetime


class TenantCreate(RequestModel):
    name: str = Field(min_length=1, max_length=32, description="Lowercase letters, digits, '.', '_', '-'.")
    description: str = Field(default="", max_length=4096)


class TenantUpdate(RequestModel):
    description: str | None = Field(default=None, max_length=4096)
    blocked: bool | None = Field(default=None, description="A blocked tenant's users and administrators cannot log in.")


@router.get("", response_model=Page[Tenant], summary="List tenants")
async def list_tenants(actor: ActorDep, db: DbDep, pairs: ListPairsDep) -> Page[Tenant]:
    rows, total = await tenants.list_tenants(db, actor, parse_list_query(pairs, tenants.LIST_COLUMNS))
    return Page[Tenant](items=[Tenant.model_validate(r) for r in rows], total=total)


@router.post("", response_model=Tenant, status_code=status.HTTP_201_CREATED, summary="Create a tenant")
async def create_tenant(body: TenantCreate, actor: ActorDep, db: DbDep) -> Tenant:
    return Tenant.model_validate(await tenants.create_tenant(db, actor, body.name, body.description))


@router.get("/{tenant}", response_model=Tenant, summary="Show a tenant")
async def get_tenant(tenant: str, actor: ActorDep, db: DbDep) -> Tenant:
    return Tenant.model_validate(await tenants.get_tenant(db, actor, tenant))


@router.patch("/{tenant}", response_model=Tenant, summary="Change a tenant's description or blocked flag")
async def update_tenant(tenant: str, body: TenantUpdate, actor: ActorDep, db: DbDep) -> Tenant:
    row = await tenants.update_tenant(db, actor, tenant, description=body.description, blocked=body.blocked)
    return Tenant.model_validate(row)


@router.post("/{tenant}/block", response_model=Tenant, summary="Block a tenant")
async def block_tenant(tenant: str, actor: ActorDep, db: DbDep) -> Tenant:
    return Tenant.model_validate(await tenants.update_tenant(db, actor, tenant, blocked=True))


@router.post("/{tenant}/unblock", response_model=Tenant, summary="Unblock a tenant")
async def unblock_tenant(tenant: str, actor: ActorDep, db: DbDep) -> Tenant:
    return Tenant.model_validate(await tenants.update_tenant(db, actor, tenant, blocked=False))


@router.delete(
    "/{tenant}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete an empty tenant",
)
async def delete_tenant(tenant: str, actor: ActorDep, db: DbDep) -> Response:
    await tenants.delete_tenant(db, actor, tenant)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
