"""A warm guest's new address (drivers/warm.py ``readdress``), made from a thread of the node's process inside the
guest's network namespace: here a namespace the test makes, with the veth a container has."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from deckard.drivers import warm

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="making a network namespace needs root")


@pytest.fixture
def guest() -> Iterator[int]:
    """A process in a network namespace of its own with eth0 at 10.77.0.250/24 and a default route (as a warm guest's
    init); its pid."""
    name = f"dkt{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(
            ["ip", "link", "add", f"{name}h", "type", "veth", "peer", "name", "eth0", "netns", name], check=True
        )
        for cmd in ("link set eth0 up", "addr add 10.77.0.250/24 dev eth0", "route add default via 10.77.0.1"):
            subprocess.run(["ip", "-n", name, *cmd.split()], check=True)
        proc = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "60"])
        try:
            yield proc.pid
        finally:
            proc.kill()
            proc.wait()
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def inside(pid: int, command: str) -> str:
    return subprocess.run(
        ["nsenter", "-t", str(pid), "-n", "ip", *command.split()], capture_output=True, text=True
    ).stdout


def test_the_guest_gets_the_desktops_address_and_keeps_its_route_and_the_node_its_namespace(guest: int) -> None:
    own = os.stat("/proc/self/ns/net").st_ino
    asyncio.run(warm.readdress(guest, "10.77.0.17", 24, "10.77.0.1"))
    assert "inet 10.77.0.17/24" in inside(guest, "-4 addr show eth0")
    assert "10.77.0.250" not in inside(guest, "-4 addr show eth0")
    assert inside(guest, "route show default").startswith("default via 10.77.0.1 dev eth0")
    asyncio.run(warm.readdress(guest, "10.77.0.17", 24, "10.77.0.1"))  # again: the same, no error
    assert os.stat("/proc/self/ns/net").st_ino == own  # every thread of the node stays in its own namespace
    assert os.stat("/proc/thread-self/ns/net").st_ino == own


def test_a_guest_that_is_gone_is_a_driver_error() -> None:
    with pytest.raises(warm.DriverError, match="readdressing the warm guest failed"):
        asyncio.run(warm.readdress(2**22 + 1, "10.77.0.17", 24, "10.77.0.1"))
