"""How admin commands print objects: a Rich table for people, ``--json`` for scripts (full rows, stable keys).

Tables show the columns an administrator scans for; JSON always carries every field the API returned.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Sequence
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

PIPE_WIDTH = 1000  # piped output is for grep and awk: one row per line, never folded at 80 columns


def _out() -> Console:
    # made per call so the width follows where stdout points now (terminal, pipe, test runner)
    return Console(highlight=False, width=None if sys.stdout.isatty() else PIPE_WIDTH)


def _cell(value: Any) -> Text:
    # Text, not str: a description like "[red]" is data, not Rich markup
    return Text(_plain(value))


def _plain(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, str) and len(value) >= 19 and value[4:5] == "-" and value[10:11] == "T":
        # ISO timestamps from the API: seconds are precise enough in a table
        try:
            return dt.datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S")
        except ValueError:
            return value
    return str(value)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def print_rows(rows: list[dict[str, Any]], columns: Sequence[str], *, as_json: bool) -> None:
    if as_json:
        print_json(rows)
        return
    table = Table(show_edge=False, header_style="bold")
    for c in columns:
        table.add_column(c.upper(), overflow="fold")
    for r in rows:
        table.add_row(*(_cell(r.get(c)) for c in columns))
    _out().print(table)


def print_object(row: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print_json(row)
        return
    table = Table(show_header=False, show_edge=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in row.items():
        table.add_row(Text(key), _cell(value))
    _out().print(table)


def print_done(message: str, row: dict[str, Any] | None = None, *, as_json: bool) -> None:
    """Confirm an action: the message for people, the affected object (or ``{}``) for scripts."""
    if as_json:
        print_json(row if row is not None else {})
    else:
        _out().print(message, markup=False)
