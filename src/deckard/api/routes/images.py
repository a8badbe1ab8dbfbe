"""Disk images (QVD's DIs, ``/images``): create, send content (upload, import, build), publish, tag, retire,
block, delete.  The rules live in ``services/images.py``; this module maps HTTP onto them.

The build runs here rather than in services because services may not import the builder (layers in
ARCHITECTURE.md §3): the route moves the image to ``building`` and runs ``images.builder.build_image`` in a
background task that reports ``"NN% phase"`` into ``status_message`` and ends ``ready`` or ``failed``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Literal

import structlog
from fastapi import APIRouter, Request, status
from pydantic import Field

from deckard.api.deps import ActorDep, DbDep, SettingsDep
from deckard.api.envelope import ERROR_RESPONSES
from deckard.api.resource import ObjectRoutes
from deckard.api.strict import Ref, RequestModel
from deckard.images import builder
from deckard.images.profile import DEFAULT_PROFILE, Profile, load_profile, with_packages, with_vm
from deckard.model.errors import reason_of
from deckard.model.schemas import Image
from deckard.runtime.paths import image_digest
from deckard.runtime.settings import Settings
from deckard.services import image_files, images

router = APIRouter(prefix="/images", tags=["images"], responses=ERROR_RESPONSES)
log = structlog.get_logger()


class ImageBuild(RequestModel):
    profile: str = Field(
        default=DEFAULT_PROFILE,
        min_length=1,
        max_length=32,
        description="A built-in build profile: `minimal` (Xvnc, JWM, xterm) or `standard` (Xfce, Firefox ESR, ...).",
    )
    add_packages: list[str] = Field(
        default_factory=list, max_length=64, description="Debian packages to add on top of the profile."
    )
    format: Literal["container", "vm"] = Field(
        default="container",
        description="`vm`: the same image that can also boot as a virtual machine (Debian's kernel and busybox).",
    )

    def load(self) -> Profile:
        """The profile to build (400 ``unknown_profile`` / ``bad_package`` before anything starts)."""
        profile = load_profile(self.profile)
        profile = with_packages(profile, self.add_packages) if self.add_packages else profile
        return with_vm(profile) if self.format == "vm" else profile


class ImageCreate(RequestModel):
    version: str = Field(min_length=1, max_length=64)
    osf: Ref | None = Field(default=None, description="OSF id or name; the default OSF if omitted.")
    source: str = Field(default="upload", description="upload, import or build.")
    path: str | None = Field(default=None, max_length=4096, description="With source=import: start it at once.")
    build: ImageBuild | None = Field(default=None, description="With source=build: the profile and extra packages.")


class ImageImport(RequestModel):
    path: str = Field(
        min_length=1,
        max_length=4096,
        description="Absolute path of a tarball inside the farm's import directories (supertenant only).",
    )


class ImagePublish(RequestModel):
    tags: list[str] = Field(default_factory=lambda: ["default", "head"], max_length=32)
    expire_soft_s: int | None = Field(default=None, ge=0, le=10 * 365 * 86400)
    expire_hard_s: int | None = Field(default=None, ge=0, le=10 * 365 * 86400)


def _images_dir(settings: Settings) -> Path:
    return settings.paths.images


def _content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length", "")
    return int(raw) if raw.isascii() and raw.isdigit() else None


image = ObjectRoutes(router, "image", Image, param="image_id", ref_type=int, exclude_unset=True)
image.add_list(lambda s, q: images.list_images(s.db, s.actor, q), images.COLUMNS, "List disk images")


async def _run_build(db: DbDep, image_id: int, images_dir: Path, cache_dir: Path, profile: Profile) -> None:
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Future[None]] = set()

    def progress(phase: str, fraction: float) -> None:
        coro = images.report_progress(db, image_id, f"{int(fraction * 100)}% {phase}")
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # called from a worker thread of the builder
            pending.add(asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop)))
        else:
            pending.add(asyncio.ensure_future(coro))

    try:
        built = await builder.build_image(images_dir, cache_dir=cache_dir, progress=progress, profile=profile)
        await asyncio.gather(*pending, return_exceptions=True)
        path = await asyncio.to_thread(image_files.copy_into_store, built, images_dir, image_id)
        digest = await asyncio.to_thread(image_digest, path)
        await images.finish_image(db, image_id, path, digest=digest, size=path.stat().st_size, profile=profile.name)
        log.info("image.built", image_id=image_id, path=str(path))
    except Exception as e:
        await asyncio.gather(*pending, return_exceptions=True)
        reason = reason_of(e)
        log.warning("image.build_failed", image_id=image_id, reason=reason)
        await images.fail_image(db, image_id, f"build failed: {reason}")


def _spawn_build(request: Request, db: DbDep, image_id: int, settings: Settings, profile: Profile) -> None:
    tasks: set[asyncio.Task[None]] | None = getattr(request.app.state, "image_builds", None)
    if tasks is None:
        tasks = request.app.state.image_builds = set()
    cache = settings.paths.home / "cache" / "images"
    build = _run_build(db, image_id, _images_dir(settings), cache, profile)
    task = asyncio.create_task(build, name=f"image-build-{image_id}")
    tasks.add(task)  # keep a reference: an unreferenced task may be collected mid-build
    task.add_done_callback(tasks.discard)


@router.post("", response_model=Image, status_code=status.HTTP_201_CREATED, summary="Create a disk image")
async def create_image(body: ImageCreate, request: Request, actor: ActorDep, db: DbDep, settings: SettingsDep) -> Image:
    profile = (body.build or ImageBuild()).load() if body.source == "build" else None  # refused before any row
    row = await images.create_image(db, actor, body.version, osf=body.osf, source=body.source)
    if body.source == "import" and body.path:
        row = await image_files.import_image(
            db, actor, row["id"], body.path, images_dir=_images_dir(settings), import_dirs=settings.import_dirs
        )
    elif profile is not None:
        row = await images.start_build(db, actor, row["id"])
        _spawn_build(request, db, row["id"], settings, profile)
    return Image.model_validate(row)


image.add_get(lambda s, i: images.get_image(s.db, s.actor, i), "Show a disk image")


@router.put(
    "/{image_id}/content",
    response_model=Image,
    response_model_exclude_unset=True,
    summary="Upload the image's tarball (whole, or in chunks with Content-Range; restartable)",
    responses={413: {"description": "Larger than the tenant's `image.max_upload_mib` (`upload_too_large`)."}},
    openapi_extra={
        "requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    },
)
async def upload_content(image_id: int, request: Request, actor: ActorDep, db: DbDep, settings: SettingsDep) -> Image:
    row = await image_files.receive_upload(
        db,
        actor,
        image_id,
        request.stream(),
        images_dir=_images_dir(settings),
        content_range=request.headers.get("content-range"),
        declared_size=_content_length(request),
    )
    return Image.model_validate(row)


@router.post(
    "/{image_id}/import",
    response_model=Image,
    summary="Copy a tarball from the farm's import directory (supertenant administrators only)",
)
async def import_image(image_id: int, body: ImageImport, actor: ActorDep, db: DbDep, settings: SettingsDep) -> Image:
    row = await image_files.import_image(
        db, actor, image_id, body.path, images_dir=_images_dir(settings), import_dirs=settings.import_dirs
    )
    return Image.model_validate(row)


@router.post(
    "/{image_id}/build",
    response_model=Image,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Build the image with the image builder (in the background; progress in status_message)",
)
async def build_image(
    image_id: int,
    request: Request,
    actor: ActorDep,
    db: DbDep,
    settings: SettingsDep,
    body: ImageBuild | None = None,
) -> Image:
    profile = (body or ImageBuild()).load()
    row = await images.start_build(db, actor, image_id)
    _spawn_build(request, db, image_id, settings, profile)
    return Image.model_validate(row)


@router.post(
    "/{image_id}/publish",
    response_model=Image,
    summary="Publish: move tags onto the image and set expiry on desktops running the old one",
)
async def publish_image(image_id: int, body: ImagePublish, actor: ActorDep, db: DbDep) -> Image:
    row = await images.publish_image(
        db, actor, image_id, body.tags, expire_soft_s=body.expire_soft_s, expire_hard_s=body.expire_hard_s
    )
    return Image.model_validate(row)


image.add_action(
    "retire", lambda s, i: images.retire_image(s.db, s.actor, i), "Retire the image (no tag may point at it)"
)


@router.put("/{image_id}/tags/{tag}", response_model=Image, summary="Point a tag at this image (moves it)")
async def tag_image(image_id: int, tag: str, actor: ActorDep, db: DbDep) -> Image:
    return Image.model_validate(await images.tag_image(db, actor, image_id, tag))


@router.delete("/{image_id}/tags/{tag}", response_model=Image, summary="Remove a tag from this image")
async def untag_image(image_id: int, tag: str, actor: ActorDep, db: DbDep) -> Image:
    return Image.model_validate(await images.untag_image(db, actor, image_id, tag))


image.add_action(
    "block",
    lambda s, i: images.set_image_blocked(s.db, s.actor, i, True),
    "Block the image: no desktop starts from it",
)
image.add_action("unblock", lambda s, i: images.set_image_blocked(s.db, s.actor, i, False), "Unblock the image")
image.add_delete(
    lambda s, i: images.delete_image(s.db, s.actor, i, images_dir=_images_dir(s.settings)),
    "Delete the image and its file (409 while tagged or in use)",
)
