"""What a use case needs from its caller: the database and who is acting.

The admin plane (next issue) widens ``Actor`` with roles and ACLs; the services check it, never the UI.
"""

from __future__ import annotations

from dataclasses import dataclass

from deckard.db.engine import Database


@dataclass(frozen=True)
class Actor:
    """Who performs an action: an administrator (API/CLI), a user (broker) or the system (node)."""

    kind: str  # admin | user | system
    id: int | None
    tenant_id: int | None  # None: all tenants (system, superadmin)
    name: str = ""

    @property
    def all_tenants(self) -> bool:
        return self.tenant_id is None


SYSTEM = Actor("system", None, None, "system")


@dataclass(frozen=True)
class Services:
    db: Database
