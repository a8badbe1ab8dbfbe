"""Why a broker's session ends (``broker.session.ended_because``), from the desktop's row as the watch reads it,
and when the watch judges a session."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from deckard.broker.session import SessionWatch, ended_because
from deckard.db.notify import Bus
from deckard.model.states import DesktopState
from deckard.services.events import DESKTOPS
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


async def test_a_session_that_starts_waiting_while_the_owners_are_read_is_judged_by_the_next_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watch's read may be from before a new connection took the desktop: it must not end that connection
    as taken over (a CI run's browser connect was so ended by a read started just before it)."""
    from deckard.broker import session as broker_session

    owner = {"now": "old"}
    gate, reading = asyncio.Event(), asyncio.Event()

    async def owners(_db: object, ids: list[int]) -> dict[int, SessionOwner]:
        seen = owner["now"]  # read when the query starts, returned once the gate opens
        reading.set()
        await gate.wait()
        return {i: SessionOwner(seen, DesktopState.RUNNING, None) for i in ids}

    monkeypatch.setattr(broker_session, "session_owners", owners)
    bus = Bus()
    watch = SessionWatch(SimpleNamespace(bus=bus), interval=30)  # type: ignore[arg-type]
    old = asyncio.create_task(watch.ended(1, "old"))
    await asyncio.sleep(0.01)
    await bus.notify(DESKTOPS, "1")
    await asyncio.wait_for(reading.wait(), 5)
    owner["now"] = "new"  # the new connection takes the desktop while the read is on its way
    new = asyncio.create_task(watch.ended(1, "new"))
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.sleep(0.01)
    assert not new.done() and not old.done()  # the read saw "old": it holds, and "new" waits for the next read
    await bus.notify(DESKTOPS, "1")
    assert await asyncio.wait_for(old, 5) == ("taken_over", "another connection took over this desktop")
    assert not new.done()
    new.cancel()
    await watch.close()


async def test_a_batch_of_ids_naming_a_watched_desktop_is_judged_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bulk stop or a lost node's release notifies its desktops as one comma-separated payload: the session on
    one of them ends then, not at the watch's next interval."""
    from deckard.broker import session as broker_session

    read: list[list[int]] = []

    async def owners(_db: object, ids: list[int]) -> dict[int, SessionOwner]:
        read.append(ids)
        return {i: SessionOwner(None, DesktopState.STOPPED, None) for i in ids}

    monkeypatch.setattr(broker_session, "session_owners", owners)
    bus = Bus()
    watch = SessionWatch(SimpleNamespace(bus=bus), interval=30)  # type: ignore[arg-type]
    ended = asyncio.create_task(watch.ended(7, "s1"))
    await asyncio.sleep(0.01)
    await bus.notify(DESKTOPS, "3,4")  # none of ours: nothing is read
    await asyncio.sleep(0.01)
    assert read == [] and not ended.done()
    await bus.notify(DESKTOPS, "5,7,9")
    assert await asyncio.wait_for(ended, 5) == ("ended", "the desktop's session ended (desktop stopped)")
    assert read == [[7]]
    await watch.close()


async def test_a_waiter_wakes_for_its_own_desktop_and_passes_over_the_others() -> None:
    bus = Bus()
    async with bus.subscribe(DESKTOPS) as sub:
        waiting = asyncio.create_task(sub.wait_about("7", 5))
        for other in ("3", "17", "70,71"):
            await bus.notify(DESKTOPS, other)
        await asyncio.sleep(0.01)
        assert not waiting.done()
        await bus.notify(DESKTOPS, "6,7")
        assert await asyncio.wait_for(waiting, 1) is True
        waiting = asyncio.create_task(sub.wait_about("7", 5))
        await bus.notify(DESKTOPS, "")  # news of no desktop in particular: look
        assert await asyncio.wait_for(waiting, 1) is True
        await bus.notify(DESKTOPS, "8")
        assert await sub.wait_about("7", 0.05) is False  # the timeout: the caller reads anyway
