"""Volumes (``/volumes``): block disks of a tenant, their snapshots, and their attachments to desktops.
``{volume}`` in a path is the numeric id or the name.  The rules and error codes live in ``services/volumes.py``
and are listed in ``docs/volumes.md``.

Attach and detach answer once the desktop's node has acted when the desktop runs (hot plug), so a refusal from
the guest (``volume_held``) reaches the caller; after a minute they answer with the attachment still
``pending`` and the node acts later.
"""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from pydantic import Field

from deckard.api.deps import ScopeDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.resource import ObjectRoutes
from deckard.api.strict import Ref, RequestModel
from deckard.model.schemas import Page, Volume, VolumeSnapshot
from deckard.services import volumes

router = APIRouter(prefix="/volumes", tags=["volumes"], responses=ERROR_RESPONSES)

Name = Field(min_length=1, max_length=64)


class SnapshotRef(RequestModel):
    volume: Ref = Field(description="The source volume: id or name.")
    snapshot: str = Field(min_length=1, max_length=64)


class VolumeCreate(RequestModel):
    name: str = Name
    size_gib: int | None = Field(
        default=None, ge=1, le=volumes.MAX_GIB, description="Size of a new volume; a clone's is the snapshot's."
    )
    description: str = Field(default="", max_length=4096)
    tenant: Ref | None = Field(default=None, description="Supertenant only: where to create it.")
    from_snapshot: SnapshotRef | None = Field(default=None, description="Clone this snapshot instead.")


class VolumeUpdate(RequestModel):
    size_gib: int | None = Field(default=None, ge=1, le=volumes.MAX_GIB, description="Grow only.")
    description: str | None = Field(default=None, max_length=4096)


class SnapshotCreate(RequestModel):
    name: str = Name


class AttachRequest(RequestModel):
    desktop: Ref = Field(description="A desktop of the volume's tenant: id or name.")
    read_only: bool = False


class DetachRequest(RequestModel):
    desktop: Ref


volume = ObjectRoutes(
    router, "volume", Volume, find=lambda s, ref: volumes.find_volume_id(s.db, s.actor, ref), exclude_unset=True
)
volume.add_list(lambda s, q: volumes.list_volumes(s.db, s.actor, q), volumes.COLUMNS, "List volumes")
volume.add_create(
    VolumeCreate,
    lambda s, body: volumes.create_volume(
        s.db,
        s.actor,
        volumes.volume_backend(s.settings.paths),
        body.name,
        size_gib=body.size_gib,
        description=body.description,
        tenant=body.tenant,
        from_snapshot=body.from_snapshot.model_dump() if body.from_snapshot else None,
    ),
    "Create a volume, or clone one from a snapshot (`from_snapshot`); 409 volume_quota_exceeded over the quota",
)
volume.add_get(lambda s, i: volumes.get_volume(s.db, s.actor, i), "Show a volume and its attachments")
volume.add_patch(
    VolumeUpdate,
    lambda s, i, body: volumes.update_volume(
        s.db, s.actor, volumes.volume_backend(s.settings.paths), i, **body.model_dump(exclude_unset=True)
    ),
    "Grow a volume (422 bad_size to shrink, 409 volume_busy while a running desktop has it) or describe it",
)
volume.add_delete(
    lambda s, i: volumes.delete_volume(s.db, s.actor, volumes.volume_backend(s.settings.paths), i),
    "Delete a volume and its snapshots (409 volume_attached while attached)",
)
volume.add_action_with(
    "attach",
    AttachRequest,
    lambda s, i, body: volumes.attach_volume(s.db, s.actor, i, body.desktop, read_only=body.read_only),
    "Attach to a desktop (hot-plugged into a running VM); 409 volume_in_use when another desktop has it read-write",
)
volume.add_action_with(
    "detach",
    DetachRequest,
    lambda s, i, body: volumes.detach_volume(s.db, s.actor, i, body.desktop),
    "Detach from a desktop; 409 volume_held while the running guest has it mounted",
)


@router.get("/{volume}/snapshots", response_model=Page[VolumeSnapshot], summary="List a volume's snapshots")
async def list_snapshots(volume: Ref, scope: ScopeDep) -> Page[VolumeSnapshot]:
    rows = await volumes.list_snapshots(scope.db, scope.actor, volume)
    return Page[VolumeSnapshot](items=[VolumeSnapshot.model_validate(r) for r in rows], total=len(rows))


@router.post(
    "/{volume}/snapshots",
    response_model=VolumeSnapshot,
    status_code=status.HTTP_201_CREATED,
    summary="Snapshot a volume (409 volume_busy while a running desktop writes it)",
)
async def create_snapshot(volume: Ref, body: SnapshotCreate, scope: ScopeDep) -> VolumeSnapshot:
    backend = volumes.volume_backend(scope.settings.paths)
    return VolumeSnapshot.model_validate(
        await volumes.create_snapshot(scope.db, scope.actor, backend, volume, body.name)
    )


@router.delete(
    "/{volume}/snapshots/{snapshot}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a snapshot",
)
async def delete_snapshot(volume: Ref, snapshot: Ref, scope: ScopeDep) -> Response:
    backend = volumes.volume_backend(scope.settings.paths)
    await volumes.delete_snapshot(scope.db, scope.actor, backend, volume, snapshot)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
