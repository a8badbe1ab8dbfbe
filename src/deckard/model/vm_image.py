"""What makes a desktop image bootable as a virtual machine, shared by the image builder and the VM driver.

A VM desktop boots the image's own Debian kernel directly (``-kernel``) with a tiny initrd the node builds from
the image's files, so an image that can run as a VM carries ``/boot/vmlinuz-<kver>``, a static busybox and
``/lib/modules/<kver>`` pruned to the modules below and whatever they depend on.  The builder prunes to that
list and the driver loads from it; keeping it here, in the model, lets both use it without the driver importing
the builder (the layers in ``pyproject.toml``'s import-linter contracts).
"""

from __future__ import annotations

from collections.abc import Iterable

VM_FORMAT = "vm"
CONTAINER_FORMAT = "container"
IMAGE_FORMATS = (CONTAINER_FORMAT, VM_FORMAT)

KERNEL_GLOB = "boot/vmlinuz-*"
"""Where the kernel sits in the image, relative to its root."""

VM_MODULES: tuple[str, ...] = (
    # virtio transport and devices: disk, network, entropy, console, memory balloon
    "virtio",
    "virtio_ring",
    "virtio_pci",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "virtio_console",
    "virtio_balloon",
    "failover",
    "net_failover",
    # file systems: ext4 and what it needs, FAT and ISO 9660 media, loop devices, FUSE
    "ext4",
    "jbd2",
    "mbcache",
    "crc16",
    "crc32c_generic",
    "fat",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_iso8859_1",
    "isofs",
    "loop",
    "fuse",
    # the ACPI power button (a clean shutdown), input events, QEMU's firmware configuration device
    "button",
    "evdev",
    "qemu_fw_cfg",
)
"""Kernel modules a virtio VM desktop needs; the builder keeps these and their dependencies, nothing else."""

_MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


def module_name(path: str) -> str:
    """The name the kernel knows a module by: ``kernel/fs/nls/nls_cp437.ko.xz`` → ``nls_cp437`` ('-' is '_')."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """``modules.dep`` (``path: dependency paths``, one module a line) as module path → dependency paths."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        path, sep, rest = line.partition(":")
        if sep and path.strip():
            deps[path.strip()] = rest.split()
    return deps


def module_closure(modules_dep_text: str, wanted: Iterable[str]) -> set[str]:
    """The module files (paths as ``modules.dep`` writes them) of the ``wanted`` module names and of everything
    they depend on.  A wanted name that is not in ``modules.dep`` is built into the kernel (or absent): skipped."""
    deps = parse_modules_dep(modules_dep_text)
    by_name = {module_name(path): path for path in deps}
    todo = [by_name[n] for n in (w.replace("-", "_") for w in wanted) if n in by_name]
    keep: set[str] = set()
    while todo:
        path = todo.pop()
        if path in keep:
            continue
        keep.add(path)
        todo.extend(d for d in deps.get(path, ()) if d not in keep)
    return keep


def module_load_order(modules_dep_text: str, wanted: Iterable[str]) -> list[str]:
    """The module files to insert for the ``wanted`` names, each after its dependencies (what ``modprobe``
    would do, for the VM's initrd, which has no modprobe).  Names not in ``modules.dep`` are skipped."""
    deps = parse_modules_dep(modules_dep_text)
    by_name = {module_name(path): path for path in deps}
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        for dep in reversed(deps.get(path, [])):  # modules.dep lists the deepest dependency last
            visit(dep)
        order.append(path)

    for name in wanted:
        if (path := by_name.get(name.replace("-", "_"))) is not None:
            visit(path)
    return order
