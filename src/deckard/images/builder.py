"""Build the default desktop image: a Debian rootfs with Xvnc, a light desktop and the guest agent.

The slow part (``debootstrap`` + ``apt-get``, about a minute) depends only on the *recipe*: suite,
package list and builder version.  Its result is kept in ``cache_dir`` as ``rootfs-<recipe hash>.tar.zst``,
so an unchanged recipe is never bootstrapped twice.  The agent and the session files change far more
often; they are appended to a copy of the cached tarball, which takes seconds.  The image file is named
``deckard-desktop-<recipe hash>-<files hash>.tar.zst``: the name says what is inside, and an image that
already exists is returned without any work.

Everything is built in a temporary directory next to its destination and renamed into place at the
end, so a crash or a Ctrl-C never leaves a half-written image or cache entry behind.

The image is a zstd-compressed tar: ``tar --zstd -x`` unpacks the ~400 MB rootfs in a few seconds,
several times faster than gzip and with a similar size.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from deckard.model.errors import DeckardError

log = structlog.get_logger()

Progress = Callable[[str, float], None]

BUILDER_VERSION = "2"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
PACKAGES: tuple[str, ...] = (
    "tigervnc-standalone-server",
    "jwm",
    "xterm",
    "x11-xserver-utils",  # xsetroot
    "x11-utils",  # xmessage for the expire notice
    "xfonts-base",  # core fonts: xterm and Xvnc need "fixed"
    "fonts-dejavu-core",  # one Xft font so jwm's tray and menus have text
    "python3",  # the guest agent
    "passwd",  # useradd
)

_FILES_DIR = Path(__file__).parent / "files"
_AGENT_SOURCE = Path(__file__).parents[1] / "vma" / "agent.py"
# (path inside the image, source, mode); the agent is installed with a python3 shebang
_IMAGE_FILES: tuple[tuple[str, Path, int], ...] = (
    ("usr/local/sbin/deckard-vma", _AGENT_SOURCE, 0o755),
    ("etc/jwm/system.jwmrc", _FILES_DIR / "system.jwmrc", 0o644),
    ("etc/deckard/xsession", _FILES_DIR / "xsession", 0o755),
)
# Cut from the rootfs: documentation, manuals, translations and apt's caches are dead weight in every desktop
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


class ImageBuildError(DeckardError):
    code = "image_build_failed"


def recipe_hash() -> str:
    """Hash of what debootstrap and apt produce; the mirror is left out since every mirror serves the same."""
    recipe = {"builder": BUILDER_VERSION, "suite": SUITE, "variant": "minbase", "packages": sorted(PACKAGES)}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def _read_image_files() -> list[tuple[str, bytes, int]]:
    """Snapshot of the files added to the rootfs: hashed and packed from the same bytes."""
    out = []
    for dest, src, mode in _IMAGE_FILES:
        data = src.read_bytes()
        if src == _AGENT_SOURCE:
            data = b"#!/usr/bin/python3\n" + data
        out.append((dest, data, mode))
    return out


def files_hash(files: list[tuple[str, bytes, int]] | None = None) -> str:
    """Hash of the files added on top of the rootfs (the agent and the session defaults)."""
    h = hashlib.sha256()
    for dest, data, mode in files if files is not None else _read_image_files():
        h.update(f"{dest}:{mode:o}:{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:12]


def image_filename(files: list[tuple[str, bytes, int]] | None = None) -> str:
    """Name of the image the current recipe and files make: ``deckard-desktop-<recipe>-<files>.tar.zst``."""
    return f"deckard-desktop-{recipe_hash()}-{files_hash(files)}.tar.zst"


async def build_image(
    output_dir: Path,
    *,
    cache_dir: Path,
    progress: Progress,
    mirror: str = DEFAULT_MIRROR,
) -> Path:
    """Build (or find) the default desktop image in ``output_dir`` and return its path."""
    if os.geteuid() != 0:
        raise ImageBuildError("building an image needs root (debootstrap and chroot); run it as root")
    output_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = _read_image_files()
    target = output_dir / image_filename(files)
    if target.exists():
        progress("image is up to date", 1.0)
        return target
    rootfs_tar = cache_dir / f"rootfs-{recipe_hash()}.tar.zst"
    if rootfs_tar.exists():
        await _pack_image(rootfs_tar, target, files, progress, 0.0)
    else:
        log.info("image.bootstrap", cache=str(rootfs_tar))
        await _build_rootfs(rootfs_tar, progress, mirror)
        await _pack_image(rootfs_tar, target, files, progress, 0.9)
    progress("image ready", 1.0)
    log.info("image.built", path=str(target), size=target.stat().st_size)
    return target


async def _build_rootfs(dest: Path, progress: Progress, mirror: str) -> None:
    """Debootstrap + apt-get into a temp dir, prune it, and store it as the cached rootfs tarball."""
    tmp = Path(tempfile.mkdtemp(prefix=".rootfs-", dir=dest.parent))
    rootfs = tmp / "rootfs"
    proc_mounted = False
    try:
        await _debootstrap(rootfs, mirror, progress)
        (rootfs / "etc/dpkg/dpkg.cfg.d/01-deckard-nodoc").write_text(_NODOC_CFG)
        (rootfs / "etc/apt/apt.conf.d/99-deckard").write_text(_APT_CFG)
        policy = rootfs / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\n# no service starts inside an image build or a desktop\nexit 101\n")
        policy.chmod(0o755)
        await _run(["mount", "-t", "proc", "proc", str(rootfs / "proc")])
        proc_mounted = True
        await _apt_install(rootfs, progress)
        await _run(["umount", str(rootfs / "proc")])
        proc_mounted = False
        progress("pruning the rootfs", 0.88)
        await asyncio.to_thread(_prune, rootfs)
        progress("compressing the rootfs", 0.89)
        part = tmp / "rootfs.tar.zst"
        await _run(
            ["tar", "--numeric-owner", "-I", "zstd -T0 -3", "-C", str(rootfs), "-cf", str(part), "."],
        )
        part.rename(dest)
    finally:
        if proc_mounted:
            await _run(["umount", "-l", str(rootfs / "proc")], check=False)
        if os.path.ismount(rootfs / "proc"):
            log.error("image.cleanup_skipped", reason="proc still mounted", path=str(tmp))
        else:
            await asyncio.to_thread(shutil.rmtree, tmp, True)


async def _debootstrap(rootfs: Path, mirror: str, progress: Progress) -> None:
    """Run debootstrap and turn its ``I:`` lines into a fraction between 0 and 0.6."""
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
        frac = lo + (hi - lo) * min(counts[phase] / expected, 1.0)
        progress(f"debootstrap: {phase.lower()} {pkg}", 0.6 * frac)

    progress("debootstrap: starting", 0.0)
    await _run(
        ["debootstrap", "--verbose", "--variant=minbase", SUITE, str(rootfs), mirror],
        on_line=on_line,
    )


async def _apt_install(rootfs: Path, progress: Progress) -> None:
    """Install the desktop packages in the chroot; progress moves from 0.6 to 0.88."""
    env = {"DEBIAN_FRONTEND": "noninteractive", "LANG": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    progress("apt: updating package lists", 0.6)
    await _run(["chroot", str(rootfs), "apt-get", "update"], env=env)
    total = 0
    done = 0
    count_re = re.compile(r"^(\d+) upgraded, (\d+) newly installed")

    def on_line(line: str) -> None:
        nonlocal total, done
        if m := count_re.match(line):
            total = int(m.group(2))
        elif line.startswith(("Unpacking ", "Setting up ")):
            done += 1
            frac = done / (2 * total) if total else 0.0
            progress(f"apt: {line.split(' (')[0].lower()}", 0.62 + 0.26 * min(frac, 1.0))

    await _run(
        ["chroot", str(rootfs), "apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
        env=env,
        on_line=on_line,
    )
    await _run(["chroot", str(rootfs), "apt-get", "clean"], env=env)


def _prune(rootfs: Path) -> None:
    for rel in _PRUNE:
        path = rootfs / rel
        if path.is_dir() and not path.is_symlink():
            # keep the directory itself: packages and apt expect it to exist
            for child in path.iterdir():
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
    # debootstrap's device nodes are useless: LXC mounts its own /dev in every container
    dev = rootfs / "dev"
    for child in dev.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


async def _pack_image(
    rootfs_tar: Path, target: Path, files: list[tuple[str, bytes, int]], progress: Progress, start: float
) -> None:
    """Copy the cached rootfs tarball, append the agent and session files, compress, rename into place."""
    tmp = Path(tempfile.mkdtemp(prefix=".image-", dir=target.parent))
    try:
        span = 1.0 - start
        progress("unpacking the cached rootfs archive", start)
        plain = tmp / "image.tar"
        await _run(["zstd", "-q", "-d", "-f", str(rootfs_tar), "-o", str(plain)])
        progress("adding the guest agent", start + 0.3 * span)
        extra = tmp / "extra"
        members = await asyncio.to_thread(_stage_files, extra, files)
        tar_opts = ["--numeric-owner", "--owner=0", "--group=0", "--no-recursion"]
        await _run(["tar", *tar_opts, "-C", str(extra), "-rf", str(plain), *members])
        progress("compressing the image", start + 0.4 * span)
        packed = tmp / target.name
        await _run(["zstd", "-q", "-T0", "-3", "--rm", str(plain), "-o", str(packed)])
        packed.rename(target)
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)


def _stage_files(extra: Path, files: list[tuple[str, bytes, int]]) -> list[str]:
    """Lay out the image files under ``extra`` and return the tar member names (parents first)."""
    members: list[str] = []
    for dest, data, mode in files:
        out = extra / dest
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        out.chmod(mode)
        members.append(f"./{dest}")
    # new directories (etc/deckard) need their own entry, or tar would create them with its defaults
    (extra / "etc/deckard").chmod(0o755)
    meta = extra / "etc/deckard/image.json"
    meta.write_text(json.dumps({"recipe": recipe_hash(), "files": files_hash(files), "packages": list(PACKAGES)}))
    meta.chmod(0o644)
    return ["./etc/deckard", *members, "./etc/deckard/image.json"]


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
