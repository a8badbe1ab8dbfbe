"""``deckard desktop ...``: desktops (QVD's VMs).  Start and stop only *ask*: a node carries the command out,
so these commands print the state the desktop is in right after asking (``--wait`` follows it to the end).

Action verbs take one name (the single-object endpoint, with ``--wait`` for start/stop), several names, or
``--filter`` (the bulk endpoint, one result line per desktop): ``deckard desktop start --filter osf=web``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from deckard.cli import session
from deckard.cli.filters import (
    FieldsOpt,
    FilterOpt,
    PageOpt,
    PerPageOpt,
    SortOpt,
    fetch_list,
    list_params,
    print_page,
    run_bulk,
)
from deckard.cli.output import print_done, print_object
from deckard.cli.session import ERROR_EXIT, JsonOpt, ProfileOpt, report
from deckard.model.errors import Unavailable

app = typer.Typer(help="Desktops (containers or VMs), one per user and OSF.", no_args_is_help=True)

COLUMNS = ("id", "name", "user", "osf", "tag", "ip", "state", "cmd", "node", "blocked", "user_state")
SETTLED = {"start": ("running", "failed", "blocked"), "stop": ("stopped", "failed")}
POLL_S = 0.5

DesktopArg = Annotated[str, typer.Argument(help="Name or id of the desktop.")]
DesktopsArg = Annotated[list[str] | None, typer.Argument(help="Names or ids (or use --filter).")]
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


def _act(
    action: str,
    refs: list[str] | None,
    filters: list[str] | None,
    *,
    wait: float = 0,
    as_json: bool,
    profile: Any,
) -> None:
    with session.api(profile) as api:
        if refs and len(refs) == 1 and not filters:
            desk = getattr(api, f"{action}_desktop")(refs[0])
            if wait > 0 and action in SETTLED:
                desk = _follow(api, desk, action, wait)
            print_done(describe(desk), desk, as_json=as_json)
            return
        run_bulk(api, "desktops", action, refs, filters, lambda r: api.get_desktop(r)["id"], as_json=as_json)


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
    print_done(f"desktop {desk['name']!r} created (id {desk['id']}, ip {desk.get('ip')})", desk, as_json=as_json)


@app.command("list")
def list_(
    user: Annotated[str | None, typer.Option("--user", "-u", help="Only this user's.")] = None,
    filters: FilterOpt = None,
    sort: SortOpt = None,
    page: PageOpt = None,
    per_page: PerPageOpt = None,
    fields: FieldsOpt = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """List desktops (``--filter state=running --sort -created_at``)."""
    params = list_params(filters, sort, page, per_page, fields)
    with session.api(profile) as api:
        result = fetch_list(api, "desktops", [*params, *([("user", user)] if user is not None else [])])
    print_page(result, COLUMNS, fields, as_json=as_json)


@app.command("show")
def show(desktop: DesktopArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Show one desktop."""
    with session.api(profile) as api:
        row = api.get_desktop(desktop)
    print_object(row, as_json=as_json)


@app.command("update")
def update(
    desktop: DesktopArg,
    name: Annotated[str | None, typer.Option("--name", help="New name.")] = None,
    description: Annotated[str | None, typer.Option("--description", "-d")] = None,
    tag: Annotated[str | None, typer.Option("--tag", help="Image tag (only while stopped).")] = None,
    osf: Annotated[str | None, typer.Option("--osf", help="OSF name or id (only while stopped).")] = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Rename a desktop or change its description, tag or OSF."""
    asked = {"name": name, "description": description, "tag": tag, "osf": osf}
    changes = {k: v for k, v in asked.items() if v is not None}
    with session.api(profile) as api:
        desk = api.update_desktop(desktop, **changes)
    print_done(f"desktop {desk['name']!r} updated", desk, as_json=as_json)


@app.command("start")
def start(
    desktops: DesktopsArg = None,
    filters: FilterOpt = None,
    wait: WaitOpt = 0,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Start desktops on the least-loaded nodes."""
    _act("start", desktops, filters, wait=wait, as_json=as_json, profile=profile)


@app.command("stop")
def stop(
    desktops: DesktopsArg = None,
    filters: FilterOpt = None,
    wait: WaitOpt = 0,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Stop desktops."""
    _act("stop", desktops, filters, wait=wait, as_json=as_json, profile=profile)


def _simple_action(verb: str, doc: str) -> None:
    def command(
        desktops: DesktopsArg = None, filters: FilterOpt = None, as_json: JsonOpt = False, profile: ProfileOpt = None
    ) -> None:
        _act(verb, desktops, filters, as_json=as_json, profile=profile)

    command.__doc__ = doc
    app.command(verb)(command)


_simple_action("disconnect", "Disconnect the user from desktops (their display connection closes).")
_simple_action("block", "Block desktops: nobody may start them (maintenance).")
_simple_action("unblock", "Unblock desktops.")
_simple_action("reset", "Discard stopped desktops' overlays: their next start is a clean image.")


@app.command("delete")
def delete(
    desktops: DesktopsArg = None, filters: FilterOpt = None, as_json: JsonOpt = False, profile: ProfileOpt = None
) -> None:
    """Delete stopped desktops (their users' homes are kept)."""
    with session.api(profile) as api:
        if desktops and len(desktops) == 1 and not filters:
            api.delete_desktop(desktops[0])
            print_done(f"desktop {desktops[0]!r} deleted", as_json=as_json)
            return
        run_bulk(api, "desktops", "delete", desktops, filters, lambda r: api.get_desktop(r)["id"], as_json=as_json)
