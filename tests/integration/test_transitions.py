"""Every pair of states of every machine, through services/transitions.py, on SQLite and PostgreSQL.

A pair the table allows moves the row; any other pair raises ``invalid_transition`` and changes nothing —
not the state, not a single other column.  Then the two other refusals (``not_owner``, not found) and the
node's lost races, which change nothing and answer False.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Mapping
from enum import StrEnum
from typing import Any

import pytest
import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.errors import Conflict, InvalidTransition, NotFound
from deckard.model.states import (
    DESKTOP_AT_REST,
    DESKTOP_TRANSITIONS,
    IMAGE_TRANSITIONS,
    NODE_TRANSITIONS,
    USER_TRANSITIONS,
    DesktopState,
    ImageState,
    NodeState,
    UserState,
)
from deckard.services import desktops, images, node_ops, transitions, users
from deckard.services.context import SYSTEM
from deckard.services.tenancy import bootstrap_farm

NET = "10.251.0.0/24"

Move = Callable[[Any, int, Any], Awaitable[Any]]


async def _farm(db: Database) -> tuple[int, int, int]:
    """A desktop, a node and a disk image to move around: their ids."""
    await bootstrap_farm(db)
    await users.create_user(db, SYSTEM, "alice", "s3cret!")
    desk = await desktops.create_desktop(db, SYSTEM, "alice-desk", "alice", network=NET)
    node_id = await node_ops.register_node(db, "n1", "10.251.0.1", "", cpus=2, mem_total_mib=8000, mem_free_mib=8000)
    image = await images.create_image(db, SYSTEM, "v1")
    return int(desk["id"]), node_id, int(image["id"])


async def _row(db: Database, table: sa.Table, row_id: int) -> dict[str, Any]:
    async with db.connect() as conn:
        return dict((await conn.execute(sa.select(table).where(table.c.id == row_id))).one()._mapping)


async def _check_every_pair(
    db: Database,
    table: sa.Table,
    column: str,
    row_id: int,
    rules: Mapping[Any, frozenset[Any]],
    move: Move,
    arrange: Mapping[str, Any] | None = None,
) -> None:
    states: list[StrEnum] = list(rules)
    for old, new in itertools.product(states, states):
        async with db.begin() as conn:  # arrange: put the row in ``old`` (and give it an owner to keep or lose)
            await conn.execute(
                sa.update(table).where(table.c.id == row_id).values({column: old.value, **(arrange or {})})
            )
        before = await _row(db, table, row_id)
        if new in rules[old]:
            async with db.begin() as conn:
                await move(conn, row_id, new)
            assert (await _row(db, table, row_id))[column] == new, (old, new)
        else:
            with pytest.raises(InvalidTransition) as e:
                async with db.begin() as conn:
                    await move(conn, row_id, new)
            assert e.value.code == "invalid_transition"
            assert e.value.details == {"from": old.value, "to": new.value}
            assert await _row(db, table, row_id) == before, (old, new)


async def test_every_desktop_pair_moves_exactly_when_the_table_says(db: Database) -> None:
    desk_id, node_id, _ = await _farm(db)

    async def move(conn: Any, row_id: int, to: DesktopState) -> None:
        await transitions.transition_desktop(conn, row_id, to, node_id=node_id)

    arrange = {"node_id": node_id, "agent_token": "tok", "user_state": UserState.CONNECTED.value, "session_id": "s"}
    await _check_every_pair(db, t.desktops, "state", desk_id, DESKTOP_TRANSITIONS, move, arrange)


async def test_every_user_connection_pair_moves_exactly_when_the_table_says(db: Database) -> None:
    desk_id, _, _ = await _farm(db)

    async def move(conn: Any, row_id: int, to: UserState) -> None:
        await transitions.transition_session(conn, row_id, to, session_id="s1")

    await _check_every_pair(db, t.desktops, "user_state", desk_id, USER_TRANSITIONS, move, {"session_id": "s1"})


async def test_every_node_pair_moves_exactly_when_the_table_says(db: Database) -> None:
    _, node_id, _ = await _farm(db)

    async def move(conn: Any, row_id: int, to: NodeState) -> None:
        await transitions.transition_node(conn, row_id, to)

    await _check_every_pair(db, t.nodes, "state", node_id, NODE_TRANSITIONS, move)


async def test_every_image_pair_moves_exactly_when_the_table_says(db: Database) -> None:
    _, _, image_id = await _farm(db)

    async def move(conn: Any, row_id: int, to: ImageState) -> None:
        await transitions.transition_image(conn, row_id, to)

    await _check_every_pair(db, t.disk_images, "state", image_id, IMAGE_TRANSITIONS, move)


async def test_a_desktop_coming_to_rest_leaves_its_node_and_ends_the_session(db: Database) -> None:
    desk_id, node_id, _ = await _farm(db)
    for rest in DESKTOP_AT_REST:
        async with db.begin() as conn:
            await conn.execute(
                sa.update(t.desktops)
                .where(t.desktops.c.id == desk_id)
                .values(state="starting", node_id=node_id, agent_token="tok", user_state="connecting", session_id="s")
            )
            await transitions.transition_desktop(conn, desk_id, rest, node_id=node_id)
        row = await _row(db, t.desktops, desk_id)
        assert (row["state"], row["node_id"], row["agent_token"], row["cmd"]) == (rest, None, None, None)
        assert (row["user_state"], row["session_id"]) == ("disconnected", None)


async def test_another_nodes_desktop_is_not_owned_and_an_unknown_one_is_not_found(db: Database) -> None:
    desk_id, node_id, _ = await _farm(db)
    other = await node_ops.register_node(db, "n2", "10.251.0.2", "", cpus=2, mem_total_mib=8000, mem_free_mib=8000)
    async with db.begin() as conn:
        await conn.execute(
            sa.update(t.desktops).where(t.desktops.c.id == desk_id).values(state="running", node_id=node_id)
        )
    before = await _row(db, t.desktops, desk_id)
    with pytest.raises(Conflict) as e:
        async with db.begin() as conn:
            await transitions.transition_desktop(conn, desk_id, DesktopState.STOPPED, node_id=other)
    assert e.value.code == "not_owner" and not isinstance(e.value, InvalidTransition)
    assert await _row(db, t.desktops, desk_id) == before
    with pytest.raises(NotFound) as nf:
        async with db.begin() as conn:
            await transitions.transition_desktop(conn, desk_id + 1000, DesktopState.STOPPED, node_id=node_id)
    assert nf.value.code == "desktop_not_found"
    # the node's own report of the same write is a lost race: False, nothing changed
    assert await node_ops.mark_stopped(db, other, desk_id) is False
    assert await _row(db, t.desktops, desk_id) == before


async def test_a_late_second_stop_does_not_take_a_new_start_away_from_its_node(db: Database) -> None:
    """The node stopped the desktop, the user asked for it again on the same node, then a stale stop reported.

    Before the guard, that stop cleared the node and kept the start: a command nobody would ever claim.
    """
    desk_id, node_id, _ = await _farm(db)
    assert await node_ops.set_node_state(db, node_id, NodeState.RUNNING)
    await desktops.request_start(db, desk_id)
    assert await node_ops.claim_starts(db, node_id) == [desk_id]
    assert await node_ops.mark_stopped(db, node_id, desk_id)
    assert await desktops.request_start(db, desk_id) == node_id
    before = await _row(db, t.desktops, desk_id)
    assert await node_ops.mark_stopped(db, node_id, desk_id) is False
    assert await _row(db, t.desktops, desk_id) == before
    assert await node_ops.claim_starts(db, node_id) == [desk_id]


async def test_a_lost_node_cannot_be_set_live_except_by_registering_again(db: Database) -> None:
    _, node_id, _ = await _farm(db)
    async with db.begin() as conn:
        await conn.execute(sa.update(t.nodes).where(t.nodes.c.id == node_id).values(state="lost"))
    for state in (NodeState.RUNNING, NodeState.STOPPING, NodeState.STOPPED, NodeState.RESTARTING):
        assert await node_ops.set_node_state(db, node_id, state) is False
    assert (await _row(db, t.nodes, node_id))["state"] == "lost"
    again = await node_ops.register_node(db, "n1", "10.251.0.1", "", cpus=2, mem_total_mib=8000, mem_free_mib=8000)
    assert again == node_id and (await _row(db, t.nodes, node_id))["state"] == "starting"
