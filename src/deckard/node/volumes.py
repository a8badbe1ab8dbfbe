"""The node's side of volumes (``docs/volumes.md``): which volumes a starting guest gets, and hot plug.

An attach or detach of a running desktop is a command on its attachment row (``pending``), written by the API
and announced on this node's channel, like a start or a stop (``services/volumes.py``).  Each reconcile pass
reads the commands for this node's running desktops and carries each out once (one task per volume and
desktop); the outcome goes back to the row, where the API call that waits for it reads it.

Before unplugging, the node asks the guest's agent (``block_devices``) whether anything there uses the disk
with the volume's serial: a mounted file system or swap is ``volume_held``, and the disk stays.  A kernel would
let go of a mounted disk when told to, and the file system on it would be lost mid-write.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog

from deckard.client.agent import AgentClient
from deckard.db.engine import Database
from deckard.drivers.base import Driver, VolumeMount
from deckard.drivers.volumes import VolumeBackend
from deckard.model.entities import Desktop
from deckard.model.errors import DeckardError, Unavailable
from deckard.runtime.paths import FarmPaths
from deckard.services import node_ops
from deckard.services.node_ops import AttachedVolume

log = structlog.get_logger()


class NodeVolumes:
    def __init__(self, db: Database, driver: Driver, paths: FarmPaths, backend: VolumeBackend) -> None:
        self.db = db
        self.driver = driver
        self.paths = paths
        self.backend = backend
        self._work: dict[tuple[int, int], asyncio.Task[None]] = {}  # (desktop, volume) → command in progress

    def mount(self, volume: AttachedVolume) -> VolumeMount:
        path = self.backend.path(volume.tenant_id, volume.volume_id)
        return VolumeMount(volume.volume_id, path, volume.read_only, name=volume.name)

    async def for_start(self, desktop_id: int) -> tuple[VolumeMount, ...]:
        """The volumes a starting guest gets (settling the commands written while it was stopped or starting)."""
        return tuple(self.mount(v) for v in await node_ops.start_volumes(self.db, desktop_id))

    async def reconcile(self, node_id: int, changes: list[node_ops.AttachedVolume] | None = None) -> int:
        """Start a task for every hot-plug command of this node's running desktops not already being done (read
        here unless the caller read them: ``changes``); returns how many were started."""
        if changes is None:
            changes = await node_ops.pending_volume_changes(self.db, node_id)
        if not changes:
            return 0
        desks = {d.id: d for d in await node_ops.desktops_on_node(self.db, node_id)}
        started = 0
        for change in changes:
            key = (change.desktop_id, change.volume_id)
            desk = desks.get(change.desktop_id)
            if desk is None or key in self._work:
                continue
            task = asyncio.create_task(self._carry_out(change, desk), name=f"volume-{key[1]}-desktop-{key[0]}")
            self._work[key] = task
            task.add_done_callback(self._forget(key))
            started += 1
        return started

    def _forget(self, key: tuple[int, int]) -> Callable[[asyncio.Task[None]], None]:
        def forget(_task: asyncio.Task[None]) -> None:
            self._work.pop(key, None)

        return forget

    async def close(self) -> None:
        for task in self._work.values():
            task.cancel()
        await asyncio.gather(*self._work.values(), return_exceptions=True)

    async def _carry_out(self, change: AttachedVolume, desk: Desktop) -> None:
        guest = desk.guest or self.paths.guest_name(desk.id)
        bound = log.bind(desktop_id=desk.id, volume_id=change.volume_id, command=change.pending)
        try:
            if change.pending == "attach":
                live = await self.driver.attach_volume(guest, self.mount(change))
                await node_ops.volume_plugged(self.db, desk.id, change.volume_id, live=live)
            else:
                held = await guest_holds(desk, f"vol-{change.volume_id}")
                if held:
                    await node_ops.volume_change_failed(self.db, desk.id, change.volume_id, "volume_held", held)
                    bound.info("volume.held", reason=held)
                    return
                await self.driver.detach_volume(guest, change.volume_id)
                await node_ops.volume_unplugged(self.db, desk.id, change.volume_id)
            bound.info("volume.done")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            code, message = (e.code, e.message) if isinstance(e, DeckardError) else ("volume_failed", str(e))
            bound.warning("volume.failed", code=code, reason=message)
            with contextlib.suppress(Exception):
                await node_ops.volume_change_failed(self.db, desk.id, change.volume_id, code, message)


async def guest_holds(desk: Desktop, serial: str) -> str:
    """What in the guest uses the disk with ``serial`` (mount points, swap), "" when nothing does or the guest
    has no such disk.  Raises Unavailable (``agent_unreachable``) when the guest cannot be asked."""
    if not desk.agent_token:
        raise Unavailable("the desktop has no agent to ask whether it uses the volume", code="agent_unreachable")
    agent = AgentClient(desk.ip, desk.agent_token, timeout=5.0)
    devices: list[dict[str, Any]] = list((await agent.call("block_devices"))["devices"])
    for dev in devices:
        if dev.get("serial") == serial and dev.get("mountpoints"):
            where = ", ".join(str(m) for m in dev["mountpoints"])
            return f"the desktop uses the volume (/dev/{dev.get('name')} on {where}): unmount it in the desktop first"
    return ""
