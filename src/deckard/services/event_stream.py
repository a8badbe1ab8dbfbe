"""What one administrator sees of the live event stream: the two bus channels merged, filtered and coalesced.

It merges the channels of ``services/events.py``: ``EVENTS`` (JSON objects published by services: created,
updated, deleted) and ``DESKTOPS`` (desktop ids, one or a comma-separated list, on every desktop change).  A
``DESKTOPS`` id becomes a ``state`` event read fresh from the database, yielded only when what it shows changed,
so many notifications for one desktop coalesce.  Payloads are told apart by shape: ``EVENTS`` payloads are JSON
objects, ``DESKTOPS`` payloads never start with ``{``.

Every event is filtered to the actor's tenant and to the objects they may see (``<object>.see``; gated fields
removed): tenant isolation is a service's job, not the route's.  Why not in ``events.py``: that module is the
channel names every service publishes on, and this one reads users' tenant rules (``services.users``), which
publish events themselves.  The API turns what this yields into Server-Sent Events (``api/routes/events.py``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.db.notify import Subscription
from deckard.services.context import Actor, visible
from deckard.services.events import DESKTOPS, EVENTS
from deckard.services.users import tenant_filter

MAX_REMEMBERED = 100_000  # last state yielded per desktop, to yield only changes

d = t.desktops
STATE_COLUMNS = (d.c.id, d.c.tenant_id, d.c.state, d.c.cmd, d.c.user_state, d.c.blocked, d.c.node_id)
SHOWN = ("state", "cmd", "user_state", "blocked", "node_id")  # a state event is sent again only if one changed

Event = tuple[str, dict[str, Any]]  # (type, data)


SEEN_AS = {"pool": "osf"}  # a warm pool is a setting of its OSF (services/pools.py)


def allowed_event(actor: Actor, event: dict[str, Any]) -> dict[str, Any] | None:
    """The event as this actor may see it, or None when it concerns another tenant or an unseen object."""
    obj = str(event.get("object", ""))
    if f"{SEEN_AS.get(obj, obj)}.see" not in actor.acls:
        return None
    tenant = event.get("tenant_id")
    if tenant is not None and not actor.all_tenants and tenant != actor.tenant_id:
        return None
    return visible(actor, obj, event)


async def desktop_states(db: Database, actor: Actor, ids: set[int]) -> list[dict[str, Any]]:
    """``state`` events for the desktops of ``ids`` the actor may see (other tenants' ids are left out)."""
    async with db.connect() as conn:
        q = sa.select(*STATE_COLUMNS).where(d.c.id.in_(sorted(ids)), tenant_filter(actor, d.c.tenant_id))
        return [
            visible(actor, "desktop", {"type": "state", "object": "desktop", **dict(r._mapping)})
            for r in await conn.execute(q)
        ]


class EventWatch:
    """One actor's view of the bus; iterate ``next_batch`` until the watcher goes away."""

    def __init__(self, db: Database, actor: Actor, sub: Subscription) -> None:
        self.db = db
        self.actor = actor
        self.sub = sub
        self.sent: dict[int, tuple[Any, ...]] = {}

    async def next_batch(self, idle_s: float) -> list[Event] | None:
        """The events of the next burst of notifications (maybe none the actor may see); None after ``idle_s``
        seconds without any notification."""
        payload = await self.sub.wait(idle_s)
        if payload is None:
            return None
        batch = [payload]
        while not self.sub.queue.empty():  # coalesce a burst (a bulk start) into one read
            batch.append(self.sub.queue.get_nowait())
        events: list[Event] = []
        ids: set[int] = set()
        for item in batch:
            if item.startswith("{"):
                try:
                    event = allowed_event(self.actor, json.loads(item))
                except ValueError:
                    continue
                if event is not None:
                    events.append((str(event.get("type", "message")), event))
            else:
                ids.update(int(x) for x in item.split(",") if x.isdigit())
        if ids and "desktop.see" in self.actor.acls:
            for state in await desktop_states(self.db, self.actor, ids):
                shown = tuple(state.get(k) for k in SHOWN)
                if self.sent.get(state["id"]) == shown:
                    continue
                if len(self.sent) >= MAX_REMEMBERED:
                    self.sent.clear()
                self.sent[state["id"]] = shown
                events.append(("state", state))
        return events


@asynccontextmanager
async def watch_events(db: Database, actor: Actor) -> AsyncIterator[EventWatch]:
    """Subscribe to both channels for ``actor``: once entered, nothing published afterwards is missed."""
    async with db.bus.subscribe(EVENTS, DESKTOPS) as sub:
        yield EventWatch(db, actor, sub)
