"""The driver interface: how a node starts, stops and inspects one kind of guest.

Drivers know the operating system (LXC, QEMU, nothing at all) and never the database: the node daemon
turns a desktop row into a :class:`GuestSpec` and hands it over.  The interface stays small on purpose
(prepare an image, start, stop, kill, inspect, list, attach and detach a volume, and close when the daemon is
done) so that the container,
VM and fake drivers fit beside each other, in the way httpx keeps one transport method with a mock beside it.

Every method is idempotent: stopping a guest that is gone, or killing one twice, is not an error.
``kill`` also removes everything a start left on the host (overlay, cgroups, veth), so a node that
was killed with ``-9`` converges by calling ``list`` and ``kill`` on what it no longer wants.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

AGENT_PORT = 3030
"""TCP port of the guest agent (deckard-vma) inside every desktop."""

DISPLAY_PORT = 5900
"""TCP port of the desktop's VNC server (Xvnc display :0) inside every desktop."""


@dataclass(frozen=True)
class VolumeMount:
    """A volume a guest gets (``docs/volumes.md``): a VM sees a virtio disk whose serial is ``vol-<id>``."""

    volume_id: int
    path: Path  # where the volume backend keeps it (``drivers/volumes.py``)
    read_only: bool = False
    name: str = ""  # the volume's name: a container sees it at /media/<name>

    @property
    def serial(self) -> str:
        return f"vol-{self.volume_id}"


@dataclass(frozen=True)
class GuestSpec:
    """Everything a driver needs to start one desktop; built by the node from the database."""

    desktop_id: int
    guest_name: str  # unique on this machine: names the container, its cgroups and its veth
    image_id: int  # disk image id: basefs/<image_id> is the unpacked read-only base
    image_path: Path  # the disk image tarball in the storage root
    ip: str  # the desktop's fixed address in its network (what the guest is configured with)
    prefix_len: int  # of the desktop's network
    gateway: str  # the desktop's gateway: the node's address on the bridge (the namespace's on a tenant network)
    mac: str  # derived from the IP (54:52:00 + last three octets)
    bridge: str
    memory_mib: int
    cpus: float
    user_login: str
    user_uid: int
    home_dir: Path  # on the host, bind-mounted on /home/<user_login> and kept across starts
    agent_token: str
    keep_overlay: bool = False  # OSF persistence policy; the overlay is discarded at start otherwise
    # the desktop's first start: a layer at its path is not its own but an earlier desktop's (SQLite gave a deleted
    # desktop's id to the next desktop made before revision 0018), so it is discarded even where the OSF keeps layers
    first_start: bool = False
    dns_search: str = ""  # search domains of the desktop's resolv.conf (its resolver is the gateway)
    env: dict[str, str] = field(default_factory=dict)
    driver: str = ""  # which of the node's drivers runs it (the OSF's); "" = the node's only one
    seed: Mapping[str, bytes] | None = None  # cloud-init NoCloud files for guests that read a seed disk (VMs)
    volumes: tuple[VolumeMount, ...] = ()  # attached volumes the guest gets at start
    farm_ip: str = ""  # on a tenant network: the farm address the node reaches the guest at ("" = ``ip``)
    warm: bool = False  # a warm pool's guest: nobody's yet (no user, no account); ``home_dir`` is its share of homes
    mounter: bool = False  # a container's init may fork the mounter of shared folders (``nx.shares.in_containers``)
    glx: bool = True  # OpenGL on the display (``display.glx``): off, the node tells the guest (``vma.NO_GLX_FILE``)

    @property
    def reach_ip(self) -> str:
        """Where the node, its broker and its pings reach the guest (``drivers/tenant_net.py``)."""
        return self.farm_ip or self.ip


@dataclass(frozen=True)
class GuestInfo:
    """What a driver observes of one guest it manages."""

    guest_name: str
    running: bool
    pid: int | None = None
    ip: str | None = None
    memory_bytes: int | None = None
    # its init starts the user's display itself (a container's boot script): up before the agent answers
    display_at_boot: bool = False


class Driver(Protocol):
    """One kind of guest.  All methods are coroutines; blocking work runs in subprocesses or threads."""

    name: str

    async def prepare_image(self, image_id: int, image_path: Path) -> None:
        """Make a disk image ready so that starting a guest from it does no per-image work (the container driver
        unpacks it).  Idempotent, and safe while guests start from the same image; the node calls it ahead of
        time for the images tags point at.  Raises DriverError (``image_missing``) when the file is gone."""
        ...

    async def start(self, spec: GuestSpec) -> GuestInfo:
        """Start the guest; return when its init (the agent) has been launched.  Raises DriverError."""
        ...

    async def stop(self, guest_name: str, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGPWR/shutdown), then kill after ``timeout``; always cleans up."""
        ...

    async def kill(self, guest_name: str) -> None:
        """Kill at once and clean up everything the start created on the host."""
        ...

    async def inspect(self, guest_name: str) -> GuestInfo | None:
        """Observe one guest; None when it does not exist."""
        ...

    async def list(self) -> list[GuestInfo]:
        """Every guest this driver manages for this farm (including half-started leftovers)."""
        ...

    async def console_log(self, guest_name: str, max_bytes: int = 65536) -> str:
        """The last ``max_bytes`` of the guest's console (its init's and kernel's messages); "" when none."""
        ...

    async def attach_volume(self, guest_name: str, volume: VolumeMount) -> bool:
        """Give a running guest a volume: True when it has it now (a VM's hot plug), False when it gets it at its
        next start (drivers without hot plug).  Idempotent.  Raises DriverError (``volume_busy``: another guest
        writes it)."""
        ...

    async def detach_volume(self, guest_name: str, volume_id: int) -> bool:
        """Take a volume from a running guest (the node has checked that the guest no longer uses it): True when it
        is gone now, False when it goes at the next start.  Idempotent."""
        ...

    async def close(self) -> None:
        """The node daemon is done with the driver (it stops, or restarts in place).  The guests that still run
        are left to the next daemon: real ones are processes of their own, the fake driver hands its over."""
        ...


@runtime_checkable
class WarmDriver(Protocol):
    """A driver whose guests can be warm (``model/warm_pool.py``): started before a user asks, taken over later."""

    async def take_over(
        self, guest_name: str, *, ip: str, prefix_len: int, gateway: str, home_dir: Path, login: str, uid: int
    ) -> None:
        """Give the running warm guest the user's home (at ``/home/<login>``) and the desktop's address; the node
        then asks its agent for the user's session.  Raises DriverError; the caller kills the guest then."""
        ...
