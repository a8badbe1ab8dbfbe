"""Where a farm keeps its state: one directory per farm, so two farms on one machine never collide.

Layout under the farm home (``--home`` / ``DECKARD_HOME``, default ``/var/lib/deckard``)::

    deckard.db            SQLite database (single-node farms)
    farm.json             farm id and bootstrap facts written by ``deckard up``
    tls/                  the farm CA and server certificates (ca.pem is what clients trust)
    storage/              the storage root, shared by all nodes of a farm
      images/             disk image tarballs
      basefs/<image id>-u<id base>/  each image unpacked once per farm id range, read-only (the lower layer)
      overlays/dk<farm>-<desktop>/  per-desktop writable layer (upper + work), whichever node runs it
      homes/<tenant>/<home key>/  persistent user homes (``users.home_key``: never reused by a later user)
      homes-archive/<tenant>/<login>-<user id>-<time>/  homes of deleted users (``users.home_on_delete``)
    local/                with ``storage.local_layers`` (a storage root on GlusterFS): ``basefs/`` and ``overlays/``
                          on this machine's own disk instead — overlayfs cannot write to a FUSE filesystem, and
                          unpacking an image onto GlusterFS is 50-70x slower than onto a local disk
                          (``drivers/storage_check.py``, docs/farm.md "Shared storage")
    import/               tarballs the farm owner puts here for ``deckard image add --import`` (supertenant only)
    run/                  local run state of the node: lxc/ (container configs), pid files, logs

Several nodes may run on one machine (a demo farm, the chaos tests): each then gets its own run directory
(``node_run``, ``--run-dir``) so its LXC directory is its own and no node lists or kills another node's guests.
The all-in-one farm keeps ``<home>/run/lxc``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

DEFAULT_HOME = Path("/var/lib/deckard")


@dataclass(frozen=True)
class FarmPaths:
    home: Path
    node_run: Path | None = None  # this node's own run directory when several nodes share the farm home
    local_layers: bool = False  # desktops' root layers (basefs, overlays) on this machine's disk, not the storage

    @cached_property  # asked for every guest name: hash and resolve once
    def farm_id(self) -> str:
        """Short stable id of this farm, used to prefix container, cgroup and interface names."""
        return hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:6]

    @property
    def sqlite_path(self) -> Path:
        return self.home / "deckard.db"

    @property
    def tls(self) -> Path:
        return self.home / "tls"

    @property
    def storage(self) -> Path:
        return self.home / "storage"

    @property
    def images(self) -> Path:
        return self.storage / "images"

    @property
    def layers(self) -> Path:
        """Where the desktops' root filesystem layers live: the storage root, or this machine's own disk."""
        return self.home / "local" if self.local_layers else self.storage

    @property
    def basefs(self) -> Path:
        return self.layers / "basefs"

    @property
    def overlays(self) -> Path:
        return self.layers / "overlays"

    @property
    def homes(self) -> Path:
        return self.storage / "homes"

    @property
    def homes_archive(self) -> Path:
        return self.storage / "homes-archive"

    @property
    def import_dir(self) -> Path:
        return self.home / "import"

    @property
    def run(self) -> Path:
        return self.home / "run"

    @property
    def node_run_dir(self) -> Path:
        """Local run state of this node (its guests' LXC directory is under it)."""
        return self.node_run or self.run

    @property
    def lxc(self) -> Path:
        return self.node_run_dir / "lxc"

    @property
    def vm(self) -> Path:
        """Run state of this node's virtual machines: one directory per guest (``drivers/vm.py``)."""
        return self.node_run_dir / "vm"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @cached_property
    def guest_tag(self) -> str:
        """Names this node's guests: the farm id, or for a node with its own run directory a hash of both.

        Two nodes on one machine then never share a container, cgroup or veth name, even while a fenced node's
        leftovers are being removed as its desktop starts on the other one.
        """
        if self.node_run is None or self.node_run.resolve() == self.run.resolve():
            return self.farm_id
        key = f"{self.home.resolve()}\0{self.node_run.resolve()}"
        return hashlib.sha256(key.encode()).hexdigest()[:6]

    def guest_name(self, desktop_id: int) -> str:
        return f"dk{self.guest_tag}-{desktop_id}"

    def guest_prefix(self) -> str:
        return f"dk{self.guest_tag}-"

    def demo_node(self, index: int) -> FarmPaths:
        """Node ``index`` (2, 3, …) of a demo farm (`deckard up --nodes N`): its own run directory here."""
        return FarmPaths(self.home, self.run / "nodes" / f"node-{index}", self.local_layers)

    def demo_node_pid(self, index: int) -> Path:
        return self.run / "nodes" / f"node-{index}.pid"

    @property
    def machines_bmc(self) -> Path:
        """The simulated BMCs of a demo farm across machines (runtime/bmc.py), one directory per machine."""
        return self.run / "machines-bmc"

    @property
    def machines_file(self) -> Path:
        """A demo farm across machines (`deckard up --machines N`): ``TAG COUNT`` of its network namespaces."""
        return self.run / "machines"

    def overlay(self, desktop_id: int) -> Path:
        """The desktop's writable layer in the shared storage: the same on every node (a kept layer follows it;
        with ``local_layers`` it stays on the machine that ran the desktop)."""
        return self.overlays / f"dk{self.farm_id}-{desktop_id}"

    def user_home(self, tenant: str, home_key: str) -> Path:
        """A user's home: keyed by ``users.home_key`` (unique per account ever made), never by the login alone."""
        if not home_key or "/" in home_key or home_key in (".", ".."):
            raise ValueError(f"bad home key {home_key!r}")
        return self.homes / tenant / home_key

    def make(self) -> None:
        for p in (self.home, self.tls, self.images, self.basefs, self.overlays, self.homes, self.lxc, self.logs):
            p.mkdir(parents=True, exist_ok=True)
        self.import_dir.mkdir(mode=0o700, exist_ok=True)  # the farm owner's: only root puts files here
        # others may walk through the home (desktops' unprivileged root must reach the storage) but not list it;
        # keys and logs are the owner's alone
        os.chmod(self.home, 0o711)
        for private in (self.tls, self.logs):
            os.chmod(private, 0o700)


def image_digest(path: Path) -> str:
    """SHA-256 of a disk image file, as lowercase hex (what the database records for a disk image)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_tail(path: Path, max_bytes: int) -> tuple[str, int] | None:
    """The last ``max_bytes`` of a log file as text and the file's size; None when it cannot be read."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            return f.read().decode(errors="replace"), size
    except OSError:
        return None
