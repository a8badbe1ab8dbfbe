"""``runtime.process.freeze_heap``: what a started process holds leaves the collector's walks; the rest does not."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from deckard.runtime.process import freeze_heap


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    """Two objects that refer to each other and to nothing else: only the cyclic collector frees them."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def frozen() -> Iterator[None]:
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()  # this test process's objects go back to the collector


@pytest.mark.usefixtures("frozen")
def test_startup_garbage_is_collected_what_lives_is_frozen_and_later_cycles_are_still_collected() -> None:
    garbage = cycle()
    alive = Node()
    freeze_heap()
    assert garbage() is None, "garbage of the start was frozen instead of freed"
    assert gc.get_freeze_count() > 0
    assert not any(o is alive for o in gc.get_objects()), "what the start left alive is still walked"

    later = cycle()
    gc.collect()
    assert later() is None, "a cycle made after the freeze was never collected"
