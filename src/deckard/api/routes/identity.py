"""Administrators' view of identity: login bans, users' second factors and personal tokens, their own tokens.

* ``/auth/bans``: the login counters that make someone wait now (``services/lockout.py``); clearing one lets the
  account or address log in at once.  A ban's key holds ``/`` (``account:default/alice``), so the route takes
  the rest of the path.
* ``/users/{user_id}/second-factor`` and ``/users/{user_id}/tokens``: a user's second factor and personal tokens
  (``services/account_admin.py``, ``services/personal_tokens.py``).
* ``/auth/tokens``: the acting administrator's own named, expiring API tokens; the secret is in the answer to
  the POST only.

Every non-GET call here is audited by ``api/audit_log.py``, like any other.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response, status
from pydantic import Field

from deckard.api.deps import ActorDep, DbDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.strict import RequestModel
from deckard.model.ids import ID_MAX
from deckard.model.schemas import AdminToken, LoginBan, Page, TokenCreated, UserSecondFactor, UserToken
from deckard.services import account_admin, lockout, personal_tokens

router = APIRouter(tags=["identity"], responses=ERROR_RESPONSES)

UserId = Annotated[int, Path(ge=1, le=ID_MAX, description="The user's id.")]
TokenId = Annotated[int, Path(ge=1, le=ID_MAX, description="The token's id.")]
BanKey = Annotated[
    str, Path(min_length=1, max_length=lockout.KEY_LEN, description="The ban's key, as `GET /auth/bans` lists it.")
]
NO_CONTENT: dict[str, Any] = {"status_code": status.HTTP_204_NO_CONTENT, "response_class": Response}


class TokenCreate(RequestModel):
    name: str = Field(min_length=1, max_length=64, description="Letters, digits, spaces, `.`, `_` or `-`.")
    days: int = Field(default=30, ge=1, le=account_admin.MAX_DAYS, description="The token expires after this.")


# ---- login bans ---------------------------------------------------------------------------------------------


@router.get("/auth/bans", response_model=Page[LoginBan], summary="Accounts and addresses that must wait to log in")
async def list_bans(actor: ActorDep, db: DbDep) -> Page[LoginBan]:
    rows = await lockout.list_bans(db, actor)
    return Page[LoginBan](items=[LoginBan.model_validate(r) for r in rows], total=len(rows))


@router.delete("/auth/bans/{key:path}", summary="Clear a ban: the account or address may log in at once", **NO_CONTENT)
async def clear_ban(key: BanKey, actor: ActorDep, db: DbDep) -> Response:
    await lockout.clear_ban(db, actor, key)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# ---- a user's second factor and personal tokens -------------------------------------------------------------


@router.get("/users/{user_id}/second-factor", response_model=UserSecondFactor, summary="A user's second factor")
async def second_factor_status(user_id: UserId, actor: ActorDep, db: DbDep) -> UserSecondFactor:
    return UserSecondFactor.model_validate(await account_admin.second_factor_status(db, actor, user_id))


@router.delete(
    "/users/{user_id}/second-factor",
    summary="Reset a user's second factor (its secret and recovery codes are deleted)",
    **NO_CONTENT,
)
async def reset_second_factor(user_id: UserId, actor: ActorDep, db: DbDep) -> Response:
    await account_admin.reset_second_factor(db, actor, user_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/users/{user_id}/tokens", response_model=Page[UserToken], summary="A user's personal tokens")
async def list_user_tokens(user_id: UserId, actor: ActorDep, db: DbDep) -> Page[UserToken]:
    rows = await personal_tokens.admin_list_tokens(db, actor, user_id)
    return Page[UserToken](items=[UserToken.model_validate(r) for r in rows], total=len(rows))


@router.delete("/users/{user_id}/tokens/{token_id}", summary="Revoke a user's personal token", **NO_CONTENT)
async def revoke_user_token(user_id: UserId, token_id: TokenId, actor: ActorDep, db: DbDep) -> Response:
    await personal_tokens.admin_revoke_token(db, actor, user_id, token_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# ---- the administrator's own API tokens ---------------------------------------------------------------------


@router.get("/auth/tokens", response_model=Page[AdminToken], summary="Your API tokens")
async def list_own_tokens(actor: ActorDep, db: DbDep) -> Page[AdminToken]:
    rows = await account_admin.list_own_tokens(db, actor)
    return Page[AdminToken](items=[AdminToken.model_validate(r) for r in rows], total=len(rows))


@router.post(
    "/auth/tokens",
    response_model=TokenCreated,
    status_code=status.HTTP_201_CREATED,
    summary="Make an API token for yourself (its secret is shown this once)",
)
async def create_own_token(body: TokenCreate, actor: ActorDep, db: DbDep) -> TokenCreated:
    token, row = await account_admin.create_own_token(db, actor, body.name, body.days)
    return TokenCreated.model_validate({**row, "token": token})


@router.delete("/auth/tokens/{token_id}", summary="Revoke one of your API tokens", **NO_CONTENT)
async def revoke_own_token(token_id: TokenId, actor: ActorDep, db: DbDep) -> Response:
    await account_admin.revoke_own_token(db, actor, token_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
