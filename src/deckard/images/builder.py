"""Build a desktop image from a profile (``images/profile.py``): a Debian rootfs, its packages and the guest agent.

The slow part is the rootfs, and it depends only on the *recipe* of each profile layer: builder version,
suite, the parent layer's recipe, the layer's packages and locales.  Each layer is cached in ``cache_dir`` as
``rootfs-<recipe hash>.tar.zst``; a layer with no parent starts from ``debootstrap``, a child layer from its
parent's cached rootfs (unpacked, then ``apt-get install`` of its own packages), so building ``standard`` after
``minimal`` costs only the extra packages, and an unchanged recipe is never built twice.

The agent, the session script and the profile's files change far more often: the image is the cached rootfs
tarball with a small archive of them appended, which takes a second.  That works without decompressing the
rootfs because zstd frames concatenate: a cached rootfs is a tar *without* its end-of-archive blocks,
compressed, and the image is ``rootfs frames + one frame holding the files' tar (with the end blocks)``, which
any ``tar -x`` reads as one archive whose later members (ours) replace the rootfs's.  Last comes a zstd
*skippable* frame (ignored by every zstd reader) holding ``image.json``, so ``deckard image import`` learns an
image's profile by reading its last bytes.  The image file is named ``deckard-<profile>-<recipe>-<files>.tar.zst``:
the name says what is inside, and an image that already exists is returned without any work.

An image that can also boot as a virtual machine (``--format vm``, ``profile.with_vm``) is the same tarball with
one more layer: Debian's kernel and a static busybox, the kernel's modules pruned to ``model.vm_image.VM_MODULES``
and what they depend on (then ``depmod``), no initramfs.  Its file is ``deckard-<profile>-vm-<recipe>-<files>``,
and the kernel's version, known only once the layer is built, is kept beside the cached layer for ``image.json``.

Everything is built in a temporary directory next to its destination and renamed into place at the end, so a
crash or a Ctrl-C never leaves a half-written image or cache entry behind.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from deckard.images import keymap
from deckard.images.profile import (
    AGENT_PATH,
    META_PATH,
    MODULE_PATHS,
    NX_PRINT_BACKEND_PATH,
    NX_SLAVE_PATH,
    OPENER_PATH,
    SESSION_PATH,
    SHELL_PATH,
    ImageFile,
    Profile,
    load_profile,
)
from deckard.model.errors import DeckardError
from deckard.model.vm_image import CONTAINER_FORMAT, KERNEL_GLOB, VM_FORMAT, VM_MODULES, module_closure

log = structlog.get_logger()

Progress = Callable[[str, float], None]

BUILDER_VERSION = "5"  # 4: the display's start-up keymap compiled at build (images/keymap.py); 5: font caches
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

_VMA_SOURCES = Path(__file__).parents[1] / "vma"  # the agent, its modules and the NX slave command
# Cut from the rootfs: documentation, manuals, translations (but the profile's languages) and apt's caches
_PRUNE = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/lib/apt/lists",
    "var/cache/apt",
    "var/cache/debconf/templates.dat-old",
    "var/log",
)
_NODOC_CFG = """\
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""
_APT_CFG = """\
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Check-Valid-Until "false";
Acquire::Languages "none";
"""
# apt and gpgv need these in a chroot; debootstrap's own are removed with the rest of /dev when a layer is done
_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0))
_TAR_END = 1024  # two zero blocks: the end of a tar archive (written with one 512-byte block per record)
_SKIPPABLE_MAGIC = 0x184D2A5E  # any of 0x184D2A50-5F: a frame every zstd decoder skips
_META_MARK = b"DECKARD1"


class ImageBuildError(DeckardError):
    code = "image_build_failed"


def default_profile() -> Profile:
    return load_profile("minimal")


# ---- names ----------------------------------------------------------------------------------------------
def recipe_hash(profile: Profile | None = None) -> str:
    """Hash of what debootstrap and apt produce for this layer (and, through the parent's hash, those below it).
    The mirror is left out since every mirror serves the same."""
    layer = profile or default_profile()
    recipe: dict[str, Any] = {
        "builder": BUILDER_VERSION,
        "suite": SUITE,
        "variant": "minbase",
        "parent": recipe_hash(layer.parent) if layer.parent is not None else None,
        "packages": sorted(layer.packages),
        "locales": sorted(layer.all_locales()),
    }
    if layer.vm:  # only then: the recipes of the layers that existed before VM images keep their hash
        recipe |= {"vm": True, "modules": sorted(VM_MODULES)}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def image_files(profile: Profile | None = None) -> list[ImageFile]:
    """What is added on top of the rootfs, read now: the agent (its modules, its NX slave command, deckard-open),
    the session script and the profile's files."""
    profile = profile or default_profile()
    agent = b"#!/usr/bin/python3\n" + (_VMA_SOURCES / "agent.py").read_bytes()
    nx_slave = b"#!/usr/bin/python3\n" + (_VMA_SOURCES / "nx_slave.py").read_bytes()
    nx_print = b"#!/usr/bin/python3\n" + (_VMA_SOURCES / "nx_print.py").read_bytes()
    opener = b"#!/usr/bin/python3 -IS\n" + (_VMA_SOURCES / "opener.py").read_bytes()  # no site: ~4 ms sooner
    session = profile.session_script() or b""
    shell = profile.shell_script()
    return [
        ImageFile(AGENT_PATH, agent, 0o755),
        *(ImageFile(path, (_VMA_SOURCES / f"{name}.py").read_bytes(), 0o644) for name, path in MODULE_PATHS.items()),
        ImageFile(NX_SLAVE_PATH, nx_slave, 0o755),
        ImageFile(NX_PRINT_BACKEND_PATH, nx_print, 0o755),
        ImageFile(OPENER_PATH, opener, 0o755),
        ImageFile(SESSION_PATH, session, 0o755),
        *([ImageFile(SHELL_PATH, shell, 0o755)] if shell is not None else []),
        *profile.all_files(),
    ]


def files_hash(files: Sequence[ImageFile]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.dest}:{f.mode:o}:{len(f.data)}\0".encode())
        h.update(f.data)
    return h.hexdigest()[:12]


def image_filename(profile: Profile | None = None, files: Sequence[ImageFile] | None = None) -> str:
    """``deckard-<profile>[-vm]-<recipe>-<files>.tar.zst``: the image the profile and the current files make."""
    profile = profile or default_profile()
    files = files if files is not None else image_files(profile)
    vm = "-vm" if profile.is_vm else ""
    return f"deckard-{profile.name}{vm}-{recipe_hash(profile)}-{files_hash(files)}.tar.zst"


def image_metadata(profile: Profile, files: Sequence[ImageFile], kernel: str = "") -> dict[str, Any]:
    """``/etc/deckard/image.json``, also kept in the image file's trailer (:func:`read_image_metadata`);
    ``kernel`` is the version of ``/boot/vmlinuz-<kernel>`` in a VM image."""
    return {
        "profile": profile.name,
        "recipe": recipe_hash(profile),
        "files": files_hash(files),
        "builder": BUILDER_VERSION,
        "packages": profile.all_packages(),
        "locales": profile.all_locales(),
        "formats": [CONTAINER_FORMAT, VM_FORMAT] if profile.is_vm else [CONTAINER_FORMAT],
        **({"kernel": kernel} if profile.is_vm else {}),
    }


def read_image_metadata(path: Path) -> dict[str, Any] | None:
    """The ``image.json`` an image built here carries in its last bytes; None for any other tarball."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < 16:
                return None
            f.seek(size - 12)
            (length,), mark = struct.unpack("<I", f.read(4)), f.read(8)
            start = size - 12 - length - 8
            if mark != _META_MARK or start < 0:
                return None
            f.seek(start)
            magic, frame_len = struct.unpack("<II", f.read(8))
            if magic != _SKIPPABLE_MAGIC or frame_len != length + 12:
                return None
            meta = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return None
    return meta if isinstance(meta, dict) else None


# ---- build ----------------------------------------------------------------------------------------------
async def build_image(
    output_dir: Path,
    *,
    cache_dir: Path,
    progress: Progress,
    mirror: str = DEFAULT_MIRROR,
    profile: Profile | None = None,
) -> Path:
    """Build (or find) the image of ``profile`` (default: ``minimal``) in ``output_dir`` and return its path."""
    if os.geteuid() != 0:
        raise ImageBuildError("building an image needs root (debootstrap and chroot); run it as root")
    profile = profile or default_profile()
    output_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = image_files(profile)
    target = output_dir / image_filename(profile, files)
    if target.exists():
        progress("image is up to date", 1.0)
        return target
    # one build at a time per cache: a second builder (another test worker, another farm) waits, then finds
    # the layers the first one made.  Packing only reads cached layers (never changed once renamed into place):
    # with none to build, no lock, so a farm whose layers are cached does not wait for another profile's build
    lock_fd = await asyncio.to_thread(_lock_cache, cache_dir) if _missing_layers(cache_dir, profile) else None
    try:
        if target.exists():
            progress("image is up to date", 1.0)
            return target
        missing = _missing_layers(cache_dir, profile)
        span = 0.96 / len(missing) if missing else 0.0
        for n, layer in enumerate(missing):
            log.info("image.build_layer", profile=layer.name, recipe=recipe_hash(layer), packages=len(layer.packages))
            parent = _layer_path(cache_dir, layer.parent) if layer.parent is not None else None
            await _build_layer(layer, _layer_path(cache_dir, layer), parent, _scaled(progress, n * span, span), mirror)
        kernel = _read_kernel(cache_dir, profile)
        meta = image_metadata(profile, files, kernel)
        await _pack_image(_layer_path(cache_dir, profile), target, files, meta, progress)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    progress("image ready", 1.0)
    log.info("image.built", path=str(target), size=target.stat().st_size, profile=profile.name)
    return target


def _missing_layers(cache_dir: Path, profile: Profile) -> list[Profile]:
    """The layers to build: from the highest one already cached (or debootstrap) up to this profile."""
    missing: list[Profile] = []
    for layer in reversed(profile.chain()):
        if _layer_path(cache_dir, layer).exists() and (not layer.vm or _kernel_path(cache_dir, layer).exists()):
            break
        missing.insert(0, layer)
    return missing


def _lock_cache(cache_dir: Path) -> int:
    fd = os.open(cache_dir / ".build.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _layer_path(cache_dir: Path, layer: Profile) -> Path:
    return cache_dir / f"rootfs-{recipe_hash(layer)}.tar.zst"


def _kernel_path(cache_dir: Path, layer: Profile) -> Path:
    """Beside a VM layer: the version of the kernel in it, written before the layer is renamed into place."""
    return cache_dir / f"rootfs-{recipe_hash(layer)}.kernel"


def _read_kernel(cache_dir: Path, profile: Profile) -> str:
    vm_layer = next((layer for layer in reversed(profile.chain()) if layer.vm), None)
    return _kernel_path(cache_dir, vm_layer).read_text().strip() if vm_layer is not None else ""


def _scaled(progress: Progress, start: float, span: float) -> Progress:
    return lambda text, fraction: progress(text, start + span * min(max(fraction, 0.0), 1.0))


async def _build_layer(layer: Profile, dest: Path, parent: Path | None, progress: Progress, mirror: str) -> None:
    """One cached rootfs: debootstrap (or the parent's rootfs) + this layer's packages and locales, pruned."""
    tmp = Path(tempfile.mkdtemp(prefix=".rootfs-", dir=dest.parent))
    rootfs = tmp / "rootfs"
    proc_mounted = False
    try:
        if parent is None:
            await _debootstrap(rootfs, mirror, _scaled(progress, 0.0, 0.55))
            (rootfs / "etc/dpkg/dpkg.cfg.d/01-deckard-nodoc").write_text(_NODOC_CFG)
            (rootfs / "etc/apt/apt.conf.d/99-deckard").write_text(_APT_CFG)
            policy = rootfs / "usr/sbin/policy-rc.d"
            policy.write_text("#!/bin/sh\n# no service starts inside an image build or a desktop\nexit 101\n")
            policy.chmod(0o755)
            apt_from = 0.55
        else:
            progress(f"unpacking the cached {layer.parent.name if layer.parent else ''} rootfs", 0.0)
            rootfs.mkdir(mode=0o755)
            await _run(["tar", "--numeric-owner", "-xf", str(parent), "-C", str(rootfs)])
            apt_from = 0.08
        await asyncio.to_thread(_prepare_chroot, rootfs, layer.languages())
        await _run(["mount", "-t", "proc", "proc", str(rootfs / "proc")])
        proc_mounted = True
        await _apt_install(rootfs, layer.packages, _scaled(progress, apt_from, 0.86 - apt_from))
        if layer.locales:
            progress("generating locales", 0.86)
            (rootfs / "etc/locale.gen").write_text("".join(f"{loc} UTF-8\n" for loc in layer.all_locales()))
            await _run(["chroot", str(rootfs), "locale-gen"], env=_chroot_env())
        if layer.vm:
            progress("keeping the kernel modules a VM desktop needs", 0.87)
            kernel = await asyncio.to_thread(_prune_kernel, rootfs)
            await _run(["chroot", str(rootfs), "depmod", kernel], env=_chroot_env())
            _kernel_path(dest.parent, layer).write_text(kernel + "\n")
        progress("compiling the display's keymap", 0.875)
        await keymap.cache_keymap(rootfs, _chroot_env())
        await _run(["umount", str(rootfs / "proc")])
        proc_mounted = False
        progress("pruning the rootfs", 0.88)
        await asyncio.to_thread(_prune, rootfs, layer.languages())
        await _font_caches(rootfs, progress)
        progress("compressing the rootfs", 0.9)
        plain = tmp / "rootfs.tar"
        await _run(["tar", "--numeric-owner", "-b1", "-C", str(rootfs), "-cf", str(plain), "."])
        await asyncio.to_thread(_drop_tar_end, plain)
        part = tmp / "rootfs.tar.zst"
        await _run(["zstd", "-q", "-T0", "-3", "--rm", str(plain), "-o", str(part)])
        part.rename(dest)
    finally:
        if proc_mounted:
            await _run(["umount", "-l", str(rootfs / "proc")], check=False)
        if os.path.ismount(rootfs / "proc"):
            log.error("image.cleanup_skipped", reason="proc still mounted", path=str(tmp))
        else:
            await asyncio.to_thread(shutil.rmtree, tmp, True)


async def _font_caches(rootfs: Path, progress: Progress) -> None:
    """fontconfig's caches, valid once the image is unpacked: a cache holds its directory's mtime to the
    nanosecond, which tar keeps only to the second, so an image's caches all looked stale and every user's first
    session scanned every font and wrote caches in their home (jwm's first frame 0.23-0.31 s instead of 0.04).
    Each directory's mtime is cut to the second here, as tar will, and the caches are made for those."""
    if not (rootfs / "usr/bin/fc-cache").exists():
        return
    progress("caching the fonts", 0.885)
    await asyncio.to_thread(_whole_second_mtimes, rootfs)
    await _run(["chroot", str(rootfs), "fc-cache", "--system-only", "--force"], env=_chroot_env())


def _whole_second_mtimes(rootfs: Path) -> None:
    for top, _dirs, _files in os.walk(rootfs):
        st = os.lstat(top)
        os.utime(top, ns=(st.st_atime_ns, st.st_mtime_ns - st.st_mtime_ns % 1_000_000_000), follow_symlinks=False)


def _prepare_chroot(rootfs: Path, languages: Sequence[str]) -> None:
    """Devices, name resolution and the translations to keep, for apt inside the chroot."""
    for name, major, minor in _DEVICES:
        node = rootfs / "dev" / name
        if not node.exists():
            os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            node.chmod(0o666)
    resolv = rootfs / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    shutil.copyfile("/etc/resolv.conf", resolv)
    if languages:  # read after 01-deckard-nodoc: dpkg lets a later path-include take back an exclusion
        keep = "".join(f"path-include /usr/share/locale/{lang}/*\n" for lang in languages)
        (rootfs / "etc/dpkg/dpkg.cfg.d/02-deckard-languages").write_text(keep)


def _prune_kernel(rootfs: Path) -> str:
    """Keep the kernel, its config and the modules of ``VM_MODULES`` with their dependencies; drop the rest,
    the initramfs (the node makes its own initrd) and ``System.map``.  Returns the kernel's version."""
    kernels = sorted(rootfs.glob(KERNEL_GLOB))
    if len(kernels) != 1:
        found = ", ".join(k.name for k in kernels) or "none"
        raise ImageBuildError(f"a VM image needs exactly one kernel in /boot, found {found}")
    kernel = kernels[0].name.removeprefix("vmlinuz-")
    modules = rootfs / "usr/lib/modules" / kernel  # /lib is a link to /usr/lib on Debian
    keep = module_closure((modules / "modules.dep").read_text(), VM_MODULES)
    for path in sorted((modules / "kernel").rglob("*"), reverse=True):  # children before their directories
        if path.is_dir():
            if not any(path.iterdir()):
                path.rmdir()
        elif str(path.relative_to(modules)) not in keep:
            path.unlink()
    for pattern in ("boot/initrd.img-*", "boot/System.map-*", "initrd.img*"):
        for path in rootfs.glob(pattern):
            path.unlink()  # the links /initrd.img* point at the deleted initramfs
    log.info("image.kernel_pruned", kernel=kernel, modules=len(keep))
    return kernel


def _drop_tar_end(path: Path) -> None:
    """Cut the end-of-archive blocks so that more members can follow in a concatenated zstd frame."""
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(size - _TAR_END)
        if f.read(_TAR_END) != bytes(_TAR_END):
            raise ImageBuildError(f"{path} does not end with a tar end-of-archive marker")
        f.truncate(size - _TAR_END)


async def _debootstrap(rootfs: Path, mirror: str, progress: Progress) -> None:
    """Run debootstrap and turn its ``I:`` lines into a fraction."""
    counts = {"Retrieving": 0, "Extracting": 0, "Unpacking": 0, "Configuring": 0}
    # share of debootstrap's time spent in each phase, measured on a minbase bookworm run
    spans = {
        "Retrieving": (0.0, 0.3),
        "Extracting": (0.3, 0.4),
        "Unpacking": (0.4, 0.7),
        "Configuring": (0.7, 1.0),
    }
    line_re = re.compile(r"^I: (Retrieving|Extracting|Unpacking|Configuring) (\S+)")
    expected = 90  # minbase bookworm pulls ~90 packages; corrected by the real count after Retrieving

    def on_line(line: str) -> None:
        nonlocal expected
        m = line_re.match(line)
        if not m or m.group(2) in ("Release", "InRelease", "Packages", "required", "the"):
            return
        phase, pkg = m.group(1), m.group(2)
        counts[phase] += 1
        if phase != "Retrieving":
            expected = max(counts["Retrieving"], 1)
        lo, hi = spans[phase]
        progress(f"debootstrap: {phase.lower()} {pkg}", lo + (hi - lo) * min(counts[phase] / expected, 1.0))

    progress("debootstrap: starting", 0.0)
    await _run(["debootstrap", "--verbose", "--variant=minbase", SUITE, str(rootfs), mirror], on_line=on_line)


def _chroot_env() -> dict[str, str]:
    # INITRD=No: the kernel's postinst makes no initramfs (a VM layer's node makes its own initrd)
    return {"DEBIAN_FRONTEND": "noninteractive", "LANG": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "INITRD": "No"}


async def _apt_install(rootfs: Path, packages: Sequence[str], progress: Progress) -> None:
    """Install the layer's packages in the chroot: each package is downloaded, unpacked and set up."""
    env = _chroot_env()
    progress("apt: updating package lists", 0.0)
    await _run(["chroot", str(rootfs), "apt-get", "update"], env=env)
    total = 0
    done = 0
    count_re = re.compile(r"^(\d+) upgraded, (\d+) newly installed")
    get_re = re.compile(r"^Get:\d+ \S+ \S+ \S+ (\S+)")

    def on_line(line: str) -> None:
        nonlocal total, done
        if m := count_re.match(line):
            total = int(m.group(2))
            return
        if m := get_re.match(line):
            text = f"apt: downloading {m.group(1)}"
        elif line.startswith(("Unpacking ", "Setting up ")):
            text = f"apt: {line.split(' (')[0].lower()}"
        else:
            return
        done += 1
        progress(text, 0.05 + 0.95 * min(done / (3 * total), 1.0) if total else 0.05)

    await _run(
        ["chroot", str(rootfs), "apt-get", "install", "-y", "--no-install-recommends", *packages],
        env=env,
        on_line=on_line,
    )
    await _run(["chroot", str(rootfs), "apt-get", "clean"], env=env)


def _prune(rootfs: Path, languages: Sequence[str] = ()) -> None:
    keep = {rootfs / "usr/share/locale" / lang for lang in languages} | {rootfs / "usr/share/locale/locale.alias"}
    for rel in _PRUNE:
        path = rootfs / rel
        if path.is_dir() and not path.is_symlink():
            # keep the directory itself: packages and apt expect it to exist
            for child in path.iterdir():
                if child in keep:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        elif path.exists():
            path.unlink()
    (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    # debootstrap copies these from the build host; an image must not carry the builder's identity
    (rootfs / "etc/hostname").write_text("deckard\n")
    (rootfs / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n")
    (rootfs / "etc/resolv.conf").write_text("")
    # device nodes are useless: LXC mounts its own /dev in every container
    dev = rootfs / "dev"
    for child in dev.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# ---- pack -----------------------------------------------------------------------------------------------
async def _pack_image(
    rootfs_tar: Path, target: Path, files: Sequence[ImageFile], meta: dict[str, Any], progress: Progress
) -> None:
    """Copy the cached rootfs, append the files' frame and the metadata trailer, rename into place."""
    tmp = Path(tempfile.mkdtemp(prefix=".image-", dir=target.parent))
    try:
        progress("adding the guest agent and the session", 0.97)
        packed = tmp / target.name
        await asyncio.to_thread(shutil.copyfile, rootfs_tar, packed)
        extra = tmp / "extra.tar"
        extra.write_bytes(_files_tar(files, meta))
        await _run(["zstd", "-q", "-3", "--rm", str(extra), "-o", str(tmp / "extra.tar.zst")])
        with packed.open("ab") as out:
            out.write((tmp / "extra.tar.zst").read_bytes())
            out.write(_metadata_frame(meta))
        packed.rename(target)
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)


def _files_tar(files: Sequence[ImageFile], meta: dict[str, Any]) -> bytes:
    """A tar of the added files, owned by root; only /etc/deckard gets a directory entry of its own (any other
    missing parent is made by tar, an existing one keeps its owner and mode)."""
    now = int(time.time())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        d = tarfile.TarInfo("./etc/deckard")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, now
        tar.addfile(d)
        meta_file = ImageFile(META_PATH, json.dumps(meta, indent=1).encode() + b"\n", 0o644)
        for f in [*files, meta_file]:
            info = tarfile.TarInfo(f"./{f.dest}")
            info.size, info.mode, info.mtime = len(f.data), f.mode, now
            tar.addfile(info, io.BytesIO(f.data))
    return buf.getvalue()


def _metadata_frame(meta: dict[str, Any]) -> bytes:
    data = json.dumps(meta, separators=(",", ":")).encode()
    payload = data + struct.pack("<I", len(data)) + _META_MARK
    return struct.pack("<II", _SKIPPABLE_MAGIC, len(payload)) + payload


async def _run(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
    check: bool = True,
) -> int:
    """Run a command, feeding each output line to ``on_line``; raise with the output's tail on failure."""
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env if env is not None else {**os.environ, "LANG": "C"},
    )
    tail: list[str] = []
    assert proc.stdout is not None
    async for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip()
        tail = [*tail[-19:], line]
        if on_line is not None:
            on_line(line)
    rc = await proc.wait()
    if rc != 0 and check:
        raise ImageBuildError(
            f"{cmd[0]} failed (exit {rc}) while building the image: " + " | ".join(tail[-8:]),
            details={"command": list(cmd), "output": tail},
        )
    return rc
