"""State machines of Deckard, written as transition tables (ARCHITECTURE.md §4).

Desired state (commands written by the API and the broker) is kept apart from observed state (written only
by the node that owns the desktop).  A command is claimed once, atomically, by the node that acts on it.
"""

from __future__ import annotations

from enum import StrEnum

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
    DesktopState.FAILED: frozenset({DesktopState.STARTING, DesktopState.STOPPED}),
    DesktopState.STARTING: frozenset(
        {DesktopState.RUNNING, DesktopState.FAILED, DesktopState.STOPPING, DesktopState.ZOMBIE, DesktopState.STOPPED}
    ),
    DesktopState.RUNNING: frozenset({DesktopState.STOPPING, DesktopState.ZOMBIE, DesktopState.STOPPED}),
    DesktopState.STOPPING: frozenset({DesktopState.STOPPED, DesktopState.ZOMBIE}),
    DesktopState.ZOMBIE: frozenset({DesktopState.STOPPED}),
}

# A command may be asked for only in these observed states (QVD: start only from stopped, stop only from
# starting|running).  A failed desktop may be started again: the reason is cleared when it is claimed.
COMMAND_ALLOWED_FROM: dict[DesktopCommand, frozenset[DesktopState]] = {
    DesktopCommand.START: frozenset({DesktopState.STOPPED, DesktopState.FAILED}),
    DesktopCommand.STOP: frozenset({DesktopState.STARTING, DesktopState.RUNNING}),
}

USER_TRANSITIONS: dict[UserState, frozenset[UserState]] = {
    UserState.DISCONNECTED: frozenset({UserState.CONNECTING}),
    UserState.CONNECTING: frozenset({UserState.CONNECTED, UserState.DISCONNECTED, UserState.CONNECTING}),
    UserState.CONNECTED: frozenset({UserState.DISCONNECTED, UserState.CONNECTING}),
}

NODE_TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    NodeState.STOPPED: frozenset({NodeState.STARTING}),
    NodeState.LOST: frozenset({NodeState.STARTING}),
    NodeState.STARTING: frozenset({NodeState.RUNNING, NodeState.STOPPING, NodeState.LOST}),
    NodeState.RUNNING: frozenset({NodeState.STOPPING, NodeState.RESTARTING, NodeState.LOST}),
    NodeState.RESTARTING: frozenset({NodeState.STARTING, NodeState.LOST}),
    NodeState.STOPPING: frozenset({NodeState.STOPPED, NodeState.LOST}),
}

IMAGE_TRANSITIONS: dict[ImageState, frozenset[ImageState]] = {
    ImageState.NEW: frozenset({ImageState.BUILDING, ImageState.UPLOADING, ImageState.READY, ImageState.FAILED}),
    ImageState.BUILDING: frozenset({ImageState.READY, ImageState.FAILED}),
    ImageState.UPLOADING: frozenset({ImageState.READY, ImageState.FAILED}),
    ImageState.READY: frozenset({ImageState.PUBLISHED, ImageState.RETIRED}),
    ImageState.PUBLISHED: frozenset({ImageState.RETIRED}),
    ImageState.RETIRED: frozenset({ImageState.PUBLISHED}),
    ImageState.FAILED: frozenset(),
}


def check_desktop_transition(old: DesktopState, new: DesktopState) -> None:
    if new not in DESKTOP_TRANSITIONS.get(old, frozenset()):
        raise InvalidTransition(f"a desktop cannot go from {old} to {new}")


def check_command(cmd: DesktopCommand, state: DesktopState, *, what: str = "desktop") -> None:
    allowed = COMMAND_ALLOWED_FROM[cmd]
    if state not in allowed:
        hint = "it is already " + state if state != DesktopState.ZOMBIE else "it is being killed; try again soon"
        raise InvalidTransition(
            f"cannot {cmd} the {what}: {hint} (allowed from: {', '.join(sorted(allowed))})",
            code=f"cannot_{cmd}",
        )
