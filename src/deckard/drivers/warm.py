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
``CAP_NET_ADMIN`` to do it itself), from a thread of its own (:func:`readdress`).

Nothing here removes a file: a share is only ever unmounted and ``rmdir``-ed, so a mount that did not go away
makes the removal fail instead of reaching into the user's home.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import os
import socket
import struct
import threading
from pathlib import Path

from deckard.model.errors import DriverError

MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 2
CLONE_NEWNET = 0x40000000
SIOCSIFADDR, SIOCSIFNETMASK, SIOCADDRT = 0x8916, 0x891C, 0x890B
RTF_UP, RTF_GATEWAY = 0x1, 0x2

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
    """Give the container whose init is ``pid`` the address ``ip``, in place of its own, and its default route.

    In this process (~2 ms, where ``nsenter ip`` took two programs): a thread of its own enters the container's
    network namespace (only that thread: namespaces are per thread), changes ``eth0``'s address and mask with the
    classic ioctls and puts the default route back (changing the address drops it), then ends: a thread that could
    not come back to the host's namespace is gone with it, never reused."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def work() -> None:
        try:
            _readdress_in(f"/proc/{pid}/ns/net", ip, prefix_len, gateway)
        except BaseException as exc:  # handed to the waiting coroutine
            loop.call_soon_threadsafe(done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(done.set_result, None)

    threading.Thread(target=work, daemon=True, name=f"readdress-{pid}").start()
    try:
        await done
    except OSError as exc:
        raise DriverError(f"readdressing the warm guest failed: {exc}", code="guest_start_failed") from None


def _sockaddr(ip: str) -> bytes:
    return struct.pack("=H2s4s8x", socket.AF_INET, b"", socket.inet_aton(ip))


def _ifreq(device: str, ip: str) -> bytes:
    return struct.pack("16s", device.encode()) + _sockaddr(ip) + bytes(8)


def _readdress_in(netns: str, ip: str, prefix_len: int, gateway: str) -> None:
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # never the node's own namespace (a process not, or no longer, the guest's init): its eth0 is the host's
            if os.fstat(target).st_ino == os.fstat(own).st_ino:
                raise OSError(errno.EINVAL, f"{netns} is the node's own network namespace, not a guest's")
            if _libc.setns(target, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns: {os.strerror(err)}")
        finally:
            os.close(target)
        try:
            mask = socket.inet_ntoa(struct.pack("!I", (0xFFFFFFFF << (32 - prefix_len)) & 0xFFFFFFFF))
            # struct rtentry (x86-64): the default route via the gateway, on whichever device reaches it
            route = struct.pack(
                "=Q16s16s16sHh4xQQh6xQQQH6x",
                0, _sockaddr("0.0.0.0"), _sockaddr(gateway), _sockaddr("0.0.0.0"),
                RTF_UP | RTF_GATEWAY, 0, 0, 0, 0, 0, 0, 0, 0,
            )  # fmt: skip
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # a socket of the container's namespace
                fcntl.ioctl(sock, SIOCSIFADDR, _ifreq("eth0", ip))
                fcntl.ioctl(sock, SIOCSIFNETMASK, _ifreq("eth0", mask))
                try:
                    fcntl.ioctl(sock, SIOCADDRT, route)
                except FileExistsError:
                    pass
        finally:
            _libc.setns(own, CLONE_NEWNET)  # if this failed, the thread ends in the container's namespace: harmless
    finally:
        os.close(own)
