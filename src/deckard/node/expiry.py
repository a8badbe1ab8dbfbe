"""The node's expiry watch (QVD's ExpirationMonitor, which ran about hourly): every few seconds, for the
running desktops of this node, tell users whose desktop passed its *soft* deadline (the guest agent's
``expire`` runs the notify hook once) and stop those past their *hard* deadline.

Stopping writes the same ``stop`` command an administrator writes (``services.desktops.request_stop``), so
the normal stop path runs (graceful poweroff, overlay cleanup, ``stopped``) and the next start picks the
image the tag points at now.  Deadlines are set by publishing an image (``services/expiry.py``); a failed
notice is retried on the next pass, a notice is sent once.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from deckard.client.agent import AgentClient
from deckard.db.engine import Database
from deckard.model.entities import Desktop
from deckard.model.errors import DeckardError
from deckard.services import expiry
from deckard.services.desktops import request_stop

log = structlog.get_logger()

CHECK_EVERY_S = 5.0


async def _notify(db: Database, desk: Desktop) -> None:
    if not desk.agent_token:
        return
    try:
        await AgentClient(desk.ip, desk.agent_token, timeout=5.0).expire()
    except DeckardError as e:
        log.warning("desktop.expire_notice_failed", desktop_id=desk.id, error=e.message)
        return
    await expiry.mark_notified(db, desk.id)
    log.info("desktop.expire_noticed", desktop_id=desk.id)


async def expire_once(db: Database, node_id: int) -> None:
    """One pass: stop desktops past their hard deadline, then notify those past their soft one."""
    stopping = await expiry.desktops_to_stop(db, node_id)
    for desktop_id in stopping:
        try:
            await request_stop(db, desktop_id)
            log.info("desktop.expired", desktop_id=desktop_id)
        except DeckardError as e:  # it changed meanwhile (stopping already, ...): the next pass sees it again
            log.info("desktop.expire_stop_skipped", desktop_id=desktop_id, error=e.message)
    due = [desk for desk in await expiry.desktops_to_notify(db, node_id) if desk.id not in stopping]
    await asyncio.gather(*(_notify(db, desk) for desk in due))


async def run_expiry_loop(db: Database, node_id: int, stop: asyncio.Event, every_s: float = CHECK_EVERY_S) -> None:
    while not stop.is_set():
        try:
            await expire_once(db, node_id)
        except Exception as e:  # database down: keep trying, the desktops go on
            log.warning("node.expiry_failed", error=str(e))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
