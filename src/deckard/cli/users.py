"""``deckard user ...``: the people who log in to desktops (QVD's users)."""

from __future__ import annotations

from typing import Annotated

import typer

from deckard.cli import session
from deckard.cli.output import print_done, print_object, print_rows
from deckard.cli.session import JsonOpt, ProfileOpt

app = typer.Typer(help="Users who log in to desktops.", no_args_is_help=True)

COLUMNS = ("id", "login", "blocked", "description", "created_at")

NameArg = Annotated[str, typer.Argument(help="Login or id of the user.")]
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
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Create a user."""
    with session.api(profile) as api:
        user = api.create_user(login, password, description=description)
    print_done(f"user {user['login']!r} created (id {user['id']})", user, as_json=as_json)


@app.command("list")
def list_(as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """List users."""
    with session.api(profile) as api:
        rows = api.list_users()
    print_rows(rows, COLUMNS, as_json=as_json)


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


@app.command("block")
def block(user: NameArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Block a user: they cannot log in until unblocked."""
    with session.api(profile) as api:
        row = api.block_user(user)
    print_done(f"user {row['login']!r} blocked", row, as_json=as_json)


@app.command("unblock")
def unblock(user: NameArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Unblock a user."""
    with session.api(profile) as api:
        row = api.unblock_user(user)
    print_done(f"user {row['login']!r} unblocked", row, as_json=as_json)


@app.command("delete")
def delete(user: NameArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Delete a user (their desktops must be deleted first)."""
    with session.api(profile) as api:
        api.delete_user(user)
    print_done(f"user {user!r} deleted", as_json=as_json)
