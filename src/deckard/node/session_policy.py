"""The node's session-policy watch (QVD's timeouts, Kasm's idle shutdown) for the desktops running on this node.

A pass reads this node's running desktops and their policies (``session.*``, per tenant and OSF), asks the agents
of connected desktops how long their user has been idle, records it (``desktops.input_at``), and carries out what
``model/session_policy.py`` decides: a notice on the user's display, a disconnect, or a stop with the policy's
reason (``services/session_policy.py``).  Like the expiry watch, it only writes what an administrator would write;
the normal stop path does the rest.

Cheap on purpose: only connected desktops whose policy has an idle rule are asked at every pass, concurrently and
with a short timeout; other connected desktops once a minute, so that ``deckard desktop list --idle-for`` means
something without a policy; a farm without policies asks nothing more often than that.  Passes come every
``every_s`` (the node's ``agent_check_s``), at the moment the next rule falls due (the verdicts' ``check_at``), and
when one of this node's desktops changes (a user disconnects): a short policy acts on time without a fast poll.
The max-length notice is remembered in memory only: a node restart may show it twice, never skip the stop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import time
from dataclasses import replace

import structlog

from deckard.client.agent import AgentClient
from deckard.db.engine import Database
from deckard.db.notify import Subscription
from deckard.model.entities import utcnow
from deckard.model.errors import DeckardError
from deckard.model.session_policy import Notice, Reason, SessionPolicy, Verdict, decide
from deckard.model.states import UserState
from deckard.runtime.settings import NodeSettings
from deckard.services import session_policy as policies
from deckard.services.events import DESKTOPS
from deckard.services.session_policy import RunningDesktop

log = structlog.get_logger()

CHECK_EVERY_S = 5.0
LISTING_POLL_S = 60.0  # connected desktops without an idle rule: how often their input time is refreshed
AGENT_TIMEOUT_S = 2.0
INPUT_MOVED_S = 1.0  # an input time that moved less than this is not written again
MIN_SLEEP_S = 0.05
COALESCE_S = 0.2


class SessionPolicyWatch:
    def __init__(self, db: Database, node_id: int, *, every_s: float = CHECK_EVERY_S) -> None:
        self.db = db
        self.node_id = node_id
        self.every_s = every_s
        self.source = f"node {node_id}"  # the audit records' source
        self._polled: dict[int, float] = {}  # desktop id → monotonic time its agent was last asked for idle time
        self._length_warned: dict[int, dt.datetime] = {}  # desktop id → the start its max-length notice was for
        self._unmeasured: set[int] = set()  # desktops whose agent could not tell the idle time (logged once)
        self._ours: set[str] = set()  # ids, as notified on DESKTOPS, of the desktops the last pass saw

    async def run(self, stop: asyncio.Event) -> None:
        async with self.db.bus.subscribe(DESKTOPS) as sub:
            while not stop.is_set():
                try:
                    next_at = await self.pass_once()
                except Exception as e:  # database down: keep trying, the desktops go on
                    log.warning("node.session_policy_failed", error=str(e))
                    next_at = None
                await self._sleep(sub, stop, next_at)

    async def _sleep(self, sub: Subscription, stop: asyncio.Event, next_at: dt.datetime | None) -> None:
        loop = asyncio.get_running_loop()
        wait = self.every_s
        if next_at is not None:
            wait = min(wait, max(MIN_SLEEP_S, (next_at - utcnow()).total_seconds()))
        deadline = loop.time() + wait
        while not stop.is_set() and (left := deadline - loop.time()) > 0:
            payload = await sub.wait(min(left, 1.0))
            if payload and not self._ours.isdisjoint(payload.split(",")):
                await asyncio.sleep(COALESCE_S)  # a burst of changes (a start, a connect) makes one pass
                sub.drain()
                return  # one of ours changed (its user left, came back): look now

    async def pass_once(self) -> dt.datetime | None:
        """One pass over this node's running desktops; the next moment a rule may fall due (None: none)."""
        desks = await policies.running_desktops(self.db, self.node_id)
        self._keep_only({d.id for d in desks})
        if not desks:
            return None
        by_key = await policies.read_policies(self.db, {d.policy_key for d in desks})
        desks = await self._read_input(desks, by_key)
        now = utcnow()
        verdicts = []
        for desk in desks:
            warned = self._length_warned.get(desk.id) == desk.facts.started_at
            verdicts.append(decide(by_key[desk.policy_key], replace(desk.facts, length_warned=warned), now))
        await asyncio.gather(
            *(self._carry_out(d, by_key[d.policy_key], v) for d, v in zip(desks, verdicts, strict=True))
        )
        return min((v.check_at for v in verdicts if v.check_at is not None), default=None)

    def _keep_only(self, ids: set[int]) -> None:
        self._ours = {str(i) for i in ids}
        for memory in (self._polled, self._length_warned):
            for gone in memory.keys() - ids:
                del memory[gone]
        self._unmeasured &= ids

    # ---- input idle time -----------------------------------------------------------------------------------
    async def _read_input(
        self, desks: list[RunningDesktop], by_key: dict[tuple[int, int], SessionPolicy]
    ) -> list[RunningDesktop]:
        """Ask the agents that need asking; the desktops with the input times they reported."""
        mono = time.monotonic()
        asked = [
            desk
            for desk in desks
            if desk.facts.user_state == UserState.CONNECTED
            and desk.agent_token
            and (by_key[desk.policy_key].watches_input or mono - self._polled.get(desk.id, -math.inf) >= LISTING_POLL_S)
        ]
        if not asked:
            return desks
        answers = await asyncio.gather(*(self._idle_ms(desk) for desk in asked))
        now = utcnow()
        moved: dict[int, dt.datetime] = {}
        for desk, idle_ms in zip(asked, answers, strict=True):
            self._polled[desk.id] = mono
            if idle_ms is None:
                if by_key[desk.policy_key].watches_input and desk.id not in self._unmeasured:
                    self._unmeasured.add(desk.id)
                    log.warning("desktop.idle_unknown", desktop_id=desk.id, hint="the idle rule waits for the agent")
                continue
            self._unmeasured.discard(desk.id)
            at = now - dt.timedelta(milliseconds=idle_ms)
            old = desk.facts.input_at
            if old is None or abs((at - old).total_seconds()) >= INPUT_MOVED_S:
                moved[desk.id] = at
        await policies.record_input(self.db, moved)
        return [replace(d, facts=replace(d.facts, input_at=moved[d.id])) if d.id in moved else d for d in desks]

    async def _idle_ms(self, desk: RunningDesktop) -> int | None:
        assert desk.agent_token
        try:
            return await AgentClient(desk.ip, desk.agent_token, timeout=AGENT_TIMEOUT_S).input_idle_ms()
        except DeckardError as e:  # a silent agent is the agent watch's business (node/daemon.py)
            log.debug("desktop.idle_unanswered", desktop_id=desk.id, error=e.message)
            return None

    # ---- verdicts ------------------------------------------------------------------------------------------
    async def _carry_out(self, desk: RunningDesktop, policy: SessionPolicy, verdict: Verdict) -> None:
        try:
            if verdict.forget_idle_warning:
                await policies.forget_idle_warnings(self.db, [desk.id])
            if verdict.action is not None and verdict.reason is not None:
                await policies.act(self.db, desk, verdict.action, verdict.reason, policy, node=self.source)
                return
            for notice in verdict.notices:
                await self._notify(desk, notice)
        except Exception as e:  # one desktop's trouble must not hold the others' policies
            log.warning("desktop.session_policy_failed", desktop_id=desk.id, error=str(e))

    async def _notify(self, desk: RunningDesktop, notice: Notice) -> None:
        if not desk.agent_token:
            return
        in_s = max(0, math.ceil((notice.at - utcnow()).total_seconds()))
        agent = AgentClient(desk.ip, desk.agent_token, timeout=AGENT_TIMEOUT_S)
        try:
            await agent.session_notice(notice.reason.value, notice.action.value, in_s)
        except DeckardError as e:  # not shown: the next pass tries again, and an idle action waits for it
            log.warning("desktop.session_notice_failed", desktop_id=desk.id, reason=notice.reason, error=e.message)
            return
        if notice.reason == Reason.IDLE:
            await policies.mark_idle_warned(self.db, desk.id, utcnow())
        else:
            self._length_warned[desk.id] = desk.facts.started_at
        log.info("desktop.session_notice", desktop_id=desk.id, reason=notice.reason, action=notice.action, in_s=in_s)


async def run_session_policy_loop(db: Database, node_id: int, stop: asyncio.Event, cfg: NodeSettings) -> None:
    """The watch, a pass every ``agent_check_s`` at the latest (the node checks its agents as often)."""
    await SessionPolicyWatch(db, node_id, every_s=cfg.agent_check_s).run(stop)
