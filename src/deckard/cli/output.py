"""How admin commands print objects: a Rich table for people, ``--json`` for scripts (full rows, stable keys).

Tables show the columns an administrator scans for; JSON always carries every field the API returned and
only those (a schema object prints what its answer carried, ``Schema.dump``).
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from deckard.model.schemas import Schema

Shown = Schema | Mapping[str, Any]  # an API object, or a record the command made itself

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


def fields(obj: Shown) -> dict[str, Any]:
    """An object's fields as JSON values (timestamps as ISO text)."""
    return obj.dump() if isinstance(obj, Schema) else dict(obj)


def _jsonable(data: Any) -> Any:
    if isinstance(data, Schema | Mapping):
        return {k: _jsonable(v) for k, v in fields(data).items()}
    if isinstance(data, list | tuple):
        return [_jsonable(v) for v in data]
    return data


def print_json(data: Any) -> None:
    typer.echo(json.dumps(_jsonable(data), indent=2, sort_keys=True, default=str))


def print_rows(rows: Sequence[Shown], columns: Sequence[str], *, as_json: bool) -> None:
    if as_json:
        print_json(rows)
        return
    table = Table(show_edge=False, header_style="bold")
    for c in columns:
        table.add_column(c.upper(), overflow="fold")
    for r in rows:
        row = fields(r)
        table.add_row(*(_cell(row.get(c)) for c in columns))
    _out().print(table)


def print_object(obj: Shown, *, as_json: bool) -> None:
    if as_json:
        print_json(obj)
        return
    table = Table(show_header=False, show_edge=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in fields(obj).items():
        table.add_row(Text(key), _cell(value))
    _out().print(table)


def print_done(message: str, obj: Shown | None = None, *, as_json: bool) -> None:
    """Confirm an action: the message for people, the affected object (or ``{}``) for scripts."""
    if as_json:
        print_json(obj if obj is not None else {})
    else:
        _out().print(message, markup=False)


BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[int | None], width: int = 48) -> str:
    """``values`` in at most ``width`` characters, each the highest of its share, from ▁ (0) to █ (the highest of
    all); a share with no value is a space (a gap in the samples)."""
    if not values:
        return ""
    groups = [values[i * len(values) // width : (i + 1) * len(values) // width] for i in range(width)]
    peaks = [max((v for v in g if v is not None), default=None) for g in groups if g]
    top = max((p for p in peaks if p is not None), default=0)
    return "".join(" " if p is None else BARS[round(p / top * (len(BARS) - 1)) if top else 0] for p in peaks)
