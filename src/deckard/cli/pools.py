"""``deckard pool ...``: warm pools (``docs/pools.md``): per OSF and image tag, how many desktops the farm keeps
started for users to take over.  ``set`` makes a pool or changes it; ``list`` shows how full each one is."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from deckard.cli import session
from deckard.cli.output import print_done
from deckard.cli.session import JsonOpt, ProfileOpt
from deckard.cli.verbs import list_command
from deckard.model.schemas import Pool

app = typer.Typer(help="Warm pools: desktops started before users ask, taken over at connect.", no_args_is_help=True)

COLUMNS = ("id", "osf", "tag", "size", "hours", "timezone", "wanted", "ready", "starting", "last_error")
OsfArg = Annotated[str, typer.Argument(help="Name or id of the OSF.")]
TagOpt = Annotated[str, typer.Option("--tag", "-t", help="The image tag of the pool's desktops.")]
SizeOpt = Annotated[int | None, typer.Option("--size", "-s", help="Warm desktops to keep ready (0-100).")]
HoursOpt = Annotated[
    str | None, typer.Option("--hours", help="Keep it only then: 'Mon-Fri 07:00-19:00' ('' = always).")
]
TimezoneOpt = Annotated[str | None, typer.Option("--timezone", help="The hours' time zone (IANA, default UTC).")]


def _row(pool: Pool) -> dict[str, Any]:
    return {**pool.dump(), "hours": pool.hours or "always", "last_error": (pool.last_error or "")[:60]}


def _find(api: Any, osf: str, tag: str) -> Pool | None:
    return next((p for p in api.list_pools([("tag", tag)]) if osf in (p.osf, str(p.osf_id))), None)


def _existing(api: Any, osf: str, tag: str) -> Pool:
    pool = _find(api, osf, tag)
    if pool is None:
        raise typer.BadParameter(f"the OSF {osf!r} has no warm pool for the tag {tag!r}", param_hint="OSF")
    return pool


def _said(pool: Pool, verb: str) -> str:
    when = f" ({pool.hours}, {pool.timezone})" if pool.hours else ""
    return f"warm pool {pool.id} of OSF {pool.osf!r} tag {pool.tag!r}: {pool.size} desktops{when} {verb}"


app.command("list")(list_command("pools", Pool, COLUMNS, "List warm pools and how full they are.", table_row=_row))


@app.command("set")
def set_pool(
    osf: OsfArg,
    tag: TagOpt = "default",
    size: SizeOpt = None,
    hours: HoursOpt = None,
    timezone: TimezoneOpt = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Keep SIZE desktops of the OSF (and tag) started for users to take over; change a pool that exists."""
    with session.api(profile) as api:
        current = _find(api, osf, tag)
        if current is None:
            if size is None:
                raise typer.BadParameter("a new pool needs --size", param_hint="--size")
            pool = api.create_pool(osf, tag=tag, size=size, hours=hours or "", timezone=timezone or "UTC")
            verb = "created"
        else:
            pool = api.update_pool(current.id, size=size, hours=hours, timezone=timezone)
            verb = "updated"
    print_done(_said(pool, verb), pool, as_json=as_json)


@app.command("show")
def show(osf: OsfArg, tag: TagOpt = "default", as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Show the OSF's pool (of the tag)."""
    with session.api(profile) as api:
        pool = _existing(api, osf, tag)
    print_done(_said(pool, f"({pool.ready} ready, {pool.starting} starting)"), pool, as_json=as_json)


@app.command("delete")
def delete(osf: OsfArg, tag: TagOpt = "default", as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Delete the OSF's pool (of the tag): its warm desktops are stopped."""
    with session.api(profile) as api:
        pool = _existing(api, osf, tag)
        api.delete_pool(pool.id)
    print_done(_said(pool, "deleted"), pool, as_json=as_json)
