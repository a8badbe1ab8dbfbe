"""ACLs and roles (QVD's model, reference/qvd.md §3-4): names ``<object>.<action>[.<field>]``.

* ``<object>.see`` lets an administrator list and show objects; fields in ``GATED_FIELDS`` are hidden (dropped
  from answers, refused as filters and sort keys) unless ``<object>.see.<field>`` is granted too.
* Every other action has its own ACL (``desktop.start``, ``user.update.password`` …).
* Roles bundle grants; a grant names an ACL or a pattern (``desktop.*``, ``*.see``, ``*``) and is positive or
  negative; roles inherit roles.  The effective set is computed from the catalogue: positive grants of the
  role and its ancestors, minus negative grants (a negative grant always wins).
* ``tenant.*`` ACLs are only ever effective for administrators of the supertenant (QVD's overwrite list).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

OBJECT_ACTIONS: dict[str, tuple[str, ...]] = {
    "tenant": ("see", "create", "update", "delete", "block"),
    "admin": ("see", "create", "update", "delete", "update.password", "update.roles"),
    "role": ("see", "create", "update", "delete"),
    "user": ("see", "create", "update", "delete", "block", "update.password"),
    "osf": ("see", "create", "update", "delete"),
    "network": ("see", "create", "update", "delete"),  # update: describe, and grant shared networks to tenants
    "image": ("see", "create", "update", "delete", "upload", "build", "publish", "tag", "block"),
    "desktop": (
        "see",
        "create",
        "update",
        "delete",
        "start",
        "stop",
        "disconnect",
        "block",
        "reset",
        "expire",
        "spy",
        "spy.interactive",
    ),
    "volume": ("see", "create", "update", "delete", "snapshot", "attach"),
    "node": ("see", "update", "block", "stop"),
    "config": ("see", "update"),
    "property": ("see", "update"),
    "audit": ("see", "verify"),
    "connection": ("see",),
    "stats": ("see",),
}

# fields an administrator sees only with <object>.see.<field>
GATED_FIELDS: dict[str, tuple[str, ...]] = {
    "desktop": ("ip", "network_ip", "mac", "node", "node_id", "failure_reason", "description"),
    "user": ("description",),
    "node": ("address", "pid", "broker_url"),
    "image": ("path", "digest"),
    "admin": ("roles",),
    "connection": ("source",),
}


def _catalogue() -> frozenset[str]:
    names: set[str] = set()
    for obj, actions in OBJECT_ACTIONS.items():
        names.update(f"{obj}.{a}" for a in actions)
    for obj, fields in GATED_FIELDS.items():
        names.update(f"{obj}.see.{f}" for f in fields)
    return frozenset(names)


ACLS: frozenset[str] = _catalogue()
SUPERTENANT_ONLY = "tenant."

PREDEFINED_ROLES: dict[str, tuple[tuple[str, bool], ...]] = {
    "Root": (("*", True),),
    "Tenant admin": (("*", True), ("tenant.*", False), ("node.*", False), ("node.see", True)),
    "Operator": (
        ("*.see", True),
        ("*.see.*", True),
        ("desktop.start", True),
        ("desktop.stop", True),
        ("desktop.disconnect", True),
        ("desktop.block", True),
        ("desktop.reset", True),
        ("user.block", True),
        ("node.block", True),
        ("tenant.*", False),
        ("audit.*", False),
        ("admin.*", False),
    ),
    "Read-only": (("*.see", True), ("*.see.*", True), ("tenant.*", False), ("audit.*", False)),
}


def expand(pattern: str) -> frozenset[str]:
    """The catalogue ACLs a grant names (a plain name outside the catalogue names nothing)."""
    if any(c in pattern for c in "*?["):
        return frozenset(a for a in ACLS if fnmatch.fnmatchcase(a, pattern))
    return frozenset({pattern}) & ACLS


def role_closure(role_ids: Iterable[int], parents: Mapping[int, Iterable[int]]) -> set[int]:
    """The roles and every role they inherit from (cycles are harmless here; the API refuses them)."""
    seen: set[int] = set()
    todo = list(role_ids)
    while todo:
        r = todo.pop()
        if r in seen:
            continue
        seen.add(r)
        todo.extend(parents.get(r, ()))
    return seen


def effective_acls(grants: Iterable[tuple[str, bool]], *, supertenant: bool) -> frozenset[str]:
    positive: set[str] = set()
    negative: set[str] = set()
    for pattern, is_positive in grants:
        (positive if is_positive else negative).update(expand(pattern))
    acls = positive - negative
    if not supertenant:
        acls = {a for a in acls if not a.startswith(SUPERTENANT_ONLY)}
    return frozenset(acls)


def creates_cycle(role_id: int, new_parent: int, parents: Mapping[int, Iterable[int]]) -> bool:
    return role_id in role_closure([new_parent], parents)
