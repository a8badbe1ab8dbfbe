"""Small helpers to turn query results into plain dicts and to map integrity errors to Conflict."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from deckard.model.entities import aware
from deckard.model.errors import Conflict


def as_dict(row: sa.Row[Any] | sa.RowMapping) -> dict[str, Any]:
    m = row._mapping if isinstance(row, sa.Row) else row
    return {k: (aware(v) if isinstance(v, dt.datetime) else v) for k, v in m.items()}


@contextmanager
def unique_or_conflict(message: str, code: str = "duplicate") -> Iterator[None]:
    try:
        yield
    except sa.exc.IntegrityError as e:
        raise Conflict(message, code=code) from e
