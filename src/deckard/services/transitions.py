"""The one way a state is written: a transition table of ``model/states.py`` turned into a guarded UPDATE.

Every state write in Deckard is ``UPDATE <table> SET state=:to, … WHERE id=:id AND state IN (<sources>)
[AND <owner>=:me] RETURNING …``, where ``<sources>`` are the states the table lets go to ``:to``.  The database
decides: of two writers racing, exactly one matches the row, and a write the table forbids matches nothing.
When a single-row write matches nothing the row is read again to say why, in this order:

* ``NotFound`` (``<noun>_not_found``): the row is gone;
* ``Conflict`` (``not_owner``): the row is no longer the caller's — another node holds the desktop, another
  connection took the display over;
* ``InvalidTransition`` (``invalid_transition``, details ``from``/``to``): the table does not allow it.

Nothing is changed in any of the three cases; whether a refusal is an error or an expected lost race is the
caller's decision, and each caller says so (``services/node_ops.py``, ``services/sessions.py``).

Commands (``desktops.cmd``) are desired state with their own guard: a command is written only in the states
``COMMAND_ALLOWED_FROM`` names and only when no other command is pending; a node claims it with
``UPDATE … WHERE node_id=:me AND cmd=:cmd AND state IN (…) RETURNING``, so it is claimed once.

A desktop that comes to rest (``DESKTOP_AT_REST``) leaves its node in the same statement: node, command,
agent token and the user's session are cleared, so "no node, no session" holds for every stopped desktop
whoever stopped it (the node, or the monitor that fenced a lost node).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.db import schema as t
from deckard.model.entities import utcnow
from deckard.model.errors import Conflict, InvalidTransition, NotFound
from deckard.model.states import (
    COMMAND_ALLOWED_FROM,
    COMMAND_CLAIMED_AS,
    DESKTOP_AT_REST,
    DESKTOP_TRANSITIONS,
    IMAGE_TRANSITIONS,
    NODE_COMMAND_ALLOWED_FROM,
    NODE_TRANSITIONS,
    USER_TRANSITIONS,
    DesktopCommand,
    DesktopState,
    ImageState,
    NodeCommand,
    NodeState,
    UserState,
    check_transition,
    sources,
)

S = TypeVar("S", DesktopState, UserState, NodeState, ImageState)
Where = sa.ColumnElement[bool]

d = t.desktops


@dataclass(frozen=True)
class _Machine(Generic[S]):
    noun: str  # in messages and in the not-found code
    code: str
    table: sa.Table
    state: sa.Column[Any]
    stamp: sa.Column[Any] | None  # set to now with every transition
    transitions: Mapping[S, frozenset[S]]


_DESKTOP = _Machine[DesktopState]("desktop", "desktop", d, d.c.state, d.c.state_at, DESKTOP_TRANSITIONS)
_SESSION = _Machine[UserState]("user connection", "desktop", d, d.c.user_state, d.c.user_state_at, USER_TRANSITIONS)
_NODE = _Machine[NodeState]("node", "node", t.nodes, t.nodes.c.state, None, NODE_TRANSITIONS)
_IMAGE = _Machine[ImageState]("disk image", "image", t.disk_images, t.disk_images.c.state, None, IMAGE_TRANSITIONS)


def _sets(m: _Machine[S], to: S, values: Mapping[str, Any]) -> dict[str, Any]:
    sets: dict[str, Any] = {**values, m.state.key: to.value}
    if m.stamp is not None:
        sets.setdefault(m.stamp.key, utcnow())
    return sets


async def _move(
    conn: AsyncConnection, m: _Machine[S], to: S, where: Sequence[Where], values: Mapping[str, Any]
) -> list[sa.Row[Any]]:
    allowed = sorted(sources(m.transitions, to))
    q = sa.update(m.table).where(*where, m.state.in_(allowed)).values(_sets(m, to, values)).returning(*m.table.c)
    return list(await conn.execute(q))


# A statement SQLAlchemy builds anew at each call costs ~0.1 ms of Python to build and key, more than SQLite takes
# to run it, and a connect and a start make a dozen state writes: each shape of write (what it is for, target,
# guards, columns written) is built once, its values bound as ``set_<column>``.  Shapes are few: callers name them
# in code.  Values that are SQL expressions take the statement built anew.
_BUILT: dict[tuple[Any, ...], sa.Update] = {}


def _built_once(shape: tuple[Any, ...], build: Callable[[], sa.Update]) -> sa.Update:
    q = _BUILT.get(shape)
    if q is None:
        q = _BUILT[shape] = build()
    return q


def _bound(columns: Iterable[str]) -> dict[str, Any]:
    """The SET of a statement built once: each column's value a parameter (:func:`_set_params`)."""
    return {k: sa.bindparam(f"set_{k}") for k in columns}


def _set_params(sets: Mapping[str, Any]) -> dict[str, Any]:
    return {f"set_{k}": v for k, v in sets.items()}


def _ids_built_once(
    shape: tuple[Any, ...], sets: Mapping[str, Any], where: Callable[[], tuple[Where, ...]]
) -> sa.Update:
    """``UPDATE desktops SET <the columns of sets> WHERE <where> RETURNING id``, built once per shape and columns
    (``where`` is called only then); execute it with :func:`_set_params` of ``sets``."""
    columns = tuple(sorted(sets))
    return _built_once(
        (*shape, columns), lambda: sa.update(d).where(*where()).values(_bound(columns)).returning(d.c.id)
    )


def _expressions(values: Mapping[str, Any]) -> bool:
    return any(isinstance(v, sa.ClauseElement) for v in values.values())


def _shaped(m: _Machine[S], to: S, guards: tuple[str, ...], columns: tuple[str, ...]) -> sa.Update:
    """``UPDATE … SET <columns> WHERE id AND <guards> AND state IN (<sources of to>) RETURNING *``: guards bound
    as ``is_<column>``, the id as ``row_id``."""
    table = m.table
    return _built_once(
        ("move", m.noun, to.value, guards, columns),
        lambda: (
            sa.update(table)
            .where(
                table.c.id == sa.bindparam("row_id"),
                *(table.c[k] == sa.bindparam(f"is_{k}") for k in guards),
                m.state.in_(sorted(sources(m.transitions, to))),
            )
            .values(_bound(columns))
            .returning(*table.c)
        ),
    )


async def _move_one(
    conn: AsyncConnection,
    m: _Machine[S],
    row_id: int,
    to: S,
    guards: Mapping[str, Any],
    values: Mapping[str, Any],
    where: Sequence[Where] = (),
) -> sa.Row[Any]:
    table: sa.Table = m.table
    sets = _sets(m, to, values)
    if not where and None not in guards.values() and not _expressions(guards) and not _expressions(sets):
        q = _shaped(m, to, tuple(guards), tuple(sorted(sets)))
        params = _set_params(sets)
        params.update({f"is_{k}": v for k, v in guards.items()}, row_id=row_id)
        rows = list(await conn.execute(q, params))
    else:
        owned = [table.c.id == row_id, *(table.c[k] == v for k, v in guards.items()), *where]
        rows = await _move(conn, m, to, owned, values)
    if rows:
        return rows[0]
    now = (await conn.execute(sa.select(table).where(table.c.id == row_id))).mappings().first()
    if now is None:
        raise NotFound(f"no {m.noun} with id {row_id}", code=f"{m.code}_not_found")
    for key, want in guards.items():
        if now[key] != want:
            raise Conflict(
                f"the {m.noun} {row_id} is no longer yours ({key} is {now[key]}, not {want}): someone acted first",
                code="not_owner",
                details={key: now[key]},
            )
    check_transition(m.transitions, type(to)(now[m.state.key]), to, what=m.noun)
    # the table allows it: the row changed between our UPDATE and this read, or a caller's condition failed
    raise Conflict(f"the {m.noun} {row_id} changed meanwhile: retry", code="busy")


def _at_rest(to: DesktopState, values: Mapping[str, Any] | None) -> dict[str, Any]:
    """The columns a transition writes: a desktop coming to rest leaves its node and its user's session; one
    becoming a zombie drops a pending stop (it is being killed: the stop can no longer be claimed, nor is needed)."""
    if to == DesktopState.ZOMBIE:
        return {"cmd": None, "cmd_at": None, **(values or {})}
    if to not in DESKTOP_AT_REST:
        return dict(values or {})
    now = utcnow()
    leave = dict(
        node_id=None,
        cmd=None,
        cmd_at=None,
        agent_token=None,
        guest=None,
        started_at=None,
        user_state=UserState.DISCONNECTED.value,
        user_state_at=now,
        session_id=None,
        session_node_id=None,
    )
    return leave | dict(values or {})


# ---- desktops ---------------------------------------------------------------------------------------
async def transition_desktop(
    conn: AsyncConnection,
    desktop_id: int,
    to: DesktopState,
    *,
    node_id: int | None = None,
    values: Mapping[str, Any] | None = None,
) -> sa.Row[Any]:
    """Move one desktop to ``to``; with ``node_id``, only if that node holds it (the node's observed state)."""
    guards = {"node_id": node_id} if node_id is not None else {}
    return await _move_one(conn, _DESKTOP, desktop_id, to, guards, _at_rest(to, values))


async def transition_desktops(
    conn: AsyncConnection, to: DesktopState, *where: Where, values: Mapping[str, Any] | None = None
) -> list[int]:
    """Move every desktop matching ``where`` whose state may go to ``to``; the ids moved (no error for the rest)."""
    return [int(r.id) for r in await _move(conn, _DESKTOP, to, where, _at_rest(to, values))]


async def command_desktops(
    conn: AsyncConnection, cmd: DesktopCommand, *where: Where, values: Mapping[str, Any] | None = None
) -> list[int]:
    """Write ``cmd`` on the desktops matching ``where`` that may take it now: the ids that got it."""
    q = (
        sa.update(d)
        .where(*where, d.c.state.in_(sorted(COMMAND_ALLOWED_FROM[cmd])), d.c.cmd.is_(None))
        .values({"cmd": cmd.value, "cmd_at": utcnow(), **(values or {})})
        .returning(d.c.id)
    )
    return [int(x) for x in (await conn.execute(q)).scalars()]


async def command_desktop(
    conn: AsyncConnection, desktop_id: int, cmd: DesktopCommand, *, values: Mapping[str, Any] | None = None
) -> bool:
    """``command_desktops`` for one unblocked desktop (a start), its statement built once per shape: whether it
    took the command."""
    sets = {"cmd": cmd.value, "cmd_at": utcnow(), **(values or {})}
    if _expressions(sets):
        return bool(await command_desktops(conn, cmd, d.c.id == desktop_id, d.c.blocked.is_(False), values=values))
    q = _ids_built_once(
        ("command", cmd.value),
        sets,
        lambda: (
            d.c.id == sa.bindparam("row_id"),
            d.c.blocked.is_(False),
            d.c.state.in_(sorted(COMMAND_ALLOWED_FROM[cmd])),
            d.c.cmd.is_(None),
        ),
    )
    return (await conn.execute(q, {"row_id": desktop_id, **_set_params(sets)})).first() is not None


async def claim_commands(
    conn: AsyncConnection, node_id: int, cmd: DesktopCommand, *, values: Mapping[str, Any] | None = None
) -> list[int]:
    """The node claims its pending ``cmd`` commands, exactly once: the desktop moves on and the command clears."""
    to = COMMAND_CLAIMED_AS[cmd]
    claimed = {"cmd": None, "cmd_at": None, **(values or {})}
    sets = _sets(_DESKTOP, to, _at_rest(to, claimed))
    if _expressions(sets):
        return await transition_desktops(conn, to, d.c.node_id == node_id, d.c.cmd == cmd.value, values=claimed)
    q = _ids_built_once(
        ("claim", cmd.value),
        sets,
        lambda: (
            d.c.node_id == sa.bindparam("claimer"),  # a column's name is SQLAlchemy's for SET values
            d.c.cmd == cmd.value,
            d.c.state.in_(sorted(sources(DESKTOP_TRANSITIONS, to))),
        ),
    )
    return [int(x) for x in (await conn.execute(q, {"claimer": node_id, **_set_params(sets)})).scalars()]


async def withdraw_starts(conn: AsyncConnection, *where: Where) -> list[int]:
    """Take back start commands no node has claimed yet (the desktop stays at rest, without a node, and without
    the warm guest and agent token a start may have been given: the pool's node stops that guest, nobody's now)."""
    q = (
        sa.update(d)
        .where(*where, d.c.cmd == DesktopCommand.START.value, d.c.state.in_(sorted(DESKTOP_AT_REST)))
        .values(cmd=None, cmd_at=None, node_id=None, guest=None, agent_token=None)
        .returning(d.c.id)
    )
    return [int(x) for x in (await conn.execute(q)).scalars()]


# ---- user connections (desktops.user_state) ---------------------------------------------------------
async def transition_session(
    conn: AsyncConnection,
    desktop_id: int,
    to: UserState,
    *,
    session_id: str | None = None,
    values: Mapping[str, Any] | None = None,
) -> sa.Row[Any]:
    """Move a desktop's user connection; with ``session_id``, only while that connection owns the display."""
    guards = {"session_id": session_id} if session_id is not None else {}
    return await _move_one(conn, _SESSION, desktop_id, to, guards, values or {})


# ---- nodes ------------------------------------------------------------------------------------------
async def transition_node(
    conn: AsyncConnection, node_id: int, to: NodeState, *, values: Mapping[str, Any] | None = None
) -> sa.Row[Any]:
    return await _move_one(conn, _NODE, node_id, to, {}, values or {})


async def transition_nodes(
    conn: AsyncConnection, to: NodeState, *where: Where, values: Mapping[str, Any] | None = None
) -> list[sa.Row[Any]]:
    return await _move(conn, _NODE, to, where, values or {})


async def command_node(
    conn: AsyncConnection, node_id: int, cmd: NodeCommand, *, values: Mapping[str, Any] | None = None
) -> sa.Row[Any]:
    """Write a node command where its state allows it (``node_not_running`` otherwise)."""
    n = t.nodes
    allowed = NODE_COMMAND_ALLOWED_FROM[cmd]
    q = (
        sa.update(n)
        .where(n.c.id == node_id, n.c.state.in_(sorted(allowed)))
        .values({"cmd": cmd.value, **(values or {})})
        .returning(*n.c)
    )
    row = (await conn.execute(q)).first()
    if row is not None:
        return row
    now = (await conn.execute(sa.select(n.c.name, n.c.state).where(n.c.id == node_id))).first()
    if now is None:
        raise NotFound(f"no node with id {node_id}", code="node_not_found")
    raise InvalidTransition(
        f"node {now.name} is {now.state}: {cmd} needs it {' or '.join(sorted(allowed))}",
        code="node_not_running",
        details={"from": now.state, "cmd": cmd.value},
    )


# ---- disk images ------------------------------------------------------------------------------------
async def transition_image(
    conn: AsyncConnection,
    image_id: int,
    to: ImageState,
    *where: Where,
    values: Mapping[str, Any] | None = None,
) -> sa.Row[Any]:
    """Move a disk image; ``where`` adds conditions (not blocked) that the caller checked before."""
    return await _move_one(conn, _IMAGE, image_id, to, {}, values or {}, where)
