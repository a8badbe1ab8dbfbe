"""Commands that run a farm's own processes: ``up``, ``down``, ``node``, ``api`` and ``image build``.

These are the only commands that touch the farm directory and database directly; everything an administrator
does afterwards goes through the API (``cli/admin.py``).  They choose which parts run in a process (the API, a
node daemon and its broker); how a process runs, stops, drains and restarts in place is ``runtime/process.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

from deckard.cli.storage import ensure_node_storage, storage_ready
from deckard.runtime.paths import DEFAULT_HOME, FarmPaths
from deckard.runtime.process import Parts, Shutdown, freeze_heap, pid_alive, run_process
from deckard.runtime.settings import Settings, load_settings

if TYPE_CHECKING:
    from deckard.db.engine import Database
    from deckard.images.profile import Profile

console = Console(stderr=True)
out = Console()

HomeOpt = Annotated[Path, typer.Option("--home", envvar="DECKARD_HOME", help="Farm directory (all its state).")]
ApiPortOpt = Annotated[int | None, typer.Option("--api-port", help="Admin API port (default 9443).")]
BrokerPortOpt = Annotated[int | None, typer.Option("--broker-port", help="Broker port (default 8443).")]
ListenOpt = Annotated[str | None, typer.Option("--listen", help="Address the API and broker listen on.")]
BridgeOpt = Annotated[str | None, typer.Option("--bridge", help="Bridge for desktops (default deckard0).")]
NetworkOpt = Annotated[str | None, typer.Option("--network", help="Desktop network (default 10.231.0.0/22).")]
DbOpt = Annotated[
    str | None,
    typer.Option(
        "--database", envvar="DECKARD_DATABASE_URL", help="Database URL (default: SQLite in the farm directory)."
    ),
]
NodeNameOpt = Annotated[str | None, typer.Option("--node-name", help="Name of this node (default hostname).")]
DriverOpt = Annotated[
    str | None,
    typer.Option("--driver", help="container (LXC), vm (QEMU), both (container,vm: the default with QEMU) or fake."),
]
RunDirOpt = Annotated[
    Path | None, typer.Option("--run-dir", help="This node's own run directory (several nodes on one machine).")
]
OverlayOpt = Annotated[
    str | None,
    typer.Option(
        "--overlay-address",
        help="A farm on several machines: this machine's own address; the desktop network spans the nodes (VXLAN).",
    ),
]
FencingOpt = Annotated[str | None, typer.Option("--fencing", help="Fencing agent for lost nodes: local or command.")]
FenceCmdOpt = Annotated[
    str | None, typer.Option("--fence-command", help="With --fencing command: HOOK run as `HOOK name address pid`.")
]
FenceAgentOpt = Annotated[
    str | None,
    typer.Option("--fence-agent", help="This node's own fence agent for the others (e.g. fence_ipmilan)."),
]
FenceOptionOpt = Annotated[
    list[str] | None, typer.Option("--fence-option", help="KEY=VALUE for --fence-agent (repeatable): ip=…, lanplus=1.")
]
FencePasswordOpt = Annotated[
    Path | None, typer.Option("--fence-password-file", help="File holding --fence-agent's password (never argv).")
]
LostAfterOpt = Annotated[
    float | None, typer.Option("--lost-after", help="Seconds without heartbeat before a node is fenced (10).")
]
FakeDelayOpt = Annotated[float | None, typer.Option("--fake-start-delay", help="Fake driver: simulated boot seconds.")]


def _settings(
    home: Path,
    api_port: int | None = None,
    broker_port: int | None = None,
    listen: str | None = None,
    bridge: str | None = None,
    network: str | None = None,
    database: str | None = None,
    node_name: str | None = None,
    driver: str | None = None,
    overlay_address: str | None = None,
    **node_extra: Any,
) -> Settings:
    node_values = {"name": node_name, "driver": driver, **node_extra}
    net = {"bridge": bridge, "range": network, "overlay_address": overlay_address}
    return load_settings(
        home,
        database_url=database,
        api={k: v for k, v in {"port": api_port, "host": listen}.items() if v is not None} or None,
        broker={k: v for k, v in {"port": broker_port, "host": listen}.items() if v is not None} or None,
        network={k: v for k, v in net.items() if v is not None} or None,
        node={k: v for k, v in node_values.items() if v is not None} or None,
    )


def _fail(message: str, code: int = 1) -> NoReturn:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _quiet_logs() -> None:
    """One-shot commands show progress bars and results, not the info lines of the layers below."""
    import logging

    from deckard.runtime.logging import setup_logging

    setup_logging("console", logging.WARNING)


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        _fail(f"{what} runs LXC containers and needs root: run it with sudo")


def _public_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


@asynccontextmanager
async def _farm_db(settings: Settings) -> AsyncIterator[Database]:
    """The farm's database, started (and migrated) for one command or process and closed after it."""
    from deckard.db.engine import Database

    db = Database(settings.db_url)
    await db.start()
    try:
        yield db
    finally:
        await db.close()


async def _bootstrap(settings: Settings) -> str | None:
    """Bring the farm's database up to date (tenants, roles, first administrator: its password the first time)."""
    from deckard.services.tenancy import bootstrap_farm

    async with _farm_db(settings) as db:
        return await bootstrap_farm(db)


async def _register_image(
    settings: Settings,
    path: Path,
    tags: tuple[str, ...] = ("default", "head"),
    profile: str = "",
    osf_id: int | None = None,
) -> dict[str, Any]:
    """Register an image file (version from its name, digest computed) in an OSF (default: the default OSF) and
    point ``tags`` at it there."""
    from deckard.runtime.paths import image_digest
    from deckard.services.images import register_image
    from deckard.services.tenancy import bootstrap_farm

    async with _farm_db(settings) as db:
        await bootstrap_farm(db)
        digest = await asyncio.to_thread(image_digest, path)
        return await register_image(
            db, path, version=path.name.split(".")[0], digest=digest, tags=tags, osf_id=osf_id, profile=profile
        )


async def _find_osf(settings: Settings, osf: str) -> int:
    """The id of the OSF ``name`` (the default tenant's) or ``name@tenant``, checked before a build starts."""
    from deckard.model.errors import NotFound
    from deckard.services.context import SYSTEM
    from deckard.services.tenancy import DEFAULT_TENANT, bootstrap_farm
    from deckard.services.tenant_lookup import find_osf_id

    async with _farm_db(settings) as db:
        await bootstrap_farm(db)
        try:
            async with db.begin() as conn:
                return await find_osf_id(conn, SYSTEM, osf if "@" in osf else f"{osf}@{DEFAULT_TENANT}")
        except NotFound as e:
            _fail(e.message, 2)


async def _unpack_image(settings: Settings, image: dict[str, Any]) -> None:
    """Unpack the image now, as the node would before its first desktop: ``up`` is ready when desktops are fast."""
    from deckard.drivers import load_driver

    if "container" not in settings.node.driver.split(",") or os.geteuid() != 0:
        return  # the node's image loop does it (a fake guest has nothing to unpack)
    driver = load_driver("container", settings.paths)
    with console.status("Unpacking the desktop image for its first desktop…"):
        await driver.prepare_image(int(image["id"]), Path(image["path"]))


# ---- image ---------------------------------------------------------------------------------------------
ProfileOpt = Annotated[
    str,
    typer.Option(
        "--profile",
        envvar="DECKARD_IMAGE_PROFILE",
        help="Image build profile: minimal (Xvnc, JWM, xterm) or standard (Xfce, Firefox ESR, applications).",
    ),
]


FormatOpt = Annotated[
    str,
    typer.Option(
        "--format",
        help="container, or vm: the same image that can also boot as a virtual machine (a kernel and busybox more).",
    ),
]


def _load_profile(
    name: str, profile_file: Path | None = None, add_packages: list[str] | None = None, image_format: str = "container"
) -> Profile:
    """The profile to build, checked before anything runs (an error names the bad key, package or file)."""
    from deckard.images.profile import load_profile, load_profile_file, with_packages, with_vm
    from deckard.model.errors import BadInput
    from deckard.model.vm_image import IMAGE_FORMATS, VM_FORMAT

    if image_format not in IMAGE_FORMATS:
        _fail(f"unknown image format {image_format!r}: choose {' or '.join(IMAGE_FORMATS)}", 2)
    try:
        profile = load_profile_file(profile_file) if profile_file is not None else load_profile(name)
        profile = with_packages(profile, add_packages or [])
        return with_vm(profile) if image_format == VM_FORMAT else profile
    except BadInput as e:
        _fail(e.message, 2)


async def _ensure_image(
    settings: Settings,
    *,
    cache: Path | None = None,
    profile: Profile | None = None,
    tags: tuple[str, ...] = ("default", "head"),
    unpack: bool = True,
    osf_id: int | None = None,
) -> dict[str, Any]:
    """Build the profile's image if it is missing (cached: a second run does not rebuild), register and tag it,
    and unpack it for the first desktop."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from deckard.images.builder import build_image
    from deckard.images.profile import DEFAULT_PROFILE, load_profile

    profile = profile or load_profile(DEFAULT_PROFILE)
    paths = settings.paths
    paths.make()
    cache_dir = cache or Path(os.environ.get("DECKARD_IMAGE_CACHE", paths.storage / "cache"))
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(f"Building the {profile.name} desktop image", total=1.0)

        def progress(text: str, fraction: float) -> None:
            bar.update(task, description=text[:60], completed=fraction)

        path = await build_image(paths.images, cache_dir=cache_dir, progress=progress, profile=profile)
        bar.update(task, completed=1.0, description=f"Desktop image ready ({profile.name})")
    image = await _register_image(settings, path, tags, profile=profile.name, osf_id=osf_id)
    if unpack:
        await _unpack_image(settings, image)
    return image


def image_build(
    home: HomeOpt = DEFAULT_HOME,
    profile: ProfileOpt = "",
    profile_file: Annotated[
        Path | None,
        typer.Option(
            "--profile-file", help="Build your own profile from this TOML file (docs/images.md).", exists=True
        ),
    ] = None,
    add_package: Annotated[
        list[str] | None, typer.Option("--add-package", help="Debian package to add to the profile (repeatable).")
    ] = None,
    image_format: FormatOpt = "container",
    osf: Annotated[
        str | None, typer.Option("--osf", help="OSF to register it in (NAME or NAME@TENANT; default: the default OSF).")
    ] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag to point at it (default: default, head).")] = None,
    cache: Annotated[Path | None, typer.Option(help="Cache of built root filesystems.")] = None,
    unpack: Annotated[bool, typer.Option(help="Unpack it now for the first desktop (else the node does).")] = True,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Build a desktop image from a profile (Debian + Xvnc + a desktop + the agent) and tag it (default, head)."""
    from deckard.images.profile import DEFAULT_PROFILE

    _need_root("image build")
    _quiet_logs()
    chosen = _load_profile(profile or DEFAULT_PROFILE, profile_file, add_package, image_format)
    tags = tuple(tag or ("default", "head"))
    settings = _settings(home)
    storage_ready(settings)
    settings.paths.make()
    osf_id = asyncio.run(_find_osf(settings, osf)) if osf is not None else None
    image = asyncio.run(_ensure_image(settings, cache=cache, profile=chosen, tags=tags, unpack=unpack, osf_id=osf_id))
    if as_json:
        out.print_json(json.dumps(image, default=str))
    else:
        where = f" in OSF {osf}" if osf else ""
        out.print(
            f"image {image['id']} ({image['version']}, profile {chosen.name}, {image_format}) at {image['path']}, "
            f"tagged {', '.join(tags)}{where}"
        )


def image_import(
    path: Path,
    home: HomeOpt = DEFAULT_HOME,
    tag: Annotated[list[str] | None, typer.Option("--tag")] = None,
    profile: Annotated[
        str | None, typer.Option("--profile", help="Profile it was built from (default: what the image says).")
    ] = None,
    unpack: Annotated[bool, typer.Option(help="Unpack it now for the first desktop (else the node does).")] = True,
    osf: Annotated[
        str | None, typer.Option("--osf", help="OSF to register it in (NAME or NAME@TENANT; default: the default OSF).")
    ] = None,
) -> None:
    """Register an existing image tarball (e.g. built elsewhere) and tag it (default: default, head)."""
    from deckard.images.builder import read_image_metadata
    from deckard.images.profile import validate_name
    from deckard.model.errors import BadInput

    if not path.is_file():
        _fail(f"{path} is not a file")
    if profile is None:  # an image built by Deckard says its profile in its last bytes; others stay unknown
        profile = str((read_image_metadata(path) or {}).get("profile", ""))
    try:
        profile = validate_name(profile) if profile else ""
    except BadInput as e:
        _fail(e.message, 2)
    settings = _settings(home)
    storage_ready(settings)
    settings.paths.make()
    _quiet_logs()

    async def register() -> dict[str, Any]:
        osf_id = await _find_osf(settings, osf) if osf is not None else None
        tags = tuple(tag or ("default", "head"))
        image = await _register_image(settings, path.resolve(), tags, profile or "", osf_id=osf_id)
        if unpack and osf is None:  # another OSF may run VMs: its node prepares the image for its driver
            await _unpack_image(settings, image)
        return image

    image = asyncio.run(register())
    shown = f", profile {profile}" if profile else ""
    out.print(f"image {image['id']} ({image['version']}{shown}) registered from {image['path']}")


# ---- running processes ---------------------------------------------------------------------------------
async def _close_logins() -> None:
    """Directory connections and single sign-on clients the logins kept open."""
    from deckard.services import password_plugins, sso

    password_plugins.close_plugins()
    await sso.close_clients()


async def _serve(
    settings: Settings, shutdown: Shutdown, *, with_api: bool, with_node: bool, ready_file: Path | None = None
) -> None:
    """The parts of this process: the API and/or a node daemon with its broker, over one database."""
    from deckard.api.app import create_app
    from deckard.api.server import serve_api
    from deckard.auth import local as local_auth
    from deckard.broker.server import Broker
    from deckard.drivers import load_driver
    from deckard.drivers.network import ensure_bridge
    from deckard.model.network import gateway_of, prefix_len
    from deckard.node.daemon import NodeDaemon
    from deckard.node.egress import Egress
    from deckard.runtime.metrics import serve_metrics
    from deckard.runtime.tls import ensure_server_cert, ensure_tls, server_context
    from deckard.services.tenancy import bootstrap_farm

    paths = settings.paths
    if with_node:
        await ensure_node_storage(settings)
    paths.make()
    _ca, cert, key = ensure_tls(paths.tls, key_type=settings.broker.tls_key)
    if with_node and settings.broker.host not in ("", "0.0.0.0", "::", "127.0.0.1", "localhost"):
        # a broker on an address of its own (a node on another machine): a certificate of its own that names it
        cert, key = ensure_server_cert(
            paths.tls, paths.node_run_dir / "tls", [settings.broker.host], settings.broker.tls_key
        )
    async with _farm_db(settings) as db, Parts(shutdown.stop) as parts:
        await bootstrap_farm(db)
        parts.on_stop(_close_logins)
        if with_api:
            app = create_app(db, settings)
            parts.run("api", serve_api(app, settings.api.host, settings.api.port, str(cert), str(key), shutdown.stop))
        if with_node:
            if not with_api and settings.node.metrics_port:  # no API in this process to serve /metrics
                serve_metrics(settings.node.metrics_port, settings.node.metrics_host)
            net = settings.network
            if settings.node.driver != "fake":  # fake desktops need no bridge (and no root)
                await ensure_bridge(net.bridge, f"{gateway_of(net.range)}/{prefix_len(net.range)}")
            driver = load_driver(
                settings.node.driver,
                paths,
                fake_start_delay=settings.node.fake_start_delay,
                vm_accel=settings.node.vm_accel,
            )
            node = NodeDaemon(
                db,
                settings,
                driver,
                broker_url=(f"https://{_public_host(settings.broker.host)}:{settings.broker.port}"),
                restart=shutdown.restart,
                egress=Egress(db, settings) if settings.node.driver != "fake" else None,
            )
            node_id = await node.register()
            broker = Broker(
                db,
                settings.broker,
                server_context(cert, key),
                node_id=node_id,
                poll=settings.node.poll_s,
                network=settings.network.range,
            )
            await broker.start(settings.broker.host, settings.broker.port)
            parts.on_stop(broker.close)
            parts.run("node", node.run(shutdown.stop))
            await parts.until(node.ready, 120)
        await db.prepare()  # the first connect after a restart compiles none of its path's statements built once
        await asyncio.to_thread(local_auth.warm)  # nor makes the decoy hash, nor faults in argon2's memory
        freeze_heap()
        if ready_file is not None:
            ready_file.write_text(str(os.getpid()))
        await parts.wait()


def _run_until_signal(settings: Settings, *, with_api: bool, with_node: bool, ready_file: Path | None = None) -> None:
    from deckard.runtime.logging import setup_logging

    setup_logging(settings.log_format)

    async def main(shutdown: Shutdown) -> None:
        await _serve(settings, shutdown, with_api=with_api, with_node=with_node, ready_file=ready_file)

    # a node restarts in place (SIGHUP, `deckard node restart`) keeping its desktops: the same command runs again
    restart_argv = [sys.executable, "-m", "deckard.cli.main", *sys.argv[1:]] if with_node else None
    run_process(main, restart_argv=restart_argv)


def node_cmd(
    ctx: typer.Context,
    home: HomeOpt = DEFAULT_HOME,
    broker_port: BrokerPortOpt = None,
    listen: ListenOpt = None,
    bridge: BridgeOpt = None,
    network: NetworkOpt = None,
    database: DbOpt = None,
    node_name: NodeNameOpt = None,
    driver: DriverOpt = None,
    run_dir: RunDirOpt = None,
    fencing: FencingOpt = None,
    fence_command: FenceCmdOpt = None,
    fence_agent: FenceAgentOpt = None,
    fence_option: FenceOptionOpt = None,
    fence_password_file: FencePasswordOpt = None,
    lost_after: LostAfterOpt = None,
    fake_start_delay: FakeDelayOpt = None,
    overlay_address: OverlayOpt = None,
) -> None:
    """Run a node daemon (QVD's HKD) with its broker (L7R) in the foreground; `node list` lists nodes."""
    if ctx.invoked_subcommand is not None:
        return
    settings = _settings(
        home,
        None,
        broker_port,
        listen,
        bridge,
        network,
        database,
        node_name,
        driver,
        overlay_address,
        run_dir=run_dir,
        fencing=fencing,
        fence_command=fence_command,
        fence_agent=fence_agent,
        fence_options=_fence_options(fence_option),
        fence_password_file=fence_password_file,
        lost_after_s=lost_after,
        fake_start_delay=fake_start_delay,
    )
    if settings.node.driver != "fake":
        _need_root("deckard node")
    _check_own_fence(settings)
    _run_until_signal(settings, with_api=False, with_node=True)


def _check_own_fence(settings: Settings) -> None:
    """A node's fence agent (flags or settings) is checked before the node starts: a typo fails here, not later."""
    from deckard.model.errors import BadInput
    from deckard.node.fencing import own_fence

    try:
        own_fence(settings.node)
    except BadInput as e:
        _fail(e.message, 2)


def _fence_options(pairs: list[str] | None) -> dict[str, str] | None:
    from deckard.model.errors import BadInput
    from deckard.model.fence import parse_options

    try:
        return parse_options(pairs) if pairs else None
    except BadInput as e:
        _fail(e.message, 2)


def api_cmd(
    home: HomeOpt = DEFAULT_HOME,
    api_port: ApiPortOpt = None,
    listen: ListenOpt = None,
    network: NetworkOpt = None,
    database: DbOpt = None,
) -> None:
    """Run the admin API in the foreground."""
    _run_until_signal(_settings(home, api_port, None, listen, None, network, database), with_api=True, with_node=False)


def _pid_file(paths: FarmPaths) -> Path:
    return paths.run / "deckard-up.pid"


def _running_pid(paths: FarmPaths) -> int | None:
    """The pid of this farm's background process, if it is alive (not a zombie, and really ours)."""
    try:
        pid = int(_pid_file(paths).read_text())
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    if stat.rsplit(")", 1)[1].split()[0] == "Z" or b"deckard" not in cmdline:
        return None
    return pid


def _first_run_profile(settings: Settings) -> Path:
    """Make an API token for the bootstrap admin and write the CLI profile so `deckard user add` just works."""
    from deckard.client.profile import Profile, save_profile
    from deckard.services.admins import create_api_token

    async def token() -> str:
        async with _farm_db(settings) as db:
            return await create_api_token(db, "admin", "cli on " + os.uname().nodename)

    paths = settings.paths
    ca = paths.tls / "ca.pem"
    url = f"https://{_public_host(settings.api.host)}:{settings.api.port}"
    profile = Profile(url=url, token=asyncio.run(token()), ca=ca)
    save_profile(paths.home / "profile.json", profile)
    user_profile = Path(os.environ.get("DECKARD_PROFILE") or Path.home() / ".config/deckard/profile.json")
    save_profile(user_profile, profile)
    shutil.copyfile(ca, user_profile.parent / "ca.pem")
    return user_profile


def up(
    home: HomeOpt = DEFAULT_HOME,
    api_port: ApiPortOpt = None,
    broker_port: BrokerPortOpt = None,
    listen: ListenOpt = None,
    bridge: BridgeOpt = None,
    network: NetworkOpt = None,
    node_name: NodeNameOpt = None,
    driver: DriverOpt = None,
    database: DbOpt = None,
    foreground: Annotated[bool, typer.Option("--foreground", help="Stay attached (Ctrl-C stops).")] = False,
    no_image: Annotated[bool, typer.Option("--no-image", help="Do not build the default image.")] = False,
    profile: ProfileOpt = "",
    nodes: Annotated[
        int, typer.Option("--nodes", min=1, help="Demo farm: start this many nodes (extra ones as `deckard node`).")
    ] = 1,
    machines: Annotated[
        int,
        typer.Option(
            "--machines",
            min=0,
            max=50,
            help="Demo farm across machines: this many network namespaces on this box, one node in each, the "
            "desktop network spanning them; this machine keeps the API, the database and the storage.",
        ),
    ] = 0,
) -> None:
    """Run the all-in-one farm: API + node + broker, SQLite (or --database), the default image and an administrator."""
    from deckard.runtime.tls import ensure_tls

    if machines and nodes > 1:
        _fail("--machines and --nodes do not mix: each machine runs one node")

    settings = _settings(home, api_port, broker_port, listen, bridge, network, database, node_name, driver)
    if settings.node.driver != "fake":
        _need_root("deckard up")
    _quiet_logs()
    paths = settings.paths
    storage_ready(settings)
    paths.make()
    pid = _running_pid(paths)
    if pid is not None and not foreground:
        _print_addresses(settings, note=f"already running (pid {pid}); stop it with `deckard down`")
        return
    ensure_tls(paths.tls, key_type=settings.broker.tls_key)
    password = asyncio.run(_bootstrap(settings))
    if not no_image:
        from deckard.images.profile import DEFAULT_PROFILE

        asyncio.run(_ensure_image(settings, profile=_load_profile(profile or DEFAULT_PROFILE)))
    if password is not None:
        profile_path = _first_run_profile(settings)
        out.print(
            "\n[bold]Administrator[/bold] (shown once, keep it): "
            f"name [bold]admin[/bold]  password [bold]{password}[/bold]"
        )
        out.print(f"CLI profile written to {profile_path}: `deckard user add …` works on this machine.")
    ready = paths.run / "ready"
    if foreground:
        _pid_file(paths).write_text(str(os.getpid()))
        _print_addresses(settings, note="running in the foreground; Ctrl-C stops it")
        _run_until_signal(settings, with_api=True, with_node=not machines, ready_file=ready)
        return
    log_path = paths.logs / "deckard.log"
    ready.unlink(missing_ok=True)
    # the background process is this command in the foreground, detached (the image is already there)
    args = [sys.executable, "-m", "deckard.cli.main", "up", "--foreground", "--no-image", "--home", str(home)]
    for opt, val in (
        ("--api-port", api_port),
        ("--broker-port", broker_port),
        ("--listen", listen),
        ("--bridge", bridge),
        ("--network", network),
        ("--node-name", node_name),
        ("--driver", driver),
        ("--database", database),
        ("--machines", machines or None),
    ):
        if val is not None:
            args += [opt, str(val)]
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(args, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True)
    _pid_file(paths).write_text(str(proc.pid))
    deadline = time.monotonic() + 120
    with console.status("Starting the farm (API, node, broker)…"):
        while not ready.exists():
            if proc.poll() is not None:
                _pid_file(paths).unlink(missing_ok=True)
                tail = log_path.read_text(errors="replace").splitlines()[-15:]
                _fail("the farm did not start:\n" + "\n".join(tail) + f"\n(full log: {log_path})")
            if time.monotonic() > deadline:
                _fail(f"the farm did not become ready within 120 s; see {log_path}")
            time.sleep(0.1)
    for i in range(2, nodes + 1):
        _start_extra_node(settings, home, i, driver)
    if machines:
        _start_machines(settings, home, machines, driver)
    _print_addresses(
        settings, note=f"running in the background (pid {proc.pid}, log {log_path}); stop it with `deckard down`"
    )


def _extra_node_pids(paths: FarmPaths) -> list[Path]:
    return sorted((paths.run / "nodes").glob("*.pid")) if (paths.run / "nodes").is_dir() else []


def _start_extra_node(settings: Settings, home: Path, index: int, driver: str | None) -> None:
    """A demo farm's node number ``index``: own name, run directory and broker port, same database."""
    paths = settings.paths
    run_dir = paths.demo_node(index).node_run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"{settings.node.name}-{index}"
    args = [sys.executable, "-m", "deckard.cli.main", "node", "--home", str(home), "--node-name", name]
    args += ["--run-dir", str(run_dir), "--broker-port", str(settings.broker.port + index - 1)]
    args += ["--bridge", settings.network.bridge, "--network", settings.network.range]
    if driver is not None:
        args += ["--driver", driver]
    if settings.database_url:
        args += ["--database", settings.database_url]
    with open(paths.logs / f"{name}.log", "ab") as logf:
        proc = subprocess.Popen(args, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True)
    paths.demo_node_pid(index).write_text(str(proc.pid))
    out.print(f"node {name} started (pid {proc.pid}, broker port {settings.broker.port + index - 1})")


def _start_machines(settings: Settings, home: Path, count: int, driver: str | None) -> None:
    """``deckard up --machines N``: N machines (runtime/machines.py), node ``<name>-m<i>`` in machine *i*, its broker
    on the machine's address, its bridge on the farm's VXLAN segment; a lost node is fenced by powering its machine
    off (unless another fencing agent is configured)."""
    from deckard.runtime.bmc import BASE_PORT, bmc_available, start_bmc
    from deckard.runtime.machines import Machines, fence_hook_script

    paths = settings.paths
    with console.status(f"Making {count} machines…"):
        farm = Machines(count).start()
    paths.machines_file.write_text(f"{farm.tag} {count}\n")
    fence = []
    if settings.node.fencing == "local":  # a node cannot kill another machine's guests: the demo's power switch can
        hook = paths.run / "machines-fence"
        hook.write_text(fence_hook_script(sys.executable))
        hook.chmod(0o755)
        fence = ["--fencing", "command", "--fence-command", str(hook)]
    with_bmc = bmc_available()  # each machine's own fence agent: IPMI to its simulated BMC (runtime/bmc.py)
    for i, machine in enumerate(farm.machines, start=1):
        if with_bmc:
            bmc = start_bmc(paths.machines_bmc / f"m{i}", f"m{i}", farm.host_address, BASE_PORT + i, machine.address)
            fence_i = [*fence, *bmc.fence_args()]
        else:
            fence_i = fence
        name = f"{settings.node.name}-m{i}"
        run_dir = paths.demo_node(i).node_run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "deckard.cli.main", "node", "--home", str(home), "--node-name", name]
        args += ["--run-dir", str(run_dir), "--broker-port", str(settings.broker.port), "--listen", machine.address]
        args += ["--bridge", settings.network.bridge, "--network", settings.network.range]
        args += ["--overlay-address", machine.address, *fence_i]
        if driver is not None:
            args += ["--driver", driver]
        if settings.database_url:
            args += ["--database", settings.database_url]
        with open(paths.logs / f"{name}.log", "ab") as logf:
            proc = subprocess.Popen(
                machine.command(*args), stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True
            )
        paths.demo_node_pid(i).write_text(str(proc.pid))
        bmc_text = f", BMC {farm.host_address}:{BASE_PORT + i} (IPMI)" if with_bmc else ""
        out.print(
            f"machine {i} ({machine.address}): node {name}, broker https://{machine.address}:{settings.broker.port}"
            + bmc_text
        )


def _stop_machines(paths: FarmPaths) -> None:
    from deckard.runtime.bmc import stop_bmcs
    from deckard.runtime.machines import Machines

    stop_bmcs(paths.machines_bmc)
    if paths.machines_file.exists():
        tag, count = paths.machines_file.read_text().split()
        Machines.existing(tag, int(count)).close()
        paths.machines_file.unlink()


def _print_addresses(settings: Settings, note: str) -> None:
    host = _public_host(settings.broker.host)
    out.print(f"\n[bold green]Deckard farm[/bold green] at {settings.home}: {note}")
    out.print(
        f"  broker (users)   https://{host}:{settings.broker.port}   "
        f"e.g. deckard connect --server {host}:{settings.broker.port} --user NAME"
    )
    out.print(f"  admin API        https://{_public_host(settings.api.host)}:{settings.api.port}/api/v1/docs")
    out.print(f"  farm CA          {settings.paths.tls / 'ca.pem'}")


def down(
    home: HomeOpt = DEFAULT_HOME, timeout: Annotated[float, typer.Option(help="Seconds to wait before killing.")] = 60
) -> None:
    """Stop the all-in-one farm started by `deckard up` (its desktops are stopped)."""
    paths = FarmPaths(home)
    extra = []
    for pid_path in _extra_node_pids(paths):  # demo farm nodes first: they stop their own desktops
        with contextlib.suppress(ValueError, ProcessLookupError):
            extra.append(int(pid_path.read_text()))
            os.kill(extra[-1], signal.SIGTERM)
        pid_path.unlink(missing_ok=True)
    if paths.machines_file.exists():  # their machines go once their nodes have stopped
        deadline = time.monotonic() + timeout
        while any(pid_alive(p) for p in extra) and time.monotonic() < deadline:
            time.sleep(0.2)
        _stop_machines(paths)
    pid = _running_pid(paths)
    if pid is None:
        out.print("the farm is not running")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    with console.status("Stopping desktops and the farm…"):
        while _running_pid(paths) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
    if _running_pid(paths) is not None:
        os.killpg(pid, signal.SIGKILL)
    _pid_file(paths).unlink(missing_ok=True)
    (paths.run / "ready").unlink(missing_ok=True)
    out.print("the farm is stopped")


def register(app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("down")(down)
    node = typer.Typer(help="Run a node daemon (without a sub-command), or list the farm's nodes.")
    node.callback(invoke_without_command=True)(node_cmd)
    app.add_typer(node, name="node")
    app.command("api")(api_cmd)
    image = typer.Typer(help="Disk images (QVD's DIs).", no_args_is_help=True)
    image.command("build")(image_build)
    image.command("import")(image_import)
    app.add_typer(image, name="image")
