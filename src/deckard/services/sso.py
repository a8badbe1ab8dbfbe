"""Single sign-on for the portal and the WAT: the server-side half of ``auth/oidc.py``'s authorization code flow.

Why here and not in the routes: a flow spans two requests that may reach two API processes of a farm, so what
``OidcClient.begin`` hands back (the nonce and PKCE verifier) is kept in the database (``sso_flows``), keyed by
the SHA-256 of the ``state`` the browser carries to the provider and back.  The plain ``state`` is stored
nowhere; a row is taken (deleted) by the first callback that names it, so a replayed callback finds nothing
(401 ``sso_bad_state``), and rows left by people who never came back are pruned as new flows start.

What happens after the provider vouched for someone depends on the page that asked:

* **portal** (``audience`` portal): the person is a user of the tenant, and ``identity.login_external`` applies
  the same account, auto-provisioning, rules and ``user.login`` audit record as a password login;
* **WAT** (``audience`` wat): the person is an administrator when one of their groups (the ID token's
  ``auth.oidc.groups_claim``) is mapped to a role by the tenant's ``auth.oidc.admin_groups``::

      vdi-admins = Tenant admin; vdi-helpdesk = Operator

  The first login creates the administrator (no password, ``origin`` oidc); every login sets its roles to
  exactly the mapped ones, and a login with no mapped group takes them all away (and ends its sessions) before
  it is refused (403 ``sso_no_admin_role``): ``services/admin_directory.py`` holds that rule, shared with the
  directory (LDAP) logins of administrators.  Every decision is an ``admin.login`` audit record.

The WAT of the supertenant (no tenant named) uses the global configuration layer.  One ``OidcClient`` is built
per database, tenant and ``auth.oidc.*`` configuration, and replaced (the old one closed) when that changes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
import structlog

from deckard.auth.chain import Identity
from deckard.auth.oidc import FLOW_LIFETIME_S, Flow, OidcClient, OidcConfig
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import User, aware, utcnow
from deckard.model.errors import Conflict, DeckardError, PermissionDenied, Unauthenticated
from deckard.services import admin_directory, identity, password_plugins
from deckard.services.admins import NAME_CHARS, open_admin_session
from deckard.services.audit import append_audit
from deckard.services.config import read_configs
from deckard.services.roles import SUPERTENANT

log = structlog.get_logger("deckard.sso")

PORTAL = "portal"
WAT = "wat"
AUDIENCES = (PORTAL, WAT)
ORIGIN = admin_directory.OIDC.origin  # administrators.origin of an administrator single sign-on created

# ---- one OidcClient per database, tenant and configuration ----------------------------------------------------

_clients: dict[tuple[str, int], tuple[str, OidcClient]] = {}


async def _client(db: Database, tenant_id: int, tenant: str, config: Mapping[str, Any]) -> OidcClient:
    """The tenant's client, rebuilt (and the old one closed) when its ``auth.oidc.*`` values changed."""
    oidc = OidcConfig.from_config(config)
    if not oidc.enabled:
        raise _not_configured(tenant)
    key, fingerprint = (db.url, tenant_id), password_plugins.fingerprint(config, "oidc")
    cached = _clients.get(key)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    client = OidcClient(oidc)
    _clients[key] = (fingerprint, client)
    if cached is not None:
        await cached[1].aclose()
    return client


async def close_clients(db: Database | None = None) -> None:
    """Close the cached clients (of one database, or all): process shutdown, tests."""
    for key in [k for k in _clients if db is None or k[0] == db.url]:
        await _clients.pop(key)[1].aclose()


def _not_configured(tenant: str) -> Conflict:
    return Conflict(
        f"single sign-on is not set up for tenant {tenant[:64]!r}: log in with a password, or ask an "
        "administrator to set auth.oidc.issuer and auth.oidc.client_id",
        code="sso_not_configured",
    )


# ---- auth.oidc.admin_groups --------------------------------------------------------------------------------


def parse_admin_groups(text: str) -> list[tuple[str, str]]:
    """``group = Role name; group2 = Role name`` → [(group, role)] (``admin_directory.parse_admin_groups``);
    409 ``sso_bad_admin_groups`` for anything else."""
    return admin_directory.parse_admin_groups(text, admin_directory.OIDC)


def mapped_roles(pairs: list[tuple[str, str]], groups: tuple[str, ...]) -> list[str]:
    """The roles the person's groups are mapped to (exact, case-sensitive group names), each once."""
    return admin_directory.roles_for(groups, pairs, admin_directory.OIDC)


# ---- the flow, kept between begin and finish --------------------------------------------------------------


def _state_hash(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


async def _tenant(db: Database, name: str) -> tuple[int, bool] | None:
    async with db.connect() as conn:
        q = sa.select(t.tenants.c.id, t.tenants.c.blocked).where(t.tenants.c.name == name)
        row = (await conn.execute(q)).first()
    return (int(row.id), bool(row.blocked)) if row is not None else None


async def _tenant_name(db: Database, tenant_id: int) -> str:
    async with db.connect() as conn:
        q = sa.select(t.tenants.c.name).where(t.tenants.c.id == tenant_id)
        name = (await conn.execute(q)).scalar_one_or_none()
    if name is None:  # deleted while the person was at the provider
        raise _bad_state()
    return str(name)


async def _config(db: Database, tenant_id: int) -> dict[str, Any]:
    async with db.connect() as conn:
        return await read_configs(conn, "auth.", tenant_id)  # the supertenant's id is the global layer's


async def begin(db: Database, tenant_name: str, audience: str, redirect_uri: str) -> str:
    """Start a sign-in for the portal or the WAT of a tenant (the WAT's default: the supertenant ``*``): the
    provider's URL to send the browser to.  409 ``sso_not_configured`` when the tenant has no provider (or
    does not exist: the answer does not tell which); 503 ``auth_unavailable`` when the provider does not answer."""
    if audience not in AUDIENCES:
        raise ValueError(f"audience must be one of {AUDIENCES}")
    found = await _tenant(db, tenant_name)
    if found is None or (audience == PORTAL and tenant_name == SUPERTENANT):  # the supertenant has no users
        raise _not_configured(tenant_name)
    tenant_id = found[0]
    config = await _config(db, tenant_id)
    client = await _client(db, tenant_id, tenant_name, config)
    if audience == WAT:
        parse_admin_groups(str(config["auth.oidc.admin_groups"]))  # a broken mapping is told before, not after
    url, flow = await client.begin(redirect_uri)
    kept = dataclasses.asdict(flow)
    del kept["state"]  # only its hash is stored: the browser brings the state back
    now = utcnow()
    async with db.begin() as conn:
        await conn.execute(sa.delete(t.sso_flows).where(t.sso_flows.c.expires_at < now))
        await conn.execute(
            sa.insert(t.sso_flows).values(
                state_hash=_state_hash(flow.state),
                tenant_id=tenant_id,
                audience=audience,
                flow=json.dumps(kept),
                created_at=now,
                expires_at=now + dt.timedelta(seconds=FLOW_LIFETIME_S),
            )
        )
    return url


def _bad_state() -> Unauthenticated:
    return Unauthenticated(
        "this sign-in answer does not belong to a sign-in in progress (it was used already, or it is not this "
        "page's): start again",
        code="sso_bad_state",
    )


async def _take_flow(db: Database, audience: str, params: Mapping[str, str]) -> tuple[int, Flow]:
    """The flow the callback's ``state`` names, deleted as it is read: a second callback with it finds nothing."""
    state = params.get("state") or ""
    if not state or len(state) > 512:
        raise _bad_state()
    f = t.sso_flows
    async with db.begin() as conn:
        row = (
            await conn.execute(
                sa.delete(f)
                .where(f.c.state_hash == _state_hash(state))
                .returning(f.c.tenant_id, f.c.audience, f.c.flow, f.c.expires_at)
            )
        ).first()
    if row is None or row.audience != audience:
        raise _bad_state()
    expires_at = aware(row.expires_at)
    if expires_at is None or expires_at <= utcnow():
        raise Unauthenticated("the sign-in took more than 10 minutes; start again", code="sso_expired")
    return int(row.tenant_id), Flow(state=state, **json.loads(row.flow))


# ---- the portal --------------------------------------------------------------------------------------------


async def finish_portal(
    db: Database, params: Mapping[str, str], *, source: str = "", network: str | None = None
) -> tuple[User, str]:
    """The provider sent the browser back to the portal: the user it vouched for (made now when the tenant
    auto-provisions; ``network`` gives a first desktop its address) and the ID token (for logout)."""
    tenant_id: int | None = None
    try:
        tenant_id, flow = await _take_flow(db, PORTAL, params)
        tenant = await _tenant_name(db, tenant_id)
        config = await _config(db, tenant_id)
        who, id_token = await (await _client(db, tenant_id, tenant, config)).finish(flow, params)
    except DeckardError as e:  # refused before anyone was named: login_external audits the rest
        await _audit_user_refusal(db, tenant_id, source, e)
        raise
    result = await identity.login_external(db, tenant, who, source=source, via="portal", network=network)
    return result.user, id_token


async def _audit_user_refusal(db: Database, tenant_id: int | None, source: str, error: DeckardError) -> None:
    try:
        await append_audit(
            db,
            action="user.login",
            result="failed",
            admin_name="user:",
            tenant_id=tenant_id,
            object_type="user",
            arguments={"via": "portal", "method": "sso", "plugin": "oidc"},
            status=error.status,
            error_code=error.code,
            source=source,
        )
    except Exception as e:  # the refusal stands; a lost audit record must at least be loud
        log.error("audit.write_failed", action="user.login", exc_info=e)


# ---- the WAT -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _AdminLogin:
    """One WAT sign-in as it goes: what its ``admin.login`` record will say."""

    db: Database
    source: str
    tenant_id: int | None = None
    admin_id: int | None = None
    name: str = ""
    roles: list[str] = dataclasses.field(default_factory=list)

    async def record(self, error: DeckardError | None) -> None:
        arguments: dict[str, Any] = {"via": "wat", "method": "sso", "plugin": "oidc"}
        if error is None:
            arguments["roles"] = self.roles
        try:
            await append_audit(
                self.db,
                action="admin.login",
                result="failed" if error else "ok",
                admin_id=self.admin_id,
                admin_name=self.name,
                tenant_id=self.tenant_id,
                object_type="admin",
                object_id=str(self.admin_id) if self.admin_id is not None else self.name,
                arguments=arguments,
                status=error.status if error else 200,
                error_code=error.code if error else "",
                source=self.source,
            )
        except Exception as e:
            log.error("audit.write_failed", action="admin.login", exc_info=e)


async def finish_wat(
    db: Database, params: Mapping[str, str], *, source: str = "", hours: float = 12
) -> tuple[str, dt.datetime, str]:
    """The provider sent the browser back to the WAT: a session for the administrator its groups make (see the
    module docstring) → (token, expiry, ID token)."""
    attempt = _AdminLogin(db, source)
    try:
        attempt.tenant_id, flow = await _take_flow(db, WAT, params)
        tenant = await _tenant_name(db, attempt.tenant_id)
        config = await _config(db, attempt.tenant_id)
        who, id_token = await (await _client(db, attempt.tenant_id, tenant, config)).finish(flow, params)
        attempt.name = who.login[:64]
        pairs = parse_admin_groups(str(config["auth.oidc.admin_groups"]))
        attempt.roles = mapped_roles(pairs, who.groups)
        attempt.admin_id = await _admin_for(db, attempt.tenant_id, who, attempt.roles, [r for _, r in pairs])
        token, expires_at = await open_admin_session(db, attempt.admin_id, hours)
    except DeckardError as e:
        await attempt.record(e)
        raise
    await attempt.record(None)
    log.info("sso.admin_login", admin=attempt.name, tenant_id=attempt.tenant_id, roles=attempt.roles)
    return token, expires_at, id_token


async def _admin_for(db: Database, tenant_id: int, who: Identity, roles: list[str], every_role: list[str]) -> int:
    """The administrator single sign-on makes of ``who``, with exactly ``roles``; refused without one."""
    name = who.login
    if not name or len(name) > 64 or not set(name) <= NAME_CHARS:
        raise PermissionDenied(
            f"the single sign-on login {name[:64]!r} cannot be an administrator name (lowercase letters, digits, "
            "'.', '_' and '-'): ask an administrator to set auth.oidc.login_claim to a claim that is",
            code="sso_bad_admin_name",
        )
    admin_id = await admin_directory.sync_admin(db, tenant_id, name, admin_directory.OIDC, roles, every_role=every_role)
    if admin_id is None:
        raise PermissionDenied(
            "none of your single sign-on groups makes you an administrator here: ask to be added to one that "
            "auth.oidc.admin_groups maps to a role",
            code="sso_no_admin_role",
            details={"groups": list(who.groups)[:50]},
        )
    return admin_id


# ---- logout ------------------------------------------------------------------------------------------------


async def logout_url(db: Database, tenant: str, id_token: str, post_logout_redirect_uri: str) -> str | None:
    """Where to send the browser to sign out at the tenant's provider too, or None (no provider, or it has no
    end-session endpoint)."""
    found = await _tenant(db, tenant)
    if found is None:
        return None
    config = await _config(db, found[0])
    if not OidcConfig.from_config(config).enabled:
        return None
    client = await _client(db, found[0], tenant, config)
    return await client.logout_url(id_token, post_logout_redirect_uri)
