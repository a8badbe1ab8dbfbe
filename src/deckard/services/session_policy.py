"""Session policies in the database: each running desktop's policy and facts, the input time agents report, and
the verdicts of ``model/session_policy.py`` carried out.

The node's loop (``node/session_policy.py``) calls these.  A policy acts the way an administrator would: a
disconnect clears the desktop's session (its tunnel hears it and closes, as with ``deckard desktop disconnect``),
a stop writes the stop command so the normal stop path runs, with the policy's reason kept as the desktop's
``failure_reason``.  Nobody's request records these actions, so each gets an audit record of its own
(``admin_name`` ``session-policy``), as a user's login does.

Also here: the listing's relative filters.  ``disconnected_for=2h`` and ``idle_for=30m`` (``GET /desktops`` query
parameters, keys of a bulk action's filter, ``deckard desktop list --disconnected-for 2h``) become
``disconnected_since__lte=<now - 2h>`` and ``idle_since__lte=<now - 30m>`` with the API's clock, so a crontab
on any machine asks the same question.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import structlog

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import aware, utcnow
from deckard.model.errors import Conflict, NotFound
from deckard.model.session_policy import (
    Action,
    Reason,
    SessionFacts,
    SessionPolicy,
    describe_duration,
    parse_duration,
)
from deckard.model.states import DesktopState, UserState
from deckard.services.audit import append_audit
from deckard.services.config import read_configs
from deckard.services.desktops import request_stop
from deckard.services.events import DESKTOPS, publish
from deckard.services.listing import Filter, ListQuery
from deckard.services.transitions import transition_session

log = structlog.get_logger()
d = t.desktops

AUDIT_NAME = "session-policy"  # the audit log's "administrator" of the policies' actions
# relative list filters → the listed field they bound
SINCE_FILTERS = {"disconnected_for": "disconnected_since", "idle_for": "idle_since"}


@dataclass(frozen=True)
class RunningDesktop:
    """A running desktop of this node as the policies see it."""

    id: int
    tenant_id: int
    osf_id: int
    ip: str
    agent_token: str | None
    session_id: str | None
    facts: SessionFacts

    @property
    def policy_key(self) -> tuple[int, int]:
        return self.tenant_id, self.osf_id


async def running_desktops(db: Database, node_id: int) -> list[RunningDesktop]:
    """This node's running desktops with no command pending (a stop or start under way is left alone)."""
    q = sa.select(
        d.c.id,
        d.c.tenant_id,
        d.c.osf_id,
        d.c.ip,
        d.c.agent_token,
        d.c.session_id,
        d.c.started_at,
        d.c.user_state,
        d.c.user_state_at,
        d.c.input_at,
        d.c.idle_warned_at,
    ).where(
        d.c.node_id == node_id,
        d.c.state == DesktopState.RUNNING.value,
        d.c.cmd.is_(None),
        d.c.started_at.is_not(None),
    )
    async with db.connect() as conn:
        rows = list(await conn.execute(q))
    return [
        RunningDesktop(
            id=int(r.id),
            tenant_id=int(r.tenant_id),
            osf_id=int(r.osf_id),
            ip=str(r.ip),
            agent_token=r.agent_token,
            session_id=r.session_id,
            facts=SessionFacts(
                started_at=_aware(r.started_at),
                user_state=str(r.user_state),
                user_state_at=aware(r.user_state_at),
                input_at=aware(r.input_at),
                idle_warned_at=aware(r.idle_warned_at),
            ),
        )
        for r in rows
    ]


def _aware(at: dt.datetime) -> dt.datetime:
    out = aware(at)
    assert out is not None
    return out


async def read_policies(db: Database, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], SessionPolicy]:
    """The policy of each (tenant id, OSF id): the ``session.*`` keys through every layer of the configuration."""
    out: dict[tuple[int, int], SessionPolicy] = {}
    async with db.connect() as conn:
        for tenant_id, osf_id in set(keys):
            values = await read_configs(conn, "session.", tenant_id, osf_id=osf_id)
            out[(tenant_id, osf_id)] = SessionPolicy.from_config(values)
    return out


async def record_input(db: Database, input_at: Mapping[int, dt.datetime]) -> None:
    """Store the users' last input time the agents reported (``desktops.input_at``), in one transaction."""
    if not input_at:
        return
    async with db.begin() as conn:
        for desktop_id, at in input_at.items():
            await conn.execute(sa.update(d).where(d.c.id == desktop_id).values(input_at=at))


async def mark_idle_warned(db: Database, desktop_id: int, at: dt.datetime) -> None:
    async with db.begin() as conn:
        await conn.execute(sa.update(d).where(d.c.id == desktop_id).values(idle_warned_at=at))


async def forget_idle_warnings(db: Database, desktop_ids: Iterable[int]) -> None:
    ids = list(desktop_ids)
    if ids:
        async with db.begin() as conn:
            await conn.execute(sa.update(d).where(d.c.id.in_(ids)).values(idle_warned_at=None))


def stop_reason(reason: Reason, policy: SessionPolicy) -> str:
    """The desktop's ``failure_reason`` after a policy stopped it: the rule's name first, for scripts to match."""
    if reason == Reason.MAX_LENGTH:
        why = f"it ran for the maximum session length ({describe_duration(policy.max_length_s)})"
    elif reason == Reason.DISCONNECTED:
        why = f"nobody was connected to it for {describe_duration(policy.stop_after_disconnect_s)}"
    else:
        why = f"its user did not type nor move the mouse for {describe_duration(policy.idle_after_s)}"
    return f"session policy ({reason}): {why}"


async def _audit(db: Database, desk: RunningDesktop, action: str, reason: Reason, node: str, text: str) -> None:
    try:
        await append_audit(
            db,
            action=action,
            result="ok",
            admin_name=AUDIT_NAME,
            tenant_id=desk.tenant_id,
            object_type="desktop",
            object_id=str(desk.id),
            arguments={"reason": reason.value, "why": text},
            status=200,
            source=node,
        )
    except Exception as e:  # the action happened; a lost audit record must at least be loud
        log.error("audit.write_failed", action=action, desktop_id=desk.id, exc_info=e)


async def stop_for_policy(
    db: Database, desk: RunningDesktop, reason: Reason, policy: SessionPolicy, *, node: str = ""
) -> bool:
    """Write the stop command with the policy's reason; False when the desktop changed meanwhile (the next pass
    looks again)."""
    text = stop_reason(reason, policy)
    try:
        await request_stop(db, desk.id, reason=text)
    except (Conflict, NotFound) as e:
        log.info("desktop.session_policy_skipped", desktop_id=desk.id, reason=reason.value, error=e.message)
        return False
    log.info("desktop.session_policy_stop", desktop_id=desk.id, reason=reason.value, why=text)
    await _audit(db, desk, "desktop.stop", reason, node, text)
    return True


async def disconnect_for_policy(
    db: Database, desk: RunningDesktop, reason: Reason, policy: SessionPolicy, *, node: str = ""
) -> bool:
    """End the user's session as ``deckard desktop disconnect`` does (the desktop keeps running); only the session
    the policy judged: a user who connected again meanwhile keeps their new one (False)."""
    if desk.session_id is None:
        return False
    try:
        async with db.begin() as conn:
            await transition_session(
                conn,
                desk.id,
                UserState.DISCONNECTED,
                session_id=desk.session_id,
                values={"session_id": None, "session_node_id": None, "idle_warned_at": None},
            )
    except (Conflict, NotFound) as e:
        log.info("desktop.session_policy_skipped", desktop_id=desk.id, reason=reason.value, error=e.message)
        return False
    await db.bus.notify(DESKTOPS, str(desk.id))
    await publish(db, "updated", "desktop", desk.id, desk.tenant_id, user_state=UserState.DISCONNECTED.value)
    text = f"session policy ({reason}): its user did not type nor move the mouse for "
    text += describe_duration(policy.idle_after_s)
    log.info("desktop.session_policy_disconnect", desktop_id=desk.id, reason=reason.value, why=text)
    await _audit(db, desk, "desktop.disconnect", reason, node, text)
    return True


async def act(
    db: Database, desk: RunningDesktop, action: Action, reason: Reason, policy: SessionPolicy, *, node: str = ""
) -> bool:
    if action == Action.DISCONNECT:
        return await disconnect_for_policy(db, desk, reason, policy, node=node)
    return await stop_for_policy(db, desk, reason, policy, node=node)


# ---- relative list filters ------------------------------------------------------------------------------------


def since_filters(durations: Mapping[str, Any], now: dt.datetime | None = None) -> list[Filter]:
    """``{"disconnected_for": "2h"}`` → ``[Filter("disconnected_since", "lte", <now - 2h>)]`` (None values skipped)."""
    now = now or utcnow()
    out = []
    for key, text in durations.items():
        if text is None:
            continue
        seconds = parse_duration(str(text), key)
        out.append(Filter(SINCE_FILTERS[key], "lte", (now - dt.timedelta(seconds=seconds)).isoformat()))
    return out


def with_since(q: ListQuery, durations: Mapping[str, Any], now: dt.datetime | None = None) -> ListQuery:
    """``q`` narrowed by the relative filters in ``durations`` (keys of ``SINCE_FILTERS``)."""
    extra = since_filters(durations, now)
    return dataclasses.replace(q, filters=[*q.filters, *extra]) if extra else q
