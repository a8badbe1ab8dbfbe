"""Custom properties (``/properties/{object_type}/{id}``) of users, desktops, OSFs, images and nodes."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Response, status

from deckard.api.deps import ActorDep, DbDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.model.ids import ID_MAX
from deckard.services import properties

router = APIRouter(prefix="/properties", tags=["properties"], responses=ERROR_RESPONSES)

ObjectType = Literal["user", "desktop", "osf", "image", "node"]
ObjectId = Annotated[int, Path(ge=1, le=ID_MAX, description="The object's id.")]


@router.get("/{object_type}/{id}", response_model=dict[str, str], summary="An object's custom properties")
async def get_properties(object_type: ObjectType, id: ObjectId, actor: ActorDep, db: DbDep) -> dict[str, str]:
    return await properties.get_properties(db, actor, object_type, id)


@router.put(
    "/{object_type}/{id}", response_model=dict[str, str], summary="Set properties (the keys given; others are kept)"
)
async def set_properties(
    object_type: ObjectType,
    id: ObjectId,
    body: dict[str, str],
    actor: ActorDep,
    db: DbDep,
) -> dict[str, str]:
    return await properties.set_properties(db, actor, object_type, id, body)


@router.delete(
    "/{object_type}/{id}/{key}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Remove one property",
)
async def delete_property(
    object_type: ObjectType,
    id: ObjectId,
    key: str,
    actor: ActorDep,
    db: DbDep,
) -> Response:
    await properties.delete_property(db, actor, object_type, id, key)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
