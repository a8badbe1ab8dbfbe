"""Layered configuration (QVD's ``cfg(key, tenant)``): built-in default → global row (tenant 0) → tenant row.

Why in the database: every node, broker and API process of a farm must read the same value, and an
administrator changes it once with ``deckard config set``.  ``get_config`` is what the rest of Deckard calls;
values are stored as JSON text and always come back with the key's type.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.config_keys import KEYS, ConfigKey, config_key, parse_value
from deckard.model.entities import utcnow
from deckard.model.errors import BadInput
from deckard.services.audit import MASK
from deckard.services.context import Actor, require, require_supertenant
from deckard.services.events import publish
from deckard.services.tenant_lookup import find_tenant

GLOBAL = 0  # the global layer's tenant_id
# limits a tenant lives under, not choices it makes: only supertenant administrators set them, on any layer
# (``auth.oidc.admin_groups`` and ``auth.ldap.admin_groups`` grant roles: a tenant administrator could otherwise
# map a group to a role stronger than their own)
FARM_OWNER_KEYS = frozenset({"image.max_upload_mib", "auth.oidc.admin_groups", "auth.ldap.admin_groups"})


async def _rows(conn: AsyncConnection, tenant_id: int | None, keys: list[str]) -> dict[tuple[int, str], Any]:
    layers = [GLOBAL] if tenant_id is None else [GLOBAL, tenant_id]
    q = sa.select(t.config.c.tenant_id, t.config.c.key, t.config.c.value).where(
        t.config.c.tenant_id.in_(layers), t.config.c.key.in_(keys)
    )
    return {(int(r.tenant_id), str(r.key)): json.loads(r.value) for r in await conn.execute(q)}


def _resolve(key: ConfigKey, rows: dict[tuple[int, str], Any], tenant_id: int | None) -> tuple[Any, str]:
    if key.per_tenant and tenant_id not in (None, GLOBAL) and (tenant_id, key.name) in rows:
        return rows[(tenant_id, key.name)], "tenant"
    if (GLOBAL, key.name) in rows:
        return rows[(GLOBAL, key.name)], "global"
    return key.default, "default"


async def read_config(conn: AsyncConnection, key: str, tenant_id: int | None) -> Any:
    """``get_config`` inside a transaction the caller already holds."""
    k = config_key(key)
    return _resolve(k, await _rows(conn, tenant_id, [key]), tenant_id)[0]


async def read_configs(conn: AsyncConnection, prefix: str, tenant_id: int | None) -> dict[str, Any]:
    """Every key under ``prefix`` (``auth.``) resolved for a tenant in one query: ``{key: value}``."""
    keys = [k for k in KEYS.values() if k.name.startswith(prefix)]
    rows = await _rows(conn, tenant_id, [k.name for k in keys])
    return {k.name: _resolve(k, rows, tenant_id)[0] for k in keys}


async def get_config(db: Database, key: str, tenant_id: int | None = None) -> Any:
    """The effective value of ``key`` for a tenant (``None``: the global value), typed as the catalogue says."""
    async with db.connect() as conn:
        return await read_config(conn, key, tenant_id)


async def _target_tenant(conn: AsyncConnection, actor: Actor, tenant: str | int | None) -> int | None:
    if tenant is None:
        return None if actor.all_tenants else actor.tenant_id
    return int((await find_tenant(conn, actor, tenant))["id"])


def _describe(key: ConfigKey, value: Any, source: str) -> dict[str, Any]:
    return {
        "key": key.name,
        "value": MASK if key.secret and value else value,
        "default": key.default,
        "source": source,
        "type": key.type.__name__,
        "per_tenant": key.per_tenant,
        "description": key.description,
        "secret": key.secret,
    }


async def list_config(
    db: Database, actor: Actor, key: str | None = None, tenant: str | int | None = None
) -> list[dict[str, Any]]:
    """Effective values as ``actor`` sees them (their own tenant's, for a confined administrator)."""
    require(actor, "config.see")
    keys = [config_key(key)] if key else list(KEYS.values())
    async with db.connect() as conn:
        tenant_id = await _target_tenant(conn, actor, tenant)
        rows = await _rows(conn, tenant_id, [k.name for k in keys])
    return [_describe(k, *_resolve(k, rows, tenant_id)) for k in keys]


def _layer_for(actor: Actor, key: ConfigKey, tenant_id: int | None) -> int:
    if key.name in FARM_OWNER_KEYS:
        require_supertenant(actor, f"change {key.name}")
    if tenant_id is None or tenant_id == GLOBAL:
        if not actor.all_tenants:
            raise BadInput(f"{key.name} can only be set for the whole farm", code="global_config_key")
        return GLOBAL
    if not key.per_tenant:
        raise BadInput(f"{key.name} applies to the whole farm: it cannot be set per tenant", code="global_config_key")
    return tenant_id


async def set_config(
    db: Database, actor: Actor, key: str, value: Any, tenant: str | int | None = None
) -> dict[str, Any]:
    require(actor, "config.update")
    k = config_key(key)
    parsed = parse_value(k, value)
    if k.secret and parsed == MASK:  # what `config get` shows for a set secret, sent back unchanged
        raise BadInput(
            f"type the new value of {key}: {MASK} only stands for the one that is set", code="bad_config_value"
        )
    async with db.begin() as conn:
        layer = _layer_for(actor, k, await _target_tenant(conn, actor, tenant))
        await conn.execute(sa.delete(t.config).where(t.config.c.tenant_id == layer, t.config.c.key == key))
        await conn.execute(
            sa.insert(t.config).values(tenant_id=layer, key=key, value=json.dumps(parsed), updated_at=utcnow())
        )
        rows = await _rows(conn, layer, [key])
    await publish(db, "updated", "config", key, layer or None)
    return _describe(k, *_resolve(k, rows, layer))


async def reset_config(db: Database, actor: Actor, key: str, tenant: str | int | None = None) -> dict[str, Any]:
    """Remove the row of the actor's layer, so the next layer down shows through."""
    require(actor, "config.update")
    k = config_key(key)
    async with db.begin() as conn:
        layer = _layer_for(actor, k, await _target_tenant(conn, actor, tenant))
        await conn.execute(sa.delete(t.config).where(t.config.c.tenant_id == layer, t.config.c.key == key))
        rows = await _rows(conn, layer, [key])
    await publish(db, "updated", "config", key, layer or None)
    return _describe(k, *_resolve(k, rows, layer))
