"""Nodes (QVD's hosts, ``/nodes``): what the node daemons report about themselves, and blocking them
(a blocked node gets no new desktops; the ones it runs stay).  ``{node}`` is the id or the name."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel

from deckard.api.deps import ActorDep, DbDep
from deckard.api.envelope import ERROR_RESPONSES, Page
from deckard.api.routes.desktops import list_query
from deckard.services import nodes
from deckard.services.listing import ListQuery

router = APIRouter(prefix="/nodes", tags=["nodes"], responses=ERROR_RESPONSES)


class Node(BaseModel):
    id: int
    name: str | None = None
    address: str | None = None
    broker_url: str | None = None
    state: str | None = None
    blocked: bool | None = None
    cmd: str | None = None
    pid: int | None = None
    started_at: dt.datetime | None = None
    heartbeat_at: dt.datetime | None = None
    mem_total_mib: int | None = None
    mem_free_mib: int | None = None
    cpus: float | None = None
    load: float | None = None
    desktops_running: int | None = None
    created_at: dt.datetime | None = None


NodeQuery = Annotated[ListQuery, list_query([*nodes.FIELDS])]


@router.get("", response_model=Page[Node], response_model_exclude_unset=True, summary="List nodes")
async def list_nodes(actor: ActorDep, db: DbDep, q: NodeQuery) -> Page[Node]:
    rows, total = await nodes.list_nodes(db, actor, q)
    return Page[Node](items=[Node.model_validate(r) for r in rows], total=total)


@router.get("/{node}", response_model=Node, response_model_exclude_unset=True, summary="Show a node")
async def get_node(node: str, actor: ActorDep, db: DbDep) -> Node:
    node_id = await nodes.find_node_id(db, actor, node)
    return Node.model_validate(await nodes.get_node(db, actor, node_id))


@router.post(
    "/{node}/block", response_model=Node, response_model_exclude_unset=True, summary="Block a node: no new desktops"
)
async def block_node(node: str, actor: ActorDep, db: DbDep) -> Node:
    node_id = await nodes.find_node_id(db, actor, node)
    return Node.model_validate(await nodes.set_node_blocked(db, actor, node_id, True))


@router.post("/{node}/unblock", response_model=Node, response_model_exclude_unset=True, summary="Unblock a node")
async def unblock_node(node: str, actor: ActorDep, db: DbDep) -> Node:
    node_id = await nodes.find_node_id(db, actor, node)
    return Node.model_validate(await nodes.set_node_blocked(db, actor, node_id, False))
