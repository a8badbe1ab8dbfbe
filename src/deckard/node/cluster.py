"""The cluster monitor every node runs: notice silent nodes within seconds, fence them, free their desktops.

QVD checks every 120 s (+ up to 30 s) and waits 600 s before it declares a node lost; Deckard checks every
``node.monitor_s`` (1 s + up to 50 % jitter, so monitors on many nodes do not fire together) and declares a node
lost after ``node.lost_after_s`` (10 s) without heartbeat.  The decision and its safety rules live in
services/cluster.py; this loop only paces it and holds the fencing agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable

import structlog

from deckard.db.engine import Database
from deckard.services import cluster
from deckard.services.cluster import Fence

log = structlog.get_logger()


class ClusterMonitor:
    def __init__(
        self,
        db: Database,
        node_id: int,
        fence: Fence,
        *,
        period_s: float,
        lost_after_s: float,
        retry_s: float = cluster.FENCE_RETRY_S,
    ) -> None:
        self.db = db
        self.node_id = node_id
        self.fence = fence
        self.period_s = period_s
        self.lost_after_s = lost_after_s
        self.retry_s = retry_s

    async def check_once(self) -> dict[int, list[int]]:
        released = await cluster.handle_lost_nodes(self.db, self.node_id, self.lost_after_s, self.fence, self.retry_s)
        for node_id, ids in released.items():
            log.warning("node.lost_released", lost_node_id=node_id, desktops=len(ids))
        return released

    async def run(self, stop: asyncio.Event, may_judge: Callable[[], bool]) -> None:
        """Check until ``stop``, only while ``may_judge()``: our own heartbeats have worked for ``lost_after_s``.

        A node cut off from the database judges no one, and after a database restart every heartbeat is stale
        at once: the grace period lets the other nodes write theirs before anyone is declared lost.
        """
        while not stop.is_set():
            delay = self.period_s * (1 + random.random() * 0.5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set() or not may_judge():
                continue
            try:
                await self.check_once()
            except Exception as e:  # database away: our own heartbeat loop handles that
                log.warning("node.cluster_check_failed", error=str(e))
