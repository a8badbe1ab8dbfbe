"""``deckard admin …``: administrators, their passwords and roles."""

from __future__ import annotations

from typing import Annotated

import typer

from deckard.cli import session
from deckard.cli.output import print_done, print_rows
from deckard.cli.session import JsonOpt, ProfileOpt

app = typer.Typer(help="Administrators of the farm or of a tenant.", no_args_is_help=True)

COLUMNS = ("id", "name", "tenant_id", "roles", "blocked", "created_at")
AdminArg = Annotated[str, typer.Argument(help="Name or id of the administrator.")]
PasswordOpt = Annotated[
    str,
    typer.Option(
        "--password",
        envvar="DECKARD_ADMIN_PASSWORD",
        show_envvar=True,
        prompt=True,
        hide_input=True,
        confirmation_prompt=True,
        help="The password, at least 8 characters (asked for if missing).",
    ),
]
RolesOpt = Annotated[list[str] | None, typer.Option("--role", "-r", help="A role name or id (repeat for several).")]


@app.command("list")
def list_(as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """List administrators."""
    with session.api(profile) as api:
        rows = api.list_admins()
    print_rows(rows, COLUMNS, as_json=as_json)


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
    print_done(f"administrator {row['name']!r} created (id {row['id']})", row, as_json=as_json)


@app.command("passwd")
def passwd(admin: AdminArg, password: PasswordOpt, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Set an administrator's password (their open sessions end)."""
    with session.api(profile) as api:
        row = api.update_admin(admin, password=password)
    print_done(f"password of administrator {row['name']!r} changed", row, as_json=as_json)


@app.command("roles")
def roles(
    admin: AdminArg,
    role: Annotated[list[str], typer.Argument(help="The roles the administrator will have (replaces the old ones).")],
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Set an administrator's roles."""
    with session.api(profile) as api:
        row = api.update_admin(admin, roles=role)
    print_done(
        f"administrator {row['name']!r} now has roles {', '.join(row.get('roles') or role)}", row, as_json=as_json
    )


@app.command("delete")
def delete(admin: AdminArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Delete an administrator."""
    with session.api(profile) as api:
        api.delete_admin(admin)
    print_done(f"administrator {admin!r} deleted", as_json=as_json)
