"""Xvnc's start-up keymap, compiled once when the image is built rather than at every desktop start.

Every Xvnc start runs ``xkbcomp`` on the same keymap (TigerVNC's defaults: evdev rules, pc105, us): about 5 ms of
the display's 34 here (``docs/benchmarks.md``), the same work in every desktop of an image, on the cold start's
longest phase.  The builder diverts the image's ``xkbcomp`` (``dpkg-divert``, to :data:`REAL`), runs the image's
Xvnc once in the chroot to learn the keymap it asks for (a *capture* wrapper saves it), compiles it into
:data:`CACHE_DIR`, and installs :func:`wrapper`: when Xvnc asks for exactly that keymap it gets the compiled file
(one ``cp``), and anything else — another layout, ``setxkbmap``, another Xvnc — runs the real compiler, saying so
on stderr (:data:`MISS`, in the display's log).  A miss costs a compile, never a wrong keymap.

An image built before this, or one imported from elsewhere, has no wrapper: its Xvnc compiles as before.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import structlog

log = structlog.get_logger()

XKBCOMP = "/usr/bin/xkbcomp"
REAL = "/usr/bin/xkbcomp.real"
CACHE_DIR = "/usr/share/deckard/xkb"
XKB_ROOT = "/usr/share/X11/xkb"  # Xvnc's ``-R`` for xkbcomp: the cache holds for this data only
MISS = "deckard: a keymap not compiled with the image: compiling it"
CAPTURE_TIMEOUT_S = 60.0


def wrapper(cache_dir: str = CACHE_DIR, real: str = REAL) -> str:
    """``xkbcomp`` for the image.  Xvnc runs ``xkbcomp -w N -R<root> -xkm - -em1 M -emp M -eml M <out>.xkm`` with
    the keymap on stdin; the stdin is read (shell built-ins only) and compared with the captured one."""
    return f"""#!/bin/sh
# deckard: xkbcomp with Xvnc's start-up keymap compiled when the image was built (images/keymap.py)
cache="{cache_dir}" real="{real}"
if [ $# -eq 12 ] && [ "$3" = "-R{XKB_ROOT}" ] && [ "$4" = -xkm ] && [ "$5" = - ] \\
    && [ -f "$cache/default.xkm" ] && [ -f "$cache/default.xkb" ]; then
  input="" want=""
  while IFS= read -r line || [ -n "$line" ]; do input="$input$line
"; done
  while IFS= read -r line || [ -n "$line" ]; do want="$want$line
"; done <"$cache/default.xkb"
  for out; do :; done
  if [ "$input" = "$want" ]; then exec cp "$cache/default.xkm" "$out"; fi
  echo "{MISS}" >&2
  printf '%s' "$input" | "$real" "$@"
  exit
fi
exec "$real" "$@"
"""


def capture_wrapper(cache_dir: str = CACHE_DIR, real: str = REAL) -> str:
    """The wrapper while the builder's Xvnc runs: it keeps the keymap Xvnc asked for, and compiles it."""
    return f"""#!/bin/sh
cat >"{cache_dir}/default.xkb" && exec "{real}" "$@" <"{cache_dir}/default.xkb"
"""


async def cache_keymap(rootfs: Path, env: dict[str, str]) -> bool:
    """Compile the image's start-up keymap and install :func:`wrapper` (a rootfs without Xvnc and xkbcomp is
    left alone).  False, with the reason logged, when the keymap could not be learnt: the image then has the
    wrapper without a cache, which always runs the real compiler."""
    xkbcomp, real = rootfs / XKBCOMP.lstrip("/"), rootfs / REAL.lstrip("/")
    xvnc = rootfs / "usr/bin/Xvnc"  # a link to /etc/alternatives: absolute, so not followed from here
    if not (xvnc.is_symlink() or xvnc.exists()) or not (xkbcomp.exists() or real.exists()):
        return False
    if not real.exists():  # a parent layer diverted it already
        divert = ["dpkg-divert", "--quiet", "--local", "--rename", "--divert", REAL, "--add", XKBCOMP]
        if await _chroot(rootfs, env, divert) != 0:
            log.warning("image.keymap_not_cached", reason="dpkg-divert failed")
            return False
    cache = rootfs / CACHE_DIR.lstrip("/")
    cache.mkdir(parents=True, exist_ok=True)
    _forget(cache)
    _install(xkbcomp, capture_wrapper())
    try:
        learnt = await _run_xvnc_once(rootfs, env) and (cache / "default.xkb").is_file()
        if learnt:
            source, compiled = f"{CACHE_DIR}/default.xkb", f"{CACHE_DIR}/default.xkm"
            compile_ = [REAL, "-w", "1", f"-R{XKB_ROOT}", "-xkm", source, compiled]
            learnt = await _chroot(rootfs, env, compile_) == 0 and (cache / "default.xkm").is_file()
    finally:
        _install(xkbcomp, wrapper())
        _clean_display_files(rootfs)
    if not learnt:
        _forget(cache)
        log.warning("image.keymap_not_cached", reason="the image's Xvnc did not start in the build chroot")
    return learnt


def _forget(cache: Path) -> None:
    for name in ("default.xkb", "default.xkm"):
        (cache / name).unlink(missing_ok=True)


def _install(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


async def _chroot(rootfs: Path, env: dict[str, str], cmd: list[str]) -> int:
    proc = await asyncio.create_subprocess_exec(
        "chroot", str(rootfs), *cmd, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await proc.wait()


async def _run_xvnc_once(rootfs: Path, env: dict[str, str]) -> bool:
    """The image's Xvnc in the chroot until it is ready (``-displayfd``: its display number once its keyboard is
    set up), listening on no TCP port, then stopped."""
    cmd = ["/usr/bin/Xvnc", "-displayfd", "1", "-rfbport", "-1", "-nolisten", "tcp", "-SecurityTypes", "None"]
    proc = await asyncio.create_subprocess_exec(
        "chroot",
        str(rootfs),
        *cmd,
        "-geometry",
        "64x64",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(CAPTURE_TIMEOUT_S):
            return (await proc.stdout.readline()).strip().isdigit()
    except TimeoutError:
        return False
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _clean_display_files(rootfs: Path) -> None:
    """What the builder's Xvnc left: its sockets, lock and compiled keymap."""
    for pattern in ("tmp/.X11-unix/X*", "tmp/.X*-lock", "var/lib/xkb/server-*.xkm", "tmp/server-*.xkm"):
        for path in rootfs.glob(pattern):
            with contextlib.suppress(OSError):
                path.unlink()
