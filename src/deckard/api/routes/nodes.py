"""Nodes (QVD's hosts, ``/nodes``): what the node daemons report about themselves, and blocking them
(a blocked node gets no new desktops; the ones it runs stay).  ``{node}`` is the id or the name."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field

from deckard.api.deps import ActorDep, DbDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.resource import ObjectRoutes
from deckard.api.strict import RequestModel
from deckard.model.schemas import Node
from deckard.services import nodes

router = APIRouter(prefix="/nodes", tags=["nodes"], responses=ERROR_RESPONSES)

node = ObjectRoutes(
    router, "node", Node, find=lambda s, ref: nodes.find_node_id(s.db, s.actor, ref), exclude_unset=True
)
node.add_list(lambda s, q: nodes.list_nodes(s.db, s.actor, q), [*nodes.FIELDS], "List nodes")
node.add_get(lambda s, i: nodes.get_node(s.db, s.actor, i), "Show a node")
node.add_action("block", lambda s, i: nodes.set_node_blocked(s.db, s.actor, i, True), "Block a node: no new desktops")
node.add_action("unblock", lambda s, i: nodes.set_node_blocked(s.db, s.actor, i, False), "Unblock a node")


class NodeFence(RequestModel):
    agent: str = Field(max_length=64, description="A fence agent program (fence agent API), e.g. fence_ipmilan.")
    options: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="What the agent reads on stdin besides `action`: ip, ipport, username, password, lanplus …",
    )


@router.put("/{node}/fence", response_model=Node, response_model_exclude_unset=True, summary="Set a node's fence agent")
async def set_fence(node: str, body: NodeFence, actor: ActorDep, db: DbDep) -> dict[str, Any]:
    node_id = await nodes.find_node_id(db, actor, node)
    return await nodes.set_node_fence(db, actor, node_id, body.agent, body.options)


@router.post(
    "/{node}/fence/confirm",
    response_model=Node,
    response_model_exclude_unset=True,
    summary="Confirm a lost node is powered off (its desktops are released as after a fence)",
)
async def confirm_fence(node: str, actor: ActorDep, db: DbDep) -> dict[str, Any]:
    node_id = await nodes.find_node_id(db, actor, node)
    return await nodes.confirm_node_off(db, actor, node_id)


@router.delete(
    "/{node}/fence",
    response_model=Node,
    response_model_exclude_unset=True,
    summary="Remove a node's fence agent (the farm's default fencing applies)",
)
async def clear_fence(node: str, actor: ActorDep, db: DbDep) -> dict[str, Any]:
    node_id = await nodes.find_node_id(db, actor, node)
    return await nodes.set_node_fence(db, actor, node_id, None)
