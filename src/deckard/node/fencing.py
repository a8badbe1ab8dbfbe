"""Fencing: when a node kills its own guests (``decide``), and the agents that fence a lost node from outside.

Self-fencing (the node's own decision; pure, so tests state every case): a desktop must never run on two
nodes, and a healthy desktop must not die because one heartbeat write was slow.  A node holds a *lease* of
``self_fence_after_s`` from the last heartbeat the database accepted (its ``heartbeat_at``); the others wait
``lost_after_s`` = lease + margin (settings refuse less) before they declare it lost.  The rule:

1. The database answers and says this node is ``lost``: another node declared it lost and may have released its
   desktops.  Kill every guest and register again (whatever the size of the farm).
2. The database answers and the row is live: the database is the judge.  Keep the guests while it holds our
   lease (a failed or slow write does not matter while the last accepted one is recent), and while no other
   node could take the desktops over (``peers``: live, heartbeat fresh, same driver).  Kill only when the
   database shows the lease lapsed *and* a peer exists.
3. The database does not answer: nobody to ask, so count.  With a peer known from the last answer, kill once
   ``self_fence_after_s`` has passed since the start of the last accepted heartbeat write; without one (a
   one-node farm, the all-in-one default) never: no other node can start these desktops.

Why it keeps the safety property: the others act only on a heartbeat older than ``lost_after_s``, and a lost
node is fenced by their agent before its desktops are released (services/cluster.py).  A cut-off node kills its
guests when its lease ends, at least the margin before that.  A peer that appears while we are cut off cannot
release our desktops without fencing us first, so deciding on the last known peer count is safe.  What this
costs: on a farm of several nodes a database stall longer than the lease still stops the desktops of nodes that
have a peer (rules 2 and 3 cannot tell a stall from a partition); on one node it never does.

Fencing agents fence a lost node from outside (seed 003: Luna "performs fencing on Sparkle's behalf, notifying
it when successful").  Releasing the desktops of a silent node is only safe once that node is *known* to be
dead.  Agents are registered by name:

* ``local`` (default): the lost node ran on this machine (same ``boot_id``): SIGKILL its process group (the
  ``pid`` it registered) and kill the containers in *its* LXC directory.  A node on another machine cannot be
  fenced locally: the agent says no, and the desktops stay assigned (unavailable, never twice) until an operator
  or a ``command`` agent fences it.
* ``command``: run ``HOOK name address pid`` (an IPMI/PDU power-off script); exit status 0 means fenced.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import structlog

from deckard.drivers import load_driver
from deckard.model.states import NodeState
from deckard.runtime.paths import FarmPaths
from deckard.services.cluster import Fence, LeaseView, LostNode

log = structlog.get_logger()


class Verdict(enum.StrEnum):
    KEEP = "keep"  # the guests go on
    FENCE = "fence"  # kill our guests: another node may take them over
    LOST = "lost"  # we were declared lost: kill our guests and register again


@dataclass(frozen=True)
class LivenessFacts:
    """What a node knows after a heartbeat attempt (see ``decide``)."""

    since_ok_s: float  # since the start of the last heartbeat write the database accepted (this node's clock)
    view: LeaseView | None  # what the database answered just now; None: it did not answer
    peers_known: int  # nodes that could take over, as the last answer counted them
    self_fence_after_s: float  # the lease


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str


def decide(facts: LivenessFacts) -> Decision:
    """Whether this node kills its own guests now: the rule of the module docstring, nothing else."""
    view = facts.view
    if view is not None:
        if view.state is None or view.state == NodeState.LOST:
            return Decision(Verdict.LOST, "the database says this node was declared lost (or removed)")
        if view.peers == 0:
            return Decision(Verdict.KEEP, "no other node could take these desktops over")
        if view.lease_age_s < facts.self_fence_after_s:
            return Decision(Verdict.KEEP, f"the database still holds our lease ({view.lease_age_s:.1f} s old)")
        return Decision(
            Verdict.FENCE, f"our lease lapsed ({view.lease_age_s:.1f} s) and {view.peers} node(s) may take over"
        )
    if facts.peers_known == 0:
        return Decision(Verdict.KEEP, "the database does not answer, but no other node could take over")
    if facts.since_ok_s < facts.self_fence_after_s:
        return Decision(Verdict.KEEP, "the database does not answer yet; the lease still runs")
    return Decision(
        Verdict.FENCE,
        f"no heartbeat accepted for {facts.since_ok_s:.1f} s and {facts.peers_known} node(s) may take over",
    )


def boot_id() -> str:
    """Identifies this machine's current boot (``/etc/machine-id`` and the kernel's boot id): a pid means something
    only within it.  The machine id tells apart machines that share a kernel (runtime/machines.py)."""
    parts = []
    for path, length in (("/etc/machine-id", 16), ("/proc/sys/kernel/random/boot_id", 36)):  # fits nodes.boot_id
        with contextlib.suppress(OSError):
            parts.append(Path(path).read_text().strip()[:length])
    return "-".join(p for p in parts if p)


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
        if node.driver != "fake" and node.run_dir:
            driver = load_driver(node.driver, FarmPaths(self.paths.home, Path(node.run_dir)))
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
