"""The farm's activity over time, for the dashboard's chart: desktops running, users connected, nodes running.

Once a minute one node of the farm samples the counts (``node/activity.py``: every node tries, the first to write
the minute's row wins and the others see it there): one row for the whole farm (``tenant_id`` 0) and one for each
tenant that had a desktop running or a user connected that minute, so rows grow with the tenants at work, not with
every tenant there is.  Samples older than ``KEEP`` are deleted by the sampling that follows.

``history`` gives the dashboard the last ``WINDOW`` of them as at most ``MAX_POINTS`` points: a step of whole
minutes, each point the highest count of its step (a short peak stays visible), ``None`` where no sample fell in a
step (the farm was down: the chart shows a gap, not a line across it).  A tenant's administrator sees their tenant's
counts (0 in the minutes it had no row) and the farm's running nodes, as ``GET /stats`` shows them.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import aware, utcnow
from deckard.model.states import DesktopState, NodeState, UserState
from deckard.services.context import Actor

a = t.activity
d = t.desktops
FARM = 0  # the tenant_id of the farm's own rows
SAMPLE_EVERY_S = 60
KEEP = dt.timedelta(days=8)
WINDOW = dt.timedelta(hours=24)
MAX_POINTS = 288  # 24 h in steps of 5 minutes
COUNTS = ("running", "connected", "nodes")


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the epoch
    running: int
    connected: int
    nodes: int


def minute_of(at: dt.datetime) -> dt.datetime:
    return at.replace(second=0, microsecond=0)


_RUNNING = sa.func.sum(sa.case((d.c.state == DesktopState.RUNNING, 1), else_=0))
_CONNECTED = sa.func.sum(sa.case((d.c.user_state == UserState.CONNECTED, 1), else_=0))
_PER_TENANT = (
    sa.select(d.c.tenant_id, _RUNNING.label("running"), _CONNECTED.label("connected"))
    .where(sa.or_(d.c.state == DesktopState.RUNNING, d.c.user_state == UserState.CONNECTED))
    .group_by(d.c.tenant_id)
)
_NODES = sa.select(sa.func.count()).select_from(t.nodes).where(t.nodes.c.state == NodeState.RUNNING)


async def record(db: Database, now: dt.datetime | None = None) -> bool:
    """Sample this minute unless a node already has: False when its row was there (or another node's insert won
    the race).  Deletes the samples older than ``KEEP``."""
    at = minute_of(now or utcnow())
    try:
        async with db.begin() as conn:
            if (await conn.execute(sa.select(a.c.at).where(a.c.at == at, a.c.tenant_id == FARM))).first():
                return False
            tenants = list(await conn.execute(_PER_TENANT))
            nodes = int((await conn.execute(_NODES)).scalar_one())
            farm = (FARM, sum(int(r.running) for r in tenants), sum(int(r.connected) for r in tenants))
            rows = [
                {"at": at, "tenant_id": tenant, "running": int(running), "connected": int(connected), "nodes": nodes}
                for tenant, running, connected in (farm, *tenants)
            ]
            await conn.execute(sa.insert(a), rows)
            await conn.execute(sa.delete(a).where(a.c.at < at - KEEP))
    except IntegrityError:
        return False
    return True


async def history(
    conn: AsyncConnection, actor: Actor, now: dt.datetime, window: dt.timedelta = WINDOW
) -> dict[str, Any]:
    """The samples of the last ``window`` the actor may see, as points (``points``), on the caller's connection."""
    since = now - window
    farm = list(
        await conn.execute(
            sa.select(a.c.at, a.c.running, a.c.connected, a.c.nodes)
            .where(a.c.tenant_id == FARM, a.c.at >= since)
            .order_by(a.c.at)
        )
    )
    own: dict[Any, Any] = {}  # by the column's own value: the farm's row of the minute has the same
    if not actor.all_tenants:
        tenant = sa.select(a.c.at, a.c.running, a.c.connected).where(a.c.tenant_id == actor.tenant_id)
        own = {r.at: r for r in await conn.execute(tenant.where(a.c.at >= since))}
    samples = []
    for r in farm:
        at = aware(r.at)
        assert at is not None
        mine = r if actor.all_tenants else own.get(r.at)
        running, connected = (int(mine.running), int(mine.connected)) if mine is not None else (0, 0)
        samples.append(Sample(at.timestamp(), running, connected, int(r.nodes)))
    return points(samples, now.timestamp())


def points(samples: list[Sample], now: float, max_points: int = MAX_POINTS) -> dict[str, Any]:
    """``samples`` (in time order) as at most ``max_points`` steps of whole minutes from the first sample to
    ``now``: each step's highest counts, ``None`` in a step without a sample."""
    if not samples:
        return {"step_s": SAMPLE_EVERY_S, "points": []}
    first = samples[0].at
    minutes = max(1, math.ceil((now - first) / SAMPLE_EVERY_S))
    step = SAMPLE_EVERY_S * max(1, math.ceil(minutes / max_points))
    steps: dict[int, list[Sample]] = {}
    for s in samples:
        steps.setdefault(int((s.at - first) // step), []).append(s)
    out = [
        {"at": dt.datetime.fromtimestamp(first + k * step, dt.UTC)}
        | {count: max((getattr(s, count) for s in steps.get(k, ())), default=None) for count in COUNTS}
        for k in range(max(steps) + 1)
    ]
    return {"step_s": step, "points": out}
