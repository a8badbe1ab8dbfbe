"""What the host does for a warm guest (``model/warm_pool.py``): a home given to a running container, and a new
address for it.

The home: a warm container boots with ``/home`` bound to a directory of the node's (``share``) that is a shared
mount on the host, so a mount made under it later propagates into the container (LXC's ``shmounts``, Incus' way of
hot-plugging disks).  At take-over the node binds the user's home on ``share/<login>`` with one ``mount(2)``
(~2 ms); the container sees it at ``/home/<login>``.  The container's copy is a slave: nothing it mounts or unmounts
there reaches the host.  ``share`` is owned by the host's root, so root in the container (an unmapped owner to
it) cannot put anything there before the mount.

The address: a warm guest has one of its own from the top of the farm range; the desktop that takes it over keeps
its own, so the node readdresses the guest's ``eth0`` from inside its network namespace (a container has no
``CAP_NET_ADMIN`` to do it itself).

Nothing here removes a file: a share is only ever unmounted and ``rmdir``-ed, so a mount that did not go away
makes the removal fail instead of reaching into the user's home.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

from deckard.drivers.network import run_command
from deckard.model.errors import DriverError

MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _mount(source: str, target: str, flags: int) -> None:
    if _libc.mount(source.encode(), target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise DriverError(f"mount {source} on {target}: {os.strerror(err)}", code="guest_start_failed")


def mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point in this mount namespace.  ``os.path.ismount`` cannot tell: a bind mount of a
    directory of the same filesystem has the same device as its parent."""
    wanted = str(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            point = line.split(" ", 5)[4]
            if "\\" in point:  # spaces and the like are written as octal escapes
                point = point.encode().decode("unicode_escape")
            if point == wanted:
                return True
    return False


def make_share(share: Path) -> None:
    """``share`` as an empty shared mount point owned by the host's root (safe to repeat)."""
    share.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chown(share, 0, 0)
    share.chmod(0o755)
    if not mounted(share):
        _mount(str(share), str(share), MS_BIND)
    _mount("none", str(share), MS_SHARED)


def mount_home(share: Path, login: str, home: Path) -> None:
    """Bind ``home`` on ``share/<login>``: the container sees it at ``/home/<login>``."""
    target = share / login
    if mounted(target):
        raise DriverError(f"a home is mounted at {target} already", code="guest_start_failed")
    target.mkdir(mode=0o755, exist_ok=True)
    _mount(str(home), str(target), MS_BIND)


def release_share(share: Path) -> None:
    """Detach the share and the home under it, then remove the empty directories (``rmdir`` only)."""
    if not share.is_dir():
        return
    while mounted(share):  # a share mounted twice (a start that failed half-way, repeated) has two layers
        if _libc.umount2(str(share).encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise DriverError(f"umount {share}: {os.strerror(err)}", code="guest_stop_failed")
    for entry in share.iterdir():
        entry.rmdir()  # a login's empty mount point; anything else fails here and is left for an operator
    share.rmdir()


async def readdress(pid: int, ip: str, prefix_len: int, gateway: str) -> None:
    """Give the container whose init is ``pid`` the address ``ip``, in place of its own, and its default route."""
    batch = f"address flush dev eth0\naddress add {ip}/{prefix_len} dev eth0\nroute replace default via {gateway}\n"
    result = await run_command(["nsenter", "-t", str(pid), "-n", "ip", "-batch", "-"], check=False, stdin=batch)
    if result.returncode != 0:
        raise DriverError(f"readdressing the warm guest failed: {result.stderr.strip()}", code="guest_start_failed")
