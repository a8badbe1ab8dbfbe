"""The content of a disk image: a rootfs tarball streamed in by upload, or copied from a path on the API host.

Import by path reads the API host's files, so it is the farm owner's tool, not a tenant's: only supertenant
administrators may use it (refused before any filesystem access), and only from the import directories the farm
owner configured (``api.image_import_dirs``; by default ``<home>/import`` and the image store).  The path is
walked from the import directory one component at a time with ``O_NOFOLLOW`` (no symlink, no ``..``, at any
depth) and must end at a regular file; a path outside, missing or refused all get the same error, so the answer
tells nothing about what exists on the host.

Uploads are capped per tenant by ``image.max_upload_mib`` (the image's tenant): a declared size over it is
refused before a byte is written, and a body that grows past it is cut off (413 ``upload_too_large``) and its
partial file removed.

An upload is written straight to ``<storage>/images/<id>.partial`` as it arrives (never held in memory), so a
connection that drops leaves every byte that arrived; the client asks ``GET /images/{id}`` for
``uploaded_bytes`` and continues with ``Content-Range: bytes START-END/TOTAL`` where START must be exactly that
count (409 ``bad_offset`` with the expected offset otherwise).  An ``flock`` on the partial file keeps two
uploads of one image from interleaving, across API processes too.  When the last byte is in, the file is
checked with ``tar -t`` (which reads plain, gzip, xz and zstd tarballs), hashed, renamed to its final name and
the image becomes ``ready``; a file that is not a tarball makes the image ``failed`` with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import shutil
import stat
from collections.abc import AsyncIterator, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, Any

import sqlalchemy as sa
import structlog

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.errors import BadInput, Conflict, InvalidTransition, PermissionDenied
from deckard.model.states import ImageState
from deckard.runtime.paths import image_digest
from deckard.services.config import get_config
from deckard.services.context import Actor, require, require_supertenant
from deckard.services.images import (
    fail_image,
    finish_image,
    get_image,
    report_progress,
    set_image_state,
)

log = structlog.get_logger()
i = t.disk_images

RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
PROGRESS_EVERY = 8 << 20  # bytes between two uploaded_bytes updates while a chunk streams in
COPY_CHUNK = 4 << 20
MAGIC = (  # (offset, bytes, final suffix)
    (0, b"\x28\xb5\x2f\xfd", ".tar.zst"),
    (0, b"\x1f\x8b", ".tar.gz"),
    (0, b"\xfd7zXZ\x00", ".tar.xz"),
    (257, b"ustar", ".tar"),
)


class UploadTooLarge(BadInput):
    """The upload is larger than its tenant's ``image.max_upload_mib``: 413, and nothing of it is kept."""

    code = "upload_too_large"
    status = 413


def partial_path(images_dir: Path, image_id: int) -> Path:
    return images_dir / f"{image_id}.partial"


def parse_content_range(header: str | None) -> tuple[int, int, int] | None:
    """``bytes START-END/TOTAL`` (END inclusive) → (start, end, total); None when the header is absent."""
    if header is None:
        return None
    m = RANGE_RE.match(header.strip())
    if not m:
        raise BadInput(
            f"bad Content-Range {header!r}: use 'bytes START-END/TOTAL' (END inclusive)", code="bad_content_range"
        )
    start, end, total = (int(g) for g in m.groups())
    if not start <= end < total:
        raise BadInput(f"bad Content-Range {header!r}: need START <= END < TOTAL", code="bad_content_range")
    return start, end, total


def sniff_suffix(path: Path) -> str | None:
    """The file name suffix its first bytes say it has, or None when it looks like no tarball at all."""
    with path.open("rb") as f:
        head = f.read(512)
    for offset, magic, suffix in MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return suffix
    return None


async def check_tarball(path: Path) -> str | None:
    """None when ``path`` is a readable tarball, else why not (for the image's ``status_message``)."""
    if await asyncio.to_thread(sniff_suffix, path) is None:
        return "the file is not a tar archive (plain, gzip, xz or zstd): upload a rootfs tarball"
    proc = await asyncio.create_subprocess_exec(
        "tar", "-tf", str(path), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["tar failed"]
        return f"the file is not a valid tar archive: {tail[0]}"
    return None


async def _finalize(db: Database, image_id: int, partial: Path, images_dir: Path) -> None:
    """Verify, hash and rename the complete file: ``ready``, or ``failed`` with the reason."""
    reason = await check_tarball(partial)
    if reason is not None:
        partial.unlink(missing_ok=True)
        await fail_image(db, image_id, reason)
        log.info("image.rejected", image_id=image_id, reason=reason)
        return
    await report_progress(db, image_id, "100% verifying")
    digest = await asyncio.to_thread(image_digest, partial)
    final = images_dir / f"{image_id}{sniff_suffix(partial)}"
    size = partial.stat().st_size
    partial.replace(final)
    await finish_image(db, image_id, final, digest=digest, size=size)
    log.info("image.ready", image_id=image_id, size=size)


async def _state(db: Database, image_id: int) -> str:
    async with db.connect() as conn:
        return str((await conn.execute(sa.select(i.c.state).where(i.c.id == image_id))).scalar_one())


async def _set_uploaded(db: Database, image_id: int, count: int) -> None:
    async with db.begin() as conn:
        await conn.execute(sa.update(i).where(i.c.id == image_id).values(uploaded_bytes=count))


def _lock(f: IO[bytes]) -> None:
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise Conflict("another upload of this image is in progress", code="upload_in_progress") from None


async def _begin_uploading(db: Database, image_id: int, what: str) -> None:
    state = await _state(db, image_id)
    if state == ImageState.NEW:
        await set_image_state(db, image_id, ImageState.UPLOADING, message=f"0% {what}")
    elif state != ImageState.UPLOADING:
        raise InvalidTransition(
            f"the image is {state}: content can only be sent to a new image (create another version)",
            code="bad_image_state",
            details={"state": state},
        )


async def upload_limit(db: Database, tenant_id: int) -> int:
    """The largest image a tenant may upload, in bytes (``image.max_upload_mib``)."""
    return int(await get_config(db, "image.max_upload_mib", tenant_id)) << 20


def _too_large(limit: int) -> UploadTooLarge:
    return UploadTooLarge(
        f"the image is larger than this tenant's upload limit of {limit >> 20} MiB: make it smaller, or ask the "
        "farm's administrators to raise image.max_upload_mib",
        details={"limit_mib": limit >> 20},
    )


async def receive_upload(
    db: Database,
    actor: Actor,
    image_id: int,
    body: AsyncIterator[bytes],
    *,
    images_dir: Path,
    content_range: str | None = None,
    declared_size: int | None = None,
) -> dict[str, Any]:
    """Append one chunk of the image's tarball (or the whole file without ``content_range``).

    ``declared_size`` is the request's Content-Length, when it has one: checked against the limit up front."""
    require(actor, "image.upload")
    image = await get_image(db, actor, image_id)  # 404 for what the actor may not see
    span = parse_content_range(content_range)
    limit = await upload_limit(db, int(image["tenant_id"]))
    if (span and span[2] > limit) or (not span and declared_size is not None and declared_size > limit):
        raise _too_large(limit)
    images_dir.mkdir(parents=True, exist_ok=True)
    partial = partial_path(images_dir, image_id)
    await _begin_uploading(db, image_id, "uploading")
    with partial.open("ab") as f:
        _lock(f)
        received = f.seek(0, 2)
        start = span[0] if span else 0
        if span and start != received:
            raise Conflict(
                f"this upload continues at byte {received}, not {start}: resend from there",
                code="bad_offset",
                details={"expected": received},
            )
        if not span:
            f.truncate(0)
            received = 0
        last_report = received
        end = span[1] + 1 if span else None
        try:
            async for chunk in body:
                if end is not None and received + len(chunk) > end:
                    f.truncate(start)
                    received = start
                    raise BadInput("the body is longer than its Content-Range says", code="bad_content_range")
                if received + len(chunk) > limit:
                    f.truncate(0)
                    partial.unlink(missing_ok=True)
                    received = 0
                    raise _too_large(limit)
                await asyncio.to_thread(f.write, chunk)
                received += len(chunk)
                if received - last_report >= PROGRESS_EVERY:
                    await asyncio.to_thread(f.flush)
                    await _set_uploaded(db, image_id, received)
                    last_report = received
        finally:
            await asyncio.to_thread(f.flush)
            with contextlib.suppress(Exception):  # the client went away: record what arrived
                await _set_uploaded(db, image_id, received)
        total = span[2] if span else received
        if total:
            await report_progress(db, image_id, f"{received * 100 // total}% uploading")
        if received == total:
            await _finalize(db, image_id, partial, images_dir)
    return await get_image(db, actor, image_id)


def _refused(source: str, roots: Sequence[Path]) -> BadInput:
    # one answer for outside, missing, a symlink, a directory or unreadable: no oracle on the host's files
    return BadInput(
        f"{source!r} is not a regular file inside the import directories ({', '.join(map(str, roots))}): copy "
        "the tarball there (no symlinks) and give its absolute path",
        code="bad_import_path",
    )


def open_importable(source: str, roots: Sequence[Path]) -> int:
    """A read-only descriptor of ``source`` if it is a regular file under one of ``roots``, reached from the root
    without following any symlink; ``bad_import_path`` otherwise (the same error for every reason)."""
    path = PurePosixPath(source)
    if not path.is_absolute() or any(part in ("..", ".") for part in path.parts) or "\0" in source:
        raise _refused(source, roots)
    for root in roots:
        real = Path(os.path.realpath(root))
        for prefix in dict.fromkeys((PurePosixPath(os.path.abspath(root)), PurePosixPath(real))):
            if path == prefix or not path.is_relative_to(prefix):
                continue
            parts = path.relative_to(prefix).parts
            try:
                fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                for part in parts[:-1]:
                    nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                    os.close(fd)
                    fd = nxt
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
                file_fd = os.open(parts[-1], flags, dir_fd=fd)
            except OSError:
                continue
            finally:
                os.close(fd)
            if stat.S_ISREG(os.fstat(file_fd).st_mode):
                return file_fd
            os.close(file_fd)
    raise _refused(source, roots)


async def import_image(
    db: Database, actor: Actor, image_id: int, source: str, *, images_dir: Path, import_dirs: Sequence[Path]
) -> dict[str, Any]:
    """Copy a tarball from the farm's import directories into the image store (``uploading → ready``).

    Supertenant administrators only; refused before the host's filesystem is touched otherwise (after the
    lookup, so another tenant's image is a 404 like any other)."""
    require(actor, "image.upload")
    await get_image(db, actor, image_id)
    require_supertenant(actor, "import images from the API host's files (upload the tarball instead)")
    if not import_dirs:
        raise PermissionDenied(
            "importing images by path is disabled on this farm: upload the tarball, or set api.image_import_dirs",
            code="import_disabled",
        )
    src_fd = await asyncio.to_thread(open_importable, source, import_dirs)
    with os.fdopen(src_fd, "rb") as src:
        images_dir.mkdir(parents=True, exist_ok=True)
        partial = partial_path(images_dir, image_id)
        if partial.exists() and os.path.samestat(os.fstat(src.fileno()), partial.stat()):
            raise _refused(source, import_dirs)  # the image's own partial upload: copying it would empty it
        await _begin_uploading(db, image_id, "importing")
        with partial.open("ab") as f:
            _lock(f)
            f.truncate(0)
            total = os.fstat(src.fileno()).st_size
            copied = 0
            try:
                while chunk := await asyncio.to_thread(src.read, COPY_CHUNK):
                    await asyncio.to_thread(f.write, chunk)
                    copied += len(chunk)
                    if total:
                        await report_progress(db, image_id, f"{copied * 100 // total}% importing")
                await asyncio.to_thread(f.flush)
            except OSError as e:
                await fail_image(db, image_id, f"could not read {source}: {e.strerror or e}")
                partial.unlink(missing_ok=True)
                return await get_image(db, actor, image_id)
            await _set_uploaded(db, image_id, copied)
            await _finalize(db, image_id, partial, images_dir)
    return await get_image(db, actor, image_id)


def copy_into_store(built: Path, images_dir: Path, image_id: int) -> Path:
    """Where a built image is kept: the builder's own cached file when it is already in the store."""
    if built.resolve().parent == images_dir.resolve():
        return built
    target = images_dir / f"{image_id}{''.join(built.suffixes[-2:]) or '.tar'}"
    shutil.copyfile(built, target)
    return target
