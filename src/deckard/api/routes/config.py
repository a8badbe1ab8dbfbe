"""Layered configuration (``/config``): effective values with their default and source, set, reset.

``tenant`` (query or body) picks a tenant's layer for per-tenant keys; without it a supertenant administrator
works on the global layer and a tenant administrator on their own tenant's.  ``osf`` picks an OSF's layer for
the keys that may differ per OSF (``per_osf``): egress and session policies.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field

from deckard.api.deps import ActorDep, DbDep, SettingsDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.strict import Ref, RequestModel
from deckard.model.schemas import ConfigEntry, ConfigValue, Page
from deckard.services import config, network_policy

router = APIRouter(prefix="/config", tags=["config"], responses=ERROR_RESPONSES)

TenantQuery = Annotated[Ref | None, Query(description="A tenant's layer (id or name).")]
OsfQuery = Annotated[Ref | None, Query(description="An OSF's layer (id, name or name@tenant): `per_osf` keys only.")]


class ConfigSet(RequestModel):
    value: ConfigValue = Field(description="Checked against the key's type; text such as `true` or `30` is accepted.")
    tenant: Ref | None = None
    osf: Ref | None = None


@router.get("", response_model=Page[ConfigEntry], summary="Every key with its effective value")
async def list_config(
    actor: ActorDep, db: DbDep, tenant: TenantQuery = None, osf: OsfQuery = None
) -> Page[ConfigEntry]:
    rows = await config.list_config(db, actor, tenant=tenant, osf=osf)
    return Page[ConfigEntry](items=[ConfigEntry.model_validate(r) for r in rows], total=len(rows))


@router.get("/{key}", response_model=ConfigEntry, summary="One key's effective value")
async def get_config(
    key: str, actor: ActorDep, db: DbDep, tenant: TenantQuery = None, osf: OsfQuery = None
) -> ConfigEntry:
    return ConfigEntry.model_validate((await config.list_config(db, actor, key, tenant, osf))[0])


@router.put("/{key}", response_model=ConfigEntry, summary="Set a key (globally, for a tenant or for an OSF)")
async def set_config(key: str, body: ConfigSet, actor: ActorDep, db: DbDep, settings: SettingsDep) -> ConfigEntry:
    check = network_policy.farm_check(settings.network.range, settings.db_url)
    entry = await config.set_config(db, actor, key, body.value, body.tenant, body.osf, check=check)
    return ConfigEntry.model_validate(entry)


@router.delete("/{key}", response_model=ConfigEntry, summary="Reset a key to the layer below")
async def reset_config(
    key: str, actor: ActorDep, db: DbDep, tenant: TenantQuery = None, osf: OsfQuery = None
) -> ConfigEntry:
    entry: dict[str, Any] = await config.reset_config(db, actor, key, tenant, osf)
    return ConfigEntry.model_validate(entry)
