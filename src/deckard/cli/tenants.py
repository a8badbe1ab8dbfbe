"""``deckard tenant …``: tenants of a multi-tenant farm (supertenant administrators only)."""

from __future__ import annotations

from typing import Annotated

import typer

from deckard.cli import session
from deckard.cli.output import print_done
from deckard.cli.session import JsonOpt, ProfileOpt
from deckard.cli.verbs import list_command, object_command
from deckard.model.schemas import Tenant

app = typer.Typer(help="Tenants (multi-tenant farms: set config tenancy.multi true first).", no_args_is_help=True)

COLUMNS = ("id", "name", "blocked", "description", "created_at")
TenantArg = Annotated[str, typer.Argument(help="Name or id of the tenant.")]

app.command("list")(list_command("tenants", Tenant, COLUMNS, "List tenants."))


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
    print_done(f"tenant {row.name!r} created (id {row.id})", row, as_json=as_json)


app.command("delete")(
    object_command(
        TenantArg, lambda api, ref: api.delete_tenant(ref), "Delete an empty tenant.", "tenant {ref!r} deleted"
    )
)
app.command("block")(
    object_command(
        TenantArg,
        lambda api, ref: api.block_tenant(ref),
        "Block a tenant: its users and administrators cannot log in.",
        "tenant {name!r} blocked",
    )
)
app.command("unblock")(
    object_command(
        TenantArg, lambda api, ref: api.unblock_tenant(ref), "Unblock a tenant.", "tenant {name!r} unblocked"
    )
)
