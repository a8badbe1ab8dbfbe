"""Several "machines" on one box, for tests and demos of a farm across machines (``deckard up --machines N``).

A machine is a network namespace with its own address on a shared *underlay* (a bridge on the host, standing for
the data-centre network; the host itself is the machine that runs the database, the API and the storage) and,
for every process started in it, a mount namespace of its own: a fresh sysfs (so ``/sys/class/net`` shows the
machine's interfaces), the host's cgroup tree bound back under it (``ip netns exec`` would hide it and LXC could not
set limits: reference/platform.md), and a machine id of its own (``/etc/machine-id``; proc must stay fully
visible, or LXC may not mount it for a container), so a node there is another machine to the farm's fencing.
Its desktop bridge, nftables tables, VXLAN port, LXC monitor sockets and dnsmasq are its own.

The underlay carries 9000-byte frames, so the overlay's VXLAN port keeps a 1500-byte MTU for desktops.
Processes inside see the host's files: the farm's storage root is shared as a real farm's would be on shared
storage.  ``close()`` removes the namespaces (their processes first), the underlay and the machines' files, even
after a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path("/run/deckard-machines")  # the machines' own files (machine id, the mount namespace's scratch)

# the mount namespace's set-up, then the command: $1 is the machine's directory, the rest the command
_ENTER = r"""set -e
dir=$1; shift
mkdir -p "$dir/cgroup-aside"
mount --rbind /sys/fs/cgroup "$dir/cgroup-aside"
mount -t sysfs sysfs /sys
mount --rbind "$dir/cgroup-aside" /sys/fs/cgroup
umount -l "$dir/cgroup-aside"
mount --bind "$dir/machine-id" /etc/machine-id
exec "$@"
"""


@dataclass
class Machine:
    """One machine: ``name`` is its network namespace, ``address`` its underlay address."""

    name: str
    address: str
    root: Path  # its own files (boot id, the mount namespace's scratch)

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside the machine."""
        return [
            "nsenter", f"--net=/run/netns/{self.name}", "--",
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", _ENTER, "machine", str(self.root), *argv,
        ]  # fmt: skip

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*argv), capture_output=True, text=True, check=check, timeout=timeout)

    def processes(self) -> set[int]:
        """Every process of the machine (``namespace_processes``)."""
        return namespace_processes(self.name)

    def power_off(self) -> None:
        """What pulling the plug looks like: every process of the machine killed at once, its network gone."""
        kill_namespace(self.name)
        subprocess.run(["ip", "-n", self.name, "link", "set", "up0", "down"], capture_output=True)


def namespace_processes(netns: str) -> set[int]:
    """Every process in the network namespace ``netns`` and their descendants (a container's processes have a
    network namespace of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout
    found, todo = set(), [int(p) for p in out.split()]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def kill_namespace(netns: str, rounds: int = 50) -> None:
    """SIGKILL every process of ``netns`` (``namespace_processes``), again while some are left (they were forking)."""
    for _ in range(rounds):
        pids = namespace_processes(netns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


@dataclass
class Machines:
    """``count`` machines on an underlay ``10.233.<n>.0/24``: the host is ``.1``, machine *i* is ``.(10 + i)``."""

    count: int
    tag: str = field(default_factory=lambda: f"{os.getpid() % 1000:03d}")
    root: Path = field(default_factory=lambda: ROOT)
    machines: list[Machine] = field(default_factory=list)

    @property
    def underlay(self) -> str:
        return f"dkm{self.tag}"

    @property
    def subnet(self) -> str:
        return f"10.233.{int(self.tag) % 250}"

    @property
    def host_address(self) -> str:
        return f"{self.subnet}.1"

    @classmethod
    def existing(cls, tag: str, count: int) -> Machines:
        """The machines ``Machines(count, tag).start()`` made earlier, e.g. in another process, to close them."""
        farm = cls(count, tag)
        farm.machines = [farm._describe(i) for i in range(1, count + 1)]
        return farm

    def _describe(self, i: int) -> Machine:
        name = f"{self.underlay}m{i}"
        return Machine(name, f"{self.subnet}.{10 + i}", self.root / name)

    def start(self) -> Machines:
        try:
            # a data-centre switch: the host's netfilter (br_netfilter) has no business with its frames
            _ip("link", "add", self.underlay, "mtu", "9000", "type", "bridge", "nf_call_iptables", "0")
            _ip("addr", "add", f"{self.host_address}/24", "dev", self.underlay)
            _ip("link", "set", self.underlay, "up")
            for i in range(1, self.count + 1):
                self.machines.append(self._machine(i))
        except BaseException:
            self.close()
            raise
        return self

    def _machine(self, i: int) -> Machine:
        machine, host_if = self._describe(i), f"{self.underlay}v{i}"
        name = machine.name
        machine.root.mkdir(parents=True, exist_ok=True)
        (machine.root / "machine-id").write_text(f"{uuid.uuid4().hex}\n")
        _ip("netns", "add", name)
        _ip("link", "add", host_if, "mtu", "9000", "type", "veth", "peer", "name", "up0", "netns", name)
        _ip("link", "set", host_if, "master", self.underlay, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "addr", "add", f"{machine.address}/24", "dev", "up0")
        _ip("-n", name, "link", "set", "up0", "mtu", "9000", "up")
        _ip("-n", name, "route", "add", "default", "via", self.host_address)
        return machine

    def close(self) -> None:
        for machine in self.machines:
            machine.power_off()
            subprocess.run(["ip", "netns", "del", machine.name], capture_output=True)
            shutil.rmtree(machine.root, ignore_errors=True)
        self.machines.clear()
        subprocess.run(["ip", "link", "del", self.underlay], capture_output=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def machine_at(address: str) -> Machine | None:
    """The machine (of any ``Machines`` on this box) whose underlay address is ``address``."""
    for ns in sorted(Path("/run/netns").glob("dkm*m*")):
        out = subprocess.run(["ip", "-n", ns.name, "-4", "-o", "addr", "show", "up0"], capture_output=True, text=True)
        if f" {address}/" in out.stdout:
            return Machine(ns.name, address, ROOT / ns.name)
    return None


def fence_hook_script(python: str) -> str:
    """The demo farm's power switch as a fencing hook (``node.fencing = command``): ``HOOK name address pid``
    powers off the machine at ``address``, as an IPMI power-off would."""
    return f'#!/bin/sh\nexec {python} -m deckard.runtime.machines power-off "$2"\n'


def main(argv: list[str]) -> int:
    """``python -m deckard.runtime.machines power-off ADDRESS``: 0 once nothing runs on that machine any more."""
    if len(argv) != 2 or argv[0] != "power-off":
        print("usage: python -m deckard.runtime.machines power-off ADDRESS")
        return 2
    machine = machine_at(argv[1])
    if machine is None:
        print(f"no machine at {argv[1]}")
        return 1
    machine.power_off()
    return 0 if not machine.processes() else 1


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
