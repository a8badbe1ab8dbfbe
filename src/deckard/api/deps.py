"""What a route needs from the request: the farm's ``Database`` and ``Settings`` (from ``app.state``) and the
``Actor`` its bearer token stands for, or the three together as a ``Scope`` (``api/resource.py``'s routes).
Routes declare these as parameters; services do the authorization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from deckard.db.engine import Database
from deckard.model.errors import Unauthenticated
from deckard.runtime.settings import Settings
from deckard.services.admins import actor_for_token
from deckard.services.context import Actor

# auto_error off: a missing token must leave in our envelope (401 unauthenticated), not FastAPI's 403
_bearer = HTTPBearer(auto_error=False, description="A session token from POST /auth/login, or an API token.")


def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    if credentials is None or not credentials.credentials:
        raise Unauthenticated("no token: log in (POST /api/v1/auth/login) and send 'Authorization: Bearer <token>'")
    return credentials.credentials


async def get_actor(
    request: Request, token: Annotated[str, Depends(get_token)], db: Annotated[Database, Depends(get_db)]
) -> Actor:
    actor = await actor_for_token(db, token)
    request.state.admin = actor.name  # for the request's log line
    request.state.actor = actor  # for the audit record (api/audit_log.py)
    return actor


DbDep = Annotated[Database, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
TokenDep = Annotated[str, Depends(get_token)]
ActorDep = Annotated[Actor, Depends(get_actor)]


@dataclass(frozen=True)
class Scope:
    """What a use case takes from one request: the farm's database and settings and who is acting."""

    db: Database
    actor: Actor
    settings: Settings


def get_scope(db: DbDep, actor: ActorDep, settings: SettingsDep) -> Scope:
    return Scope(db, actor, settings)


ScopeDep = Annotated[Scope, Depends(get_scope)]


def list_pairs(request: Request) -> list[tuple[str, str]]:
    """The query string as (key, value) pairs, for ``services.listing.parse_list_query``."""
    return list(request.query_params.multi_items())


ListPairsDep = Annotated[list[tuple[str, str]], Depends(list_pairs)]
