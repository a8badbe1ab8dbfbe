"""Volumes on a VM desktop as an administrator uses them: ``deckard volume ...`` against a real farm, real QEMU
(TCG), a real guest.  The tests run in order and build on each other: a volume is hot-plugged into the running
VM and seen there with its serial, written from inside, refused a detach while mounted, unplugged, snapshotted,
cloned, and the clone attached read-only shows the data; at the next boot the guest has it from the start.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deckard.client.agent import AgentClient
from deckard.testing import FarmProcess, free_network, wait_for

pytestmark = pytest.mark.e2e

BOOT_S = 120  # a TCG boot is ~10 s on a quiet machine; other suites may run beside this one
DESK = "vol-vm"


@pytest.fixture(scope="module")
def farm(vm_image: Path) -> Iterator[FarmProcess]:
    f = FarmProcess(network=free_network(217, os.getpid()))
    try:
        f.up()
        f.deckard("osf", "add", "vmdesk", "--driver", "vm", "--memory", "512")
        f.deckard("image", "import", str(vm_image), "--osf", "vmdesk")
        f.deckard("user", "add", "vera", "--password", "s3cret!")
        f.deckard("desktop", "add", DESK, "--user", "vera", "--osf", "vmdesk")
        yield f
    finally:
        f.close()


def _agent(farm: FarmProcess) -> AgentClient:
    with sqlite3.connect(farm.home / "deckard.db") as db:
        ip, token = db.execute("SELECT ip, agent_token FROM desktops WHERE name = ?", (DESK,)).fetchone()
    return AgentClient(ip, token, timeout=10)


def _run(farm: FarmProcess, command: str) -> dict[str, Any]:
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


def _start(farm: FarmProcess) -> None:
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
    _start(farm)
    assert f"vol-{data['id']}" not in _disks(farm)
    t0 = time.monotonic()
    attached = _volume(farm, "attach", "data", "--desktop", DESK)
    assert [(a["desktop"], a["in_guest"], a["pending"]) for a in attached["attachments"]] == [(DESK, True, None)]
    print(f"hot plug took {time.monotonic() - t0:.1f} s")
    disk = wait_for(lambda: _disks(farm).get(f"vol-{data['id']}"), 20, 0.5, "the volume's disk in the guest")
    assert disk["size"] == 1 << 30 and not disk["read_only"]
    assert disk["name"] in _run(farm, "lsblk -dno NAME")["stdout"].split()  # what the user sees there too


def test_a_mounted_volume_is_held_until_unmounted_then_unplugged(farm: FarmProcess) -> None:
    vol_id = _volume(farm, "show", "data")["id"]
    dev = "/dev/" + _disks(farm)[f"vol-{vol_id}"]["name"]
    _run(farm, f"mkfs.ext4 -q -F {dev} && mkdir -p /mnt/data && mount {dev} /mnt/data && echo kept > /mnt/data/f")
    assert "volume_held" in _refused(farm, "detach", "data", "--desktop", DESK)
    assert "volume_busy" in _refused(farm, "snapshot", "data", "--name", "s1")  # a running guest writes it
    assert f"vol-{vol_id}" in _disks(farm)  # still there, still mounted
    _run(farm, "umount /mnt/data")
    assert _volume(farm, "detach", "data", "--desktop", DESK)["attachments"] == []
    assert f"vol-{vol_id}" not in _disks(farm)


def test_a_clone_of_a_snapshot_attached_read_only_has_the_data(farm: FarmProcess) -> None:
    # QEMU may hold the image's write lock a moment after the previous test's unplug (seen once in CI under
    # load): while the snapshot says volume_busy it is tried again (the product fix belongs in detach)
    deadline = time.monotonic() + 15
    while True:
        proc = farm.deckard("volume", "snapshot", "data", "--name", "s1", "--json", check=False)
        if proc.returncode == 0 or "volume_busy" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.5)
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
    out = _run(farm, f"mkdir -p /mnt/copy && mount -o ro,noload {dev} /mnt/copy && cat /mnt/copy/f")
    assert out["stdout"].strip() == "kept"
    assert "volume_attached" in _refused(farm, "delete", "copy")


def test_the_next_boot_has_the_attached_volume_from_the_start(farm: FarmProcess) -> None:
    copy_id = _volume(farm, "show", "copy")["id"]
    farm.deckard("desktop", "stop", DESK)
    wait_for(lambda: farm.desktop(DESK)["state"] == "stopped", 60, 0.5, f"{DESK} stopped")
    _start(farm)
    disk = _disks(farm).get(f"vol-{copy_id}")
    assert disk is not None and disk["read_only"], _disks(farm)
    assert [a["in_guest"] for a in _volume(farm, "show", "copy")["attachments"]] == [True]


def test_a_container_desktop_has_its_volumes_on_media_until_it_stops(farm: FarmProcess) -> None:
    """A container gets volumes at start: mounted on the node (FUSE export, loop, ext4) and bind-mounted on
    /media/<name>; a read-only one beside the VM that reads it too.  Its stop leaves nothing on the node."""
    farm.deckard("desktop", "add", "vol-box", "--user", "vera")
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
    assert not list((farm.home / "run" / "volumes").glob("*/*")), "a volume is still mounted on the node"


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
