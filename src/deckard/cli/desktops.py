"""``deckard desktop ...``: desktops (QVD's VMs).  Start and stop only *ask*: a node carries the command out,
so these commands print the state the desktop is in right after asking (``--wait`` follows it to the end)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from deckard.cli import session
from deckard.cli.output import print_done, print_object, print_rows
from deckard.cli.session import ERROR_EXIT, JsonOpt, ProfileOpt, report
from deckard.model.errors import Unavailable

app = typer.Typer(help="Desktops (containers or VMs), one per user and OSF.", no_args_is_help=True)

COLUMNS = ("id", "name", "user", "osf", "tag", "ip", "state", "cmd", "node", "blocked", "user_state")
SETTLED = {"start": ("running", "failed", "blocked"), "stop": ("stopped", "failed")}
POLL_S = 0.5

DesktopArg = Annotated[str, typer.Argument(help="Name or id of the desktop.")]
WaitOpt = Annotated[
    float, typer.Option("--wait", metavar="SECONDS", help="Wait up to SECONDS for the command to complete.")
]


def describe(desk: dict[str, Any]) -> str:
    """One line an administrator reads: where the desktop is and what it is about to do."""
    parts = [f"desktop {desk['name']!r} (id {desk['id']}): {desk['state']}"]
    if desk.get("cmd"):
        parts.append(f"{desk['cmd']} requested")
    if desk.get("node"):
        parts.append(f"node {desk['node']}")
    if desk.get("blocked"):
        parts.append("blocked")
    if desk.get("state") == "failed" and desk.get("failure_reason"):
        parts.append(f"reason: {desk['failure_reason']}")
    return ", ".join(parts)


def _follow(api: Any, desk: dict[str, Any], command: str, wait: float) -> dict[str, Any]:
    deadline = time.monotonic() + wait
    while desk.get("cmd") == command or desk["state"] not in SETTLED[command]:
        if time.monotonic() >= deadline:
            report(Unavailable(f"{describe(desk)}; still not done after {wait:g} s", code="timeout"))
            raise typer.Exit(ERROR_EXIT)
        time.sleep(POLL_S)
        desk = api.get_desktop(desk["id"])
    return dict(desk)


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Name of the new desktop.")],
    user: Annotated[str, typer.Option("--user", "-u", help="Owner (login or id).")],
    osf: Annotated[str | None, typer.Option("--osf", help="OSF name or id (default: default).")] = None,
    tag: Annotated[str, typer.Option("--tag", help="Image tag it starts from.")] = "default",
    description: Annotated[str, typer.Option("--description", "-d")] = "",
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Create a desktop for a user (its IP address is allocated now)."""
    with session.api(profile) as api:
        desk = api.create_desktop(name, user, osf=osf, tag=tag, description=description)
    print_done(f"desktop {desk['name']!r} created (id {desk['id']}, ip {desk['ip']})", desk, as_json=as_json)


@app.command("list")
def list_(
    user: Annotated[str | None, typer.Option("--user", "-u", help="Only this user's.")] = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """List desktops."""
    with session.api(profile) as api:
        rows = api.list_desktops(user=user)
    print_rows(rows, COLUMNS, as_json=as_json)


@app.command("show")
def show(desktop: DesktopArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Show one desktop."""
    with session.api(profile) as api:
        row = api.get_desktop(desktop)
    print_object(row, as_json=as_json)


@app.command("start")
def start(desktop: DesktopArg, wait: WaitOpt = 0, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Start a desktop on the least-loaded node."""
    with session.api(profile) as api:
        desk = api.start_desktop(desktop)
        if wait > 0:
            desk = _follow(api, desk, "start", wait)
    print_done(describe(desk), desk, as_json=as_json)


@app.command("stop")
def stop(desktop: DesktopArg, wait: WaitOpt = 0, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Stop a desktop."""
    with session.api(profile) as api:
        desk = api.stop_desktop(desktop)
        if wait > 0:
            desk = _follow(api, desk, "stop", wait)
    print_done(describe(desk), desk, as_json=as_json)


@app.command("block")
def block(desktop: DesktopArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Block a desktop: nobody may start it (maintenance)."""
    with session.api(profile) as api:
        desk = api.block_desktop(desktop)
    print_done(describe(desk), desk, as_json=as_json)


@app.command("unblock")
def unblock(desktop: DesktopArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Unblock a desktop."""
    with session.api(profile) as api:
        desk = api.unblock_desktop(desktop)
    print_done(describe(desk), desk, as_json=as_json)


@app.command("delete")
def delete(desktop: DesktopArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Delete a stopped desktop (its user's home is kept)."""
    with session.api(profile) as api:
        api.delete_desktop(desktop)
    print_done(f"desktop {desktop!r} deleted", as_json=as_json)
