"""The audit log (``/audit``): list with the usual filters, and verify the hash chain (``/audit/verify``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from deckard.api.deps import ActorDep, DbDep, ListPairsDep
from deckard.api.envelope import ERROR_RESPONSES, Page
from deckard.services import audit
from deckard.services.listing import parse_list_query

router = APIRouter(prefix="/audit", tags=["audit"], responses=ERROR_RESPONSES)


class AuditRecord(BaseModel):
    id: int | None = None
    at: dt.datetime | None = None
    admin_id: int | None = None
    admin_name: str | None = None
    tenant_id: int | None = None
    action: str | None = Field(default=None, description="`<object>.<action>`, e.g. `desktop.start`.")
    object_type: str | None = None
    object_id: str | None = None
    arguments: Any = Field(default=None, description="The request's JSON body, secrets masked as `***`.")
    result: str | None = Field(default=None, description="`ok` or `failed`.")
    status: int | None = None
    error_code: str | None = None
    source: str | None = None
    hash: str | None = None


class Verification(BaseModel):
    ok: bool
    checked: int = Field(description="Records found intact before the first broken one (all of them when ok).")
    first_broken_id: int | None
    reason: str


@router.get("", response_model=Page[AuditRecord], summary="List audit records (newest first)")
async def list_audit(actor: ActorDep, db: DbDep, pairs: ListPairsDep) -> Page[AuditRecord]:
    rows, total = await audit.list_audit(db, actor, parse_list_query(pairs, audit.LIST_COLUMNS))
    return Page[AuditRecord](items=[AuditRecord.model_validate(r) for r in rows], total=total)


@router.get("/verify", response_model=Verification, summary="Check the hash chain; name the first broken record")
async def verify_audit(actor: ActorDep, db: DbDep) -> Verification:
    return Verification.model_validate(await audit.verify_chain(db, actor))
