"""``GET /health``: public liveness and database check for load balancers and ``deckard up``'s wait."""

from __future__ import annotations

from typing import Literal

import sqlalchemy as sa
from fastapi import APIRouter, Response, status

import deckard
from deckard.api.deps import DbDep
from deckard.model.schemas import Health

router = APIRouter(tags=["health"])


@router.get(
    "/health",
    response_model=Health,
    summary="Is the API up and can it reach the database",
    responses={503: {"model": Health, "description": "The database cannot be reached."}},
)
async def health(db: DbDep, response: Response) -> Health:
    try:
        async with db.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
        database: Literal["ok", "unreachable"] = "ok"
    except Exception:  # any failure to reach the database is what this endpoint reports, not raises
        database = "unreachable"
    if database != "ok":
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    overall: Literal["ok", "degraded"] = "ok" if database == "ok" else "degraded"
    return Health(status=overall, version=deckard.__version__, database=database)
