"""``deckard user ...``: the people who log in to desktops (QVD's users).

``block``, ``unblock`` and ``delete`` take one login (single endpoint), several, or ``--filter`` (bulk endpoint,
one result line per user).
"""

from __future__ import annotations

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
from deckard.cli.session import JsonOpt, ProfileOpt

app = typer.Typer(help="Users who log in to desktops.", no_args_is_help=True)

COLUMNS = ("id", "login", "blocked", "description", "created_at")

NameArg = Annotated[str, typer.Argument(help="Login or id of the user.")]
NamesArg = Annotated[list[str] | None, typer.Argument(help="Logins or ids (or use --filter).")]
PasswordOpt = Annotated[
    str,
    typer.Option(
        "--password",
        envvar="DECKARD_PASSWORD",
        show_envvar=True,
        prompt=True,
        hide_input=True,
        confirmation_prompt=True,
        help="The password (asked for if missing).",
    ),
]


@app.command("add")
def add(
    login: Annotated[str, typer.Argument(help="Login of the new user.")],
    password: PasswordOpt,
    description: Annotated[str, typer.Option("--description", "-d")] = "",
    tenant: Annotated[str | None, typer.Option("--tenant", "-t", help="Tenant (supertenant admins only).")] = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Create a user."""
    with session.api(profile) as api:
        user = api.create_user(login, password, description=description, tenant=tenant)
    print_done(f"user {user['login']!r} created (id {user['id']})", user, as_json=as_json)


@app.command("list")
def list_(
    filters: FilterOpt = None,
    sort: SortOpt = None,
    page: PageOpt = None,
    per_page: PerPageOpt = None,
    fields: FieldsOpt = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """List users (``--filter blocked=true --sort login``)."""
    params = list_params(filters, sort, page, per_page, fields)
    with session.api(profile) as api:
        result = fetch_list(api, "users", params)
    print_page(result, COLUMNS, fields, as_json=as_json)


@app.command("show")
def show(user: NameArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Show one user."""
    with session.api(profile) as api:
        row = api.get_user(user)
    print_object(row, as_json=as_json)


@app.command("passwd")
def passwd(user: NameArg, password: PasswordOpt, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Set a user's password."""
    with session.api(profile) as api:
        row = api.set_user_password(user, password)
    print_done(f"password of user {row['login']!r} changed", row, as_json=as_json)


@app.command("update")
def update(
    user: NameArg,
    description: Annotated[str | None, typer.Option("--description", "-d")] = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Change a user's description."""
    with session.api(profile) as api:
        row = api.update_user(user, description=description)
    print_done(f"user {row['login']!r} updated", row, as_json=as_json)


def _act(action: str, users: list[str] | None, filters: list[str] | None, *, as_json: bool, profile: Any) -> None:
    with session.api(profile) as api:
        if users and len(users) == 1 and not filters:
            if action == "delete":
                api.delete_user(users[0])
                print_done(f"user {users[0]!r} deleted", as_json=as_json)
            else:
                row = getattr(api, f"{action}_user")(users[0])
                print_done(f"user {row['login']!r} {action}ed", row, as_json=as_json)
            return
        run_bulk(api, "users", action, users, filters, lambda r: api.get_user(r)["id"], as_json=as_json)


@app.command("block")
def block(
    users: NamesArg = None, filters: FilterOpt = None, as_json: JsonOpt = False, profile: ProfileOpt = None
) -> None:
    """Block users: they cannot log in until unblocked."""
    _act("block", users, filters, as_json=as_json, profile=profile)


@app.command("unblock")
def unblock(
    users: NamesArg = None, filters: FilterOpt = None, as_json: JsonOpt = False, profile: ProfileOpt = None
) -> None:
    """Unblock users."""
    _act("unblock", users, filters, as_json=as_json, profile=profile)


@app.command("delete")
def delete(
    users: NamesArg = None, filters: FilterOpt = None, as_json: JsonOpt = False, profile: ProfileOpt = None
) -> None:
    """Delete users (their desktops must be deleted first)."""
    _act("delete", users, filters, as_json=as_json, profile=profile)
