"""``deckard connection list``: the connection history with per-phase timings (time-to-desktop), newest first."""

from __future__ import annotations

import typer

from deckard.cli import session
from deckard.cli.filters import FieldsOpt, FilterOpt, PageOpt, PerPageOpt, SortOpt, fetch_list, list_params, print_page
from deckard.cli.session import JsonOpt, ProfileOpt

app = typer.Typer(help="Connection history: who connected where, how it ended, how long each phase took.")

COLUMNS = ("id", "login", "desktop", "source", "started_at", "result", "t_total_ms", "t_start_ms", "bytes_out")


@app.command("list")
def list_(
    filters: FilterOpt = None,
    sort: SortOpt = None,
    page: PageOpt = None,
    per_page: PerPageOpt = 50,
    fields: FieldsOpt = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """List connections (``--filter login=alice --filter t_total_ms__gt=5000``); 50 per page by default."""
    with session.api(profile) as api:
        result = fetch_list(api, "connections", list_params(filters, sort, page, per_page, fields))
    print_page(result, COLUMNS, fields, as_json=as_json)
