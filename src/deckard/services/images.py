"""Disk images (QVD's DIs) and their tags: the life of an image and which image a desktop starts from.

An image goes ``new → building|uploading → ready → published → retired`` (``failed`` with the reason), by the
table in ``model/states.py``; every change is a guarded ``UPDATE … WHERE state = old`` so two requests never
both win.  Content arrives through ``services/image_files.py`` (upload, import) or the builder (driven by the
API, since services may not import the builder).

A tag points at exactly one image per OSF (primary key ``(osf_id, tag)``); moving a tag is one upsert, and
publishing moves all its tags *and* gives the desktops still on the old image their expiry deadlines in one
transaction (``services/expiry.py``), so no desktop sees a half-published image.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database, prepared
from deckard.model.entities import utcnow
from deckard.model.errors import BadInput, Conflict, InvalidTransition, NotFound
from deckard.model.states import DESKTOP_AT_REST, DesktopState, ImageState
from deckard.services.context import Actor, require, require_fields, require_supertenant, visible, visible_rows
from deckard.services.events import publish
from deckard.services.expiry import expiry_defaults, set_expiry_for_tags
from deckard.services.listing import ListQuery, run_list
from deckard.services.osfs import find_osf_id
from deckard.services.rows import as_dict, unique_or_conflict
from deckard.services.tenancy import DEFAULT_OSF, DEFAULT_TENANT, ensure_default_osf, tenant_id_by_name
from deckard.services.transitions import transition_image
from deckard.services.users import tenant_filter

i = t.disk_images
SOURCES = ("upload", "import", "build")
ACTIVE_DESKTOP_STATES = sorted(set(DesktopState) - DESKTOP_AT_REST)  # a node holds the desktop and its image

COLUMNS: dict[str, sa.ColumnElement[Any]] = {
    **{c.key: c for c in i.c},
    "osf": t.osfs.c.name,
    "tenant_id": t.osfs.c.tenant_id,
}


# ---- tags and the image a desktop starts from -----------------------------------------------------------
async def move_tag(conn: AsyncConnection, osf_id: int, tag: str, image_id: int) -> None:
    res = await conn.execute(
        sa.update(t.image_tags)
        .where(t.image_tags.c.osf_id == osf_id, t.image_tags.c.tag == tag)
        .values(image_id=image_id, updated_at=utcnow())
    )
    if res.rowcount == 0:
        await conn.execute(
            sa.insert(t.image_tags).values(osf_id=osf_id, tag=tag, image_id=image_id, updated_at=utcnow())
        )


async def register_image(
    db: Database,
    path: Path,
    *,
    version: str,
    digest: str = "",
    tags: tuple[str, ...] = ("default", "head"),
    osf_id: int | None = None,
    profile: str = "",
) -> dict[str, Any]:
    """Register (idempotently, by OSF + version) a ready image file, publish it and point ``tags`` at it.

    An existing version is published again (``ready|retired|published → published``); one that is new,
    being filled or failed is refused (``invalid_transition``): give the build another version.  ``profile``
    is the build profile it was made from ("" when unknown; a known one is never forgotten by a re-register).
    """
    async with db.begin() as conn:
        if osf_id is None:
            osf_id = await ensure_default_osf(conn, await tenant_id_by_name(conn, DEFAULT_TENANT))
        row = (await conn.execute(sa.select(i.c.id).where(i.c.osf_id == osf_id, i.c.version == version))).first()
        if row:
            image_id = int(row.id)
            values: dict[str, Any] = {"path": str(path), **({"profile": profile[:32]} if profile else {})}
            await transition_image(conn, image_id, ImageState.PUBLISHED, values=values)
        else:
            res = await conn.execute(
                sa.insert(i)
                .values(
                    osf_id=osf_id,
                    version=version,
                    path=str(path),
                    digest=digest,
                    size=path.stat().st_size if path.exists() else 0,
                    state=ImageState.PUBLISHED.value,
                    created_at=utcnow(),
                    published_at=utcnow(),
                    profile=profile[:32],
                )
                .returning(i.c.id)
            )
            image_id = int(res.scalar_one())
        for tag in tags:
            await move_tag(conn, osf_id, tag, image_id)
        out = (await conn.execute(sa.select(i).where(i.c.id == image_id))).one()
        return as_dict(out)


_TAGGED = prepared(  # built once: every start resolves its image (services/config.py says why)
    sa.select(i.c.id, i.c.path, i.c.blocked)
    .join(t.image_tags, t.image_tags.c.image_id == i.c.id)
    .where(t.image_tags.c.osf_id == sa.bindparam("osf_id"), t.image_tags.c.tag == sa.bindparam("tag"))
)


async def resolve_image(conn: AsyncConnection, osf_id: int, tag: str) -> tuple[int, Path]:
    """The image a desktop of this OSF and tag starts from; NotFound says what to do."""
    row = (await conn.execute(_TAGGED, {"osf_id": osf_id, "tag": tag})).first()
    if not row:
        osf = (await conn.execute(sa.select(t.osfs.c.name, t.osfs.c.driver).where(t.osfs.c.id == osf_id))).one()
        build = f"deckard image build{' --format vm' if osf.driver == 'vm' else ''} --osf {osf.name}"
        raise NotFound(
            f"no disk image is tagged {tag!r} in the OSF {osf.name!r}: build one with `{build}`",
            code="image_not_found",
        )
    if row.blocked:
        raise Conflict(
            f"the disk image tagged {tag!r} is blocked: unblock it or move the tag to another image",
            code="image_blocked",
        )
    return int(row.id), Path(row.path)


async def images_to_prepare(db: Database, driver: str) -> list[tuple[int, Path]]:
    """The images some tag points at, in OSFs of ``driver`` and not blocked, newest first: what a node makes
    ready (unpacks) before a desktop needs them (``node/images.py``)."""
    q = (
        sa.select(i.c.id, i.c.path)
        .join(t.osfs, t.osfs.c.id == i.c.osf_id)
        .where(
            i.c.id.in_(sa.select(t.image_tags.c.image_id)),
            t.osfs.c.driver == driver,
            i.c.blocked.is_(False),
            i.c.path != "",
        )
        .order_by(i.c.id.desc())
    )
    async with db.connect() as conn:
        return [(int(r.id), Path(r.path)) for r in await conn.execute(q)]


def validate_tag(tag: str) -> str:
    if not tag or len(tag) > 64 or any(c.isspace() or c in "/,?#" for c in tag):
        raise BadInput(f"invalid tag {tag!r}: 1-64 characters, no spaces, '/', ',', '?' or '#'", code="bad_tag")
    return tag


# ---- reading ------------------------------------------------------------------------------------------
def _select(dialect: str) -> sa.Select[Any]:
    agg = (
        sa.func.group_concat(t.image_tags.c.tag) if dialect == "sqlite" else sa.func.string_agg(t.image_tags.c.tag, ",")
    )
    tags = sa.select(agg).where(t.image_tags.c.image_id == i.c.id).scalar_subquery()
    return sa.select(i, t.osfs.c.name.label("osf"), t.osfs.c.tenant_id.label("tenant_id"), tags.label("tags")).join(
        t.osfs, t.osfs.c.id == i.c.osf_id
    )


def _with_tags(row: dict[str, Any]) -> dict[str, Any]:
    raw = row.get("tags")
    if "tags" in row:
        row["tags"] = sorted(raw.split(",")) if raw else []
    return row


async def list_images(db: Database, actor: Actor, q: ListQuery | None = None) -> tuple[list[dict[str, Any]], int]:
    require(actor, "image.see")
    q = q or ListQuery()
    require_fields(actor, "image", q.named_fields)
    async with db.connect() as conn:
        base = _select(db.dialect).where(tenant_filter(actor, t.osfs.c.tenant_id))
        rows, total = await run_list(conn, base, q, COLUMNS, i.c.id)
    return visible_rows(actor, "image", [_with_tags(r) for r in rows]), total


async def _image(conn: AsyncConnection, actor: Actor, image_id: int) -> sa.Row[Any]:
    q = (
        sa.select(i, t.osfs.c.tenant_id)
        .join(t.osfs, t.osfs.c.id == i.c.osf_id)
        .where(i.c.id == image_id, tenant_filter(actor, t.osfs.c.tenant_id))
    )
    row = (await conn.execute(q)).first()
    if row is None:
        raise NotFound(f"no disk image with id {image_id}: `deckard image list` shows them", code="image_not_found")
    return row


async def get_image(db: Database, actor: Actor, image_id: int) -> dict[str, Any]:
    require(actor, "image.see")
    async with db.connect() as conn:
        await _image(conn, actor, image_id)
        row = (await conn.execute(_select(db.dialect).where(i.c.id == image_id))).one()
    return visible(actor, "image", _with_tags(as_dict(row)))


# ---- state changes ------------------------------------------------------------------------------------
async def set_image_state(db: Database, image_id: int, new: ImageState, *, message: str = "", **values: Any) -> None:
    """Move an image to ``new`` by the table (``invalid_transition`` when its state does not allow it)."""
    async with db.begin() as conn:
        await transition_image(conn, image_id, new, values={"status_message": message, **values})
        tenant_id = await _tenant_of(conn, image_id)
    await publish(db, "state", "image", image_id, tenant_id, state=new.value, status_message=message)


async def _tenant_of(conn: AsyncConnection, image_id: int) -> int:
    q = sa.select(t.osfs.c.tenant_id).join(i, i.c.osf_id == t.osfs.c.id).where(i.c.id == image_id)
    return int((await conn.execute(q)).scalar_one())


async def report_progress(db: Database, image_id: int, message: str) -> None:
    """Progress of a build or an import, shown as ``status_message`` (``"42% unpacking"``)."""
    async with db.begin() as conn:
        await conn.execute(
            sa.update(i)
            .where(i.c.id == image_id, i.c.state.in_([ImageState.BUILDING, ImageState.UPLOADING]))
            .values(status_message=message[:500])
        )


async def fail_image(db: Database, image_id: int, reason: str) -> bool:
    """The build, upload or import failed: ``new|building|uploading → failed`` with the reason.

    The report comes from a background task that may be late: for an image that has moved on meanwhile
    (deleted, already failed) it changes nothing and returns False.
    """
    try:
        async with db.begin() as conn:
            await transition_image(conn, image_id, ImageState.FAILED, values={"status_message": reason[:2000]})
            tenant_id = await _tenant_of(conn, image_id)
    except (NotFound, InvalidTransition):
        return False
    await publish(db, "state", "image", image_id, tenant_id, state=ImageState.FAILED.value, status_message=reason[:500])
    return True


async def finish_image(
    db: Database, image_id: int, path: Path, *, digest: str, size: int, profile: str | None = None
) -> None:
    """The content is complete and verified: state ``ready`` (with the build profile it was made from, if known)."""
    known = {"profile": profile[:32]} if profile else {}
    await set_image_state(
        db,
        image_id,
        ImageState.READY,
        message="",
        path=str(path),
        digest=digest,
        size=size,
        uploaded_bytes=size,
        **known,
    )


async def create_image(
    db: Database, actor: Actor, version: str, *, osf: str | int | None = None, source: str = "upload"
) -> dict[str, Any]:
    """A new image row under an OSF (state ``new``); its content comes from ``source`` next."""
    require(actor, "image.create")
    if source not in SOURCES:
        raise BadInput(f"unknown source {source!r}; use one of {', '.join(SOURCES)}", code="bad_source")
    if source == "import":  # refused before a row exists (services/image_files.py says why)
        require_supertenant(actor, "import images from the API host's files (upload the tarball instead)")
    if not version or len(version) > 64 or any(c.isspace() or c == "/" for c in version):
        raise BadInput(f"invalid version {version!r}: 1-64 characters, no spaces or '/'", code="bad_version")
    with unique_or_conflict(f"this OSF already has an image with version {version!r}"):
        async with db.begin() as conn:
            osf_id = await find_osf_id(conn, actor, DEFAULT_OSF if osf is None else osf)
            res = await conn.execute(
                sa.insert(i)
                .values(
                    osf_id=osf_id,
                    version=version,
                    path="",
                    state=ImageState.NEW.value,
                    status_message=f"waiting for its content ({source})",
                    created_at=utcnow(),
                )
                .returning(i.c.id)
            )
            image_id = int(res.scalar_one())
            tenant_id = await _tenant_of(conn, image_id)
    await publish(db, "created", "image", image_id, tenant_id, version=version)
    return await get_image(db, actor, image_id)


async def start_build(db: Database, actor: Actor, image_id: int) -> dict[str, Any]:
    """``new → building``; the caller (the API) runs the builder and reports progress and the outcome."""
    require(actor, "image.build")
    async with db.connect() as conn:
        await _image(conn, actor, image_id)
    await set_image_state(db, image_id, ImageState.BUILDING, message="0% queued")
    return await get_image(db, actor, image_id)


async def publish_image(
    db: Database,
    actor: Actor,
    image_id: int,
    tags: Sequence[str] = ("default", "head"),
    *,
    expire_soft_s: int | None = None,
    expire_hard_s: int | None = None,
) -> dict[str, Any]:
    """Publish: move ``tags`` onto the image and set expiry on desktops still on the old one, atomically."""
    require(actor, "image.publish")
    tags = [validate_tag(tag) for tag in dict.fromkeys(tags)]
    for value in (expire_soft_s, expire_hard_s):
        if value is not None and not 0 <= value <= 10 * 365 * 86400:
            raise BadInput("expiry delays are seconds between 0 and ten years", code="bad_expiry")
    async with db.connect() as conn:
        row = await _image(conn, actor, image_id)
    if row.blocked:
        raise Conflict("the disk image is blocked: unblock it before publishing it", code="image_blocked")
    default_soft, default_hard = await expiry_defaults(db, int(row.tenant_id))
    soft = (
        expire_soft_s
        if expire_soft_s is not None
        else row.expire_soft_s
        if row.expire_soft_s is not None
        else default_soft
    )
    hard = (
        expire_hard_s
        if expire_hard_s is not None
        else row.expire_hard_s
        if row.expire_hard_s is not None
        else default_hard
    )
    async with db.begin() as conn:
        await transition_image(
            conn,
            image_id,
            ImageState.PUBLISHED,
            i.c.blocked.is_(False),
            values=dict(published_at=utcnow(), status_message="", expire_soft_s=soft, expire_hard_s=hard),
        )
        for tag in tags:
            await move_tag(conn, int(row.osf_id), tag, image_id)
        expiring = await set_expiry_for_tags(conn, int(row.osf_id), tags, image_id, soft_s=soft, hard_s=hard)
    await publish(db, "state", "image", image_id, int(row.tenant_id), state=ImageState.PUBLISHED.value, tags=tags)
    for desktop_id in expiring:
        await publish(db, "updated", "desktop", desktop_id, int(row.tenant_id), expiring=True)
    out = await get_image(db, actor, image_id)
    out["expiring_desktops"] = expiring
    return out


async def retire_image(db: Database, actor: Actor, image_id: int) -> dict[str, Any]:
    """``ready|published → retired``: refused while a tag points at it (move the tag first)."""
    require(actor, "image.update")
    async with db.connect() as conn:
        await _image(conn, actor, image_id)
        await _refuse_if_tagged(conn, image_id, "retire")
    await set_image_state(db, image_id, ImageState.RETIRED)
    return await get_image(db, actor, image_id)


async def _refuse_if_tagged(conn: AsyncConnection, image_id: int, what: str) -> None:
    tags = sorted(
        r.tag for r in await conn.execute(sa.select(t.image_tags.c.tag).where(t.image_tags.c.image_id == image_id))
    )
    if tags:
        raise Conflict(
            f"cannot {what} the image: tags {', '.join(tags)} point at it; move them to another image first",
            code="image_tagged",
            details={"tags": tags},
        )


async def _change_image(
    db: Database,
    actor: Actor,
    image_id: int,
    change: Callable[[AsyncConnection, sa.Row[Any]], Awaitable[None]],
    **event: Any,
) -> dict[str, Any]:
    """Run ``change`` on a visible image in one transaction, tell the watchers, answer the image as it is now."""
    async with db.begin() as conn:
        row = await _image(conn, actor, image_id)
        await change(conn, row)
    await publish(db, "updated", "image", image_id, int(row.tenant_id), **event)
    return await get_image(db, actor, image_id)


async def tag_image(db: Database, actor: Actor, image_id: int, tag: str) -> dict[str, Any]:
    """Point ``tag`` at this image (moving it from another image of the OSF in one upsert)."""
    require(actor, "image.tag")
    validate_tag(tag)

    async def move(conn: AsyncConnection, row: sa.Row[Any]) -> None:
        if row.state not in (ImageState.READY, ImageState.PUBLISHED):
            raise InvalidTransition(
                f"only a ready or published image can be tagged (this one is {row.state})", code="bad_image_state"
            )
        await move_tag(conn, int(row.osf_id), tag, image_id)

    return await _change_image(db, actor, image_id, move, tag=tag)


async def untag_image(db: Database, actor: Actor, image_id: int, tag: str) -> dict[str, Any]:
    require(actor, "image.tag")

    async def remove(conn: AsyncConnection, _row: sa.Row[Any]) -> None:
        res = await conn.execute(
            sa.delete(t.image_tags).where(t.image_tags.c.image_id == image_id, t.image_tags.c.tag == tag)
        )
        if res.rowcount == 0:
            raise NotFound(f"the image has no tag {tag!r}", code="tag_not_found")

    return await _change_image(db, actor, image_id, remove, untagged=tag)


async def set_image_blocked(db: Database, actor: Actor, image_id: int, blocked: bool) -> dict[str, Any]:
    """A blocked image is never started from nor published (QVD's ``dis.blocked``)."""
    require(actor, "image.block")

    async def block(conn: AsyncConnection, _row: sa.Row[Any]) -> None:
        await conn.execute(sa.update(i).where(i.c.id == image_id).values(blocked=blocked))

    return await _change_image(db, actor, image_id, block, blocked=blocked)


async def delete_image(db: Database, actor: Actor, image_id: int, *, images_dir: Path) -> None:
    """Delete the row and its file; refused while tagged (``image_tagged``) or in use (``image_in_use``)."""
    require(actor, "image.delete")
    async with db.begin() as conn:
        row = await _image(conn, actor, image_id)
        await _refuse_if_tagged(conn, image_id, "delete")
        users = (
            await conn.execute(
                sa.select(sa.func.count()).where(
                    t.desktops.c.image_id == image_id, t.desktops.c.state.in_(ACTIVE_DESKTOP_STATES)
                )
            )
        ).scalar_one()
        if users:
            raise Conflict(
                f"{users} desktop(s) are running this image: stop them first",
                code="image_in_use",
                details={"desktops": int(users)},
            )
        shared = (
            (
                await conn.execute(sa.select(sa.func.count()).where(i.c.path == row.path, i.c.id != image_id))
            ).scalar_one()
            if row.path
            else 1
        )
        await conn.execute(sa.delete(i).where(i.c.id == image_id))
    # only files inside the image store are ours to remove (a built image may be shared by versions)
    candidates = [images_dir / f"{image_id}.partial"]
    if row.path and not shared and Path(row.path).resolve().parent == images_dir.resolve():
        candidates.append(Path(row.path))
    for path in candidates:
        path.unlink(missing_ok=True)
    await publish(db, "deleted", "image", image_id, int(row.tenant_id))
