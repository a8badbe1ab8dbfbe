"""Disk images (QVD's DIs, ``/images``) and OSFs (operating system flavours, ``/osfs``); read-only for now
(images are registered by ``deckard image build``)."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter
from pydantic import BaseModel

from deckard.api.deps import ActorDep, DbDep
from deckard.api.envelope import ERROR_RESPONSES, Page, page
from deckard.services import images

router = APIRouter(tags=["images"], responses=ERROR_RESPONSES)


class Image(BaseModel):
    id: int
    osf_id: int
    osf: str
    version: str
    path: str
    digest: str
    size: int
    state: str
    status_message: str
    blocked: bool
    tags: list[str]
    created_at: dt.datetime


class Osf(BaseModel):
    id: int
    tenant_id: int
    name: str
    memory_mib: int
    cpus: float
    keep_overlay: bool
    driver: str
    description: str
    created_at: dt.datetime


@router.get("/images", response_model=Page[Image], summary="List disk images and their tags")
async def list_images(actor: ActorDep, db: DbDep) -> Page[Image]:
    return page([Image.model_validate(r) for r in await images.list_images(db, actor)])


@router.get("/osfs", response_model=Page[Osf], summary="List OSFs (operating system flavours)")
async def list_osfs(actor: ActorDep, db: DbDep) -> Page[Osf]:
    return page([Osf.model_validate(r) for r in await images.list_osfs(db, actor)])
