"""Dashboard statistics (``/stats``): one answer with every figure the dashboard shows."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from deckard.api.deps import ActorDep, DbDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.services import stats

router = APIRouter(prefix="/stats", tags=["stats"], responses=ERROR_RESPONSES)


class Stats(BaseModel):
    at: dt.datetime
    desktops: dict[str, Any] = Field(description="`total`, `by_state` {state: n}, `blocked`.")
    users: dict[str, int] = Field(description="`total`, `blocked`, `connected` (desktops with a user connected).")
    nodes: dict[str, Any] = Field(description="`total`, `by_state`, `blocked`.")
    time_to_desktop_ms: dict[str, Any] = Field(
        description="`last_24h` {count, p50, p90, p99} and `hourly` [{hour, count, p50, p90, p99}]."
    )
    busiest_nodes: list[dict[str, Any]]
    near_expiry: list[dict[str, Any]] = Field(description="Desktops whose soft or hard expiry is within 24 h.")


@router.get("", response_model=Stats, summary="Figures for the dashboard")
async def get_stats(actor: ActorDep, db: DbDep) -> Stats:
    return Stats.model_validate(await stats.farm_stats(db, actor))
