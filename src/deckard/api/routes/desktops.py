"""Desktops (QVD's VMs, ``/desktops``).  ``{desktop}`` in a path is the numeric id or the name.

Start and stop write a *command* (desired state) and return at once; the owning node acts on it and the
desktop's ``state`` follows (ARCHITECTURE.md §2).  Every action also exists in bulk
(``POST /desktops/bulk/{action}``), answering per item.  Lists take the query syntax of
``services/listing.py`` (``?osf=web&state__in=running,starting&sort=-created_at&page=2&fields=id,name``).

Fields an administrator may not see (``desktop.see.<field>`` ACLs) are absent from answers, so every field but
``id`` is optional in the schema; ``fields=`` selects fields the same way.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response, status
from pydantic import BaseModel, Field

from deckard.api.deps import ActorDep, DbDep, SettingsDep
from deckard.api.envelope import ERROR_RESPONSES, Page
from deckard.api.strict import Id, Ref, RequestModel
from deckard.services import bulk, desktops, users
from deckard.services.listing import ListQuery, parse_list_query

router = APIRouter(prefix="/desktops", tags=["desktops"], responses=ERROR_RESPONSES)


class Desktop(BaseModel):
    id: int | None = None  # absent only when `fields=` leaves it out
    tenant_id: int | None = None
    name: str | None = None
    user_id: int | None = None
    user: str | None = None
    osf_id: int | None = None
    osf: str | None = None
    tag: str | None = None
    ip: str | None = None
    mac: str | None = None
    blocked: bool | None = None
    description: str | None = None
    state: str | None = Field(
        default=None, description="Observed state: stopped, starting, running, stopping, zombie, failed."
    )
    state_at: dt.datetime | None = None
    cmd: str | None = Field(default=None, description="Pending command (start/stop) not yet carried out by a node.")
    node_id: int | None = None
    node: str | None = None
    user_state: str | None = None
    image_id: int | None = None
    failure_reason: str | None = None
    started_at: dt.datetime | None = None
    expire_soft_at: dt.datetime | None = None
    expire_hard_at: dt.datetime | None = None
    created_at: dt.datetime | None = None


class DesktopCreate(RequestModel):
    name: str = Field(min_length=1, max_length=64)
    user: Ref = Field(description="Owner: user id or login.")
    osf: Ref | None = Field(default=None, description="OSF id or name; the default OSF if omitted.")
    tag: str = Field(default="default", min_length=1, max_length=64)
    description: str = Field(default="", max_length=4096)


class DesktopUpdate(RequestModel):
    name: str | None = Field(default=None, min_length=1, max_length=64)
    description: str | None = Field(default=None, max_length=4096)
    tag: str | None = Field(default=None, min_length=1, max_length=64, description="Only while stopped.")
    osf: Ref | None = Field(default=None, description="Only while stopped.")


DesktopAction = Literal["start", "stop", "block", "unblock", "disconnect", "reset", "delete"]


class BulkRequest(RequestModel):
    ids: list[Id] | None = Field(default=None, max_length=100_000, description="Act on these ids …")
    filter: dict[str, str | int | float | bool] | None = Field(
        max_length=64, default=None, description='… or on every object matching a list filter, e.g. `{"osf": "web"}`.'
    )


class BulkResult(BaseModel):
    ok: list[int]
    failed: dict[str, dict[str, str]] = Field(description='Per failed id: `{"code", "message"}`.')


def list_query(allowed: list[str]) -> Any:
    """A dependency that parses a list route's query string (documented parameters plus field filters)."""

    def parse(
        request: Request,
        sort: Annotated[str | None, Query(description="Fields, comma-separated; '-' for descending.")] = None,
        page: Annotated[int | None, Query(ge=1)] = None,
        per_page: Annotated[int | None, Query(ge=1, le=1000)] = None,
        fields: Annotated[str | None, Query(description="Only these fields, comma-separated.")] = None,
    ) -> ListQuery:
        del sort, page, per_page, fields  # documented here, parsed with the filters below
        return parse_list_query(request.query_params.multi_items(), allowed)

    return Depends(parse)


def bulk_query(body: BulkRequest, allowed: list[str]) -> ListQuery | None:
    if body.filter is None:
        return None
    pairs = [(k, str(v).lower() if isinstance(v, bool) else str(v)) for k, v in body.filter.items()]
    return parse_list_query(pairs, allowed)


DesktopQuery = Annotated[ListQuery, list_query([*desktops.FIELDS])]


@router.get("", response_model=Page[Desktop], response_model_exclude_unset=True, summary="List desktops")
async def list_desktops(
    actor: ActorDep,
    db: DbDep,
    q: DesktopQuery,
    user: Annotated[Ref | None, Query(description="Only this user's desktops (id or login).")] = None,
) -> Page[Desktop]:
    user_id = await users.find_user_id(db, actor, user) if user is not None else None
    rows, total = await desktops.list_desktops(db, actor, q, user_id=user_id)
    return Page[Desktop](items=[Desktop.model_validate(r) for r in rows], total=total)


@router.post(
    "",
    response_model=Desktop,
    response_model_exclude_unset=True,
    status_code=status.HTTP_201_CREATED,
    summary="Create a desktop (its IP address is allocated here)",
)
async def create_desktop(body: DesktopCreate, actor: ActorDep, db: DbDep, settings: SettingsDep) -> Desktop:
    row = await desktops.create_desktop(
        db,
        actor,
        body.name,
        body.user,
        network=settings.network.range,
        osf=body.osf,
        tag=body.tag,
        description=body.description,
    )
    return Desktop.model_validate(row)


@router.post(
    "/bulk/{action}",
    response_model=BulkResult,
    summary="Act on many desktops: start, stop, block, unblock, disconnect, reset, delete",
)
async def bulk_action(
    action: DesktopAction, body: BulkRequest, actor: ActorDep, db: DbDep, settings: SettingsDep
) -> BulkResult:
    q = bulk_query(body, [*desktops.FIELDS])
    out = await bulk.bulk_desktops(db, actor, action, ids=body.ids, q=q, paths=settings.paths)
    return BulkResult.model_validate(out)


@router.get("/{desktop}", response_model=Desktop, response_model_exclude_unset=True, summary="Show a desktop")
async def get_desktop(desktop: str, actor: ActorDep, db: DbDep) -> Desktop:
    desktop_id = await desktops.find_desktop_id(db, actor, desktop)
    return Desktop.model_validate(await desktops.get_desktop(db, actor, desktop_id))


@router.patch(
    "/{desktop}",
    response_model=Desktop,
    response_model_exclude_unset=True,
    summary="Rename, describe, retag or change the OSF (tag and OSF only while stopped: 409 desktop_running)",
)
async def update_desktop(desktop: str, body: DesktopUpdate, actor: ActorDep, db: DbDep) -> Desktop:
    desktop_id = await desktops.find_desktop_id(db, actor, desktop)
    row = await desktops.update_desktop(
        db, actor, desktop_id, name=body.name, description=body.description, tag=body.tag, osf=body.osf
    )
    return Desktop.model_validate(row)


@router.delete(
    "/{desktop}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a stopped desktop (409 desktop_running otherwise)",
)
async def delete_desktop(desktop: str, actor: ActorDep, db: DbDep) -> Response:
    desktop_id = await desktops.find_desktop_id(db, actor, desktop)
    await desktops.delete_desktop(db, actor, desktop_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


async def _act(desktop: str, action: str, actor: ActorDep, db: DbDep, settings: SettingsDep) -> Desktop:
    desktop_id = await desktops.find_desktop_id(db, actor, desktop)
    if action == "start":
        row = await desktops.start_desktop(db, actor, desktop_id)
    elif action == "stop":
        row = await desktops.stop_desktop(db, actor, desktop_id)
    elif action in ("block", "unblock"):
        row = await desktops.set_blocked(db, actor, desktop_id, action == "block")
    elif action == "disconnect":
        row = await desktops.disconnect_desktop(db, actor, desktop_id)
    else:
        row = await desktops.reset_desktop(db, actor, desktop_id, settings.paths)
    return Desktop.model_validate(row)


def _action_route(action: str, summary: str) -> None:
    async def route(desktop: str, actor: ActorDep, db: DbDep, settings: SettingsDep) -> Desktop:
        return await _act(desktop, action, actor, db, settings)

    route.__name__ = f"{action}_desktop"
    router.post(
        f"/{{desktop}}/{action}",
        response_model=Desktop,
        response_model_exclude_unset=True,
        summary=summary,
        operation_id=f"{action}_desktop",
    )(route)


for _action, _summary in (
    ("start", "Ask a node to start the desktop (503 no_node when no node can take it)"),
    ("stop", "Ask the desktop's node to stop it"),
    ("block", "Block the desktop: nobody may start it"),
    ("unblock", "Unblock the desktop"),
    ("disconnect", "Disconnect the user: their display connection closes, the desktop keeps running"),
    ("reset", "Discard the desktop's overlay so its next start is a clean image (stopped desktops only)"),
):
    _action_route(_action, _summary)
