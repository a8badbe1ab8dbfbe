"""VM desktops as a new user meets them and volumes on them as an administrator uses them: an OSF with
``--driver vm``, a desktop on it, the same connect as always; ``deckard volume ...`` against the same farm.

Real QEMU (TCG here: this machine's KVM cannot run a stock kernel), a real image built with ``--format vm`` (the
minimal profile plus Debian's kernel; cached like every image), two nodes sharing the farm home.  One farm for
the module (it and its image import cost ~20 s; the volume tests had one of their own before); the tests run in
order and build on each other.  First the desktop's: the first one boots the VM the others use, and they end
with it stopped.  Then the volumes', on a VM desktop of another user: a volume is hot-plugged into the running
VM and seen there with its serial, written from inside, refused a detach while mounted, unplugged, snapshotted,
cloned, and the clone attached read-only shows the data; at the next boot the guest has it from the start.
"""

from __future__ import annotations

import asyncio
import json
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
VOL_USER = "val"  # the volume tests' VM is not vera's: her home disk is open in only one VM at a time
DESK = "vol-vm"


@pytest.fixture(scope="module")
def farm(vm_image: Path) -> Iterator[FarmProcess]:
    f = FarmProcess(nodes=2)
    try:
        f.up()
        f.deckard("osf", "add", "vmdesk", "--driver", "vm", "--memory", "768")
        f.deckard("image", "import", str(vm_image), "--osf", "vmdesk")
        f.deckard("user", "add", "vera", "--password", PASSWORD)
        f.deckard("desktop", "add", "vera-vm", "--user", "vera", "--osf", "vmdesk")
        f.deckard("user", "add", VOL_USER, "--password", PASSWORD)
        f.deckard("desktop", "add", DESK, "--user", VOL_USER, "--osf", "vmdesk")
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
        # a TCG guest's first xterm took over 30 s on a fresh machine building the standard image alongside
        width, height, pixels = await asyncio.wait_for(grab_framebuffer(reader, writer, until_drawn=75), 90)
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


# ---- volumes on a VM desktop (and a container's) -----------------------------------------------------


def _agent(farm: FarmProcess) -> AgentClient:
    with sqlite3.connect(farm.home / "deckard.db") as db:
        ip, token = db.execute("SELECT ip, agent_token FROM desktops WHERE name = ?", (DESK,)).fetchone()
    return AgentClient(ip, token, timeout=10)


def _run_ok(farm: FarmProcess, command: str) -> dict[str, Any]:
    out = asyncio.run(_agent(farm).exec(command, timeout=30))
    assert out["returncode"] == 0, out
    return out


def _disks(farm: FarmProcess) -> dict[str, dict[str, Any]]:
    """The guest's disks by serial, as its agent's ``block_devices`` lists them."""
    devices = asyncio.run(_agent(farm).call("block_devices"))["devices"]
    return {d["serial"]: d for d in devices if d["serial"]}


def _volume(farm: FarmProcess, *args: str) -> dict[str, Any]:
    out = json.loads(farm.deckard("volume", *args, "--json").stdout)
    assert isinstance(out, dict)
    return out


def _refused(farm: FarmProcess, *args: str) -> str:
    proc = farm.deckard("volume", *args, check=False)
    assert proc.returncode != 0, proc.stdout
    return proc.stdout + proc.stderr


def _start_vol_vm(farm: FarmProcess) -> None:
    farm.deckard("desktop", "start", DESK)
    try:
        wait_for(lambda: farm.desktop(DESK)["state"] == "running", BOOT_S, 0.5, f"{DESK} running")
    except BaseException:
        print(farm.deckard("desktop", "console-log", DESK, check=False).stdout)
        print(farm.diagnostics())
        raise


def test_attach_hot_plugs_the_volume_into_the_running_vm(farm: FarmProcess) -> None:
    data = _volume(farm, "add", "data", "--size", "1")
    assert (data["state"], data["size_gib"]) == ("ready", 1)
    _start_vol_vm(farm)
    assert f"vol-{data['id']}" not in _disks(farm)
    t0 = time.monotonic()
    attached = _volume(farm, "attach", "data", "--desktop", DESK)
    assert [(a["desktop"], a["in_guest"], a["pending"]) for a in attached["attachments"]] == [(DESK, True, None)]
    print(f"hot plug took {time.monotonic() - t0:.1f} s")
    disk = wait_for(lambda: _disks(farm).get(f"vol-{data['id']}"), 20, 0.5, "the volume's disk in the guest")
    assert disk["size"] == 1 << 30 and not disk["read_only"]
    assert disk["name"] in _run_ok(farm, "lsblk -dno NAME")["stdout"].split()  # what the user sees there too


def test_a_mounted_volume_is_held_until_unmounted_then_unplugged(farm: FarmProcess) -> None:
    vol_id = _volume(farm, "show", "data")["id"]
    dev = "/dev/" + _disks(farm)[f"vol-{vol_id}"]["name"]
    _run_ok(farm, f"mkfs.ext4 -q -F {dev} && mkdir -p /mnt/data && mount {dev} /mnt/data && echo kept > /mnt/data/f")
    assert "volume_held" in _refused(farm, "detach", "data", "--desktop", DESK)
    assert "volume_busy" in _refused(farm, "snapshot", "data", "--name", "s1")  # a running guest writes it
    assert f"vol-{vol_id}" in _disks(farm)  # still there, still mounted
    _run_ok(farm, "umount /mnt/data")
    assert _volume(farm, "detach", "data", "--desktop", DESK)["attachments"] == []
    assert f"vol-{vol_id}" not in _disks(farm)


def test_a_clone_of_a_snapshot_attached_read_only_has_the_data(farm: FarmProcess) -> None:
    # the previous test's detach returned once QEMU had closed the image (drivers/vm.py), so nothing holds its lock
    proc = farm.deckard("volume", "snapshot", "data", "--name", "s1", "--json", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    snap = json.loads(proc.stdout)
    assert snap["name"] == "s1"
    copy = _volume(farm, "clone", "copy", "--from", "data", "--snapshot", "s1")
    assert copy["size_gib"] == 1
    _volume(farm, "attach", "copy", "--desktop", DESK, "--read-only")
    serial = f"vol-{copy['id']}"
    disk = wait_for(lambda: _disks(farm).get(serial), 20, 0.5, "the clone's disk in the guest")
    assert disk["read_only"]
    dev = "/dev/" + disk["name"]
    out = _run_ok(farm, f"mkdir -p /mnt/copy && mount -o ro,noload {dev} /mnt/copy && cat /mnt/copy/f")
    assert out["stdout"].strip() == "kept"
    assert "volume_attached" in _refused(farm, "delete", "copy")


def test_the_next_boot_has_the_attached_volume_from_the_start(farm: FarmProcess) -> None:
    copy_id = _volume(farm, "show", "copy")["id"]
    farm.deckard("desktop", "stop", DESK)
    wait_for(lambda: farm.desktop(DESK)["state"] == "stopped", 60, 0.5, f"{DESK} stopped")
    _start_vol_vm(farm)
    disk = _disks(farm).get(f"vol-{copy_id}")
    assert disk is not None and disk["read_only"], _disks(farm)
    assert [a["in_guest"] for a in _volume(farm, "show", "copy")["attachments"]] == [True]


def test_a_container_desktop_has_its_volumes_on_media_until_it_stops(farm: FarmProcess) -> None:
    """A container gets volumes at start: mounted on the node (FUSE export, loop, ext4) and bind-mounted on
    /media/<name>; a read-only one beside the VM that reads it too.  Its stop leaves nothing on the node (on
    either node: this farm has two)."""
    farm.deckard("desktop", "add", "vol-box", "--user", VOL_USER)
    _volume(farm, "attach", "data", "--desktop", "vol-box")
    _volume(farm, "attach", "copy", "--desktop", "vol-box", "--read-only")
    farm.deckard("desktop", "start", "vol-box")
    settled = ("running", "failed")
    desk = wait_for(lambda: (d := farm.desktop("vol-box"))["state"] in settled and d, BOOT_S, 0.5, "vol-box")
    assert desk["state"] == "running", (desk, farm.diagnostics())
    probe = "cat /media/data/f /media/copy/f; touch /media/data/new && echo rw; touch /media/copy/new || echo ro"
    out = farm.attach(desk["id"], probe)
    assert out.stdout.split() == ["kept", "kept", "rw", "ro"], out
    assert "volume_in_use" in _refused(farm, "attach", "data", "--desktop", DESK)
    farm.deckard("desktop", "stop", "vol-box")
    wait_for(lambda: farm.desktop("vol-box")["state"] == "stopped", 60, 0.5, "vol-box stopped")
    daemons = subprocess.run(["pgrep", "-f", f"qemu-storage-daemon.*{farm.home}"], capture_output=True, text=True)
    assert daemons.stdout == "", "the volume exports outlived the container"
    mounted = [m for paths in farm.node_paths() for m in (paths.node_run_dir / "volumes").glob("*/*")]
    assert not mounted, f"a volume is still mounted on a node: {mounted}"


def test_the_wat_volumes_page_creates_attaches_snapshots_and_clones(tmp_path: Path, browser: Any) -> None:
    """The web admin's Volumes page (no VM needed: the desktop is stopped, so the volume waits for its start)."""
    from test_wat import ApiThread, login

    with ApiThread(tmp_path) as api:
        with api.http(api.token()) as http:
            for path, body in (
                ("/osfs", {"name": "vms", "driver": "vm"}),
                ("/users", {"login": "vera", "password": "pw-123456"}),
                ("/desktops", {"name": "web1", "user": "vera", "osf": "vms"}),
            ):
                http.post(path, json=body).raise_for_status()
        ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 860})
        page = ctx.new_page()
        page.set_default_timeout(30_000)
        page.on("dialog", lambda d: d.accept("copy") if d.type == "prompt" else d.accept())
        try:
            login(page, api)
            page.get_by_role("link", name="Volumes", exact=True).click()
            page.get_by_role("link", name="Create").click()
            page.get_by_label("name", exact=True).fill("data")
            page.get_by_label("Size (GiB)").fill("2")
            page.get_by_role("button", name="Create").click()
            page.wait_for_selector("h1:has-text('volume data')")
            page.get_by_label("Desktop (name or id)").fill("web1")
            page.get_by_role("button", name="Attach").click()
            page.wait_for_selector("section[aria-label=Attachments] td:has-text('at next start')")
            page.wait_for_timeout(800)  # the change's event re-renders the page once more: type after it
            page.get_by_label("Snapshot name").fill("monday")
            page.get_by_role("button", name="Take snapshot").click()
            page.wait_for_selector("section[aria-label=Snapshots] td:has-text('monday')")
            page.get_by_role("button", name="Clone").click()
            page.wait_for_selector("h1:has-text('volume copy')")
            page.get_by_role("link", name="Volumes", exact=True).click()
            page.wait_for_selector("main table td a:has-text('copy')")
            assert page.locator("main table td a:has-text('data')").count() == 1
        finally:
            ctx.close()
