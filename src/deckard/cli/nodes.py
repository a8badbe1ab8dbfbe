"""``deckard node list``: the farm's nodes (QVD's hosts) as their daemons report them.

Running a node is ``cli/farm.py``'s; ``cli/admin.py`` decides whether this is ``node list`` or
``nodes list``.
"""

from __future__ import annotations

import typer

from deckard.cli import session
from deckard.cli.output import print_rows
from deckard.cli.session import JsonOpt, ProfileOpt

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


def list_(as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """List nodes, their state, load and last heartbeat."""
    with session.api(profile) as api:
        rows = api.list_nodes()
    print_rows(rows, COLUMNS, as_json=as_json)


def add_commands(group: typer.Typer) -> None:
    group.command("list")(list_)
