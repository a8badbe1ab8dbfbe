"""The image builder's naming (an unchanged recipe is never rebuilt, a changed agent only re-packs) and what a
VM image keeps of Debian's kernel."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from deckard.images import builder
from deckard.images.profile import AGENT_PATH, ImageFile, load_profile
from deckard.model.vm_image import VM_MODULES, module_closure, module_name
from deckard.runtime.paths import image_digest


def test_image_name_is_profile_plus_recipe_hash_plus_files_hash() -> None:
    minimal = load_profile("minimal")
    name = builder.image_filename()
    files = builder.image_files(minimal)
    assert name == f"deckard-minimal-{builder.recipe_hash(minimal)}-{builder.files_hash(files)}.tar.zst"


def test_a_changed_agent_changes_only_the_files_hash() -> None:
    minimal = load_profile("minimal")
    recipe, files = builder.recipe_hash(minimal), builder.image_files(minimal)
    changed = [ImageFile(f.dest, f.data + b"\n# changed\n", f.mode) if f.dest == AGENT_PATH else f for f in files]
    assert builder.files_hash(changed) != builder.files_hash(files)
    assert builder.recipe_hash(minimal) == recipe


def test_the_agent_is_installed_with_a_python3_shebang() -> None:
    files = {f.dest: f.data for f in builder.image_files()}
    assert files["usr/local/sbin/deckard-vma"].startswith(b"#!/usr/bin/python3\n")
    assert b"<JWM>" in files["etc/jwm/system.jwmrc"]


def test_image_digest_is_the_sha256_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(b"abc")
    assert image_digest(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


async def test_an_image_whose_layers_are_cached_is_packed_while_another_build_holds_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packing only reads cached layers: a farm starting from them does not wait for another profile's build."""
    monkeypatch.setattr(builder.os, "geteuid", lambda: 0)
    minimal, cache = load_profile("minimal"), tmp_path / "cache"
    cache.mkdir()
    (cache / f"rootfs-{builder.recipe_hash(minimal)}.tar.zst").write_bytes(b"the cached rootfs")
    held = builder._lock_cache(cache)  # a build of another profile, in another process
    try:
        image = await asyncio.wait_for(
            builder.build_image(tmp_path / "farm", cache_dir=cache, progress=lambda _t, _f: None, profile=minimal),
            30,
        )
    finally:
        os.close(held)
    assert image.name == builder.image_filename(minimal)
    assert image.read_bytes().startswith(b"the cached rootfs")


# ---- what a VM image keeps of the kernel -------------------------------------------------------------------
KVER = "6.1.0-28-amd64"
MODULES_DEP = """\
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko \
kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/fs/nls/nls_iso8859-1.ko:
kernel/drivers/gpu/drm/nouveau/nouveau.ko: kernel/drivers/gpu/drm/drm.ko
kernel/drivers/gpu/drm/drm.ko:
kernel/sound/core/snd.ko.xz:
"""


def test_the_module_closure_is_the_wanted_modules_and_what_they_depend_on() -> None:
    keep = module_closure(MODULES_DEP, ["virtio_net", "ext4", "nls_iso8859_1", "built_in_or_absent"])
    assert keep == {
        "kernel/drivers/net/virtio_net.ko",
        "kernel/drivers/net/net_failover.ko",
        "kernel/net/core/failover.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/fs/ext4/ext4.ko",
        "kernel/lib/crc16.ko",
        "kernel/fs/mbcache.ko",
        "kernel/fs/jbd2/jbd2.ko",
        "kernel/fs/nls/nls_iso8859-1.ko",  # the kernel's name for nls_iso8859-1 is nls_iso8859_1
    }
    assert module_closure(MODULES_DEP, ["snd"]) == {"kernel/sound/core/snd.ko.xz"}  # compressed modules too
    assert module_closure(MODULES_DEP, []) == set() and module_closure("", VM_MODULES) == set()


def test_module_names_drop_the_directory_and_any_compression_suffix() -> None:
    assert module_name("kernel/fs/nls/nls_cp437.ko") == "nls_cp437"
    assert module_name("kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz") == "virtio_pci_modern_dev"
    assert module_name("kernel/fs/nls/nls_iso8859-1.ko.zst") == "nls_iso8859_1"


def test_a_vm_layer_keeps_the_kernel_its_config_and_the_needed_modules_only(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "usr/lib").mkdir(parents=True)
    (rootfs / "lib").symlink_to("usr/lib")  # Debian's merged /usr
    boot = rootfs / "boot"
    boot.mkdir()
    for name in (f"vmlinuz-{KVER}", f"config-{KVER}", f"initrd.img-{KVER}", f"System.map-{KVER}"):
        (boot / name).write_text(name)
    (rootfs / "initrd.img").symlink_to(f"boot/initrd.img-{KVER}")
    (rootfs / "vmlinuz").symlink_to(f"boot/vmlinuz-{KVER}")
    modules = rootfs / "lib/modules" / KVER
    for line in MODULES_DEP.splitlines():
        path = modules / line.split(":")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x7fELF")
    (modules / "modules.dep").write_text(MODULES_DEP)
    (modules / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")

    assert builder._prune_kernel(rootfs) == KVER
    assert sorted(p.name for p in boot.iterdir()) == [f"config-{KVER}", f"vmlinuz-{KVER}"]
    assert not (rootfs / "initrd.img").is_symlink() and (rootfs / "vmlinuz").exists()
    kept = {str(p.relative_to(modules)) for p in (modules / "kernel").rglob("*") if p.is_file()}
    assert kept == module_closure(MODULES_DEP, VM_MODULES)
    assert "kernel/drivers/block/virtio_blk.ko" in kept and "kernel/fs/ext4/ext4.ko" in kept
    assert not (modules / "kernel/drivers/gpu").exists() and not (modules / "kernel/sound").exists()  # empty dirs go
    assert (modules / "modules.builtin").exists()  # depmod's inputs stay


def test_a_vm_layer_without_exactly_one_kernel_is_refused(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    with pytest.raises(builder.ImageBuildError, match="exactly one kernel"):
        builder._prune_kernel(tmp_path)
    for kver in ("6.1.0-27-amd64", KVER):
        (tmp_path / "boot" / f"vmlinuz-{kver}").write_text("")
    with pytest.raises(builder.ImageBuildError, match=r"6\.1\.0-27-amd64"):
        builder._prune_kernel(tmp_path)


def test_directory_mtimes_are_cut_to_the_second_as_tar_keeps_them(tmp_path: Path) -> None:
    """fontconfig's caches hold their directory's mtime to the nanosecond: made for what tar will keep, they hold."""
    fonts = tmp_path / "usr/share/fonts/truetype"
    fonts.mkdir(parents=True)
    (tmp_path / "link").symlink_to(fonts)
    for path in (tmp_path, fonts, fonts.parent):
        os.utime(path, ns=(1_700_000_000_123_456_789, 1_700_000_000_987_654_321))
    builder._whole_second_mtimes(tmp_path)
    for path in (tmp_path, fonts, fonts.parent, tmp_path / "usr"):
        assert os.stat(path).st_mtime_ns % 1_000_000_000 == 0, path
    assert os.stat(fonts).st_mtime_ns == 1_700_000_000_000_000_000
