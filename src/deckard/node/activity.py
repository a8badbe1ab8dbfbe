"""The node's share of the farm's activity chart: at the start of each minute, sample the farm's counts unless
another node has (``services/activity.py``).  Nodes try a moment apart (a node's id spreads them over the minute's
first few seconds), so in a farm of many nodes one computes the counts and the others read one row."""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from deckard.db.engine import Database
from deckard.services import activity

log = structlog.get_logger()

SPREAD_S = 5.0  # nodes try within the minute's first seconds, a node's place in it from its id


def seconds_to_next_try(node_id: int, now: float) -> float:
    """From ``now`` to this node's moment in the next minute (always ahead, at most a minute and SPREAD_S)."""
    offset = 0.5 + (node_id * 0.37) % (SPREAD_S - 0.5)  # not at 0: a timer a little early stays in its minute
    return activity.SAMPLE_EVERY_S - now % activity.SAMPLE_EVERY_S + offset


async def run_activity_loop(db: Database, node_id: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await activity.record(db)
        except Exception as e:  # database down: the chart shows a gap for the minutes missed
            log.warning("node.activity_failed", error=str(e))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds_to_next_try(node_id, time.time()))
