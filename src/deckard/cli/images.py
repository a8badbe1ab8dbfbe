"""``deckard image ...`` and ``deckard osf ...``: disk images (QVD's DIs) with their tags, and OSFs (operating
system flavours: memory, CPUs, driver, overlay policy), all through the API.

``image build`` and ``image import`` (``cli/farm.py``) build or register an image *locally* as root; here
``image add`` creates an image through the API and fills it by upload (``--upload FILE``), by a copy made on
the API host (``--import PATH``) or by the API's builder (``--build``); ``image upload`` resumes an interrupted
upload from the server's ``uploaded_bytes``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from deckard.cli import session
from deckard.cli.output import print_done
from deckard.cli.session import JsonOpt, ProfileOpt
from deckard.cli.verbs import list_command, object_command, option
from deckard.client.api import ApiClient
from deckard.model.errors import DeckardError
from deckard.model.schemas import Image, Osf
from deckard.model.states import ImageState

IMAGE_COLUMNS = ("id", "osf", "version", "profile", "state", "tags", "size", "blocked", "created_at")
OSF_COLUMNS = ("id", "name", "memory_mib", "cpus", "driver", "keep_overlay", "network", "description")

ImageArg = Annotated[int, typer.Argument(help="Id of the disk image.")]
OsfArg = Annotated[str, typer.Argument(help="Name or id of the OSF.")]


def _upload(api: ApiClient, image_id: int, file: Path, quiet: bool) -> Image:
    if quiet:
        return api.upload_image(image_id, file)
    columns = (TextColumn("uploading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("upload", total=file.stat().st_size)
        row = api.upload_image(image_id, file, progress=lambda done, _total: bar.update(task, completed=done))
    return row


def _follow_build(api: ApiClient, image_id: int, quiet: bool) -> Image:
    row = api.get_image(image_id)
    with Progress(TextColumn("{task.description}"), BarColumn(), disable=quiet, transient=True) as bar:
        task = bar.add_task("building", total=100)
        while row.state == "building":
            message = row.status_message or ""
            pct, _, phase = message.partition("% ")
            if pct.isdigit():
                bar.update(task, completed=int(pct), description=phase or "building")
            time.sleep(1.0)
            row = api.get_image(image_id)
    return row


def _report(row: Image, as_json: bool) -> None:
    if row.state == ImageState.FAILED:
        session.report(DeckardError(f"image {row.id} failed: {row.status_message}", code="image_failed"))
        raise typer.Exit(session.ERROR_EXIT)
    print_done(f"image {row.id} ({row.version}) is {row.state}", row, as_json=as_json)


def add_image(
    version: Annotated[str, typer.Argument(help="Version of the new image (unique in its OSF).")],
    osf: Annotated[str | None, typer.Option("--osf", help="OSF name or id (default: the default OSF).")] = None,
    upload: Annotated[Path | None, typer.Option("--upload", help="Upload this local tarball.", exists=True)] = None,
    import_path: Annotated[
        str | None,
        typer.Option("--import", help="Copy this tarball from the farm's import directory (supertenant only)."),
    ] = None,
    build: Annotated[bool, typer.Option("--build", help="Build it with the API host's image builder.")] = False,
    build_profile: Annotated[
        str | None, typer.Option("--build-profile", help="With --build: minimal or standard (default).")
    ] = None,
    add_package: Annotated[
        list[str] | None, typer.Option("--add-package", help="With --build: one more Debian package (repeatable).")
    ] = None,
    build_format: Annotated[
        str | None,
        typer.Option(
            "--build-format", help="With --build: container (default) or vm (can also boot as a virtual machine)."
        ),
    ] = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Create a disk image and fill it (upload, import or build)."""
    if (build_profile or add_package or build_format) and not build:
        raise typer.BadParameter("--build-profile, --add-package and --build-format go with --build")
    if sum((upload is not None, import_path is not None, build)) > 1:
        raise typer.BadParameter("choose one of --upload, --import, --build")
    source = "import" if import_path else "build" if build else "upload"
    with session.api(profile) as api:
        row = api.create_image(
            version,
            osf=osf,
            source=source,
            path=import_path,
            build_profile=build_profile,
            add_packages=add_package,
            build_format=build_format,
        )
        if upload is not None:
            row = _upload(api, int(row.id or 0), upload, as_json)
        elif build:
            row = _follow_build(api, int(row.id or 0), as_json)
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
    n = len(row.expiring_desktops or [])
    moved = ", ".join(row.tags or [])
    print_done(f"image {image} published ({moved}); {n} running desktop(s) will expire", row, as_json=as_json)


TagArg = Annotated[str, typer.Argument(help="The tag.")]


def add_image_commands(group: typer.Typer) -> None:
    group.command("list")(
        list_command("images", Image, IMAGE_COLUMNS, "List disk images and the tags pointing at them.")
    )
    group.command("show")(
        object_command(ImageArg, lambda api, ref: api.get_image(ref), "Show one disk image (state, progress, tags).")
    )
    group.command("add")(add_image)
    group.command("upload")(upload_image)
    group.command("publish")(publish_image)
    tag = option("tag", TagArg)
    group.command("tag")(
        object_command(
            ImageArg,
            lambda api, ref, tag: api.tag_image(ref, tag),
            "Point a tag at an image (moving it from the OSF's other image).",
            "tag {tag!r} now points at image {ref}",
            [tag],
        )
    )
    group.command("untag")(
        object_command(
            ImageArg,
            lambda api, ref, tag: api.untag_image(ref, tag),
            "Remove a tag from an image.",
            "tag {tag!r} removed from image {ref}",
            [tag],
        )
    )
    for action, doc, done in (
        ("retire", "Retire an image (no tag may point at it).", "image {ref} is retired"),
        ("block", "Block an image: no desktop starts from it.", "image {ref} is blocked"),
        ("unblock", "Unblock an image.", "image {ref} is unblocked"),
    ):
        group.command(action)(object_command(ImageArg, _image_action(action), doc, done))
    group.command("delete")(
        object_command(
            ImageArg,
            lambda api, ref: api.delete_image(ref),
            "Delete an image and its file (refused while tagged or running).",
            "image {ref} deleted",
        )
    )


def _image_action(action: str) -> Callable[[ApiClient, int], Image]:
    return lambda api, ref: api.image_action(ref, action)


# ---- OSFs -----------------------------------------------------------------------------------------------
osf_app = typer.Typer(help="OSFs: operating system flavours (memory, CPUs, driver).", no_args_is_help=True)
MemOpt = Annotated[int | None, typer.Option("--memory", help="Memory in MiB.")]
CpusOpt = Annotated[float | None, typer.Option("--cpus")]
DriverOpt = Annotated[str | None, typer.Option("--driver", help="container, vm or fake.")]
KeepOpt = Annotated[bool | None, typer.Option("--keep-overlay/--discard-overlay")]
DescOpt = Annotated[str | None, typer.Option("--description", "-d")]
NetworkOpt = Annotated[
    str | None,
    typer.Option("--network", help='Network its new desktops are on (name or id; "" for the default network).'),
]


# the settings an OSF is made of, named as the API names them: add and update take the same ones
OSF_SETTINGS = [
    option("memory_mib", MemOpt),
    option("cpus", CpusOpt),
    option("driver", DriverOpt),
    option("keep_overlay", KeepOpt),
    option("description", DescOpt),
    option("network", NetworkOpt),
]


def _given(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if v is not None}


osf_app.command("list")(list_command("osfs", Osf, OSF_COLUMNS, "List OSFs (operating system flavours)."))
osf_app.command("show")(object_command(OsfArg, lambda api, ref: api.get_osf(ref), "Show one OSF."))
osf_app.command("add")(
    object_command(
        Annotated[str, typer.Argument(help="Name of the new OSF.")],
        lambda api, ref, tenant, **settings: api.create_osf(ref, **_given({**settings, "tenant": tenant})),
        "Create an OSF.",
        "OSF {name!r} created (id {id})",
        [*OSF_SETTINGS, option("tenant", Annotated[str | None, typer.Option("--tenant", help="Supertenant only.")])],
    )
)
osf_app.command("update")(
    object_command(
        OsfArg,
        lambda api, ref, **settings: api.update_osf(ref, **_given(settings)),
        "Change an OSF.",
        "OSF {name!r} updated",
        [option("name", Annotated[str | None, typer.Option("--name", help="New name.")]), *OSF_SETTINGS],
    )
)
osf_app.command("delete")(
    object_command(
        OsfArg,
        lambda api, ref: api.delete_osf(ref),
        "Delete an OSF (refused while desktops or images use it).",
        "OSF {ref!r} deleted",
    )
)
