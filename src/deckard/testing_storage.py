"""Storage machines for tests and benchmarks: GlusterFS servers in namespaces on one box.

A farm's shared storage runs on three storage machines (``docs/farm.md``, "Shared storage").  Here each machine is
a network namespace with its own address (``10.250.0.11``, ``.12``, ``.13``) and a mount namespace of its own, in
which ``/var/lib/glusterd``, ``/var/log/glusterfs`` and ``/run`` are the machine's own directories: ``glusterd``
listens on the fixed port 24007 and keeps its state in fixed paths, so one per namespace is one per machine.
The machines' veths meet on a bridge inside a fourth namespace, the *node* side, from which a node mounts the
volume (the mount itself appears in the caller's mount namespace).  Nothing touches the host's own network.

:meth:`GlusterMachines.power_off` is a machine losing power: its link goes down first (no FIN or RST reaches the
clients, as with a real power cut) and then every process of the machine is killed.  :meth:`close` ends every
process, mount, namespace and directory it made, whatever state the test left.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

from deckard.runtime.machines import kill_namespace

SUBNET = "10.250.0"
GROUPS = Path("/var/lib/glusterd/groups")
# as docs/farm.md asks of every storage machine: glusterd gives a lost peer up after 10 s (Debian ships 0: never,
# and management commands then hang for minutes after a machine loses power)
MGMT_PING = "management.ping-timeout=10"  # the packaged option groups (`gluster volume set V group virt`)


def gluster_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "storage machines in namespaces need root"
    missing = [p for p in ("glusterd", "gluster", "mount.glusterfs", "ip", "nsenter", "unshare") if not shutil.which(p)]
    if missing:
        packages = "glusterfs-server glusterfs-client"
        return f"{', '.join(missing)} not installed (apt-get install {packages}; `make test` does it)"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse: the GlusterFS client is FUSE"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def remove_stale_machines() -> None:
    """What a run killed before its clean-up left: the namespaces of a test process that is gone (their gluster
    processes with them) and GlusterFS mounts whose client died."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        found = re.fullmatch(r"dkgl(\d+)-(n|s\d+)", name)
        if found is None or Path(f"/proc/{found.group(1)}").exists():
            continue  # not ours, or its process still runs
        kill_namespace(name)
        _ip("netns", "del", name, check=False)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f if " - fuse.glusterfs " in line and f" {SUBNET}." in line]
    for point in mounts:
        try:
            os.stat(point)
        except OSError as e:
            if e.errno == errno.ENOTCONN:  # its client was killed with its run
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)


class GlusterMachines:
    """``count`` storage machines (1-based) and a node-side namespace, under ``root`` (a scratch directory)."""

    def __init__(self, root: Path, count: int = 3) -> None:
        self.root = root
        self.count = count
        self.tag = f"dkgl{os.getpid() % 100000}"
        self.node_ns = f"{self.tag}-n"
        self.daemons: dict[int, subprocess.Popen[bytes]] = {}
        self.mounts: list[Path] = []

    node_address = f"{SUBNET}.1"  # the node side's address on the bridge (where the FUSE clients come from)

    def address(self, i: int) -> str:
        return f"{SUBNET}.{10 + i}"

    def ns(self, i: int) -> str:
        return f"{self.tag}-s{i}"

    def brick(self, i: int, name: str = "deckard") -> str:
        return f"{self.address(i)}:{self.root / f's{i}' / 'bricks' / name}"

    # -- commands run on a machine or on the node side ----------------------------------------------------
    def on_machine(self, i: int) -> list[str]:
        """Prefix that runs a command on storage machine ``i``: its network and its mount namespace."""
        return ["nsenter", "-t", str(self.daemons[i].pid), "-m", "-n", "--"]

    def gluster(self, i: int) -> list[str]:
        return [*self.on_machine(i), "gluster"]

    def on_node(self) -> list[str]:
        """Prefix that runs a command on the node side (its network; the caller's mounts)."""
        return ["nsenter", f"--net=/run/netns/{self.node_ns}", "--"]

    # -- life cycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> GlusterMachines:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        remove_stale_machines()
        n = self.node_ns
        _ip("netns", "add", n)
        _ip("-n", n, "link", "set", "lo", "up")
        _ip("-n", n, "link", "add", "br0", "type", "bridge")
        _ip("-n", n, "addr", "add", f"{self.node_address}/24", "dev", "br0")
        _ip("-n", n, "link", "set", "br0", "up")
        for i in range(1, self.count + 1):
            s = self.ns(i)
            _ip("netns", "add", s)
            _ip("-n", s, "link", "set", "lo", "up")
            _ip("link", "add", f"{self.tag}v{i}", "netns", s, "type", "veth", "peer", "name", f"p{i}", "netns", n)
            _ip("-n", s, "link", "set", f"{self.tag}v{i}", "name", "eth0")
            _ip("-n", s, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", s, "link", "set", "eth0", "up")
            _ip("-n", n, "link", "set", f"p{i}", "master", "br0", "up")
            for d in ("lib", "log", "bricks"):
                (self.root / f"s{i}" / d).mkdir(parents=True, exist_ok=True)
            if GROUPS.is_dir() and not (self.root / f"s{i}" / "lib" / "groups").exists():
                shutil.copytree(GROUPS, self.root / f"s{i}" / "lib" / "groups")
            self.power_on(i, wait=False)
        for i in range(1, self.count + 1):
            self.wait_glusterd(i)

    def power_on(self, i: int, *, wait: bool = True) -> None:
        """Start machine ``i``: link up, and its glusterd (which starts its bricks) in a mount namespace of its own."""
        _ip("-n", self.ns(i), "link", "set", "eth0", "up")
        home = self.root / f"s{i}"
        script = (
            f"mount --bind {home / 'lib'} /var/lib/glusterd && mount --bind {home / 'log'} /var/log/glusterfs "
            f"&& mount -t tmpfs -o mode=755 tmpfs /run && exec glusterd -N --xlator-option {MGMT_PING}"
        )
        with open(home / "glusterd.out", "ab") as out:
            self.daemons[i] = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(i), "unshare", "-m", "--propagation", "private", "sh", "-c", script],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        if wait:
            self.wait_glusterd(i)

    def wait_glusterd(self, i: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.daemons[i].poll() is not None:
                log = (self.root / f"s{i}" / "glusterd.out").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"glusterd of storage machine {i} exited ({self.daemons[i].returncode}): {log}")
            probe = subprocess.run([*self.gluster(i), "--mode=script", "pool", "list"], capture_output=True)
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"glusterd of storage machine {i} did not answer within {timeout:.0f} s")
            time.sleep(0.1)

    def power_off(self, i: int) -> None:
        """Machine ``i`` loses power: its network first (no goodbye reaches anyone), then all its processes."""
        _ip("-n", self.ns(i), "link", "set", "eth0", "down", check=False)
        kill_namespace(self.ns(i))
        daemon = self.daemons.get(i)
        if daemon is not None:
            daemon.wait(5)

    def crash(self, i: int) -> None:
        """Machine ``i``'s gluster processes are killed; its kernel still answers (connections are reset)."""
        kill_namespace(self.ns(i))
        daemon = self.daemons.get(i)
        if daemon is not None:
            daemon.wait(5)

    def mounted(self, target: Path) -> None:
        """Record a mount made on the node side, so that :meth:`close` removes it."""
        self.mounts.append(target)

    def close(self) -> None:
        for target in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
        kill_namespace(self.node_ns)  # the FUSE clients
        for i in range(1, self.count + 1):
            kill_namespace(self.ns(i))
        for daemon in self.daemons.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.wait(5)
        for ns in [self.node_ns, *(self.ns(i) for i in range(1, self.count + 1))]:
            _ip("netns", "del", ns, check=False)  # the veths and the bridge go with them
        shutil.rmtree(self.root, ignore_errors=True)
