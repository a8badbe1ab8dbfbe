"""``deckard desktop explain|placement`` and ``deckard node drain|evacuate|stop|restart``: the farm's admin verbs.

They join the ``desktop`` and ``node`` groups that other modules own (cli/admin.py's ``_group``), so the nouns
stay the user's: a desktop is explained, a node is drained.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Annotated, Any

import typer
from rich.console import Console

from deckard.cli import session
from deckard.cli.output import print_done, print_json, print_rows
from deckard.cli.session import JsonOpt, ProfileOpt
from deckard.client.api import ApiClient
from deckard.model.errors import BadInput, Unavailable
from deckard.model.schemas import Node
from deckard.model.states import NodeState

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
    chosen = result.would_choose or "no node (see the reasons below)"
    group = f", group {result.placement_group} ({result.placement_policy})" if result.placement_group else ""
    typer.echo(f"desktop {result.desktop} ({result.memory_mib} MiB{group}): a start would go to {chosen}")
    print_rows(result.nodes, EXPLAIN_COLUMNS, as_json=False)


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
    print_done(f"desktop {desktop}: placement group {result.placement_group}", result, as_json=as_json)


def _node_action(node: str, action: str, done: str, as_json: bool, profile: ProfileOpt) -> None:
    with session.api(profile) as api:
        result = api.node_action(node, action)
    print_done(f"node {result.node}: {done}", result, as_json=as_json)


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


def restart(
    node: Annotated[str | None, typer.Argument(help="Node name or id (omit with --all).")] = None,
    all_nodes: Annotated[bool, typer.Option("--all", help="Every running node, one at a time (rolling).")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each node to come back.")] = 60,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Restart node daemons in place: their desktops keep running and are adopted by the new process."""
    results: list[dict[str, Any]] = []
    with session.api(profile) as api:
        if (node is None) == (not all_nodes):
            raise BadInput("name one node, or give --all for a rolling restart of every running node")
        names = [node] if node is not None else [str(n.name) for n in api.list_nodes() if n.state == NodeState.RUNNING]
        for name in sorted(names):
            before = api.get_node(name)
            api.node_action(name, "restart")
            t0 = time.monotonic()
            with Console(stderr=True).status(f"Restarting node {name}…"):
                row = _wait_restarted(api, name, before.started_at, timeout)
            took = round(time.monotonic() - t0, 1)
            results.append({"node": name, "state": row.state, "seconds": took})
            if not as_json:
                typer.echo(f"node {name}: back in {took} s, {row.desktops_running} desktop(s) kept running")
    if as_json:
        print_json(results)


def _wait_restarted(api: ApiClient, name: str, started_before: dt.datetime | None, timeout: float) -> Node:
    """Until the node registered anew (``started_at`` moved) and is ``running`` again.

    The API may be served by the very process that restarts (``deckard up``): a refused connection means wait.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            row = api.get_node(name)
        except Unavailable as e:
            if e.code != "api_unreachable" or time.monotonic() > deadline:
                raise
            time.sleep(0.3)
            continue
        if row.state == NodeState.RUNNING and row.started_at != started_before:
            return row
        if row.state == NodeState.LOST or time.monotonic() > deadline:
            raise Unavailable(
                f"node {name} did not come back ({row.state}); see its log: once it is declared lost its "
                "desktops are fenced and start on other nodes",
                code="node_not_back",
            )
        time.sleep(0.3)


def add_desktop_commands(group: typer.Typer) -> None:
    group.command("explain")(explain)
    group.command("placement")(placement)


def add_node_commands(group: typer.Typer) -> None:
    group.command("drain")(drain)
    group.command("evacuate")(evacuate)
    group.command("stop")(stop)
    group.command("restart")(restart)
