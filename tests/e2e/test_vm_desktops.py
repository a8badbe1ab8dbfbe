"""VM desktops as a new user meets them: an OSF with ``--driver vm``, a desktop on it, the same connect as always.

Real QEMU (TCG here: this machine's KVM cannot run a stock kernel), a real image built with ``--format vm`` (the
minimal profile plus Debian's kernel; cached like every image), two nodes sharing the farm home.  One farm per
module; the tests run in order and build on each other (the first one boots the VM the others use).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deckard.client import broker as qvd
from deckard.client.agent import AgentClient
from deckard.client.rfb import grab_framebuffer, is_blank
from deckard.runtime.paths import FarmPaths
from deckard.testing import FarmProcess, wait_for

pytestmark = pytest.mark.e2e

PASSWORD = "s3cret!"
BOOT_S = 120  # a TCG boot is ~10 s on a quiet machine; the suite runs two workers beside it


@pytest.fixture(scope="module")
def farm(vm_image: Path) -> Iterator[FarmProcess]:
    f = FarmProcess(nodes=2)
    try:
        f.up()
        f.deckard("osf", "add", "vmdesk", "--driver", "vm", "--memory", "768")
        f.deckard("image", "import", str(vm_image), "--osf", "vmdesk")
        f.deckard("user", "add", "vera", "--password", PASSWORD)
        f.deckard("desktop", "add", "vera-vm", "--user", "vera", "--osf", "vmdesk")
        yield f
    finally:
        f.close()


def _row(farm: FarmProcess, name: str) -> dict[str, Any]:
    """The desktop's row straight from the farm's database (the agent token is not in any API answer)."""
    with sqlite3.connect(farm.home / "deckard.db") as db:
        db.row_factory = sqlite3.Row
        row = db.execute(
            "SELECT d.*, n.name AS node FROM desktops d LEFT JOIN nodes n ON n.id = d.node_id WHERE d.name = ?", (name,)
        ).fetchone()
    assert row is not None
    return dict(row)


def _run(farm: FarmProcess, name: str, command: str, user: str = "") -> dict[str, Any]:
    row = _row(farm, name)
    return asyncio.run(AgentClient(row["ip"], row["agent_token"]).exec(command, user=user, timeout=30))


def _wait_state(farm: FarmProcess, name: str, state: str, timeout: float = BOOT_S) -> dict[str, Any]:
    return wait_for(  # type: ignore[return-value]
        lambda: (d := farm.desktop(name))["state"] == state and d["cmd"] is None and d, timeout, 0.5, f"{name} {state}"
    )


async def _see_desktop(farm: FarmProcess, desktop_id: int) -> None:
    reader, writer = await asyncio.wait_for(qvd.connect(farm.broker, "vera", PASSWORD, farm.ca, desktop_id), BOOT_S)
    try:
        width, height, pixels = await asyncio.wait_for(grab_framebuffer(reader, writer, until_drawn=30), 60)
        assert width > 0 and height > 0
        assert not is_blank(pixels), "the VM desktop's framebuffer is blank"
    finally:
        writer.close()


def _qemus(farm: FarmProcess) -> list[int]:
    """The QEMU processes of this farm's VMs, whichever node started them."""
    out = subprocess.run(["pgrep", "-f", "qemu-system-x86_64 -name guest="], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    return sorted(p for p in pids if str(farm.home) in Path(f"/proc/{p}/cmdline").read_text(errors="replace"))


def test_vm_desktop_connects_like_any_desktop(farm: FarmProcess) -> None:
    desk = farm.desktop("vera-vm")
    try:
        asyncio.run(_see_desktop(farm, desk["id"]))
    except BaseException:
        print(farm.deckard("desktop", "console-log", "vera-vm", check=False).stdout)
        print(farm.diagnostics())
        raise
    running = _wait_state(farm, "vera-vm", "running", 10)
    assert running["user_state"] in ("connected", "disconnected")
    # it really is a virtual machine: its own kernel, its disks found by serial, the home on its own disk
    cpu = _run(
        farm, "vera-vm", "grep -m1 'model name' /proc/cpuinfo; cat /sys/block/vda/serial; findmnt -no SOURCE /home/vera"
    )
    assert "QEMU" in cpu["stdout"] and "deckard-root" in cpu["stdout"], cpu
    assert cpu["stdout"].strip().endswith("/dev/vdb"), cpu
    assert len(_qemus(farm)) == 1


def test_console_log_shows_the_boot(farm: FarmProcess) -> None:
    out = farm.deckard("desktop", "console-log", "vera-vm").stdout
    assert "deckard-init: starting the agent" in out and "deckard-vma listening" in out, out


def test_the_guest_reads_its_metadata_and_its_nocloud_seed(farm: FarmProcess) -> None:
    url = "http://169.254.169.254/openstack/latest/meta_data.json"
    fetch = f"import json, urllib.request; print(json.load(urllib.request.urlopen('{url}', timeout=10))['hostname'])"
    out = _run(farm, "vera-vm", f'python3 -c "{fetch}"')
    assert out["stdout"].strip() == "vera-vm", out
    mount = (
        "for b in /sys/block/vd*; do [ $(cat $b/serial) = deckard-config ] && dev=/dev/${b##*/}; done; "
        "mkdir -p /mnt/seed && mount -o ro $dev /mnt/seed && ls /mnt/seed; umount /mnt/seed"
    )
    seed = _run(farm, "vera-vm", mount)
    assert {"meta-data", "user-data", "network-config"} <= set(seed["stdout"].split()), seed


def test_root_inside_cannot_take_another_address(farm: FarmProcess) -> None:
    """Root in a VM owns its kernel: the node lets only the desktop's own MAC and address in through its tap."""
    row = _row(farm, "vera-vm")
    prefix = row["ip"].rsplit(".", 1)[0]
    gateway, spoof = f"{prefix}.1", f"{prefix}.250"

    def reach(source: str) -> str:
        probe = (
            f"import socket; s = socket.socket(); s.settimeout(3); s.bind(({source!r}, 0)); "
            f"print('open' if s.connect_ex(({gateway!r}, 8775)) in (0, 111) else 'dropped')"
        )
        return str(_run(farm, "vera-vm", f'python3 -c "{probe}"')["stdout"]).strip()

    assert reach(row["ip"]) == "open"  # the metadata service's port on the node
    assert _run(farm, "vera-vm", f"busybox ip addr add {spoof}/24 dev eth0")["returncode"] == 0
    assert reach(spoof) == "dropped"


def test_home_survives_a_restart_on_another_node_and_usr_does_not(farm: FarmProcess) -> None:
    assert _run(farm, "vera-vm", "echo kept > ~/kept.txt", user="vera")["returncode"] == 0
    assert _run(farm, "vera-vm", "echo gone > /usr/gone.txt")["returncode"] == 0
    first_node = _row(farm, "vera-vm")["node"]
    farm.deckard("desktop", "stop", "vera-vm")
    _wait_state(farm, "vera-vm", "stopped")
    assert not _qemus(farm), "the stopped VM's QEMU is still running"
    farm.deckard("node", "block", first_node)
    try:
        farm.deckard("desktop", "start", "vera-vm")
        running = _wait_state(farm, "vera-vm", "running")
    finally:
        farm.deckard("node", "unblock", first_node)
    assert _row(farm, "vera-vm")["node"] != first_node, running
    assert _run(farm, "vera-vm", "cat ~/kept.txt", user="vera")["stdout"].strip() == "kept"
    assert _run(farm, "vera-vm", "test -e /usr/gone.txt && echo there")["stdout"] == ""


def test_node_killed_with_a_running_vm_converges(farm: FarmProcess) -> None:
    """kill -9 of the node daemons: the VM keeps running (QEMU is a process of its own) and is adopted again."""
    row = _row(farm, "vera-vm")
    assert row["state"] == "running"
    before = _qemus(farm)
    pid = farm.pid()
    assert pid
    os.killpg(pid, signal.SIGKILL)
    node2 = FarmPaths(farm.home).demo_node_pid(2)
    if node2.exists():
        os.kill(int(node2.read_text()), signal.SIGKILL)
    time.sleep(0.5)
    assert _qemus(farm) == before, "QEMU died with the node daemon"
    farm.up()
    _wait_state(farm, "vera-vm", "running", 60)
    assert _qemus(farm) == before, "the VM was not adopted"
    asyncio.run(_see_desktop(farm, row["id"]))


def test_a_vm_whose_kernel_panics_fails_with_its_console_as_the_reason(farm: FarmProcess, vm_image: Path) -> None:
    """An image with a kernel and no agent: the init's hand-over fails, PID 1 dies, the kernel panics, QEMU's
    pvpanic device says so, and the desktop ends failed with the console's words instead of waiting for an agent
    that never comes."""
    broken = farm.home / "broken"
    broken.mkdir()
    members = ["./boot", "./usr/lib/modules", "./usr/bin/busybox", "./bin", "./lib", "./sbin"]
    subprocess.run(["tar", "--numeric-owner", "-xf", str(vm_image), "-C", str(broken), *members], check=True)
    image = farm.home / "deckard-broken-vm.tar"
    subprocess.run(["tar", "--numeric-owner", "-cf", str(image), "-C", str(broken), "."], check=True)
    subprocess.run(["rm", "-rf", str(broken)], check=True)
    farm.deckard("osf", "add", "vmbroken", "--driver", "vm", "--memory", "512")
    farm.deckard("image", "import", str(image), "--osf", "vmbroken")
    # vera's home disk is open in vera-vm: QEMU's lock keeps a second VM of hers from writing it too
    farm.deckard("desktop", "add", "vera-broken", "--user", "vera", "--osf", "vmbroken")
    farm.deckard("desktop", "start", "vera-broken")
    locked = _wait_state(farm, "vera-broken", "failed", 150)
    assert "home disk is in use by another of their VM desktops" in locked["failure_reason"], locked

    farm.deckard("desktop", "stop", "vera-vm")  # her home is formatted: the tiny image needs no mkfs to reach PID 1
    _wait_state(farm, "vera-vm", "stopped")
    t0 = time.monotonic()
    farm.deckard("desktop", "start", "vera-broken")
    failed = _wait_state(farm, "vera-broken", "failed", 150)
    reason = failed["failure_reason"]
    assert "Kernel panic" in reason, reason
    assert time.monotonic() - t0 < 40  # the panic is seen at once, not after the agent's 45 s start timeout
    assert not _qemus(farm)  # the failed VM's QEMU is gone
