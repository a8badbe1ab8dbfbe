"""The VM driver: one desktop is one QEMU virtual machine, KVM where a real probe shows it works, TCG otherwise.

What a VM desktop is made of (``docs/vm-desktops.md``):

* the **base disk** ``basefs/<image id>-vm<boot version>/disk.qcow2``: the image's rootfs as an ext4 disk, with the
  kernel (``vmlinux``) and the initrd beside it (``drivers/vm_boot.py``), made once per image by
  :meth:`VmDriver.prepare_image` (the node's image loop calls it ahead of time).  Read-only to every guest;
* the **overlay** ``overlays/dk<farm>-<id>/disk.qcow2`` over the base, in the shared storage, thrown away at every
  start unless the OSF keeps it (and always when the base changed under a kept one);
* the user's **home disk** ``homes/<tenant>/<home key>.qcow2`` in the shared storage, so any node can start the
  desktop; the guest formats it on first use and mounts it on ``/home/<login>``.  QEMU locks every disk it
  writes, so a home can never be open in two machines;
* a **config disk** per start (agent token, display secret, address, hostname; see ``vm_boot.config_files``);
* a **tap** on the desktop bridge, isolated like a container's veth, with the desktop's fixed MAC.

QEMU runs detached (it outlives the node daemon, which adopts it again after a restart, as LXC containers are),
drops to the farm's unprivileged host uid (``-runas``, the same uid as a container's root) and confines itself
with seccomp (``-sandbox``).  The node drives it over QMP: ``system_powerdown`` (ACPI power button, which the
agent answers by powering off) then kill, ``query-status`` to see whether the guest still runs, panicked
(``pvpanic``) or powered off (QEMU pauses instead of exiting, so the console can still be read).  The serial
console goes to a 1 MiB ring in QEMU, which the driver copies into ``logs/console/<guest>.log`` when asked and
before killing, so a guest can never fill the host's disk with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from deckard.drivers import firewall
from deckard.drivers.agent_code import precompile_agent
from deckard.drivers.base import GuestInfo, GuestSpec, VolumeMount
from deckard.drivers.container import ContainerDriver, ensure_traversable
from deckard.drivers.display import display_password, vnc_password_file
from deckard.drivers.lxc_config import farm_id_base
from deckard.drivers.network import IFNAMSIZ, delete_link, flush_neighbour, isolate_port, run_command
from deckard.drivers.vm_boot import (
    BOOT_VERSION,
    CONFIG_LABEL,
    CONFIG_SERIAL,
    HOME_SERIAL,
    ROOT_SERIAL,
    GuestConf,
    config_files,
    find_kernel,
    initrd_image,
    kernel_command_line,
    vmlinux_from_bzimage,
)
from deckard.model.errors import Conflict, DriverError
from deckard.runtime.paths import FarmPaths, read_tail
from deckard.runtime.process import pid_alive

log = structlog.get_logger()

QEMU = "qemu-system-x86_64"
QBOOT = Path("/usr/share/qemu/qboot.rom")  # a firmware that does nothing but jump to the kernel
QCOW2_MAGIC = b"QFI\xfb"
HOME_DISK_GIB = 16  # virtual size of a new home disk (qcow2 grows as it is written)
CONSOLE_RING = 1 << 20
CONSOLE_KEEP = 1 << 20  # bytes of console log kept on the host per guest
PREPARE_TIMEOUT_S = 900.0
KVM_PROBE_S = 8.0
KVM_VERDICT = Path("/run/deckard-kvm-probe")  # per machine boot: the probe's answer, so it runs once
UNPLUG_S = 20.0  # a guest under TCG takes a few seconds to answer the ACPI unplug request
STOPPED_STATES = frozenset({"shutdown", "guest-panicked", "internal-error", "io-error"})


def tap_name(guest_name: str) -> str:
    name = "t" + guest_name.replace("-", "")
    return name if len(name) <= IFNAMSIZ else "t" + hashlib.sha256(guest_name.encode()).hexdigest()[: IFNAMSIZ - 1]


class VmDriver:
    """Desktops as QEMU machines on this machine, run state under ``paths.vm/<guest>``."""

    name = "vm"

    def __init__(self, paths: FarmPaths, *, accel: str = "auto") -> None:
        if accel not in ("auto", "kvm", "tcg"):
            raise DriverError(f"unknown accelerator {accel!r}: choose auto, kvm or tcg", code="bad_accel")
        self.paths = paths
        self.uid = farm_id_base(paths.farm_id)  # QEMU drops to the farm's unprivileged uid, a container root's
        self._accel = accel
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, guest_name: str) -> asyncio.Lock:
        return self._locks.setdefault(guest_name, asyncio.Lock())

    def _dir(self, guest_name: str) -> Path:
        return self.paths.vm / guest_name

    def console_path(self, guest_name: str) -> Path:
        """In the farm home, by desktop (guest names differ between nodes): readable after a stop or a move."""
        return self.paths.logs / "console" / f"desktop-{guest_name.rsplit('-', 1)[-1]}.log"

    # -- images --------------------------------------------------------------------------------------------
    async def prepare_image(self, image_id: int, image_path: Path) -> None:
        await self.ensure_base(image_id, image_path, background=True)

    async def ensure_base(self, image_id: int, image_path: Path, *, background: bool = False) -> Path:
        """Make ``basefs/<id>-vm<version>/`` (disk, kernel, initrd) from the image once; return the directory."""
        target = self.paths.basefs / f"{image_id}-vm{BOOT_VERSION}"
        if (target / "disk.qcow2").exists():
            return target
        if not image_path.is_file():
            raise DriverError(
                f"disk image {image_id} is missing: {image_path} does not exist; rebuild or re-import the image",
                code="image_missing",
                details={"path": str(image_path)},
            )
        self.paths.basefs.mkdir(parents=True, exist_ok=True)
        lock_fd = await asyncio.to_thread(ContainerDriver._flock, self.paths.basefs / f".{image_id}.vm.lock")
        try:
            if (target / "disk.qcow2").exists():
                return target
            for stale in self.paths.basefs.glob(f".{image_id}.vm-*"):
                await asyncio.to_thread(shutil.rmtree, stale, True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{image_id}.vm-", dir=self.paths.basefs))
            try:
                t0 = time.monotonic()
                await self._make_base(image_path, tmp, background)
                for path in tmp.iterdir():
                    path.chmod(0o644)
                tmp.chmod(0o755)
                tmp.rename(target)
                log.info("vm.image_prepared", image_id=image_id, seconds=round(time.monotonic() - t0, 2))
            except BaseException:
                await asyncio.to_thread(shutil.rmtree, tmp, True)
                raise
        finally:
            os.close(lock_fd)
        return target

    async def _make_base(self, image_path: Path, tmp: Path, background: bool) -> None:
        with image_path.open("rb") as f:
            magic = f.read(4)
        if magic == QCOW2_MAGIC:  # a disk an administrator built: booted by its own firmware and bootloader
            (tmp / "disk.qcow2").symlink_to(image_path.resolve())
            return
        nice = ["nice", "-n", "10"] if background else []
        rootfs = tmp / "rootfs"
        rootfs.mkdir()
        await _checked([*nice, "tar", "--numeric-owner", "-xf", str(image_path), "-C", str(rootfs)], "unpacking")
        kernel = find_kernel(rootfs)
        if kernel is None:
            raise DriverError(
                f"image {image_path.name} has no kernel, so it cannot boot as a VM: build it with "
                "`deckard image build --format vm` (or `deckard image add --build --build-format vm`)",
                code="image_not_bootable",
            )
        bzimage, version = kernel
        vmlinux = await asyncio.to_thread(vmlinux_from_bzimage, bzimage.read_bytes())
        if vmlinux is not None:
            (tmp / "vmlinux").write_bytes(vmlinux)
        else:  # an unknown compression: QEMU boots the bzImage itself, only slower
            shutil.copyfile(bzimage, tmp / "vmlinux")
        (tmp / "initrd.img").write_bytes(await asyncio.to_thread(initrd_image, rootfs, version))
        await asyncio.to_thread(precompile_agent, rootfs)
        used = int((await _checked(["du", "-sb", str(rootfs)], "measuring")).split()[0])
        size_mib = (int(used * 1.3) >> 20) + 1024
        raw = tmp / "disk.raw"
        await _checked(
            [*nice, "mkfs.ext4", "-q", "-F", "-L", "root", "-i", "8192", "-d", str(rootfs), str(raw), f"{size_mib}M"],
            "making the root disk",
        )
        await asyncio.to_thread(shutil.rmtree, rootfs)
        await _checked(
            [*nice, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp / "disk.qcow2")],
            "converting the root disk",
        )
        raw.unlink()

    # -- start ---------------------------------------------------------------------------------------------
    async def start(self, spec: GuestSpec) -> GuestInfo:
        async with self._lock(spec.guest_name):
            info = await self._info(spec.guest_name)
            if info is not None and info.running:
                return info
            await self._kill(spec.guest_name)
            base = await self.ensure_base(spec.image_id, spec.image_path)
            try:
                return await self._start(spec, base)
            except BaseException:
                await self._kill(spec.guest_name)
                raise

    async def _start(self, spec: GuestSpec, base: Path) -> GuestInfo:
        run = self._dir(spec.guest_name)
        run.mkdir(parents=True, exist_ok=True)
        run.chmod(0o711)
        tap = tap_name(spec.guest_name)
        meta = {"desktop_id": spec.desktop_id, "ip": spec.reach_ip, "tap": tap, "keep_overlay": spec.keep_overlay}
        (run / "deckard.json").write_text(json.dumps(meta))
        await asyncio.to_thread(self._rotate_console, spec.guest_name)
        overlay = await self._prepare_overlay(spec, base)
        home = await self._prepare_home(spec.home_dir)
        config = await self._config_disk(spec, run)
        for path in (base, overlay, home):
            await asyncio.to_thread(ensure_traversable, path, self.paths.home)
        await self._tap(tap, spec.bridge)
        await firewall.guard_port(tap, spec.mac, spec.ip)  # root in the VM sends with its own addresses only
        await flush_neighbour(spec.reach_ip)
        accel = await self._accelerator(base)
        args = self._command(spec, base, overlay, home, config, tap, accel)
        (run / "command").write_text(" ".join(args) + "\n")
        returncode = await _launch(args, run / "qemu.log")
        if returncode != 0:
            said = (run / "qemu.log").read_text(errors="replace").strip()[-500:]
            if "lock" in said and str(home) in said:  # QEMU locks every disk it writes
                raise DriverError(
                    f"{spec.user_login}'s home disk is in use by another of their VM desktops: stop that one first",
                    code="home_in_use",
                )
            raise DriverError(f"QEMU did not start {spec.guest_name}: {said}", code="guest_start_failed")
        info = await self._info(spec.guest_name)
        if info is None or not info.running:
            raise DriverError(f"{spec.guest_name} stopped right after start", code="guest_start_failed")
        log.info("vm.started", guest=spec.guest_name, pid=info.pid, ip=spec.reach_ip, accel=accel)
        return info

    def _command(
        self, spec: GuestSpec, base: Path, overlay: Path, home: Path, config: Path, tap: str, accel: str
    ) -> list[str]:
        run = self._dir(spec.guest_name)
        kernel = base / "vmlinux"
        cpus = max(1, round(spec.cpus))
        args = [
            QEMU,
            "-name", f"guest={spec.guest_name},debug-threads=on",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", f"pc,accel={accel}",
            "-cpu", "host" if accel == "kvm" else "max",
            "-smp", str(cpus),
            "-m", str(spec.memory_mib),
        ]  # fmt: skip
        if kernel.exists():
            if QBOOT.exists():
                args += ["-bios", str(QBOOT)]
            args += ["-kernel", str(kernel), "-initrd", str(base / "initrd.img"), "-append", kernel_command_line()]
        cache = "writeback" if spec.keep_overlay else "unsafe"  # a thrown-away overlay needs no flushes
        disks = [
            (overlay, "qcow2", ROOT_SERIAL, f"cache={cache},discard=unmap"),
            (home, "qcow2", HOME_SERIAL, "cache=writeback,discard=unmap"),
            (config, "raw", CONFIG_SERIAL, "readonly=on"),
        ]
        for n, (path, fmt, serial, opts) in enumerate(disks):
            device = f"virtio-blk-pci,drive=disk{n},serial={serial}"
            if n == 0 and not kernel.exists():  # firmware boot of an imported disk: from the root disk
                device += ",bootindex=0"
            args += ["-drive", f"file={path},if=none,id=disk{n},format={fmt},{opts}", "-device", device]
        for volume in spec.volumes:  # attached volumes: found by serial (vol-<id>), unplugged by id (attach_volume)
            read_only = "on" if volume.read_only else "off"
            args += [
                "-blockdev",
                f"driver=qcow2,node-name={_volume_node(volume.volume_id)},read-only={read_only},"
                f"file.driver=file,file.filename={volume.path}",
                "-device",
                f"virtio-blk-pci,drive={_volume_node(volume.volume_id)},id={volume.serial},serial={volume.serial}",
            ]
        args += [
            "-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=net0,mac={spec.mac}",
            "-device", "virtio-rng-pci",
            "-device", "pvpanic",
            "-chardev", f"ringbuf,id=console,size={CONSOLE_RING}",
            "-serial", "chardev:console",
            "-qmp", f"unix:{run / 'qmp.sock'},server=on,wait=off",
            # a guest that powers off or panics is paused, not gone: its console can still be read
            "-action", "shutdown=pause",
            "-action", "panic=pause",
            "-action", "reboot=shutdown",
            "-runas", f"{self.uid}:{self.uid}",
            # seccomp: no obsolete or resource-control calls.  Forking stays allowed (-daemonize forks after the
            # filter is in place) and so does set*id (-runas needs it); once -runas has dropped to the farm's uid
            # no capability is left, so set*id cannot gain anything
            "-sandbox", "on,obsolete=deny,resourcecontrol=deny",
            "-daemonize",
            "-pidfile", str(run / "qemu.pid"),
        ]  # fmt: skip
        return args

    async def _prepare_overlay(self, spec: GuestSpec, base: Path) -> Path:
        root = self.paths.overlay(spec.desktop_id)
        overlay = root / "disk.qcow2"
        backing = base / "disk.qcow2"
        marker = root / "base"
        kept = (
            spec.keep_overlay
            and not spec.first_start  # an earlier desktop's, whose id this one has (GuestSpec.first_start)
            and overlay.exists()
            and marker.is_file()
            and marker.read_text() == str(backing)
        )
        if not kept:
            if root.exists():
                await asyncio.to_thread(shutil.rmtree, root)
            root.mkdir(parents=True)
            await _checked(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(overlay)],
                "creating the overlay",
            )
            marker.write_text(str(backing))
        os.chmod(root, 0o711)
        os.chown(overlay, self.uid, self.uid)
        os.chmod(overlay, 0o600)
        return overlay

    async def _prepare_home(self, home_dir: Path) -> Path:
        """The user's home disk beside where a container home would be; made empty (the guest formats it)."""
        disk = home_dir.with_name(home_dir.name + ".qcow2")
        if not disk.exists():
            disk.parent.mkdir(parents=True, exist_ok=True)
            tmp = disk.with_name(f".{disk.name}.new")
            size = f"{HOME_DISK_GIB}G"
            await _checked(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp), size], "creating the home disk")
            os.chown(tmp, self.uid, self.uid)
            os.chmod(tmp, 0o600)
            tmp.rename(disk)
        elif disk.stat().st_uid != self.uid:
            os.chown(disk, self.uid, self.uid)
        return disk

    async def _config_disk(self, spec: GuestSpec, run: Path) -> Path:
        conf = GuestConf(
            spec.guest_name,
            spec.ip,
            spec.prefix_len,
            spec.gateway,
            spec.user_login,
            spec.user_uid,
            spec.dns_search,
            glx=spec.glx,
        )
        files = config_files(
            conf,
            agent_token=spec.agent_token,
            display_secret=vnc_password_file(display_password(spec.agent_token)),
            extra=spec.seed,
        )
        image = run / "config.img"
        staging = Path(tempfile.mkdtemp(prefix="config-", dir=run))
        try:
            for name, data in files.items():
                path = staging / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            size_kib = max(1024, (sum(len(d) for d in files.values()) >> 10) * 2 + 512)
            image.unlink(missing_ok=True)
            await _checked(["mkfs.vfat", "-C", "-n", CONFIG_LABEL, str(image), str(size_kib)], "making the config disk")
            entries = [str(p) for p in staging.iterdir()]
            await _checked(["mcopy", "-s", "-i", str(image), *entries, "::"], "writing the config disk")
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)
        os.chown(image, self.uid, self.uid)
        os.chmod(image, 0o400)
        return image

    async def _tap(self, tap: str, bridge: str) -> None:
        await delete_link(tap)
        await run_command(["ip", "tuntap", "add", "dev", tap, "mode", "tap", "user", str(self.uid)])
        await run_command(["ip", "link", "set", tap, "master", bridge])
        await isolate_port(tap)  # before the guest can send a packet: desktops never see each other
        await run_command(["ip", "link", "set", tap, "up"])

    async def _accelerator(self, base: Path) -> str:
        if self._accel != "auto":
            return self._accel
        self._accel = await asyncio.to_thread(probe_kvm, base)
        return self._accel

    # -- stop / kill ---------------------------------------------------------------------------------------
    async def stop(self, guest_name: str, timeout: float = 10.0) -> None:
        async with self._lock(guest_name):
            info = await self._info(guest_name)
            if info is not None and info.running:
                with contextlib.suppress(DriverError):
                    await self._qmp(guest_name, "system_powerdown")
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    info = await self._info(guest_name)
                    if info is None or not info.running:
                        break
                    await asyncio.sleep(0.1)
            await self._kill(guest_name)

    async def kill(self, guest_name: str) -> None:
        async with self._lock(guest_name):
            await self._kill(guest_name)

    async def _kill(self, guest_name: str) -> None:
        run = self._dir(guest_name)
        meta = _read_json(run / "deckard.json")
        pid = self._pid(guest_name)
        if pid is not None:
            with contextlib.suppress(DriverError, OSError):
                await self._harvest_console(guest_name)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            for _ in range(100):  # QEMU's locks on the disks go with the process
                if not pid_alive(pid):
                    break
                await asyncio.sleep(0.05)
        tap = str(meta["tap"]) if isinstance(meta.get("tap"), str) else tap_name(guest_name)
        await delete_link(tap)
        await firewall.remove_port_guard(tap)
        if isinstance(meta.get("ip"), str):
            await flush_neighbour(str(meta["ip"]))
        desktop_id = meta.get("desktop_id")
        if meta.get("keep_overlay") is False and isinstance(desktop_id, int):
            await asyncio.to_thread(shutil.rmtree, self.paths.overlay(desktop_id), True)
        await asyncio.to_thread(shutil.rmtree, run, True)

    # -- observe -------------------------------------------------------------------------------------------
    async def inspect(self, guest_name: str) -> GuestInfo | None:
        return await self._info(guest_name)

    async def list(self) -> list[GuestInfo]:
        if not self.paths.vm.is_dir():
            return []
        prefix = self.paths.guest_prefix()
        names = sorted(p.name for p in self.paths.vm.iterdir() if p.name.startswith(prefix))
        infos = [await self._info(name) for name in names]
        return [info for info in infos if info is not None]

    async def close(self) -> None:
        """Nothing to release: every QEMU is a process of its own and outlives the daemon."""

    async def console_log(self, guest_name: str, max_bytes: int = 65536) -> str:
        """The guest's serial console (kernel, init and agent messages), last ``max_bytes``."""
        if self._pid(guest_name) is not None:
            with contextlib.suppress(DriverError, OSError):
                await self._harvest_console(guest_name)
        tail = read_tail(self.console_path(guest_name), max_bytes)
        return tail[0] if tail else ""

    async def _info(self, guest_name: str) -> GuestInfo | None:
        run = self._dir(guest_name)
        if not run.is_dir():
            return None
        meta = _read_json(run / "deckard.json")
        ip = meta.get("ip") if isinstance(meta.get("ip"), str) else None
        pid = self._pid(guest_name)
        if pid is None:
            return GuestInfo(guest_name=guest_name, running=False, ip=ip)
        running = True
        with contextlib.suppress(DriverError):
            status = await self._qmp(guest_name, "query-status")
            running = isinstance(status, dict) and status.get("status") not in STOPPED_STATES
        return GuestInfo(guest_name=guest_name, running=running, pid=pid, ip=ip, memory_bytes=_rss(pid))

    def _pid(self, guest_name: str) -> int | None:
        """QEMU's pid for this guest, when that process is alive and really is this guest's QEMU."""
        try:
            pid = int((self._dir(guest_name) / "qemu.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if f"guest={guest_name},".encode() in cmdline else None

    async def _qmp(self, guest_name: str, command: str, arguments: dict[str, Any] | None = None) -> object:
        from qemu.qmp import QMPClient  # imported here: only VM nodes need it

        client = QMPClient(guest_name)
        try:
            await asyncio.wait_for(client.connect(str(self._dir(guest_name) / "qmp.sock")), 3.0)
            return await asyncio.wait_for(client.execute(command, arguments), 5.0)
        except Exception as e:  # the library's errors, a timeout, a socket that is gone
            raise DriverError(f"QMP {command} on {guest_name} failed: {e}", code="qmp_failed") from None
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()

    async def _harvest_console(self, guest_name: str) -> None:
        """Move what the console ring holds into the guest's console log (kept to :data:`CONSOLE_KEEP`)."""
        read = {"device": "console", "size": CONSOLE_RING, "format": "utf8"}
        data = await self._qmp(guest_name, "ringbuf-read", read)
        if not isinstance(data, str) or not data:
            return
        path = self.console_path(guest_name)
        await asyncio.to_thread(_append_capped, path, data.encode(errors="replace"), CONSOLE_KEEP)

    def _rotate_console(self, guest_name: str) -> None:
        path = self.console_path(guest_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.replace(path.with_name(path.name + ".1"))

    # -- volumes (docs/volumes.md): hot plug over QMP --------------------------------------------------------
    async def attach_volume(self, guest_name: str, volume: VolumeMount) -> bool:
        """Hot-plug the volume as a virtio disk with serial ``vol-<id>`` (``blockdev-add`` + ``device_add``).

        QEMU runs as the farm's unprivileged uid by now, so the file is handed to it first.  QEMU's image lock
        refuses a volume another machine writes (``volume_busy``)."""
        async with self._lock(guest_name):
            if self._pid(guest_name) is None:
                raise DriverError(f"{guest_name} is not running", code="guest_not_running")
            if await self._has_device(guest_name, volume.serial):
                return True
            await asyncio.to_thread(self._hand_over, volume.path)
            node = _volume_node(volume.volume_id)
            with contextlib.suppress(DriverError):  # a node a failed attach left behind
                await self._qmp(guest_name, "blockdev-del", {"node-name": node})
            blockdev = {
                "driver": "qcow2",
                "node-name": node,
                "read-only": volume.read_only,
                "file": {"driver": "file", "filename": str(volume.path)},
            }
            try:
                await self._qmp(guest_name, "blockdev-add", blockdev)
            except DriverError as e:
                if "lock" in e.message:
                    raise Conflict(
                        f"another desktop writes volume {volume.volume_id}: detach it there first",
                        code="volume_busy",
                    ) from None
                raise
            device = {"driver": "virtio-blk-pci", "id": volume.serial, "drive": node, "serial": volume.serial}
            try:
                await self._qmp(guest_name, "device_add", device)
            except BaseException:
                with contextlib.suppress(DriverError):
                    await self._qmp(guest_name, "blockdev-del", {"node-name": node})
                raise
            log.info("vm.volume_attached", guest=guest_name, volume_id=volume.volume_id, read_only=volume.read_only)
            return True

    async def detach_volume(self, guest_name: str, volume_id: int) -> bool:
        """Unplug the volume's disk (``device_del``; the guest's kernel lets go of it), then close the image.

        The node asked the guest first whether anything there uses the disk; a guest that does not release it
        within :data:`UNPLUG_S` keeps it (``volume_held``)."""
        serial = f"vol-{volume_id}"
        async with self._lock(guest_name):
            if self._pid(guest_name) is None:
                return True
            if await self._has_device(guest_name, serial):
                await self._qmp(guest_name, "device_del", {"id": serial})
                deadline = time.monotonic() + UNPLUG_S
                while await self._has_device(guest_name, serial):
                    if time.monotonic() > deadline:
                        raise Conflict(
                            f"the guest did not release volume {volume_id} within {UNPLUG_S:.0f} s: unmount it there",
                            code="volume_held",
                        )
                    await asyncio.sleep(0.2)
            # the image stays open (and locked) until its block node is gone: a device still being torn down holds
            # it a moment longer, so the delete is tried again until the node is gone
            node = _volume_node(volume_id)
            deadline = time.monotonic() + UNPLUG_S
            while await self._has_block_node(guest_name, node):
                with contextlib.suppress(DriverError):  # in use a little longer: the next round tries again
                    await self._qmp(guest_name, "blockdev-del", {"node-name": node})
                if not await self._has_block_node(guest_name, node):
                    break
                if time.monotonic() > deadline:
                    raise Conflict(
                        f"QEMU did not close volume {volume_id} within {UNPLUG_S:.0f} s; try again",
                        code="volume_held",
                    )
                await asyncio.sleep(0.2)
            log.info("vm.volume_detached", guest=guest_name, volume_id=volume_id)
            return True

    async def _has_block_node(self, guest_name: str, node: str) -> bool:
        found = await self._qmp(guest_name, "query-named-block-nodes", {"flat": True})
        return isinstance(found, list) and any(isinstance(b, dict) and b.get("node-name") == node for b in found)

    async def _has_device(self, guest_name: str, device_id: str) -> bool:
        found = await self._qmp(guest_name, "qom-list", {"path": "/machine/peripheral"})
        return isinstance(found, list) and any(isinstance(p, dict) and p.get("name") == device_id for p in found)

    def _hand_over(self, path: Path) -> None:
        ensure_traversable(path, self.paths.home)
        if path.stat().st_uid != self.uid:
            os.chown(path, self.uid, self.uid)


# ---- helpers ----------------------------------------------------------------------------------------------
async def _launch(args: list[str], log_path: Path, timeout: float = 30.0) -> int:
    """Run QEMU until it has daemonized; its messages go to ``log_path``.  No pipes: the daemon would inherit
    them, and uvloop waits for their end as for the process's."""
    with log_path.open("ab") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=log_file
        )
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise


async def _checked(args: list[str], what: str) -> str:
    result = await run_command(args, check=False, timeout=PREPARE_TIMEOUT_S)
    if result.returncode != 0:
        words = (result.stderr or result.stdout).strip().splitlines()[-3:]
        code = "storage_full" if "No space left" in result.stderr else "vm_disk_failed"
        raise DriverError(f"{what} failed ({args[0]} exit {result.returncode}): {' | '.join(words)}", code=code)
    return result.stdout


def _volume_node(volume_id: int) -> str:
    """The QEMU block node of a volume (its device's id is the serial, ``vol-<id>``)."""
    return f"vol-{volume_id}-disk"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _append_capped(path: Path, data: bytes, keep: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        f.write(data)
        size = f.tell()
    if size > 2 * keep:
        tail = path.read_bytes()[-keep:]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(tail)
        tmp.replace(path)


def probe_kvm(base: Path) -> str:
    """ "kvm" when this machine really runs a guest kernel under KVM, else "tcg" (answer kept per boot).

    ``/dev/kvm`` existing proves little: on some hosts (nested PVM) it opens but hangs a stock kernel.  So the
    probe boots the image's own kernel and initrd under KVM with no disks: the initrd's init says so on the
    serial port and powers off, all within :data:`KVM_PROBE_S` when KVM works.
    """
    with contextlib.suppress(OSError):
        verdict = KVM_VERDICT.read_text().strip()
        if verdict in ("kvm", "tcg"):
            return verdict
    verdict = "tcg"
    kernel = base / "vmlinux"
    if os.access("/dev/kvm", os.R_OK | os.W_OK) and kernel.exists() and shutil.which(QEMU):
        import subprocess

        args = [
            QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-machine", "pc,accel=kvm", "-cpu", "host",
            "-m", "256", "-kernel", str(kernel), "-initrd", str(base / "initrd.img"),
            "-append", "console=ttyS0 quiet panic=-1", "-serial", "stdio", "-no-reboot",
        ]  # fmt: skip
        try:
            out = subprocess.run(args, capture_output=True, timeout=KVM_PROBE_S, check=False)
            if b"deckard-init:" in out.stdout:
                verdict = "kvm"
        except (subprocess.TimeoutExpired, OSError):
            pass
    with contextlib.suppress(OSError):
        KVM_VERDICT.write_text(verdict + "\n")
    log.info("vm.accelerator", accel=verdict)
    return verdict
