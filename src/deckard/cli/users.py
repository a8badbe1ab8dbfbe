"""``deckard user ...``: the people who log in to desktops (QVD's users).

``block``, ``unblock`` and ``delete`` take one login (single endpoint), several, or ``--filter`` (bulk endpoint,
one result line per user).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated

import typer

from deckard.cli import session
from deckard.cli.output import print_done, print_rows
from deckard.cli.session import PROMPTED, JsonOpt, ProfileOpt
from deckard.cli.verbs import bulk_command, list_command, object_command, option
from deckard.client.api import ApiClient
from deckard.model.schemas import User

app = typer.Typer(help="Users who log in to desktops.", no_args_is_help=True)

COLUMNS = ("id", "login", "blocked", "description", "created_at")

NameArg = Annotated[str, typer.Argument(help="Login or id of the user.")]
NamesArg = Annotated[list[str] | None, typer.Argument(help="Logins or ids (or use --filter).")]
PasswordOpt = Annotated[
    str,
    typer.Option(
        "--password",
        envvar="DECKARD_PASSWORD",
        confirmation_prompt=True,
        help="The password (asked for if missing).",
        **PROMPTED,
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
    print_done(f"user {user.login!r} created (id {user.id})", user, as_json=as_json)


def _get(api: ApiClient, ref: str) -> User:
    return api.get_user(ref)


app.command("list")(list_command("users", User, COLUMNS, "List users (``--filter blocked=true --sort login``)."))
app.command("show")(object_command(NameArg, _get, "Show one user."))


@app.command("passwd")
def passwd(user: NameArg, password: PasswordOpt, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Set a user's password."""
    with session.api(profile) as api:
        row = api.set_user_password(user, password)
    print_done(f"password of user {row.login!r} changed", row, as_json=as_json)


@app.command("update")
def update(
    user: NameArg,
    description: Annotated[str | None, typer.Option("--description", "-d")] = None,
    allowed_networks: Annotated[
        str | None, typer.Option("--allowed-networks", help="CIDRs the user may log in from ('' = the tenant's).")
    ] = None,
    allowed_hours: Annotated[
        str | None, typer.Option("--allowed-hours", help="e.g. 'Mon-Fri 07:00-19:00' ('' = the tenant's).")
    ] = None,
    ssh_keys: Annotated[
        list[str] | None,
        typer.Option(
            "--ssh-key",
            help="A public SSH key (a line of a .pub file); repeat for several. Replaces the user's keys.",
        ),
    ] = None,
    clear_ssh_keys: Annotated[
        bool, typer.Option("--clear-ssh-keys", help="Remove all of the user's public SSH keys.")
    ] = False,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Change a user's description, their own login rules (docs/authentication.md) or the public SSH keys their
    desktops get at boot (docs/networking.md, "Guest metadata")."""
    if ssh_keys and clear_ssh_keys:
        raise typer.BadParameter("give --ssh-key or --clear-ssh-keys, not both")
    keys = [] if clear_ssh_keys else ssh_keys or None
    with session.api(profile) as api:
        row = api.update_user(
            user,
            description=description,
            allowed_networks=allowed_networks,
            allowed_hours=allowed_hours,
            ssh_keys=keys,
        )
    print_done(f"user {row.login!r} updated", row, as_json=as_json)


def _user_verb(action: str, single: Callable[[ApiClient, str], User | None], doc: str, done: str) -> None:
    app.command(action)(bulk_command("users", action, NamesArg, single, _get, doc, done))


_user_verb(
    "block",
    lambda api, ref: api.block_user(ref),
    "Block users: they cannot log in until unblocked.",
    "user {login!r} blocked",
)
_user_verb("unblock", lambda api, ref: api.unblock_user(ref), "Unblock users.", "user {login!r} unblocked")
_user_verb(
    "delete",
    lambda api, ref: api.delete_user(ref),
    "Delete users (their desktops must be deleted first).",
    "user {ref!r} deleted",
)


# a user's second factor and personal tokens: the API names the user by id, the commands take a login too
def _user_id(api: ApiClient, ref: str) -> int:
    return int(ref) if ref.isascii() and ref.isdigit() else api.get_user(ref).id


app.command("second-factor")(
    object_command(NameArg, lambda api, ref: api.get_second_factor(_user_id(api, ref)), "Show a user's second factor.")
)
app.command("reset-second-factor")(
    object_command(
        NameArg,
        lambda api, ref: api.reset_second_factor(_user_id(api, ref)),
        "Reset a user's second factor: the next login asks for the password only (or to enrol again).",
        "second factor of user {ref!r} reset",
    )
)


@app.command("tokens")
def tokens(user: NameArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """List a user's personal tokens (never their secrets)."""
    with session.api(profile) as api:
        rows = api.list_user_tokens(_user_id(api, user))
    print_rows(rows, ("id", "name", "created_at", "expires_at", "last_used_at", "revoked"), as_json=as_json)


app.command("revoke-token")(
    object_command(
        NameArg,
        lambda api, ref, token_id: api.revoke_user_token(_user_id(api, ref), token_id),
        "Revoke one of a user's personal tokens: it stops working at once.",
        "token of user {ref!r} revoked",
        params=[
            option(
                "token_id",
                Annotated[int, typer.Argument(help="The token's id (`deckard user tokens`).")],
                inspect.Parameter.empty,
            )
        ],
    )
)
