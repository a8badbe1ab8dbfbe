"""Channel names shared by the writers and the waiters of notifications, and the admin event stream.

``DESKTOPS`` carries a desktop id on every change of a desktop (nodes and brokers wait on it).  ``EVENTS`` carries
one JSON object per change an administrator can watch: ``{"type": "created|updated|deleted|state",
"object": "desktop", "id": 7, "tenant_id": 1, ...}``; the API streams it (filtered by tenant and ACL).
"""

from __future__ import annotations

import json
from typing import Any

from deckard.db.engine import Database

DESKTOPS = "desktops"
EVENTS = "events"


def node_channel(node_id: int) -> str:
    return f"node.{node_id}"


async def publish(
    db: Database, kind: str, obj: str, obj_id: int | str | None, tenant_id: int | None, **data: Any
) -> None:
    """Tell event-stream listeners that something changed (after the transaction committed)."""
    event = {"type": kind, "object": obj, "id": obj_id, "tenant_id": tenant_id, **data}
    await db.bus.notify(EVENTS, json.dumps(event, default=str)[:7000])
