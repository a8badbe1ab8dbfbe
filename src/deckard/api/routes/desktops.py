"""Desktops (QVD's VMs, ``/desktops``).  ``{desktop}`` in a path is the numeric id or the name.

Start and stop write a *command* (desired state) and return at once; the owning node acts on it and the
desktop's ``state`` follows (ARCHITECTURE.md §2).
"""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Query, Response, status
from pydantic import BaseModel, Field

from deckard.api.deps import ActorDep, DbDep, SettingsDep
from deckard.api.envelope import ERROR_RESPONSES, Page, page
from deckard.services import desktops, users

router = APIRouter(prefix="/desktops", tags=["desktops"], responses=ERROR_RESPONSES)


class Desktop(BaseModel):
    id: int
    tenant_id: int
    name: str
    user_id: int
    user: str
    osf_id: int
    osf: str
    tag: str
    ip: str
    mac: str
    blocked: bool
    description: str
    state: str = Field(description="Observed state: stopped, starting, running, stopping, zombie, failed.")
    state_at: dt.datetime | None
    cmd: str | None = Field(description="Pending command (start/stop) not yet carried out by a node.")
    node_id: int | None
    node: str | None
    user_state: str
    image_id: int | None
    failure_reason: str | None
    started_at: dt.datetime | None
    created_at: dt.datetime


class DesktopCreate(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    user: str = Field(min_length=1, max_length=64, description="Owner: user id or login.")
    osf: str | None = Field(default=None, max_length=64, description="OSF id or name; the default OSF if omitted.")
    tag: str = Field(default="default", min_length=1, max_length=64)
    description: str = Field(default="", max_length=4096)


@router.get("", response_model=Page[Desktop], summary="List desktops")
async def list_desktops(
    actor: ActorDep,
    db: DbDep,
    user: str | None = Query(default=None, description="Only this user's desktops (id or login)."),
) -> Page[Desktop]:
    user_id = await users.find_user_id(db, actor, user) if user is not None else None
    rows = await desktops.list_desktops(db, actor, user_id=user_id)
    return page([Desktop.model_validate(r) for r in rows])


@router.post(
    "",
    response_model=Desktop,
    status_code=status.HTTP_201_CREATED,
    summary="Create a desktop (its IP address is allocated here)",
)
async def create_desktop(body: DesktopCreate, actor: ActorDep, db: DbDep, settings: SettingsDep) -> Desktop:
    desktops.validate_tag(body.tag)
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


@router.get("/{desktop}", response_model=Desktop, summary="Show a desktop")
async def get_desktop(desktop: str, actor: ActorDep, db: DbDep) -> Desktop:
    desktop_id = await desktops.find_desktop_id(db, actor, desktop)
    return Desktop.model_validate(await desktops.get_desktop(db, actor, desktop_id))


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


@router.post("/{desktop}/start", response_model=Desktop, summary="Ask a node to start the desktop")
async def start_desktop(desktop: str, actor: ActorDep, db: DbDep) -> Desktop:
    desktop_id = await desktops.find_desktop_id(db, actor, desktop)
    return Desktop.model_validate(await desktops.start_desktop(db, actor, desktop_id))


@router.post("/{desktop}/stop", response_model=Desktop, summary="Ask the desktop's node to stop it")
async def stop_desktop(desktop: str, actor: ActorDep, db: DbDep) -> Desktop:
    desktop_id = await desktops.find_desktop_id(db, actor, desktop)
    return Desktop.model_validate(await desktops.stop_desktop(db, actor, desktop_id))


@router.post("/{desktop}/block", response_model=Desktop, summary="Block the desktop: nobody may start it")
async def block_desktop(desktop: str, actor: ActorDep, db: DbDep) -> Desktop:
    desktop_id = await desktops.find_desktop_id(db, actor, desktop)
    return Desktop.model_validate(await desktops.set_blocked(db, actor, desktop_id, True))


@router.post("/{desktop}/unblock", response_model=Desktop, summary="Unblock the desktop")
async def unblock_desktop(desktop: str, actor: ActorDep, db: DbDep) -> Desktop:
    desktop_id = await desktops.find_desktop_id(db, actor, desktop)
    return Desktop.model_validate(await desktops.set_blocked(db, actor, desktop_id, False))
