"""Fencing agents: make sure a lost node can no longer touch its desktops before they start elsewhere.

Releasing the desktops of a silent node is only safe once that node is *known* to be dead (seed 003: Luna
"performs fencing on Sparkle's behalf, notifying it when successful").  Agents are registered by name:

* ``local`` (default): the lost node ran on this machine (same ``boot_id``): SIGKILL its process group (the
  ``pid`` it registered) and kill the containers in *its* LXC directory.  A node on another machine cannot be
  fenced locally: the agent says no, and the desktops stay assigned (unavailable, never twice) until an operator
  or a ``command`` agent fences it.
* ``command``: run ``HOOK name address pid`` (an IPMI/PDU power-off script); exit status 0 means fenced.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import structlog

from deckard.drivers import load_driver
from deckard.runtime.paths import FarmPaths
from deckard.services.cluster import Fence, LostNode

log = structlog.get_logger()


def boot_id() -> str:
    """Identifies this machine's current boot: a pid means something only within it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _is_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


async def _kill_process(pid: int) -> bool:
    if pid == os.getpid():
        return False  # never fence ourselves through the cluster monitor
    if _is_alive(pid):
        try:
            pgid = os.getpgid(pid)
        except ProcessLookupError:
            pgid = None
        with contextlib.suppress(ProcessLookupError):
            if pgid is not None and pgid == pid and pgid != os.getpgrp():
                os.killpg(pgid, signal.SIGKILL)  # the node and everything it spawned
            else:
                os.kill(pid, signal.SIGKILL)
    for _ in range(100):  # SIGKILL is asynchronous: wait until it is gone (or a zombie)
        if not _is_alive(pid):
            return True
        await asyncio.sleep(0.02)
    return not _is_alive(pid)


class LocalFencing:
    """Fence nodes that run on this machine (demo farms, tests, several nodes on one big host)."""

    def __init__(self, paths: FarmPaths) -> None:
        self.paths = paths
        self.boot_id = boot_id()

    async def __call__(self, node: LostNode) -> bool:
        if not node.boot_id or node.boot_id != self.boot_id:
            log.warning("fence.other_machine", lost=node.name)
            return False
        if node.pid is not None and not await _kill_process(node.pid):
            log.warning("fence.kill_failed", lost=node.name, pid=node.pid)
            return False
        if node.driver == "container" and node.run_dir:
            driver = load_driver("container", FarmPaths(self.paths.home, Path(node.run_dir)))
            for guest in await driver.list():
                await driver.kill(guest.guest_name)
        log.info("fence.done", lost=node.name, pid=node.pid)
        return True


class CommandFencing:
    """Fence with an external hook (IPMI, a PDU, a cloud API): ``HOOK name address pid``, exit 0 = fenced."""

    def __init__(self, command: str, timeout: float = 60.0) -> None:
        self.command = command
        self.timeout = timeout

    async def __call__(self, node: LostNode) -> bool:
        proc = await asyncio.create_subprocess_exec(
            self.command,
            node.name,
            node.address,
            str(node.pid or ""),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return False
        log.info("fence.command", lost=node.name, status=proc.returncode, stderr=err.decode(errors="replace")[-200:])
        return proc.returncode == 0


def load_fencing(name: str, paths: FarmPaths, command: str = "") -> Fence:
    if name == "local":
        return LocalFencing(paths)
    if name == "command":
        if not command:
            raise ValueError("fencing=command needs node.fence_command (the hook to run)")
        return CommandFencing(command)
    raise ValueError(f"unknown fencing agent {name!r}: choose local or command")
