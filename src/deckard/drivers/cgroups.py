"""The cgroups of desktop containers on this host's v1 hierarchies: what they use, removing what LXC leaves, and
the kernel's one switch that makes moving a process into a cgroup cheap (:func:`favordynmods_mount`)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_paths(pid: int | str) -> dict[str, str]:
    """controller -> cgroup path of a process, from /proc/<pid>/cgroup (v1 lines and the v2 ``::`` line)."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in (controllers or "unified").split(","):
                out[controller] = path
    return out


def memory_usage(pid: int) -> int | None:
    """Bytes charged to the guest's memory cgroup (memory.usage_in_bytes: RSS + page cache)."""
    path = _cgroup_paths(pid).get("memory")
    if path is None:
        return None
    try:
        return int((CGROUP_ROOT / "memory" / path.lstrip("/") / "memory.usage_in_bytes").read_text())
    except (OSError, ValueError):
        return None


def memory_stat(pid: int) -> dict[str, int]:
    """The guest's memory.stat (rss, cache, ...), for benchmarks."""
    path = _cgroup_paths(pid).get("memory")
    out: dict[str, int] = {}
    if path is None:
        return out
    with contextlib.suppress(OSError):
        for line in (CGROUP_ROOT / "memory" / path.lstrip("/") / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            out[key] = int(value)
    return out


def remove_cgroups(guest_name: str) -> None:
    """Remove the cgroup directories LXC leaves behind for a guest under every controller.

    LXC creates them relative to the cgroup of the process that ran lxc-start, or at the hierarchy's root
    when it may not write there (seen here for memory), so both places are searched.  ``lxc.pivot`` is
    shared by all guests and only removed when empty.
    """
    own = _cgroup_paths("self")
    names = (f"lxc.payload.{guest_name}", f"lxc.monitor.{guest_name}", "lxc.pivot")
    if not CGROUP_ROOT.is_dir():
        return
    for hierarchy in CGROUP_ROOT.iterdir():
        controller = hierarchy.name
        own_rel = own.get(controller) or own.get(f"name={controller}") or "/"
        for base in {hierarchy, hierarchy / own_rel.lstrip("/")}:
            for name in names:
                top = base / name
                if not top.is_dir():
                    continue
                # children first: a cgroup directory can only be removed once it has none
                for dirpath, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
                    with contextlib.suppress(OSError):
                        os.rmdir(dirpath)


def favordynmods_mount(mounts: str) -> tuple[str, bool] | None:
    """The cgroup2 mount in ``mounts`` (/proc/self/mounts' text) and whether it has ``favordynmods`` already; None
    when there is none (a host with v1 hierarchies only).

    Why it matters: on a host that does not favour dynamic changes, every move of a process into a cgroup (each
    ``lxc-start`` moves its monitor and the guest's init) waits for an RCU grace period, 11 ms on these machines,
    on the start's path.  ``favordynmods`` (Linux 6.1, cgroup2's mount option; the lock it governs is shared by v1
    and v2) makes the move 0.1 ms at the cost of a slightly dearer fork and exit.  Only cgroup2 takes the option."""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup2":
            return fields[1], "favordynmods" in fields[3].split(",")
    return None
