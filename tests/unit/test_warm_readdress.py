"""A warm guest's new address (drivers/warm.py ``readdress``), made from a thread of the node's process inside the
guest's network namespace: here a namespace the test makes, with the veth a container has."""

from __future__ import annotations

import asyncio
import ctypes
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from deckard.drivers import warm
from deckard.model.errors import DriverError

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
            # `ip netns exec` enters the namespace after it started: until then the pid is still in the host's
            wanted, deadline = os.stat(f"/run/netns/{name}").st_ino, time.monotonic() + 10
            while os.stat(f"/proc/{proc.pid}/ns/net").st_ino != wanted:
                assert time.monotonic() < deadline, "the test's guest never entered its namespace"
                time.sleep(0.01)
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
    with pytest.raises(DriverError, match="readdressing the warm guest failed"):
        asyncio.run(warm.readdress(2**22 + 1, "10.77.0.17", 24, "10.77.0.1"))


def test_a_pid_of_the_nodes_own_namespace_is_refused(guest: int) -> None:
    """A guest's init that died and a process of the node's namespace that took its pid: that namespace's eth0 is
    the host's and must never be touched.  Played inside the test's namespace (a thread of this test enters it,
    and the node's work starts from that thread), so a regression cannot touch this machine's own eth0."""
    before = inside(guest, "-4 addr show eth0")
    outcome: list[BaseException | None] = []

    def as_the_node_in_that_namespace() -> None:
        fd = os.open(f"/proc/{guest}/ns/net", os.O_RDONLY)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, warm.CLONE_NEWNET) != 0:
                outcome.append(OSError(ctypes.get_errno(), "setns"))
                return
        finally:
            os.close(fd)
        try:
            asyncio.run(warm.readdress(guest, "10.77.0.17", 24, "10.77.0.1"))
            outcome.append(None)
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    thread = threading.Thread(target=as_the_node_in_that_namespace)  # ends in that namespace: never reused
    thread.start()
    thread.join()
    assert isinstance(outcome[0], DriverError) and "node's own network namespace" in str(outcome[0]), outcome
    assert inside(guest, "-4 addr show eth0") == before
