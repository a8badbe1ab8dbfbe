"""Layered configuration (``/config``): effective values with their default and source, set, reset.

``tenant`` (query or body) picks a tenant's layer for per-tenant keys; without it a supertenant administrator
works on the global layer and a tenant administrator on their own tenant's.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field

from deckard.api.deps import ActorDep, DbDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.strict import Ref, RequestModel
from deckard.model.schemas import ConfigEntry, ConfigValue, Page
from deckard.services import config

router = APIRouter(prefix="/config", tags=["config"], responses=ERROR_RESPONSES)

TenantQuery = Annotated[Ref | None, Query(description="A tenant's layer (id or name).")]


class ConfigSet(RequestModel):
    value: ConfigValue = Field(description="Checked against the key's type; text such as `true` or `30` is accepted.")
    tenant: Ref | None = None


@router.get("", response_model=Page[ConfigEntry], summary="Every key with its effective value")
async def list_config(actor: ActorDep, db: DbDep, tenant: TenantQuery = None) -> Page[ConfigEntry]:
    rows = await config.list_config(db, actor, tenant=tenant)
    return Page[ConfigEntry](items=[ConfigEntry.model_validate(r) for r in rows], total=len(rows))


@router.get("/{key}", response_model=ConfigEntry, summary="One key's effective value")
async def get_config(key: str, actor: ActorDep, db: DbDep, tenant: TenantQuery = None) -> ConfigEntry:
    return ConfigEntry.model_validate((await config.list_config(db, actor, key, tenant))[0])


@router.put("/{key}", response_model=ConfigEntry, summary="Set a key (globally or for a tenant)")
async def set_config(key: str, body: ConfigSet, actor: ActorDep, db: DbDep) -> ConfigEntry:
    return ConfigEntry.model_validate(await config.set_config(db, actor, key, body.value, body.tenant))


@router.delete("/{key}", response_model=ConfigEntry, summary="Reset a key to the layer below")
async def reset_config(key: str, actor: ActorDep, db: DbDep, tenant: TenantQuery = None) -> ConfigEntry:
    entry: dict[str, Any] = await config.reset_config(db, actor, key, tenant)
    return ConfigEntry.model_validate(entry)
