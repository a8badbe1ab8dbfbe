"""Routes for the farm of nodes: placement explain, placement groups and node maintenance.

Maintenance actions write desired state (services/maintenance.py) and return at once; the node carries them out.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from deckard.api.deps import ActorDep, DbDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.strict import RequestModel
from deckard.services import desktops, maintenance, placement

router = APIRouter(tags=["farm"], responses=ERROR_RESPONSES)


class NodeCandidate(BaseModel):
    node_id: int
    node: str
    eligible: bool
    score: float | None = Field(description="Placer score (highest wins); null when a filter excluded the node.")
    excluded_by: str | None = Field(description="The filter that excluded the node, in words.")
    state: str
    blocked: bool
    mem_free_mib: int | None = Field(description="Host figures: null for a tenant's administrator.")
    committed_mib: int | None
    desktops: int | None
    load: float | None
    cpus: float | None


class Explanation(BaseModel):
    desktop_id: int
    desktop: str
    state: str
    node_id: int | None
    memory_mib: int
    placement_group: str | None
    placement_policy: str | None
    would_choose: str | None = Field(description="The node a start would pick now (null: none can take it).")
    nodes: list[NodeCandidate]


class PlacementGroup(RequestModel):
    group: str | None = Field(default=None, max_length=64, description="Group name; null leaves any group.")
    policy: str | None = Field(default=None, description="spread (anti-affinity, default) or pack (affinity).")


@router.get("/desktops/{desktop}/explain", response_model=Explanation, summary="Explain where a desktop would start")
async def explain_desktop(desktop: str, actor: ActorDep, db: DbDep) -> dict[str, Any]:
    desktop_id = await desktops.find_desktop_id(db, actor, desktop)
    return await placement.explain_desktop(db, actor, desktop_id)


@router.put("/desktops/{desktop}/placement", summary="Set a desktop's placement group (affinity / anti-affinity)")
async def set_placement(desktop: str, body: PlacementGroup, actor: ActorDep, db: DbDep) -> dict[str, Any]:
    desktop_id = await desktops.find_desktop_id(db, actor, desktop)
    return await placement.set_placement_group(db, actor, desktop_id, body.group, body.policy)


@router.post("/nodes/{node}/drain", summary="Block a node and notify the users of its desktops")
async def drain_node(node: str, actor: ActorDep, db: DbDep) -> dict[str, Any]:
    return await maintenance.drain_node(db, actor, node)


@router.post("/nodes/{node}/evacuate", summary="Block a node and stop its desktops (they restart elsewhere)")
async def evacuate_node(node: str, actor: ActorDep, db: DbDep) -> dict[str, Any]:
    return await maintenance.evacuate_node(db, actor, node)


@router.post("/nodes/{node}/stop", summary="Stop a node daemon cleanly (its desktops are stopped)")
async def stop_node(node: str, actor: ActorDep, db: DbDep) -> dict[str, Any]:
    return await maintenance.stop_node(db, actor, node)


@router.post(
    "/nodes/{node}/restart", summary="Restart a node daemon in place (its desktops keep running and are adopted)"
)
async def restart_node(node: str, actor: ActorDep, db: DbDep) -> dict[str, Any]:
    return await maintenance.restart_node(db, actor, node)
