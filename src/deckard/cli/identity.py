"""``deckard ban …`` and ``deckard token …``: login bans, and the logged-in administrator's own API tokens.

A ban is a login counter that makes an account or an address wait (``services/lockout.py``); clearing it lets
them log in at once.  An API token is a named, expiring secret for scripts (``Authorization: Bearer``): its
secret is printed once, when it is made.  A user's second factor and personal tokens are ``deckard user``
commands (``cli/users.py``).
"""

from __future__ import annotations

from typing import Annotated

import typer

from deckard.cli import session
from deckard.cli.output import print_done, print_rows
from deckard.cli.session import JsonOpt, ProfileOpt
from deckard.cli.verbs import object_command

ban_app = typer.Typer(help="Accounts and addresses that must wait to log in after failed logins.", no_args_is_help=True)
token_app = typer.Typer(help="Your own API tokens, for scripts.", no_args_is_help=True)

BAN_COLUMNS = ("key", "kind", "failures", "locked_until")
TOKEN_COLUMNS = ("id", "name", "created_at", "expires_at", "revoked")


@ban_app.command("list")
def list_bans(as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """List the bans in force (a tenant's administrators see their tenant's accounts only)."""
    with session.api(profile) as api:
        rows = api.list_bans()
    print_rows(rows, BAN_COLUMNS, as_json=as_json)


ban_app.command("clear")(
    object_command(
        Annotated[str, typer.Argument(help="The ban's key, as `deckard ban list` shows it.")],
        lambda api, ref: api.clear_ban(ref),
        "Clear a ban: the account or address may log in at once.",
        "ban {ref!r} cleared",
    )
)


@token_app.command("create")
def create_token(
    name: Annotated[str, typer.Argument(help="What the token is for (e.g. backup-script).")],
    days: Annotated[int, typer.Option("--days", min=1, max=365, help="It expires after this many days.")] = 30,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Make an API token for yourself; its secret is printed this once."""
    with session.api(profile) as api:
        out = api.create_own_token(name, days)
    print_done(
        f"token {out.name!r} (id {out.id}) expires {out.expires_at:%Y-%m-%d %H:%M} UTC; keep it now, it is not "
        f"shown again:\n{out.token}",
        out,
        as_json=as_json,
    )


@token_app.command("list")
def list_tokens(as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """List your API tokens (never their secrets)."""
    with session.api(profile) as api:
        rows = api.list_own_tokens()
    print_rows(rows, TOKEN_COLUMNS, as_json=as_json)


token_app.command("revoke")(
    object_command(
        Annotated[int, typer.Argument(help="The token's id, as `deckard token list` shows it.")],
        lambda api, ref: api.revoke_own_token(ref),
        "Revoke one of your API tokens: it stops working at once.",
        "token {ref} revoked",
    )
)


def register(app: typer.Typer) -> None:
    app.add_typer(ban_app, name="ban")
    app.add_typer(token_app, name="token")
