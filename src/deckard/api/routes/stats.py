"""Dashboard statistics (``/stats``): one answer with every figure the dashboard shows."""

from __future__ import annotations

from fastapi import APIRouter

from deckard.api.deps import ActorDep, DbDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.model.schemas import Stats
from deckard.services import stats

router = APIRouter(prefix="/stats", tags=["stats"], responses=ERROR_RESPONSES)


@router.get("", response_model=Stats, summary="Figures for the dashboard")
async def get_stats(actor: ActorDep, db: DbDep) -> Stats:
    return Stats.model_validate(await stats.farm_stats(db, actor))
