"""Small helpers to turn query results into plain dicts, to read one row or say it is not there, and to map
integrity errors to Conflict."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from deckard.db.engine import Database
from deckard.model.entities import aware
from deckard.model.errors import Conflict, NotFound


def as_dict(row: sa.Row[Any] | sa.RowMapping) -> dict[str, Any]:
    m = row._mapping if isinstance(row, sa.Row) else row
    return {k: (aware(v) if isinstance(v, dt.datetime) else v) for k, v in m.items()}


@contextmanager
def unique_or_conflict(message: str, code: str = "duplicate") -> Iterator[None]:
    try:
        yield
    except sa.exc.IntegrityError as e:
        raise Conflict(message, code=code) from e


async def one_row(db: Database, query: sa.Select[Any], noun: str, key: object) -> dict[str, Any]:
    """The single row ``query`` finds (already scoped to what the actor may see), or ``<noun>_not_found``."""
    async with db.connect() as conn:
        row = (await conn.execute(query)).first()
    if not row:
        raise NotFound(f"no {noun} with id {key}", code=f"{noun}_not_found")
    return as_dict(row)
