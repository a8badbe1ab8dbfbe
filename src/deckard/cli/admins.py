"""``deckard admin …``: administrators, their passwords and roles."""

from __future__ import annotations

from typing import Annotated

import typer

from deckard.cli import session
from deckard.cli.output import print_done
from deckard.cli.session import PROMPTED, JsonOpt, ProfileOpt
from deckard.cli.verbs import list_command, object_command, option
from deckard.model.schemas import Admin

app = typer.Typer(help="Administrators of the farm or of a tenant.", no_args_is_help=True)

COLUMNS = ("id", "name", "tenant_id", "roles", "blocked", "created_at")
AdminArg = Annotated[str, typer.Argument(help="Name or id of the administrator.")]
PasswordOpt = Annotated[
    str,
    typer.Option(
        "--password",
        envvar="DECKARD_ADMIN_PASSWORD",
        confirmation_prompt=True,
        help="The password, at least 8 characters (asked for if missing).",
        **PROMPTED,
    ),
]
RolesOpt = Annotated[list[str] | None, typer.Option("--role", "-r", help="A role name or id (repeat for several).")]


app.command("list")(list_command("admins", Admin, COLUMNS, "List administrators."))


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Name of the new administrator.")],
    password: PasswordOpt,
    tenant: Annotated[str | None, typer.Option("--tenant", "-t", help="Tenant (supertenant admins only).")] = None,
    role: RolesOpt = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Create an administrator with roles (e.g. -r Operator)."""
    with session.api(profile) as api:
        row = api.create_admin(name, password, tenant=tenant, roles=role or [])
    print_done(f"administrator {row.name!r} created (id {row.id})", row, as_json=as_json)


app.command("passwd")(
    object_command(
        AdminArg,
        lambda api, ref, password: api.update_admin(ref, password=password),
        "Set an administrator's password (their open sessions end).",
        "password of administrator {name!r} changed",
        params=[option("password", PasswordOpt)],
    )
)
app.command("roles")(
    object_command(
        AdminArg,
        lambda api, ref, role: api.update_admin(ref, roles=role),
        "Set an administrator's roles.",
        lambda row: f"administrator {row.name!r} now has roles {', '.join(row.roles or [])}",
        params=[
            option("role", Annotated[list[str], typer.Argument(help="The roles it will have (replaces the old).")])
        ],
    )
)


app.command("delete")(
    object_command(
        AdminArg, lambda api, ref: api.delete_admin(ref), "Delete an administrator.", "administrator {ref!r} deleted"
    )
)
