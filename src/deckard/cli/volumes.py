"""``deckard volume ...``: block volumes of a tenant (``docs/volumes.md``): add, list, show, resize, delete,
snapshot, snapshots, clone, attach, detach — the same nouns as the API's ``/volumes``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from deckard.cli.output import print_rows
from deckard.cli.session import JsonOpt, ProfileOpt
from deckard.cli.verbs import fetch_and_print, list_command, object_command, option
from deckard.model.schemas import Page, Volume, VolumeSnapshot

app = typer.Typer(
    help="Volumes: block disks attached to desktops (hot-plugged into running VMs).", no_args_is_help=True
)

COLUMNS = ("id", "name", "size_gib", "state", "attached", "description")
VolumeArg = Annotated[str, typer.Argument(help="Name or id of the volume.")]
NameArg = Annotated[str, typer.Argument(help="Name of the new volume.")]
SizeOpt = Annotated[int, typer.Option("--size", "-s", help="Size in GiB.")]
DescOpt = Annotated[str, typer.Option("--description", "-d")]
DesktopOpt = Annotated[str, typer.Option("--desktop", help="Name or id of the desktop.")]
ReadOnlyOpt = Annotated[bool, typer.Option("--read-only/--read-write", help="Attach read-only (several desktops).")]
SnapshotOpt = Annotated[str, typer.Option("--snapshot", help="Name of the snapshot.")]


def attached(vol: Volume) -> str:
    """``web1, web2 (ro)``; ``+``/``-`` mark what the desktop's node has still to plug or unplug."""
    marks = {"attach": "+", "detach": "-", "failed": "!"}
    return ", ".join(
        f"{marks.get(x.pending or '', '')}{x.desktop}{' (ro)' if x.read_only else ''}" for x in vol.attachments
    )


def _row(vol: Volume) -> dict[str, Any]:
    return {**vol.dump(), "attached": attached(vol)}


def _done(verb: str) -> Any:
    def message(vol: Volume) -> str:
        where = f"; attached to {attached(vol)}" if vol.attachments else ""
        return f"volume {vol.name!r} (id {vol.id}, {vol.size_gib} GiB) {verb}{where}"

    return message


app.command("list")(list_command("volumes", Volume, COLUMNS, "List volumes.", table_row=_row))
app.command("show")(object_command(VolumeArg, lambda api, ref: api.get_volume(ref), "Show one volume."))
app.command("add")(
    object_command(
        NameArg,
        lambda api, ref, size, description, tenant: api.create_volume(
            ref, size, description=description, tenant=tenant
        ),
        "Create an empty volume (its guest formats it).",
        _done("created"),
        [
            option("size", SizeOpt, ...),
            option("description", DescOpt, ""),
            option("tenant", Annotated[str | None, typer.Option("--tenant", help="Supertenant only.")]),
        ],
    )
)
app.command("resize")(
    object_command(
        VolumeArg,
        lambda api, ref, size: api.update_volume(ref, size_gib=size),
        "Grow a volume (never smaller; not while a running desktop has it).",
        _done("resized"),
        [option("size", SizeOpt, ...)],
    )
)
app.command("delete")(
    object_command(
        VolumeArg,
        lambda api, ref: api.delete_volume(ref),
        "Delete a volume and its snapshots (refused while attached).",
        "volume {ref!r} deleted",
    )
)
app.command("snapshot")(
    object_command(
        VolumeArg,
        lambda api, ref, name: api.snapshot_volume(ref, name),
        "Snapshot a volume (refused while a running desktop writes it).",
        "snapshot {name!r} of volume {ref!r} taken",
        [option("name", Annotated[str, typer.Option("--name", "-n", help="Name of the snapshot.")], ...)],
    )
)


@app.command("snapshots")
def snapshots(
    volume: VolumeArg,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """List a volume's snapshots."""

    def render(page: Page[VolumeSnapshot]) -> None:
        print_rows(page.items, ("id", "name", "size_gib", "created_at"), as_json=False)

    fetch_and_print(
        profile,
        as_json,
        lambda api: Page[VolumeSnapshot](items=(items := api.list_volume_snapshots(volume)), total=len(items)),
        render,
    )


app.command("delete-snapshot")(
    object_command(
        VolumeArg,
        lambda api, ref, snapshot: api.delete_volume_snapshot(ref, snapshot),
        "Delete a snapshot of a volume.",
        "snapshot of volume {ref!r} deleted",
        [option("snapshot", SnapshotOpt, ...)],
    )
)
app.command("clone")(
    object_command(
        NameArg,
        lambda api, ref, source, snapshot, description: api.clone_volume(
            ref, source, snapshot, description=description
        ),
        "Create a volume with the content of another volume's snapshot.",
        _done("cloned"),
        [
            option("source", Annotated[str, typer.Option("--from", help="The source volume (name or id).")], ...),
            option("snapshot", SnapshotOpt, ...),
            option("description", DescOpt, ""),
        ],
    )
)
app.command("attach")(
    object_command(
        VolumeArg,
        lambda api, ref, desktop, read_only: api.attach_volume(ref, desktop, read_only=read_only),
        "Attach a volume to a desktop (a running VM gets it at once; others at their next start).",
        _done("attached"),
        [option("desktop", DesktopOpt, ...), option("read_only", ReadOnlyOpt, False)],
    )
)
app.command("detach")(
    object_command(
        VolumeArg,
        lambda api, ref, desktop: api.detach_volume(ref, desktop),
        "Detach a volume from a desktop (refused while its running guest has it mounted).",
        _done("detached"),
        [option("desktop", DesktopOpt, ...)],
    )
)
