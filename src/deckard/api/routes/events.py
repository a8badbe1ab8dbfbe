"""The live event stream (``GET /events``, Server-Sent Events) so the web UI and scripts never poll.

What an administrator sees — both bus channels merged, filtered to their tenant and ACLs, desktop states
coalesced — is ``services/event_stream.py``; this route only speaks SSE.  Each event goes out as
``event: <type>\\ndata: <json>\\n\\n``; a comment line is sent every ``KEEPALIVE_S`` seconds so proxies keep the
connection.  Browsers' ``EventSource`` cannot send headers, so ``?token=`` is accepted too.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from deckard.api.deps import DbDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.model.errors import Unauthenticated
from deckard.services.admins import actor_for_token
from deckard.services.context import Actor
from deckard.services.event_stream import watch_events

router = APIRouter(prefix="/events", tags=["events"], responses=ERROR_RESPONSES)

KEEPALIVE_S = 15.0
_bearer = HTTPBearer(auto_error=False)


def _sse(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, default=str)}\n\n"


async def stream(db: DbDep, actor: Actor) -> AsyncIterator[str]:
    async with watch_events(db, actor) as events:
        yield ": connected\n\n"  # subscribed: from here on nothing is missed
        while True:
            batch = await events.next_batch(KEEPALIVE_S)
            if batch is None:
                yield ": keep-alive\n\n"
                continue
            for kind, data in batch:
                yield _sse(kind, data)


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
