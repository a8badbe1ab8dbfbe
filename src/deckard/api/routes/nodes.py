"""Nodes (QVD's hosts, ``/nodes``): what the node daemons report about themselves, and blocking them
(a blocked node gets no new desktops; the ones it runs stay).  ``{node}`` is the id or the name."""

from __future__ import annotations

from fastapi import APIRouter

from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.resource import ObjectRoutes
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
