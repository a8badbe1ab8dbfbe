"""The audit log (``/audit``): list with the usual filters, and verify the hash chain (``/audit/verify``)."""

from __future__ import annotations

from fastapi import APIRouter

from deckard.api.deps import ActorDep, DbDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.resource import ObjectRoutes
from deckard.model.schemas import AuditRecord, AuditVerification
from deckard.services import audit

router = APIRouter(prefix="/audit", tags=["audit"], responses=ERROR_RESPONSES)


record = ObjectRoutes(router, "audit", AuditRecord)
record.add_list(
    lambda s, q: audit.list_audit(s.db, s.actor, q), audit.LIST_COLUMNS, "List audit records (newest first)"
)


@router.get("/verify", response_model=AuditVerification, summary="Check the hash chain; name the first broken record")
async def verify_audit(actor: ActorDep, db: DbDep) -> AuditVerification:
    return AuditVerification.model_validate(await audit.verify_chain(db, actor))
