"""Users of desktops (``/users``).  ``{user}`` in a path is the numeric id or the login.

Lists take the query syntax of ``services/listing.py``; block, unblock and delete also exist in bulk
(``POST /users/bulk/{action}``), answering per item.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter
from pydantic import Field

from deckard.api.deps import ActorDep, DbDep, Scope, SettingsDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.resource import ObjectRoutes
from deckard.api.routes.desktops import BulkRequest, bulk_query
from deckard.api.strict import Ref, RequestModel
from deckard.model.schemas import BulkResult, User
from deckard.services import bulk, users

router = APIRouter(prefix="/users", tags=["users"], responses=ERROR_RESPONSES)


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
    allowed_networks: str | None = Field(
        default=None, max_length=4096, description="CIDRs the user may log in from; empty: the tenant's rule."
    )
    allowed_hours: str | None = Field(
        default=None, max_length=1024, description="e.g. `Mon-Fri 07:00-19:00`; empty: the tenant's rule."
    )
    ssh_keys: list[Annotated[str, Field(max_length=8192)]] | None = Field(
        default=None,
        max_length=64,
        description="Replaces the user's public SSH keys (`authorized_keys` lines, at most 16); `[]` removes them.",
    )


user = ObjectRoutes(
    router, "user", User, find=lambda s, ref: users.find_user_id(s.db, s.actor, ref), exclude_unset=True
)
user.add_list(lambda s, q: users.list_users(s.db, s.actor, q), [*users.FIELDS], "List users")


user.add_create(
    UserCreate,
    lambda s, body: users.create_user(
        s.db, s.actor, body.login, body.password, tenant=body.tenant, description=body.description
    ),
    "Create a user",
)


@router.post("/bulk/{action}", response_model=BulkResult, summary="Block, unblock or delete many users")
async def bulk_action(
    action: Literal["block", "unblock", "delete"], body: BulkRequest, actor: ActorDep, db: DbDep, settings: SettingsDep
) -> BulkResult:
    q = bulk_query(body, [*users.FIELDS])
    out = await bulk.bulk_users(db, actor, action, paths=settings.paths, ids=body.ids, q=q)
    return BulkResult.model_validate(out)


async def _delete(s: Scope, user_id: int) -> None:
    await users.delete_user(s.db, s.actor, user_id, s.settings.paths)


user.add_get(lambda s, i: users.get_user(s.db, s.actor, i), "Show a user")
user.add_patch(
    UserUpdate,
    lambda s, i, body: users.update_user(s.db, s.actor, i, **body.model_dump(exclude_unset=True)),
    "Change a user's password, blocked flag, description, login rules or public SSH keys",
)
user.add_action("block", lambda s, i: users.update_user(s.db, s.actor, i, blocked=True), "Block a user")
user.add_action("unblock", lambda s, i: users.update_user(s.db, s.actor, i, blocked=False), "Unblock a user")
user.add_delete(_delete, "Delete a user (refused while the user has desktops); their home is archived or deleted")
