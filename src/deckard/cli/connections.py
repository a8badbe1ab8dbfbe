"""``deckard connection list``: the connection history with per-phase timings (time-to-desktop), newest first."""

from __future__ import annotations

import typer

from deckard.cli.verbs import list_command
from deckard.model.schemas import Connection

app = typer.Typer(help="Connection history: who connected where, how it ended, how long each phase took.")

COLUMNS = ("id", "login", "desktop", "source", "started_at", "result", "t_total_ms", "t_start_ms", "bytes_out")

app.command("list")(
    list_command(
        "connections",
        Connection,
        COLUMNS,
        "List connections (``--filter login=alice --filter t_total_ms__gt=5000``); 50 per page by default.",
        per_page=50,
    )
)
