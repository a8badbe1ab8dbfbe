"""The audit log (QVD's ``log``/``wat_log``): every administrator action, hash-chained so tampering shows.

Each record carries ``prev_hash`` (the previous record's ``hash``) and ``hash = sha256(prev_hash + canonical
JSON of the record)``.  Changing, inserting or deleting a record in the middle breaks the chain at that record,
and ``verify_chain`` names it.  (Cutting records off the *end* cannot be seen from the chain alone: keep a copy of
the latest hash elsewhere if that matters.)

Appends are serialised so two writers never chain onto the same predecessor: PostgreSQL takes a transaction-level
advisory lock; SQLite's ``BEGIN IMMEDIATE`` (``db/engine.py``) already makes writers take turns.  Within a process
appends are group-committed: each waits for its record's transaction, and one transaction carries every record
that arrived meanwhile (``_GroupCommit``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import weakref
from typing import Any

import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database, prepared
from deckard.model.entities import aware, utcnow
from deckard.services.context import Actor, require
from deckard.services.listing import ListQuery, run_list

GENESIS = "0" * 64
ADVISORY_LOCK = 0x6465636B  # "deck": the audit chain's lock id
SECRET_WORDS = ("password", "passwd", "token", "secret", "key_pem", "private")
MASK = "***"
HASHED = (
    "at",
    "admin_id",
    "admin_name",
    "tenant_id",
    "action",
    "object_type",
    "object_id",
    "arguments",
    "result",
    "status",
    "error_code",
    "source",
)


def mask_secrets(value: Any) -> Any:
    """The arguments with every password/token-like field replaced by ``***`` (at any depth)."""
    if isinstance(value, dict):
        return {
            k: (MASK if any(w in str(k).lower() for w in SECRET_WORDS) and v is not None else mask_secrets(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


def _canonical_time(at: dt.datetime) -> str:
    t_ = aware(at)
    assert t_ is not None
    return t_.astimezone(dt.UTC).isoformat(timespec="microseconds")


def record_hash(prev_hash: str, record: dict[str, Any]) -> str:
    body = {k: record.get(k) for k in HASHED}
    body["at"] = _canonical_time(record["at"])
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


async def append_audit(
    db: Database,
    *,
    action: str,
    result: str,
    admin_id: int | None = None,
    admin_name: str = "",
    tenant_id: int | None = None,
    object_type: str = "",
    object_id: str = "",
    arguments: Any = None,
    status: int = 0,
    error_code: str = "",
    source: str = "",
) -> int:
    """Append one record to the chain; returns its id."""
    args = json.dumps(mask_secrets(arguments if arguments is not None else {}), sort_keys=True, default=str)
    record: dict[str, Any] = {
        "at": utcnow(),
        "admin_id": admin_id,
        "admin_name": admin_name[:64],
        "tenant_id": tenant_id,
        "action": action[:128],
        "object_type": object_type[:32],
        "object_id": object_id[:64],
        "arguments": args,
        "result": result,
        "status": status,
        "error_code": error_code[:64],
        "source": source[:64],
    }
    return await _commits_of(db).append(record)


# built once: every login appends (services/config.py says why)
_LAST_HASH = prepared(sa.select(t.audit_log.c.hash).order_by(t.audit_log.c.id.desc()).limit(1))
_APPEND = sa.insert(t.audit_log).returning(t.audit_log.c.id)


class _GroupCommit:
    """Appends of one farm database, written a batch per transaction (group commit).

    Why: a busy broker audits every login, and one transaction per record serialises them all on the chain's lock
    (and, on SQLite, on the one write lock every other writer needs too).  An append waits until its batch is
    committed, so it is as durable as before; what arrives while a batch is written goes in the next one.  The
    writing runs in a task of its own, so a caller that is cancelled never strands the others' records."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.queue: list[tuple[dict[str, Any], asyncio.Future[int]]] = []
        self.writer: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def append(self, record: dict[str, Any]) -> int:
        loop = asyncio.get_running_loop()
        if loop is not self.loop:  # a Database used from another event loop (tests): start afresh there
            self.loop, self.queue, self.writer = loop, [], None
        done: asyncio.Future[int] = loop.create_future()
        self.queue.append((record, done))
        if self.writer is None or self.writer.done():
            self.writer = asyncio.create_task(self._write_all())
        return await asyncio.shield(done)

    async def _write_all(self) -> None:
        while self.queue:
            batch, self.queue = self.queue, []
            try:
                ids = await self._write([record for record, _done in batch])
            except Exception as e:  # every append of the batch fails with the reason
                for _record, done in batch:
                    if not done.done():
                        done.set_exception(e)
                continue
            for (_record, done), record_id in zip(batch, ids, strict=True):
                if not done.done():
                    done.set_result(record_id)

    async def _write(self, records: list[dict[str, Any]]) -> list[int]:
        ids = []
        async with self.db.write() as conn:
            if self.db.dialect == "postgresql":
                await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(ADVISORY_LOCK)))
            prev = (await conn.execute(_LAST_HASH)).scalar_one_or_none()
            prev_hash = str(prev) if prev else GENESIS
            for record in records:
                record_hash_ = record_hash(prev_hash, record)
                res = await conn.execute(_APPEND, {**record, "prev_hash": prev_hash, "hash": record_hash_})
                ids.append(int(res.scalar_one()))
                prev_hash = record_hash_
        return ids


_group_commits: weakref.WeakKeyDictionary[Database, _GroupCommit] = weakref.WeakKeyDictionary()


def _commits_of(db: Database) -> _GroupCommit:
    group = _group_commits.get(db)
    if group is None:
        group = _group_commits[db] = _GroupCommit(db)
    return group


LIST_COLUMNS: dict[str, sa.ColumnElement[Any]] = {c.key: c for c in t.audit_log.c if c.key not in ("prev_hash",)}


async def list_audit(db: Database, actor: Actor, q: ListQuery) -> tuple[list[dict[str, Any]], int]:
    """Records the actor may see: all of them for the supertenant, their own tenant's otherwise."""
    require(actor, "audit.see")
    log = t.audit_log
    select = sa.select(*(c.label(k) for k, c in LIST_COLUMNS.items()))
    if not actor.all_tenants:
        select = select.where(log.c.tenant_id == actor.tenant_id)
    if not q.sort:
        q = ListQuery(q.filters, [("id", True)], q.page, q.per_page, q.fields)  # newest first
    async with db.connect() as conn:
        rows, total = await run_list(conn, select, q, LIST_COLUMNS, log.c.id)
    for r in rows:
        if isinstance(r.get("arguments"), str):
            try:
                r["arguments"] = json.loads(r["arguments"])
            except ValueError:
                pass  # a tampered record still lists; verify says what is wrong with it
    return rows, total


async def verify_chain(db: Database, actor: Actor | None = None, *, batch: int = 2000) -> dict[str, Any]:
    """Recompute the chain from the first record: ``{ok, checked, first_broken_id, reason}``."""
    if actor is not None:
        require(actor, "audit.verify")
    log = t.audit_log
    prev_hash, checked, last_id = GENESIS, 0, 0
    async with db.connect() as conn:
        while True:
            q = sa.select(log).where(log.c.id > last_id).order_by(log.c.id).limit(batch)
            rows = [dict(r._mapping) for r in await conn.execute(q)]
            if not rows:
                break
            for r in rows:
                if r["prev_hash"] != prev_hash:
                    return {
                        "ok": False,
                        "checked": checked,
                        "first_broken_id": r["id"],
                        "reason": "prev_hash does not match the previous record (a record was removed or inserted)",
                    }
                if record_hash(prev_hash, r) != r["hash"]:
                    return {
                        "ok": False,
                        "checked": checked,
                        "first_broken_id": r["id"],
                        "reason": "the record's content does not match its hash (it was changed)",
                    }
                prev_hash, checked, last_id = r["hash"], checked + 1, r["id"]
    return {"ok": True, "checked": checked, "first_broken_id": None, "reason": ""}
