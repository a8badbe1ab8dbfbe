"""Where a volume's bytes live: a small backend interface, and qcow2 files in the shared storage root behind it.

Why an interface of its own: the services (create, resize, snapshot, clone, delete) and the node (which hands
a volume to a guest) should not care whether a volume is a file or a device of a distributed block store.
:class:`VolumeBackend` is what both ask for; :class:`Qcow2Backend` keeps each volume as
``<storage>/volumes/<tenant id>/vol-<id>.qcow2`` with its snapshots inside (qcow2 internal snapshots), so a
volume is one file an operator can copy, and every node sees it (the storage root is shared).

Faults have stable codes (``DriverError`` / ``Conflict``): ``storage_full`` when the storage root has no room,
``volume_busy`` when QEMU's image lock says another process (a running VM) writes the file, ``bad_size`` for a
shrink.  A create or clone that fails leaves nothing behind: every step that made something pushes its undo on
an ``ExitStack`` (incus's ``revert``), and only success pops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Protocol

import structlog

from deckard.model.errors import BadInput, Conflict, DriverError, NotFound

log = structlog.get_logger()

QEMU_IMG_TIMEOUT_S = 600.0


class VolumeBackend(Protocol):
    """Volumes as a storage system keeps them.  Every method is a coroutine and raises the coded errors above."""

    name: str

    def path(self, tenant_id: int, volume_id: int) -> Path:
        """Where a guest opens the volume (a qcow2 file here; a device path for a block store)."""
        ...

    async def create(self, tenant_id: int, volume_id: int, size_gib: int) -> None:
        """An empty volume of ``size_gib``; nothing is left when it fails."""
        ...

    async def resize(self, tenant_id: int, volume_id: int, size_gib: int) -> None:
        """Grow to ``size_gib`` (``bad_size`` for a shrink); ``volume_busy`` while a guest has it open."""
        ...

    async def snapshot(self, tenant_id: int, volume_id: int, name: str) -> None:
        """Keep the volume as it is now under ``name``; ``volume_busy`` while a guest writes it."""
        ...

    async def delete_snapshot(self, tenant_id: int, volume_id: int, name: str) -> None: ...

    async def clone(self, tenant_id: int, volume_id: int, snapshot: str, new_tenant_id: int, new_id: int) -> int:
        """A new volume with the content of ``snapshot``; returns its size in GiB.  Nothing is left on failure."""
        ...

    async def delete(self, tenant_id: int, volume_id: int) -> None:
        """Remove the volume and its snapshots; a volume that is already gone is no error."""
        ...


class Qcow2Backend:
    """Volumes as qcow2 files under ``<storage_root>/volumes/<tenant id>/``, made and changed with ``qemu-img``."""

    name = "qcow2"

    def __init__(self, storage_root: Path) -> None:
        self.root = storage_root / "volumes"

    def path(self, tenant_id: int, volume_id: int) -> Path:
        return self.root / str(int(tenant_id)) / f"vol-{int(volume_id)}.qcow2"

    async def create(self, tenant_id: int, volume_id: int, size_gib: int) -> None:
        target = self.path(tenant_id, volume_id)
        with contextlib.ExitStack() as undo:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.new")
            undo.callback(tmp.unlink, missing_ok=True)
            await _qemu_img(["create", "-q", "-f", "qcow2", str(tmp), f"{int(size_gib)}G"], "creating the volume")
            os.chmod(tmp, 0o600)
            if target.exists():  # a leftover of a crashed create under the same id: never reuse its bytes
                target.unlink()
            tmp.rename(target)
            undo.pop_all()
        log.info("volume.created", volume_id=volume_id, size_gib=size_gib)

    async def resize(self, tenant_id: int, volume_id: int, size_gib: int) -> None:
        target = self._existing(tenant_id, volume_id)
        current = await self.virtual_size_gib(target)
        if size_gib < current:
            raise BadInput(
                f"a volume only grows: it has {current} GiB, so ask for {current} GiB or more", code="bad_size"
            )
        if size_gib == current:
            return
        await _qemu_img(["resize", "-q", "-f", "qcow2", str(target), f"{int(size_gib)}G"], "resizing the volume")

    async def snapshot(self, tenant_id: int, volume_id: int, name: str) -> None:
        target = self._existing(tenant_id, volume_id)
        await _qemu_img(["snapshot", "-q", "-c", name, str(target)], "taking the snapshot")

    async def delete_snapshot(self, tenant_id: int, volume_id: int, name: str) -> None:
        target = self.path(tenant_id, volume_id)
        if not target.exists() or name not in await self.snapshots(target):
            return
        await _qemu_img(["snapshot", "-q", "-d", name, str(target)], "deleting the snapshot")

    async def clone(self, tenant_id: int, volume_id: int, snapshot: str, new_tenant_id: int, new_id: int) -> int:
        source = self._existing(tenant_id, volume_id)
        target = self.path(new_tenant_id, new_id)
        with contextlib.ExitStack() as undo:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.new")
            undo.callback(tmp.unlink, missing_ok=True)
            args = ["convert", "-q", "-f", "qcow2", "-O", "qcow2", "-l", f"snapshot.name={snapshot}"]
            await _qemu_img([*args, str(source), str(tmp)], "cloning the snapshot")
            os.chmod(tmp, 0o600)
            size = await self.virtual_size_gib(tmp)
            tmp.rename(target)
            undo.pop_all()
        log.info("volume.cloned", source=volume_id, snapshot=snapshot, volume_id=new_id)
        return size

    async def delete(self, tenant_id: int, volume_id: int) -> None:
        target = self.path(tenant_id, volume_id)
        if not target.exists():
            return
        # a writer (a VM) holds QEMU's lock on the file: reading its info fails the same way, so we refuse
        await _qemu_img(["info", "--output=json", str(target)], "checking the volume")
        target.unlink(missing_ok=True)

    # -- reading -------------------------------------------------------------------------------------------
    async def virtual_size_gib(self, target: Path) -> int:
        info = json.loads(await _qemu_img(["info", "-U", "--output=json", str(target)], "reading the volume"))
        return int(info["virtual-size"]) >> 30

    async def snapshots(self, target: Path) -> list[str]:
        info = json.loads(await _qemu_img(["info", "-U", "--output=json", str(target)], "reading the volume"))
        return [str(s["name"]) for s in info.get("snapshots", [])]

    def _existing(self, tenant_id: int, volume_id: int) -> Path:
        target = self.path(tenant_id, volume_id)
        if not target.exists():
            raise NotFound(
                f"the file of volume {volume_id} is missing ({target}): restore it from a backup or delete the volume",
                code="volume_file_missing",
            )
        return target


def _locked(said: str) -> bool:
    """QEMU's words for an image lock another process holds (``Failed to get "write" lock``)."""
    return ("Failed to get" in said and " lock" in said) or "Is another process using the image" in said


async def _qemu_img(args: list[str], what: str) -> str:
    """Run ``qemu-img``; its failures become coded errors (full storage, a lock held by a VM, anything else)."""
    proc = await asyncio.create_subprocess_exec(
        "qemu-img",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), QEMU_IMG_TIMEOUT_S)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode == 0:
        return out.decode(errors="replace")
    said = (err or out).decode(errors="replace").strip()
    last = " | ".join(said.splitlines()[-3:])
    if "No space left" in said or "ENOSPC" in said:
        raise DriverError(
            f"{what} failed: the storage root is full ({last}); free space or grow it, then retry",
            code="storage_full",
        )
    if _locked(said):
        raise Conflict(
            f"{what} failed: a running desktop uses the volume ({last}); detach it or stop the desktop first",
            code="volume_busy",
        )
    raise DriverError(f"{what} failed (qemu-img exit {proc.returncode}): {last}", code="volume_failed")


# ---- a volume on the host: what a container bind-mounts ------------------------------------------------------
# A container has no disks of its own: the node exposes the qcow2 file as a raw image with qemu-storage-daemon's
# FUSE export (NBD is not in every kernel), puts a loop device on it, makes an ext4 file system on a new volume
# and mounts it under ``work/mnt``; the container driver bind-mounts that.  qemu-storage-daemon holds QEMU's
# image lock like a VM, so a volume a container writes cannot be opened for writing anywhere else.
HOST_STEP_TIMEOUT_S = 120.0
EXT4_MAGIC_AT, EXT4_MAGIC = 1080, b"\x53\xef"


async def mount_on_host(volume_path: Path, work: Path, *, read_only: bool, label: str) -> Path:
    """Mount the volume at ``work/mnt`` (formatting a new one as ext4 when read-write); undone on failure."""
    async with contextlib.AsyncExitStack() as undo:
        work.mkdir(parents=True, exist_ok=True)
        undo.push_async_callback(unmount_from_host, work)
        raw = work / "raw"
        raw.touch(mode=0o600)
        ro, writable = ("on", "off") if read_only else ("off", "on")
        await _host_step(
            [
                "qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=file,filename={volume_path},read-only={ro}",
                "--blockdev", f"driver=qcow2,node-name=disk,file=file,read-only={ro}",
                "--export", f"type=fuse,id=raw,node-name=disk,mountpoint={raw},writable={writable}",
                "--daemonize", "--pidfile", str(work / "qsd.pid"),
            ],
            "exporting the volume",
            log_path=work / "qsd.log",
        )  # fmt: skip
        loop = (
            await _host_step(
                ["losetup", "--find", "--show", *(["--read-only"] if read_only else []), str(raw)], "attaching a loop"
            )
        ).strip()
        (work / "loop").write_text(loop + "\n")
        if not read_only and not await asyncio.to_thread(_is_ext4, Path(loop)):
            await _host_step(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", label[:16], loop], "formatting the volume")
        mnt = work / "mnt"
        mnt.mkdir(exist_ok=True)
        options = "noatime,nosuid,nodev" + (",ro,noload" if read_only else "")
        try:
            await _host_step(["mount", "-t", "ext4", "-o", options, loop, str(mnt)], "mounting the volume")
        except DriverError as e:
            if read_only:
                raise DriverError(
                    f"the volume has no file system to mount read-only ({e.message}): attach it read-write once "
                    "so that it is formatted",
                    code="volume_unformatted",
                ) from None
            raise
        undo.pop_all()
    return mnt


async def unmount_from_host(work: Path) -> None:
    """Undo :func:`mount_on_host` (every step that was done), safe to repeat; the directory goes last, and only
    once nothing is mounted in it (a recursive delete must never reach into a volume)."""
    mnt, raw = work / "mnt", work / "raw"
    if os.path.ismount(mnt) and (await _run(["umount", str(mnt)])).returncode != 0:
        await _run(["umount", "-l", str(mnt)])  # a process left inside: detach it now, the kernel finishes
    loop = _read(work / "loop")
    if loop.startswith("/dev/loop"):
        await _run(["losetup", "-d", loop])
        (work / "loop").unlink(missing_ok=True)
    pid = _read(work / "qsd.pid")
    if pid.isdigit() and b"qemu-storage-daemon" in _read_bytes(Path(f"/proc/{pid}/cmdline")):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), 15)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            await asyncio.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
    if os.path.ismount(raw):
        await _run(["umount", "-l", str(raw)])
    if os.path.ismount(mnt) or os.path.ismount(raw):
        log.error("volume.still_mounted", work=str(work))
        return
    for path in (work / "qsd.pid", work / "qsd.log", raw):
        path.unlink(missing_ok=True)
    for directory in (mnt, work):
        with contextlib.suppress(OSError):
            directory.rmdir()


def _is_ext4(device: Path) -> bool:
    with device.open("rb") as f:
        f.seek(EXT4_MAGIC_AT)
        return f.read(2) == EXT4_MAGIC


def _read(path: Path) -> str:
    return _read_bytes(path).decode(errors="replace").strip()


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


async def _run(args: list[str]) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    await asyncio.wait_for(proc.wait(), HOST_STEP_TIMEOUT_S)
    return proc


async def _host_step(args: list[str], what: str, *, log_path: Path | None = None) -> str:
    """Run one step; a daemon (``log_path``) gets no pipes: it would hold them open, and uvloop waits for them."""
    if log_path is None:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), HOST_STEP_TIMEOUT_S)
    else:
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=log_file
            )
        await asyncio.wait_for(proc.wait(), HOST_STEP_TIMEOUT_S)
        out, err = b"", log_path.read_bytes()
    if proc.returncode == 0:
        return out.decode(errors="replace")
    said = " | ".join((err or out).decode(errors="replace").strip().splitlines()[-3:])
    if _locked(said):
        raise Conflict(f"{what} failed: another desktop writes the volume ({said})", code="volume_busy")
    if "No space left" in said:
        raise DriverError(f"{what} failed: the storage root is full ({said})", code="storage_full")
    raise DriverError(f"{what} failed ({args[0]} exit {proc.returncode}): {said}", code="volume_failed")
