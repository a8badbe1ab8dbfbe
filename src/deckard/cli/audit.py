"""``deckard audit list|verify``: read the audit log and check its hash chain (exit 1 when it is broken)."""

from __future__ import annotations

import typer

from deckard.cli import session
from deckard.cli.session import ERROR_EXIT, JsonOpt, ProfileOpt
from deckard.cli.verbs import fetch_and_print, list_command
from deckard.model.schemas import AuditRecord, AuditVerification

app = typer.Typer(help="The tamper-evident audit log of administrator actions.", no_args_is_help=True)

COLUMNS = ("id", "at", "admin_name", "action", "object_type", "object_id", "result", "error_code", "source")
app.command("list")(
    list_command(
        "audit", AuditRecord, COLUMNS, "List audit records, newest first; 50 per page by default.", per_page=50
    )
)


@app.command("verify")
def verify(as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Check the hash chain; name the first broken record and exit 1 if there is one."""
    if not fetch_and_print(profile, as_json, lambda api: api.verify_audit(), _print_verification).ok:
        raise typer.Exit(ERROR_EXIT)


def _print_verification(out: AuditVerification) -> None:
    if out.ok:
        typer.echo(f"audit log intact: {out.checked} records checked")
    else:
        session.errors.print(
            f"audit log BROKEN at record {out.first_broken_id}: {out.reason} "
            f"({out.checked} records before it are intact)",
            style="red",
            markup=False,
        )
