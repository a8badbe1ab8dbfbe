"""A desktop's console log: what its guest's init, kernel and agent said (``deckard desktop console-log``).

The drivers keep it where this process can read it: a VM's in the farm home (``logs/console/desktop-<id>.log``,
copied out of QEMU's console ring by its node, and kept after the VM stops, so a failed boot can be read), a
container's in its node's run directory while it runs.  Reading needs ``desktop.see``, like every other view of
a desktop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.runtime.paths import FarmPaths, read_tail
from deckard.services.context import Actor, require
from deckard.services.desktops import find_desktop_id

MAX_BYTES = 1 << 20


async def console_log(
    db: Database, actor: Actor, desktop: str | int, *, paths: FarmPaths, max_bytes: int
) -> dict[str, Any]:
    require(actor, "desktop.see")
    desktop_id = await find_desktop_id(db, actor, desktop)
    d, n = t.desktops, t.nodes
    async with db.connect() as conn:
        row = (
            await conn.execute(
                sa.select(d.c.name, d.c.guest, n.c.run_dir)
                .select_from(d.outerjoin(n, n.c.id == d.c.node_id))
                .where(d.c.id == desktop_id)
            )
        ).one()
    candidates = [paths.logs / "console" / f"desktop-{desktop_id}.log"]  # a VM's, kept by drivers/vm.py
    if row.run_dir:  # a running container's, in its node's run directory
        node_paths = FarmPaths(paths.home, Path(row.run_dir))
        guest = row.guest or node_paths.guest_name(desktop_id)  # a warm guest it took over has a name of its own
        candidates.append(node_paths.lxc / guest / "console.log")
    tail = next((t for t in (read_tail(path, max_bytes) for path in candidates) if t is not None), None)
    text, size = tail or ("", 0)
    return {"desktop": row.name, "text": text, "size": size, "truncated": size > max_bytes, "found": tail is not None}
