"""The list and bulk options every admin noun shares: ``--filter KEY=VALUE`` (repeatable, the API's list syntax:
``osf=web``, ``name__contains=web``, ``state__in=running,starting``, ``memory_mib__gte=512``), ``--sort``,
``--page``/``--per-page``, ``--fields``; and the per-item report of a bulk action.

An action verb takes several names/ids **or** ``--filter``; either way it goes through the bulk endpoint, so
one command acts on a thousand desktops in one request and says what happened to each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Protocol, TypeVar

import typer

from deckard.cli.output import Shown, print_json, print_rows
from deckard.cli.session import ERROR_EXIT
from deckard.client.api import ApiClient
from deckard.model.schemas import BulkResult, Page, Schema

M = TypeVar("M", bound=Schema)

FilterOpt = Annotated[
    list[str] | None,
    typer.Option("--filter", "-f", metavar="KEY=VALUE", help="KEY[__op]=VALUE, e.g. osf=web (repeatable)."),
]
SortOpt = Annotated[str | None, typer.Option("--sort", help="Fields, comma-separated; '-' first for descending.")]
PageOpt = Annotated[int | None, typer.Option("--page", min=1, help="Page number (from 1).")]
PerPageOpt = Annotated[int | None, typer.Option("--per-page", min=1, max=1000, help="Rows per page.")]
FieldsOpt = Annotated[str | None, typer.Option("--fields", help="Only these fields, comma-separated.")]


def parse_filters(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r}: use KEY=VALUE (e.g. osf=web)", param_hint="--filter")
        out[key.strip()] = value
    return out


def list_params(
    filters: list[str] | None,
    sort: str | None = None,
    page: int | None = None,
    per_page: int | None = None,
    fields: str | None = None,
) -> list[tuple[str, str]]:
    """Query pairs for ``GET /<resource>`` in the API's list syntax."""
    pairs = list(parse_filters(filters).items())
    for key, value in (("sort", sort), ("page", page), ("per_page", per_page), ("fields", fields)):
        if value is not None:
            pairs.append((key, str(value)))
    return pairs


def fetch_list(api: ApiClient, resource: str, schema: type[M], params: list[tuple[str, str]]) -> Page[M]:
    """One page when the caller asked for one (``--page``/``--per-page``), otherwise every row."""
    if any(k in ("page", "per_page") for k, _ in params):
        return api.list_page(resource, schema, params)
    rows = api.list_all(resource, schema, params)
    return Page[schema](items=rows, total=len(rows))  # type: ignore[valid-type]


def print_page(
    page: Page[M],
    columns: Sequence[str],
    fields: str | None,
    *,
    as_json: bool,
    table_row: Callable[[M], Shown] | None = None,
) -> None:
    """A list page: JSON rows (as before paging existed), or a table and a "N of TOTAL" line; ``table_row`` makes
    the table's row of an item (columns a noun derives for people, such as a duration)."""
    if as_json:
        print_json(page.items)
        return
    shown = tuple(f.strip() for f in fields.split(",") if f.strip()) if fields else columns
    print_rows([table_row(r) for r in page.items] if table_row else page.items, shown, as_json=False)
    if page.total > len(page.items):
        typer.echo(f"{len(page.items)} of {page.total} shown (use --page/--per-page)")


class Identified(Protocol):
    @property
    def id(self) -> int | None: ...


def find_id(ref: str, find: Callable[[str], Identified]) -> int:
    found = int(ref) if ref.isdigit() else find(ref).id
    if found is None:  # an answer without its id: only a `fields=` list leaves it out
        raise typer.BadParameter(f"{ref!r} has no id")
    return found


def run_bulk(
    api: ApiClient,
    resource: str,
    action: str,
    refs: list[str] | None,
    filters: list[str] | None,
    find: Callable[[str], Identified],
) -> BulkResult:
    """Act on ``refs`` (names or ids; a name is looked up with ``find``) or on ``--filter``, in one request."""
    if bool(refs) == bool(filters):
        raise typer.BadParameter("name one or more objects, or give --filter (not both)")
    if filters:
        return api.bulk(resource, action, filter=parse_filters(filters))
    return api.bulk(resource, action, ids=[find_id(r, find) for r in refs or []])


def report_bulk(
    out: BulkResult, resource: str, action: str, *, as_json: bool, objects: Sequence[Schema] | None = None
) -> None:
    """Each item's result (a failed one on stderr); exit 1 when any failed.  ``objects``: the objects as they
    ended when the command waited for them (``--wait``), printed with the result under ``--json``."""
    if as_json:
        print_json(out if objects is None else {**out.dump(), resource: objects})
    else:
        for obj_id in out.ok:
            typer.echo(f"{resource[:-1]} {obj_id}: {action} ok")
        for failed_id, err in out.failed.items():
            typer.echo(f"{resource[:-1]} {failed_id}: failed [{err['code']}] {err['message']}", err=True)
        typer.echo(f"{len(out.ok)} ok, {len(out.failed)} failed")
    if out.failed:
        raise typer.Exit(ERROR_EXIT)
