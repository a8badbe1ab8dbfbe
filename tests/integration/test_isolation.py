"""Tenant isolation, generated from the app's OpenAPI route list so that a new route cannot skip it.

Two tenants in multi-tenant mode, each with an administrator (role "Tenant admin"), users, a desktop, an image,
a custom role.  The administrator of tenant A calls **every route whose path names an object** (any method) with
tenant B's ids, with a valid body built from the route's OpenAPI schema, and must get 404 each time; afterwards the
whole database (every table but the audit log, tokens and login counters) must be exactly as before.

The rule for which routes are called, and why the others are not:

* the answer must be 404, or a 422 that a missing id gets just the same (the body was checked before the
  lookup, which reveals nothing);
* a route is called when its path has an object parameter: any path parameter except the *non-object* ones
  in ``NOT_OBJECTS`` (``action`` of a bulk route, an image ``tag``, a config ``key``, a property's ``object_type``
  and ``key``), which select *what* to do, not *which* object;
* routes without an object parameter (lists, creates, ``/config/{key}``, ``/auth/*``, ``/health``, events) are
  skipped: they take no id to misuse (lists are confined by ``test_tenancy_acl.py``);
* ``FARM_WIDE`` resources (nodes) belong to no tenant, so they have no "tenant B" to protect;
* bulk routes (``/{resource}/bulk/{action}``) are called too, with B's ids in the body: they must fail for every
  item (a 404, or an answer whose ``ok`` list is empty) and change nothing.

A route whose resource this test does not know fails the test with a message saying what to add to
``B_OBJECTS``: that is how a new route is kept from skipping the check.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx
import sqlalchemy as sa
import test_api
from test_api import Farm, call

from deckard.db import schema as t
from deckard.model.entities import utcnow

farm = test_api.farm  # the real API with TLS, shared with test_api.py

NOT_OBJECTS = {"action", "tag", "key", "object_type"}
FARM_WIDE = {"nodes"}
NOT_SNAPSHOTTED = {"audit_log", "admin_tokens", "login_failures"}
PASSWORD = "isolation-pass"
MISSING_ID = 2_000_000_001


def _code(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


# ---- request bodies from the OpenAPI schema ------------------------------------------------------------------


def _resolve(schema: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = doc["components"]["schemas"][name]
    return schema


def example(schema: dict[str, Any], doc: dict[str, Any], name: str = "") -> Any:
    """A plausible value that satisfies ``schema`` (every property filled, so a leak would change something)."""
    schema = _resolve(schema, doc)
    for combo in ("anyOf", "oneOf", "allOf"):
        if combo in schema:
            options = [_resolve(s, doc) for s in schema[combo] if _resolve(s, doc).get("type") != "null"]
            return example(options[0], doc, name) if options else None
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    if "default" in schema and schema["default"] is not None and schema.get("type") not in ("object", "array"):
        kind = schema.get("type")
        if kind != "string":
            return schema["default"]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        if not props and schema.get("additionalProperties"):
            extra = schema["additionalProperties"]
            return {"isolation": example(extra if isinstance(extra, dict) else {"type": "string"}, doc)}
        return {k: example(v, doc, k) for k, v in props.items()}
    if kind == "array":
        return [example(schema.get("items", {"type": "string"}), doc, name)]
    if kind == "integer":
        return int(schema.get("minimum", schema.get("exclusiveMinimum", 0) + 1 if "exclusiveMinimum" in schema else 1))
    if kind == "number":
        return float(schema.get("minimum", 1))
    if kind == "boolean":
        return True
    if kind == "string":
        if schema.get("format") == "date-time":
            return (utcnow() + dt.timedelta(hours=1)).isoformat()
        if "password" in name:
            return PASSWORD
        lo, hi = int(schema.get("minLength", 1)), int(schema.get("maxLength", 64))
        text = ("isolation" * 8)[: max(lo, min(hi, 9))]
        return text
    return "isolation"


def _param_value(param: dict[str, Any], doc: dict[str, Any]) -> str:
    return str(example(param.get("schema", {"type": "string"}), doc, param["name"]))


# ---- the two tenants -----------------------------------------------------------------------------------------


async def _setup(farm: Farm) -> tuple[httpx.AsyncClient, dict[str, Any]]:
    root = await farm.admin_client()
    await call(root.set_config, "tenancy.multi", True)
    ids: dict[str, Any] = {}
    for tenant, admin in (("acme", "ann"), ("beta", "bob")):
        ids[tenant] = (await call(root.create_tenant, tenant)).id
        await call(root.create_admin, admin, PASSWORD, tenant=tenant, roles=["Tenant admin"])
    a, b = farm.client(), farm.client()
    await call(a.login, "ann", PASSWORD, "acme")
    await call(b.login, "bob", PASSWORD, "beta")
    await call(a.create_user, "alice", "pw-alice")
    await call(a.create_desktop, "alice-1", "alice")
    user = await call(b.create_user, "bruno", "pw-bruno")
    desk = await call(b.create_desktop, "bruno-1", "bruno")
    role = await call(b.create_role, "beta-role", grants=[("user.see", True)])
    network = await call(b.create_network, "beta-net", "10.77.0.0/24")
    osf = next(o for o in await call(b.list_osfs) if o.tenant_id == ids["beta"])
    async with farm.db.begin() as conn:
        res = await conn.execute(
            sa.insert(t.disk_images)
            .values(osf_id=osf.id, version="1", path="beta-1.tar", state="ready", created_at=utcnow())
            .returning(t.disk_images.c.id)
        )
        image_id = int(res.scalar_one())
        res = await conn.execute(  # a row is enough: every volume route looks the volume up before its file
            sa.insert(t.volumes)
            .values(tenant_id=ids["beta"], name="beta-vol", size_gib=1, state="available", created_at=utcnow())
            .returning(t.volumes.c.id)
        )
        volume_id = int(res.scalar_one())
    pool = await call(b.create_pool, str(osf.id), size=0)
    await call(b.set_properties, "user", user.id, {"floor": "3"})
    b_objects = {
        "tenants": ids["beta"],
        "admins": (await call(b.get_admin, "bob")).id,
        "roles": role.id,
        "users": user.id,
        "desktops": desk.id,
        "osfs": osf.id,
        "images": image_id,
        "volumes": volume_id,
        "pools": pool.id,
        "networks": network.id,  # the grant routes get it as {tenant} too: the network is looked up first
        "properties": {"user": user.id, "desktop": desk.id, "osf": osf.id, "image": image_id},
        "auth": (await call(b.create_own_token, "beta-script", 7)).id,
    }
    return farm.http(a.token), b_objects


async def _snapshot(farm: Farm) -> dict[str, list[tuple[Any, ...]]]:
    out: dict[str, list[tuple[Any, ...]]] = {}
    async with farm.db.connect() as conn:
        for table in t.metadata.sorted_tables:
            if table.name in NOT_SNAPSHOTTED:
                continue
            rows = await conn.execute(sa.select(table).order_by(*table.primary_key.columns))
            out[table.name] = [tuple(r) for r in rows]
    return out


def _object_params(op: dict[str, Any]) -> list[str]:
    return [p["name"] for p in op.get("parameters", []) if p["in"] == "path" and p["name"] not in NOT_OBJECTS]


def _body(op: dict[str, Any], doc: dict[str, Any], b_ids: list[int]) -> dict[str, Any]:
    content = op.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        body = example(content["application/json"]["schema"], doc)
        if isinstance(body, dict) and "ids" in body:
            body = {"ids": b_ids}  # a bulk action on B's objects, not on a filter
        return {"json": body}
    if content:
        return {"content": b"isolation", "headers": {"content-type": next(iter(content))}}
    return {}


async def test_a_tenant_admin_gets_404_for_every_route_naming_another_tenants_object(farm: Farm) -> None:
    http, b_objects = await _setup(farm)
    async with http:
        doc = (await http.get("/openapi.json")).json()
        before = await _snapshot(farm)
        problems: list[str] = []
        called = 0
        for path, ops in doc["paths"].items():
            resource = path.removeprefix("/api/v1/").split("/")[0]
            for method, op in ops.items():
                params = _object_params(op)
                is_bulk = "/bulk/" in path
                if resource in FARM_WIDE or not (params or is_bulk):
                    continue
                if resource not in b_objects:
                    problems.append(f"{method.upper()} {path}: add tenant B's {resource!r} object to B_OBJECTS")
                    continue
                targets: list[tuple[dict[str, str], int]] = []
                target = b_objects[resource]
                if isinstance(target, dict):  # /properties/{object_type}/{id}
                    targets = [({"object_type": k, "id": str(v)}, v) for k, v in target.items()]
                else:
                    targets = [({p: str(target) for p in params}, target)]
                for values, b_id in targets:
                    url = path.removeprefix("/api/v1")
                    for p in op.get("parameters", []):
                        if p["in"] == "path":
                            url = url.replace("{" + p["name"] + "}", values.get(p["name"]) or _param_value(p, doc))
                    query = {
                        p["name"]: _param_value(p, doc)
                        for p in op.get("parameters", [])
                        if p["in"] == "query" and p.get("required")
                    }
                    r = await http.request(method, url, params=query, **_body(op, doc, [b_id]))
                    called += 1
                    if is_bulk and not params and r.status_code < 300:
                        if r.json().get("ok"):
                            problems.append(f"{method.upper()} {url}: bulk acted on B's ids: {r.text[:200]}")
                    elif r.status_code == 422:
                        # input checked before the lookup: fine only if a missing id gets the very same answer
                        missing = url.replace(str(b_id), str(MISSING_ID))
                        m = await http.request(method, missing, params=query, **_body(op, doc, [MISSING_ID]))
                        if (m.status_code, _code(m)) != (422, _code(r)):
                            problems.append(f"{method.upper()} {url}: 422 unlike a missing id's {m.status_code}")
                    elif r.status_code != 404:
                        problems.append(f"{method.upper()} {url}: {r.status_code} {r.text[:200]}")
        after = await _snapshot(farm)
    assert called > 20, "the route list was not walked"
    assert not problems, "\n".join(problems)
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, f"tenant A's calls changed tables {changed}"
