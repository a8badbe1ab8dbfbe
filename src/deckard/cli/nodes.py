"""``deckard node list|block|unblock``: the farm's nodes (QVD's hosts) as their daemons report them.

Running a node is ``cli/farm.py``'s; ``cli/admin.py`` decides whether this is ``node list`` or
``nodes list``.  A blocked node gets no new desktops; the ones it runs stay.
"""

from __future__ import annotations

from typing import Annotated

import typer

from deckard.cli.verbs import list_command, object_command
from deckard.model.schemas import Node

COLUMNS = (
    "id",
    "name",
    "address",
    "state",
    "blocked",
    "desktops_running",
    "mem_free_mib",
    "mem_total_mib",
    "load",
    "heartbeat_at",
)
NodeArg = Annotated[str, typer.Argument(help="Name or id of the node.")]


def add_commands(group: typer.Typer) -> None:
    group.command("list")(list_command("nodes", Node, COLUMNS, "List nodes, their state, load and last heartbeat."))
    group.command("block")(
        object_command(
            NodeArg,
            lambda api, ref: api.block_node(ref),
            "Block a node: no new desktops are placed on it.",
            "node {name!r} blocked",
        )
    )
    group.command("unblock")(
        object_command(NodeArg, lambda api, ref: api.unblock_node(ref), "Unblock a node.", "node {name!r} unblocked")
    )
