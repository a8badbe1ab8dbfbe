"""Connection history (``/connections``): every user connection with its result and per-phase timings,
newest first; the list query syntax of ``services/listing.py`` applies (``?login=alice&t_total_ms__gt=5000``)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel

from deckard.api.deps import ActorDep, DbDep
from deckard.api.envelope import ERROR_RESPONSES, Page
from deckard.api.routes.desktops import list_query
from deckard.services import connections
from deckard.services.listing import ListQuery

router = APIRouter(prefix="/connections", tags=["connections"], responses=ERROR_RESPONSES)


class Connection(BaseModel):
    id: int
    tenant_id: int | None = None
    desktop_id: int | None = None
    desktop: str | None = None
    user_id: int | None = None
    login: str | None = None
    broker_node_id: int | None = None
    source: str | None = None
    protocol: str | None = None
    started_at: dt.datetime | None = None
    connected_at: dt.datetime | None = None
    ended_at: dt.datetime | None = None
    result: str | None = None
    reason: str | None = None
    t_auth_ms: float | None = None
    t_claim_ms: float | None = None
    t_start_ms: float | None = None
    t_agent_ms: float | None = None
    t_display_ms: float | None = None
    t_total_ms: float | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None


ConnectionQuery = Annotated[ListQuery, list_query([*connections.FIELDS])]


@router.get("", response_model=Page[Connection], response_model_exclude_unset=True, summary="Connection history")
async def list_connections(actor: ActorDep, db: DbDep, q: ConnectionQuery) -> Page[Connection]:
    rows, total = await connections.list_connections(db, actor, q)
    return Page[Connection](items=[Connection.model_validate(r) for r in rows], total=total)
