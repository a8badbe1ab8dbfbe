"""Connection history (``/connections``): every user connection with its result and per-phase timings,
newest first; the list query syntax of ``services/listing.py`` applies (``?login=alice&t_total_ms__gt=5000``)."""

from __future__ import annotations

from fastapi import APIRouter

from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.resource import ObjectRoutes
from deckard.model.schemas import Connection
from deckard.services import connections

router = APIRouter(prefix="/connections", tags=["connections"], responses=ERROR_RESPONSES)

connection = ObjectRoutes(router, "connection", Connection, exclude_unset=True)
connection.add_list(
    lambda s, q: connections.list_connections(s.db, s.actor, q), [*connections.FIELDS], "Connection history"
)
