"""``deckard desktop explain|placement`` and ``deckard node drain|evacuate|stop``: the farm's admin verbs.

They join the ``desktop`` and ``node`` groups that other modules own (cli/admin.py's ``_group``), so the nouns
stay the user's: a desktop is explained, a node is drained.
"""

from __future__ import annotations

from typing import Annotated

import typer

from deckard.cli import session
from deckard.cli.output import print_done, print_json, print_rows
from deckard.cli.session import JsonOpt, ProfileOpt

EXPLAIN_COLUMNS = ("node", "eligible", "score", "excluded_by", "desktops", "mem_free_mib", "committed_mib", "load")


def explain(
    desktop: Annotated[str, typer.Argument(help="Desktop name or id.")],
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Show where a start of this desktop would go: every node with its score or the filter that excluded it."""
    with session.api(profile) as api:
        result = api.explain_desktop(desktop)
    if as_json:
        print_json(result)
        return
    chosen = result["would_choose"] or "no node (see the reasons below)"
    group = f", group {result['placement_group']} ({result['placement_policy']})" if result["placement_group"] else ""
    typer.echo(f"desktop {result['desktop']} ({result['memory_mib']} MiB{group}): a start would go to {chosen}")
    print_rows(result["nodes"], EXPLAIN_COLUMNS, as_json=False)


def placement(
    desktop: Annotated[str, typer.Argument(help="Desktop name or id.")],
    group: Annotated[str | None, typer.Option("--group", help="Placement group (omit to leave the group).")] = None,
    policy: Annotated[str | None, typer.Option("--policy", help="spread (anti-affinity) or pack (affinity).")] = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Put a desktop in a placement group: spread its members over nodes, or pack them together."""
    with session.api(profile) as api:
        result = api.set_placement_group(desktop, group, policy)
    print_done(f"desktop {desktop}: placement group {result['placement_group']}", result, as_json=as_json)


def _node_action(node: str, action: str, done: str, as_json: bool, profile: ProfileOpt) -> None:
    with session.api(profile) as api:
        result = api.node_action(node, action)
    print_done(f"node {result['node']}: {done}", result, as_json=as_json)


def drain(
    node: Annotated[str, typer.Argument(help="Node name or id.")], as_json: JsonOpt = False, profile: ProfileOpt = None
) -> None:
    """Block a node (no new desktops) and tell the users of its desktops to leave."""
    _node_action(node, "drain", "blocked; users of its running desktops were notified", as_json, profile)


def evacuate(
    node: Annotated[str, typer.Argument(help="Node name or id.")], as_json: JsonOpt = False, profile: ProfileOpt = None
) -> None:
    """Block a node and stop its desktops: each starts on another node at its user's next connect."""
    _node_action(node, "evacuate", "blocked; its desktops are stopping", as_json, profile)


def stop(
    node: Annotated[str, typer.Argument(help="Node name or id.")], as_json: JsonOpt = False, profile: ProfileOpt = None
) -> None:
    """Stop a node daemon cleanly: it stops its desktops and exits."""
    _node_action(node, "stop", "asked to stop its desktops and exit", as_json, profile)


def add_desktop_commands(group: typer.Typer) -> None:
    group.command("explain")(explain)
    group.command("placement")(placement)


def add_node_commands(group: typer.Typer) -> None:
    group.command("drain")(drain)
    group.command("evacuate")(evacuate)
    group.command("stop")(stop)
