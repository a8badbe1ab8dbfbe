"""Nodes (QVD's hosts, ``/nodes``): what the node daemons report about themselves; read-only for now."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter
from pydantic import BaseModel

from deckard.api.deps import ActorDep, DbDep
from deckard.api.envelope import ERROR_RESPONSES, Page, page
from deckard.services import nodes

router = APIRouter(prefix="/nodes", tags=["nodes"], responses=ERROR_RESPONSES)


class Node(BaseModel):
    id: int
    name: str
    address: str
    broker_url: str
    state: str
    blocked: bool
    cmd: str | None
    started_at: dt.datetime | None
    heartbeat_at: dt.datetime | None
    mem_total_mib: int
    mem_free_mib: int
    cpus: float
    load: float
    desktops_running: int
    created_at: dt.datetime


@router.get("", response_model=Page[Node], summary="List nodes")
async def list_nodes(actor: ActorDep, db: DbDep) -> Page[Node]:
    return page([Node.model_validate(r) for r in await nodes.list_nodes(db, actor)])
