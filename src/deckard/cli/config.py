"""``deckard config get|set|reset``: layered configuration (default → global → tenant → OSF), every key documented."""

from __future__ import annotations

from typing import Annotated

import typer

from deckard.cli import session
from deckard.cli.output import print_done, print_rows
from deckard.cli.session import JsonOpt, ProfileOpt

app = typer.Typer(
    help="Farm configuration: effective values, where they come from, set and reset.", no_args_is_help=True
)

COLUMNS = ("key", "value", "source", "default", "per_tenant", "description")
TenantOpt = Annotated[str | None, typer.Option("--tenant", "-t", help="A tenant's layer (per-tenant keys).")]
OsfOpt = Annotated[str | None, typer.Option("--osf", help="An OSF's layer (keys that may differ per OSF).")]


@app.command("get")
def get(
    key: Annotated[str | None, typer.Argument(help="One key; all keys when omitted.")] = None,
    tenant: TenantOpt = None,
    osf: OsfOpt = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Show effective values, their default and source (default, global, tenant or osf)."""
    with session.api(profile) as api:
        rows = [api.get_config(key, tenant, osf)] if key else api.list_config(tenant, osf)
    print_rows(rows, COLUMNS, as_json=as_json)


@app.command("set")
def set_(
    key: Annotated[str, typer.Argument(help="The key, e.g. tenancy.multi.")],
    value: Annotated[str, typer.Argument(help="The value (checked against the key's type).")],
    tenant: TenantOpt = None,
    osf: OsfOpt = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Set a key globally or, with --tenant, for one tenant, or with --osf, for one OSF's desktops."""
    with session.api(profile) as api:
        row = api.set_config(key, value, tenant, osf)
    print_done(f"{row.key} = {row.value!r} ({row.source})", row, as_json=as_json)


@app.command("reset")
def reset(
    key: Annotated[str, typer.Argument(help="The key.")],
    tenant: TenantOpt = None,
    osf: OsfOpt = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Reset a key: the layer below shows through again."""
    with session.api(profile) as api:
        row = api.reset_config(key, tenant, osf)
    print_done(f"{row.key} reset: now {row.value!r} ({row.source})", row, as_json=as_json)
