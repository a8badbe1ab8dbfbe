"""What a desktop container gets, as an LXC config: identity, limits, mounts, network and the walls around it.

Pure: :func:`render_config` and :func:`render_seccomp` turn a :class:`GuestSpec` and a few paths into text, so
every promise of the config is checked by unit tests without root (``tests/unit/test_container_config.py``) and
the e2e tests check that LXC honours it.  ``docs/security.md`` says why each wall is there.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from deckard.drivers.agent_code import AGENT
from deckard.drivers.base import GuestSpec
from deckard.drivers.network import veth_name
from deckard.vma.agent import RUN_DIR, X11_SOCKET_DIR

PIDS_MAX = 2048
CFS_PERIOD_US = 100_000
ID_RANGE = 1 << 24  # guest uids/gids 0 … 2^24-1: room for uid_for_user() of millions of users
# What root in a desktop keeps (namespaced: it acts on the desktop's own files and processes only): the agent
# creates the user (chown, fowner), starts the session as that user (setuid, setgid) and ends it (kill).
CAPS_KEEP = "chown fowner setuid setgid kill"
# Where shared folders may be mounted (``nx.shares.in_containers``), sys_admin and setpcap as well, for PID 1: the
# agent forks the mounter of shared folders with them and drops both before anything else runs (vma/shares.py),
# so no other process of the desktop, root or not, has them.  An init that is not Deckard's agent would keep them:
# hence off by default.
MOUNTER_CAPS = "sys_admin setpcap"
FUSE_DEVICE = "c 10:229 rwm"  # /dev/fuse: only the mounter can mount with it (vma/shares.py)
# Syscalls a desktop never needs and that reach the kernel's riskiest surface (in the spirit of LXC's and
# Docker's default profiles); clone3 says ENOSYS so the C library falls back to clone, which is filtered.
SECCOMP_DENY = [
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "open_by_handle_at",
    "name_to_handle_at",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "iopl",
    "ioperm",
    "swapon",
    "swapoff",
    "syslog",
    "acct",
    "quotactl",
    "lookup_dcookie",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "pivot_root",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "setns",
]
CLONE_NEWUSER = 0x10000000
# /proc files that describe the host rather than the desktop: hidden behind /dev/null (files) or a tmpfs
PROC_MASKED_FILES = ("kcore", "keys", "timer_list", "sched_debug", "latency_stats", "kallsyms", "sysrq-trigger")
PROC_MASKED_DIRS = ("acpi", "scsi", "asound")
# Devices a desktop may open: the standard character devices, the console and pseudo terminals.
DEVICES_ALLOW = (
    "c 1:3 rwm",  # null
    "c 1:5 rwm",  # zero
    "c 1:7 rwm",  # full
    "c 1:8 rwm",  # random
    "c 1:9 rwm",  # urandom
    "c 5:0 rwm",  # tty
    "c 5:1 rwm",  # console
    "c 5:2 rwm",  # ptmx
    "c 136:* rwm",  # pts/*
)


def farm_id_base(farm_id: str) -> int:
    """The first host id of this farm's desktops: one of 250 ranges of 2^24 ids above the first, by farm id.

    Every node of a farm derives the same base from the farm id, so shifted images and homes in the shared
    storage mean the same on all of them; two farms on one machine get different ranges (unless their ids
    collide, 1 in 250), and no range reaches uid 2^32-1.
    """
    return (1 + int(farm_id, 16) % 250) * ID_RANGE


def render_seccomp() -> str:
    """LXC's seccomp policy for desktops: a deny list, plus no new user namespaces (clone, unshare)."""
    lines = ["2", "denylist", "reject_force_umount", "[all]"]
    lines += [f"{name} errno 1" for name in SECCOMP_DENY]
    lines += ["clone3 errno 38"]
    lines += [
        f"clone errno 1 [0,{CLONE_NEWUSER},SCMP_CMP_MASKED_EQ,{CLONE_NEWUSER}]",
        f"unshare errno 1 [0,{CLONE_NEWUSER},SCMP_CMP_MASKED_EQ,{CLONE_NEWUSER}]",
    ]
    return "\n".join(lines) + "\n"


def apparmor_available() -> bool:
    return Path("/sys/module/apparmor/parameters/enabled").is_file() and shutil.which("apparmor_parser") is not None


def display_at_boot(spec: GuestSpec, boot: str | None, fuse: Path | None) -> bool:
    """The guest's init is the image's boot script (``boot``), which starts the user's display before the agent:
    not for a warm guest (nobody's yet), nor with the mounter, whose capabilities the agent drops before any child."""
    return boot is not None and not spec.warm and not (spec.mounter and fuse is not None)


def cgroup_limits(spec: GuestSpec, cgroup2: bool, devices: Sequence[str]) -> list[str]:
    """The desktop's memory, CPU, pids and device limits in the keys of the host's cgroup layout: LXC ignores the
    other layout's keys, leaving the desktop unlimited (``drivers/cgroups.py`` says how the layout is told)."""
    memory, quota = spec.memory_mib * 1024 * 1024, max(int(spec.cpus * CFS_PERIOD_US), 1000)
    if cgroup2:  # devices: LXC turns the list into an eBPF program on the desktop's cgroup
        head = [
            f"lxc.cgroup2.memory.max = {memory}",
            f"lxc.cgroup2.cpu.max = {quota} {CFS_PERIOD_US}",
            f"lxc.cgroup2.pids.max = {PIDS_MAX}",
        ]
    else:
        head = [
            f"lxc.cgroup.memory.limit_in_bytes = {memory}",
            f"lxc.cgroup.cpu.cfs_period_us = {CFS_PERIOD_US}",
            f"lxc.cgroup.cpu.cfs_quota_us = {quota}",
            f"lxc.cgroup.pids.max = {PIDS_MAX}",
        ]
    prefix = "lxc.cgroup2" if cgroup2 else "lxc.cgroup"
    return [*head, f"{prefix}.devices.deny = a", *(f"{prefix}.devices.allow = {rule}" for rule in devices)]


def render_config(
    spec: GuestSpec,
    *,
    basefs: Path,
    upper: Path,
    lxc_dir: Path,
    up_hook: Path,
    id_base: int,
    seccomp: Path,
    apparmor: bool = False,
    volumes: Sequence[tuple[Path, str, bool]] = (),
    agent: str = AGENT,
    fuse: Path | None = None,
    boot: str | None = None,
    cgroup2: bool = False,
) -> str:
    """The LXC config of one desktop (pure: everything comes from the arguments).  ``volumes``: (where the volume
    is mounted on the host, its name, read-only) for each attached volume, bind-mounted on ``/media/<name>``;
    ``agent``: the command that starts the guest agent (``agent_code.agent_command``); ``fuse``: a FUSE device
    node its root may open, bound on ``/dev/fuse`` (shared folders); ``boot``: the image's boot script, which
    starts the user's display before the agent (``agent_code.boot_command``); ``cgroup2``: the host has only the
    unified cgroup hierarchy (``cgroups.host_pure_cgroup2``)."""
    mounter = spec.mounter and fuse is not None  # its capabilities and /dev/fuse come together or not at all
    if spec.warm:  # Xvnc for nobody yet: a user takes the guest over
        init = f"{agent} --warm"
    elif display_at_boot(spec, boot, fuse):
        init = f"{boot} {spec.user_login} {spec.user_uid}"
    else:
        init = f"{agent} --display-for {spec.user_login}:{spec.user_uid}"
    lines = [
        f"# deckard desktop {spec.desktop_id}: generated, do not edit",
        f"lxc.uts.name = {spec.guest_name}",
        f"lxc.rootfs.path = overlay:{basefs}:{upper}",
        # the user's display starts at boot, before or beside the agent's own start: a connect finds it up or coming
        f"lxc.init.cmd = {init}",
        f"lxc.idmap = u 0 {id_base} {ID_RANGE}",
        f"lxc.idmap = g 0 {id_base} {ID_RANGE}",
        f"lxc.cap.keep = {CAPS_KEEP} {MOUNTER_CAPS}" if mounter else f"lxc.cap.keep = {CAPS_KEEP}",
        "lxc.no_new_privs = 1",
        f"lxc.seccomp.profile = {seccomp}",
        # this kernel has no AppArmor (reference/platform.md): then the namespaces and seccomp above are the wall
        "lxc.apparmor.profile = generated" if apparmor else "lxc.apparmor.profile = unconfined",
        "lxc.autodev = 1",
        "lxc.pty.max = 64",
        "lxc.tty.max = 0",
        "lxc.signal.halt = SIGPWR",
        "lxc.mount.auto = proc:mixed sys:ro",
        *(f"lxc.mount.entry = /dev/null proc/{name} none bind,optional 0 0" for name in PROC_MASKED_FILES),
        *(
            f"lxc.mount.entry = tmpfs proc/{name} tmpfs ro,nosuid,nodev,noexec,optional 0 0"
            for name in PROC_MASKED_DIRS
        ),
        # a fresh /tmp at every start: a persistent overlay would keep a stale /tmp/.X0-lock
        f"lxc.mount.entry = tmpfs tmp tmpfs rw,nosuid,nodev,mode=1777,size={max(spec.memory_mib // 2, 64)}m 0 0",
        "lxc.mount.entry = tmpfs run tmpfs rw,nosuid,nodev,mode=755,size=32m 0 0",
        # the agent's run directory and the X sockets' made by the mounts: the boot script execs nothing for them
        f"lxc.mount.entry = tmpfs {str(RUN_DIR).lstrip('/')} tmpfs rw,nosuid,nodev,mode=755,size=32m,create=dir 0 0",
        f"lxc.mount.entry = tmpfs {X11_SOCKET_DIR.lstrip('/')} tmpfs rw,nosuid,nodev,mode=1777,size=1m,create=dir 0 0",
        "lxc.mount.entry = tmpfs dev/shm tmpfs rw,nosuid,nodev,mode=1777,create=dir 0 0",
        # a warm guest's /home is the node's share, where the home of the user who takes it over is mounted later
        f"lxc.mount.entry = {spec.home_dir} home none rbind,create=dir 0 0"
        if spec.warm
        else f"lxc.mount.entry = {spec.home_dir} home/{spec.user_login} none bind,create=dir 0 0",
        *(
            f"lxc.mount.entry = {host} media/{name} none bind,create=dir,nosuid,nodev{',ro' if ro else ''} 0 0"
            for host, name, ro in volumes
        ),
        *cgroup_limits(spec, cgroup2, devices=(*DEVICES_ALLOW, *((FUSE_DEVICE,) if mounter else ()))),
        *((f"lxc.mount.entry = {fuse} dev/fuse none bind,create=file 0 0",) if mounter else ()),
        "lxc.net.0.type = veth",
        f"lxc.net.0.link = {spec.bridge}",
        "lxc.net.0.flags = up",
        "lxc.net.0.name = eth0",
        f"lxc.net.0.veth.pair = {veth_name(spec.guest_name)}",
        f"lxc.net.0.hwaddr = {spec.mac}",
        f"lxc.net.0.ipv4.address = {spec.ip}/{spec.prefix_len}",
        f"lxc.net.0.ipv4.gateway = {spec.gateway}",
        # isolate the bridge port before the guest can send a packet (no window where desktops see each other)
        f"lxc.net.0.script.up = {up_hook}",
        f"lxc.log.file = {lxc_dir / 'lxc.log'}",
        "lxc.log.level = WARN",
        f"lxc.console.logfile = {lxc_dir / 'console.log'}",
        "lxc.console.size = 1MB",
    ]
    lines += [f"lxc.environment = {key}={value}" for key, value in sorted(spec.env.items())]
    return "\n".join(lines) + "\n"


def render_up_hook() -> str:
    """LXC runs this on the host once the veth is on the bridge: args are name, net, up, veth, bridge, host veth."""
    bridge_tool = shutil.which("bridge") or "/usr/sbin/bridge"
    return (
        '#!/bin/sh\nport="${LXC_NET_PEER:-$6}"\n'
        # the port's sysfs flag: no program to start (a start waits for this hook); `bridge` where there is none
        'flag="/sys/class/net/$port/brport/isolated"\n'
        'if [ -w "$flag" ]; then echo 1 > "$flag"; exit; fi\n'
        f'exec {bridge_tool} link set dev "$port" isolated on\n'
    )
