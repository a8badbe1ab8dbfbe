"""Lists the way a careful REST API serves them: filter on any listed field, sort, page with a total, pick fields.

Query syntax (the same for every list route and for the CLI's ``--filter``)::

    name=web1            equality              state__in=running,starting   one of
    memory_mib__gte=512  lt, le (lte), gt, ge (gte), ne
    name__contains=web   substring (case-insensitive)
    node__null=true      is (not) NULL
    sort=-created_at,name   page=2   per_page=50   fields=id,name,state

Values are coerced to the column's type, so the same query gives the same answer on PostgreSQL and SQLite;
the primary key is always the last sort key, so pages are stable.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.model.errors import BadInput
from deckard.model.ids import INT32_MAX, INT32_MIN, INT64_MAX, INT64_MIN, parse_int
from deckard.services.rows import as_dict

MAX_PER_PAGE = 1000
DEFAULT_PER_PAGE = 50
RESERVED = {"sort", "page", "per_page", "fields", "cursor"}
OPS = {"eq", "ne", "lt", "le", "lte", "gt", "ge", "gte", "contains", "in", "null"}


@dataclass(frozen=True)
class Filter:
    field: str
    op: str
    value: str


@dataclass(frozen=True)
class ListQuery:
    filters: list[Filter] = field(default_factory=list)
    sort: list[tuple[str, bool]] = field(default_factory=list)  # (field, descending)
    page: int = 1
    per_page: int = DEFAULT_PER_PAGE
    fields: list[str] | None = None

    @property
    def named_fields(self) -> set[str]:
        """Every field the query filters or sorts on (for ACL checks)."""
        return {f.field for f in self.filters} | {s for s, _ in self.sort}


def _int(name: str, raw: str, lo: int, hi: int) -> int:
    try:
        return parse_int(raw, name, lo, hi)
    except BadInput as e:
        raise BadInput(e.message, code="bad_query", details=e.details) from None


def parse_list_query(params: Iterable[tuple[str, str]], allowed: Iterable[str]) -> ListQuery:
    """Parse query pairs; unknown fields or operators are a 422 that lists what is allowed."""
    allowed_set = set(allowed)
    filters: list[Filter] = []
    sort: list[tuple[str, bool]] = []
    page, per_page, fields = 1, DEFAULT_PER_PAGE, None
    for key, value in params:
        if key == "sort":
            for part in filter(None, (p.strip() for p in value.split(","))):
                desc = part.startswith("-")
                name = part.lstrip("-+")
                if name not in allowed_set:
                    raise BadInput(
                        f"cannot sort on {name!r}; sortable: {', '.join(sorted(allowed_set))}", code="bad_sort"
                    )
                sort.append((name, desc))
        elif key == "page":
            page = _int("page", value, 1, 10**9)
        elif key == "per_page":
            per_page = _int("per_page", value, 1, MAX_PER_PAGE)
        elif key == "fields":
            fields = [f.strip() for f in value.split(",") if f.strip()]
            unknown = sorted(set(fields) - allowed_set)
            if unknown:
                raise BadInput(f"unknown fields {', '.join(unknown)}", code="bad_fields")
        elif key in RESERVED:
            continue
        else:
            name, _, op = key.partition("__")
            op = op or "eq"
            if name not in allowed_set:
                raise BadInput(
                    f"cannot filter on {name!r}; filterable: {', '.join(sorted(allowed_set))}", code="bad_filter"
                )
            if op not in OPS:
                raise BadInput(
                    f"unknown filter operator {op!r}; use one of {', '.join(sorted(OPS))}", code="bad_filter"
                )
            filters.append(Filter(name, op, value))
    return ListQuery(filters, sort, page, per_page, fields)


def _coerce(column: sa.ColumnElement[Any], name: str, raw: str) -> Any:
    """``raw`` as the column's type; errors name the filter's field (``name``), never a column or bind name."""
    try:
        kind = column.type.python_type
    except NotImplementedError:
        return raw
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            # ASCII digits within the column's type: PostgreSQL refuses to bind a larger value to an INTEGER
            big = isinstance(column.type, sa.BigInteger)
            return parse_int(raw, name, *((INT64_MIN, INT64_MAX) if big else (INT32_MIN, INT32_MAX)))
        if kind is float:
            if not _DECIMAL.fullmatch(raw) or not math.isfinite(value := float(raw)):
                raise ValueError(raw)
            return value
        if kind is dt.datetime:
            if not raw.isascii():
                raise ValueError(raw)
            t = dt.datetime.fromisoformat(raw)
            return t if t.tzinfo else t.replace(tzinfo=dt.UTC)
    except (ValueError, BadInput):
        raise BadInput(
            f"{raw[:40]!r} is not a valid {_KIND_NAMES.get(kind, kind.__name__)} for {name}",
            code="bad_filter",
            details={"field": name},
        ) from None
    return raw


_KIND_NAMES = {
    int: "whole number (ASCII digits, within the field's range)",
    float: "number",
    dt.datetime: "ISO 8601 time",
}
_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_BOOL = sa.Boolean()


def _condition(column: sa.ColumnElement[Any], f: Filter) -> sa.ColumnElement[bool]:
    if f.op == "null":
        is_null = _coerce(sa.literal(True, _BOOL), f"{f.field}__null", f.value)
        return column.is_(None) if is_null else column.is_not(None)
    if f.op == "in":
        return column.in_([_coerce(column, f.field, v) for v in f.value.split(",") if v != ""])
    if f.op == "contains":
        escaped = f.value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return sa.cast(column, sa.String).ilike(f"%{escaped}%", escape="\\")
    v = _coerce(column, f.field, f.value)
    ops = {
        "eq": column.__eq__,
        "ne": column.__ne__,
        "lt": column.__lt__,
        "le": column.__le__,
        "lte": column.__le__,
        "gt": column.__gt__,
        "ge": column.__ge__,
        "gte": column.__ge__,
    }
    return ops[f.op](v)


def apply_query(
    select: sa.Select[Any], q: ListQuery, columns: Mapping[str, sa.ColumnElement[Any]], key: sa.ColumnElement[Any]
) -> tuple[sa.Select[Any], sa.Select[Any]]:
    """(page select, count select) for a base select whose output columns are named by ``columns``."""
    for f in q.filters:
        select = select.where(_condition(columns[f.field], f))
    count = sa.select(sa.func.count()).select_from(select.order_by(None).subquery())
    order = [columns[name].desc() if desc else columns[name].asc() for name, desc in q.sort]
    page = select.order_by(*order, key).limit(q.per_page).offset((q.page - 1) * q.per_page)
    return page, count


async def run_list(
    conn: AsyncConnection,
    select: sa.Select[Any],
    q: ListQuery,
    columns: Mapping[str, sa.ColumnElement[Any]],
    key: sa.ColumnElement[Any],
) -> tuple[list[dict[str, Any]], int]:
    page, count = apply_query(select, q, columns, key)
    total = int((await conn.execute(count)).scalar_one())
    rows = [as_dict(r) for r in await conn.execute(page)]
    if q.fields:
        keep = set(q.fields)
        rows = [{k: v for k, v in r.items() if k in keep} for r in rows]
    return rows, total
