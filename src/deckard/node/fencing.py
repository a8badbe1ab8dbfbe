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

A node may carry its *own* agent in its row (``deckard node fence``, ``deckard node --fence-agent``;
model/fence.py): a program of the ClusterLabs fence agent API (``fence_ipmilan`` …) that any other node can run,
which is what fencing across machines needs.  ``AgentFencing`` runs it as pacemaker does: the options on standard
input (never on a command line: they hold the BMC's password), ``action=off`` (exit 0: done), then, when the
agent's metadata lists it, ``action=status`` until it answers off (exit 2) — a power-off the BMC accepted but did
not carry out is not a fence.  ``PerNodeFencing`` picks the node's own agent, else the farm process's default.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from deckard.drivers import load_driver
from deckard.model.errors import BadInput
from deckard.model.fence import FenceConfig, fence_config
from deckard.model.states import NodeState
from deckard.runtime.bmc import find_agent
from deckard.runtime.paths import FarmPaths
from deckard.runtime.process import pid_alive
from deckard.runtime.settings import NodeSettings
from deckard.services.cluster import Fence, FenceFailed, LeaseView, LostNode

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


async def _kill_process(pid: int) -> bool:
    if pid == os.getpid():
        return False  # never fence ourselves through the cluster monitor
    if pid_alive(pid):
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
        if not pid_alive(pid):
            return True
        await asyncio.sleep(0.02)
    return not pid_alive(pid)


class LocalFencing:
    """Fence nodes that run on this machine (demo farms, tests, several nodes on one big host)."""

    def __init__(self, paths: FarmPaths) -> None:
        self.paths = paths
        self.boot_id = boot_id()

    async def __call__(self, node: LostNode) -> bool:
        if not node.boot_id or node.boot_id != self.boot_id:
            log.warning("fence.other_machine", lost=node.name)
            raise FenceFailed(
                "it ran on another machine, which the local agent cannot fence: give it a fence agent "
                f"(deckard node fence {node.name} --agent fence_ipmilan …)"
            )
        if node.pid is not None and not await _kill_process(node.pid):
            log.warning("fence.kill_failed", lost=node.name, pid=node.pid)
            raise FenceFailed(f"its process {node.pid} did not die")
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
            raise FenceFailed(f"{self.command} did not answer within {self.timeout:.0f} s") from None
        log.info("fence.command", lost=node.name, status=proc.returncode, stderr=err.decode(errors="replace")[-200:])
        if proc.returncode != 0:
            raise FenceFailed(f"{self.command} exited {proc.returncode}: {_last_words(b'', err) or 'no message'}")
        return True


STATUS_ON, STATUS_OFF = 0, 2  # the fence agent API's exit codes for action=status


class AgentFencing:
    """Fence a node with its own fence agent (the ClusterLabs fence agent API): ``off``, then ``status`` = off.

    ``timeout`` bounds each call of the agent; ``verify_s`` how long ``status`` may keep answering "on" after an
    accepted ``off`` (a BMC may take a moment).  Every refusal raises ``FenceFailed`` with the agent's own words.
    """

    def __init__(self, timeout: float = 60.0, verify_s: float = 20.0) -> None:
        self.timeout = timeout
        self.verify_s = verify_s
        self._has_status: dict[str, bool] = {}

    async def _run(self, path: str, config: FenceConfig, action: str) -> tuple[int, str, str]:
        """(exit status, standard output, the agent's last words) of one call."""
        proc = await asyncio.create_subprocess_exec(
            path,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a timeout kills the agent and the ipmitool it runs
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(config.stdin(action)), self.timeout)
        except TimeoutError:
            await _reap(proc)
            raise FenceFailed(f"{config.agent} action={action} did not answer within {self.timeout:.0f} s") from None
        except asyncio.CancelledError:  # the monitor stops (node shutdown): no agent left running behind us
            await asyncio.shield(_reap(proc))
            raise
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace"), _last_words(out, err)

    async def _supports_status(self, path: str, config: FenceConfig) -> bool:
        if config.agent not in self._has_status:
            try:
                status, text, _ = await self._run(path, FenceConfig(config.agent), "metadata")
            except FenceFailed:
                return True  # assume the API's mandatory actions; status then says for itself
            self._has_status[config.agent] = status != 0 or '<action name="status"' in text
        return self._has_status[config.agent]

    async def __call__(self, node: LostNode) -> bool:
        config = node.fence
        if config is None:
            raise FenceFailed("the node has no fence agent configured")
        path = find_agent(config.agent)
        if path is None:
            raise FenceFailed(f"{config.agent} is not installed on this node (Debian: apt install fence-agents)")
        status, _, words = await self._run(path, config, "off")
        if status != 0:
            raise FenceFailed(f"{config.agent} action=off failed (exit {status}): {words or 'no message'}")
        if not await self._supports_status(path, config):
            log.info("fence.agent_done", lost=node.name, agent=config.agent, verified=False)
            return True
        deadline = time.monotonic() + self.verify_s
        while True:
            status, _, words = await self._run(path, config, "status")
            if status == STATUS_OFF:
                log.info("fence.agent_done", lost=node.name, agent=config.agent, verified=True)
                return True
            if time.monotonic() > deadline:
                state = "still on" if status == STATUS_ON else f"exit {status}: {words or 'no message'}"
                raise FenceFailed(f"{config.agent} accepted action=off but action=status does not say off ({state})")
            await asyncio.sleep(0.5)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


def _last_words(out: bytes, err: bytes) -> str:
    """The agent's last meaningful line (its error), without Python's deprecation noise."""
    lines = [
        line.strip()
        for line in (err + b"\n" + out).decode(errors="replace").splitlines()
        if line.strip() and "Warning" not in line and "from pipes import" not in line
    ]
    return lines[-1][:300] if lines else ""


def own_fence(cfg: NodeSettings) -> FenceConfig | None:
    """This node's fence agent from its settings (None: keep what its row says), password read from its file."""
    if not cfg.fence_agent:
        return None
    options = dict(cfg.fence_options)
    if cfg.fence_password_file is not None:
        try:
            options["password"] = cfg.fence_password_file.read_text().rstrip("\n")
        except OSError as e:
            raise BadInput(f"cannot read node.fence_password_file: {e}", code="bad_fence_option") from e
    return fence_config(cfg.fence_agent, options)


class PerNodeFencing:
    """The node's own fence agent when its row has one, else the farm process's default agent."""

    def __init__(self, default: Fence, agents: AgentFencing | None = None) -> None:
        self.default = default
        self.agents = agents or AgentFencing()

    async def __call__(self, node: LostNode) -> bool:
        if node.fence is not None:
            return await self.agents(node)
        return await self.default(node)


def load_fencing(name: str, paths: FarmPaths, command: str = "", timeout: float = 60.0) -> Fence:
    """The monitor's agent: each node's own fence agent, else ``name`` (local or command) for nodes without one."""
    default: Fence
    if name == "local":
        default = LocalFencing(paths)
    elif name == "command":
        if not command:
            raise ValueError("fencing=command needs node.fence_command (the hook to run)")
        default = CommandFencing(command, timeout)
    else:
        raise ValueError(f"unknown fencing agent {name!r}: choose local or command")
    return PerNodeFencing(default, AgentFencing(timeout))
