"""Why a broker's session ends (``broker.session.ended_because``), from the desktop's row as the watch reads it."""

from __future__ import annotations

from deckard.broker.session import ended_because
from deckard.model.states import DesktopState
from deckard.services.sessions import SessionOwner


def test_a_session_that_still_holds_its_desktop_goes_on() -> None:
    assert ended_because(SessionOwner("s1", DesktopState.RUNNING, None), "s1") is None


def test_another_session_on_the_desktop_is_a_take_over() -> None:
    outcome = ended_because(SessionOwner("s2", DesktopState.RUNNING, None), "s1")
    assert outcome == ("taken_over", "another connection took over this desktop")


def test_no_session_says_why_from_the_state() -> None:
    failed = ended_because(SessionOwner(None, DesktopState.FAILED, "no node"), "s1")
    assert failed == ("failed", "the desktop failed to start: no node")
    stopped = ended_because(SessionOwner(None, DesktopState.STOPPED, None), "s1")
    assert stopped == ("ended", "the desktop's session ended (desktop stopped)")


def test_a_deleted_desktop_ends_the_session() -> None:
    assert ended_because(None, "s1") == ("ended", "the desktop was deleted")
