"""Session policies (QVD's timeouts, Kasm's idle shutdown): what is due for one running desktop, given its policy
and what the farm knows of its user.

Three rules, each off at 0 (the default, so a farm that sets nothing behaves as before):

* **disconnected**: a desktop whose user has been disconnected for ``stop_after_disconnect_s`` is stopped
  (disconnected since the later of the disconnect and the desktop's start: a desktop nobody connected to counts
  from its start);
* **idle**: a connected user with no keyboard or mouse input for ``idle_after_s`` is disconnected or their
  desktop stopped (``idle_action``), after a notice on their display ``idle_warn_s`` before.  Idle counts from
  the later of the last input and the connection (a user who just came back is not idle), and the action never
  comes sooner than the notice's length after the notice was shown; input after the notice cancels it;
* **max_length**: a desktop running for ``max_length_s`` since its start is stopped, connected or not, with a
  notice ``max_length_warn_s`` before to a connected user.  It is a hard limit: a late notice does not defer it.

Why a pure function: the node's loop (``node/session_policy.py``) gathers the facts and carries the verdict out;
the rules are tested here without a farm (tests/unit/test_session_rules.py), and ``check_at`` tells the loop
when to look again (controller-runtime's "requeue after"), so a stop comes on time without a fast poll.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from deckard.model.errors import BadInput
from deckard.model.states import UserState


class Reason(StrEnum):
    """Why a policy acted: it names the stop in the desktop's reason, the audit log and the node's log."""

    IDLE = "idle"
    DISCONNECTED = "disconnected"
    MAX_LENGTH = "max_length"


class Action(StrEnum):
    DISCONNECT = "disconnect"
    STOP = "stop"


@dataclass(frozen=True)
class SessionPolicy:
    """One desktop's policy: the ``session.*`` configuration keys resolved for its tenant and OSF."""

    stop_after_disconnect_s: int = 0
    idle_after_s: int = 0
    idle_warn_s: int = 0
    idle_action: Action = Action.DISCONNECT
    max_length_s: int = 0
    max_length_warn_s: int = 0

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> SessionPolicy:
        """From ``{"session.idle_after_s": 600, ...}`` (``services.config.read_configs(conn, "session.", ...)``)."""
        return cls(
            stop_after_disconnect_s=int(values["session.stop_after_disconnect_s"]),
            idle_after_s=int(values["session.idle_after_s"]),
            idle_warn_s=int(values["session.idle_warn_s"]),
            idle_action=Action(values["session.idle_action"]),
            max_length_s=int(values["session.max_length_s"]),
            max_length_warn_s=int(values["session.max_length_warn_s"]),
        )

    @property
    def enabled(self) -> bool:
        return bool(self.stop_after_disconnect_s or self.idle_after_s or self.max_length_s)

    @property
    def watches_input(self) -> bool:
        """Whether the node must ask the desktop's agent how long its user has been idle."""
        return self.idle_after_s > 0


@dataclass(frozen=True)
class SessionFacts:
    """What the farm knows of one running desktop's session (columns of ``desktops``)."""

    started_at: dt.datetime
    user_state: str  # connected | connecting | disconnected
    user_state_at: dt.datetime | None  # when user_state last changed
    input_at: dt.datetime | None  # the user's last keyboard or mouse input, as the agent reported it
    idle_warned_at: dt.datetime | None = None
    length_warned: bool = False  # the max-length notice was shown for this start

    def disconnected_since(self) -> dt.datetime | None:
        """Since when nobody is connected (``None`` while a user is connected or connecting)."""
        if self.user_state != UserState.DISCONNECTED:
            return None
        return _later(self.user_state_at, self.started_at)

    def idle_since(self) -> dt.datetime | None:
        """Since when the connected user has not typed nor moved the mouse; ``None`` when not connected or when the
        agent could not tell (then no idle rule applies: nobody is stopped on a guess)."""
        if self.user_state != UserState.CONNECTED or self.input_at is None:
            return None
        return _later(self.input_at, self.user_state_at)


def _later(a: dt.datetime | None, b: dt.datetime | None) -> dt.datetime | None:
    if a is None or b is None:
        return a or b
    return max(a, b)


@dataclass(frozen=True)
class Notice:
    """A notice due on the user's display: ``action`` will happen at ``at`` (if nothing changes meanwhile)."""

    reason: Reason
    action: Action
    at: dt.datetime


@dataclass(frozen=True)
class Verdict:
    """What to do now for one desktop; ``check_at`` is the next moment something may fall due (None: nothing)."""

    action: Action | None = None
    reason: Reason | None = None
    notices: tuple[Notice, ...] = ()
    forget_idle_warning: bool = False  # the user came back (or left) after the idle notice: it no longer holds
    check_at: dt.datetime | None = None


def _secs(n: int) -> dt.timedelta:
    return dt.timedelta(seconds=n)


def decide(policy: SessionPolicy, facts: SessionFacts, now: dt.datetime) -> Verdict:
    """The rules of the module docstring, for one desktop at ``now``: a stop wins over a disconnect over notices."""
    if not policy.enabled:
        return Verdict()
    later: list[dt.datetime] = []
    notices: list[Notice] = []
    idle_since = facts.idle_since()
    warned_at = facts.idle_warned_at
    forget = warned_at is not None and (idle_since is None or idle_since > warned_at)
    if forget:
        warned_at = None

    def acted(action: Action, reason: Reason) -> Verdict:
        return Verdict(action, reason, forget_idle_warning=forget)

    if policy.max_length_s:
        end = facts.started_at + _secs(policy.max_length_s)
        if now >= end:
            return acted(Action.STOP, Reason.MAX_LENGTH)
        later.append(end)
        notice = min(policy.max_length_warn_s, policy.max_length_s)
        if notice and not facts.length_warned and facts.user_state == UserState.CONNECTED:
            warn_at = end - _secs(notice)
            if now >= warn_at:
                notices.append(Notice(Reason.MAX_LENGTH, Action.STOP, end))
            else:
                later.append(warn_at)

    disconnected_since = facts.disconnected_since()
    if policy.stop_after_disconnect_s and disconnected_since is not None:
        due = disconnected_since + _secs(policy.stop_after_disconnect_s)
        if now >= due:
            return acted(Action.STOP, Reason.DISCONNECTED)
        later.append(due)

    if policy.idle_after_s and idle_since is not None:
        act_at = idle_since + _secs(policy.idle_after_s)
        notice = min(policy.idle_warn_s, policy.idle_after_s)
        if notice and warned_at is None:  # never act unannounced: the notice first, the action after it
            warn_at = act_at - _secs(notice)
            if now >= warn_at:
                notices.append(Notice(Reason.IDLE, policy.idle_action, max(act_at, now + _secs(notice))))
            else:
                later.append(warn_at)
        else:
            if warned_at is not None:
                act_at = max(act_at, warned_at + _secs(notice))
            if now >= act_at:
                return acted(policy.idle_action, Reason.IDLE)
            later.append(act_at)

    return Verdict(notices=tuple(notices), forget_idle_warning=forget, check_at=min(later, default=None))


# ---- durations as administrators type them (``--idle-for 30m``, ``?disconnected_for=2h``) ----------------------

_DURATION = re.compile(r"([0-9]{1,9})([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION_S = 10 * 365 * 86400


def parse_duration(text: str, what: str = "duration") -> int:
    """``90``, ``90s``, ``30m``, ``2h``, ``1d`` → seconds; BadInput (``bad_duration``) naming ``what`` otherwise."""
    m = _DURATION.fullmatch(text.strip().lower())
    if not m or int(m.group(1)) * _UNIT_S[m.group(2)] > MAX_DURATION_S:
        raise BadInput(
            f"{text[:40]!r} is not a valid {what}: write seconds or a number with s, m, h or d (e.g. 30m, 2h)",
            code="bad_duration",
            details={"field": what},
        )
    return int(m.group(1)) * _UNIT_S[m.group(2)]


def describe_duration(seconds: float) -> str:
    """Seconds as a person reads them: ``45s``, ``12m``, ``2h05m``, ``3d4h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m" + (f"{s % 60:02d}s" if s % 60 and s < 600 else "")
    if s < 86400:
        return f"{s // 3600}h" + (f"{s % 3600 // 60:02d}m" if s % 3600 // 60 else "")
    return f"{s // 86400}d" + (f"{s % 86400 // 3600}h" if s % 86400 // 3600 else "")
