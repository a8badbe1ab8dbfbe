"""Who is acting, and what they may do: the actor every use case receives.

Authorization lives in services (never only in the UI or the API): a use case calls ``require`` before it acts
and ``visible`` on what it returns.  An actor confined to a tenant sees other tenants' objects as missing
(404), so it never learns they exist.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from deckard.model.acls import ACLS, GATED_FIELDS
from deckard.model.errors import PermissionDenied


@dataclass(frozen=True)
class Actor:
    """An administrator (API/CLI), a user (broker) or the system (node, bootstrap)."""

    kind: str  # admin | user | system
    id: int | None
    tenant_id: int | None  # None: every tenant (system, supertenant administrators)
    name: str = ""
    acls: frozenset[str] = field(default=ACLS)
    source: str = ""  # client address, for the audit log

    @property
    def all_tenants(self) -> bool:
        return self.tenant_id is None

    def can(self, acl: str) -> bool:
        return acl in self.acls


SYSTEM = Actor("system", None, None, "system")


def require(actor: Actor, *acls: str) -> None:
    """Refuse unless the actor holds every ACL named (stable code ``forbidden_action``)."""
    missing = [a for a in acls if a not in actor.acls]
    if missing:
        raise PermissionDenied(
            f"you are not allowed to do this (missing ACL {', '.join(missing)}): ask an administrator with the "
            "right role",
            code="forbidden_action",
            details={"missing": missing},
        )


def require_supertenant(actor: Actor, what: str) -> None:
    """Refuse (``supertenant_only``) unless the actor acts for the whole farm, whatever ACLs a role grants.

    Some actions touch what all tenants share (the nodes, the API host's files): a tenant's role may name the
    ACL, but only the farm's owner (the supertenant's administrators, or the system) may use it.
    """
    if not actor.all_tenants:
        raise PermissionDenied(
            f"only the farm's administrators (supertenant) may {what}: ask the farm's owner",
            code="supertenant_only",
        )


def hidden_fields(actor: Actor, obj: str) -> frozenset[str]:
    return frozenset(f for f in GATED_FIELDS.get(obj, ()) if f"{obj}.see.{f}" not in actor.acls)


def visible(actor: Actor, obj: str, row: dict[str, Any]) -> dict[str, Any]:
    """The row without the fields the actor may not see."""
    hidden = hidden_fields(actor, obj)
    return {k: v for k, v in row.items() if k not in hidden} if hidden else row


def visible_rows(actor: Actor, obj: str, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [visible(actor, obj, r) for r in rows]


def require_fields(actor: Actor, obj: str, fields: Iterable[str], *, what: str = "filter") -> None:
    """Filtering or sorting on a hidden field is refused (``forbidden_filter``), not silently ignored."""
    bad = sorted(set(fields) & hidden_fields(actor, obj))
    if bad:
        raise PermissionDenied(
            f"you may not {what} on {', '.join(bad)} (missing ACL {', '.join(f'{obj}.see.{f}' for f in bad)})",
            code=f"forbidden_{what}",
        )
