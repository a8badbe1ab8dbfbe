"""``deckard node list|block|unblock``: the farm's nodes (QVD's hosts) as their daemons report them.

Running a node is ``cli/farm.py``'s; ``cli/admin.py`` decides whether this is ``node list`` or
``nodes list``.  A blocked node gets no new desktops; the ones it runs stay.
"""

from __future__ import annotations

from typing import Annotated

import typer

from deckard.cli import session
from deckard.cli.filters import FieldsOpt, FilterOpt, PageOpt, PerPageOpt, SortOpt, fetch_list, list_params, print_page
from deckard.cli.output import print_done
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
NodeArg = Annotated[str, typer.Argument(help="Name or id of the node.")]


def list_(
    filters: FilterOpt = None,
    sort: SortOpt = None,
    page: PageOpt = None,
    per_page: PerPageOpt = None,
    fields: FieldsOpt = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """List nodes, their state, load and last heartbeat."""
    params = list_params(filters, sort, page, per_page, fields)
    with session.api(profile) as api:
        result = fetch_list(api, "nodes", params)
    print_page(result, COLUMNS, fields, as_json=as_json)


def block(node: NodeArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Block a node: no new desktops are placed on it."""
    with session.api(profile) as api:
        row = api.block_node(node)
    print_done(f"node {row['name']!r} blocked", row, as_json=as_json)


def unblock(node: NodeArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Unblock a node."""
    with session.api(profile) as api:
        row = api.unblock_node(node)
    print_done(f"node {row['name']!r} unblocked", row, as_json=as_json)


def add_commands(group: typer.Typer) -> None:
    group.command("list")(list_)
    group.command("block")(block)
    group.command("unblock")(unblock)
