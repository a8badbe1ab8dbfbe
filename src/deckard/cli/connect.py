"""``deckard connect`` and ``deckard desktops``: the user's command-line client (QVD's qvd-client).

``connect`` logs in to a broker, starts the desktop (showing the broker's progress lines) and serves it on a
local port, so that any VNC viewer can open it; it launches ``vncviewer`` when one is installed and a display
is available.  The first tunnel is opened eagerly, so the desktop is started while the user is still looking
at the terminal, and handed to the first viewer that connects; each later viewer connection gets a fresh
tunnel (which takes the display over, as a new login does in QVD).

The farm CA is always verified: there is no "insecure" mode.  It is looked for in ``--ca``, ``$DECKARD_CA``,
``~/.config/deckard/ca.pem`` and ``/var/lib/deckard/tls/ca.pem``, in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import getpass
import json
import os
import shutil
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from deckard.client.broker import BrokerConnection, list_desktops, resolve_desktop, split_server
from deckard.model.errors import DeckardError
from deckard.runtime.process import run

T = TypeVar("T")

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

DEFAULT_LISTEN = "127.0.0.1:5950"
SYSTEM_CA = Path("/var/lib/deckard/tls/ca.pem")
RELAY_CHUNK = 256 * 1024


class ConnectError(Exception):
    """A problem with the command line or the local machine, reported as one line."""


def find_ca(ca: Path | None) -> Path:
    """The farm CA to verify the broker with; a clear error says where to get it."""
    candidates: list[Path] = []
    if ca is not None:
        if not ca.is_file():
            raise ConnectError(f"the CA file {ca} does not exist")
        return ca
    if os.environ.get("DECKARD_CA"):
        env_ca = Path(os.environ["DECKARD_CA"]).expanduser()
        if not env_ca.is_file():
            raise ConnectError(f"DECKARD_CA points at {env_ca}, which does not exist")
        return env_ca
    candidates = [Path.home() / ".config/deckard/ca.pem", SYSTEM_CA]
    for path in candidates:
        if path.is_file():
            return path
    raise ConnectError(
        "no farm CA found (looked in --ca, $DECKARD_CA, ~/.config/deckard/ca.pem and "
        f"{SYSTEM_CA}): ask your administrator for the farm's ca.pem (on a node it is {SYSTEM_CA}) "
        "and pass it with --ca"
    )


def read_password(user: str, server: str) -> str:
    password = os.environ.get("DECKARD_PASSWORD")
    if password is None:
        password = getpass.getpass(f"Password for {user} at {server}: ")
    return password


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConnectError(f"--listen {listen!r} must be HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]"), int(port)


def _progress(message: str) -> None:
    console.print(f"  [dim]…[/dim] {message}")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(RELAY_CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


class LocalDesktop:
    """Serves one desktop on a local port: each viewer connection is relayed through its own tunnel."""

    def __init__(self, server: str, user: str, password: str, ca: Path, desktop_id: int) -> None:
        self.server = server
        self.user = user
        self.password = password
        self.ca = ca
        self.desktop_id = desktop_id
        self.ready: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def open_tunnel(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        conn = await BrokerConnection.open(self.server, self.ca)
        try:
            return await conn.connect(self.user, self.password, self.desktop_id, on_progress=_progress)
        except BaseException:
            await conn.close()
            raise

    async def handle_viewer(self, local_r: asyncio.StreamReader, local_w: asyncio.StreamWriter) -> None:
        tunnel, self.ready = self.ready, None
        try:
            if tunnel is None:
                console.print("A viewer connected: opening a new tunnel (it takes the display over)")
                tunnel = await self.open_tunnel()
        except (DeckardError, OSError) as e:
            err_console.print(f"[red]Cannot open the desktop:[/red] {getattr(e, 'message', e)}")
            local_w.close()
            return
        remote_r, remote_w = tunnel
        await asyncio.gather(_pipe(local_r, remote_w), _pipe(remote_r, local_w))
        console.print("Viewer disconnected")


async def _connect(
    server: str, user: str, password: str, ca: Path, desktop: str | None, listen: str, viewer: bool
) -> int:
    host, port = parse_listen(listen)
    conn = await BrokerConnection.open(server, ca)
    try:
        chosen = resolve_desktop(await conn.list_desktops(user, password), desktop)
    except BaseException:
        await conn.close()
        raise
    local = LocalDesktop(server, user, password, ca, int(chosen["id"]))
    try:
        # bind now to fail fast on a busy port; viewers are accepted only once the desktop is ready, so an
        # early viewer waits in the backlog instead of taking the display over from the first tunnel
        sock = socket.create_server((host, port))
    except OSError as e:
        await conn.close()
        if e.errno == errno.EADDRINUSE:
            raise ConnectError(f"{host}:{port} is already in use: choose another with --listen {host}:PORT") from e
        raise ConnectError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    console.print(f"Connecting to desktop [bold]{chosen['name']}[/bold] (id {chosen['id']}) at {server}")
    try:
        local.ready = await conn.connect(user, password, local.desktop_id, on_progress=_progress)
    except BaseException:
        sock.close()
        await conn.close()
        raise
    listener = await asyncio.start_server(local.handle_viewer, sock=sock)
    async with listener:
        console.print(f"[green]Desktop ready on {host}:{port}[/green] — open it with any VNC viewer")
        vncviewer = shutil.which("vncviewer")
        if viewer and vncviewer and os.environ.get("DISPLAY"):
            proc = await asyncio.create_subprocess_exec(vncviewer, f"{host}::{port}")
            console.print("Started vncviewer; close it (or press Ctrl-C) to disconnect")
            return await proc.wait()
        console.print("Press Ctrl-C to disconnect")
        await asyncio.Event().wait()  # until Ctrl-C
    return 0


def _as_user(
    server: str, user: str, ca: Path | None, work: Callable[[Path, str], Coroutine[Any, Any, T]], *, ctrl_c: int
) -> T:
    """Check the server, find the CA, ask for the password, then run ``work(ca_path, password)``; errors are
    printed as one line (exit 1) and Ctrl-C exits with ``ctrl_c``."""
    try:
        split_server(server)
        ca_path = find_ca(ca)
        password = read_password(user, server)
        return run(work(ca_path, password))  # the farm's loop: a quicker handshake
    except KeyboardInterrupt:
        if ctrl_c == 0:
            console.print("\nDisconnected")
        raise typer.Exit(ctrl_c) from None
    except (ConnectError, DeckardError) as e:
        raise _fail(e.message if isinstance(e, DeckardError) else str(e)) from None


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[red]Error:[/red] {message}")
    return typer.Exit(1)


def connect_command(
    server: str = typer.Option(..., "--server", help="The broker, HOST:PORT (port 8443 if omitted)."),
    user: str = typer.Option(..., "--user", help="Your login, user or user@tenant."),
    desktop: str | None = typer.Option(None, "--desktop", help="Desktop name or id (if you have several)."),
    listen: str = typer.Option(DEFAULT_LISTEN, "--listen", help="Local HOST:PORT to serve the desktop on."),
    ca: Path | None = typer.Option(None, "--ca", help="The farm CA (ca.pem) to verify the broker with."),
    viewer: bool = typer.Option(True, "--viewer/--no-viewer", help="Start vncviewer when available."),
) -> None:
    """Start your desktop and serve it on a local port for a VNC viewer."""
    code = _as_user(
        server, user, ca, lambda ca_path, pw: _connect(server, user, pw, ca_path, desktop, listen, viewer), ctrl_c=0
    )
    raise typer.Exit(code)


def desktops_command(
    server: str = typer.Option(..., "--server", help="The broker, HOST:PORT (port 8443 if omitted)."),
    user: str = typer.Option(..., "--user", help="Your login, user or user@tenant."),
    ca: Path | None = typer.Option(None, "--ca", help="The farm CA (ca.pem) to verify the broker with."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """List your desktops."""
    rows = _as_user(server, user, ca, lambda ca_path, pw: list_desktops(server, user, pw, ca_path), ctrl_c=130)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    table = Table("ID", "NAME", "STATE", "BLOCKED")
    for r in rows:
        table.add_row(str(r.get("id")), str(r.get("name")), str(r.get("state")), "yes" if r.get("blocked") else "no")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("connect")(connect_command)
    app.command("desktops")(desktops_command)
