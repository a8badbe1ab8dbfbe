"""``deckard node list|block|unblock|fence``: the farm's nodes (QVD's hosts) as their daemons report them.

Running a node is ``cli/farm.py``'s; ``cli/admin.py`` decides whether this is ``node list`` or
``nodes list``.  A blocked node gets no new desktops; the ones it runs stay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deckard.cli import session
from deckard.cli.output import print_done
from deckard.cli.session import JsonOpt, ProfileOpt
from deckard.cli.verbs import list_command, object_command
from deckard.model.errors import BadInput
from deckard.model.fence import parse_options
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
    "fence_agent",
    "lost_reason",  # "fencing failed (…)": its desktops stay assigned (unavailable) until it is fenced
)
NodeArg = Annotated[str, typer.Argument(help="Name or id of the node.")]


def fence(
    node: NodeArg,
    agent: Annotated[
        str | None, typer.Option("--agent", help="Fence agent program (fence agent API), e.g. fence_ipmilan.")
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", help="KEY=VALUE the agent reads on stdin (repeatable): ip=…, ipport=…, lanplus=1 …"),
    ] = None,
    password_file: Annotated[
        Path | None,
        typer.Option("--password-file", help="File holding the BMC password (option `password`); '-' reads stdin."),
    ] = None,
    clear: Annotated[
        bool, typer.Option("--clear", help="Remove the node's agent: the farm's default fencing.")
    ] = False,
    confirm_off: Annotated[
        bool,
        typer.Option(
            "--confirm-off",
            help="The lost node's machine IS powered off (you checked): release its desktops as after a fence.",
        ),
    ] = False,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Set how another node fences this one when it is lost (e.g. IPMI: --agent fence_ipmilan --option ip=…)."""
    with session.api(profile) as api:  # (errors inside it print as `error [code]: message`)
        if confirm_off:
            row = api.confirm_node_off(node)
            print_done(f"node {row.name}: {row.lost_reason}", row, as_json=as_json)
            return
        if clear == (agent is not None):
            raise BadInput("give --agent (with its --option and --password-file) or --clear", code="bad_fence_agent")
        options = parse_options(option or [])
        if password_file is not None:  # a password never goes on a command line (it would show in ps)
            text = typer.get_text_stream("stdin").read() if str(password_file) == "-" else password_file.read_text()
            options["password"] = text.rstrip("\n")
        row = api.clear_node_fence(node) if clear else api.set_node_fence(node, agent or "", options)
    shown = " ".join(f"{k}={v}" for k, v in (row.fence_options or {}).items())
    what = f"fenced by {row.fence_agent} {shown}".rstrip() if row.fence_agent else "fenced by the farm's default agent"
    print_done(f"node {row.name}: {what}", row, as_json=as_json)


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
    group.command("fence")(fence)
