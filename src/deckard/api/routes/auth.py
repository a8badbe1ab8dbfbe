"""Administrator sessions: log in with a password for a bearer token, log out, ask who the token is.

Repeated failed logins from one address make it wait: 429 ``login_locked`` with ``Retry-After`` and
``details.retry_after_s`` (``services/admins.py`` has the rules); every attempt is audited by
``api/audit_log.py`` like any other non-GET request.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import Field

from deckard.api.deps import ActorDep, DbDep, SettingsDep, TokenDep
from deckard.api.envelope import ERROR_RESPONSES, ErrorEnvelope
from deckard.api.errors import error_response
from deckard.api.strict import RequestModel
from deckard.model.schemas import LoginResult, WhoAmI
from deckard.services import admins, lockout

router = APIRouter(prefix="/auth", tags=["auth"], responses=ERROR_RESPONSES)


class LoginRequest(RequestModel):
    name: str = Field(min_length=1, max_length=64, description="Administrator name.")
    password: str = Field(min_length=1, max_length=1024)
    tenant: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="The administrator's tenant; omitted: the supertenant's administrators, then `default`'s.",
    )


@router.post(
    "/login",
    response_model=LoginResult,
    summary="Log in and get a session token",
    responses={
        429: {
            "model": ErrorEnvelope,
            "description": "Too many failed logins from this address (`login_locked`): wait `Retry-After` seconds.",
        }
    },
)
async def login(body: LoginRequest, request: Request, db: DbDep, settings: SettingsDep) -> LoginResult | JSONResponse:
    source = request.client.host if request.client else ""
    try:
        token, expires_at = await admins.login_admin(
            db, body.name, body.password, tenant=body.tenant, hours=settings.api.session_hours, source=source
        )
    except lockout.LoginLocked as e:
        retry = str(e.details.get("retry_after_s", 1))
        return error_response(e.status, e.code, e.message, e.details, {"Retry-After": retry})
    return LoginResult(token=token, expires_at=expires_at)


@router.post(
    "/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Revoke the token of this request",
)
async def logout(_actor: ActorDep, token: TokenDep, db: DbDep) -> Response:
    await admins.revoke_token(db, token)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/whoami", response_model=WhoAmI, summary="The administrator this token stands for")
async def whoami(actor: ActorDep) -> WhoAmI:
    return WhoAmI(kind=actor.kind, id=actor.id, name=actor.name, tenant_id=actor.tenant_id, acls=sorted(actor.acls))
