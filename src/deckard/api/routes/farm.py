"""Routes for the farm of nodes: placement explain, placement groups and node maintenance.

Maintenance actions write desired state (services/maintenance.py) and return at once; the node carries them out.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field

from deckard.api.deps import ActorDep, DbDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.strict import RequestModel
from deckard.model.schemas import Explanation, NodeMaintenance, Placement
from deckard.services import desktops, maintenance, placement

router = APIRouter(tags=["farm"], responses=ERROR_RESPONSES)
MAINTENANCE: dict[str, Any] = {"response_model": NodeMaintenance, "response_model_exclude_unset": True}


class PlacementGroup(RequestModel):
    group: str | None = Field(default=None, max_length=64, description="Group name; null leaves any group.")
    policy: str | None = Field(default=None, description="spread (anti-affinity, default) or pack (affinity).")


@router.get("/desktops/{desktop}/explain", response_model=Explanation, summary="Explain where a desktop would start")
async def explain_desktop(desktop: str, actor: ActorDep, db: DbDep) -> dict[str, Any]:
    desktop_id = await desktops.find_desktop_id(db, actor, desktop)
    return await placement.explain_desktop(db, actor, desktop_id)


@router.put(
    "/desktops/{desktop}/placement",
    response_model=Placement,
    summary="Set a desktop's placement group (affinity / anti-affinity)",
)
async def set_placement(desktop: str, body: PlacementGroup, actor: ActorDep, db: DbDep) -> dict[str, Any]:
    desktop_id = await desktops.find_desktop_id(db, actor, desktop)
    return await placement.set_placement_group(db, actor, desktop_id, body.group, body.policy)


@router.post("/nodes/{node}/drain", **MAINTENANCE, summary="Block a node and notify the users of its desktops")
async def drain_node(node: str, actor: ActorDep, db: DbDep) -> dict[str, Any]:
    return await maintenance.drain_node(db, actor, node)


@router.post(
    "/nodes/{node}/evacuate", **MAINTENANCE, summary="Block a node and stop its desktops (they restart elsewhere)"
)
async def evacuate_node(node: str, actor: ActorDep, db: DbDep) -> dict[str, Any]:
    return await maintenance.evacuate_node(db, actor, node)


@router.post("/nodes/{node}/stop", **MAINTENANCE, summary="Stop a node daemon cleanly (its desktops are stopped)")
async def stop_node(node: str, actor: ActorDep, db: DbDep) -> dict[str, Any]:
    return await maintenance.stop_node(db, actor, node)


@router.post(
    "/nodes/{node}/restart",
    **MAINTENANCE,
    summary="Restart a node daemon in place (its desktops keep running and are adopted)",
)
async def restart_node(node: str, actor: ActorDep, db: DbDep) -> dict[str, Any]:
    return await maintenance.restart_node(db, actor, node)
