"""``deckard stats``: the dashboard's figures on a terminal (or ``--json`` for monitoring scripts)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from deckard.cli.output import print_rows, sparkline
from deckard.cli.session import JsonOpt, ProfileOpt
from deckard.cli.verbs import fetch_and_print
from deckard.model.schemas import PhaseFigures, Stats, TimeToDesktop

app = typer.Typer(help="Farm statistics: counts, connected users, time-to-desktop, busiest nodes, expiry.")

WindowOpt = Annotated[str, typer.Option("--window", help="How far back: 30m, 24h, 7d (1 minute to 7 days).")]


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.0f} ms"


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Farm statistics (``deckard stats`` is ``deckard stats show``)."""
    if ctx.invoked_subcommand is None:
        show(as_json, profile)


@app.command("show")
def show(as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Show the farm's statistics."""
    fetch_and_print(profile, as_json, lambda api: api.stats(), _print_stats)


def _print_stats(s: Stats) -> None:
    desk, users, nodes = s.desktops, s.users, s.nodes
    states = ", ".join(f"{k} {v}" for k, v in sorted(desk["by_state"].items())) or "none"
    typer.echo(f"desktops: {desk['total']} ({states}), {desk['blocked']} blocked")
    typer.echo(f"users:    {users['total']}, {users['connected']} connected, {users['blocked']} blocked")
    node_states = ", ".join(f"{k} {v}" for k, v in sorted(nodes["by_state"].items())) or "none"
    typer.echo(f"nodes:    {nodes['total']} ({node_states}), {nodes['blocked']} blocked")
    counts = [p.running for p in s.activity.points]
    if counts:
        minutes = len(counts) * s.activity.step_s // 60
        span = f"{minutes} min" if minutes < 120 else f"{minutes // 60} h"
        peak = max((c for c in counts if c is not None), default=0)
        typer.echo(f"running:  {sparkline(counts)}  desktops over the last {span}, at most {peak}")
    day = s.time_to_desktop_ms["last_24h"]
    typer.echo(
        f"time to desktop (24 h, {day['count']} connections): "
        f"p50 {_ms(day['p50'])}, p90 {_ms(day['p90'])}, p99 {_ms(day['p99'])}"
    )
    if s.busiest_nodes:
        print_rows(s.busiest_nodes, ("name", "state", "desktops", "load"), as_json=False)
    if s.near_expiry:
        typer.echo("desktops near expiry:")
        print_rows(s.near_expiry, ("id", "name", "state", "expire_soft_at", "expire_hard_at"), as_json=False)


@app.command("time-to-desktop")
def time_to_desktop(window: WindowOpt = "24h", as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """p50/p95 of each connect phase (ms) per image and per node, as the dashboard shows them."""
    fetch_and_print(profile, as_json, lambda api: api.time_to_desktop(window), _print_time_to_desktop)


def _p50_p95(f: PhaseFigures | None) -> str:
    if f is None or f.p50 is None or f.p95 is None:
        return "-"
    return f"{f.p50:.0f}/{f.p95:.0f}"


def _print_time_to_desktop(s: TimeToDesktop) -> None:
    typer.echo(f"time to desktop over {s.window} ({s.count} connections), p50/p95 in ms per phase")
    if not s.count:
        return
    columns = ("connections", *s.phases)
    images = [
        {"image": f"{g.osf} {g.version}" if g.image_id else "(unknown)", "connections": g.count}
        | {p: _p50_p95(g.phases.get(p)) for p in s.phases}
        for g in s.by_image
    ]
    nodes = [
        {"node": g.node or "(unknown)", "connections": g.count} | {p: _p50_p95(g.phases.get(p)) for p in s.phases}
        for g in s.by_node
    ]
    print_rows(images, ("image", *columns), as_json=False)
    print_rows(nodes, ("node", *columns), as_json=False)
