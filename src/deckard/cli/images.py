"""``deckard image list`` and ``deckard osf list``: disk images (QVD's DIs) with their tags, and OSFs
(operating system flavours: memory, CPUs, driver, overlay policy).  Building images is ``cli/farm.py``'s."""

from __future__ import annotations

import typer

from deckard.cli import session
from deckard.cli.output import print_rows
from deckard.cli.session import JsonOpt, ProfileOpt

IMAGE_COLUMNS = ("id", "osf", "version", "state", "tags", "size", "blocked", "created_at")
OSF_COLUMNS = ("id", "name", "memory_mib", "cpus", "driver", "keep_overlay", "description")


def list_images(as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """List disk images and the tags pointing at them."""
    with session.api(profile) as api:
        rows = api.list_images()
    print_rows(rows, IMAGE_COLUMNS, as_json=as_json)


def list_osfs(as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """List OSFs (operating system flavours)."""
    with session.api(profile) as api:
        rows = api.list_osfs()
    print_rows(rows, OSF_COLUMNS, as_json=as_json)


osf_app = typer.Typer(help="OSFs: operating system flavours (memory, CPUs, driver).", no_args_is_help=True)
osf_app.command("list")(list_osfs)


def add_image_commands(group: typer.Typer) -> None:
    group.command("list")(list_images)
