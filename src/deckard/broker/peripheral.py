"""What the portal's side channels (``/ws/files``, ``/ws/sound``) check before their ``101``, in one place.

A one-time ticket of the channel's kind for this desktop, the desktop still the ticket holder's, the
administrator's switch for it (``portal.*`` per tenant and OSF), and the desktop running with an agent to talk
to.  A refusal is answered here (status, message and ``X-Deckard-Error``) and logged; the caller only serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog

from deckard.broker.http import HttpChannel
from deckard.broker.params import parse_desktop_id
from deckard.broker.websocket import handshake
from deckard.db.engine import Database
from deckard.model.entities import Desktop
from deckard.model.errors import Conflict, DeckardError
from deckard.model.states import DesktopState
from deckard.services.peripherals import Peripherals, peripherals
from deckard.services.sessions import desktop_for_user
from deckard.services.tickets import redeem_ticket

log = structlog.get_logger("deckard.broker")


@dataclass(frozen=True)
class Grant:
    desk: Desktop
    login: str  # the desktop's user, whose files or sound the channel carries
    ip: str
    agent_token: str
    offered: Peripherals
    response: bytes  # the WebSocket handshake's 101, for the caller to send


async def grant(db: Database, channel: HttpChannel, req: Any, kind: str) -> Grant | None:
    """The grant for a channel of ``kind`` (``files``, ``sound``), or None once a refusal is answered."""
    front = channel.front
    try:
        desktop_id = parse_desktop_id(req.query)
        response = handshake(req)
        tickets = [v for k, v in req.query if k == "ticket"]
        ticket = await redeem_ticket(db, tickets[0] if tickets else "", desktop_id, kinds=(kind,))
        front.mark_authenticated()
        desk = await desktop_for_user(db, ticket.user, ticket.desktop_id)
        async with db.connect() as conn:
            offered = await peripherals(conn, desk.tenant_id, desk.osf_id)
        offered.require(kind)
        if desk.state != DesktopState.RUNNING or not desk.agent_token or not desk.ip:
            raise Conflict("the desktop is not running: connect to it first", code="not_running")
    except DeckardError as e:
        status = e.status if e.status in (401, 403, 404, 409, 422) else 400
        channel.respond(status, e.message + "\n", headers=(("X-Deckard-Error", e.code),))
        log.info("broker.request", peer=front.peer, path=req.path, status=status, error=e.code)
        return None
    return Grant(desk, ticket.user.login, desk.ip, desk.agent_token, offered, response)
