"""The cgroups of desktop containers: what they use and are allowed, removing what LXC leaves, and the kernel's one
switch that makes moving a process into a cgroup cheap (:func:`favordynmods_mount`).

Two layouts, one code: a *hybrid* host keeps its controllers on v1 hierarchies (``/sys/fs/cgroup/<controller>``,
beside an empty cgroup2 ``unified`` mount: these build machines), a *pure cgroup2* host has one hierarchy at
``/sys/fs/cgroup`` with every controller (Debian 12 as installed).  LXC applies ``lxc.cgroup.*`` keys only on the
first and ``lxc.cgroup2.*`` keys only on the second, ignoring the others with a warning (LXC 5.0
``cgfsng_setup_limits_legacy``: "Ignoring legacy cgroup limits on pure cgroup2 system"), so a config written for
the wrong layout starts a desktop with no limits at all: :func:`pure_cgroup2` picks the layout as LXC does.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED_V1 = 1 << 62  # a v1 byte limit this high is the page counter's maximum: no limit


def _cgroup_paths(pid: int | str) -> dict[str, str]:
    """controller -> cgroup path of a process, from /proc/<pid>/cgroup (v1 lines and the v2 ``::`` line)."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in (controllers or "unified").split(","):
                out[controller] = path
    return out


def pure_cgroup2(proc_cgroup: str) -> bool:
    """Whether ``proc_cgroup`` (a /proc/<pid>/cgroup's text) is a pure cgroup2 host's: one line, ``0::<path>``
    (LXC's own test)."""
    lines = [line for line in proc_cgroup.splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("0::")


def host_pure_cgroup2() -> bool:
    """This host's layout (:func:`pure_cgroup2`); False when /proc cannot tell (the v1 keys, as before)."""
    try:
        return pure_cgroup2(Path("/proc/self/cgroup").read_text())
    except OSError:
        return False


def _cgroup_dir(pid: int | str, controller: str) -> tuple[Path, bool] | None:
    """The directory of ``pid``'s cgroup for ``controller`` and whether it is cgroup2's: on the controller's v1
    hierarchy, or in the one hierarchy of a pure cgroup2 host; None when the process is gone or neither has it."""
    paths = _cgroup_paths(pid)
    if controller in paths:
        return CGROUP_ROOT / controller / paths[controller].lstrip("/"), False
    if set(paths) == {"unified"}:
        return CGROUP_ROOT / paths["unified"].lstrip("/"), True
    return None


def _read(pid: int, controller: str, v1_file: str, v2_file: str) -> str | None:
    """A file of ``pid``'s cgroup for ``controller``: ``v1_file`` on a v1 hierarchy, ``v2_file`` on cgroup2."""
    found = _cgroup_dir(pid, controller)
    if found is None:
        return None
    directory, v2 = found
    try:
        return (directory / (v2_file if v2 else v1_file)).read_text()
    except OSError:
        return None


def _number(text: str | None) -> int | None:
    """A cgroup file's number; None for unlimited (cgroup2's ``max``, v1's -1 quota and its page counter's maximum,
    2^63 - 4096 bytes), nothing or garbage."""
    try:
        value = int((text or "").split()[0])
    except (ValueError, IndexError):
        return None
    return value if 0 <= value < UNLIMITED_V1 else None


def memory_usage(pid: int) -> int | None:
    """Bytes charged to the guest's memory cgroup (RSS + page cache: v1 memory.usage_in_bytes, v2 memory.current)."""
    return _number(_read(pid, "memory", "memory.usage_in_bytes", "memory.current"))


def memory_stat(pid: int) -> dict[str, int]:
    """The guest's memory.stat, for benchmarks and tests (v1: rss, cache, total_rss…; v2: anon, file…)."""
    out: dict[str, int] = {}
    for line in (_read(pid, "memory", "memory.stat", "memory.stat") or "").splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


@dataclass(frozen=True)
class Limits:
    """What a guest's cgroups allow it, as the kernel has them (None: unlimited or not readable)."""

    memory_bytes: int | None
    cpu_quota_us: int | None
    cpu_period_us: int | None
    pids: int | None


def limits(pid: int) -> Limits:
    """The memory, CPU and pids limits of ``pid``'s cgroups on either layout (the e2e tests check LXC set them)."""
    quota = _read(pid, "cpu", "cpu.cfs_quota_us", "cpu.max")  # cgroup2's cpu.max: "<quota> <period>"
    period = (_read(pid, "cpu", "cpu.cfs_period_us", "cpu.max") or "").rpartition(" ")[2]
    return Limits(
        memory_bytes=_number(_read(pid, "memory", "memory.limit_in_bytes", "memory.max")),
        cpu_quota_us=_number(quota),
        cpu_period_us=_number(period),
        pids=_number(_read(pid, "pids", "pids.max", "pids.max")),
    )


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
    if set(own) == {"unified"}:  # pure cgroup2: one hierarchy, at the root
        places = [(CGROUP_ROOT, own["unified"])]
    else:
        places = [(h, own.get(h.name) or own.get(f"name={h.name}") or "/") for h in CGROUP_ROOT.iterdir()]
    for hierarchy, own_rel in places:
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
