"""The portal user's own account (``/portal/me``): second factor enrolment, personal tokens, public SSH keys.

Two ways in.  Inside a login, when the tenant requires a second factor and the user has none yet
(``POST /portal/login`` answered 401 ``totp_enrolment_required`` with ``details.challenge``), the user enrols
against that challenge (``/portal/login/enrol``) and the confirmation completes the login: the answer is a
portal session plus the recovery codes, shown once.  Logged in, the user sees and sets up their own second factor
and makes and revokes personal tokens (QVD's ``--token``), and keeps the public SSH keys their desktops get at
boot (``docs/networking.md``, "Guest metadata").  Removing one's own second factor is not offered: a
stolen session must not be able to switch it off; an administrator resets it.

The use cases are ``services/identity.py``, ``services/second_factor.py``, ``services/personal_tokens.py`` and
``services/users.py``;
this module speaks HTTP, and records the user's changes to their account (``user.*``) in the audit chain — the
audit middleware covers ``/api/v1`` only.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response, status
from pydantic import Field

from deckard.api.deps import DbDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.routes.portal import PortalSession, UserDep, client_host, open_session
from deckard.api.strict import RequestModel
from deckard.model.entities import User
from deckard.model.ids import ID_MAX
from deckard.model.schemas import RecoveryCodes, SecondFactorEnrolment, SecondFactorStatus, TokenCreated, UserToken
from deckard.services import identity, personal_tokens, second_factor, users
from deckard.services.audit import append_audit

router = APIRouter(prefix="/portal", tags=["portal"], include_in_schema=False, responses=ERROR_RESPONSES)

TokenId = Annotated[int, Path(ge=1, le=ID_MAX, description="The personal token's id.")]
Challenge = Annotated[str, Field(min_length=1, max_length=128, description="`details.challenge` of the login.")]
Code = Annotated[str, Field(min_length=1, max_length=32, description="The authenticator app's current code.")]


# ---- bodies and answers ---------------------------------------------------------------------------------------


class EnrolStart(RequestModel):
    challenge: Challenge


class EnrolConfirm(RequestModel):
    challenge: Challenge
    code: Code


class ConfirmCode(RequestModel):
    code: Code


class TokenRequest(RequestModel):
    name: str = Field(min_length=1, max_length=64, description="What the token is for, e.g. `laptop`.")
    days: int | None = Field(
        default=None, ge=1, le=3650, description="Lifetime in days (default 30, at most `auth.tokens.max_days`)."
    )


class SshKeys(RequestModel):
    keys: list[Annotated[str, Field(max_length=8192)]] = Field(
        max_length=64, description="Public SSH keys, one `authorized_keys` line each (at most 16); `[]`: none."
    )


class EnrolledSession(PortalSession):
    recovery_codes: list[str] = Field(description="Single-use codes for when the app is lost: shown only now.")


# ---- helpers --------------------------------------------------------------------------------------------------


async def _audit(db: DbDep, request: Request, user: User, action: str, object_id: Any, **arguments: Any) -> None:
    await append_audit(
        db,
        action=action,
        result="ok",
        admin_name=f"user:{user.login}",
        tenant_id=user.tenant_id,
        object_type="user",
        object_id=str(object_id),
        arguments=arguments,
        status=200,
        source=client_host(request),
    )


# ---- enrolment inside a login ---------------------------------------------------------------------------------


@router.post("/login/enrol", response_model=SecondFactorEnrolment, summary="Start the enrolment a login asked for")
async def login_enrol(body: EnrolStart, db: DbDep) -> SecondFactorEnrolment:
    """For a login that answered 401 ``totp_enrolment_required``: a new secret for the challenge's user.
    401 ``challenge_expired``; 409 ``second_factor_enrolled`` when the user already has one."""
    return SecondFactorEnrolment.model_validate(await identity.start_challenge_enrolment(db, body.challenge))


@router.post("/login/enrol/confirm", response_model=EnrolledSession, summary="Confirm it and finish the login")
async def login_enrol_confirm(body: EnrolConfirm, request: Request, db: DbDep) -> EnrolledSession:
    """The app's first code confirms the secret and completes the login: a portal session and the recovery
    codes.  401 ``bad_second_factor`` / ``challenge_expired``; 409 ``no_enrolment``."""
    result, codes = await identity.login_enrolment(db, body.challenge, body.code, source=client_host(request))
    session = await open_session(db, result.user)
    return EnrolledSession(**session.model_dump(), recovery_codes=codes)


# ---- the logged-in user's second factor ----------------------------------------------------------------------


@router.get("/me/second-factor", response_model=SecondFactorStatus, summary="My second factor")
async def my_second_factor(user: UserDep, db: DbDep) -> SecondFactorStatus:
    return SecondFactorStatus.model_validate(await second_factor.status(db, "user", user.id))


@router.post("/me/second-factor/enrol", response_model=SecondFactorEnrolment, summary="Set up an authenticator app")
async def my_second_factor_enrol(user: UserDep, db: DbDep) -> SecondFactorEnrolment:
    """A new, unconfirmed secret (replacing one not confirmed yet); 409 ``second_factor_enrolled``."""
    account, issuer = await identity.totp_account(db, user)
    return SecondFactorEnrolment.model_validate(
        await second_factor.start_enrolment(db, "user", user.id, account, issuer)
    )


@router.post("/me/second-factor/confirm", response_model=RecoveryCodes, summary="Confirm with the app's first code")
async def my_second_factor_confirm(body: ConfirmCode, user: UserDep, db: DbDep, request: Request) -> RecoveryCodes:
    """→ ten recovery codes, shown once.  401 ``bad_second_factor``; 409 ``no_enrolment`` /
    ``second_factor_enrolled``."""
    codes = await second_factor.confirm_enrolment(db, "user", user.id, body.code)
    await _audit(db, request, user, "user.second_factor.enrol", user.id)
    return RecoveryCodes(recovery_codes=codes)


@router.post("/me/second-factor/recovery-codes", response_model=RecoveryCodes, summary="New recovery codes")
async def my_recovery_codes(user: UserDep, db: DbDep, request: Request) -> RecoveryCodes:
    """Ten new codes in place of the old ones; 409 ``no_enrolment`` without a confirmed second factor."""
    codes = await second_factor.regenerate_recovery_codes(db, "user", user.id)
    await _audit(db, request, user, "user.recovery_codes.regenerate", user.id)
    return RecoveryCodes(recovery_codes=codes)


# ---- personal tokens ------------------------------------------------------------------------------------------


@router.get("/me/tokens", response_model=list[UserToken], summary="My personal tokens")
async def my_tokens(user: UserDep, db: DbDep) -> list[UserToken]:
    return [UserToken.model_validate(r) for r in await personal_tokens.list_tokens(db, user.id)]


@router.post("/me/tokens", response_model=TokenCreated, status_code=status.HTTP_201_CREATED, summary="Make a token")
async def my_token_create(body: TokenRequest, user: UserDep, db: DbDep, request: Request) -> TokenCreated:
    """The secret is in this answer only.  422 ``bad_token_name`` / ``bad_token_lifetime``; 409 ``duplicate`` /
    ``too_many_tokens``."""
    token, row = await personal_tokens.create_token(db, user, body.name, body.days)
    await _audit(db, request, user, "user.token.create", user.id, token_id=row["id"], name=row["name"])
    return TokenCreated(token=token, **{k: row[k] for k in ("id", "name", "created_at", "expires_at")})


@router.delete(
    "/me/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response, summary="Revoke it"
)
async def my_token_revoke(token_id: TokenId, user: UserDep, db: DbDep, request: Request) -> Response:
    """404 ``token_not_found`` for an unknown token or another user's."""
    await personal_tokens.revoke_token(db, user.id, token_id)
    await _audit(db, request, user, "user.token.revoke", user.id, token_id=token_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# ---- public SSH keys ------------------------------------------------------------------------------------------


@router.get("/me/ssh-keys", response_model=SshKeys, summary="My public SSH keys")
async def my_ssh_keys(user: UserDep, db: DbDep) -> SshKeys:
    return SshKeys(keys=await users.own_ssh_keys(db, user.id))


@router.put("/me/ssh-keys", response_model=SshKeys, summary="Replace my public SSH keys")
async def my_ssh_keys_set(body: SshKeys, user: UserDep, db: DbDep, request: Request) -> SshKeys:
    """The keys as stored (blank lines and repeats dropped); my desktops get them at their next boot.
    422 ``bad_ssh_key`` naming the key that is not one."""
    keys = await users.set_own_ssh_keys(db, user.id, user.tenant_id, body.keys)
    await _audit(db, request, user, "user.ssh_keys.set", user.id, keys=len(keys))
    return SshKeys(keys=keys)
