"""Users of desktops: create, list, change password, block, delete, and password authentication for the broker.

Admin use cases check the actor's ACL first (``user.<action>``; a password change needs ``user.update.password``,
blocking ``user.block``) and publish ``created``/``updated``/``deleted`` on the event stream after committing.

A user's home is theirs alone: it is named by ``users.home_key`` (random per account, db/schema.py), never by the
login, and deleting the user archives it (``storage/homes-archive/<tenant>/<login>-<id>-<time>``, out of reach of
every desktop) or deletes it, as ``users.home_on_delete`` says for the user's tenant; the audit log records
where it went.  A user with desktops is not deleted (409 ``has_dependents``): their desktops go first, so no
running desktop still has the home mounted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from deckard.auth.local import hash_password
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import utcnow
from deckard.model.errors import BadInput, Conflict, NotFound, Unavailable
from deckard.model.guest_metadata import load_ssh_keys, parse_ssh_keys
from deckard.model.login_rules import parse_hours, parse_networks
from deckard.runtime.paths import FarmPaths
from deckard.services import second_factor
from deckard.services.audit import append_audit
from deckard.services.config import read_config
from deckard.services.context import Actor, require, require_fields, visible, visible_rows
from deckard.services.events import publish
from deckard.services.listing import ListQuery, run_list
from deckard.services.rows import as_dict, one_row
from deckard.services.tenancy import DEFAULT_TENANT, tenant_id_by_name, tenant_name
from deckard.services.tenant_lookup import resolve_tenant_for_create

LOGIN_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789._-")
LOGIN_SEPARATORS = "@#"  # QVD: user@tenant or user#tenant


def check_login(login: str) -> str:
    if not login or len(login) > 32 or not set(login) <= LOGIN_CHARS or login[0] in ".-":
        raise BadInput(
            f"invalid login {login!r}: use 1-32 lowercase letters, digits, '.', '_' or '-'", code="bad_login"
        )
    return login


def tenant_filter(actor: Actor, column: sa.ColumnElement[int]) -> sa.ColumnElement[bool]:
    return sa.true() if actor.all_tenants else column == actor.tenant_id


def split_login(full: str) -> tuple[str, str]:
    """``alice@acme`` → ("alice", "acme"); without a separator the default tenant."""
    for sep in LOGIN_SEPARATORS:
        if sep in full:
            login, tenant = full.rsplit(sep, 1)
            return login, tenant
    return full, DEFAULT_TENANT


_USER_COLS = [
    t.users.c.id,
    t.users.c.tenant_id,
    t.users.c.login,
    t.users.c.blocked,
    t.users.c.description,
    t.users.c.created_at,
    t.users.c.origin,
    t.users.c.display_name,
    t.users.c.mail,
    t.users.c.allowed_networks,
    t.users.c.allowed_hours,
]
FIELDS: dict[str, sa.ColumnElement[Any]] = {c.key: c for c in _USER_COLS}
# one user's answer adds their public SSH keys (a JSON list in the table; lists leave them out)
_ONE_USER_COLS = [*_USER_COLS, t.users.c.ssh_keys]


async def create_user(
    db: Database,
    actor: Actor,
    login: str,
    password: str | None,
    *,
    tenant_id: int | None = None,
    tenant: str | int | None = None,
    description: str = "",
) -> dict[str, Any]:
    """Create a user; ``tenant`` (name or id) is where a supertenant administrator puts it (default: default)."""
    require(actor, "user.create")
    check_login(login)
    if password is not None and len(password) < 4:
        raise BadInput("the password is too short: use at least 4 characters", code="weak_password")
    tid = tenant_id if tenant_id is not None else actor.tenant_id
    pw_hash = await asyncio.to_thread(hash_password, password) if password is not None else None
    async with db.begin() as conn:
        if tenant is not None or (tid is None and actor.kind == "admin"):
            tid = await resolve_tenant_for_create(conn, actor, tenant)
        elif tid is None:
            tid = await tenant_id_by_name(conn, DEFAULT_TENANT)
        exists = await conn.execute(sa.select(t.users.c.id).where(t.users.c.tenant_id == tid, t.users.c.login == login))
        if exists.first():
            raise Conflict(f"a user named {login!r} already exists", code="duplicate")
        res = await conn.execute(
            sa.insert(t.users)
            .values(tenant_id=tid, login=login, password_hash=pw_hash, description=description, created_at=utcnow())
            .returning(*_USER_COLS)
        )
        row = {**as_dict(res.one()), "ssh_keys": []}
    await publish(db, "created", "user", row["id"], row["tenant_id"], login=login)
    return visible(actor, "user", row)


def user_scope(actor: Actor) -> sa.Select[Any]:
    return sa.select(*_USER_COLS).where(tenant_filter(actor, t.users.c.tenant_id))


async def list_users(db: Database, actor: Actor, q: ListQuery | None = None) -> tuple[list[dict[str, Any]], int]:
    """A page of users and the total matching ``q``."""
    require(actor, "user.see")
    q = q or ListQuery(per_page=10**9)
    require_fields(actor, "user", q.named_fields)
    if q.fields and "id" not in q.fields:
        q = dataclasses.replace(q, fields=[*q.fields, "id"])  # answers always carry the id
    async with db.connect() as conn:
        rows, total = await run_list(conn, user_scope(actor), q, FIELDS, t.users.c.id)
    return visible_rows(actor, "user", rows), total


async def find_user_id(db: Database, actor: Actor, ref: str | int) -> int:
    """A user by id or login, visible to the actor."""
    async with db.connect() as conn:
        cond = t.users.c.id == int(ref) if str(ref).isdigit() else t.users.c.login == str(ref)
        q = sa.select(t.users.c.id).where(cond, tenant_filter(actor, t.users.c.tenant_id))
        row = (await conn.execute(q)).first()
    if not row:
        raise NotFound(f"no user {ref!r}", code="user_not_found")
    return int(row.id)


async def _row(db: Database, actor: Actor, user_id: int) -> dict[str, Any]:
    q = sa.select(*_ONE_USER_COLS).where(t.users.c.id == user_id, tenant_filter(actor, t.users.c.tenant_id))
    row = await one_row(db, q, "user", user_id)
    row["ssh_keys"] = load_ssh_keys(row.get("ssh_keys"))
    return row


async def get_user(db: Database, actor: Actor, user_id: int) -> dict[str, Any]:
    require(actor, "user.see")
    return visible(actor, "user", await _row(db, actor, user_id))


async def update_user(
    db: Database,
    actor: Actor,
    user_id: int,
    *,
    password: str | None = None,
    blocked: bool | None = None,
    description: str | None = None,
    allowed_networks: str | None = None,
    allowed_hours: str | None = None,
    ssh_keys: list[str] | None = None,
) -> dict[str, Any]:
    """Change a user; ``allowed_networks`` / ``allowed_hours`` are the user's own login rules
    (``model/login_rules.py``; "" = the tenant's), checked before they are stored; ``ssh_keys`` replaces the
    user's public SSH keys (422 ``bad_ssh_key``; ``[]`` removes them all)."""
    if password is not None:
        require(actor, "user.update.password")
    if blocked is not None:
        require(actor, "user.block")
    if any(v is not None for v in (description, allowed_networks, allowed_hours, ssh_keys)):
        require(actor, "user.update")
    if allowed_networks is not None:
        parse_networks(allowed_networks)
    if allowed_hours is not None:
        parse_hours(allowed_hours)
    keys = parse_ssh_keys(ssh_keys) if ssh_keys is not None else None
    row = await _row(db, actor, user_id)
    values: dict[str, Any] = {}
    if password is not None:
        if len(password) < 4:
            raise BadInput("the password is too short: use at least 4 characters", code="weak_password")
        values["password_hash"] = await asyncio.to_thread(hash_password, password)
    if blocked is not None:
        values["blocked"] = blocked
    if description is not None:
        values["description"] = description
    for key, value in (("allowed_networks", allowed_networks), ("allowed_hours", allowed_hours)):
        if value is not None:
            values[key] = value.strip()
    if keys is not None:
        values["ssh_keys"] = json.dumps(keys)
    if values:
        async with db.begin() as conn:
            await conn.execute(sa.update(t.users).where(t.users.c.id == user_id).values(**values))
        changed = sorted("password" if k == "password_hash" else k for k in values)
        await publish(db, "updated", "user", user_id, row["tenant_id"], fields=changed)
    return visible(actor, "user", await _row(db, actor, user_id))


async def own_ssh_keys(db: Database, user_id: int) -> list[str]:
    """The portal user's own public SSH keys."""
    async with db.connect() as conn:
        stored = (await conn.execute(sa.select(t.users.c.ssh_keys).where(t.users.c.id == user_id))).scalar_one()
    return load_ssh_keys(stored)


async def set_own_ssh_keys(db: Database, user_id: int, tenant_id: int, keys: list[str]) -> list[str]:
    """The portal user replaces their own public SSH keys (422 ``bad_ssh_key``): what is stored now.  Their
    desktops learn the keys from the metadata service at their next boot."""
    checked = parse_ssh_keys(keys)
    async with db.begin() as conn:
        await conn.execute(sa.update(t.users).where(t.users.c.id == user_id).values(ssh_keys=json.dumps(checked)))
    await publish(db, "updated", "user", user_id, tenant_id, fields=["ssh_keys"])
    return checked


HOME_ON_DELETE = ("archive", "delete")


def _move_home(home: Path, target: Path) -> bool:
    """Move the home out of ``homes/`` (False: there was none); one rename when both are on the storage."""
    if not home.exists() and not home.is_symlink():
        return False
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.rename(home, target)
    except OSError as e:
        if e.errno != errno.EXDEV:  # another filesystem: copy, then remove
            raise
        shutil.move(str(home), str(target))
    return True


async def delete_user(db: Database, actor: Actor, user_id: int, paths: FarmPaths) -> dict[str, Any]:
    """Delete a user and archive or delete their home (``users.home_on_delete``); what happened to the home."""
    require(actor, "user.delete")
    row = await _row(db, actor, user_id)
    login = str(row["login"])
    moved = False
    home = target = None
    mode = "archive"
    try:
        async with db.begin() as conn:
            n = (
                await conn.execute(
                    sa.select(sa.func.count()).select_from(t.desktops).where(t.desktops.c.user_id == user_id)
                )
            ).scalar_one()
            if n:
                raise Conflict(f"the user still has {n} desktop(s): delete them first", code="has_dependents")
            tenant = await tenant_name(conn, int(row["tenant_id"]))
            configured = await read_config(conn, "users.home_on_delete", int(row["tenant_id"]))
            mode = configured if configured in HOME_ON_DELETE else "archive"  # unknown: keep the data
            key = (await conn.execute(sa.select(t.users.c.home_key).where(t.users.c.id == user_id))).scalar_one()
            home = paths.user_home(tenant, str(key)) if key else None
            stamp = utcnow().strftime("%Y%m%dT%H%M%S%fZ")
            target = paths.homes_archive / tenant / f"{login}-{user_id}-{stamp}"
            if home is not None:
                try:
                    moved = await asyncio.to_thread(_move_home, home, target)
                except OSError as e:
                    raise Unavailable(
                        f"the user's home {home} could not be moved ({e.strerror or e}): nothing was deleted; "
                        "check the API's access to the storage and retry",
                        code="home_not_moved",
                    ) from None
            await second_factor.forget(conn, "user", user_id)
            await conn.execute(sa.delete(t.users).where(t.users.c.id == user_id))
    except BaseException:
        if moved and home is not None and target is not None:  # the user stays: so does their home
            await asyncio.to_thread(os.rename, target, home)
        raise
    if moved and mode == "delete" and target is not None:
        await asyncio.to_thread(shutil.rmtree, target, True)
    outcome = {
        "login": login,
        "home": str(home) if home is not None else None,
        "home_existed": moved,
        "home_on_delete": mode,
        "archived_to": str(target) if moved and mode == "archive" else None,
    }
    await append_audit(
        db,
        action=f"user.home.{mode}",
        result="ok",
        admin_id=actor.id,
        admin_name=actor.name,
        tenant_id=int(row["tenant_id"]),
        object_type="user",
        object_id=str(user_id),
        arguments=outcome,
        source=actor.source,
    )
    await publish(db, "deleted", "user", user_id, row["tenant_id"], login=login)
    return outcome
