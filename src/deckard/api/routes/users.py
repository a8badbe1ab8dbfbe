"""Users of desktops (``/users``).  ``{user}`` in a path is the numeric id or the login."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, Field

from deckard.api.deps import ActorDep, DbDep
from deckard.api.envelope import ERROR_RESPONSES, Page, page
from deckard.services import users

router = APIRouter(prefix="/users", tags=["users"], responses=ERROR_RESPONSES)


class User(BaseModel):
    id: int
    tenant_id: int
    login: str
    blocked: bool
    description: str
    created_at: dt.datetime


class UserCreate(BaseModel):
    login: str = Field(min_length=1, max_length=64)
    password: str | None = Field(
        default=None, max_length=1024, description="Omit for users who only log in through external auth plugins."
    )
    description: str = Field(default="", max_length=4096)


class UserUpdate(BaseModel):
    password: str | None = Field(default=None, min_length=4, max_length=1024)
    blocked: bool | None = None
    description: str | None = Field(default=None, max_length=4096)


@router.get("", response_model=Page[User], summary="List users")
async def list_users(actor: ActorDep, db: DbDep) -> Page[User]:
    return page([User.model_validate(u) for u in await users.list_users(db, actor)])


@router.post("", response_model=User, status_code=status.HTTP_201_CREATED, summary="Create a user")
async def create_user(body: UserCreate, actor: ActorDep, db: DbDep) -> User:
    row = await users.create_user(db, actor, body.login, body.password, description=body.description)
    return User.model_validate(row)


@router.get("/{user}", response_model=User, summary="Show a user")
async def get_user(user: str, actor: ActorDep, db: DbDep) -> User:
    user_id = await users.find_user_id(db, actor, user)
    return User.model_validate(await users.get_user(db, actor, user_id))


@router.patch("/{user}", response_model=User, summary="Change a user's password, blocked flag or description")
async def update_user(user: str, body: UserUpdate, actor: ActorDep, db: DbDep) -> User:
    user_id = await users.find_user_id(db, actor, user)
    row = await users.update_user(
        db, actor, user_id, password=body.password, blocked=body.blocked, description=body.description
    )
    return User.model_validate(row)


@router.delete(
    "/{user}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a user (refused while the user has desktops)",
)
async def delete_user(user: str, actor: ActorDep, db: DbDep) -> Response:
    user_id = await users.find_user_id(db, actor, user)
    await users.delete_user(db, actor, user_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
