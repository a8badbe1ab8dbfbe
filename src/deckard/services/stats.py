"""Figures for the admin dashboard (QVD's WAT dashboard): counts, who is connected, time-to-desktop, busiest
nodes and desktops about to expire, in one answer so the dashboard needs one request; and time-to-desktop per
phase, per image and per node over a window (``time_to_desktop``), its own request because it reads every phase.

Percentiles are computed here from the last day's ``connections.t_total_ms`` rather than in SQL, because
PostgreSQL's ``percentile_cont`` has no SQLite equivalent and a day of connections is small enough to read.
The window of the per-phase figures is bounded (``WINDOW_MAX``) for the same reason.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any

import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import aware, utcnow
from deckard.model.errors import BadInput
from deckard.model.session_policy import describe_duration, parse_duration
from deckard.model.states import DesktopState, UserState
from deckard.runtime.metrics import PHASES  # the connection history's t_<phase>_ms
from deckard.services import activity
from deckard.services.context import Actor, require
from deckard.services.users import tenant_filter

d = t.desktops
EXPIRY_HORIZON = dt.timedelta(hours=24)
BUSIEST = 5


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of ``values`` (None when there are none)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, round(p / 100 * len(ordered) + 0.4999))
    return ordered[min(rank, len(ordered)) - 1]


def _percentiles(values: list[float]) -> dict[str, Any]:
    return {"count": len(values), **{f"p{p}": percentile(values, p) for p in (50, 90, 99)}}


async def farm_stats(db: Database, actor: Actor) -> dict[str, Any]:
    require(actor, "stats.see")
    now = utcnow()
    mine = tenant_filter(actor, d.c.tenant_id)
    users_mine = tenant_filter(actor, t.users.c.tenant_id)
    async with db.connect() as conn:
        by_state = {
            r.state: int(r.n)
            for r in await conn.execute(
                sa.select(d.c.state, sa.func.count().label("n")).where(mine).group_by(d.c.state)
            )
        }
        blocked_desktops = (
            await conn.execute(sa.select(sa.func.count()).select_from(d).where(mine, d.c.blocked.is_(True)))
        ).scalar_one()
        user_count = (
            await conn.execute(sa.select(sa.func.count()).select_from(t.users).where(users_mine))
        ).scalar_one()
        blocked_users = (
            await conn.execute(
                sa.select(sa.func.count()).select_from(t.users).where(users_mine, t.users.c.blocked.is_(True))
            )
        ).scalar_one()
        connected = (
            await conn.execute(
                sa.select(sa.func.count()).select_from(d).where(mine, d.c.user_state == UserState.CONNECTED)
            )
        ).scalar_one()
        nodes_by_state = {
            r.state: int(r.n)
            for r in await conn.execute(
                sa.select(t.nodes.c.state, sa.func.count().label("n")).group_by(t.nodes.c.state)
            )
        }
        blocked_nodes = (
            await conn.execute(sa.select(sa.func.count()).select_from(t.nodes).where(t.nodes.c.blocked.is_(True)))
        ).scalar_one()
        running = sa.func.count(d.c.id).label("desktops")
        busiest = [
            {"id": r.id, "name": r.name, "state": r.state, "desktops": int(r.desktops), "load": r.load}
            for r in await conn.execute(
                sa.select(t.nodes.c.id, t.nodes.c.name, t.nodes.c.state, t.nodes.c.load, running)
                .outerjoin(d, sa.and_(d.c.node_id == t.nodes.c.id, d.c.state != DesktopState.STOPPED, mine))
                .group_by(t.nodes.c.id, t.nodes.c.name, t.nodes.c.state, t.nodes.c.load)
                .order_by(running.desc(), t.nodes.c.id)
                .limit(BUSIEST)
            )
        ]
        since = now - dt.timedelta(hours=24)
        timings = await conn.execute(
            sa.select(t.connections.c.started_at, t.connections.c.t_total_ms)
            .join(t.users, t.users.c.id == t.connections.c.user_id)
            .where(users_mine, t.connections.c.started_at >= since, t.connections.c.t_total_ms.is_not(None))
        )
        soon = now + EXPIRY_HORIZON
        expiring = await conn.execute(
            sa.select(d.c.id, d.c.name, d.c.state, d.c.expire_soft_at, d.c.expire_hard_at)
            .where(
                mine,
                sa.or_(
                    sa.and_(d.c.expire_soft_at.is_not(None), d.c.expire_soft_at <= soon),
                    sa.and_(d.c.expire_hard_at.is_not(None), d.c.expire_hard_at <= soon),
                ),
            )
            .order_by(sa.func.coalesce(d.c.expire_hard_at, d.c.expire_soft_at), d.c.id)
            .limit(50)
        )
        near_expiry = [
            {
                "id": r.id,
                "name": r.name,
                "state": r.state,
                "expire_soft_at": aware(r.expire_soft_at),
                "expire_hard_at": aware(r.expire_hard_at),
            }
            for r in expiring
        ]
        history = await activity.history(conn, actor, now)
    day: list[float] = []
    hours: dict[dt.datetime, list[float]] = defaultdict(list)
    for started, total in timings:
        started = aware(started)
        day.append(float(total))
        if started is not None:
            hours[started.replace(minute=0, second=0, microsecond=0)].append(float(total))
    return {
        "at": now,
        "desktops": {"total": sum(by_state.values()), "by_state": by_state, "blocked": int(blocked_desktops)},
        "users": {"total": int(user_count), "blocked": int(blocked_users), "connected": int(connected)},
        "nodes": {"total": sum(nodes_by_state.values()), "by_state": nodes_by_state, "blocked": int(blocked_nodes)},
        "time_to_desktop_ms": {
            "last_24h": _percentiles(day),
            "hourly": [{"hour": h, **_percentiles(v)} for h, v in sorted(hours.items())],
        },
        "busiest_nodes": busiest,
        "near_expiry": near_expiry,
        "activity": history,
    }


# ---- time-to-desktop per phase, per image and per node -------------------------------------------------------

WINDOW_DEFAULT = "24h"
WINDOW_MIN = dt.timedelta(minutes=1)
WINDOW_MAX = dt.timedelta(days=7)  # the rows are read, not aggregated in SQL: a week of connections at most


def parse_window(text: str) -> dt.timedelta:
    """``30m``, ``24h``, ``7d`` → a window from one minute to seven days; BadInput ``bad_window`` otherwise."""
    bounds = f"{describe_duration(WINDOW_MIN.total_seconds())} to {describe_duration(WINDOW_MAX.total_seconds())}"
    try:
        window = dt.timedelta(seconds=parse_duration(text, "window"))
    except BadInput:
        window = None
    if window is None or not WINDOW_MIN <= window <= WINDOW_MAX:
        raise BadInput(
            f"{text[:40]!r} is not a valid window: write a duration from {bounds} (e.g. 30m, 24h, 7d)",
            code="bad_window",
            details={"field": "window", "min": "1m", "max": "7d"},
        )
    return window


def _by_phase(rows: list[Any]) -> dict[str, Any]:
    """{count, phases: {phase: {count, p50, p95}}} of some connections (a phase counts where it was timed)."""
    phases: dict[str, Any] = {}
    for phase in PHASES:
        values = [float(v) for r in rows if (v := getattr(r, f"t_{phase}_ms")) is not None]
        phases[phase] = {"count": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95)}
    return {"count": len(rows), "phases": phases}


async def time_to_desktop(db: Database, actor: Actor, window: str = WINDOW_DEFAULT) -> dict[str, Any]:
    """p50/p95 of each phase of the connections that reached their desktop within ``window``, grouped by the
    image and by the node the desktop ran on (``connections.image_id``/``node_id``; rows from before those were
    recorded fall in a group whose id is null).  Tenant administrators see their tenant's connections only."""
    require(actor, "stats.see")
    span = parse_window(window)
    now = utcnow()
    c = t.connections
    i = t.disk_images
    query = (
        sa.select(
            c.c.image_id,
            c.c.node_id,
            t.osfs.c.name.label("osf"),
            i.c.version,
            t.nodes.c.name.label("node"),
            *(c.c[f"t_{phase}_ms"] for phase in PHASES),
        )
        .join(t.users, t.users.c.id == c.c.user_id)
        .outerjoin(i, i.c.id == c.c.image_id)
        .outerjoin(t.osfs, t.osfs.c.id == i.c.osf_id)
        .outerjoin(t.nodes, t.nodes.c.id == c.c.node_id)
        .where(
            tenant_filter(actor, t.users.c.tenant_id),
            c.c.started_at >= now - span,
            c.c.t_total_ms.is_not(None),  # reached the desktop: the same connects as the Prometheus histogram
        )
    )
    async with db.connect() as conn:
        rows = list(await conn.execute(query))
    images: dict[int | None, list[Any]] = defaultdict(list)
    nodes: dict[int | None, list[Any]] = defaultdict(list)
    for r in rows:
        images[r.image_id].append(r)
        nodes[r.node_id].append(r)

    def order(groups: dict[int | None, list[Any]]) -> list[tuple[int | None, list[Any]]]:
        return sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0] is None, kv[0] or 0))

    return {
        "at": now,
        "window": window.strip().lower(),
        "since": now - span,
        "phases": list(PHASES),
        "count": len(rows),
        "by_image": [
            {"image_id": key, "osf": group[0].osf, "version": group[0].version, **_by_phase(group)}
            for key, group in order(images)
        ],
        "by_node": [{"node_id": key, "node": group[0].node, **_by_phase(group)} for key, group in order(nodes)],
    }
