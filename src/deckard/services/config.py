"""Layered configuration (QVD's ``cfg(key, tenant)``): built-in default → global row (tenant 0) → tenant row
→ OSF row (``osf_config``, only for keys marked ``per_osf``: egress and session policies differ per OSF).

Why in the database: every node, broker and API process of a farm must read the same value, and an
administrator changes it once with ``deckard config set``.  ``get_config`` is what the rest of Deckard calls;
values are stored as JSON text and always come back with the key's type.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database, prepared
from deckard.model.config_keys import KEYS, ConfigKey, config_key, parse_value
from deckard.model.entities import utcnow
from deckard.model.errors import BadInput
from deckard.services.audit import MASK
from deckard.services.context import Actor, require, require_supertenant
from deckard.services.events import publish
from deckard.services.tenant_lookup import find_osf, find_tenant

GLOBAL = 0  # the global layer's tenant_id
# a check of a new value against the farm (the egress policy must not open the farm): (conn, key, value)
ValueCheck = Callable[[AsyncConnection, str, Any], Awaitable[None]]
# limits a tenant lives under, not choices it makes: only supertenant administrators set them, on any layer
# (``auth.oidc.admin_groups`` and ``auth.ldap.admin_groups`` grant roles: a tenant administrator could otherwise
# map a group to a role stronger than their own)
FARM_OWNER_KEYS = frozenset({"image.max_upload_mib", "auth.oidc.admin_groups", "auth.ldap.admin_groups"})


Rows = dict[tuple[int | str, str], Any]  # (tenant id, key) → value; ("osf", key) for the OSF layer

# built once (every start and login reads the layers): SQLAlchemy builds and keys a statement made anew at each
# call, ~0.1 ms of Python a statement, more than SQLite takes to run it
_LAYER_ROWS = prepared(
    sa.select(t.config.c.tenant_id, t.config.c.key, t.config.c.value).where(
        t.config.c.tenant_id.in_(sa.bindparam("layers", expanding=True)),
        t.config.c.key.in_(sa.bindparam("keys", expanding=True)),
    )
)
_OSF_ROWS = prepared(
    sa.select(t.osf_config.c.key, t.osf_config.c.value).where(
        t.osf_config.c.osf_id == sa.bindparam("osf_id"), t.osf_config.c.key.in_(sa.bindparam("keys", expanding=True))
    )
)


async def _rows(conn: AsyncConnection, tenant_id: int | None, keys: list[str], osf_id: int | None = None) -> Rows:
    layers = [GLOBAL] if tenant_id is None else [GLOBAL, tenant_id]
    result = await conn.execute(_LAYER_ROWS, {"layers": layers, "keys": keys})
    rows: Rows = {(int(r.tenant_id), str(r.key)): json.loads(r.value) for r in result}
    if osf_id is not None:
        result = await conn.execute(_OSF_ROWS, {"osf_id": osf_id, "keys": keys})
        rows.update({("osf", str(r.key)): json.loads(r.value) for r in result})
    return rows


def _resolve(key: ConfigKey, rows: Rows, tenant_id: int | None) -> tuple[Any, str]:
    if key.per_osf and ("osf", key.name) in rows:
        return rows[("osf", key.name)], "osf"
    if key.per_tenant and tenant_id not in (None, GLOBAL) and (tenant_id, key.name) in rows:
        return rows[(tenant_id, key.name)], "tenant"
    if (GLOBAL, key.name) in rows:
        return rows[(GLOBAL, key.name)], "global"
    return key.default, "default"


async def read_config(conn: AsyncConnection, key: str, tenant_id: int | None, osf_id: int | None = None) -> Any:
    """``get_config`` inside a transaction the caller already holds."""
    k = config_key(key)
    return _resolve(k, await _rows(conn, tenant_id, [key], osf_id), tenant_id)[0]


class GuestSwitches(NamedTuple):
    """What a guest's start takes from the settings (a warm pool compares them to replace guests started the
    other way)."""

    mounter: bool  # its init may fork the mounter of QVD clients' shared folders
    glx: bool  # OpenGL on its display (``display.glx``)


GUEST_SWITCH_KEYS = ("nx.shares.in_containers", "display.glx")


def guest_switches_of(values: dict[str, tuple[Any, str]], *, driver: str, keep_overlay: bool) -> GuestSwitches:
    """The switches from :data:`GUEST_SWITCH_KEYS` as :func:`read_keys_sourced` resolved them.  The mounter
    (``nx.shares.in_containers``, docs/security.md): only for a container that keeps no overlay (a kept one lets
    root leave another init, or another ``python3``, for the next start), on a farm that allows it."""
    allowed = driver == "container" and not keep_overlay and bool(values["nx.shares.in_containers"][0])
    return GuestSwitches(allowed, bool(values["display.glx"][0]))


async def guest_switches(
    conn: AsyncConnection, tenant_id: int, osf_id: int, *, driver: str, keep_overlay: bool
) -> GuestSwitches:
    """Both switches in one read of the layers."""
    values = await read_keys_sourced(conn, GUEST_SWITCH_KEYS, tenant_id, osf_id)
    return guest_switches_of(values, driver=driver, keep_overlay=keep_overlay)


async def read_keys_sourced(
    conn: AsyncConnection, names: Iterable[str], tenant_id: int | None, osf_id: int | None = None
) -> dict[str, tuple[Any, str]]:
    """The named keys resolved in one query per layer table: ``{key: (value, source)}``, the source being the
    layer the value came from (``default``, ``global``, ``tenant`` or ``osf``)."""
    return await _sourced(conn, [config_key(name) for name in names], tenant_id, osf_id)


async def read_configs_sourced(
    conn: AsyncConnection, prefix: str, tenant_id: int | None, osf_id: int | None = None
) -> dict[str, tuple[Any, str]]:
    """Every key under ``prefix``, as :func:`read_keys_sourced` resolves them."""
    return await _sourced(conn, [k for k in KEYS.values() if k.name.startswith(prefix)], tenant_id, osf_id)


async def _sourced(
    conn: AsyncConnection, keys: list[ConfigKey], tenant_id: int | None, osf_id: int | None
) -> dict[str, tuple[Any, str]]:
    rows = await _rows(conn, tenant_id, [k.name for k in keys], osf_id)
    return {k.name: _resolve(k, rows, tenant_id) for k in keys}


async def read_configs(
    conn: AsyncConnection, prefix: str, tenant_id: int | None, osf_id: int | None = None
) -> dict[str, Any]:
    """Every key under ``prefix`` (``auth.``) resolved for a tenant (and OSF) in one query: ``{key: value}``."""
    return {k: v for k, (v, _source) in (await read_configs_sourced(conn, prefix, tenant_id, osf_id)).items()}


async def get_config(db: Database, key: str, tenant_id: int | None = None, osf_id: int | None = None) -> Any:
    """The effective value of ``key`` for a tenant (``None``: the global value) and, for ``per_osf`` keys, an
    OSF, typed as the catalogue says."""
    async with db.connect() as conn:
        return await read_config(conn, key, tenant_id, osf_id)


@dataclass
class Layer:
    """Where an administrator reads or writes: the global layer, a tenant's, or an OSF's."""

    tenant_id: int | None
    osf_id: int | None = None


async def _target(conn: AsyncConnection, actor: Actor, tenant: str | int | None, osf: str | int | None) -> Layer:
    if osf is not None:
        if tenant is not None and not str(osf).isdigit() and "@" not in str(osf):
            osf = f"{osf}@{(await find_tenant(conn, actor, tenant))['name']}"
        osf_id, tenant_id = await find_osf(conn, actor, osf)
        return Layer(tenant_id, osf_id)
    if tenant is None:
        return Layer(None if actor.all_tenants else actor.tenant_id)
    return Layer(int((await find_tenant(conn, actor, tenant))["id"]))


def _describe(key: ConfigKey, value: Any, source: str) -> dict[str, Any]:
    return {
        "key": key.name,
        "value": MASK if key.secret and value else value,
        "default": key.default,
        "source": source,
        "type": key.type.__name__,
        "per_tenant": key.per_tenant,
        "per_osf": key.per_osf,
        "description": key.description,
        "secret": key.secret,
    }


async def list_config(
    db: Database,
    actor: Actor,
    key: str | None = None,
    tenant: str | int | None = None,
    osf: str | int | None = None,
) -> list[dict[str, Any]]:
    """Effective values as ``actor`` sees them (their own tenant's, for a confined administrator); with ``osf``,
    as that OSF's desktops get them."""
    require(actor, "config.see")
    keys = [config_key(key)] if key else list(KEYS.values())
    async with db.connect() as conn:
        layer = await _target(conn, actor, tenant, osf)
        rows = await _rows(conn, layer.tenant_id, [k.name for k in keys], layer.osf_id)
    return [_describe(k, *_resolve(k, rows, layer.tenant_id)) for k in keys]


def _check_layer(actor: Actor, key: ConfigKey, layer: Layer) -> None:
    if key.name in FARM_OWNER_KEYS:
        require_supertenant(actor, f"change {key.name}")
    if layer.osf_id is not None:
        if not key.per_osf:
            raise BadInput(f"{key.name} cannot differ per OSF: set it for the tenant", code="tenant_config_key")
        return
    if layer.tenant_id is None or layer.tenant_id == GLOBAL:
        if not actor.all_tenants:
            raise BadInput(f"{key.name} can only be set for the whole farm", code="global_config_key")
        layer.tenant_id = GLOBAL
        return
    if not key.per_tenant:
        raise BadInput(f"{key.name} applies to the whole farm: it cannot be set per tenant", code="global_config_key")


async def _clear(conn: AsyncConnection, layer: Layer, key: str) -> None:
    if layer.osf_id is not None:
        oc = t.osf_config
        await conn.execute(sa.delete(oc).where(oc.c.osf_id == layer.osf_id, oc.c.key == key))
    else:
        await conn.execute(sa.delete(t.config).where(t.config.c.tenant_id == layer.tenant_id, t.config.c.key == key))


async def _changed(db: Database, key: ConfigKey, layer: Layer) -> dict[str, Any]:
    async with db.connect() as conn:
        rows = await _rows(conn, layer.tenant_id, [key.name], layer.osf_id)
    await publish(db, "updated", "config", key.name, layer.tenant_id or None)
    return _describe(key, *_resolve(key, rows, layer.tenant_id))


async def set_config(
    db: Database,
    actor: Actor,
    key: str,
    value: Any,
    tenant: str | int | None = None,
    osf: str | int | None = None,
    *,
    check: ValueCheck | None = None,
) -> dict[str, Any]:
    require(actor, "config.update")
    k = config_key(key)
    parsed = parse_value(k, value)
    if k.secret and parsed == MASK:  # what `config get` shows for a set secret, sent back unchanged
        raise BadInput(
            f"type the new value of {key}: {MASK} only stands for the one that is set", code="bad_config_value"
        )
    async with db.begin() as conn:
        layer = await _target(conn, actor, tenant, osf)
        _check_layer(actor, k, layer)
        if check is not None:
            await check(conn, key, parsed)
        await _clear(conn, layer, key)
        row = {"key": key, "value": json.dumps(parsed), "updated_at": utcnow()}
        if layer.osf_id is not None:
            await conn.execute(sa.insert(t.osf_config).values(osf_id=layer.osf_id, **row))
        else:
            await conn.execute(sa.insert(t.config).values(tenant_id=layer.tenant_id, **row))
    return await _changed(db, k, layer)


async def reset_config(
    db: Database, actor: Actor, key: str, tenant: str | int | None = None, osf: str | int | None = None
) -> dict[str, Any]:
    """Remove the row of the actor's layer, so the next layer down shows through."""
    require(actor, "config.update")
    k = config_key(key)
    async with db.begin() as conn:
        layer = await _target(conn, actor, tenant, osf)
        _check_layer(actor, k, layer)
        await _clear(conn, layer, key)
    return await _changed(db, k, layer)
