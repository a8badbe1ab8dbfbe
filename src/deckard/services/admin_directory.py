"""Administrators whose roles come from outside Deckard: the groups a single sign-on provider or a directory says
a person is in, mapped to roles by the tenant's configuration::

    auth.oidc.admin_groups = vdi-admins = Tenant admin; vdi-helpdesk = Operator
    auth.ldap.admin_groups = cn=vdi-admins,ou=groups,dc=example,dc=org = Tenant admin

Why one module for both: the rule is the same whoever vouches for the person (``services/sso.py`` for the WAT's
single sign-on, ``services/admins.py`` for a directory password), and a rule that grants roles must not drift
between two copies.  The first login creates the administrator (no password, ``origin`` oidc or ldap); every
login sets its roles to *exactly* the mapped ones, so removing someone from a group in the directory takes the
role away at their next login; a login with no mapped group takes every role away and ends the administrator's
sessions, and the caller refuses it.  An administrator of another origin (a password administrator) is never
taken over.

A directory's group DNs are compared as DNs (case and the spaces after commas do not matter, ``auth/ldap.py``'s
``normal_dn``); a provider's group names exactly.  A mapping that cannot be read, or that names a role the tenant
does not have, is refused (409) rather than read as something nobody meant.

The directory's own login is ``login_ldap``: the tenant's ``ldap`` plugin (``services/password_plugins.py``)
checks the password and lists the groups.  It is asked (``ldap_directory``) only for a name without a local
password, when the tenant's ``auth.chain`` names ``ldap`` and its ``auth.ldap.admin_groups`` is set.
``auth.ldap.required_group`` is not applied to administrators: their gate is ``auth.ldap.admin_groups`` (the
people who look after a farm are often not among its desktop users).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.auth.chain import Credentials, Verdict
from deckard.auth.ldap import normal_dn
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import utcnow
from deckard.model.errors import Conflict, PermissionDenied, Unauthenticated
from deckard.services import password_plugins
from deckard.services.config import read_configs
from deckard.services.events import publish
from deckard.services.roles import SUPERTENANT, SUPERTENANT_ID

log = structlog.get_logger("deckard.admin_directory")

_SESSION = "session"  # admin_tokens.kind of a login's token (services/admins.py imports this module, not back)


def _exact(group: str) -> str:
    return group


@dataclass(frozen=True)
class Source:
    """Where an administrator's groups come from, and how its refusals are named."""

    origin: str  # administrators.origin of the administrators it makes
    key: str  # the configuration key that maps its groups to roles
    bad_mapping_code: str  # 409: the mapping cannot be read, or names a role the tenant does not have
    name_taken_code: str  # 409: an administrator of another origin has the name
    normalise: Callable[[str], str]  # how two group names are compared


OIDC = Source("oidc", "auth.oidc.admin_groups", "sso_bad_admin_groups", "sso_admin_name_taken", _exact)
LDAP = Source("ldap", "auth.ldap.admin_groups", "bad_admin_groups", "admin_name_taken", normal_dn)


# ---- the mapping -----------------------------------------------------------------------------------------------


def parse_admin_groups(text: str, source: Source) -> list[tuple[str, str]]:
    """``group = Role name; group2 = Role name`` → [(group, role)], in order.  A group may be listed twice (two
    roles); it may contain ``=`` (a DN: the last one separates the role).  Anything else that is not exactly
    that — an entry without ``=``, an empty group or role, an empty entry between two ``;`` — is refused (409
    ``source.bad_mapping_code``)."""
    entries = text.split(";")
    if entries and not entries[-1].strip():
        entries.pop()  # one trailing ";" is fine
    pairs: list[tuple[str, str]] = []
    for number, entry in enumerate(entries, 1):
        group, sep, role = entry.rpartition("=")
        group, role = group.strip(), role.strip()
        if not sep or not group or not role:
            raise Conflict(
                f"{source.key} cannot be read at entry {number} ({entry.strip()[:80]!r}): write "
                "'group = Role name; other group = Role name'; ask the farm's administrator to fix it",
                code=source.bad_mapping_code,
            )
        pairs.append((group, role))
    return pairs


def roles_for(groups: tuple[str, ...], pairs: list[tuple[str, str]], source: Source) -> list[str]:
    """The roles the person's groups are mapped to, each once, in the mapping's order."""
    have = {source.normalise(g) for g in groups}
    return list(dict.fromkeys(role for group, role in pairs if source.normalise(group) in have))


# ---- the administrator ---------------------------------------------------------------------------------------


async def sync_admin(
    db: Database, tenant_id: int, name: str, source: Source, roles: list[str], *, every_role: list[str]
) -> int | None:
    """The administrator ``source`` makes of ``name`` in the tenant, with exactly ``roles`` → its id; None when
    no role is mapped (an administrator it made before is left with no role and no session: the caller refuses
    the login).  ``every_role`` (all roles the mapping names) must exist for the tenant, or 409.  401
    ``admin_blocked`` for a blocked administrator or tenant; 409 ``source.name_taken_code`` when an
    administrator of another origin has the name."""
    a = t.administrators
    for attempt in range(2):
        try:
            async with db.begin() as conn:
                role_ids = await _role_ids(conn, tenant_id, every_role, source)
                q = sa.select(a.c.id, a.c.origin, a.c.blocked).where(a.c.tenant_id == tenant_id, a.c.name == name)
                row = (await conn.execute(q)).first()
                if roles:
                    admin_id, change = await _upsert(conn, tenant_id, name, source, row, role_ids, roles)
                    changed = admin_id if change else None
                else:
                    admin_id, change, changed = None, "updated", None
                    if row is not None and row.origin == source.origin:  # left every mapped group
                        changed = int(row.id) if await _set_roles(conn, int(row.id), []) else None
                        await conn.execute(
                            sa.update(t.admin_tokens)
                            .where(t.admin_tokens.c.admin_id == row.id, t.admin_tokens.c.kind == _SESSION)
                            .values(revoked=True)
                        )
        except sa.exc.IntegrityError:  # two first logins at once: the loser finds the other's row
            if attempt == 1:
                raise
            continue
        if changed is not None:
            await publish(db, change, "admin", changed, tenant_id)
        return admin_id
    raise AssertionError("unreachable")  # the loop returns or raises


async def _upsert(
    conn: AsyncConnection,
    tenant_id: int,
    name: str,
    source: Source,
    row: Any,
    role_ids: Mapping[str, int],
    roles: list[str],
) -> tuple[int, str]:
    """(id, change) of the administrator made or found, its roles set to ``roles``."""
    a = t.administrators
    if row is not None and row.origin != source.origin:
        raise Conflict(
            f"administrator {name!r} of this tenant logs in with a password, not through {source.key}: "
            "log in with the password, or ask another administrator",
            code=source.name_taken_code,
        )
    tenant_blocked = (
        await conn.execute(sa.select(t.tenants.c.blocked).where(t.tenants.c.id == tenant_id))
    ).scalar_one()
    if (row is not None and row.blocked) or tenant_blocked:
        raise Unauthenticated("this administrator is blocked: ask another administrator", code="admin_blocked")
    if row is None:
        res = await conn.execute(
            sa.insert(a)
            .values(tenant_id=tenant_id, name=name, password_hash=None, origin=source.origin, created_at=utcnow())
            .returning(a.c.id)
        )
        admin_id, change = int(res.scalar_one()), "created"
    else:
        admin_id, change = int(row.id), "updated"
    if not await _set_roles(conn, admin_id, [role_ids[r] for r in roles]) and change == "updated":
        change = ""
    return admin_id, change


async def _role_ids(conn: AsyncConnection, tenant_id: int, names: list[str], source: Source) -> dict[str, int]:
    """name → id of the roles an administrator of the tenant may hold: the tenant's own (first), then the fixed
    roles of the supertenant; 409 when the mapping names another."""
    r = t.roles
    visible = r.c.tenant_id == tenant_id
    if tenant_id != SUPERTENANT_ID:
        visible = sa.or_(visible, sa.and_(r.c.tenant_id == SUPERTENANT_ID, r.c.fixed.is_(True)))
    q = sa.select(r.c.id, r.c.name, r.c.tenant_id).where(visible, r.c.name.in_(set(names)))
    found: dict[str, int] = {}
    for row in sorted(await conn.execute(q), key=lambda row: int(row.tenant_id) != tenant_id):
        found.setdefault(str(row.name), int(row.id))
    missing = sorted(set(names) - set(found))
    if missing:
        raise Conflict(
            f"{source.key} names a role this tenant does not have ({', '.join(missing)[:120]}): ask the "
            "farm's administrator to fix it",
            code=source.bad_mapping_code,
        )
    return found


async def _set_roles(conn: AsyncConnection, admin_id: int, role_ids: list[int]) -> bool:
    """Replace the administrator's roles; whether they changed."""
    ar = t.admin_roles
    have = {int(r.role_id) for r in await conn.execute(sa.select(ar.c.role_id).where(ar.c.admin_id == admin_id))}
    want = set(role_ids)
    if have == want:
        return False
    await conn.execute(sa.delete(ar).where(ar.c.admin_id == admin_id))
    if want:
        await conn.execute(sa.insert(ar), [{"admin_id": admin_id, "role_id": r} for r in sorted(want)])
    return True


# ---- a directory password -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Directory:
    """The directory that checks a name's password: its tenant, and that tenant's ``auth.*`` configuration."""

    tenant_id: int
    tenant_name: str
    tenant_blocked: bool
    config: Mapping[str, Any]


async def ldap_directory(db: Database, tenant: str | None, row: Any) -> Directory | None:
    """The directory that checks the password of an administrator ``row`` (None: unknown name) of ``tenant``
    (None: the supertenant), or None when a local password decides: the name has one, or another origin, or the
    tenant's ``auth.chain`` does not name ``ldap``, or its ``auth.ldap.admin_groups`` is empty (the directory is
    its users').  A known directory administrator is checked by its own tenant's directory."""
    if row is not None and (row.password_hash is not None or row.origin != LDAP.origin):
        return None
    async with db.connect() as conn:
        if row is not None:
            found = Directory(int(row.tenant_id), str(row.tenant_name), bool(row.tenant_blocked), {})
        else:
            q = sa.select(t.tenants.c.id, t.tenants.c.name, t.tenants.c.blocked).where(
                t.tenants.c.name == (tenant if tenant is not None else SUPERTENANT)
            )
            hit = (await conn.execute(q)).first()
            if hit is None:
                return None
            found = Directory(int(hit.id), str(hit.name), bool(hit.blocked), {})
        config = await read_configs(conn, "auth.", found.tenant_id)  # the supertenant's id is the global layer's
    if (
        LDAP.origin not in {p.strip() for p in str(config["auth.chain"]).split(",")}
        or not str(config[LDAP.key]).strip()
    ):
        return None
    return replace(found, config=config)


def _bad_credentials() -> Unauthenticated:
    return Unauthenticated("wrong administrator name, tenant or password", code="bad_credentials")


async def login_ldap(
    db: Database, directory: Directory, name: str, password: str, *, source: str = "", blocked: bool = False
) -> int:
    """An administrator's password checked by the tenant's directory → the administrator's id, made or updated
    with the roles ``auth.ldap.admin_groups`` maps its groups to.  ``blocked``: the administrator or tenant is
    blocked (refused like a wrong password, after the directory's answer, as the local path does).

    401 ``bad_credentials`` (wrong password, a name the directory does not know); 403 ``no_admin_role`` (right
    password, no mapped group); 409 ``bad_admin_groups`` (the mapping); 503 ``auth_unavailable`` (the
    directory did not answer within ``auth.ldap.timeout_s``, or is not set up)."""
    tenant_id, config = directory.tenant_id, directory.config
    plugin = password_plugins.ldap_plugin(db, tenant_id, {**config, "auth.ldap.required_group": ""})
    decision = await plugin.authenticate(
        Credentials(name, directory.tenant_name, password, source, "api", want_groups=True)
    )
    if decision.verdict != Verdict.ACCEPT or decision.identity is None:
        log.info("admin_directory.refused", admin=name, tenant_id=tenant_id, code=decision.code, reason=decision.reason)
        raise _bad_credentials()
    if blocked:
        raise _bad_credentials()
    pairs = parse_admin_groups(str(config[LDAP.key]), LDAP)
    roles = roles_for(decision.identity.groups, pairs, LDAP)
    admin_id = await sync_admin(db, tenant_id, name, LDAP, roles, every_role=[r for _, r in pairs])
    if admin_id is None:
        raise PermissionDenied(
            "your directory account is in none of the groups that make administrators here: ask to be added to "
            "one that auth.ldap.admin_groups maps to a role",
            code="no_admin_role",
        )
    log.info("admin_directory.login", admin=name, tenant_id=tenant_id, roles=roles)
    return admin_id
