"""The authenticator chain's vocabulary: what a login presents, what a plugin answers, and the registry by name.

Seed 002 §2.3 and QVD (``reference/qvd.md`` §1) make authentication a chain of plugins configured per tenant.
Here a plugin is a small class that checks a login name and a password (``local``, ``ldap``); the chain
(``services/identity.py``) asks them in the tenant's order (``auth.chain``): the first that knows the name
decides, one that does not know it passes.  Second factors, tokens, single sign-on, login rules and
auto-provisioning are steps of the same login in ``services/identity.py``, not password plugins, because they
do not answer "is this the password".

This module does no I/O and imports nothing below ``model``: what a plugin needs of the database (the stored
password hash) comes with the credentials, read by the chain with the rest of the account.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Protocol

from deckard.model.errors import Unavailable


class AuthUnavailable(Unavailable):
    """The plugin could not decide (its directory did not answer in time): 503, never a 500 or a hang."""

    code = "auth_unavailable"


class Verdict(StrEnum):
    ACCEPT = "accept"  # the password is right: ``Decision.identity`` says who this is
    REJECT = "reject"  # the name is known here and the password is wrong (or the account may not log in)
    PASS = "pass"  # this plugin does not know the name: ask the next one


@dataclass(frozen=True)
class Credentials:
    """A name and password as presented at one login, already split from its tenant."""

    login: str
    tenant: str
    password: str
    source: str = ""  # the client's address, for logs and rules
    via: str = "broker"  # broker | portal | wat | api
    # what Deckard stores for this name: the chain read the account anyway (None: no such account, or no password)
    password_hash: str | None = None
    # whether the caller needs the person's groups (role mapping for administrators); a plugin may skip a group
    # search otherwise, unless its own rules need one
    want_groups: bool = False

    def __repr__(self) -> str:  # never print a password into a log line
        return f"Credentials(login={self.login!r}, tenant={self.tenant!r}, via={self.via!r})"


@dataclass(frozen=True)
class Identity:
    """Who a plugin says the person is, with what it learnt on the way (directory attributes, groups)."""

    login: str
    tenant: str
    plugin: str
    display_name: str = ""
    mail: str = ""
    home: str = ""  # a home path the directory names (informative: Deckard keeps homes on its storage)
    groups: tuple[str, ...] = ()  # directory group DNs or SSO group names, for role mapping and login filters
    external_id: str = ""  # the directory DN or the SSO subject


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    plugin: str
    identity: Identity | None = None
    code: str = ""  # a stable refusal code when REJECT (bad_credentials, not_in_group, ...)
    reason: str = ""  # for the audit log and the operator, never shown to the person logging in

    @classmethod
    def accept(cls, identity: Identity) -> Decision:
        return cls(Verdict.ACCEPT, identity.plugin, identity)

    @classmethod
    def reject(cls, plugin: str, code: str = "bad_credentials", reason: str = "") -> Decision:
        return cls(Verdict.REJECT, plugin, None, code, reason)

    @classmethod
    def pass_(cls, plugin: str, reason: str = "") -> Decision:
        return cls(Verdict.PASS, plugin, None, "", reason)


class Authenticator(Protocol):
    """One password plugin.  ``authenticate`` never raises for a wrong password (it rejects); it raises
    ``AuthUnavailable`` when it cannot tell."""

    name: ClassVar[str]

    async def authenticate(self, creds: Credentials) -> Decision: ...


# name -> factory(config of the tenant, keyed by the full config key name) -> plugin
Factory = Callable[[Mapping[str, Any]], Authenticator]


@dataclass
class Registry:
    factories: dict[str, Factory] = field(default_factory=dict)

    def register(self, name: str, factory: Factory) -> None:
        self.factories[name] = factory

    def build(self, name: str, config: Mapping[str, Any]) -> Authenticator:
        return self.factories[name](config)

    def names(self) -> list[str]:
        return sorted(self.factories)
