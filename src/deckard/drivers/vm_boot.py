"""How a VM desktop boots fast: the kernel unpacked once, a tiny initrd made here, a config disk per start.

A stock Debian guest takes 11.5 s under TCG to reach an RFB banner (``reference/platform.md``).  Most of that
is firmware, a bootloader, decompressing the kernel and a general-purpose init.  A VM image here is an
ordinary Deckard image tarball that also carries Debian's kernel, a pruned ``/lib/modules`` and a static
busybox (``deckard image build --format vm``); the node turns it once (:func:`vmlinux_from_bzimage`,
:func:`initrd_image`) into:

* ``vmlinux``: the uncompressed kernel, booted through its PVH entry point (no decompression, ~4 s saved);
* ``initrd.img``: busybox, the dozen modules a virtio desktop needs, and :func:`render_init`, which loads
  them, mounts the root disk, the user's home disk (formatting it on first use) and the config disk,
  configures the network and hands over to the guest agent as PID 1;
* ``disk.qcow2``: the rootfs as an ext4 disk (the read-only base every desktop's overlay points at).

The **config disk** (:func:`config_files`) is a small FAT image labelled ``CIDATA`` written at every start: the
agent token, the display secret and ``guest.conf`` (address, gateway, hostname, user) under ``deckard/``, next to
cloud-init's NoCloud files.  Only root in the guest can read it; the kernel command line, which every process
can read, carries nothing secret.

Disks are found by their virtio serial number, never by order: ``deckard-root``, ``deckard-home``,
``deckard-config``.
"""

from __future__ import annotations

import gzip
import io
import lzma
import shlex
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from deckard.drivers.agent_code import AGENT, AGENT_PYC, AGENT_PYC_COMMAND
from deckard.model.errors import DriverError
from deckard.model.vm_image import module_load_order, module_name
from deckard.vma.agent import NO_GLX_FILE

BOOT_VERSION = "6"  # of the prepared layout below: a node with a newer one prepares the image again
ROOT_SERIAL, HOME_SERIAL, CONFIG_SERIAL = "deckard-root", "deckard-home", "deckard-config"
CONFIG_LABEL = "CIDATA"  # cloud-init's NoCloud label, so images that run cloud-init find the same disk
# what the initrd loads, in this order's dependency closure: disks, network, file systems, power button, entropy
INITRD_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "crc32c_generic",
    "ext4",
    "vfat",
    "nls_cp437",
    "nls_iso8859_1",
    "button",
    "evdev",
)
REQUIRED_MODULES = frozenset({"virtio_pci", "virtio_blk", "virtio_net", "ext4", "vfat"})
KERNEL_ARGS = (
    "console=ttyS0",
    "quiet",
    "loglevel=3",
    "panic=-1",  # a panic ends the guest at once (pvpanic tells QEMU first, which keeps it for the console)
    # fast boot under TCG: no mitigations or self-tests to emulate, no KASLR, trusted CPU entropy, no audit
    "mitigations=off",
    "nokaslr",
    "audit=0",
    "lsm=",
    "cryptomgr.notests",
    "random.trust_cpu=on",
    "tsc=reliable",
    "no_timer_check",
    "8250.nr_uarts=1",
    "i8042.noaux",
    "nowatchdog",
)


@dataclass(frozen=True)
class GuestConf:
    """What the init needs to know about this start; written as ``deckard/guest.conf`` (shell assignments)."""

    hostname: str
    ip: str
    prefix_len: int
    gateway: str
    user_login: str
    user_uid: int
    dns_search: str = ""
    glx: bool = True  # OpenGL on the display (``display.glx``); off: the init leaves ``vma.NO_GLX_FILE`` for the agent

    def render(self) -> str:
        values = {
            "HOSTNAME": self.hostname,
            "IP": self.ip,
            "PREFIX": str(self.prefix_len),
            "GATEWAY": self.gateway,
            "USER_LOGIN": self.user_login,
            "USER_UID": str(self.user_uid),
            "DNS_SEARCH": self.dns_search,
            "GLX": "1" if self.glx else "0",
        }
        return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())


def config_files(
    conf: GuestConf, *, agent_token: str, display_secret: bytes, extra: Mapping[str, bytes] | None = None
) -> dict[str, bytes]:
    """The files of a config disk: Deckard's under ``deckard/``, plus ``extra`` (cloud-init's NoCloud seed)."""
    files = dict(extra or {})
    files["deckard/guest.conf"] = conf.render().encode()
    files["deckard/agent-token"] = (agent_token + "\n").encode()
    files["deckard/display-passwd"] = display_secret
    if "meta-data" not in files:  # NoCloud needs one to accept the disk at all
        files["meta-data"] = f"instance-id: {conf.hostname}\nlocal-hostname: {conf.hostname}\n".encode()
    return files


# ---- kernel ------------------------------------------------------------------------------------------------
def vmlinux_from_bzimage(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside a bzImage (xz or gzip payload), or None when it is not found.

    QEMU boots an ELF kernel through its PVH entry point without decompressing anything, which under TCG saves
    the 3-4 s the bzImage's own decompressor takes.  Debian's kernels are xz-compressed.
    """
    for magic, decompress in ((b"\xfd7zXZ\x00", _xz), (b"\x1f\x8b\x08\x00", _gzip)):
        at = bzimage.find(magic)
        while at >= 0:
            try:
                out = decompress(bzimage[at:])
            except (lzma.LZMAError, OSError, EOFError, gzip.BadGzipFile):
                out = b""
            if out.startswith(b"\x7fELF"):
                return out
            at = bzimage.find(magic, at + 1)
    return None


def _xz(data: bytes) -> bytes:
    return lzma.LZMADecompressor().decompress(data)


def _gzip(data: bytes) -> bytes:
    return gzip.GzipFile(fileobj=io.BytesIO(data)).read()


def find_kernel(rootfs: Path) -> tuple[Path, str] | None:
    """``(boot/vmlinuz-<version>, version)`` of the image's one kernel whose modules are there, or None."""
    found = []
    for path in sorted((rootfs / "boot").glob("vmlinuz-*")):
        version = path.name.removeprefix("vmlinuz-")
        if (rootfs / "lib/modules" / version / "modules.dep").is_file():
            found.append((path, version))
    return found[-1] if found else None


def render_init(modules: Iterable[str]) -> str:
    """The initrd's ``/init`` (busybox sh): modules, disks, network, then the agent as PID 1 of the guest."""
    files = [shlex.quote(m.rsplit("/", 1)[-1]) for m in modules]
    module_lines = "".join(f"$bb insmod /lib/modules/{f} || warn {f}\n" for f in files)
    return f"""#!/bin/busybox sh
# Deckard VM init (drivers/vm_boot.py): generated by the node, runs from the initrd as PID 1.
bb=/bin/busybox
export PATH=/bin
$bb mount -t proc -o nosuid,nodev,noexec proc /proc
$bb mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
$bb mount -t devtmpfs -o nosuid,mode=755 devtmpfs /dev
fail() {{ echo "deckard-init: $*; powering off" >/dev/console; $bb sync; $bb poweroff -f; }}
warn() {{ echo "deckard-init: could not load $1" >/dev/console; }}
{module_lines}disk() {{
  for b in /sys/block/vd*; do
    [ "$($bb cat "$b/serial" 2>/dev/null)" = "$1" ] && {{ echo "/dev/${{b##*/}}"; return 0; }}
  done
  return 1
}}
root=$(disk {ROOT_SERIAL}) || fail "no root disk"
$bb mount -t ext4 -o rw,noatime "$root" /newroot || fail "cannot mount the root disk $root"
$bb mount -t devtmpfs -o nosuid,mode=755 devtmpfs /newroot/dev
$bb mount -t tmpfs -o mode=755,nosuid,nodev,size=32m tmpfs /newroot/run
$bb mkdir -p /cfg
cfg=$(disk {CONFIG_SERIAL}) || fail "no config disk"
$bb mount -t vfat -o ro,umask=077,codepage=437,iocharset=iso8859-1 "$cfg" /cfg || fail "cannot mount the config disk"
. /cfg/deckard/guest.conf || fail "no guest.conf on the config disk"
$bb mkdir -p /newroot/etc/deckard
$bb chmod 755 /newroot/etc/deckard
for f in agent-token display-passwd; do
  $bb rm -f "/newroot/etc/deckard/$f"
  $bb cp "/cfg/deckard/$f" "/newroot/etc/deckard/$f" || fail "no $f on the config disk"
  $bb chmod 600 "/newroot/etc/deckard/$f"
done
$bb umount /cfg
$bb rm -f /newroot{NO_GLX_FILE}
[ "$GLX" = 0 ] && : >/newroot{NO_GLX_FILE}
echo "$HOSTNAME" >/newroot/etc/hostname
printf '127.0.0.1\\tlocalhost\\n%s\\t%s\\n' "$IP" "$HOSTNAME" >/newroot/etc/hosts
{{
  echo "nameserver $GATEWAY"
  [ -n "$DNS_SEARCH" ] && echo "search $DNS_SEARCH"
  echo "options timeout:2 attempts:2"
}} >/newroot/etc/resolv.conf
$bb hostname "$HOSTNAME"
$bb ip link set lo up
$bb ip link set eth0 up
$bb ip addr add "$IP/$PREFIX" dev eth0 || fail "cannot set the address $IP/$PREFIX"
$bb ip route add default via "$GATEWAY" || fail "cannot set the route via $GATEWAY"
if home=$(disk {HOME_SERIAL}); then
  # an ext4 superblock has the magic 0xEF53 at byte 1080 (Debian's static busybox has no blkid)
  magic=$($bb dd if="$home" bs=1 skip=1080 count=2 2>/dev/null | $bb od -An -tx1 | $bb tr -d ' \n')
  if [ "$magic" != "53ef" ]; then
    echo "deckard-init: formatting the new home disk" >/dev/console
    $bb chroot /newroot /sbin/mkfs.ext4 -q -F -m 0 -L home "$home" || fail "cannot format the home disk"
  fi
  $bb mkdir -p "/newroot/home/$USER_LOGIN"
  $bb mount -t ext4 -o rw,noatime,nosuid,nodev "$home" "/newroot/home/$USER_LOGIN" || fail "cannot mount the home"
fi
$bb umount /dev
$bb mount --move /proc /newroot/proc
$bb mount --move /sys /newroot/sys
echo "deckard-init: starting the agent at $($bb cut -d' ' -f1 /newroot/proc/uptime) s" >/dev/console
# the user is known at boot: the agent starts their display at once, so a connect finds it ready; the agent is
# run from its bytecode when the node could compile it for the image's Python (no compiling at every boot)
agent={AGENT}
[ -f /newroot{AGENT_PYC} ] && agent="{AGENT_PYC_COMMAND}"
exec $bb switch_root /newroot $agent --machine vm --display-for "$USER_LOGIN:$USER_UID"
"""


# ---- initrd (cpio "newc") ------------------------------------------------------------------------------------
def cpio_newc(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive (what the kernel unpacks as an initramfs) of ``(path, mode, data)``; directories
    have ``stat.S_IFDIR`` in their mode and no data."""
    out = bytearray()

    def add(name: str, mode: int, data: bytes, ino: int) -> None:
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0)
        out.extend(b"070701" + "".join(f"{v:08X}" for v in fields).encode())
        out.extend(raw)
        out.extend(b"\0" * (-(110 + len(raw)) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(data) % 4))

    ino = 0
    for ino, (name, mode, data) in enumerate(entries, start=1):
        add(name, mode, data, ino)
    add("TRAILER!!!", 0, b"", ino + 1)
    return bytes(out)


def initrd_image(rootfs: Path, version: str) -> bytes:
    """The initrd for the image unpacked at ``rootfs`` with kernel ``version``: its busybox and modules."""
    busybox = rootfs / "bin/busybox"
    if not busybox.is_file() or busybox.stat().st_size < 500_000:  # the dynamic one needs libraries we lack
        raise DriverError(
            "the image has no static busybox (/bin/busybox): rebuild it with `deckard image build --format vm`",
            code="image_not_bootable",
        )
    modules_dir = rootfs / "lib/modules" / version
    order = module_load_order((modules_dir / "modules.dep").read_text(), INITRD_MODULES)
    missing = REQUIRED_MODULES - {module_name(m) for m in order}
    if missing:
        raise DriverError(
            f"the image's kernel {version} lacks the modules {', '.join(sorted(missing))}: rebuild it with "
            "`deckard image build --format vm`",
            code="image_not_bootable",
        )
    d = stat.S_IFDIR | 0o755
    entries: list[tuple[str, int, bytes]] = [(name, d, b"") for name in ("bin", "dev", "proc", "sys", "newroot", "lib")]
    entries.append(("lib/modules", d, b""))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()))
    for module in order:
        data = (modules_dir / module).read_bytes()
        entries.append((f"lib/modules/{module.rsplit('/', 1)[-1]}", stat.S_IFREG | 0o644, data))
    entries.append(("init", stat.S_IFREG | 0o755, render_init(order).encode()))
    return cpio_newc(entries)


def kernel_command_line(extra: Iterable[str] = ()) -> str:
    return " ".join([*KERNEL_ARGS, *extra])
