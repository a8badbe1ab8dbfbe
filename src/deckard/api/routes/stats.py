"""Dashboard statistics (``/stats``): one answer with every figure the dashboard shows; time to desktop per phase,
image and node (``/stats/time-to-desktop``) in another, as it reads every phase of a window of connections."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from deckard.api.deps import ActorDep, DbDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.model.schemas import Stats, TimeToDesktop
from deckard.services import stats

router = APIRouter(prefix="/stats", tags=["stats"], responses=ERROR_RESPONSES)


@router.get("", response_model=Stats, summary="Figures for the dashboard")
async def get_stats(actor: ActorDep, db: DbDep) -> Stats:
    return Stats.model_validate(await stats.farm_stats(db, actor))


@router.get("/time-to-desktop", response_model=TimeToDesktop, summary="Time to desktop per phase, image and node")
async def get_time_to_desktop(
    actor: ActorDep,
    db: DbDep,
    window: Annotated[
        str,
        Query(description="How far back: `30m`, `24h`, `7d` (from 1 minute to 7 days; else 422 `bad_window`)."),
    ] = stats.WINDOW_DEFAULT,
) -> TimeToDesktop:
    """p50/p95 of each phase (`auth`, `claim`, `start`, `agent`, `display`, `total`, in ms) of the connections that
    reached their desktop, grouped by the image and by the node the desktop ran on."""
    return TimeToDesktop.model_validate(await stats.time_to_desktop(db, actor, window))
