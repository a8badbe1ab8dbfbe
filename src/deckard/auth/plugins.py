"""The password plugins a tenant's ``auth.chain`` may name, found by name (``auth/chain.py`` has the interface)."""

from __future__ import annotations

from deckard.auth.chain import Registry
from deckard.auth.ldap import LdapAuthenticator
from deckard.auth.local import LocalAuthenticator

REGISTRY = Registry()
REGISTRY.register(LocalAuthenticator.name, LocalAuthenticator.from_config)
REGISTRY.register(LdapAuthenticator.name, LdapAuthenticator.from_config)
