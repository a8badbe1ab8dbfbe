"""Administrator sessions: log in with a password (and a second factor) for a bearer token, log out, ask who the
token is, and set up one's own second factor.

Repeated failed logins from one address make it wait: 429 ``login_locked`` with ``Retry-After`` and
``details.retry_after_s`` (``services/admins.py`` has the rules); every attempt is audited by
``api/audit_log.py`` like any other non-GET request — the login puts on ``request.state`` who checked the
password (``login_plugin``: local or ldap) and which factor was used, for that record.

An administrator with a second factor either sends its code with the login (``code``) or answers the 401
``totp_required`` with ``POST /auth/login/second-factor {challenge, code}``.  Enrolling is the administrator's
own act (``/auth/second-factor``); removing a lost one is another administrator's
(``DELETE /admins/{admin_id}/second-factor``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import Field

from deckard.api.deps import ActorDep, DbDep, SettingsDep, TokenDep
from deckard.api.envelope import ERROR_RESPONSES, ErrorEnvelope
from deckard.api.errors import error_response
from deckard.api.strict import RequestModel
from deckard.model.schemas import LoginResult, RecoveryCodes, SecondFactorEnrolment, SecondFactorStatus, WhoAmI
from deckard.services import admins, lockout

router = APIRouter(prefix="/auth", tags=["auth"], responses=ERROR_RESPONSES)

CODE_DESCRIPTION = "The authenticator app's current code, or one of the recovery codes."


class LoginRequest(RequestModel):
    name: str = Field(min_length=1, max_length=64, description="Administrator name.")
    password: str = Field(min_length=1, max_length=1024)
    tenant: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="The administrator's tenant; omitted: the supertenant's administrators, then `default`'s.",
    )
    code: str | None = Field(
        default=None,
        min_length=1,
        max_length=32,
        description=f"{CODE_DESCRIPTION} Without it, an administrator with a second factor gets 401 "
        "`totp_required` with `details.challenge` for `POST /auth/login/second-factor`.",
    )


class SecondStep(RequestModel):
    challenge: str = Field(min_length=1, max_length=128, description="`details.challenge` of the `totp_required`.")
    code: str = Field(min_length=1, max_length=32, description=CODE_DESCRIPTION)


class ConfirmCode(RequestModel):
    code: str = Field(min_length=1, max_length=32, description="The authenticator app's current code.")


LOCKED: dict[int | str, dict[str, Any]] = {
    429: {
        "model": ErrorEnvelope,
        "description": "Too many failed logins from this address (`login_locked`): wait `Retry-After` seconds.",
    }
}


async def _session(
    request: Request, attempt: admins.LoginAttempt, login: Awaitable[tuple[str, dt.datetime]]
) -> LoginResult | JSONResponse:
    try:
        token, expires_at = await login
    except lockout.LoginLocked as e:
        retry = str(e.details.get("retry_after_s", 1))
        return error_response(e.status, e.code, e.message, e.details, {"Retry-After": retry})
    finally:  # for the audit record (api/audit_log.py), whatever the outcome
        request.state.login_name = attempt.name
        request.state.login_plugin = attempt.plugin
        request.state.login_factor = attempt.factor
    return LoginResult(token=token, expires_at=expires_at)


def _source(request: Request) -> str:
    return request.client.host if request.client else ""


@router.post("/login", response_model=LoginResult, summary="Log in and get a session token", responses=LOCKED)
async def login(body: LoginRequest, request: Request, db: DbDep, settings: SettingsDep) -> LoginResult | JSONResponse:
    """401 ``bad_credentials`` whatever was wrong; 401 ``totp_required`` (``details.challenge``) when a second
    factor is due; 403 ``no_admin_role`` for a directory account in no group of ``auth.ldap.admin_groups``; 503
    ``auth_unavailable`` when the directory does not answer."""
    attempt = admins.LoginAttempt()
    hours = settings.api.session_hours
    return await _session(
        request,
        attempt,
        admins.login_admin(
            db, body.name, body.password, body.tenant, hours, source=_source(request), code=body.code, attempt=attempt
        ),
    )


@router.post(
    "/login/second-factor",
    response_model=LoginResult,
    summary="The second step of a login: the authenticator app's code",
    responses=LOCKED,
)
async def login_second_factor(
    body: SecondStep, request: Request, db: DbDep, settings: SettingsDep
) -> LoginResult | JSONResponse:
    """401 ``bad_second_factor``, ``second_factor_replayed`` (a code already used) or ``challenge_expired``
    (5 minutes, or the login finished already)."""
    attempt = admins.LoginAttempt()
    hours = settings.api.session_hours
    return await _session(
        request,
        attempt,
        admins.login_admin_challenge(db, body.challenge, body.code, hours, source=_source(request), attempt=attempt),
    )


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


@router.get("/second-factor", response_model=SecondFactorStatus, summary="Your second factor")
async def my_second_factor(actor: ActorDep, db: DbDep) -> SecondFactorStatus:
    return SecondFactorStatus.model_validate(await admins.own_second_factor(db, actor))


@router.post(
    "/second-factor/enrol", response_model=SecondFactorEnrolment, summary="Set up an authenticator app for yourself"
)
async def my_second_factor_enrol(actor: ActorDep, db: DbDep) -> SecondFactorEnrolment:
    """A new, unconfirmed secret (replacing one not confirmed yet); 409 ``second_factor_enrolled``."""
    return SecondFactorEnrolment.model_validate(await admins.start_own_enrolment(db, actor))


@router.post("/second-factor/confirm", response_model=RecoveryCodes, summary="Confirm it with the app's first code")
async def my_second_factor_confirm(body: ConfirmCode, actor: ActorDep, db: DbDep) -> RecoveryCodes:
    """→ ten recovery codes, shown once; every later login asks for a code.  401 ``bad_second_factor``; 409
    ``no_enrolment`` / ``second_factor_enrolled``."""
    return RecoveryCodes(recovery_codes=await admins.confirm_own_enrolment(db, actor, body.code))
