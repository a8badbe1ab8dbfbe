"""The password plugins (``auth/plugins.py``) of a farm's tenants, built once and shared by every login: the users'
chain (``services/identity.py``) and administrators' directory logins (``services/admin_directory.py``).

Why a cache: an LDAP plugin owns a thread pool and open connections to the directory, so it is built once per
database, tenant and plugin configuration (its ``auth.<name>.*`` values) and reused until those change; then it is
replaced and the old one closed.  A configuration the plugin refuses (no URL, …) is 503 ``auth_unavailable``: the
person logging in can do nothing about it, the log says what is wrong.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import structlog

from deckard.auth.chain import Authenticator, AuthUnavailable
from deckard.auth.plugins import REGISTRY
from deckard.db.engine import Database
from deckard.model.errors import BadInput

log = structlog.get_logger("deckard.password_plugins")

LDAP = "ldap"

# (database URL, tenant id, plugin name) → (fingerprint of the values it was built from, the plugin)
_built: dict[tuple[str, int | None, str], tuple[str, Authenticator]] = {}


def fingerprint(config: Mapping[str, Any], name: str = LDAP) -> str:
    """What identifies a plugin's configuration: its own ``auth.<name>.*`` values (secrets included, hashed)."""
    own = sorted((k, str(v)) for k, v in config.items() if k.startswith(f"auth.{name}."))
    return hashlib.sha256(repr(own).encode()).hexdigest()


def plugin(db: Database, tenant_id: int | None, name: str, config: Mapping[str, Any]) -> Authenticator:
    """The tenant's plugin ``name`` for ``config``, built once and reused until its values change."""
    key, wanted = (db.url, tenant_id, name), fingerprint(config, name)
    cached = _built.get(key)
    if cached is not None and cached[0] == wanted:
        return cached[1]
    try:
        built = REGISTRY.build(name, config)
    except BadInput as e:
        log.warning("password_plugins.misconfigured", plugin=name, tenant_id=tenant_id, reason=e.message)
        raise AuthUnavailable(
            f"the {name} login is not set up right: ask the farm's administrator to check auth.{name}.*",
            details={"plugin": name},
        ) from None
    _built[key] = (wanted, built)
    if cached is not None:
        _close(cached[1])
    return built


def ldap_plugin(db: Database, tenant_id: int, config: Mapping[str, Any]) -> Authenticator:
    """The tenant's directory plugin (administrators' logins)."""
    return plugin(db, tenant_id, LDAP, config)


def _close(built: Authenticator) -> None:
    close = getattr(built, "close", None)
    if callable(close):
        close()


def close_plugins(db: Database | None = None) -> None:
    """Let go of the plugins (of one database, or all) and their directory connections: shutdown, tests."""
    for key in [k for k in _built if db is None or k[0] == db.url]:
        _close(_built.pop(key)[1])
