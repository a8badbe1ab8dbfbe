"""OSFs (QVD's operating system flavours, ``/osfs``): memory, CPUs, driver and overlay policy of desktops.
``{osf}`` in a path is the numeric id or the name.  The rules live in ``services/osfs.py``."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Request, Response, status
from pydantic import BaseModel, Field

from deckard.api.deps import ActorDep, DbDep
from deckard.api.envelope import ERROR_RESPONSES, Page
from deckard.api.strict import Ref, RequestModel
from deckard.services import osfs
from deckard.services.listing import parse_list_query

router = APIRouter(prefix="/osfs", tags=["osfs"], responses=ERROR_RESPONSES)


class Osf(BaseModel):
    id: int | None = None
    tenant_id: int | None = None
    name: str | None = None
    memory_mib: int | None = None
    cpus: float | None = None
    keep_overlay: bool | None = Field(default=None, description="Keep the desktop's writable layer across starts.")
    driver: str | None = Field(default=None, description="container, vm or fake.")
    description: str | None = None
    created_at: dt.datetime | None = None


class OsfCreate(RequestModel):
    name: str = Field(min_length=1, max_length=64)
    memory_mib: int = Field(default=1024, ge=64, le=1 << 20)
    cpus: float = Field(default=1.0, ge=0.1, le=256)
    keep_overlay: bool = False
    driver: str = Field(default="container", max_length=16)
    description: str = Field(default="", max_length=4096)
    tenant: Ref | None = Field(default=None, description="Supertenant only: where to create it.")


class OsfUpdate(RequestModel):
    name: str | None = Field(default=None, min_length=1, max_length=64)
    memory_mib: int | None = Field(default=None, ge=64, le=1 << 20)
    cpus: float | None = Field(default=None, ge=0.1, le=256)
    keep_overlay: bool | None = None
    driver: str | None = Field(default=None, max_length=16)
    description: str | None = Field(default=None, max_length=4096)


def _out(row: dict[str, Any]) -> Osf:
    return Osf.model_validate(row)


@router.get("", response_model=Page[Osf], response_model_exclude_unset=True, summary="List OSFs")
async def list_osfs(request: Request, actor: ActorDep, db: DbDep) -> Page[Osf]:
    q = parse_list_query(request.query_params.multi_items(), tuple(osfs.COLUMNS))
    rows, total = await osfs.list_osfs(db, actor, q)
    return Page[Osf](items=[_out(r) for r in rows], total=total)


@router.post("", response_model=Osf, status_code=status.HTTP_201_CREATED, summary="Create an OSF")
async def create_osf(body: OsfCreate, actor: ActorDep, db: DbDep) -> Osf:
    fields = body.model_dump(exclude={"name", "tenant"})
    return _out(await osfs.create_osf(db, actor, body.name, tenant=body.tenant, **fields))


@router.get("/{osf}", response_model=Osf, summary="Show an OSF")
async def get_osf(osf: str, actor: ActorDep, db: DbDep) -> Osf:
    return _out(await osfs.get_osf(db, actor, osf))


@router.patch("/{osf}", response_model=Osf, summary="Change an OSF (running desktops keep their old values)")
async def update_osf(osf: str, body: OsfUpdate, actor: ActorDep, db: DbDep) -> Osf:
    return _out(await osfs.update_osf(db, actor, osf, body.model_dump(exclude_unset=True)))


@router.delete(
    "/{osf}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete an OSF (409 has_dependents while desktops or images use it)",
)
async def delete_osf(osf: str, actor: ActorDep, db: DbDep) -> Response:
    await osfs.delete_osf(db, actor, osf)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
