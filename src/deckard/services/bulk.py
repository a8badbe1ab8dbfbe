"""Bulk actions: one request acts on many desktops or users and answers per item.

``{"ok": [ids], "failed": {"<id>": {"code", "message"}}}``: one item failing never hides the others' result.
The targets are either ids or a list filter (the same syntax as ``GET /desktops``), so "start every desktop of
OSF web" is one call.

Starting is the action that must scale (a classroom at 9:00): it places every desktop from **one** read of the
node loads (each choice updates the in-memory figures, so the load spreads), writes the commands with one
guarded ``UPDATE … WHERE id IN (…) AND state IN ('failed','stopped') AND cmd IS NULL RETURNING id`` per node
and chunk (``transitions.command_desktops``), and notifies each node once.  A desktop the guard misses
changed meanwhile and is reported as ``desktop_busy``.  The other actions run the single-item use case per
desktop (same checks, same events).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.errors import BadInput, DeckardError
from deckard.model.placement import NodeIndex, NodeLoad, Request
from deckard.model.states import DesktopCommand, DesktopState, check_command
from deckard.runtime.paths import FarmPaths
from deckard.services import desktops, users
from deckard.services.context import Actor, require, require_fields
from deckard.services.events import node_channel
from deckard.services.listing import ListQuery, apply_query
from deckard.services.placement import choose_node, node_index
from deckard.services.transitions import command_desktops

d = t.desktops
CHUNK = 500  # ids per statement: far below SQLite's and PostgreSQL's parameter limits

DESKTOP_ACTIONS = ("start", "stop", "block", "unblock", "disconnect", "reset", "delete")
USER_ACTIONS = ("block", "unblock", "delete")


@dataclasses.dataclass(frozen=True)
class _Kind:
    """What bulk actions need to know of one kind of object."""

    noun: str
    actions: tuple[str, ...]
    scope: Callable[[Actor], sa.Select[Any]]  # the rows the actor may see
    key: sa.ColumnElement[Any]
    fields: dict[str, sa.ColumnElement[Any]]

    def acl(self, action: str) -> str:
        return f"{self.noun}.block" if action == "unblock" else f"{self.noun}.{action}"


_DESKTOPS = _Kind("desktop", DESKTOP_ACTIONS, desktops.desktop_scope, d.c.id, desktops.FIELDS)
_USERS = _Kind("user", USER_ACTIONS, users.user_scope, t.users.c.id, users.FIELDS)


@dataclasses.dataclass
class BulkResult:
    ok: list[int] = dataclasses.field(default_factory=list)
    failed: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)

    def fail(self, obj_id: int | str, code: str, message: str) -> None:
        self.failed[str(obj_id)] = {"code": code, "message": message}

    def as_dict(self) -> dict[str, Any]:
        return {"ok": sorted(self.ok), "failed": self.failed}


def _chunks(ids: Sequence[int]) -> list[Sequence[int]]:
    return [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)]


async def _targets(
    db: Database, actor: Actor, kind: _Kind, action: str, ids: list[int] | None, q: ListQuery | None
) -> tuple[BulkResult, list[int]]:
    """Check ``action`` and the actor's rights; the ids the actor may act on, and a result in which asked-for ids
    that do not exist (or are not theirs) have failed as not found."""
    if action not in kind.actions:
        raise BadInput(f"unknown action {action!r}; use one of {', '.join(kind.actions)}", code="bad_action")
    require(actor, f"{kind.noun}.see", kind.acl(action))
    if q is not None:
        require_fields(actor, kind.noun, q.named_fields)
    if (ids is None) == (q is None):
        raise BadInput('give either "ids" or "filter"', code="bad_bulk")
    result = BulkResult()
    scope, key, what = kind.scope(actor), kind.key, kind.noun
    found: list[int] = []
    async with db.connect() as conn:
        if ids is not None:
            wanted = list(dict.fromkeys(ids))
            seen: set[int] = set()
            for chunk in _chunks(wanted):
                seen.update(int(r[0]) for r in await conn.execute(scope.with_only_columns(key).where(key.in_(chunk))))
            for i in wanted:
                if i in seen:
                    found.append(i)
                else:
                    result.fail(i, f"{what}_not_found", f"no {what} with id {i}")
        else:
            assert q is not None
            page, _count = apply_query(scope, dataclasses.replace(q, page=1, per_page=10**9), kind.fields, key)
            found = [int(r.id) for r in await conn.execute(page)]
    return result, found


async def _each(ids: list[int], result: BulkResult, act: Callable[[int], Awaitable[Any]]) -> None:
    for obj_id in ids:
        try:
            await act(obj_id)
        except DeckardError as e:
            result.fail(obj_id, e.code, e.message)
        else:
            result.ok.append(obj_id)


async def bulk_desktops(
    db: Database,
    actor: Actor,
    action: str,
    *,
    ids: list[int] | None = None,
    q: ListQuery | None = None,
    paths: FarmPaths | None = None,
) -> dict[str, Any]:
    """Apply ``action`` to the desktops named by ``ids`` or matching ``q``; the per-item outcome."""
    result, targets = await _targets(db, actor, _DESKTOPS, action, ids, q)
    if action == "start":
        await _start_many(db, targets, result)
        return result.as_dict()
    acts: dict[str, Callable[[int], Awaitable[Any]]] = {
        "stop": lambda i: desktops.stop_desktop(db, actor, i),
        "block": lambda i: desktops.set_blocked(db, actor, i, True),
        "unblock": lambda i: desktops.set_blocked(db, actor, i, False),
        "disconnect": lambda i: desktops.disconnect_desktop(db, actor, i),
        "delete": lambda i: desktops.delete_desktop(db, actor, i, paths),
    }
    if action == "reset":
        if paths is None:
            raise BadInput("reset needs the farm's storage paths", code="bad_action")
        farm_paths = paths
        acts["reset"] = lambda i: desktops.reset_desktop(db, actor, i, farm_paths)
    await _each(targets, result, acts[action])
    return result.as_dict()


def _refusal(state: str, cmd: str | None, blocked: bool) -> tuple[str, str] | None:
    """Why a desktop cannot be asked to start (None: it can, or it already was)."""
    if blocked:
        return "desktop_blocked", "the desktop is blocked: unblock it first"
    if cmd == DesktopCommand.STOP:
        return "desktop_busy", "the desktop is being stopped: try again in a few seconds"
    if cmd == DesktopCommand.START:
        return None
    try:
        check_command(DesktopCommand.START, DesktopState(state))
    except DeckardError as e:
        return e.code, e.message
    return None


async def _start_many(db: Database, ids: list[int], result: BulkResult) -> None:
    """Place every startable desktop with the farm's placer and reserve, on one read of the nodes (the placement
    index counts each decision on its node, as the node's next heartbeat would), then write the commands per node."""
    by_node: dict[int, list[int]] = {}
    rng = random.Random()
    async with db.begin() as conn:
        index = await node_index(conn)
        rows: list[sa.Row[Any]] = []
        for chunk in _chunks(ids):
            q = (
                sa.select(
                    d.c.id, d.c.state, d.c.cmd, d.c.blocked, d.c.placement_group, t.osfs.c.memory_mib, t.osfs.c.driver
                )
                .join(t.osfs, t.osfs.c.id == d.c.osf_id)
                .where(d.c.id.in_(chunk))
            )
            rows.extend(await conn.execute(q))
        for r in sorted(rows, key=lambda r: int(r.id)):
            refusal = _refusal(r.state, r.cmd, r.blocked)
            if refusal:
                result.fail(r.id, *refusal)
                continue
            if r.cmd == DesktopCommand.START:
                result.ok.append(int(r.id))  # already asked: starting twice is the same request
                continue
            memory = int(r.memory_mib)
            node = await _choose(conn, index, rng, int(r.id), memory, r.driver, r.placement_group, result)
            if node is None:
                continue
            index.place(node, memory)
            by_node.setdefault(node.node_id, []).append(int(r.id))
        for node_id, node_ids in by_node.items():
            for chunk in _chunks(node_ids):
                done = set(
                    await command_desktops(
                        conn,
                        DesktopCommand.START,
                        d.c.id.in_(chunk),
                        d.c.blocked.is_(False),
                        values={"node_id": node_id},
                    )
                )
                result.ok.extend(done)
                for i in chunk:
                    if i not in done:
                        result.fail(i, "desktop_busy", "the desktop changed while starting it: retry")
    for node_id in by_node:
        await db.bus.notify(node_channel(node_id), "")
    await desktops.notify_desktops(db, result.ok)


async def _choose(
    conn: AsyncConnection,
    index: NodeIndex,
    rng: random.Random,
    desktop_id: int,
    memory: int,
    driver: str,
    group: str | None,
    result: BulkResult,
) -> NodeLoad | None:
    """The node for one desktop of a bulk start, or None (the refusal is in ``result``).  A desktop in a placement
    group is ranked with its group's figures (``choose_node``); the others are drawn from the index."""
    if group:
        try:
            node_id = await choose_node(conn, memory, desktop_id=desktop_id)
        except DeckardError as e:
            result.fail(desktop_id, e.code, e.message)
            return None
        return next(n for n in index.nodes if n.node_id == node_id)
    req = Request(memory, driver=driver)
    node = index.best(req, rng)
    if node is None:
        why = "; ".join(f"{c.node.name}: {c.excluded_by}" for c in index.explain(req)) or "no node has registered"
        result.fail(desktop_id, "no_node", f"no node can take this desktop now ({why})")
    return node


async def bulk_users(
    db: Database,
    actor: Actor,
    action: str,
    *,
    paths: FarmPaths,
    ids: list[int] | None = None,
    q: ListQuery | None = None,
) -> dict[str, Any]:
    """Block, unblock or delete the users named by ``ids`` or matching ``q``; the per-item outcome."""
    result, targets = await _targets(db, actor, _USERS, action, ids, q)
    acts: dict[str, Callable[[int], Awaitable[Any]]] = {
        "block": lambda i: users.update_user(db, actor, i, blocked=True),
        "unblock": lambda i: users.update_user(db, actor, i, blocked=False),
        "delete": lambda i: users.delete_user(db, actor, i, paths),  # archives or deletes the home
    }
    await _each(targets, result, acts[action])
    return result.as_dict()
