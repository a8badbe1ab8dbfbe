"""Warm pools: desktops started before anyone asks, which a connecting user takes over (``docs/pools.md``).

A pool belongs to an OSF and one of its image tags and says how many warm guests the farm keeps ready: ``size``
at all times, or only within ``hours`` (the login rules' windows, ``Mon-Fri 07:00-19:00``) in its ``timezone``
and none outside them.  A warm guest is a container of the pool's image, booted with its display up and nobody's
account, home or policy; a user who connects to a stopped desktop of that OSF and tag takes one over (the node
mounts their home into it, readdresses it to the desktop's own address, loads the desktop's policy, and the agent
makes their account and starts their session on the display that is already up).  A guest is taken over once and
by one desktop only: it never goes back to the pool, so nobody ever sees what another user left.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass

from deckard.model.errors import BadInput
from deckard.model.login_rules import parse_hours, parse_timezone

MAX_POOL_SIZE = 100
"""A pool's size at most (the tenant's total is ``pools.tenant_max``)."""

WARM_GUEST_MARK = "w"
"""A warm guest's name is ``<guest prefix>w<random>``: never a desktop's (those end in its numeric id)."""


class WarmState:
    STARTING = "starting"  # its node is booting it
    READY = "ready"  # its agent answers: a user may take it


def check_pool(size: int | None, hours: str | None, timezone: str | None) -> None:
    """422 ``bad_pool`` for a size out of range; ``bad_login_rule`` (the same words as login rules) for hours."""
    if size is not None and not 0 <= size <= MAX_POOL_SIZE:
        raise BadInput(f"a pool's size must be between 0 and {MAX_POOL_SIZE}, not {size}", code="bad_pool")
    if hours:
        parse_hours(hours)
    if timezone:
        parse_timezone(timezone)


def wanted_now(size: int, hours: str, timezone: str, now: dt.datetime) -> int:
    """How many warm guests the pool keeps at ``now``: ``size`` within its hours (or always without any), else 0."""
    windows = parse_hours(hours) if hours else ()
    if not windows:
        return size
    local = now.astimezone(parse_timezone(timezone or "UTC"))
    minute = local.hour * 60 + local.minute
    return size if any(w.contains(local.weekday(), minute) for w in windows) else 0


def new_warm_guest_name(prefix: str) -> str:
    """A fresh warm guest's name: the node's guest prefix, the mark and 6 random hex digits (short enough that its
    veth name is readable, random so that a name is never used twice while a desktop still runs in the first)."""
    return f"{prefix}{WARM_GUEST_MARK}{secrets.token_hex(3)}"


@dataclass(frozen=True)
class PoolPlan:
    """What one node does for one pool in one pass (``services/pools.node_plan``)."""

    pool_id: int
    wanted: int  # the farm-wide target now
    live: int  # warm guests of the pool the farm has (starting or ready, any node)
    trim: tuple[str, ...]  # this node's guests to stop: the pool has too many, or they run a replaced image


def excess(guests: list[tuple[int, str, int]], wanted: int, node_id: int) -> tuple[str, ...]:
    """Which of this node's guests go when a pool has more than ``wanted``: the newest ones farm-wide (``guests``
    are ``(id, name, node_id)``), so every node reading the same rows picks the same ones and none trims twice."""
    newest = sorted(guests, reverse=True)[: max(len(guests) - wanted, 0)]
    return tuple(name for _id, name, node in newest if node == node_id)
