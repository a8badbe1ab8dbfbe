"""Shared storage on GlusterFS with real glusterd, and a real farm on it whose storage machine loses power.

Three storage machines in namespaces (``deckard.testing_storage``) hold a replica-3 volume, made and mounted by the
documented commands (``deckard storage gluster create`` on a storage machine, ``… mount`` on the node side); the
all-in-one farm runs on it with its desktops' root layers on local disk (``storage.local_layers``).  A user's
desktop runs with its home on the volume when machine 2 loses power: the desktop keeps running, the home stays
readable and writable from inside it within seconds, both remaining bricks have the write, and once machine 2 is
back it is healed and the home is intact across a stop and start.  One set of storage machines serves every test
of the module (a node mounting the volume itself, QEMU's lock across two clients, the set-up errors).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deckard.client import broker as qvd
from deckard.drivers.gluster import GlusterCli
from deckard.testing import FarmProcess, e2e_unavailable_reason, wait_for
from deckard.testing_storage import GlusterMachines, gluster_unavailable_reason

pytestmark = pytest.mark.e2e

PASSWORD = "s3cret!"
DECKARD = [sys.executable, "-m", "deckard.cli.main"]
CAPTURE: dict[str, Any] = {"capture_output": True, "text": True, "check": False, "timeout": 30}


def deckard(prefix: list[str], *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, *DECKARD, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.fixture(scope="module")
def machines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlusterMachines]:
    reason = e2e_unavailable_reason() or gluster_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with GlusterMachines(tmp_path_factory.mktemp("gluster")) as m:
        yield m


@pytest.fixture(scope="module")
def volume(machines: GlusterMachines) -> dict[str, Any]:
    """The volume ``deckard``, made twice by the documented command (the second time a no-op), only the node side
    allowed to mount it; what each ``create --json`` said."""
    bricks = [arg for i in (1, 2, 3) for arg in ("--brick", machines.brick(i))]
    allow = ("--allow", machines.node_address)
    made = deckard(machines.on_machine(1), "storage", "gluster", "create", *bricks, *allow, "--force", "--json")
    assert made.returncode == 0, made.stderr
    again = deckard(machines.on_machine(1), "storage", "gluster", "create", *bricks, *allow, "--force", "--json")
    assert again.returncode == 0, again.stderr
    return {"made": json.loads(made.stdout), "again": json.loads(again.stdout)}


@pytest.fixture(scope="module")
def gluster_farm(machines: GlusterMachines, volume: dict[str, Any]) -> Iterator[FarmProcess]:  # noqa: ARG001
    farm = FarmProcess(extra_env={"DECKARD_STORAGE__LOCAL_LAYERS": "1"})
    machines.mounted(farm.home / "storage")
    try:
        servers = ",".join(machines.address(i) for i in (1, 2, 3))
        mount = ["storage", "gluster", "mount", "--server", servers, "--home", str(farm.home)]
        subprocess.run([*machines.on_node(), *DECKARD, *mount], check=True)
        farm.up()
        yield farm
    finally:
        farm.close()  # its home's rmtree stops at the mount point: unmounted, it goes too
        subprocess.run(["umount", "-l", str(farm.home / "storage")], capture_output=True, check=False)
        shutil.rmtree(farm.home, ignore_errors=True)


async def _first_byte(farm: FarmProcess, desktop_id: int) -> None:
    reader, writer = await qvd.connect(farm.broker, "gina", PASSWORD, farm.ca, desktop_id)
    try:
        await asyncio.wait_for(reader.readexactly(1), 30)
    finally:
        writer.close()


def test_create_is_repeatable_and_the_storage_check_keeps_overlays_local(
    machines: GlusterMachines, volume: dict[str, Any], gluster_farm: FarmProcess
) -> None:
    assert volume["made"]["created"] is True and volume["again"]["created"] is False  # safe to repeat
    allowed = asyncio.run(GlusterCli(machines.gluster(1)).run("volume", "get", "deckard", "auth.allow"))
    assert machines.node_address in allowed.stdout
    # what the storage root can hold: everything but container overlays, which a node then keeps locally
    check = deckard([], "storage", "check", "--home", str(gluster_farm.home), "--json")
    parts = {c["part"]: c for c in json.loads(check.stdout)}
    assert check.returncode == 1 and parts["overlays"]["fs"] == "fuse.glusterfs"
    assert not parts["overlays"]["ok"] and "RENAME_WHITEOUT" in parts["overlays"]["note"]
    assert all(parts[p]["ok"] for p in ("images", "basefs", "homes")), parts


def test_a_desktop_keeps_running_and_its_home_when_a_storage_machine_loses_power(
    machines: GlusterMachines, gluster_farm: FarmProcess
) -> None:
    farm = gluster_farm
    desk = farm.user_with_desktop("gina", PASSWORD, "gina-desk")
    asyncio.run(_first_byte(farm, desk["id"]))
    assert farm.attach(desk["id"], "echo kept > ~/kept.txt && sync", user="gina").returncode == 0
    homes = farm.home / "storage" / "homes"
    assert [p.read_text() for p in homes.glob("*/*/kept.txt")] == ["kept\n"]  # the home is on the volume
    for i in (1, 2, 3):
        assert list(Path(machines.brick(i).split(":", 1)[1]).glob("homes/*/*/kept.txt")), f"no copy on machine {i}"

    machines.power_off(2)
    t0 = time.monotonic()
    inside = farm.attach(desk["id"], "cat ~/kept.txt && echo more >> ~/kept.txt && sync", user="gina")
    stall = time.monotonic() - t0
    assert inside.returncode == 0 and inside.stdout == "kept\n", inside.stderr
    assert stall < 15, f"the home stalled {stall:.1f} s inside the desktop"
    assert farm.desktop("gina-desk")["state"] == "running"
    asyncio.run(_first_byte(farm, desk["id"]))  # the display still answers through the broker
    for i in (1, 3):  # both remaining copies have the write
        kept = list(Path(machines.brick(i).split(":", 1)[1]).glob("homes/*/*/kept.txt"))
        assert [p.read_text() for p in kept] == ["kept\nmore\n"], f"machine {i}"

    machines.power_on(2)
    cli = GlusterCli(machines.gluster(1))
    wait_for(lambda: asyncio.run(cli.redundant("deckard", machines.node_address)), 30, 0.5, "machine 2 healed")
    status = deckard(machines.on_machine(3), "storage", "gluster", "status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    health = json.loads(status.stdout)
    assert health["redundant"] and machines.node_address in health["nodes"] and all(health["online"].values())
    healed = list(Path(machines.brick(2).split(":", 1)[1]).glob("homes/*/*/kept.txt"))
    assert [p.read_text() for p in healed] == ["kept\nmore\n"]  # machine 2 caught up
    farm.deckard("desktop", "stop", "gina-desk")
    wait_for(lambda: farm.desktop("gina-desk")["state"] == "stopped", 60, 0.3, "stopped")
    asyncio.run(_first_byte(farm, desk["id"]))
    again = farm.attach(desk["id"], "cat ~/kept.txt", user="gina")
    assert again.stdout == "kept\nmore\n", again.stderr
    print(f"home stall inside the desktop after a storage machine lost power: {stall:.2f} s")


NODE_START = """
import asyncio, sys
from pathlib import Path
from typing import Any
from deckard.cli.storage import ensure_node_storage
from deckard.model.errors import DeckardError
from deckard.runtime.settings import load_settings
try:
    asyncio.run(ensure_node_storage(load_settings(Path(sys.argv[1]))))
except DeckardError as e:
    print("code=" + e.code)
"""


@pytest.mark.usefixtures("volume")
def test_a_node_mounts_the_volume_itself_before_it_starts(machines: GlusterMachines, tmp_path: Path) -> None:
    """``storage.gluster_servers`` set: the node's start mounts the volume (once: a restart finds it mounted) and
    keeps the desktops' layers local; with ``local_layers`` off it refuses to start container desktops."""
    home = tmp_path / "node"
    machines.mounted(home / "storage")
    servers = json.dumps([machines.address(i) for i in (3, 1, 2)])  # any machine may be asked first
    env = {**os.environ, "DECKARD_STORAGE__GLUSTER_SERVERS": servers, "DECKARD_NODE__DRIVER": "container"}
    start = [*machines.on_node(), sys.executable, "-c", NODE_START, str(home)]
    for _ in range(2):
        done = subprocess.run(start, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0 and "code=" not in done.stdout, done.stdout + done.stderr
    assert (home / "storage").is_mount()
    (home / "storage/homes/from-node.txt").write_text("node\n")
    assert (Path(machines.brick(1).split(":", 1)[1]) / "homes/from-node.txt").read_text() == "node\n"

    off = {**env, "DECKARD_STORAGE__LOCAL_LAYERS": "0"}
    refused = subprocess.run(start, env=off, capture_output=True, text=True, timeout=60, check=False)
    assert "code=storage_overlay_unsupported" in refused.stdout, refused.stdout + refused.stderr


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-utils not installed (`make test` installs it)")
@pytest.mark.usefixtures("volume")
def test_a_vm_home_disk_open_on_one_node_is_refused_on_another(machines: GlusterMachines, tmp_path: Path) -> None:
    """QEMU's image lock holds across two nodes' FUSE clients: a VM desktop's home disk never runs twice."""
    for node in ("a", "b"):  # two nodes' FUSE clients (the deckard command is tested above)
        (tmp_path / node).mkdir()
        machines.mounted(tmp_path / node)
        mount = ["mount", "-t", "glusterfs", f"{machines.address(1)}:/deckard", str(tmp_path / node)]
        subprocess.run([*machines.on_node(), *mount], check=True, timeout=30)
    disk = Path("vm-home.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "a" / disk), "1G"], check=True)
    holder = subprocess.Popen(["qemu-io", "-c", "sleep 2000", str(tmp_path / "a" / disk)])
    try:
        time.sleep(0.7)
        other = subprocess.run(["qemu-io", "-c", "write 0 4k", str(tmp_path / "b" / disk)], **CAPTURE)
        assert other.returncode != 0 and 'Failed to get "write" lock' in other.stderr + other.stdout
    finally:
        holder.wait(10)


def other_bricks(machines: GlusterMachines) -> list[str]:
    return [arg for i in (1, 2, 3) for arg in ("--brick", machines.brick(i, "other"))]


@pytest.mark.usefixtures("volume")
def test_setup_errors_say_what_to_do(machines: GlusterMachines) -> None:
    """No glusterd, a bad brick, a volume name taken by other bricks, an unreachable storage machine and a brick
    on the root filesystem end with stable codes and say what to do."""
    nowhere = deckard(machines.on_node(), "storage", "gluster", "create", *other_bricks(machines))  # no glusterd
    assert nowhere.returncode == 1 and "[glusterd_down]" in nowhere.stderr, nowhere.stderr
    bad = deckard(machines.on_machine(1), "storage", "gluster", "create", "--brick", "nohost", "--volume", "x")
    assert bad.returncode == 1 and "[bad_brick]" in bad.stderr
    other = other_bricks(machines)
    taken = deckard(machines.on_machine(1), "storage", "gluster", "create", *other, "--force")
    assert taken.returncode == 1 and "[volume_exists]" in taken.stderr, taken.stderr
    lost = [*other[:4], "--brick", "192.0.2.1:/srv/brick"]  # TEST-NET-1: no route from the storage machines
    far = deckard(machines.on_machine(1), "storage", "gluster", "create", *lost, "--volume", "lost", "--force")
    assert far.returncode == 1 and "[brick_unreachable]" in far.stderr, far.stderr
    root = deckard(machines.on_machine(1), "storage", "gluster", "create", *other, "--volume", "onroot")
    assert root.returncode == 1 and "[brick_on_root]" in root.stderr and "--force" in root.stderr, root.stderr
