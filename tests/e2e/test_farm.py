"""The issue's scenario, run as a new user would: `deckard up`, add a user and a desktop, connect, see it.

Everything is real: the farm runs in its own process with its own home, ports, bridge and network; desktops
are LXC containers started from the default image; the client goes through the TLS broker with QVD's protocol
and reads the framebuffer with an RFB handshake.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from deckard.client import broker as qvd
from deckard.client.rfb import grab_framebuffer, is_blank
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.images import keymap
from deckard.model.errors import PermissionDenied, Unauthenticated, Unavailable
from deckard.services.images import register_image
from deckard.testing import FarmProcess, wait_for

pytestmark = pytest.mark.e2e

PASSWORD = "s3cret!"


async def _see_desktop(farm: FarmProcess, login: str, desktop_id: int) -> list[str]:
    progress: list[str] = []
    reader, writer = await qvd.connect(farm.broker, login, PASSWORD, farm.ca, desktop_id, on_progress=progress.append)
    try:
        width, height, pixels = await asyncio.wait_for(grab_framebuffer(reader, writer, until_drawn=15), 30)
        assert width > 0 and height > 0
        assert not is_blank(pixels), "the desktop framebuffer is blank"
    finally:
        writer.close()
    return progress


def _wait_state(farm: FarmProcess, name: str, state: str, timeout: float = 60) -> dict:
    return wait_for(
        lambda: (d := farm.desktop(name))["state"] == state and d["cmd"] is None and d,
        timeout,
        0.3,
        f"{name} to be {state}",
    )  # type: ignore[return-value]


def test_up_prints_credentials_and_addresses(farm: FarmProcess) -> None:
    assert "password" in farm.up_output
    assert f"127.0.0.1:{farm.broker_port}" in farm.up_output
    # a second `up` is idempotent: it reports the running farm and does not rebuild or re-bootstrap
    again = farm.up()
    assert "already running" in again and "password" not in again


def test_user_connects_to_a_real_desktop_whose_home_persists(farm: FarmProcess) -> None:
    farm.deckard("user", "add", "alice", "--password", PASSWORD)
    farm.deckard("desktop", "add", "alice-desk", "--user", "alice")
    desk = farm.desktop("alice-desk")
    assert desk["state"] == "stopped"

    progress = asyncio.run(_see_desktop(farm, "alice", desk["id"]))
    assert any("Starting" in p or "starting" in p for p in progress), progress
    running = _wait_state(farm, "alice-desk", "running", 10)
    assert running["user_state"] in ("connected", "disconnected")
    # the display's start-up keymap came compiled with the image (images/keymap.py): nothing compiled it now
    xvnc_log = farm.attach(desk["id"], "cat /run/deckard/xvnc.log").stdout
    assert "TigerVNC" in xvnc_log and keymap.MISS not in xvnc_log
    assert farm.attach(desk["id"], f"test -x {keymap.REAL} && test -f {keymap.CACHE_DIR}/default.xkm").returncode == 0
    # the image's font caches held once unpacked: the session's window manager scanned no font nor wrote caches in
    # the new user's home (images/builder._font_caches; with stale caches it did both, 0.2 s at every first login)
    assert farm.attach(desk["id"], "test -e ~/.cache/fontconfig", user="alice").returncode != 0

    assert farm.attach(desk["id"], "echo kept > ~/kept.txt", user="alice").returncode == 0
    assert farm.attach(desk["id"], "echo gone > /usr/gone.txt").returncode == 0

    farm.deckard("desktop", "stop", "alice-desk")
    _wait_state(farm, "alice-desk", "stopped")
    assert not farm.guests()

    asyncio.run(_see_desktop(farm, "alice", desk["id"]))
    assert farm.attach(desk["id"], "cat ~/kept.txt", user="alice").stdout.strip() == "kept"
    assert farm.attach(desk["id"], "test -e /usr/gone.txt").returncode != 0


def test_broker_refuses_bad_credentials_and_other_users_desktops(farm: FarmProcess) -> None:
    farm.deckard("user", "add", "mallory", "--password", PASSWORD)
    alice_desk = farm.desktop("alice-desk")
    with pytest.raises(Unauthenticated):
        asyncio.run(qvd.list_desktops(farm.broker, "alice", "wrong", farm.ca))
    with pytest.raises(PermissionDenied):
        asyncio.run(qvd.connect(farm.broker, "mallory", PASSWORD, farm.ca, alice_desk["id"]))


def test_garbage_after_the_101_never_locks_the_owner_out(farm: FarmProcess) -> None:
    """Xvnc blacklists a source after 5 failed handshakes (all the broker's connections share one): the broker
    drops a client that does not speak RFB itself, so the owner's next connect still shows the desktop."""
    desk = farm.desktop("alice-desk")

    async def garbage() -> bytes:
        reader, writer = await qvd.connect(farm.broker, "alice", PASSWORD, farm.ca, desk["id"])
        try:
            writer.write(b"GET / HTTP/1.1\r\n\r\n" * 4)
            return await asyncio.wait_for(reader.read(), 10)  # the broker's greeting, then it closes
        finally:
            writer.close()

    for _ in range(8):
        assert asyncio.run(garbage()) == b"RFB 003.008\n"
    asyncio.run(_see_desktop(farm, "alice", desk["id"]))
    assert "Too many security failures" not in farm.diagnostics(desk["id"], lines=200)


def test_desktop_whose_image_is_missing_fails_with_a_clear_reason(farm: FarmProcess, tmp_path: Path) -> None:
    ghost = tmp_path / "ghost.tar"
    ghost.write_bytes(b"")

    async def register() -> None:
        db = Database(farm.sqlite_url)
        await db.start()
        try:
            await register_image(db, ghost, version="ghost", tags=("ghost",))
        finally:
            await db.close()

    asyncio.run(register())
    ghost.unlink()
    farm.deckard("user", "add", "gina", "--password", PASSWORD)
    farm.deckard("desktop", "add", "gina-desk", "--user", "gina", "--tag", "ghost")
    desk = farm.desktop("gina-desk")
    started = time.monotonic()
    with pytest.raises(Unavailable) as e:
        asyncio.run(qvd.connect(farm.broker, "gina", PASSWORD, farm.ca, desk["id"]))
    assert time.monotonic() - started < 30
    assert "ghost.tar" in e.value.message
    failed = farm.desktop("gina-desk")
    assert failed["state"] == "failed" and "ghost.tar" in failed["failure_reason"]


def test_node_killed_with_sigkill_converges_on_restart(farm: FarmProcess) -> None:
    desk = farm.desktop("alice-desk")
    if desk["state"] != "running":
        farm.deckard("desktop", "start", "alice-desk")
        _wait_state(farm, "alice-desk", "running")
    farm.deckard("user", "add", "kim", "--password", PASSWORD)
    farm.deckard("desktop", "add", "kim-desk", "--user", "kim")
    farm.deckard("desktop", "start", "kim-desk")  # may still be starting when the node dies
    time.sleep(0.3)
    pid = farm.pid()
    assert pid
    os.killpg(pid, signal.SIGKILL)
    time.sleep(0.5)
    farm.up()

    # no desktop stuck in starting/stopping; every guest left belongs to a running desktop
    def settled() -> bool:
        rows = farm.json("desktop", "list")
        assert isinstance(rows, list)
        return all(r["state"] in ("running", "stopped", "failed") and r["cmd"] is None for r in rows)

    wait_for(settled, 60, 0.5, "desktops to settle after the node restart")
    rows = farm.json("desktop", "list")
    assert isinstance(rows, list)
    running_guests = set(farm.guests())
    from deckard.runtime.paths import FarmPaths

    paths = FarmPaths(farm.home)
    assert running_guests == {paths.guest_name(r["id"]) for r in rows if r["state"] == "running"}
    # the adopted desktop still serves its display
    asyncio.run(_see_desktop(farm, "alice", desk["id"]))


async def _connections(farm: FarmProcess) -> list[dict]:
    db = Database(farm.sqlite_url)
    await db.start(run_migrations=False)
    try:
        async with db.connect() as conn:
            rows = await conn.execute(sa.select(t.connections).order_by(t.connections.c.id))
            return [dict(r._mapping) for r in rows]
    finally:
        await db.close()


def test_connections_are_recorded_with_phase_timings(farm: FarmProcess) -> None:
    rows = asyncio.run(_connections(farm))
    ok = [r for r in rows if r["t_total_ms"] is not None and r["connected_at"] is not None]
    assert ok, rows
    assert all(r["t_auth_ms"] is not None for r in ok)
    assert any(r["result"] in ("failed", "start_failed", "error") or r["reason"] for r in rows)


def test_deckard_connect_serves_the_desktop_on_a_local_port(farm: FarmProcess) -> None:
    """The README's tour: `deckard connect … --listen 127.0.0.1:PORT`, then any VNC client on that port."""
    import subprocess
    import sys

    from deckard.testing import free_port

    farm.deckard("user", "add", "carol", "--password", PASSWORD)
    farm.deckard("desktop", "add", "carol-desk", "--user", "carol")
    port = free_port()
    env = farm.env | {"DECKARD_PASSWORD": PASSWORD}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deckard.cli.main",
            "connect",
            "--server",
            farm.broker,
            "--user",
            "carol",
            "--desktop",
            "carol-desk",
            "--listen",
            f"127.0.0.1:{port}",
            "--no-viewer",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Desktop ready" in line or "Error" in line:
                break
        assert any("Desktop ready" in ln for ln in lines), lines
        assert any("Starting desktop" in ln for ln in lines), lines

        async def view() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                _w, _h, pixels = await asyncio.wait_for(grab_framebuffer(reader, writer, until_drawn=15), 30)
                assert not is_blank(pixels)
            finally:
                writer.close()

        asyncio.run(view())
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_desktops_cannot_open_connections_to_the_node(farm: FarmProcess) -> None:
    """A desktop reaches nothing on its node (API, broker, other services): the node only talks to it."""
    from deckard.model.network import gateway_of

    desk = farm.desktop("alice-desk")
    if desk["state"] != "running":
        farm.deckard("desktop", "start", "alice-desk")
        _wait_state(farm, "alice-desk", "running")
    gateway = gateway_of(farm.network)
    with socket.create_server((gateway, 0)) as service:  # a node service listening on the desktop network
        port = service.getsockname()[1]
        probe = (
            "import socket,sys\n"
            f"try: socket.create_connection(('{gateway}', {port}), 2); print('open')\n"
            "except OSError as e: print('blocked', e)\n"
        )
        out = farm.attach(desk["id"], f'python3 -c "{probe}"')
    assert "blocked" in out.stdout, out


def test_an_osf_turns_opengl_off_and_on_for_its_desktops_displays(farm: FarmProcess) -> None:
    """``display.glx`` off: the desktop's Xvnc (started at boot, then adopted by the agent) runs without GLX and
    never loads Mesa; back on, the next start has it again (the flag the node left in the layer is gone)."""
    desk = farm.user_with_desktop("hugo", PASSWORD, "hugo-desk")
    # Xvnc's command line and whether Mesa's software renderer is mapped into it, seen from inside the desktop
    show = (
        'for p in /proc/[0-9]*; do case "$(tr "\\0" " " <$p/cmdline 2>/dev/null)" in Xvnc*) '
        'tr "\\0" " " <$p/cmdline; echo; grep -c swrast_dri $p/maps;; esac; done'
    )

    def xvnc() -> tuple[str, int]:
        farm.deckard("desktop", "start", "hugo-desk")
        _wait_state(farm, "hugo-desk", "running")
        asyncio.run(_see_desktop(farm, "hugo", desk["id"]))  # the display shown, the agent's own included
        out = farm.attach(desk["id"], show, user="hugo").stdout.split("\n")  # its maps are the user's to read
        farm.deckard("desktop", "stop", "hugo-desk")
        _wait_state(farm, "hugo-desk", "stopped")
        return out[0], int(out[1])

    farm.deckard("config", "set", "display.glx", "false", "--osf", "default")
    try:
        args, mesa = xvnc()
        assert "-extension GLX" in args and mesa == 0, (args, mesa)
    finally:
        farm.deckard("config", "reset", "display.glx", "--osf", "default")
    args, mesa = xvnc()
    assert "-extension GLX" not in args and mesa > 0, (args, mesa)
