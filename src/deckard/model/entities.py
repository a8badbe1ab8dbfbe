"""Domain entities as plain frozen records, built from database rows by field name (extra columns ignored)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any, Self


class _FromRow:
    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in row.items() if k in names})


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def aware(t: dt.datetime | None) -> dt.datetime | None:
    """SQLite returns naive datetimes; every time Deckard stores is UTC."""
    if t is not None and t.tzinfo is None:
        return t.replace(tzinfo=dt.UTC)
    return t


@dataclasses.dataclass(frozen=True)
class User(_FromRow):
    id: int
    tenant_id: int
    login: str
    blocked: bool
    password_hash: str | None = None


@dataclasses.dataclass(frozen=True)
class Osf(_FromRow):
    id: int
    tenant_id: int
    name: str
    memory_mib: int
    cpus: float
    keep_overlay: bool
    driver: str


@dataclasses.dataclass(frozen=True)
class Desktop(_FromRow):
    id: int
    tenant_id: int
    name: str
    user_id: int
    osf_id: int
    tag: str
    ip: str
    mac: str
    blocked: bool
    state: str
    cmd: str | None
    node_id: int | None
    user_state: str
    image_id: int | None = None
    agent_token: str | None = None
    failure_reason: str | None = None
    session_id: str | None = None
    start_guest_ms: float | None = None  # its last start's figures, kept while it rests; None: it has never run
    start_agent_ms: float | None = None
    network_id: int | None = None
    guest: str | None = None  # the warm guest it took over at its start (``model/warm_pool.py``); None: its own
    display_at: dt.datetime | None = None  # starting: its guest's display came up at boot (the agent may not yet)


@dataclasses.dataclass(frozen=True)
class Node(_FromRow):
    id: int
    name: str
    address: str
    state: str
    blocked: bool
    heartbeat_at: dt.datetime | None = None


FIRST_UID = 10000


def uid_for_user(user_id: int) -> int:
    """The Unix uid of a user inside every desktop: fixed, so files in the persistent home keep their owner."""
    return FIRST_UID + user_id
