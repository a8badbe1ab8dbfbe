"""State machines of Deckard, written as transition tables (ARCHITECTURE.md §4).

Desired state (commands written by the API and the broker) is kept apart from observed state (written only
by the node that owns the desktop).  A command is claimed once, atomically, by the node that acts on it.

These tables govern: every state write in ``services/`` goes through ``services/transitions.py``, which turns
a table into the guarded ``UPDATE … WHERE state IN (sources) RETURNING``; a write the table does not allow
changes nothing and raises ``InvalidTransition``.  A self-loop (``connecting → connecting``) is a repeat the
code relies on and is written here on purpose; no other repeat is allowed.  ``docs/state-machines.md`` is
generated from this module (``render_tables``; ``tools/state_machines_doc.py`` writes it, a unit test checks it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from deckard.model.errors import InvalidTransition


class DesktopState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    ZOMBIE = "zombie"  # the guest does not answer and is being killed
    FAILED = "failed"  # the last start failed; failure_reason says why


class DesktopCommand(StrEnum):
    START = "start"
    STOP = "stop"


class UserState(StrEnum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"


class NodeState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    LOST = "lost"
    RESTARTING = "restarting"  # the daemon re-executes itself; its guests keep running and are adopted


class NodeCommand(StrEnum):
    STOP = "stop"  # stop the desktops cleanly and exit (QVD's host_runtimes.cmd)
    DRAIN = "drain"  # tell the users of running desktops to leave; placement already skips the node
    RESTART = "restart"  # re-execute in place, keeping the guests (adopted by the new process)


class ImageState(StrEnum):
    NEW = "new"
    BUILDING = "building"
    UPLOADING = "uploading"
    READY = "ready"
    PUBLISHED = "published"
    RETIRED = "retired"
    FAILED = "failed"


DESKTOP_TRANSITIONS: dict[DesktopState, frozenset[DesktopState]] = {
    DesktopState.STOPPED: frozenset({DesktopState.STARTING}),
    # failed → stopped: a retry placed on a node that was then lost and fenced is released as stopped
    DesktopState.FAILED: frozenset({DesktopState.STARTING, DesktopState.STOPPED}),
    DesktopState.STARTING: frozenset(
        {DesktopState.RUNNING, DesktopState.FAILED, DesktopState.STOPPING, DesktopState.ZOMBIE, DesktopState.STOPPED}
    ),
    DesktopState.RUNNING: frozenset({DesktopState.STOPPING, DesktopState.ZOMBIE, DesktopState.STOPPED}),
    DesktopState.STOPPING: frozenset({DesktopState.STOPPED, DesktopState.ZOMBIE}),
    DesktopState.ZOMBIE: frozenset({DesktopState.STOPPED}),
}

# No node holds a desktop in these states: its node, agent token and user session are cleared on the way in,
# and only here may it be deleted, reset, retagged or asked to start.
DESKTOP_AT_REST: frozenset[DesktopState] = frozenset({DesktopState.STOPPED, DesktopState.FAILED})

# A command may be asked for only in these observed states (QVD: start only from stopped, stop only from
# starting|running).  A failed desktop may be started again: the reason is cleared when it is claimed.
COMMAND_ALLOWED_FROM: dict[DesktopCommand, frozenset[DesktopState]] = {
    DesktopCommand.START: DESKTOP_AT_REST,
    DesktopCommand.STOP: frozenset({DesktopState.STARTING, DesktopState.RUNNING}),
}

# The state a node's claim of a command moves the desktop to (the claim clears the command).
COMMAND_CLAIMED_AS: dict[DesktopCommand, DesktopState] = {
    DesktopCommand.START: DesktopState.STARTING,
    DesktopCommand.STOP: DesktopState.STOPPING,
}

USER_TRANSITIONS: dict[UserState, frozenset[UserState]] = {
    UserState.DISCONNECTED: frozenset({UserState.CONNECTING}),
    # → connecting from every state: a new connection takes the display over (a fresh session id)
    UserState.CONNECTING: frozenset({UserState.CONNECTED, UserState.DISCONNECTED, UserState.CONNECTING}),
    UserState.CONNECTED: frozenset({UserState.DISCONNECTED, UserState.CONNECTING}),
}

NODE_TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    NodeState.STOPPED: frozenset({NodeState.STARTING}),
    NodeState.LOST: frozenset({NodeState.STARTING}),
    # → starting from the live states too: a daemon that crashed registers again without having said goodbye
    NodeState.STARTING: frozenset({NodeState.STARTING, NodeState.RUNNING, NodeState.STOPPING, NodeState.LOST}),
    NodeState.RUNNING: frozenset({NodeState.STARTING, NodeState.STOPPING, NodeState.LOST}),
    NodeState.RESTARTING: frozenset({NodeState.STARTING, NodeState.LOST}),
    # stopping → restarting: a restart leaves the loops (stopping) and then hands its guests over
    NodeState.STOPPING: frozenset({NodeState.STARTING, NodeState.STOPPED, NodeState.RESTARTING, NodeState.LOST}),
}

NODE_COMMAND_ALLOWED_FROM: dict[NodeCommand, frozenset[NodeState]] = {
    NodeCommand.STOP: frozenset({NodeState.STARTING, NodeState.RUNNING}),
    NodeCommand.DRAIN: frozenset({NodeState.RUNNING}),
    NodeCommand.RESTART: frozenset({NodeState.RUNNING}),
}

IMAGE_TRANSITIONS: dict[ImageState, frozenset[ImageState]] = {
    ImageState.NEW: frozenset({ImageState.BUILDING, ImageState.UPLOADING, ImageState.READY, ImageState.FAILED}),
    ImageState.BUILDING: frozenset({ImageState.READY, ImageState.FAILED}),
    ImageState.UPLOADING: frozenset({ImageState.READY, ImageState.FAILED}),
    ImageState.READY: frozenset({ImageState.PUBLISHED, ImageState.RETIRED}),
    # published → published: publishing again moves the tags onto it and restarts the old desktops' expiry
    ImageState.PUBLISHED: frozenset({ImageState.PUBLISHED, ImageState.RETIRED}),
    ImageState.RETIRED: frozenset({ImageState.PUBLISHED}),
    ImageState.FAILED: frozenset(),
}


S = TypeVar("S", bound=StrEnum)


def sources(table: Mapping[S, frozenset[S]], to: S) -> frozenset[S]:
    """Every state the table lets go to ``to``: the ``state IN (…)`` of a guarded write."""
    return frozenset(old for old, targets in table.items() if to in targets)


def check_transition(table: Mapping[S, frozenset[S]], old: S, new: S, *, what: str) -> None:
    if new not in table.get(old, frozenset()):
        allowed = ", ".join(sorted(sources(table, new))) or "nowhere"
        raise InvalidTransition(
            f"a {what} cannot go from {old} to {new} (allowed from: {allowed})",
            details={"from": str(old), "to": str(new)},
        )


def check_desktop_transition(old: DesktopState, new: DesktopState) -> None:
    check_transition(DESKTOP_TRANSITIONS, old, new, what="desktop")


def check_command(cmd: DesktopCommand, state: DesktopState, *, what: str = "desktop") -> None:
    allowed = COMMAND_ALLOWED_FROM[cmd]
    if state not in allowed:
        hint = "it is already " + state if state != DesktopState.ZOMBIE else "it is being killed; try again soon"
        raise InvalidTransition(
            f"cannot {cmd} the {what}: {hint} (allowed from: {', '.join(sorted(allowed))})",
            code=f"cannot_{cmd}",
        )


# ---- docs/state-machines.md -------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    """One state machine as the documentation shows it."""

    title: str
    column: str
    initial: StrEnum
    transitions: Mapping[Any, frozenset[Any]]
    commands: Mapping[Any, frozenset[Any]] | None = None


MACHINES: tuple[Machine, ...] = (
    Machine("Desktop", "desktops.state", DesktopState.STOPPED, DESKTOP_TRANSITIONS, COMMAND_ALLOWED_FROM),
    Machine("User connection", "desktops.user_state", UserState.DISCONNECTED, USER_TRANSITIONS),
    Machine("Node", "nodes.state", NodeState.STARTING, NODE_TRANSITIONS, NODE_COMMAND_ALLOWED_FROM),
    Machine("Disk image", "disk_images.state", ImageState.NEW, IMAGE_TRANSITIONS),
)

DOC_BEGIN = "<!-- BEGIN GENERATED -->"
DOC_END = "<!-- END GENERATED -->"


def _render(m: Machine) -> list[str]:
    states = list(type(m.initial))
    out = [f"### {m.title}: transitions of `{m.column}`", "", "| from | to |", "|---|---|"]
    for old in states:
        targets = m.transitions.get(old, frozenset())
        out.append(f"| {old} | {', '.join(s for s in states if s in targets) or '—'} |")
    if m.commands:
        out += ["", "| command | accepted while |", "|---|---|"]
        out += [f"| `{cmd}` | {', '.join(s for s in states if s in allowed)} |" for cmd, allowed in m.commands.items()]
    out += ["", "```mermaid", "stateDiagram-v2", f"    [*] --> {m.initial}"]
    for old in states:
        out += [f"    {old} --> {new}" for new in states if new in m.transitions.get(old, frozenset())]
    return [*out, "```", ""]


def render_tables() -> str:
    """The generated part of docs/state-machines.md: each table as a list and as a Mermaid diagram."""
    lines = [DOC_BEGIN, ""]
    for m in MACHINES:
        lines += _render(m)
    return "\n".join([*lines, DOC_END])


def render_doc(current: str) -> str:
    """``current`` with its generated part replaced (appended when the markers are missing)."""
    head, sep, rest = current.partition(DOC_BEGIN)
    if not sep:
        return current.rstrip("\n") + "\n\n" + render_tables() + "\n"
    _old, sep, tail = rest.partition(DOC_END)
    if not sep:
        raise ValueError(f"{DOC_BEGIN!r} without {DOC_END!r}")
    return head + render_tables() + tail
