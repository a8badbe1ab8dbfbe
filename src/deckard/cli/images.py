"""``deckard image ...`` and ``deckard osf ...``: disk images (QVD's DIs) with their tags, and OSFs (operating
system flavours: memory, CPUs, driver, overlay policy), all through the API.

``image build`` and ``image import`` (``cli/farm.py``) build or register an image *locally* as root; here
``image add`` creates an image through the API and fills it by upload (``--upload FILE``), by a copy made on
the API host (``--import PATH``) or by the API's builder (``--build``); ``image upload`` resumes an interrupted
upload from the server's ``uploaded_bytes``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from deckard.cli import session
from deckard.cli.output import print_done, print_object, print_rows
from deckard.cli.session import JsonOpt, ProfileOpt
from deckard.model.errors import DeckardError

IMAGE_COLUMNS = ("id", "osf", "version", "state", "tags", "size", "blocked", "created_at")
OSF_COLUMNS = ("id", "name", "memory_mib", "cpus", "driver", "keep_overlay", "description")

ImageArg = Annotated[int, typer.Argument(help="Id of the disk image.")]
OsfArg = Annotated[str, typer.Argument(help="Name or id of the OSF.")]
FilterOpt = Annotated[
    list[str] | None, typer.Option("--filter", "-f", help="FIELD[__op]=VALUE, e.g. state=published (repeatable).")
]


def _filters(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{item!r}: use FIELD=VALUE")
        out[key] = value
    return out


def list_images(filters: FilterOpt = None, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """List disk images and the tags pointing at them."""
    with session.api(profile) as api:
        rows = api.list_images(**_filters(filters)) if filters else api.list_images()
    print_rows(rows, IMAGE_COLUMNS, as_json=as_json)


def show_image(image: ImageArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Show one disk image (state, progress, tags, uploaded bytes)."""
    with session.api(profile) as api:
        print_object(api.get_image(image), as_json=as_json)


def _upload(api: Any, image_id: int, file: Path, quiet: bool) -> dict[str, Any]:
    if quiet:
        row: dict[str, Any] = api.upload_image(image_id, file)
        return row
    columns = (TextColumn("uploading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("upload", total=file.stat().st_size)
        row = api.upload_image(image_id, file, progress=lambda done, total: bar.update(task, completed=done))
    return row


def _follow_build(api: Any, image_id: int, quiet: bool) -> dict[str, Any]:
    row: dict[str, Any] = api.get_image(image_id)
    with Progress(TextColumn("{task.description}"), BarColumn(), disable=quiet, transient=True) as bar:
        task = bar.add_task("building", total=100)
        while row["state"] == "building":
            message = row.get("status_message") or ""
            pct, _, phase = message.partition("% ")
            if pct.isdigit():
                bar.update(task, completed=int(pct), description=phase or "building")
            time.sleep(1.0)
            row = api.get_image(image_id)
    return row


def _report(row: dict[str, Any], as_json: bool) -> None:
    if row["state"] == "failed":
        session.report(DeckardError(f"image {row['id']} failed: {row.get('status_message')}", code="image_failed"))
        raise typer.Exit(session.ERROR_EXIT)
    print_done(f"image {row['id']} ({row['version']}) is {row['state']}", row, as_json=as_json)


def add_image(
    version: Annotated[str, typer.Argument(help="Version of the new image (unique in its OSF).")],
    osf: Annotated[str | None, typer.Option("--osf", help="OSF name or id (default: the default OSF).")] = None,
    upload: Annotated[Path | None, typer.Option("--upload", help="Upload this local tarball.", exists=True)] = None,
    import_path: Annotated[
        str | None,
        typer.Option("--import", help="Copy this tarball from the farm's import directory (supertenant only)."),
    ] = None,
    build: Annotated[bool, typer.Option("--build", help="Build it with the API host's image builder.")] = False,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Create a disk image and fill it (upload, import or build)."""
    if sum((upload is not None, import_path is not None, build)) > 1:
        raise typer.BadParameter("choose one of --upload, --import, --build")
    source = "import" if import_path else "build" if build else "upload"
    with session.api(profile) as api:
        row = api.create_image(version, osf=osf, source=source, path=import_path)
        if upload is not None:
            row = _upload(api, row["id"], upload, as_json)
        elif build:
            row = _follow_build(api, row["id"], as_json)
    _report(row, as_json)


def upload_image(
    image: ImageArg,
    file: Annotated[Path, typer.Argument(help="The rootfs tarball (tar, tar.gz, tar.xz, tar.zst).", exists=True)],
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Upload (or resume uploading) a tarball into an image."""
    with session.api(profile) as api:
        row = _upload(api, image, file, as_json)
    _report(row, as_json)


def publish_image(
    image: ImageArg,
    tags: Annotated[list[str] | None, typer.Option("--tag", "-t", help="Tag to move here (repeatable).")] = None,
    soft: Annotated[int | None, typer.Option("--soft", help="Seconds until running desktops are warned.")] = None,
    hard: Annotated[int | None, typer.Option("--hard", help="Seconds until running desktops are stopped.")] = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Publish an image: move tags (default: default, head) and set expiry on desktops on the old image."""
    with session.api(profile) as api:
        row = api.publish_image(image, tags or None, expire_soft_s=soft, expire_hard_s=hard)
    n = len(row.get("expiring_desktops") or [])
    print_done(
        f"image {image} published ({', '.join(row['tags'])}); {n} running desktop(s) will expire", row, as_json=as_json
    )


def _simple(action: str, message: str, doc: str) -> Any:
    def command(image: ImageArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
        with session.api(profile) as api:
            row = getattr(api, f"{action}_image")(image)
        print_done(message.format(image=image), row, as_json=as_json)

    command.__doc__ = doc
    return command


def tag_image(
    image: ImageArg, tag: Annotated[str, typer.Argument()], as_json: JsonOpt = False, profile: ProfileOpt = None
) -> None:
    """Point a tag at an image (moving it from the OSF's other image)."""
    with session.api(profile) as api:
        row = api.tag_image(image, tag)
    print_done(f"tag {tag!r} now points at image {image}", row, as_json=as_json)


def untag_image(
    image: ImageArg, tag: Annotated[str, typer.Argument()], as_json: JsonOpt = False, profile: ProfileOpt = None
) -> None:
    """Remove a tag from an image."""
    with session.api(profile) as api:
        row = api.untag_image(image, tag)
    print_done(f"tag {tag!r} removed from image {image}", row, as_json=as_json)


def delete_image(image: ImageArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Delete an image and its file (refused while tagged or running)."""
    with session.api(profile) as api:
        api.delete_image(image)
    print_done(f"image {image} deleted", None, as_json=as_json)


def add_image_commands(group: typer.Typer) -> None:
    group.command("list")(list_images)
    group.command("show")(show_image)
    group.command("add")(add_image)
    group.command("upload")(upload_image)
    group.command("publish")(publish_image)
    group.command("tag")(tag_image)
    group.command("untag")(untag_image)
    group.command("retire")(_simple("retire", "image {image} is retired", "Retire an image (no tag may point at it)."))
    group.command("block")(_simple("block", "image {image} is blocked", "Block an image: no desktop starts from it."))
    group.command("unblock")(_simple("unblock", "image {image} is unblocked", "Unblock an image."))
    group.command("delete")(delete_image)


# ---- OSFs -----------------------------------------------------------------------------------------------
osf_app = typer.Typer(help="OSFs: operating system flavours (memory, CPUs, driver).", no_args_is_help=True)
MemOpt = Annotated[int | None, typer.Option("--memory", help="Memory in MiB.")]
CpusOpt = Annotated[float | None, typer.Option("--cpus")]
DriverOpt = Annotated[str | None, typer.Option("--driver", help="container, vm or fake.")]
KeepOpt = Annotated[bool | None, typer.Option("--keep-overlay/--discard-overlay")]
DescOpt = Annotated[str | None, typer.Option("--description", "-d")]


@osf_app.command("list")
def list_osfs(filters: FilterOpt = None, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """List OSFs (operating system flavours)."""
    with session.api(profile) as api:
        rows = api.list_osfs(**_filters(filters)) if filters else api.list_osfs()
    print_rows(rows, OSF_COLUMNS, as_json=as_json)


@osf_app.command("show")
def show_osf(osf: OsfArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Show one OSF."""
    with session.api(profile) as api:
        print_object(api.get_osf(osf), as_json=as_json)


@osf_app.command("add")
def add_osf(
    name: Annotated[str, typer.Argument(help="Name of the new OSF.")],
    memory: MemOpt = None,
    cpus: CpusOpt = None,
    driver: DriverOpt = None,
    keep_overlay: KeepOpt = None,
    description: DescOpt = None,
    tenant: Annotated[str | None, typer.Option("--tenant", help="Supertenant only: the tenant.")] = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Create an OSF."""
    asked = {"memory_mib": memory, "cpus": cpus, "driver": driver, "keep_overlay": keep_overlay}
    fields = {k: v for k, v in (asked | {"description": description, "tenant": tenant}).items() if v is not None}
    with session.api(profile) as api:
        row = api.create_osf(name, **fields)
    print_done(f"OSF {row['name']!r} created (id {row['id']})", row, as_json=as_json)


@osf_app.command("update")
def update_osf(
    osf: OsfArg,
    name: Annotated[str | None, typer.Option("--name", help="New name.")] = None,
    memory: MemOpt = None,
    cpus: CpusOpt = None,
    driver: DriverOpt = None,
    keep_overlay: KeepOpt = None,
    description: DescOpt = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Change an OSF."""
    with session.api(profile) as api:
        row = api.update_osf(
            osf,
            name=name,
            memory_mib=memory,
            cpus=cpus,
            driver=driver,
            keep_overlay=keep_overlay,
            description=description,
        )
    print_done(f"OSF {row['name']!r} updated", row, as_json=as_json)


@osf_app.command("delete")
def delete_osf(osf: OsfArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Delete an OSF (refused while desktops or images use it)."""
    with session.api(profile) as api:
        api.delete_osf(osf)
    print_done(f"OSF {osf!r} deleted", None, as_json=as_json)
