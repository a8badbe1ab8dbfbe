"""``deckard storage``: a farm's shared storage root on GlusterFS, set up on the machines themselves.

Like ``up`` and ``node`` these run on the farm's machines (as root), not through the API: they make the storage
that the farm's processes stand on.  ``storage gluster create`` runs on one storage machine and makes the
replica-3 volume; ``storage gluster mount`` runs on every node and mounts it as ``<home>/storage`` (or set
``storage.gluster_servers`` and ``deckard node`` mounts it before it starts); ``storage check`` says what the
storage root can hold.  The work is in ``drivers/gluster.py`` and ``drivers/storage_check.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from deckard.cli.output import print_json, print_rows
from deckard.cli.session import report
from deckard.model.errors import DeckardError
from deckard.runtime.paths import DEFAULT_HOME
from deckard.runtime.settings import Settings, load_settings

app = typer.Typer(
    help="The farm's shared storage root (a local directory, or a GlusterFS volume).", no_args_is_help=True
)
gluster = typer.Typer(help="GlusterFS: a replica-3 volume on three storage machines.", no_args_is_help=True)
app.add_typer(gluster, name="gluster")

HomeOpt = Annotated[Path, typer.Option("--home", envvar="DECKARD_HOME", help="Farm directory (all its state).")]
VolumeOpt = Annotated[str, typer.Option("--volume", help="GlusterFS volume name.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
ERROR_EXIT = 1


def _quiet_logs() -> None:
    """Results and errors on the terminal, not the info lines of the layers below (a JSON answer stays JSON)."""
    import logging

    from deckard.runtime.logging import setup_logging

    setup_logging("console", logging.WARNING)


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        report(DeckardError(f"{what} mounts filesystems and needs root: run it with sudo", code="need_root"))
        raise typer.Exit(ERROR_EXIT)


@gluster.command("create")
def gluster_create(
    brick: Annotated[
        list[str],
        typer.Option("--brick", help="HOST:/path of a brick, one per storage machine (three, or sets of three)."),
    ],
    volume: VolumeOpt = "deckard",
    force: Annotated[
        bool, typer.Option("--force", help="Accept bricks on a machine's root filesystem (tests and demos).")
    ] = False,
    allow: Annotated[
        str,
        typer.Option(
            "--allow",
            help="Addresses that may mount the volume: the nodes (comma-separated, wildcards like 10.0.1.*; "
            "GlusterFS's auth.allow). Default: any address that reaches the storage machines.",
        ),
    ] = "",
    as_json: JsonOpt = False,
) -> None:
    """Create and start a replica-3 volume from bricks on three storage machines (run on one of them)."""
    from deckard.drivers.gluster import Brick, GlusterCli, glusterd_ping_warning

    _quiet_logs()
    try:
        bricks = [Brick.parse(b) for b in brick]
        options = {"auth.allow": allow} if allow else None
        result = asyncio.run(GlusterCli().create_volume(volume, bricks, force=force, options=options))
    except DeckardError as e:
        report(e)
        raise typer.Exit(ERROR_EXIT) from None
    if as_json:
        print_json(asdict(result))
        return
    verb = "created and started" if result.created else "already existed; options set and started"
    typer.echo(f"volume {result.name} (replica 3: {', '.join(result.bricks)}) {verb} in {result.seconds} s")
    if not allow:
        typer.echo("note: any address that reaches the storage machines may mount it; --allow NODES restricts that")
    warning = glusterd_ping_warning()
    if warning:
        typer.echo(f"note: {warning}")
    hosts = ",".join(dict.fromkeys(b.host for b in bricks))
    typer.echo(f"on every node: deckard storage gluster mount --server {hosts} --volume {result.name}")


@gluster.command("status")
def gluster_status(volume: VolumeOpt = "deckard", as_json: JsonOpt = False) -> None:
    """Can the volume lose a storage machine now? Bricks up, entries to heal, nodes connected to every brick
    (run on a storage machine; exit 1 when it cannot)."""
    from deckard.drivers.gluster import GlusterCli

    _quiet_logs()
    try:
        health = asyncio.run(GlusterCli().health(volume))
    except DeckardError as e:
        report(e)
        raise typer.Exit(ERROR_EXIT) from None
    if as_json:
        print_json({**asdict(health), "redundant": health.redundant})
    else:
        rows = [
            {"brick": brick, "online": up, "nodes": f"{len(health.nodes_reached[brick])}/{len(health.nodes)}"}
            for brick, up in health.online.items()
        ]
        print_rows(rows, ["brick", "online", "nodes"], as_json=False)
        pending = "a brick does not answer" if health.heal_pending < 0 else str(health.heal_pending)
        typer.echo(f"entries to heal: {pending}")
        typer.echo(f"can lose a storage machine now: {'yes' if health.redundant else 'no'}")
    if not health.redundant:
        raise typer.Exit(ERROR_EXIT)


@gluster.command("mount")
def gluster_mount(
    server: Annotated[
        str, typer.Option("--server", help="Storage machines HOST[,HOST…]: the first is asked first, then the others.")
    ],
    volume: VolumeOpt = "deckard",
    home: HomeOpt = DEFAULT_HOME,
) -> None:
    """Mount the volume as this node's storage root (<home>/storage) over GlusterFS's FUSE client."""
    from deckard.drivers.gluster import mount_volume

    _need_root("storage gluster mount")
    _quiet_logs()
    settings = load_settings(home, storage={"gluster_servers": server.split(","), "gluster_volume": volume})
    paths = settings.paths
    try:
        mounted = asyncio.run(
            mount_volume(settings.storage.gluster_servers, volume, paths.storage, log_file=paths.logs / "gluster.log")
        )
    except DeckardError as e:
        report(e)
        raise typer.Exit(ERROR_EXIT) from None
    paths.make()
    typer.echo(f"volume {volume} {'mounted' if mounted else 'was already mounted'} at {paths.storage}")
    typer.echo(
        "desktops' root layers (unpacked images, overlays) stay on each machine's disk: run nodes with "
        f"DECKARD_STORAGE__GLUSTER_SERVERS='{json.dumps(settings.storage.gluster_servers)}' (they mount it "
        "themselves) "
        "or DECKARD_STORAGE__LOCAL_LAYERS=1"
    )


@app.command("check")
def storage_check(home: HomeOpt = DEFAULT_HOME, as_json: JsonOpt = False) -> None:
    """Probe what the storage root can hold: files, locks, image layers, container overlays (root: a real mount)."""
    from deckard.drivers.storage_check import check_storage

    paths = load_settings(home).paths
    checks = check_storage(paths)
    rows = [{**asdict(c), "path": str(c.path)} for c in checks]
    if as_json:
        print_json(rows)
    else:
        print_rows(rows, ["part", "fs", "ok", "path", "note"], as_json=False)
    if not all(c.ok for c in checks):
        raise typer.Exit(ERROR_EXIT)


# ---- for the farm's own processes (cli/farm.py) ------------------------------------------------------------
async def mount_storage(settings: Settings) -> None:
    """The GlusterFS volume mounted as the storage root when configured (``storage.gluster_servers``), before
    anything writes there (files in a local directory would hide under the mount, or make it refuse)."""
    from deckard.drivers.gluster import mount_volume

    if settings.storage.gluster_servers:
        paths = settings.paths
        await mount_volume(
            settings.storage.gluster_servers,
            settings.storage.gluster_volume,
            paths.storage,
            log_file=paths.logs / "gluster.log",
        )


def storage_ready(settings: Settings) -> None:
    """For the one-shot commands that write to the storage root (``up``, ``image build``): mount it first."""
    try:
        asyncio.run(mount_storage(settings))
    except DeckardError as e:
        report(e)
        raise typer.Exit(ERROR_EXIT) from None


async def ensure_node_storage(settings: Settings) -> None:
    """A node's storage root before it starts: the volume mounted, and a directory for the container desktops'
    writable layers that overlayfs can use (``storage_overlay_unsupported`` otherwise)."""
    from deckard.drivers.storage_check import require_overlay_upper

    await mount_storage(settings)
    if "container" in settings.node.driver.split(","):
        require_overlay_upper(settings.paths)
