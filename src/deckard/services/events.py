"""Channel names shared by the writers and the waiters of notifications."""

from __future__ import annotations

DESKTOPS = "desktops"  # payload: desktop id; any change of a desktop's state, command or connection


def node_channel(node_id: int) -> str:
    return f"node.{node_id}"
