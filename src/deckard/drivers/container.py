"""The container driver: one desktop is one LXC container driven by the LXC command-line tools.

Why the CLI and a hand-written config: the Python bindings only import under Debian's own interpreter,
and a config we render ourselves (see :func:`render_config`) says exactly what a desktop gets.

A desktop's root filesystem is an overlay: the image unpacked once per image id under ``basefs/``
(read-only lower layer, shared by every desktop of that image) and a per-desktop ``upper`` directory under
``overlays/dk<farm>-<desktop id>`` (the same whichever node runs it) that is thrown away at every start
unless the OSF keeps it.  The user's home is a bind mount kept across starts.  The guest agent is the
container's init; before start the driver writes its token and the hostname into the upper layer.

On the host each guest leaves: ``run/lxc/<guest>/`` (config, logs, ``deckard.json`` with what teardown
needs), its overlay, a veth on the bridge, cgroup directories under every v1 controller, and a neighbour
entry.  ``stop``/``kill`` remove all of them and are safe to repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

import structlog

from deckard.drivers.base import GuestInfo, GuestSpec
from deckard.drivers.network import (
    delete_link,
    flush_neighbour,
    isolate_port,
    port_isolated,
    run_command,
    veth_name,
)
from deckard.model.errors import DriverError
from deckard.runtime.paths import FarmPaths

log = structlog.get_logger()

AGENT_PATH = "/usr/local/sbin/deckard-vma"
PIDS_MAX = 2048
CFS_PERIOD_US = 100_000
CGROUP_ROOT = Path("/sys/fs/cgroup")
# A desktop user never needs these; useradd/su/Xvnc keep chown, dac_override, fowner, setuid, setgid, kill.
CAP_DROP = (
    "audit_control audit_read mac_admin mac_override mknod net_admin sys_admin sys_boot sys_module "
    "sys_nice sys_pacct sys_ptrace sys_rawio sys_resource sys_time syslog wake_alarm"
)
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


def render_config(spec: GuestSpec, *, basefs: Path, upper: Path, lxc_dir: Path, up_hook: Path) -> str:
    """The LXC config of one desktop (pure: everything comes from the arguments)."""
    lines = [
        f"# deckard desktop {spec.desktop_id}: generated, do not edit",
        f"lxc.uts.name = {spec.guest_name}",
        f"lxc.rootfs.path = overlay:{basefs}:{upper}",
        f"lxc.init.cmd = {AGENT_PATH}",
        "lxc.apparmor.profile = unconfined",
        "lxc.autodev = 1",
        "lxc.pty.max = 64",
        "lxc.tty.max = 0",
        "lxc.signal.halt = SIGPWR",
        "lxc.mount.auto = proc:mixed sys:ro",
        # a fresh /tmp at every start: a persistent overlay would keep a stale /tmp/.X0-lock
        f"lxc.mount.entry = tmpfs tmp tmpfs rw,nosuid,nodev,mode=1777,size={max(spec.memory_mib // 2, 64)}m 0 0",
        "lxc.mount.entry = tmpfs run tmpfs rw,nosuid,nodev,mode=755,size=32m 0 0",
        "lxc.mount.entry = tmpfs dev/shm tmpfs rw,nosuid,nodev,mode=1777,create=dir 0 0",
        f"lxc.mount.entry = {spec.home_dir} home/{spec.user_login} none bind,create=dir 0 0",
        f"lxc.cap.drop = {CAP_DROP}",
        # cgroup v1 keys: this host keeps every useful controller on v1, where lxc.cgroup2.* is ignored
        f"lxc.cgroup.memory.limit_in_bytes = {spec.memory_mib * 1024 * 1024}",
        f"lxc.cgroup.cpu.cfs_period_us = {CFS_PERIOD_US}",
        f"lxc.cgroup.cpu.cfs_quota_us = {max(int(spec.cpus * CFS_PERIOD_US), 1000)}",
        f"lxc.cgroup.pids.max = {PIDS_MAX}",
        "lxc.cgroup.devices.deny = a",
        *(f"lxc.cgroup.devices.allow = {rule}" for rule in DEVICES_ALLOW),
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
    return f'#!/bin/sh\nexec {bridge_tool} link set dev "${{LXC_NET_PEER:-$6}}" isolated on\n'


class ContainerDriver:
    """Desktops as LXC containers on this machine, all under ``paths.lxc`` and named ``paths.guest_prefix()*``."""

    name = "container"

    def __init__(self, paths: FarmPaths) -> None:
        self.paths = paths
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, guest_name: str) -> asyncio.Lock:
        return self._locks.setdefault(guest_name, asyncio.Lock())

    def _lxc_dir(self, guest_name: str) -> Path:
        return self.paths.lxc / guest_name

    def _lxc_args(self, guest_name: str) -> list[str]:
        return ["-n", guest_name, "-P", str(self.paths.lxc)]

    # -- start -----------------------------------------------------------------------------------------
    async def start(self, spec: GuestSpec) -> GuestInfo:
        async with self._lock(spec.guest_name):
            current = await self._state(spec.guest_name)
            if current is not None and current[0] == "RUNNING":
                info = await self._info(spec.guest_name)
                if info is not None:
                    return info
            # whatever an earlier start left (a crashed node, a stopped guest) goes first
            await self._kill(spec.guest_name)
            basefs = await self.ensure_basefs(spec.image_id, spec.image_path)
            try:
                return await self._start(spec, basefs)
            except BaseException:
                await self._kill(spec.guest_name)
                raise

    async def _start(self, spec: GuestSpec, basefs: Path) -> GuestInfo:
        lxc_dir = self._lxc_dir(spec.guest_name)
        upper = await asyncio.to_thread(self._prepare_overlay, spec)
        await asyncio.to_thread(spec.home_dir.mkdir, parents=True, exist_ok=True)
        lxc_dir.mkdir(parents=True, exist_ok=True)
        veth = veth_name(spec.guest_name)
        meta = {"desktop_id": spec.desktop_id, "ip": spec.ip, "veth": veth, "keep_overlay": spec.keep_overlay}
        (lxc_dir / "deckard.json").write_text(json.dumps(meta))
        up_hook = lxc_dir / "net-up"
        up_hook.write_text(render_up_hook())
        up_hook.chmod(0o755)
        config = lxc_dir / "config"
        config.write_text(render_config(spec, basefs=basefs, upper=upper, lxc_dir=lxc_dir, up_hook=up_hook))
        # an older guest with this IP may still be in the neighbour table with its old MAC
        await flush_neighbour(spec.ip)
        result = await run_command(
            ["lxc-start", *self._lxc_args(spec.guest_name), "-f", str(config), "-d"], check=False
        )
        if result.returncode != 0:
            raise DriverError(
                f"lxc-start {spec.guest_name} failed: {self._log_tail(spec.guest_name) or result.stderr.strip()}",
                code="start_failed",
            )
        if not await port_isolated(veth):
            # the up hook did not run (an older LXC?): isolate now, before the caller uses the guest
            await isolate_port(veth)
        info = await self._info(spec.guest_name)
        if info is None or not info.running:
            raise DriverError(
                f"{spec.guest_name} stopped right after start: {self._log_tail(spec.guest_name)}",
                code="start_failed",
            )
        log.info("container.started", guest=spec.guest_name, pid=info.pid, ip=spec.ip)
        return info

    def _prepare_overlay(self, spec: GuestSpec) -> Path:
        root = self.paths.overlay(spec.desktop_id)
        if not spec.keep_overlay and root.exists():
            shutil.rmtree(root)
        upper = root / "upper"
        (upper / "etc/deckard").mkdir(parents=True, exist_ok=True)
        os.chmod(upper / "etc", 0o755)
        os.chmod(upper / "etc/deckard", 0o755)
        token = upper / "etc/deckard/agent-token"
        with contextlib.suppress(FileNotFoundError):
            token.unlink()
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(spec.agent_token + "\n")
        (upper / "etc/hostname").write_text(spec.guest_name + "\n")
        (upper / "etc/hosts").write_text(f"127.0.0.1\tlocalhost\n{spec.ip}\t{spec.guest_name}\n")
        return upper

    async def ensure_basefs(self, image_id: int, image_path: Path) -> Path:
        """Unpack an image once into ``basefs/<image_id>`` (flock + temp dir + rename); return its path."""
        target = self.paths.basefs / str(image_id)
        if target.is_dir():
            return target
        if not image_path.is_file():
            raise DriverError(
                f"disk image {image_id} is missing: {image_path} does not exist; rebuild or re-import the image",
                code="image_missing",
                details={"path": str(image_path)},
            )
        self.paths.basefs.mkdir(parents=True, exist_ok=True)
        lock_path = self.paths.basefs / f".{image_id}.lock"
        lock_fd = await asyncio.to_thread(self._flock, lock_path)
        try:
            if target.is_dir():
                return target  # another node or task unpacked it while we waited
            tmp = Path(tempfile.mkdtemp(prefix=f".{image_id}.unpack-", dir=self.paths.basefs))
            try:
                log.info("container.unpack_image", image_id=image_id, path=str(image_path))
                await run_command(["tar", "--numeric-owner", "-xf", str(image_path), "-C", str(tmp)], timeout=600)
                os.chmod(tmp, 0o755)
                tmp.rename(target)
            except BaseException:
                await asyncio.to_thread(shutil.rmtree, tmp, True)
                raise
        finally:
            os.close(lock_fd)
        return target

    @staticmethod
    def _flock(path: Path) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    # -- stop / kill -----------------------------------------------------------------------------------
    async def stop(self, guest_name: str, timeout: float = 10.0) -> None:
        async with self._lock(guest_name):
            state = await self._state(guest_name)
            if state is not None and state[0] == "RUNNING":
                # lxc-stop sends SIGPWR (the agent powers off cleanly), then kills after the timeout
                await run_command(
                    ["lxc-stop", *self._lxc_args(guest_name), "-t", str(max(int(timeout), 1))],
                    check=False,
                    timeout=timeout + 15,
                )
            await self._kill(guest_name)

    async def kill(self, guest_name: str) -> None:
        async with self._lock(guest_name):
            await self._kill(guest_name)

    async def _kill(self, guest_name: str) -> None:
        state = await self._state(guest_name)
        if state is not None and state[0] != "STOPPED":
            await run_command(["lxc-stop", *self._lxc_args(guest_name), "-k"], check=False, timeout=30)
        await self._cleanup(guest_name)

    async def _cleanup(self, guest_name: str) -> None:
        """Remove what a start left on the host; the guest must not be running."""
        lxc_dir = self._lxc_dir(guest_name)
        meta: dict[str, object] = {}
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads((lxc_dir / "deckard.json").read_text())
        await delete_link(veth_name(guest_name))
        if isinstance(meta.get("ip"), str):
            await flush_neighbour(str(meta["ip"]))
        # without the record we cannot know the OSF kept the overlay: leave it, the next start decides
        desktop_id = meta.get("desktop_id")
        if meta.get("keep_overlay") is False and isinstance(desktop_id, int):
            await asyncio.to_thread(shutil.rmtree, self.paths.overlay(desktop_id), True)
        await asyncio.to_thread(remove_cgroups, guest_name)
        await asyncio.to_thread(shutil.rmtree, lxc_dir, True)

    # -- observe ---------------------------------------------------------------------------------------
    async def inspect(self, guest_name: str) -> GuestInfo | None:
        return await self._info(guest_name)

    async def list(self) -> list[GuestInfo]:
        prefix = self.paths.guest_prefix()
        names: set[str] = set()
        if self.paths.lxc.is_dir():
            names.update(p.name for p in self.paths.lxc.iterdir() if p.name.startswith(prefix))
            result = await run_command(["lxc-ls", "-P", str(self.paths.lxc), "-1"], check=False)
            names.update(n for n in result.stdout.split() if n.startswith(prefix))
        infos = [await self._info(name) for name in sorted(names)]
        return [info for info in infos if info is not None]

    async def _state(self, guest_name: str) -> tuple[str, int | None] | None:
        """(STATE, init pid) from lxc-info, or None when LXC does not know the guest."""
        if not (self._lxc_dir(guest_name) / "config").exists():
            return None
        result = await run_command(["lxc-info", *self._lxc_args(guest_name), "-s", "-p", "-H"], check=False)
        if result.returncode != 0:
            return None
        # output is "State:   RUNNING" / "PID:   1234" ("-H" only turns off human-readable sizes)
        fields = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
        state = fields.get("State", "STOPPED").strip()
        pid_text = fields.get("PID", "").strip()
        pid = int(pid_text) if pid_text.isdigit() else None
        return state, pid

    async def _info(self, guest_name: str) -> GuestInfo | None:
        lxc_dir = self._lxc_dir(guest_name)
        if not lxc_dir.exists():
            return None
        meta: dict[str, object] = {}
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads((lxc_dir / "deckard.json").read_text())
        ip = meta.get("ip") if isinstance(meta.get("ip"), str) else None
        state = await self._state(guest_name)
        if state is None or state[0] != "RUNNING":
            return GuestInfo(guest_name=guest_name, running=False, ip=str(ip) if ip else None)
        pid = state[1]
        return GuestInfo(
            guest_name=guest_name,
            running=True,
            pid=pid,
            ip=str(ip) if ip else None,
            memory_bytes=memory_usage(pid) if pid else None,
        )

    def _log_tail(self, guest_name: str) -> str:
        try:
            lines = (self._lxc_dir(guest_name) / "lxc.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.split(" - ", 1)[-1] for line in lines[-3:])


# -- cgroups -------------------------------------------------------------------------------------------
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
