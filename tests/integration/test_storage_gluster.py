"""Shared storage on GlusterFS with real glusterd: three storage machines in namespaces (``testing_storage.py``).

The volume is made and mounted by the documented commands (``deckard storage gluster create`` on a storage
machine, ``deckard storage gluster mount`` on the node side), and a storage machine then loses power while a
user's home is on the volume: the home must stay readable and writable within seconds, and the machine must be
healed when it comes back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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

from deckard.drivers.gluster import GlusterCli
from deckard.runtime.paths import FarmPaths
from deckard.testing_storage import GlusterMachines, gluster_unavailable_reason

reason = gluster_unavailable_reason()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")

DECKARD = [sys.executable, "-m", "deckard.cli.main"]
CAPTURE: dict[str, Any] = {"capture_output": True, "text": True, "check": False, "timeout": 30}


@pytest.fixture(scope="module")
def machines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlusterMachines]:
    with GlusterMachines(tmp_path_factory.mktemp("gluster")) as m:
        yield m


def deckard(prefix: list[str], *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, *DECKARD, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def within(seconds: float, work: object) -> float:
    """Run ``work`` (a callable) in a thread; its duration, or a failure if it hangs longer than ``seconds``."""
    assert callable(work)
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(work).result(timeout=seconds)
    return time.monotonic() - t0


def test_a_home_survives_a_storage_machine_losing_power(machines: GlusterMachines, tmp_path: Path) -> None:
    """create → mount → write a home → machine 2 powered off: the home reads and writes within seconds (the
    client gives the dead brick up after the volume's 5 s timeouts), and machine 2 is healed when it is back."""
    bricks = [arg for i in (1, 2, 3) for arg in ("--brick", machines.brick(i))]
    allow = ("--allow", machines.node_address)  # only the node side may mount it
    made = deckard(machines.on_machine(1), "storage", "gluster", "create", *bricks, *allow, "--force", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["created"] is True
    again = deckard(machines.on_machine(1), "storage", "gluster", "create", *bricks, *allow, "--force", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["created"] is False  # the same volume: a no-op, safe to repeat

    allowed = asyncio.run(GlusterCli(machines.gluster(1)).run("volume", "get", "deckard", "auth.allow"))
    assert machines.node_address in allowed.stdout

    home = tmp_path / "farm"
    servers = ",".join(machines.address(i) for i in (1, 2, 3))
    machines.mounted(home / "storage")
    mounted = deckard(machines.on_node(), "storage", "gluster", "mount", "--server", servers, "--home", str(home))
    assert mounted.returncode == 0, mounted.stderr
    paths = FarmPaths(home)

    # what the storage root can hold: everything but container overlays, which a node then keeps locally
    check = deckard([], "storage", "check", "--home", str(home), "--json")
    parts = {c["part"]: c for c in json.loads(check.stdout)}
    assert check.returncode == 1 and parts["overlays"]["fs"] == "fuse.glusterfs"
    assert not parts["overlays"]["ok"] and "RENAME_WHITEOUT" in parts["overlays"]["note"]
    assert all(parts[p]["ok"] for p in ("images", "basefs", "homes")), parts

    notes = paths.user_home("default", "k1") / "notes.txt"
    notes.parent.mkdir(parents=True)
    with notes.open("w") as f:
        f.write("before\n")
        f.flush()
        os.fsync(f.fileno())

    machines.power_off(2)

    def read_and_write() -> None:
        assert notes.read_text() == "before\n"
        with notes.open("a") as f:
            f.write("after\n")
            f.flush()
            os.fsync(f.fileno())
        (notes.parent / "new.txt").write_text("made while machine 2 was down\n")

    stall = within(20, read_and_write)
    assert stall < 15, f"home I/O stalled {stall:.1f} s after a storage machine lost power"
    assert notes.read_text() == "before\nafter\n"
    for i in (1, 3):  # both remaining copies have the write
        brick = Path(machines.brick(i).split(":", 1)[1])
        assert (brick / "homes/default/k1/notes.txt").read_text() == "before\nafter\n"

    machines.power_on(2)
    cli = GlusterCli(machines.gluster(1))

    async def healed(timeout: float) -> float:
        t0 = time.monotonic()
        while not await cli.redundant("deckard", machines.node_address):
            assert time.monotonic() - t0 < timeout, "machine 2 was not healed (or the node not reconnected) in time"
            await asyncio.sleep(0.5)
        return time.monotonic() - t0

    heal = asyncio.run(healed(30))
    status = deckard(machines.on_machine(3), "storage", "gluster", "status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    health = json.loads(status.stdout)
    assert health["redundant"] and health["nodes"] == [machines.node_address] and all(health["online"].values())
    brick2 = Path(machines.brick(2).split(":", 1)[1])
    assert (brick2 / "homes/default/k1/notes.txt").read_text() == "before\nafter\n"
    assert (brick2 / "homes/default/k1/new.txt").exists()
    print(f"stall after power-off {stall:.2f} s, redundant again {heal:.1f} s after power-on")


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
