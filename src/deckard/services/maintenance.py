"""Node maintenance as desired state: drain, evacuate and stop a node without talking to it.

The admin plane never calls a node (ARCHITECTURE.md §2): each action writes the database and notifies the node's
channel; the node carries it out.

* **drain**: ``blocked`` (placement skips it) and ``cmd='drain'``: the node sends every running desktop's agent
  the ``expire`` notice ("please save and log out"); the desktops keep running until their users leave.
* **evacuate**: ``blocked`` and a ``stop`` command on every desktop of the node; each restarts on another node at
  its user's next connect.
* **stop**: ``cmd='stop'``: the node stops its desktops cleanly and exits (QVD's ``host_runtimes.cmd``).

* **restart**: ``cmd='restart'``: the node finishes the starts and stops in flight, leaves its guests running,
  marks itself ``restarting`` and re-executes itself; the new process adopts the guests (converge).  Desktops are
  not touched; only tunnels through that node's own broker drop (their clients reconnect to the same session).
  ``deckard node restart --all`` does it one node at a time (a rolling restart, e.g. after an upgrade).

Nodes are shared by every tenant, so each action is for supertenant administrators only, even when a tenant's
role grants ``node.block`` or ``node.stop`` (``services/nodes.py``).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.errors import NotFound
from deckard.model.states import DesktopCommand, DesktopState, NodeCommand
from deckard.services.context import Actor, require, require_supertenant
from deckard.services.events import DESKTOPS, node_channel, publish
from deckard.services.transitions import command_desktops, command_node, withdraw_starts

n = t.nodes
d = t.desktops


async def _node(db: Database, ref: str | int) -> Any:
    cond = n.c.id == int(ref) if str(ref).isdigit() else n.c.name == str(ref)
    async with db.connect() as conn:
        row = (await conn.execute(sa.select(n.c.id, n.c.name, n.c.state).where(cond))).first()
    if row is None:
        raise NotFound(f"node {ref!r} not found", code="not_found")
    return row


async def drain_node(db: Database, actor: Actor, ref: str | int) -> dict[str, Any]:
    """Block the node and ask it to tell the users of its running desktops to leave."""
    require(actor, "node.block")
    require_supertenant(actor, "drain a node")
    node = await _node(db, ref)
    async with db.begin() as conn:
        await command_node(conn, node.id, NodeCommand.DRAIN, values={"blocked": True})
        running = (
            await conn.execute(
                sa.select(sa.func.count()).where(d.c.node_id == node.id, d.c.state == DesktopState.RUNNING)
            )
        ).scalar_one()
    await db.bus.notify(node_channel(node.id), "drain")
    await publish(db, "updated", "node", node.id, None, blocked=True, drain=True)
    return {"node_id": node.id, "node": node.name, "blocked": True, "notified_desktops": int(running)}


async def evacuate_node(db: Database, actor: Actor, ref: str | int) -> dict[str, Any]:
    """Block the node and stop every desktop on it; they start on other nodes at the next connect."""
    require(actor, "node.block")
    require_supertenant(actor, "evacuate a node")
    node = await _node(db, ref)
    async with db.begin() as conn:
        await conn.execute(sa.update(n).where(n.c.id == node.id).values(blocked=True))
        ids = await command_desktops(conn, DesktopCommand.STOP, d.c.node_id == node.id)
        # a start not yet claimed is simply withdrawn: it will be placed elsewhere
        await withdraw_starts(conn, d.c.node_id == node.id)
    await db.bus.notify(node_channel(node.id), "evacuate")
    for i in range(0, len(ids), 500):
        await db.bus.notify(DESKTOPS, ",".join(str(x) for x in ids[i : i + 500]))
    await publish(db, "updated", "node", node.id, None, blocked=True, evacuate=len(ids))
    return {"node_id": node.id, "node": node.name, "blocked": True, "stopping_desktops": ids}


async def stop_node(db: Database, actor: Actor, ref: str | int) -> dict[str, Any]:
    """Ask the node daemon to stop its desktops cleanly and exit."""
    return await _node_command(db, actor, ref, NodeCommand.STOP)


async def restart_node(db: Database, actor: Actor, ref: str | int) -> dict[str, Any]:
    """Ask the node daemon to re-execute itself, keeping its desktops running (they are adopted)."""
    return await _node_command(db, actor, ref, NodeCommand.RESTART)


async def _node_command(db: Database, actor: Actor, ref: str | int, cmd: NodeCommand) -> dict[str, Any]:
    require(actor, "node.stop")
    require_supertenant(actor, f"{cmd} a node")
    node = await _node(db, ref)
    async with db.begin() as conn:
        await command_node(conn, node.id, cmd)  # node_not_running unless NODE_COMMAND_ALLOWED_FROM says so
    await db.bus.notify(node_channel(node.id), cmd.value)
    await publish(db, "updated", "node", node.id, None, cmd=cmd.value)
    return {"node_id": node.id, "node": node.name, "cmd": cmd.value}
