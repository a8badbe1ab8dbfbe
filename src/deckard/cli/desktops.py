"""``deckard desktop ...``: desktops (QVD's VMs).  Start and stop only *ask*: a node carries the command out,
so these commands print the state the desktop is in right after asking (``--wait`` follows it to the end).

Action verbs take one name (the single-object endpoint), several names, or ``--filter`` (the bulk endpoint,
one result line per desktop): ``deckard desktop start --filter osf=web``.  ``--wait`` follows every desktop
the action was accepted for, whichever endpoint carried it, and fails (exit 1) if any is not done in time.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer

from deckard.cli import session
from deckard.cli.output import print_done
from deckard.cli.session import ERROR_EXIT, JsonOpt, ProfileOpt, report
from deckard.cli.verbs import bulk_command, list_command, object_command, option
from deckard.client.api import ApiClient
from deckard.model.errors import Unavailable
from deckard.model.schemas import Desktop
from deckard.model.session_policy import describe_duration
from deckard.model.states import DesktopCommand, DesktopState

app = typer.Typer(help="Desktops (containers or VMs), one per user and OSF.", no_args_is_help=True)

COLUMNS = (
    "id",
    "name",
    "user",
    "osf",
    "tag",
    "ip",
    "network",
    "network_ip",
    "state",
    "cmd",
    "node",
    "blocked",
    "user_state",
    "idle",
    "disconnected",
)
SETTLED = {
    DesktopCommand.START: (DesktopState.RUNNING, DesktopState.FAILED),
    DesktopCommand.STOP: (DesktopState.STOPPED, DesktopState.FAILED),
}
POLL_S = 0.5

DesktopArg = Annotated[str, typer.Argument(help="Name or id of the desktop.")]
DesktopsArg = Annotated[list[str] | None, typer.Argument(help="Names or ids (or use --filter).")]
WaitOpt = Annotated[
    float, typer.Option("--wait", metavar="SECONDS", help="Wait up to SECONDS for the command to complete.")
]
UserOpt = Annotated[str | None, typer.Option("--user", "-u", help="Only this user's.")]
DisconnectedForOpt = Annotated[
    str | None,
    typer.Option(
        "--disconnected-for",
        metavar="DURATION",
        help="Only running desktops nobody has been connected to for at least DURATION (90s, 30m, 2h, 1d).",
    ),
]
IdleForOpt = Annotated[
    str | None,
    typer.Option(
        "--idle-for",
        metavar="DURATION",
        help="Only desktops whose connected user has not typed nor moved the mouse for at least DURATION.",
    ),
]


def describe(desk: Desktop) -> str:
    """One line an administrator reads: where the desktop is and what it is about to do."""
    parts = [f"desktop {desk.name!r} (id {desk.id}): {desk.state}"]
    if desk.cmd:
        parts.append(f"{desk.cmd} requested")
    if desk.node:
        parts.append(f"node {desk.node}")
    if desk.blocked:
        parts.append("blocked")
    if desk.state in (DesktopState.FAILED, DesktopState.STOPPED) and desk.failure_reason:
        parts.append(f"reason: {desk.failure_reason}")
    return ", ".join(parts)


def table_row(desk: Desktop) -> dict[str, Any]:
    """A desktop's row in ``desktop list``: with how long its user has been idle, or nobody connected."""
    now = dt.datetime.now(dt.UTC)
    row = desk.dump()
    for column, since in (("idle", desk.idle_since), ("disconnected", desk.disconnected_since)):
        row[column] = describe_duration((now - since).total_seconds()) if since else None
    return row


def settled(desk: Desktop, command: str) -> bool:
    """The node carried ``command`` out: it is no longer pending and the state is one it ends in."""
    return desk.cmd != command and desk.state in SETTLED[DesktopCommand(command)]


def follow(api: ApiClient, ids: list[int], command: str, wait: float) -> list[Desktop] | None:
    """Poll the desktops until each has settled after ``command``; exit 1 naming those that did not in time."""
    if wait <= 0:
        return None
    deadline = time.monotonic() + wait
    ended: dict[int, Desktop] = {}
    pending = list(ids)
    while True:
        for desktop_id in pending:
            ended[desktop_id] = api.get_desktop(desktop_id)
        pending = [i for i in pending if not settled(ended[i], command)]
        if not pending:
            return [ended[i] for i in ids]
        if time.monotonic() >= deadline:
            late = "; ".join(describe(ended[i]) for i in pending)
            report(Unavailable(f"still not done after {wait:g} s: {late}", code="timeout"))
            raise typer.Exit(ERROR_EXIT)
        time.sleep(POLL_S)


def _get(api: ApiClient, ref: str) -> Desktop:
    return api.get_desktop(ref)


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Name of the new desktop.")],
    user: Annotated[str, typer.Option("--user", "-u", help="Owner (login or id).")],
    osf: Annotated[str | None, typer.Option("--osf", help="OSF name or id (default: default).")] = None,
    tag: Annotated[str, typer.Option("--tag", help="Image tag it starts from.")] = "default",
    description: Annotated[str, typer.Option("--description", "-d")] = "",
    network: Annotated[
        str | None, typer.Option("--network", help='Network (name or id; default: the OSF\'s; "": the default).')
    ] = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Create a desktop for a user (its IP address is allocated now, in its network)."""
    with session.api(profile) as api:
        desk = api.create_desktop(name, user, osf=osf, tag=tag, description=description, network=network)
    where = f", {desk.network_ip} on network {desk.network!r}" if desk.network else ""
    print_done(f"desktop {desk.name!r} created (id {desk.id}, ip {desk.ip}{where})", desk, as_json=as_json)


app.command("list")(
    list_command(
        "desktops",
        Desktop,
        COLUMNS,
        "List desktops (``--filter state=running --sort -created_at``, ``--disconnected-for 2h``).\n\n"
        "IDLE is how long the connected user has not typed nor moved the mouse; DISCONNECTED how long nobody has been "
        "connected to a running desktop.",
        query=[
            option("user", UserOpt),
            option("disconnected_for", DisconnectedForOpt),
            option("idle_for", IdleForOpt),
        ],
        table_row=table_row,
    )
)
app.command("show")(object_command(DesktopArg, _get, "Show one desktop."))


@app.command("update")
def update(
    desktop: DesktopArg,
    name: Annotated[str | None, typer.Option("--name", help="New name.")] = None,
    description: Annotated[str | None, typer.Option("--description", "-d")] = None,
    tag: Annotated[str | None, typer.Option("--tag", help="Image tag (only while stopped).")] = None,
    osf: Annotated[str | None, typer.Option("--osf", help="OSF name or id (only while stopped).")] = None,
    network: Annotated[
        str | None,
        typer.Option("--network", help='Move to this network, with a new address (only while stopped; "": default).'),
    ] = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Rename a desktop or change its description, tag, OSF or network."""
    asked = {"name": name, "description": description, "tag": tag, "osf": osf, "network": network}
    changes = {k: v for k, v in asked.items() if v is not None}
    with session.api(profile) as api:
        desk = api.update_desktop(desktop, **changes)
    print_done(f"desktop {desk.name!r} updated", desk, as_json=as_json)


@app.command("expire")
def expire(
    desktop: DesktopArg,
    soft: Annotated[int | None, typer.Option("--soft", min=0, help="Seconds until the user is warned.")] = None,
    hard: Annotated[int | None, typer.Option("--hard", min=0, help="Seconds until the desktop is stopped.")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove both deadlines.")] = False,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Set when a running desktop expires (QVD's vm_expiration_soft/hard): a warning, then a stop."""
    if clear == (soft is not None or hard is not None):
        raise typer.BadParameter("give --soft and/or --hard, or --clear")
    with session.api(profile) as api:
        desk = api.expire_desktop(desktop, soft_s=soft, hard_s=hard)
    when = f"soft {desk.expire_soft_at or '-'}, hard {desk.expire_hard_at or '-'}"
    print_done(f"desktop {desk.name!r} expires: {when}", desk, as_json=as_json)


@app.command("console-log")
def console_log(
    desktop: DesktopArg,
    max_bytes: Annotated[int, typer.Option("--bytes", min=1, max=1 << 20, help="Show the last N bytes.")] = 65536,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Show what the desktop's guest wrote on its console: its kernel, init and agent (why a boot failed)."""
    with session.api(profile) as api:
        log = api.console_log(desktop, max_bytes)
    if as_json:
        print_done("", log, as_json=True)
    elif not log.found:
        print_done(
            f"no console log is kept for {log.desktop}: it has not run on a node of this farm", log, as_json=False
        )
    else:
        sys.stdout.write(log.text if log.text.endswith("\n") or not log.text else log.text + "\n")


@app.command("explain-network")
def explain_network(
    desktop: DesktopArg,
    dest: Annotated[str, typer.Argument(help="An IPv4 address the desktop would connect to.")],
    port: Annotated[int | None, typer.Option("--port", "-p", min=1, max=65535, help="TCP or UDP port.")] = None,
    proto: Annotated[str, typer.Option("--proto", help="tcp, udp or icmp.")] = "tcp",
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Say whether the desktop may connect to DEST, and which rule of its egress policy decides."""
    with session.api(profile) as api:
        why = api.explain_network(desktop, dest, port=port, proto=proto)
    target = f"{why.proto} {why.destination}" + (f":{why.port}" if why.port else "")
    verdict = "allowed" if why.allowed else "blocked"
    policy = "; ".join(why.policy) or "(no rules)"
    message = f"{why.desktop} → {target}: {verdict}. {why.reason}.\npolicy ({why.policy_source}): {policy}"
    print_done(message, why, as_json=as_json)


def _verb(action: str, single: Callable[[ApiClient, str], Desktop | None], doc: str, wait: bool = False) -> None:
    """Register an action verb; with ``wait`` it takes ``--wait`` and follows the desktops to the end."""

    def follow_action(api: ApiClient, ids: list[int], wait: float) -> list[Desktop] | None:
        return follow(api, ids, action, wait)

    done: Callable[[Desktop], str] | str = describe if action != "delete" else "desktop {ref!r} deleted"
    app.command(action)(
        bulk_command(
            "desktops",
            action,
            DesktopsArg,
            single,
            _get,
            doc,
            done,
            params=[option("wait", WaitOpt, 0)] if wait else (),
            follow=follow_action if wait else None,
        )
    )


_verb("start", lambda api, ref: api.start_desktop(ref), "Start desktops on the least-loaded nodes.", wait=True)
_verb("stop", lambda api, ref: api.stop_desktop(ref), "Stop desktops.", wait=True)
_verb(
    "disconnect",
    lambda api, ref: api.disconnect_desktop(ref),
    "Disconnect the user from desktops (their display connection closes).",
)
_verb("block", lambda api, ref: api.block_desktop(ref), "Block desktops: nobody may start them (maintenance).")
_verb("unblock", lambda api, ref: api.unblock_desktop(ref), "Unblock desktops.")
_verb(
    "reset",
    lambda api, ref: api.reset_desktop(ref),
    "Discard stopped desktops' overlays: their next start is a clean image.",
)
_verb(
    "delete",
    lambda api, ref: api.delete_desktop(ref),
    "Delete stopped desktops and their writable layers (their users' homes are kept).",
)
