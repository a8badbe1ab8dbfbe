"""Can this storage root hold what Deckard puts there?  Probed, not guessed from the filesystem's name.

A farm's storage root may be a local directory or a network filesystem (GlusterFS over FUSE, ``drivers/gluster.py``).
Each part of it needs something different:

* ``images/``, ``homes/``, ``volumes/``: files written, fsynced, renamed and locked (``flock``) — any POSIX
  filesystem, FUSE included;
* ``basefs/``: an unpacked image, read-only, the *lower* layer of every container desktop's overlay — FUSE works,
  but unpacking tens of thousands of small files onto GlusterFS is 50-70x slower than onto a local disk;
* ``overlays/``: a container desktop's writable *upper* layer.  overlayfs refuses an upper layer on FUSE (the kernel
  says "upper fs does not support tmpfile" and "… RENAME_WHITEOUT"), so with the storage root on GlusterFS a node
  keeps both layers on its own disk (``storage.local_layers``: ``<home>/local/``).  A VM desktop's overlay is a
  qcow2 file, which any filesystem holds.

:func:`check_storage` tries each of these for real (a container probe mounts a throwaway overlay, so it needs root)
and says what works; :func:`require_overlay_upper` is what a node runs before it starts container desktops.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from deckard.drivers.gluster import fs_type
from deckard.model.errors import DriverError
from deckard.runtime.paths import FarmPaths

# what the kernel logs when it refuses an upper layer, for filesystems known to lack it
NO_UPPER_REASON = "overlayfs cannot use it as a writable layer (no RENAME_WHITEOUT, no O_TMPFILE)"


@dataclass(frozen=True)
class StorageCheck:
    part: str  # images, basefs, overlays, homes
    path: Path
    fs: str
    ok: bool
    note: str


def probe_files(directory: Path) -> str | None:
    """Write, fsync, rename, lock and remove a file in ``directory``; None if all works, else what failed."""
    directory.mkdir(parents=True, exist_ok=True)
    step = "create"
    try:
        with tempfile.TemporaryDirectory(prefix=".deckard-probe-", dir=directory) as tmp:
            path = Path(tmp) / "a"
            with path.open("wb") as f:
                step = "write"
                f.write(b"deckard" * 1024)
                f.flush()
                step = "fsync"
                os.fsync(f.fileno())
                step = "flock"
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            step = "rename"
            path.rename(Path(tmp) / "b")
            step = "chown"
            os.chown(Path(tmp) / "b", 200000, 200000) if os.geteuid() == 0 else None
    except OSError as e:
        return f"{step} failed: {e.strerror or e}"
    return None


def probe_overlay_upper(directory: Path, lower_parent: Path | None = None) -> str | None:
    """Mount a throwaway overlay whose upper layer is in ``directory`` and whose lower layer is in
    ``lower_parent`` (where the image layers live; default beside the upper), write to it and delete a file of
    the lower layer through it; None if all works, else the reason."""
    if os.geteuid() != 0:
        kind = fs_type(directory)
        return NO_UPPER_REASON if kind.startswith(("fuse", "nfs")) else None
    directory.mkdir(parents=True, exist_ok=True)
    (lower_parent or directory).mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".deckard-probe-", dir=directory)))
        low = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".deckard-probe-", dir=lower_parent or base)))
        for d in (base / "upper", base / "work", base / "merged"):
            d.mkdir()
        (low / "f").write_text("base\n")
        opts = f"lowerdir={low},upperdir={base / 'upper'},workdir={base / 'work'}"
        result = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(base / "merged")],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            why = NO_UPPER_REASON if fs_type(base).startswith(("fuse", "nfs")) else "overlay mount failed"
            return f"{why}: " + (result.stderr.strip().splitlines() or ["no output"])[0]
        try:
            (base / "merged" / "new").write_text("x\n")
            (base / "merged" / "f").unlink()
        except OSError as e:
            return f"the overlay mounted but a write failed: {e.strerror or e}"
        finally:
            subprocess.run(["umount", str(base / "merged")], check=False)
            # overlayfs leaves a root-only work/work directory behind
            shutil.rmtree(base / "work", ignore_errors=True)
    return None


def check_storage(paths: FarmPaths) -> list[StorageCheck]:
    """What each part of the storage root (and a node's overlays) can hold, probed on the filesystem itself."""
    checks = []
    for part, path in (("images", paths.images), ("basefs", paths.basefs), ("homes", paths.homes)):
        problem = probe_files(path)
        note = problem or "files: ok"
        if part == "basefs" and problem is None:
            note = "lower layer of container overlays: ok"
            if fs_type(path).startswith("fuse"):
                note += " (unpacking an image here is slow: storage.local_layers keeps it on local disk)"
        checks.append(StorageCheck(part, path, fs_type(path), problem is None, note))
    problem = probe_files(paths.overlays) or probe_overlay_upper(paths.overlays, paths.basefs)
    note = problem or "container overlays (upper layer) and VM overlays (qcow2): ok"
    if problem and NO_UPPER_REASON in problem:
        note = f"{problem}: set storage.local_layers = true (DECKARD_STORAGE__LOCAL_LAYERS=1) on every node"
    checks.append(StorageCheck("overlays", paths.overlays, fs_type(paths.overlays), problem is None, note))
    return checks


def require_overlay_upper(paths: FarmPaths) -> None:
    """Refuse to start container desktops whose overlays could not mount (a clear error now, not at every start)."""
    with contextlib.suppress(FileNotFoundError):
        kind = fs_type(paths.overlays)
        if kind.startswith(("fuse", "nfs")):
            raise DriverError(
                f"container desktops cannot keep their writable layer in {paths.overlays} ({kind}: {NO_UPPER_REASON}): "
                "set storage.local_layers = true (DECKARD_STORAGE__LOCAL_LAYERS=1) so this node keeps desktop "
                "layers on its own disk (`deckard storage check` shows what the storage root can hold)",
                code="storage_overlay_unsupported",
                details={"path": str(paths.overlays), "fs": kind},
            )
