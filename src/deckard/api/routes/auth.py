"""Administrator sessions: log in with a password for a bearer token, log out, ask who the token is."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, Field

from deckard.api.deps import ActorDep, DbDep, SettingsDep, TokenDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.services import admins

router = APIRouter(prefix="/auth", tags=["auth"], responses=ERROR_RESPONSES)


class LoginRequest(BaseModel):
    name: str = Field(min_length=1, max_length=64, description="Administrator name.")
    password: str = Field(min_length=1, max_length=1024)
    tenant: str = Field(default="default", min_length=1, max_length=64)


class LoginResponse(BaseModel):
    token: str = Field(description="Send as 'Authorization: Bearer <token>'.")
    expires_at: dt.datetime


class WhoAmI(BaseModel):
    kind: str
    id: int | None
    name: str
    tenant_id: int | None


@router.post("/login", response_model=LoginResponse, summary="Log in and get a session token")
async def login(body: LoginRequest, db: DbDep, settings: SettingsDep) -> LoginResponse:
    token, expires_at = await admins.login_admin(
        db, body.name, body.password, tenant=body.tenant, hours=settings.api.session_hours
    )
    return LoginResponse(token=token, expires_at=expires_at)


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
    return WhoAmI(kind=actor.kind, id=actor.id, name=actor.name, tenant_id=actor.tenant_id)
