"""The live event stream (``GET /events``, Server-Sent Events) so the web UI and scripts never poll.

It merges the two bus channels of ``services/events.py``: ``EVENTS`` (JSON objects published by services:
created, updated, deleted) and ``DESKTOPS`` (desktop ids, one or a comma-separated list, on every desktop
change).  A ``DESKTOPS`` id becomes a ``state`` event read fresh from the database, sent only when what it shows
changed, so many notifications for one desktop coalesce.  Payloads are told apart by shape: ``EVENTS`` payloads
are JSON objects, ``DESKTOPS`` payloads never start with ``{``.

Each event goes out as ``event: <type>\\ndata: <json>\\n\\n``, filtered to the actor's tenant and to objects
they may see (``<object>.see``; gated fields removed); a comment line is sent every ``KEEPALIVE_S`` seconds so
proxies keep the connection.  Browsers' ``EventSource`` cannot send headers, so ``?token=`` is accepted too.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from deckard.api.deps import DbDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.errors import Unauthenticated
from deckard.services.admins import actor_for_token
from deckard.services.context import Actor, visible
from deckard.services.events import DESKTOPS, EVENTS
from deckard.services.users import tenant_filter

router = APIRouter(prefix="/events", tags=["events"], responses=ERROR_RESPONSES)

KEEPALIVE_S = 15.0
MAX_REMEMBERED = 100_000  # last state sent per desktop, to send only changes
_bearer = HTTPBearer(auto_error=False)

d = t.desktops
STATE_COLUMNS = (d.c.id, d.c.tenant_id, d.c.state, d.c.cmd, d.c.user_state, d.c.blocked, d.c.node_id)


def _sse(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, default=str)}\n\n"


def allowed_event(actor: Actor, event: dict[str, Any]) -> dict[str, Any] | None:
    """The event as this actor may see it, or None when it concerns another tenant or an unseen object."""
    obj = str(event.get("object", ""))
    if f"{obj}.see" not in actor.acls:
        return None
    tenant = event.get("tenant_id")
    if tenant is not None and not actor.all_tenants and tenant != actor.tenant_id:
        return None
    return visible(actor, obj, event)


async def _desktop_states(db: Database, actor: Actor, ids: set[int]) -> list[dict[str, Any]]:
    async with db.connect() as conn:
        q = sa.select(*STATE_COLUMNS).where(d.c.id.in_(sorted(ids)), tenant_filter(actor, d.c.tenant_id))
        return [
            visible(actor, "desktop", {"type": "state", "object": "desktop", **dict(r._mapping)})
            for r in await conn.execute(q)
        ]


async def stream(db: Database, actor: Actor) -> AsyncIterator[str]:
    sent: dict[int, tuple[Any, ...]] = {}
    async with db.bus.subscribe(EVENTS, DESKTOPS) as sub:
        yield ": connected\n\n"  # subscribed: from here on nothing is missed
        while True:
            payload = await sub.wait(KEEPALIVE_S)
            if payload is None:
                yield ": keep-alive\n\n"
                continue
            batch = [payload]
            while not sub.queue.empty():  # coalesce a burst (a bulk start) into one read
                batch.append(sub.queue.get_nowait())
            ids: set[int] = set()
            for item in batch:
                if item.startswith("{"):
                    try:
                        event = allowed_event(actor, json.loads(item))
                    except ValueError:
                        continue
                    if event is not None:
                        yield _sse(str(event.get("type", "message")), event)
                else:
                    ids.update(int(x) for x in item.split(",") if x.isdigit())
            if ids and "desktop.see" in actor.acls:
                for state in await _desktop_states(db, actor, ids):
                    shown = tuple(state.get(k) for k in ("state", "cmd", "user_state", "blocked", "node_id"))
                    if sent.get(state["id"]) == shown:
                        continue
                    if len(sent) >= MAX_REMEMBERED:
                        sent.clear()
                    sent[state["id"]] = shown
                    yield _sse("state", state)


@router.get(
    "",
    response_class=StreamingResponse,
    summary="Live events (Server-Sent Events): created, updated, deleted, state",
    responses={200: {"content": {"text/event-stream": {}}, "description": "An endless event stream."}},
)
async def stream_events(
    db: DbDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    token: Annotated[str | None, Query(description="The bearer token, for EventSource (no headers).")] = None,
) -> StreamingResponse:
    secret = credentials.credentials if credentials is not None else token
    if not secret:
        raise Unauthenticated("no token: send 'Authorization: Bearer <token>' or ?token=<token>")
    actor = await actor_for_token(db, secret)
    return StreamingResponse(
        stream(db, actor),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
