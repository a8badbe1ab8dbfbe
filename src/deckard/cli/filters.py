"""The list and bulk options every admin noun shares: ``--filter KEY=VALUE`` (repeatable, the API's list syntax:
``osf=web``, ``name__contains=web``, ``state__in=running,starting``, ``memory_mib__gte=512``), ``--sort``,
``--page``/``--per-page``, ``--fields``; and the per-item report of a bulk action.

An action verb takes several names/ids **or** ``--filter``; either way it goes through the bulk endpoint, so
one command acts on a thousand desktops in one request and says what happened to each.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from deckard.cli.output import print_json, print_rows
from deckard.cli.session import ERROR_EXIT

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


def fetch_list(api: Any, resource: str, params: list[tuple[str, str]]) -> dict[str, Any]:
    """One page when the caller asked for one (``--page``/``--per-page``), otherwise every row."""
    if any(k in ("page", "per_page") for k, _ in params):
        page: dict[str, Any] = api.list_page(resource, params)
        return page
    rows: list[dict[str, Any]] = api.list_all("/" + resource, params)
    return {"items": rows, "total": len(rows)}


def print_page(page: dict[str, Any], columns: tuple[str, ...], fields: str | None, *, as_json: bool) -> None:
    """A list page: JSON rows (as before paging existed), or a table and a "N of TOTAL" line."""
    rows: list[dict[str, Any]] = page["items"]
    if as_json:
        print_json(rows)
        return
    shown = tuple(f.strip() for f in fields.split(",") if f.strip()) if fields else columns
    print_rows(rows, shown, as_json=False)
    if page.get("total", len(rows)) > len(rows):
        typer.echo(f"{len(rows)} of {page['total']} shown (use --page/--per-page)")


def run_bulk(
    api: Any,
    resource: str,
    action: str,
    refs: list[str] | None,
    filters: list[str] | None,
    find_id: Any,
    *,
    as_json: bool,
) -> None:
    """Act on ``refs`` (names or ids, resolved with ``find_id``) or on ``--filter``; print each item's result."""
    if bool(refs) == bool(filters):
        raise typer.BadParameter("name one or more objects, or give --filter (not both)")
    if filters:
        out = api.bulk(resource, action, filter=parse_filters(filters))
    else:
        ids = [int(r) if str(r).isdigit() else int(find_id(r)) for r in refs or []]
        out = api.bulk(resource, action, ids=ids)
    if as_json:
        print_json(out)
    else:
        for obj_id in out["ok"]:
            typer.echo(f"{resource[:-1]} {obj_id}: {action} ok")
        for obj_id, err in out["failed"].items():
            typer.echo(f"{resource[:-1]} {obj_id}: failed [{err['code']}] {err['message']}", err=True)
        typer.echo(f"{len(out['ok'])} ok, {len(out['failed'])} failed")
    if out["failed"]:
        raise typer.Exit(ERROR_EXIT)
