"""Users of desktops (``/users``).  ``{user}`` in a path is the numeric id or the login.

Lists take the query syntax of ``services/listing.py``; block, unblock and delete also exist in bulk
(``POST /users/bulk/{action}``), answering per item.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, Field

from deckard.api.deps import ActorDep, DbDep, SettingsDep
from deckard.api.envelope import ERROR_RESPONSES, Page
from deckard.api.routes.desktops import BulkRequest, BulkResult, bulk_query, list_query
from deckard.api.strict import Ref, RequestModel
from deckard.services import bulk, users
from deckard.services.listing import ListQuery

router = APIRouter(prefix="/users", tags=["users"], responses=ERROR_RESPONSES)


class User(BaseModel):
    id: int
    tenant_id: int | None = None
    login: str | None = None
    blocked: bool | None = None
    description: str | None = None
    created_at: dt.datetime | None = None


class UserCreate(RequestModel):
    login: str = Field(min_length=1, max_length=64)
    password: str | None = Field(
        default=None, max_length=1024, description="Omit for users who only log in through external auth plugins."
    )
    description: str = Field(default="", max_length=4096)
    tenant: Ref | None = Field(
        default=None, description="Tenant name or id (supertenant administrators; default: default)."
    )


class UserUpdate(RequestModel):
    password: str | None = Field(default=None, min_length=4, max_length=1024)
    blocked: bool | None = None
    description: str | None = Field(default=None, max_length=4096)


UserQuery = Annotated[ListQuery, list_query([*users.FIELDS])]


@router.get("", response_model=Page[User], response_model_exclude_unset=True, summary="List users")
async def list_users(actor: ActorDep, db: DbDep, q: UserQuery) -> Page[User]:
    rows, total = await users.list_users(db, actor, q)
    return Page[User](items=[User.model_validate(u) for u in rows], total=total)


@router.post(
    "",
    response_model=User,
    response_model_exclude_unset=True,
    status_code=status.HTTP_201_CREATED,
    summary="Create a user",
)
async def create_user(body: UserCreate, actor: ActorDep, db: DbDep) -> User:
    row = await users.create_user(
        db, actor, body.login, body.password, tenant=body.tenant, description=body.description
    )
    return User.model_validate(row)


@router.post("/bulk/{action}", response_model=BulkResult, summary="Block, unblock or delete many users")
async def bulk_action(
    action: Literal["block", "unblock", "delete"], body: BulkRequest, actor: ActorDep, db: DbDep, settings: SettingsDep
) -> BulkResult:
    q = bulk_query(body, [*users.FIELDS])
    out = await bulk.bulk_users(db, actor, action, paths=settings.paths, ids=body.ids, q=q)
    return BulkResult.model_validate(out)


@router.get("/{user}", response_model=User, response_model_exclude_unset=True, summary="Show a user")
async def get_user(user: str, actor: ActorDep, db: DbDep) -> User:
    user_id = await users.find_user_id(db, actor, user)
    return User.model_validate(await users.get_user(db, actor, user_id))


@router.patch(
    "/{user}",
    response_model=User,
    response_model_exclude_unset=True,
    summary="Change a user's password, blocked flag or description",
)
async def update_user(user: str, body: UserUpdate, actor: ActorDep, db: DbDep) -> User:
    user_id = await users.find_user_id(db, actor, user)
    row = await users.update_user(
        db, actor, user_id, password=body.password, blocked=body.blocked, description=body.description
    )
    return User.model_validate(row)


@router.post("/{user}/block", response_model=User, response_model_exclude_unset=True, summary="Block a user")
async def block_user(user: str, actor: ActorDep, db: DbDep) -> User:
    user_id = await users.find_user_id(db, actor, user)
    return User.model_validate(await users.update_user(db, actor, user_id, blocked=True))


@router.post("/{user}/unblock", response_model=User, response_model_exclude_unset=True, summary="Unblock a user")
async def unblock_user(user: str, actor: ActorDep, db: DbDep) -> User:
    user_id = await users.find_user_id(db, actor, user)
    return User.model_validate(await users.update_user(db, actor, user_id, blocked=False))


@router.delete(
    "/{user}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a user (refused while the user has desktops); their home is archived or deleted",
)
async def delete_user(user: str, actor: ActorDep, db: DbDep, settings: SettingsDep) -> Response:
    user_id = await users.find_user_id(db, actor, user)
    await users.delete_user(db, actor, user_id, settings.paths)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
