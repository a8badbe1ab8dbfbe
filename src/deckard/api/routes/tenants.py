"""Tenants (``/tenants``): supertenant administrators only (``tenant.*`` ACLs); ``{tenant}`` is an id or a name.

A confined administrator sees only their own tenant; any other id answers 404 (``services/tenants.py``).
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import Field

from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.resource import ObjectRoutes
from deckard.api.strict import RequestModel
from deckard.model.schemas import Tenant
from deckard.services import tenants

router = APIRouter(prefix="/tenants", tags=["tenants"], responses=ERROR_RESPONSES)


class TenantCreate(RequestModel):
    name: str = Field(min_length=1, max_length=32, description="Lowercase letters, digits, '.', '_', '-'.")
    description: str = Field(default="", max_length=4096)


class TenantUpdate(RequestModel):
    description: str | None = Field(default=None, max_length=4096)
    blocked: bool | None = Field(default=None, description="A blocked tenant's users and administrators cannot log in.")


tenant = ObjectRoutes(router, "tenant", Tenant)
tenant.add_list(lambda s, q: tenants.list_tenants(s.db, s.actor, q), tenants.LIST_COLUMNS, "List tenants")


tenant.add_create(
    TenantCreate,
    lambda s, body: tenants.create_tenant(s.db, s.actor, body.name, body.description),
    "Create a tenant",
)
tenant.add_get(lambda s, ref: tenants.get_tenant(s.db, s.actor, ref), "Show a tenant")
tenant.add_patch(
    TenantUpdate,
    lambda s, ref, body: tenants.update_tenant(s.db, s.actor, ref, **body.model_dump(exclude_unset=True)),
    "Change a tenant's description or blocked flag",
)
tenant.add_action("block", lambda s, ref: tenants.update_tenant(s.db, s.actor, ref, blocked=True), "Block a tenant")
tenant.add_action(
    "unblock", lambda s, ref: tenants.update_tenant(s.db, s.actor, ref, blocked=False), "Unblock a tenant"
)
tenant.add_delete(lambda s, ref: tenants.delete_tenant(s.db, s.actor, ref), "Delete an empty tenant")
