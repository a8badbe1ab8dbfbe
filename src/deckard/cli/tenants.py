"""``deckard tenant …``: tenants of a multi-tenant farm (supertenant administrators only)."""

from __future__ import annotations

from typing import Annotated

import typer

from deckard.cli import session
from deckard.cli.output import print_done, print_rows
from deckard.cli.session import JsonOpt, ProfileOpt

app = typer.Typer(help="Tenants (multi-tenant farms: set config tenancy.multi true first).", no_args_is_help=True)

COLUMNS = ("id", "name", "blocked", "description", "created_at")
TenantArg = Annotated[str, typer.Argument(help="Name or id of the tenant.")]


@app.command("list")
def list_(as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """List tenants."""
    with session.api(profile) as api:
        rows = api.list_tenants()
    print_rows(rows, COLUMNS, as_json=as_json)


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Name of the new tenant.")],
    description: Annotated[str, typer.Option("--description", "-d")] = "",
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Create a tenant (with its own default OSF)."""
    with session.api(profile) as api:
        row = api.create_tenant(name, description)
    print_done(f"tenant {row['name']!r} created (id {row['id']})", row, as_json=as_json)


@app.command("delete")
def delete(tenant: TenantArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Delete an empty tenant."""
    with session.api(profile) as api:
        api.delete_tenant(tenant)
    print_done(f"tenant {tenant!r} deleted", as_json=as_json)


@app.command("block")
def block(tenant: TenantArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Block a tenant: its users and administrators cannot log in."""
    with session.api(profile) as api:
        row = api.block_tenant(tenant)
    print_done(f"tenant {row['name']!r} blocked", row, as_json=as_json)


@app.command("unblock")
def unblock(tenant: TenantArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Unblock a tenant."""
    with session.api(profile) as api:
        row = api.unblock_tenant(tenant)
    print_done(f"tenant {row['name']!r} unblocked", row, as_json=as_json)
