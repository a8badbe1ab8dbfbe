"""``deckard audit list|verify``: read the audit log and check its hash chain (exit 1 when it is broken)."""

from __future__ import annotations

from typing import Annotated

import typer

from deckard.cli import session
from deckard.cli.output import print_json, print_rows
from deckard.cli.session import ERROR_EXIT, JsonOpt, ProfileOpt

app = typer.Typer(help="The tamper-evident audit log of administrator actions.", no_args_is_help=True)

COLUMNS = ("id", "at", "admin_name", "action", "object_type", "object_id", "result", "error_code", "source")
FilterOpt = Annotated[
    list[str] | None,
    typer.Option("--filter", "-f", help="field=value, field__op=value (repeat), e.g. action=desktop.start."),
]


@app.command("list")
def list_(
    filter_: FilterOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000)] = 50,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """List audit records, newest first."""
    params: list[tuple[str, str]] = [("per_page", str(limit))]
    for f in filter_ or []:
        key, sep, value = f.partition("=")
        if not sep:
            raise typer.BadParameter(f"{f!r}: use field=value", param_hint="--filter")
        params.append((key, value))
    with session.api(profile) as api:
        page = api.list_page("audit", params)
    print_rows(page["items"], COLUMNS, as_json=as_json)


@app.command("verify")
def verify(as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Check the hash chain; name the first broken record and exit 1 if there is one."""
    with session.api(profile) as api:
        out = api.verify_audit()
    if as_json:
        print_json(out)
    elif out["ok"]:
        typer.echo(f"audit log intact: {out['checked']} records checked")
    else:
        session.errors.print(
            f"audit log BROKEN at record {out['first_broken_id']}: {out['reason']} "
            f"({out['checked']} records before it are intact)",
            style="red",
            markup=False,
        )
    if not out["ok"]:
        raise typer.Exit(ERROR_EXIT)
